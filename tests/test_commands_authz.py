"""Signed control commands over real mTLS gRPC: the negative matrix, replay across restarts, receipts.

Every refusal must come back as a signed receipt naming the failed check and must be emitted
as a `command_refused` event that reaches the runtime's next frame.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.act.commands import Policy
from agent.act.controller import Controller, ControlSettings
from agent.buffer import FrameBuffer
from agent.collect.simulated import SimulatedCollector
from agent.pki import (
    PkiError,
    channel_credentials,
    create_dev_pki,
    create_operator,
    load_operator_cas,
    load_operator_key,
    server_credentials,
    verify_operator_certificate,
)
from agent.runtime import AgentRuntime
from agent.serve import run_server
from agent.training import RankRegistration
from protos import serde, signing
from protos.types import (
    PHASE_EXECUTE,
    CommandEnvelope,
    CommandRequest,
    CommandSignature,
    Event,
    Receipt,
    SignedReceipt,
)

HOST = "gpu-01"
JOB = "job-authz"

# --------------------------------------------------------------------------- PKI


@dataclass
class Pki:
    root: Path
    other: Path
    ops: dict[str, tuple[bytes, Ed25519PrivateKey]] = field(default_factory=dict)

    def signer(self, name: str) -> tuple[bytes, Ed25519PrivateKey]:
        return self.ops[name]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    create_dev_pki(root, agents=[HOST], consoles=["console"])
    out = Pki(root=root, other=tmp_path_factory.mktemp("other-pki"))
    for name, role in [("alice", "responder"), ("bob", "responder"), ("carol", "viewer"), ("dave", "admin"),
                       ("erin", "admin")]:
        p = create_operator(root, name, role)
        out.ops[name] = (p.cert.read_bytes(), load_operator_key(p.key))
    p = create_operator(out.other, "mallory", "admin")  # a different operator CA
    out.ops["mallory"] = (p.cert.read_bytes(), load_operator_key(p.key))
    # An agent certificate with an Ed25519 key it does not own: the cert is not an operator's.
    out.ops["agent-cert"] = ((root / "agents" / f"{HOST}.pem").read_bytes(), Ed25519PrivateKey.generate())
    out.ops["console-cert"] = ((root / "consoles" / "console.pem").read_bytes(), Ed25519PrivateKey.generate())
    return out


# --------------------------------------------------------------------------- a job to act on


@pytest.fixture(scope="module")
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(0.02)"])
    time.sleep(0.1)
    yield proc
    proc.kill()
    proc.wait()


def registrations(pid: int) -> dict[str, dict[int, RankRegistration]]:
    return {JOB: {0: RankRegistration(pid, os.getuid(), 1, 0, {"collective_timeout_s": "1800"}, time.time_ns())}}


# --------------------------------------------------------------------------- harness


@dataclass
class Harness:
    controller: Controller
    runtime: AgentRuntime
    channel: grpc.aio.Channel
    events: list[Event]
    clock: list[int]
    port: int

    async def send(self, req: CommandRequest) -> Receipt:
        raw = await self.channel.unary_unary(
            serde.COMMAND_METHOD, request_serializer=serde.encode_command_request,
            response_deserializer=serde.decode_signed_receipt)(req, timeout=20)
        assert isinstance(raw, SignedReceipt)
        return signing.verify_receipt(raw, self.controller.public_key)

    async def execute(self, env: CommandEnvelope) -> Receipt:
        return await self.send(CommandRequest(PHASE_EXECUTE, env))

    def refused(self) -> list[Event]:
        return [e for e in self.events if e.kind == "command_refused"]


def envelope(pki: Pki, action: str, signers: list[str], *, hosts: tuple[str, ...] = (HOST,), job: str = JOB,
             now_ns: int | None = None, ttl_s: float = 60, **kw: object) -> CommandEnvelope:
    payload = signing.make_payload(action, job, hosts, f"test {action}", ttl_s=ttl_s, now_ns=now_ns, **kw)  # type: ignore[arg-type]
    return signing.build_envelope(payload, [pki.signer(s) for s in signers])


def make_controller(state: Path, pki: Pki, jobs: Callable[[], dict], emit: Callable[[Event], None],
                    clock: list[int], require_mtls: bool = True) -> Controller:
    settings = ControlSettings(host=HOST, state_dir=state, operator_ca=pki.root / "operator-ca.pem",
                               policy=Policy(), require_mtls=require_mtls)
    return Controller(settings, jobs, emit, clock=lambda: clock[0] or time.time_ns())


@contextlib.asynccontextmanager
async def _harness(tmp_path: Path, pki: Pki, sleeper: subprocess.Popen[bytes], secure: bool = True,
                   ) -> AsyncIterator[Harness]:
    rt = AgentRuntime(HOST, SimulatedCollector(1, host=HOST), FrameBuffer(max_frames=100), 1.0)
    events: list[Event] = []

    def emit(e: Event) -> None:
        events.append(e)
        rt.add_event(e)

    clock = [0]
    ctl = make_controller(tmp_path / "state", pki, lambda: registrations(sleeper.pid), emit, clock)
    if secure:
        creds = server_credentials(pki.root / "agents" / f"{HOST}.pem", pki.root / "agents" / f"{HOST}.key",
                                   pki.root / "console-ca.pem")
        server, port = await run_server(rt, credentials=creds, control=ctl)
        ch_creds = channel_credentials(pki.root / "agent-ca.pem", pki.root / "consoles" / "console.pem",
                                       pki.root / "consoles" / "console.key")
        channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", ch_creds,
                                          options=[("grpc.ssl_target_name_override", HOST)])
    else:
        server, port = await run_server(rt, control=ctl)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Harness(ctl, rt, channel, events, clock, port)
    finally:
        await channel.close()
        await ctl.close()
        await server.stop(0)


@pytest.fixture
async def h(tmp_path: Path, pki: Pki, sleeper: subprocess.Popen[bytes]) -> AsyncIterator[Harness]:
    async with _harness(tmp_path, pki, sleeper) as x:
        yield x


def assert_refused(h: Harness, r: Receipt, check: str, fragment: str = "") -> None:
    assert r.status == "refused", r
    assert r.check == check, (r.check, r.reason)
    assert fragment.lower() in r.reason.lower(), r.reason
    ev = h.refused()[-1]
    assert ev.attrs["check"] == check and ev.attrs["reason"] == r.reason
    assert ev.attrs["command_id"] == r.command_id and "action" in ev.attrs and "signers" in ev.attrs


# --------------------------------------------------------------------------- the negative matrix


async def test_no_client_certificate_plaintext_is_refused(tmp_path: Path, pki: Pki,
                                                          sleeper: subprocess.Popen[bytes]) -> None:
    async with _harness(tmp_path, pki, sleeper, secure=False) as h:
        r = await h.execute(envelope(pki, "freeze", ["alice"]))
        assert_refused(h, r, "peer", "mTLS")
        assert r.action == "freeze"  # labelled from the (unverified) payload for the audit trail
        assert h.refused()[-1].attrs["verified"] == "false"


async def test_no_client_certificate_tls_handshake_fails(h: Harness, pki: Pki) -> None:
    """The mTLS server never lets a certificate-less client reach the handler (no event possible)."""
    port = h.port
    creds = grpc.ssl_channel_credentials(root_certificates=(pki.root / "agent-ca.pem").read_bytes())
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds,
                                       options=[("grpc.ssl_target_name_override", HOST)]) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary(serde.COMMAND_METHOD)(
                serde.encode_command_request(CommandRequest(PHASE_EXECUTE, envelope(pki, "freeze", ["alice"]))),
                timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert h.refused() == []


async def test_signature_without_certificate(h: Harness, pki: Pki) -> None:
    env = envelope(pki, "freeze", ["alice"])
    env = replace(env, signatures=(CommandSignature(b"", env.signatures[0].signature),))
    assert_refused(h, await h.execute(env), "certificate", "no operator certificate")


async def test_unsigned_envelope(h: Harness, pki: Pki) -> None:
    env = replace(envelope(pki, "freeze", ["alice"]), signatures=())
    assert_refused(h, await h.execute(env), "envelope", "no signature")


async def test_operator_from_another_ca(h: Harness, pki: Pki) -> None:
    assert_refused(h, await h.execute(envelope(pki, "freeze", ["mallory"])), "certificate", "operator CA")


@pytest.mark.parametrize("who", ["agent-cert", "console-cert"])
async def test_agent_or_console_certificate_as_operator(h: Harness, pki: Pki, who: str) -> None:
    assert_refused(h, await h.execute(envelope(pki, "freeze", [who])), "certificate", "operator CA")


async def test_viewer_cannot_freeze(h: Harness, pki: Pki) -> None:
    r = await h.execute(envelope(pki, "freeze", ["carol"]))
    assert_refused(h, r, "role", "viewer")
    assert r.signers == ("carol:viewer",)


async def test_expired_command(h: Harness, pki: Pki) -> None:
    old = time.time_ns() - 300 * 10**9
    assert_refused(h, await h.execute(envelope(pki, "freeze", ["alice"], now_ns=old)), "time", "expired")


async def test_command_from_the_future(h: Harness, pki: Pki) -> None:
    later = time.time_ns() + 60 * 10**9
    assert_refused(h, await h.execute(envelope(pki, "freeze", ["alice"], now_ns=later)), "time", "future")


async def test_expired_operator_certificate(h: Harness, pki: Pki) -> None:
    h.clock[0] = time.time_ns() + 3 * 86400 * 10**9  # operator certs live one day
    env = envelope(pki, "freeze", ["alice"], now_ns=h.clock[0])
    assert_refused(h, await h.execute(env), "certificate", "not valid now")


async def test_replayed_command_also_after_restart(h: Harness, pki: Pki, tmp_path: Path) -> None:
    env = envelope(pki, "freeze", ["alice"], job="not-on-this-host")
    first = await h.execute(env)
    assert_refused(h, first, "job", "not registered")  # authorised, id consumed, then nothing to freeze
    assert_refused(h, await h.execute(env), "replay", "already used")
    # A new agent process on the same state dir still remembers the id.
    events: list[Event] = []
    again = make_controller(tmp_path / "state", pki, dict, events.append, [0])
    receipt = await again.handle(CommandRequest(PHASE_EXECUTE, env), _peer())
    body = signing.verify_receipt(receipt, again.public_key)
    assert body.status == "refused" and body.check == "replay"
    assert events[-1].kind == "command_refused" and events[-1].attrs["check"] == "replay"


def _peer():  # type: ignore[no-untyped-def]
    from agent.act.commands import Peer

    return Peer(authenticated=True, name="console")


async def test_wrong_host(h: Harness, pki: Pki) -> None:
    r = await h.execute(envelope(pki, "freeze", ["alice"], hosts=("gpu-02", "gpu-03")))
    assert_refused(h, r, "host", "not among")


async def test_same_operator_signing_twice(h: Harness, pki: Pki) -> None:
    h.controller.frozen.records.clear()
    r = await h.execute(envelope(pki, "resume", ["alice", "alice"]))
    assert_refused(h, r, "signers", "more than once")


async def test_tampered_payload(h: Harness, pki: Pki) -> None:
    env = envelope(pki, "freeze", ["alice"])
    tampered = env.payload.replace(HOST.encode(), b"gpu-99")
    assert tampered != env.payload
    assert_refused(h, await h.execute(replace(env, payload=tampered)), "signature", "does not verify")
    # A signature moved onto a different valid payload fails the same way.
    other = envelope(pki, "freeze", ["alice"])
    r = await h.execute(replace(other, signatures=env.signatures))
    assert_refused(h, r, "signature")


async def test_non_canonical_payload(h: Harness, pki: Pki) -> None:
    payload = signing.make_payload("freeze", JOB, [HOST], "x")
    data = signing.payload_bytes(payload).replace(b",", b", ", 1)
    cert, key = pki.signer("alice")
    env = signing.build_envelope(data, [(cert, key)])
    assert_refused(h, await h.execute(env), "payload", "canonical")


async def test_resume_needs_two_operators(h: Harness, pki: Pki) -> None:
    assert_refused(h, await h.execute(envelope(pki, "resume", ["alice"])), "signers", "needs 2")


async def test_break_glass_needs_admins(h: Harness, pki: Pki) -> None:
    env = envelope(pki, "rollback", ["alice", "bob"], checkpoint_digest="sha256:" + "0" * 64, break_glass=True)
    assert_refused(h, await h.execute(env), "role", "break-glass")


async def test_revoked_operator(h: Harness, pki: Pki, tmp_path: Path) -> None:
    cert, _ = pki.signer("bob")
    ident = verify_operator_certificate(cert, load_operator_cas(pki.root / "operator-ca.pem"))
    (tmp_path / "state" / "revoked-operators.txt").write_text(f"# bob left\n{ident.cert_sha256}\n")
    assert_refused(h, await h.execute(envelope(pki, "freeze", ["bob"])), "certificate", "revoked")


async def test_every_refusal_reaches_the_next_frame(h: Harness, pki: Pki) -> None:
    await h.execute(envelope(pki, "freeze", ["carol"]))
    frame = await h.runtime.tick()
    kinds = [(e.kind, e.attrs.get("check")) for e in frame.events]
    assert ("command_refused", "role") in kinds


# --------------------------------------------------------------------------- acceptance


async def test_freeze_then_two_person_resume(h: Harness, pki: Pki, sleeper: subprocess.Popen[bytes]) -> None:
    r = await h.execute(envelope(pki, "freeze", ["alice"]))
    assert r.status == "executed", r
    assert r.method == "sigstop" and sleeper.pid in r.pids
    assert r.collective_timeout_s == 1800 and r.frozen_since_ns == r.executed_at_ns > 0
    assert r.signers == ("alice:responder",) and r.peer == "console"
    assert _state(sleeper.pid) == "T"
    executed = [e for e in h.events if e.kind == "command_executed"]
    assert executed and executed[-1].attrs["command_id"] == r.command_id
    assert executed[-1].attrs["signers"] == "alice:responder" and executed[-1].attrs["reason"] == "test freeze"
    state = serde.decode_control_state(await h.channel.unary_unary(serde.CONTROL_STATE_METHOD)(
        serde.encode_control_state_request(), timeout=5))
    assert state.agent_public_key == h.controller.public_key
    assert [f.job for f in state.frozen] == [JOB] and state.frozen[0].collective_timeout_s == 1800
    r2 = await h.execute(envelope(pki, "resume", ["alice", "dave"]))
    assert r2.status == "executed", r2
    assert r2.frozen_since_ns == r.executed_at_ns
    assert _state(sleeper.pid) in ("S", "R")


async def test_describe_reports_command_key(h: Harness) -> None:
    desc = serde.decode_description(await h.channel.unary_unary(serde.DESCRIBE_METHOD)(
        serde.encode_describe_request(), timeout=5))
    assert f"command_key:{h.controller.key_id}" in desc.capabilities and "commands" in desc.capabilities


async def test_result_of_unknown_command_is_not_found(h: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await h.send(CommandRequest(3, command_id="0" * 32))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_commands_disabled_without_controller(tmp_path: Path) -> None:
    rt = AgentRuntime(HOST, SimulatedCollector(1, host=HOST), FrameBuffer(max_frames=10), 1.0)
    server, port = await run_server(rt)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ch.unary_unary(serde.COMMAND_METHOD)(b"", timeout=5)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        frame = await rt.tick()
        assert any(e.kind == "command_refused" for e in frame.events)
    finally:
        await server.stop(0)


def _state(pid: int) -> str:
    data = Path(f"/proc/{pid}/stat").read_bytes()
    return data[data.rfind(b")") + 2:][:1].decode()


# --------------------------------------------------------------------------- signing helpers, receipts, PKI


def test_canonical_json_rules() -> None:
    assert signing.canonical_json({"b": 1, "a": [True, "é"]}) == '{"a":[true,"é"],"b":1}'.encode()
    for bad in (b'{"a":1, "b":2}', b'{"a":1,"a":2}', b'{"a":1.5}', b'{"a":NaN}', b"\xff"):
        with pytest.raises(signing.SigningError):
            signing.parse_canonical(bad)
    with pytest.raises(signing.SigningError):
        signing.canonical_json({"a": 0.5})


def test_payload_round_trip_and_limits() -> None:
    p = signing.make_payload("rollback", "j", ["h1", "h2"], "why", checkpoint_digest="sha256:" + "a" * 64)
    assert signing.parse_payload(signing.payload_bytes(p)) == p
    with pytest.raises(signing.SigningError, match="lifetime"):
        signing.make_payload("freeze", "j", ["h"], "x", ttl_s=121)
    with pytest.raises(signing.SigningError, match="checkpoint_digest"):
        signing.make_payload("rollback", "j", ["h"], "x")
    with pytest.raises(signing.SigningError, match="twice"):
        signing.make_payload("freeze", "j", ["h", "h"], "x")


def test_receipt_signature_and_pinning() -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    signed = signing.sign_receipt(Receipt("c" * 32, "h", "execute", "executed", pids=(1, 2),
                                          agent_key_id=signing.key_id(key)), key)
    body = signing.verify_receipt(signed, signing.public_key_raw(key))
    assert body.pids == (1, 2) and body.status == "executed"
    with pytest.raises(signing.SigningError, match="pinned"):
        signing.verify_receipt(signed, signing.public_key_raw(other))
    with pytest.raises(signing.SigningError, match="signature"):
        signing.verify_receipt(replace(signed, receipt=signed.receipt.replace(b"executed", b"refused")))


def test_command_request_serde_round_trip() -> None:
    env = CommandEnvelope(b"{}", (CommandSignature(b"cert", b"sig"),))
    req = CommandRequest(2, env, commit_at_unix_ns=123, command_id="x", wait_s=1.5)
    assert serde.decode_command_request(serde.encode_command_request(req)) == req
    with pytest.raises(Exception, match="signatures"):
        serde.decode_command_request(serde.encode_command_request(
            replace(req, envelope=CommandEnvelope(b"{}", tuple([CommandSignature(b"c", b"s")] * 9)))))


def test_operator_certificates(pki: Pki) -> None:
    cas = load_operator_cas(pki.root / "operator-ca.pem")
    for name, role in [("alice", "responder"), ("carol", "viewer"), ("dave", "admin")]:
        ident = verify_operator_certificate(pki.signer(name)[0], cas)
        assert (ident.name, ident.role) == (name, role)
        assert isinstance(ident.public_key, Ed25519PublicKey)
        assert ident.not_after - dt.datetime.now(dt.UTC) <= dt.timedelta(days=1)
    key = pki.root / "operators" / "alice.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(pki.signer("alice")[0])
    assert cert.issuer != x509.load_pem_x509_certificate((pki.root / "console-ca.pem").read_bytes()).subject
    ca_keys = {
        x509.load_pem_x509_certificate((pki.root / f"{n}-ca.pem").read_bytes()).public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        for n in ("agent", "console", "operator")
    }
    assert len(ca_keys) == 3
    with pytest.raises(PkiError, match="role"):
        create_operator(pki.root, "zed", "root")
    with pytest.raises(PkiError, match="overwrite"):
        create_operator(pki.root, "alice", "admin")
    with pytest.raises(PkiError, match="operator CA"):
        verify_operator_certificate(pki.signer("mallory")[0], cas)


def test_cli_pki_operator(tmp_path: Path) -> None:
    from agent.cli import main

    assert main(["pki", "operator", "--out", str(tmp_path), "--name", "ops@site", "--role", "admin"]) == 0
    ident = verify_operator_certificate((tmp_path / "operators" / "ops@site.pem").read_bytes(),
                                        load_operator_cas(tmp_path / "operator-ca.pem"))
    assert ident.role == "admin"
    assert main(["pki", "operator", "--out", str(tmp_path), "--name", "x/y", "--role", "admin"]) == 2


def test_controller_from_config(tmp_path: Path, pki: Pki) -> None:
    from agent.act.controller import controller_from_config
    from agent.config import AgentConfig

    cfg = AgentConfig(host=HOST, state_dir=str(tmp_path / "state"), operator_ca=str(pki.root / "operator-ca.pem"),
                      resume_signers=3, trusted_checkpoint_keys=f"{pki.root / 'operators' / 'alice.pem'}, ")
    ctl = controller_from_config(cfg, dict, lambda e: None)
    assert ctl is not None
    assert ctl.settings.policy.min_signers == {"freeze": 1, "resume": 3, "rollback": 2}
    assert ctl.settings.trusted_checkpoint_keys == (pki.root / "operators" / "alice.pem",)
    assert ctl.settings.require_mtls
    missing = AgentConfig(operator_ca=str(tmp_path / "absent.pem"), state_dir=str(tmp_path / "s2"))
    assert controller_from_config(missing, dict, lambda e: None) is None
