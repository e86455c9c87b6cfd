"""Dev PKI: layout, chaining to the right CA, key modes, overwrite rules, and real gRPC mTLS handshakes."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.pki import (
    PkiError,
    PkiPaths,
    cert_dns_names,
    cert_identity,
    channel_credentials,
    create_dev_pki,
    server_credentials,
    verify_issued_by,
)

METHOD = "/gpusoc.test.Echo/Call"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    out = tmp_path_factory.mktemp("pki")
    return create_dev_pki(out, agents=["gpu-01", "10.1.2.3"], consoles=["ops"])


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    """An unrelated PKI: its certs must be rejected by the first one."""
    return create_dev_pki(tmp_path_factory.mktemp("other"), agents=["gpu-01"], consoles=["ops"])


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _eku(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


# --------------------------------------------------------------------------- layout and content


def test_layout(pki: PkiPaths) -> None:
    out = pki.out_dir
    for name in ("agent-ca.pem", "agent-ca.key", "console-ca.pem", "console-ca.key"):
        assert (out / name).is_file()
    assert pki.agents["gpu-01"].cert == out / "agents" / "gpu-01.pem"
    assert pki.agents["gpu-01"].key == out / "agents" / "gpu-01.key"
    assert pki.consoles["ops"].cert == out / "consoles" / "ops.pem"
    assert pki.consoles["ops"].key == out / "consoles" / "ops.key"
    assert all(p.is_file() for p in pki.written)
    assert len(pki.written) == 4 + 2 * 3
    assert "gpu-01" in str(pki)


def test_private_keys_are_0600_and_p256(pki: PkiPaths) -> None:
    keys = [pki.agent_ca_key, pki.console_ca_key, pki.agents["gpu-01"].key, pki.consoles["ops"].key]
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        assert b"BEGIN PRIVATE KEY" in key.read_bytes()
    for cert_path in (pki.agent_ca_cert, pki.agents["gpu-01"].cert, pki.consoles["ops"].cert):
        pub = _cert(cert_path).public_key()
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        assert pub.curve.name == "secp256r1"


def test_certs_chain_to_the_right_ca(pki: PkiPaths) -> None:
    agent_ca = pki.agent_ca_cert.read_bytes()
    console_ca = pki.console_ca_cert.read_bytes()
    assert agent_ca != console_ca
    agent = pki.agents["gpu-01"].cert.read_bytes()
    console = pki.consoles["ops"].cert.read_bytes()
    assert verify_issued_by(agent, agent_ca)
    assert not verify_issued_by(agent, console_ca)
    assert verify_issued_by(console, console_ca)
    assert not verify_issued_by(console, agent_ca)
    for ca in (pki.agent_ca_cert, pki.console_ca_cert):
        bc = _cert(ca).extensions.get_extension_for_class(x509.BasicConstraints).value
        assert bc.ca


def test_agent_cert_identity_and_sans(pki: PkiPaths) -> None:
    pem = pki.agents["gpu-01"].cert.read_bytes()
    assert cert_identity(pem) == "gpu-01"
    assert cert_dns_names(pem) == ["gpu-01", "localhost", "127.0.0.1", "::1"]
    cert = _cert(pki.agents["gpu-01"].cert)
    assert ExtendedKeyUsageOID.SERVER_AUTH in _eku(cert)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_agent_named_by_ip_gets_ip_san(pki: PkiPaths) -> None:
    pem = pki.agents["10.1.2.3"].cert.read_bytes()
    assert cert_identity(pem) == "10.1.2.3"
    assert cert_dns_names(pem) == ["localhost", "10.1.2.3", "127.0.0.1", "::1"]


def test_console_cert_is_client_only(pki: PkiPaths) -> None:
    pem = pki.consoles["ops"].cert.read_bytes()
    assert cert_identity(pem) == "ops"
    assert _eku(_cert(pki.consoles["ops"].cert)) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert_dns_names(pem) == []


def test_cert_identity_rejects_garbage() -> None:
    with pytest.raises(PkiError, match="not a PEM certificate"):
        cert_identity(b"hello")


# --------------------------------------------------------------------------- overwrite and extend


def test_refuses_overwrite_and_writes_nothing(tmp_path: Path) -> None:
    first = create_dev_pki(tmp_path, agents=["a1"], consoles=["c1"])
    before = {p: p.read_bytes() for p in first.written}
    with pytest.raises(PkiError, match=r"refusing to overwrite.*a1\.(pem|key)"):
        create_dev_pki(tmp_path, agents=["a2", "a1"], consoles=[])
    assert not (tmp_path / "agents" / "a2.pem").exists()  # preflight: nothing half-done
    assert {p: p.read_bytes() for p in first.written} == before


def test_overwrite_reissues_leaf_but_keeps_ca(tmp_path: Path) -> None:
    first = create_dev_pki(tmp_path, agents=["a1"], consoles=[])
    ca = first.agent_ca_cert.read_bytes()
    old = first.agents["a1"].cert.read_bytes()
    second = create_dev_pki(tmp_path, agents=["a1"], consoles=[], overwrite=True)
    assert second.agent_ca_cert.read_bytes() == ca
    new = second.agents["a1"].cert.read_bytes()
    assert new != old
    assert verify_issued_by(new, ca)
    assert stat.S_IMODE(second.agents["a1"].key.stat().st_mode) == 0o600
    assert second.written == [second.agents["a1"].key, second.agents["a1"].cert]


def test_add_names_later_uses_existing_cas(tmp_path: Path) -> None:
    first = create_dev_pki(tmp_path, agents=["a1"], consoles=["c1"])
    agent_ca = first.agent_ca_cert.read_bytes()
    console_ca = first.console_ca_cert.read_bytes()
    later = create_dev_pki(tmp_path, agents=["a2"], consoles=["c2"], days=7)
    assert later.agent_ca_cert.read_bytes() == agent_ca
    assert later.console_ca_cert.read_bytes() == console_ca
    assert first.agent_ca_cert not in later.written
    assert verify_issued_by(later.agents["a2"].cert.read_bytes(), agent_ca)
    assert verify_issued_by(later.consoles["c2"].cert.read_bytes(), console_ca)
    assert first.agents["a1"].cert.is_file()


def test_half_present_ca_is_an_error(tmp_path: Path) -> None:
    create_dev_pki(tmp_path, agents=[], consoles=[])
    (tmp_path / "console-ca.key").unlink()
    with pytest.raises(PkiError, match=r"console-ca\.key"):
        create_dev_pki(tmp_path, agents=[], consoles=["c1"])


def test_mismatched_ca_key_is_an_error(tmp_path: Path) -> None:
    create_dev_pki(tmp_path, agents=[], consoles=[])
    (tmp_path / "agent-ca.key").write_bytes((tmp_path / "console-ca.key").read_bytes())
    with pytest.raises(PkiError, match="does not match"):
        create_dev_pki(tmp_path, agents=["a1"], consoles=[])


@pytest.mark.parametrize("name", ["", "../evil", "a/b", "-x", "x" * 65, "has space"])
def test_bad_names_rejected(tmp_path: Path, name: str) -> None:
    with pytest.raises(PkiError, match="invalid agent name"):
        create_dev_pki(tmp_path, agents=[name], consoles=[])
    assert not any(tmp_path.iterdir())


def test_duplicate_name_rejected(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="twice"):
        create_dev_pki(tmp_path, agents=["a", "a"], consoles=[])


# --------------------------------------------------------------------------- credential helpers


def test_missing_files_named(tmp_path: Path, pki: PkiPaths) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(PkiError, match=r"not found: .*nope\.pem"):
        server_credentials(missing, pki.agents["gpu-01"].key, pki.console_ca_cert)
    with pytest.raises(PkiError, match=r"nope\.pem"):
        server_credentials(pki.agents["gpu-01"].cert, pki.agents["gpu-01"].key, missing)
    with pytest.raises(PkiError, match=r"nope\.pem"):
        channel_credentials(missing, pki.consoles["ops"].cert, pki.consoles["ops"].key)
    with pytest.raises(PkiError, match=r"is a directory"):
        channel_credentials(tmp_path, pki.consoles["ops"].cert, pki.consoles["ops"].key)


def test_key_cert_mismatch_named(pki: PkiPaths) -> None:
    with pytest.raises(PkiError, match=r"ops\.key does not match .*gpu-01\.pem"):
        server_credentials(pki.agents["gpu-01"].cert, pki.consoles["ops"].key, pki.console_ca_cert)


def test_not_pem_named(tmp_path: Path, pki: PkiPaths) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(PkiError, match=r"junk\.pem: not a PEM certificate"):
        channel_credentials(junk, pki.consoles["ops"].cert, pki.consoles["ops"].key)


# --------------------------------------------------------------------------- real mTLS handshakes


def _whoami(_request: bytes, context: grpc.ServicerContext) -> bytes:
    """Echo the client's certificate CN, as the server saw it after the handshake."""
    names = context.auth_context().get("x509_common_name", [b"?"])
    return names if isinstance(names, bytes) else next(iter(names))


@pytest.fixture(scope="module")
def server_port(pki: PkiPaths) -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(
        _whoami, request_deserializer=lambda b: b, response_serializer=lambda b: b
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("gpusoc.test.Echo", {"Call": handler}),)
    )
    agent = pki.agents["gpu-01"]
    port = server.add_secure_port(
        "127.0.0.1:0", server_credentials(agent.cert, agent.key, pki.console_ca_cert)
    )
    assert port > 0
    server.start()
    yield port
    server.stop(grace=None)


def _call(port: int, creds: grpc.ChannelCredentials, target_host: str = "127.0.0.1", **opts: str) -> bytes:
    options = [(f"grpc.{k}", v) for k, v in opts.items()]
    with grpc.secure_channel(f"{target_host}:{port}", creds, options=options) as channel:
        call = channel.unary_unary(METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        result: bytes = call(b"ping", timeout=10)
        return result


def test_mtls_with_console_cert_succeeds(pki: PkiPaths, server_port: int) -> None:
    creds = channel_credentials(pki.agent_ca_cert, pki.consoles["ops"].cert, pki.consoles["ops"].key)
    assert _call(server_port, creds) == b"ops"
    assert _call(server_port, creds, target_host="localhost") == b"ops"
    # A console dialing by host name while connected to an IP checks the cert's name, not the IP.
    assert _call(server_port, creds, ssl_target_name_override="gpu-01") == b"ops"


def test_mtls_wrong_server_name_fails(pki: PkiPaths, server_port: int) -> None:
    creds = channel_credentials(pki.agent_ca_cert, pki.consoles["ops"].cert, pki.consoles["ops"].key)
    with pytest.raises(grpc.RpcError) as err:
        _call(server_port, creds, ssl_target_name_override="gpu-99")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_without_client_cert_fails(pki: PkiPaths, server_port: int) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=pki.agent_ca_cert.read_bytes())
    with pytest.raises(grpc.RpcError) as err:
        _call(server_port, creds)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_client_cert_from_other_pki_fails(pki: PkiPaths, other_pki: PkiPaths, server_port: int) -> None:
    creds = channel_credentials(
        pki.agent_ca_cert, other_pki.consoles["ops"].cert, other_pki.consoles["ops"].key
    )
    with pytest.raises(grpc.RpcError) as err:
        _call(server_port, creds)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_agent_cert_cannot_act_as_console(pki: PkiPaths, server_port: int) -> None:
    """A cert named like a console but signed by the agent CA (or stolen from a GPU host) is refused."""
    impostor = create_dev_pki(pki.out_dir, agents=["ops"], consoles=[]).agents["ops"]
    assert cert_identity(impostor.cert.read_bytes()) == "ops"
    assert verify_issued_by(impostor.cert.read_bytes(), pki.agent_ca_cert.read_bytes())
    for leaf in (impostor, pki.agents["10.1.2.3"]):
        creds = channel_credentials(pki.agent_ca_cert, leaf.cert, leaf.key)
        with pytest.raises(grpc.RpcError) as err:
            _call(server_port, creds)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_console_rejects_agent_from_other_pki(
    pki: PkiPaths, other_pki: PkiPaths, server_port: int
) -> None:
    """The console only trusts its own agent CA, even when the server's name matches."""
    creds = channel_credentials(other_pki.agent_ca_cert, pki.consoles["ops"].cert, pki.consoles["ops"].key)
    with pytest.raises(grpc.RpcError) as err:
        _call(server_port, creds)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
