"""TLS start-up checks of `gpusoc-agent run`, the agent certificates' EKU, and `watch`'s hints.

A new-user trial found: a key that does not match the certificate, and a port in use, both ended
in a traceback about "Failed to bind"; swapping the agent CA and the console CA went unnoticed
while other agents' certificates were admitted as consoles; `watch` without --insecure against
an --insecure agent showed a raw WRONG_VERSION_NUMBER.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.buffer import FrameBuffer
from agent.collect.simulated import SimulatedCollector
from agent.pki import channel_credentials, create_dev_pki, server_credentials
from agent.runtime import AgentRuntime
from agent.serve import run_server
from agent.tls import TlsFileError, check_client_ca, check_key_matches_certificate, load_server_credentials
from agent.watch import connection_hint, watch
from protos import serde

HOST = "gpu-01"
OTHER = "sim-0001"  # another agent of the same fleet


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    create_dev_pki(out, agents=[HOST, OTHER], consoles=["ops"])
    return out


def _agent(pki: Path, name: str = HOST) -> tuple[Path, Path]:
    return pki / "agents" / f"{name}.pem", pki / "agents" / f"{name}.key"


def _run_agent(tmp_path: Path, *, cert: Path, key: Path, client_ca: Path, listen: str = "127.0.0.1:0",
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable, "-m", "agent.cli", "run",
        "--simulate-gpus", "1",
        "--host", HOST,
        "--listen", listen,
        "--tls-cert", str(cert),
        "--tls-key", str(key),
        "--tls-client-ca", str(client_ca),
        "--no-spool",
        "--training-socket", str(tmp_path / "train.sock"),
    ]
    env = {**os.environ, "GPUSOC_AGENT_STATE_DIR": str(tmp_path / "state"), "GPUSOC_AGENT_OPERATOR_CA": ""}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _our_lines(stderr: str) -> list[str]:
    """The agent's own error lines (gRPC's C core may log its own `E....` line beside them)."""
    return [line for line in stderr.splitlines() if line.startswith("gpusoc-agent:")]


# --------------------------------------------------------------------------- the checks, in-process


def test_matching_files_pass(pki: Path) -> None:
    cert, key = _agent(pki)
    check_key_matches_certificate(cert, key)
    check_client_ca(cert, pki / "console-ca.pem")
    assert load_server_credentials(cert, key, pki / "console-ca.pem") is not None


def test_key_of_another_certificate_is_refused_naming_both_files(pki: Path) -> None:
    cert, _ = _agent(pki)
    _, other_key = _agent(pki, OTHER)
    with pytest.raises(TlsFileError, match="does not match") as err:
        check_key_matches_certificate(cert, other_key)
    assert str(cert) in str(err.value) and str(other_key) in str(err.value)
    with pytest.raises(TlsFileError, match="does not match"):
        load_server_credentials(cert, other_key, pki / "console-ca.pem")


def test_encrypted_key_is_refused_without_a_pass_phrase_prompt(pki: Path, tmp_path: Path) -> None:
    cert, key = _agent(pki)
    loaded = serialization.load_pem_private_key(key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        loaded.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TlsFileError, match=r"encrypted\.key is encrypted"):
        check_key_matches_certificate(cert, encrypted)


def test_agent_ca_as_client_ca_is_refused_with_the_explanation(pki: Path) -> None:
    cert, key = _agent(pki)
    with pytest.raises(TlsFileError) as err:
        check_client_ca(cert, pki / "agent-ca.pem")
    msg = str(err.value)
    assert "issued this agent's own certificate" in msg and "console-ca.pem" in msg
    assert str(pki / "agent-ca.pem") in msg and "OU=agent-ca" in msg
    # A bundle that holds the agent CA beside the console CA is the same mistake.
    bundle = pki / "both-cas.pem"
    bundle.write_bytes((pki / "console-ca.pem").read_bytes() + (pki / "agent-ca.pem").read_bytes())
    with pytest.raises(TlsFileError, match="issued this agent's own certificate"):
        load_server_credentials(cert, key, bundle)


def test_leaf_certificate_as_client_ca_is_refused(pki: Path) -> None:
    cert, _ = _agent(pki)
    with pytest.raises(TlsFileError, match="holds no CA certificate"):
        check_client_ca(cert, pki / "consoles" / "ops.pem")


# --------------------------------------------------------------------------- `gpusoc-agent run`


def test_run_with_mismatched_key_exits_2_naming_the_files(pki: Path, tmp_path: Path) -> None:
    cert, _ = _agent(pki)
    _, other_key = _agent(pki, OTHER)
    proc = _run_agent(tmp_path, cert=cert, key=other_key, client_ca=pki / "console-ca.pem")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Failed to bind" not in proc.stderr
    (line,) = _our_lines(proc.stderr)
    assert line.startswith("gpusoc-agent: TLS setup failed: ")
    assert str(cert) in line and str(other_key) in line and "does not match" in line


def test_run_with_swapped_cas_exits_2_with_the_explanation(pki: Path, tmp_path: Path) -> None:
    cert, key = _agent(pki)
    proc = _run_agent(tmp_path, cert=cert, key=key, client_ca=pki / "agent-ca.pem")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = _our_lines(proc.stderr)
    assert line.startswith("gpusoc-agent: TLS setup failed: ")
    assert "agent CA" in line and "--tls-client-ca pki/console-ca.pem" in line


def test_run_on_a_port_in_use_exits_4_in_one_line(pki: Path, tmp_path: Path) -> None:
    cert, key = _agent(pki)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        listen = f"127.0.0.1:{holder.getsockname()[1]}"
        proc = _run_agent(tmp_path, cert=cert, key=key, client_ca=pki / "console-ca.pem", listen=listen)
    assert proc.returncode == 4, proc.stderr
    assert "Traceback" not in proc.stderr and "RuntimeError" not in proc.stderr
    assert "add_port" not in proc.stderr  # checked before gRPC starts: gRPC's own error line is not printed
    (line,) = _our_lines(proc.stderr)
    assert line == (
        f"gpusoc-agent: cannot listen on {listen}: the port is in use or the address is not local "
        "(Address already in use)"
    )


# --------------------------------------------------------------------------- EKU at the TLS layer


def _eku(path: Path) -> set[x509.ObjectIdentifier]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _issue_client_auth_cert_from_agent_ca(pki: Path, out: Path) -> tuple[Path, Path]:
    """What `gpusoc-agent pki` issued to agents before: serverAuth and clientAuth, agent CA."""
    ca_cert = x509.load_pem_x509_certificate((pki / "agent-ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "agent-ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old-agent")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = out / "old-agent.pem", out / "old-agent.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


async def _describe(port: int, creds: grpc.ChannelCredentials) -> str:
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as channel:
        call = channel.unary_unary(
            serde.DESCRIBE_METHOD,
            request_serializer=lambda _: serde.encode_describe_request(),
            response_deserializer=serde.decode_description,
        )
        desc = await call(None, timeout=10)
        return str(desc.host)


def test_agent_certificates_carry_server_auth_only(pki: Path) -> None:
    assert _eku(_agent(pki)[0]) == {ExtendedKeyUsageOID.SERVER_AUTH}
    assert _eku(pki / "consoles" / "ops.pem") == {ExtendedKeyUsageOID.CLIENT_AUTH}


async def test_agent_certificate_is_refused_as_a_client_even_where_the_agent_ca_is_trusted(
    pki: Path, tmp_path: Path
) -> None:
    """A server that trusts both CAs (the swapped-CA mistake, past the start-up check) admits a
    console, refuses another agent's certificate, and would admit an old clientAuth agent cert:
    so it is the EKU that keeps agents out."""
    bundle = tmp_path / "both-cas.pem"
    bundle.write_bytes((pki / "agent-ca.pem").read_bytes() + (pki / "console-ca.pem").read_bytes())
    cert, key = _agent(pki)
    rt = AgentRuntime(HOST, SimulatedCollector(1, host=HOST), FrameBuffer(max_frames=10), 0.1)
    server, port = await run_server(rt, credentials=server_credentials(cert, key, bundle))
    try:
        console = channel_credentials(pki / "agent-ca.pem", pki / "consoles" / "ops.pem", pki / "consoles" / "ops.key")
        assert await _describe(port, console) == HOST

        other_cert, other_key = _agent(pki, OTHER)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _describe(port, channel_credentials(pki / "agent-ca.pem", other_cert, other_key))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

        old_cert, old_key = _issue_client_auth_cert_from_agent_ca(pki, tmp_path)
        assert await _describe(port, channel_credentials(pki / "agent-ca.pem", old_cert, old_key)) == HOST
    finally:
        await server.stop(0)


# --------------------------------------------------------------------------- `gpusoc-agent watch` hints


async def test_watch_with_mtls_against_an_insecure_agent_suggests_insecure(
    pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rt = AgentRuntime(HOST, SimulatedCollector(1, host=HOST), FrameBuffer(max_frames=10), 0.1)
    server, port = await run_server(rt)  # plaintext, like `gpusoc-agent run --insecure`
    try:
        args = argparse.Namespace(
            address=f"127.0.0.1:{port}",
            insecure=False,
            ca=str(pki / "agent-ca.pem"),
            cert=str(pki / "consoles" / "ops.pem"),
            key=str(pki / "consoles" / "ops.key"),
            count=1,
        )
        assert await watch(args) == 1
    finally:
        await server.stop(0)
    err = capsys.readouterr().err
    assert "WRONG_VERSION_NUMBER" in err
    assert err.rstrip().endswith("(is the agent running with --insecure? then pass --insecure)")



async def test_watch_cli_prints_one_line_not_grpc_core_logs(pki: Path) -> None:
    """The CLI's stderr is its diagnosis alone: gRPC's C core logs its failed handshake at INFO."""
    import asyncio

    rt = AgentRuntime(HOST, SimulatedCollector(1, host=HOST), FrameBuffer(max_frames=10), 0.1)
    server, port = await run_server(rt)  # plaintext
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.cli", "watch", f"127.0.0.1:{port}", "--count", "1",
            "--ca", str(pki / "agent-ca.pem"), "--cert", str(pki / "consoles" / "ops.pem"),
            "--key", str(pki / "consoles" / "ops.key"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
        _, err_b = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await server.stop(0)
    assert proc.returncode == 1
    lines = err_b.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("gpusoc-agent watch: ") and lines[0].endswith("then pass --insecure)")

def test_connection_hints() -> None:
    unavailable = grpc.StatusCode.UNAVAILABLE
    assert "pass --insecure" in connection_hint(unavailable, "...: WRONG_VERSION_NUMBER: ...", insecure=False)
    assert "needs mTLS" in connection_hint(unavailable, "Socket closed", insecure=True)
    refused = "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Connection refused"
    assert "nothing listens there" in connection_hint(unavailable, refused, insecure=True)
    assert "agent CA" in connection_hint(unavailable, "...: CERTIFICATE_VERIFY_FAILED: ...", insecure=False)
    assert "console CA" in connection_hint(unavailable, "Socket closed", insecure=False, received=0)
    assert connection_hint(unavailable, "Socket closed", insecure=False, received=5) == ""
    assert connection_hint(grpc.StatusCode.INVALID_ARGUMENT, "WRONG_VERSION_NUMBER", insecure=False) == ""
