"""Console side of Response against real agents over mTLS: two-phase freeze, approvals, alarms, audit, CLI, panel.

Agents (runtime + Controller + gRPC server with mTLS) run on one asyncio loop in a background
thread, so the console's blocking dispatcher, its CLI and the Qt panel talk to them exactly as
in production. The job is two real child processes, one rank per agent host, registered to the
controllers the way the SDK receiver would; freezes use SIGSTOP (they share the test's cgroup).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.act.checkpoints import sign_checkpoint_with_key
from agent.act.controller import Controller, ControlSettings
from agent.buffer import FrameBuffer
from agent.collect.simulated import SimulatedCollector
from agent.pki import create_dev_pki, create_operator
from agent.runtime import AgentRuntime
from agent.serve import start_server
from agent.training import RankRegistration
from console.ingest.tls import ConsoleTls
from console.models.respond import ALERT_KIND_ADVANCED, GREEN, RED, ResponseModel, rows_by_host
from console.respond.approvals import (
    ApprovalError,
    ApprovalStore,
    PendingRequest,
    approve,
    create_request,
    read_request_file,
    write_request_file,
)
from console.respond.audit import AuditChain, connection_runner, public_key_pem
from console.respond.cli_command import add_command_parser, run_command
from console.respond.commands import (
    ABORTED,
    BAD_RECEIPT,
    CONFIRMED,
    NO_ANSWER,
    NOT_SENT,
    REFUSED,
    CommandDispatcher,
    CommandError,
    Operator,
    ReceiptKeyPins,
    build_command,
    cosign,
    job_hosts,
    sign,
)
from console.respond.verify import load_audit_file, verify_audit_file, verify_rows
from protos import signing
from protos.types import PHASE_PREPARE, PHASE_RESULT, Frame, SignedReceipt, TrainRecord
from tests.helpers import make_frame

HOSTS = ("gpu-a", "gpu-b")
JOB = "job-resp"
T = TypeVar("T")


# --------------------------------------------------------------------------- PKI


@dataclass
class Pki:
    root: Path
    ops: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    def op(self, name: str) -> Operator:
        cert, key = self.ops[name]
        return Operator.load(cert, key)

    @property
    def tls(self) -> ConsoleTls:
        r = self.root
        return ConsoleTls(str(r / "agent-ca.pem"), str(r / "consoles" / "console.pem"),
                          str(r / "consoles" / "console.key"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    create_dev_pki(root, agents=[*HOSTS, "gpu-solo"], consoles=["console"])
    out = Pki(root)
    for name, role in [("alice", "responder"), ("bob", "responder"), ("carol", "viewer")]:
        p = create_operator(root, name, role)
        out.ops[name] = (p.cert, p.key)
    return out


# --------------------------------------------------------------------------- the job and the agents


def _stopped(pid: int) -> bool:
    data = Path(f"/proc/{pid}/stat").read_bytes()
    return data[data.rfind(b")") + 2:][:1] == b"T"


@pytest.fixture
def job_procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(0.02)"]) for _ in HOSTS]
    time.sleep(0.2)
    yield procs
    for p in procs:
        with contextlib.suppress(OSError):
            p.kill()
        p.wait()


def _free_port() -> int:
    import socket

    for _ in range(200):
        port = random.randint(40000, 45000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 40000-45000")


class Fleet:
    """Agents on one event loop in a background thread; `addresses` maps host -> 127.0.0.1:port."""

    def __init__(self, pki: Pki, state: Path, jobs: dict[str, dict[str, dict[int, RankRegistration]]],
                 checkpoint_roots: dict[str, Path] | None = None, trusted: tuple[Path, ...] = ()) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-agents", daemon=True)
        self.thread.start()
        self.controllers: dict[str, Controller] = {}
        self.servers: list[Any] = []
        self.addresses: dict[str, str] = {}
        for host, regs in jobs.items():
            settings = ControlSettings(host=host, state_dir=state / host, operator_ca=pki.root / "operator-ca.pem",
                                       checkpoint_root=(checkpoint_roots or {}).get(host),
                                       trusted_checkpoint_keys=trusted)
            ctl = Controller(settings, lambda regs=regs: regs, lambda e: None)
            self.controllers[host] = ctl
            self.addresses[host] = self.run(self._serve(pki, host, ctl))

    async def _serve(self, pki: Pki, host: str, ctl: Controller) -> str:
        from agent.pki import server_credentials

        rt = AgentRuntime(host, SimulatedCollector(1, host=host), FrameBuffer(max_frames=100), 1.0)
        creds = server_credentials(pki.root / "agents" / f"{host}.pem", pki.root / "agents" / f"{host}.key",
                                   pki.root / "console-ca.pem")
        for _ in range(20):
            try:
                server, port = await start_server(rt, f"127.0.0.1:{_free_port()}", creds, ctl)
            except (OSError, RuntimeError):
                continue
            self.servers.append(server)
            return f"127.0.0.1:{port}"
        raise RuntimeError("could not bind an agent port")

    def run(self, coro: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)  # type: ignore[arg-type]

    def hang(self, host: str, phases: set[int], seconds: float = 30.0) -> None:
        """Make `host` sit on requests of `phases` (a host that does not answer)."""
        ctl = self.controllers[host]
        orig = ctl.handle

        async def slow(req: Any, peer: Any) -> SignedReceipt:
            if req.phase in phases:
                await asyncio.sleep(seconds)
            return await orig(req, peer)

        ctl.handle = slow  # type: ignore[method-assign]

    def stop(self) -> None:
        async def down() -> None:
            for s in self.servers:
                await s.stop(0)
            for c in self.controllers.values():
                await c.close()

        with contextlib.suppress(Exception):
            self.run(down())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _regs(procs: list[subprocess.Popen[bytes]], hosts: tuple[str, ...] = HOSTS,
          info: dict[str, str] | None = None) -> dict[str, dict[str, dict[int, RankRegistration]]]:
    now = time.time_ns()
    return {h: {JOB: {rank: RankRegistration(procs[rank].pid, os.getuid(), len(hosts), 0, dict(info or {}), now)}}
            for rank, h in enumerate(hosts)}


@pytest.fixture
def fleet(pki: Pki, tmp_path: Path, job_procs: list[subprocess.Popen[bytes]]) -> Iterator[Fleet]:
    f = Fleet(pki, tmp_path / "agents", _regs(job_procs, info={"collective_timeout_s": "900"}))
    yield f
    f.stop()


@dataclass
class Audit:
    con: duckdb.DuckDBPyConnection
    chain: AuditChain
    key: Ed25519PrivateKey
    path: Path

    def rows(self) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self.con.execute(
            "SELECT seq, epoch_us(ts) * 1000, actor, action, target, payload, prev_hash, hash FROM audit_log "
            "ORDER BY seq").fetchall()]

    def heads(self) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self.con.execute(
            "SELECT seq, hash, epoch_us(signed_at) * 1000, key_id, signature FROM audit_heads ORDER BY seq").fetchall()]

    def actions(self) -> list[str]:
        return [r[3] for r in self.rows()]


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[Audit]:
    path = tmp_path / "audit.duckdb"
    con = duckdb.connect(str(path))
    key = Ed25519PrivateKey.generate()
    chain = AuditChain(connection_runner(con), signing_key=key)
    yield Audit(con, chain, key, path)
    con.close()


def _dispatcher(fleet: Fleet, pki: Pki, tmp_path: Path, audit: Audit | None = None, **kw: Any) -> CommandDispatcher:
    kw.setdefault("min_commit_delay_s", 0.5)  # a loaded 2-core CI box: PREPAREs must land in time
    return CommandDispatcher(fleet.addresses.__getitem__, pki.tls, audit.chain if audit else None,
                             pins=ReceiptKeyPins(tmp_path / "pins.json"), actor="console-test", **kw)


# --------------------------------------------------------------------------- dispatch against real agents


def test_two_host_freeze_then_resume_two_phase(fleet: Fleet, pki: Pki, tmp_path: Path, audit: Audit,
                                               job_procs: list[subprocess.Popen[bytes]]) -> None:
    alice, bob = pki.op("alice"), pki.op("bob")
    updates: list[tuple[str, str]] = []
    with _dispatcher(fleet, pki, tmp_path, audit) as d:
        env = sign(build_command("freeze", JOB, HOSTS, "suspicious loss spike"), alice)
        res = d.dispatch(env, on_update=lambda hr: updates.append((hr.host, hr.state)))
        assert res.two_phase and res.all_confirmed, res.render()
        assert res.exit_code == 0 and not res.alarms and not res.partial
        assert res.skew_ns is not None and 0 <= res.skew_ns < 200_000_000, res.skew_ns
        for hr in res.hosts.values():
            assert hr.final is not None and hr.final.status == "executed" and hr.method == "sigstop"
            assert hr.executed_at_ns >= res.commit_at_ns - 10_000_000  # the timer fires 5 ms early, spins to it
            assert hr.collective_timeout_s == 900 and hr.frozen_since_ns > 0
        assert all(_stopped(p.pid) for p in job_procs)
        assert ("gpu-a", "prepared") in updates and ("gpu-b", "confirmed") in updates
        print(res.render())
        # A console that did not send the freeze (or restarted) learns it from ControlState.
        other = ResponseModel(d, hosts_of=lambda job: list(HOSTS))
        other.apply_frozen(other.fetch_frozen(JOB))
        st = other.frozen_status(JOB)
        assert st is not None and st.hosts == list(HOSTS) and st.collective_timeout_s == 900
        assert 890 < st.seconds_left <= 900 and st.frozen_since_ns == min(h.frozen_since_ns for h in res.hosts.values())

        # Resume needs two operators: one signer is refused clearly by both agents (nothing resumes).
        single = sign(build_command("resume", JOB, HOSTS, "false alarm"), alice)
        res1 = d.dispatch(single)
        assert {h.state for h in res1.hosts.values()} == {REFUSED}, res1.render()
        assert all(h.check == "signers" and "2 distinct" in h.reason for h in res1.hosts.values())
        assert res1.exit_code == 1 and all(_stopped(p.pid) for p in job_procs)
        # ... and the console refuses the same operator twice before anything is sent.
        with pytest.raises(CommandError, match="already signed"):
            cosign(single, alice)
        with pytest.raises(CommandError, match="role 'viewer'"):
            cosign(single, pki.op("carol"))

        both = cosign(sign(build_command("resume", JOB, HOSTS, "false alarm"), alice), bob)
        res2 = d.dispatch(both)
        assert res2.all_confirmed, res2.render()
        assert res2.signers == ["alice:responder", "bob:responder"]
        assert res2.skew_ns is not None and res2.skew_ns < 200_000_000
        assert not any(_stopped(p.pid) for p in job_procs)

    # Every step is in the audit trail, the chain verifies, receipts verify offline with the pinned keys.
    actions = audit.actions()
    for a in ("command.key_pinned", "command.issued", "command.prepare", "command.receipt", "command.outcome"):
        assert a in actions, actions
    assert actions.count("command.issued") == 3 and actions.count("command.outcome") == 3
    assert actions.count("command.key_pinned") == 2  # once per host, not per command
    audit.chain.sign_head()
    report = verify_rows(audit.rows(), audit.heads(), [audit.key.public_key()])
    assert report.ok, report.render()
    pins = ReceiptKeyPins(tmp_path / "pins.json").all()
    assert set(pins) == set(HOSTS)
    receipts = [json.loads(r[5]) for r in audit.rows() if r[3] == "command.receipt"]
    assert {r["host"] for r in receipts} == set(HOSTS)
    for body in receipts:
        signed = SignedReceipt(base64.b64decode(body["receipt_b64"]), base64.b64decode(body["signature_b64"]),
                               bytes.fromhex(body["agent_public_key"]))
        assert signing.verify_receipt(signed, pins[body["host"]].public_key).host == body["host"]
    issued = [json.loads(r[5]) for r in audit.rows() if r[3] == "command.issued"]
    last = issued[-1]
    assert [s["signer"] for s in last["signers"]] == ["alice:responder", "bob:responder"]
    assert signing.parse_payload(base64.b64decode(last["payload_b64"])).action == "resume"
    # The exported file verifies with the public key only.
    pub = tmp_path / "audit.pub.pem"
    pub.write_bytes(public_key_pem(audit.key))
    audit.con.execute("CHECKPOINT")
    copy = tmp_path / "audit-copy.duckdb"
    audit.con.execute(f"ATTACH '{copy}' AS cp")
    audit.con.execute("CREATE TABLE cp.audit_log AS SELECT * FROM audit_log")
    audit.con.execute("CREATE TABLE cp.audit_heads AS SELECT * FROM audit_heads")
    audit.con.execute("DETACH cp")
    file_report = verify_audit_file(copy, [pub])
    assert file_report.ok and file_report.rows == len(actions) + 0, file_report.render()
    assert load_audit_file(copy)[0][0][3] in ("command.key_pinned", "command.issued")


def test_host_that_does_not_confirm_raises_an_alarm(fleet: Fleet, pki: Pki, tmp_path: Path, audit: Audit) -> None:
    fleet.hang("gpu-b", {PHASE_RESULT})  # prepares (and executes), but never answers RESULT
    with _dispatcher(fleet, pki, tmp_path, audit, confirm_timeout_s=2.0, result_wait_s=1.0, rpc_timeout_s=2.0) as d:
        res = d.dispatch(sign(build_command("freeze", JOB, HOSTS, "test"), pki.op("alice")))
    assert res.hosts["gpu-a"].state == CONFIRMED, res.render()
    b = res.hosts["gpu-b"]
    assert b.state == NO_ANSWER and b.alarm and "did not confirm" in b.reason, res.render()
    assert res.alarms == ["gpu-b"] and res.partial and res.exit_code == 1
    assert "ALARM" in res.summary() and "PARTIAL" in res.summary()
    no_answer = [json.loads(r[5]) for r in audit.rows() if r[3] == "command.no_answer"]
    assert no_answer and no_answer[-1]["host"] == "gpu-b"


def test_silent_host_at_prepare_aborts_the_others(fleet: Fleet, pki: Pki, tmp_path: Path, audit: Audit,
                                                   job_procs: list[subprocess.Popen[bytes]]) -> None:
    fleet.hang("gpu-b", {PHASE_PREPARE}, seconds=20)
    with _dispatcher(fleet, pki, tmp_path, audit, rpc_timeout_s=1.0, min_commit_delay_s=1.0) as d:
        res = d.dispatch(sign(build_command("freeze", JOB, HOSTS, "test"), pki.op("alice")))
    assert res.hosts["gpu-a"].state == ABORTED, res.render()
    assert res.hosts["gpu-b"].state == NO_ANSWER and res.hosts["gpu-b"].alarm
    assert not res.partial and res.exit_code == 1
    time.sleep(0.3)
    assert not _stopped(job_procs[0].pid)  # the abort reached gpu-a before commit_at
    assert "command.abort" in audit.actions()


def test_changed_receipt_key_is_refused_before_sending(fleet: Fleet, pki: Pki, tmp_path: Path,
                                                      job_procs: list[subprocess.Popen[bytes]]) -> None:
    pins = ReceiptKeyPins(tmp_path / "pins.json")
    other = signing.public_key_raw(Ed25519PrivateKey.generate())
    pins.pin("gpu-b", other, fleet.addresses["gpu-b"])
    d = CommandDispatcher(fleet.addresses.__getitem__, pki.tls, None, pins=ReceiptKeyPins(tmp_path / "pins.json"))
    with d:
        res = d.dispatch(sign(build_command("freeze", JOB, HOSTS, "test"), pki.op("alice")))
    assert res.hosts["gpu-b"].state == BAD_RECEIPT and "changed" in res.hosts["gpu-b"].reason
    assert res.hosts["gpu-a"].state == NOT_SENT
    assert not any(_stopped(p.pid) for p in job_procs)


def test_single_host_job_uses_execute(pki: Pki, tmp_path: Path, job_procs: list[subprocess.Popen[bytes]]) -> None:
    f = Fleet(pki, tmp_path / "agents", _regs(job_procs[:1], hosts=("gpu-solo",)))
    try:
        with _dispatcher(f, pki, tmp_path) as d:
            res = d.dispatch(sign(build_command("freeze", JOB, ["gpu-solo"], "test"), pki.op("bob")))
            assert not res.two_phase and res.all_confirmed and res.skew_ns is None, res.render()
            assert _stopped(job_procs[0].pid)
            res2 = d.dispatch(cosign(sign(build_command("resume", JOB, ["gpu-solo"], "ok"), pki.op("bob")),
                                     pki.op("alice")))
            assert res2.all_confirmed, res2.render()
    finally:
        f.stop()


def test_operator_checks_fail_early(pki: Pki, tmp_path: Path) -> None:
    carol = pki.op("carol")
    assert carol.role == "viewer" and carol.label == "carol:viewer"
    with pytest.raises(CommandError, match="viewer"):
        sign(build_command("freeze", JOB, HOSTS, "x"), carol)
    with pytest.raises(CommandError, match="does not belong"):
        Operator.load(pki.ops["alice"][0], pki.ops["bob"][1])
    with pytest.raises(CommandError, match=r"not found|No such file"):
        Operator.load(tmp_path / "nope.pem", pki.ops["bob"][1])
    with pytest.raises(CommandError, match="break-glass"):
        sign(build_command("rollback", JOB, HOSTS, "x", "sha256:" + "0" * 64, break_glass=True), pki.op("alice"))
    old = build_command("freeze", JOB, HOSTS, "x", ttl_s=1, now_ns=time.time_ns() - 5_000_000_000)
    with pytest.raises(CommandError, match="expired"):
        sign(old, pki.op("alice"))
    with pytest.raises(CommandError, match="unknown action"):
        build_command("reboot", JOB, HOSTS, "x")
    assert Operator.load(*pki.ops["alice"], operator_ca=pki.root / "operator-ca.pem").name == "alice"
    with pytest.raises(CommandError, match="operator CA"):
        Operator.load(*pki.ops["alice"], operator_ca=pki.root / "agent-ca.pem")


# --------------------------------------------------------------------------- two-person approval


def test_approval_flow_table_and_file(pki: Pki, tmp_path: Path, audit: Audit) -> None:
    alice, bob = pki.op("alice"), pki.op("bob")
    payload = build_command("resume", JOB, HOSTS, "after review")
    req = create_request(alice, payload, agents={"gpu-a": "127.0.0.1:40001"}, audit=audit.chain)
    assert req.required_signers == 2 and req.missing == 1 and req.requested_by == "alice:responder"
    assert 100 < req.seconds_left() <= 120 and req.countdown().startswith(("1:", "2:"))
    store = ApprovalStore(connection_runner(audit.con))
    store.add(req)
    with pytest.raises(ApprovalError, match="already stored"):
        store.add(req)
    listed = store.list_requests()
    assert [r.command_id for r in listed] == [req.command_id] and listed[0].agents == {"gpu-a": "127.0.0.1:40001"}
    with pytest.raises(ApprovalError, match="already signed"):
        approve(listed[0], alice, audit=audit.chain)
    env = approve(listed[0], bob, audit=audit.chain)
    assert [s.certificate_pem for s in env.signatures][1] == bob.cert_pem
    store.set_state(req.command_id, "dispatched", bob.label, "ok", signatures=env.signatures)
    assert store.list_requests() == [] and store.get(req.command_id).state == "dispatched"  # type: ignore[union-attr]
    assert {"command.requested", "command.cosign_refused", "command.cosigned"} <= set(audit.actions())

    # Files: round trip, tampering detected, expiry refused.
    path = write_request_file(req, tmp_path / "req.json")
    back = read_request_file(path)
    assert back.payload == req.payload and back.signatures == req.signatures
    assert "RESUME job" in back.render()
    doc = json.loads(path.read_text())
    doc["payload_b64"] = base64.b64encode(req.payload.replace(b"after review", b"after reviex")).decode()
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(CommandError, match="does not verify"):
        approve(read_request_file(tmp_path / "bad.json"), bob)
    old = create_request(alice, build_command("resume", JOB, HOSTS, "x", ttl_s=1,
                                              now_ns=time.time_ns() - 500_000_000), now_ns=time.time_ns() - 400_000_000)
    time.sleep(0.6)
    with pytest.raises(ApprovalError, match="expired"):
        approve(old, bob)
    assert old.countdown() == "expired"
    store.add(old)
    assert store.get(old.command_id).state == "pending"  # type: ignore[union-attr]
    store.list_requests()
    assert store.get(old.command_id).state == "expired"  # type: ignore[union-attr]
    audit.chain.sign_head()
    report = verify_rows(audit.rows(), audit.heads(), [audit.key.public_key()])
    assert report.ok, report.render()


# --------------------------------------------------------------------------- store helpers and the advance rule


def _frame(host: str, job: str, step: int, ts_ns: int, rank: int = 0) -> Frame:
    f = make_frame(host=host, seq=step, ts=ts_ns)
    f.train = [TrainRecord(ts_ns, job, rank, 0, 2, 4242, 0, step, loss=1.0)]
    f.events = []
    return f


def test_job_hosts_from_the_store() -> None:
    con = duckdb.connect()
    from console.store.schema import ensure_schema

    ensure_schema(con)
    now = time.time_ns()
    rows = [("gpu-a", JOB, now), ("gpu-b", JOB, now - 10**9), ("gpu-old", JOB, now - 7200 * 10**9),
            ("gpu-c", "other", now)]
    for host, job, ts in rows:
        con.execute("INSERT INTO train_samples (host, epoch, seq, ts, job_id, simulated) VALUES (?, 'e', 1, "
                    "make_timestamp(?::BIGINT // 1000), ?, false)", [host, ts, job])

    def query(sql: str, params: list[object]) -> list[tuple[Any, ...]]:
        return con.execute(sql, params).fetchall()

    assert job_hosts(query, JOB) == ["gpu-a", "gpu-b"]
    assert job_hosts(query, JOB, window_s=3 * 3600) == ["gpu-a", "gpu-b", "gpu-old"]
    assert job_hosts(query, "nope") == []


def test_telemetry_advanced_while_frozen_raises_one_alert(pki: Pki) -> None:
    from console.respond.commands import DispatchResult, HostResult
    from protos.types import Receipt

    submitted: list[Any] = []
    model = ResponseModel(None, hosts_of=lambda j: list(HOSTS), submit_on_writer=submitted.append,
                          advance_grace_s=2.0)
    now = time.time_ns()
    model.on_frame(_frame("gpu-a", JOB, 50, now - 10**9))
    hosts = {}
    for h in HOSTS:
        r = Receipt("c" * 32, h, "result", "executed", action="freeze", job=JOB, method="sigstop",
                    executed_at_ns=now, confirmed_at_ns=now + 1000, frozen_since_ns=now, collective_timeout_s=600)
        hosts[h] = HostResult(h, state=CONFIRMED, final=r)
    model.apply_result(DispatchResult("c" * 32, "freeze", JOB, ["alice:responder"], True, hosts))
    st = model.frozen_status(JOB, now + 30 * 10**9)
    assert st is not None and st.hosts == list(HOSTS) and round(st.seconds_left) == 570 and not st.warning
    assert "FROZEN 0:30" in st.text() and "9:30 left" in st.text()
    assert model.frozen_status(JOB, now + 500 * 10**9).warning  # type: ignore[union-attr]
    # A record already on its way (frame built within the grace) raises the baseline, no alert.
    model.on_frame(_frame("gpu-b", JOB, 51, now + 10**9, rank=1))
    assert model.advance_alert(JOB) is None and not submitted
    # After the grace, a step beyond the baseline: the job runs although frozen.
    model.on_frame(_frame("gpu-b", JOB, 52, now + 5 * 10**9, rank=1))
    alert = model.advance_alert(JOB)
    assert alert is not None and alert.step == 52 and alert.baseline_step == 51 and alert.host == "gpu-b"
    assert len(submitted) == 1 and model.alerts_raised[0].kind == ALERT_KIND_ADVANCED
    assert model.alerts_raised[0].severity == "critical" and model.alerts_raised[0].job_id == JOB
    model.on_frame(_frame("gpu-b", JOB, 53, now + 6 * 10**9, rank=1))
    assert len(submitted) == 1 and model.advance_alert(JOB).count == 2  # type: ignore[union-attr]
    # The writer callback upserts into the alerts table.
    con = duckdb.connect()
    submitted[0](con)
    assert con.execute("SELECT kind, state, job_id FROM alerts").fetchall() == [(ALERT_KIND_ADVANCED, "open", JOB)]
    # Other jobs, old steps and resumed jobs are ignored.
    model.on_frame(_frame("gpu-a", "other", 999, now + 9 * 10**9))
    model.apply_result(DispatchResult("d" * 32, "resume", JOB, ["a", "b"], True, hosts))
    assert model.frozen_status(JOB) is None
    model.on_frame(_frame("gpu-a", JOB, 100, now + 10 * 10**9))
    assert len(submitted) == 1


# --------------------------------------------------------------------------- checkpoints and rollback refusal


@pytest.fixture
def ckpt_fleet(pki: Pki, tmp_path: Path, job_procs: list[subprocess.Popen[bytes]]) -> Iterator[tuple[Fleet, str]]:
    signer = Ed25519PrivateKey.generate()
    trust = tmp_path / "ckpt-signer.pub.pem"
    trust.write_bytes(signer.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    roots = {h: tmp_path / f"ckpt-{h}" for h in HOSTS}
    first = roots[HOSTS[0]] / JOB / "step-000010"
    first.mkdir(parents=True)
    (first / "model.bin").write_bytes(b"\x00" * 64)
    (first / "state.json").write_text('{"step": 10}')
    digest = sign_checkpoint_with_key(first, signer, JOB, "run-1", 10, 2)
    shutil.copytree(roots[HOSTS[0]], roots[HOSTS[1]])  # the same checkpoint on every host (same digest)
    (tmp_path / f"ckpt-{HOSTS[1]}" / JOB / "step-000010" / "model.bin").write_bytes(b"\x01" * 64)  # tampered
    f = Fleet(pki, tmp_path / "agents", _regs(job_procs), checkpoint_roots=roots, trusted=(trust,))
    yield f, digest
    f.stop()


def _seed_store(db: Path, hosts: tuple[str, ...] = HOSTS) -> Path:
    """A console store whose train_samples say the job runs on `hosts` (jobs -> hosts for the CLI)."""
    from console.store.schema import ensure_schema

    con = duckdb.connect(str(db))
    ensure_schema(con)
    for rank, host in enumerate(hosts):
        con.execute("INSERT INTO train_samples (host, epoch, seq, ts, job_id, rank, step, simulated) "
                    "VALUES (?, 'e', 1, now(), ?, ?, 5, false)", [host, JOB, rank])
    con.close()
    return db


def _cli(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpusoc-console")
    sub = p.add_subparsers(dest="cmd")
    add_command_parser(sub)
    return p.parse_args(["command", *argv])


def _tls_args(pki: Pki) -> list[str]:
    r = pki.root
    return ["--tls-ca", str(r / "agent-ca.pem"), "--tls-cert", str(r / "consoles" / "console.pem"),
            "--tls-key", str(r / "consoles" / "console.key")]


def _op_args(pki: Pki, name: str, prefix: str = "operator") -> list[str]:
    cert, key = pki.ops[name]
    return [f"--{prefix}-cert", str(cert), f"--{prefix}-key", str(key)]


def test_checkpoints_listed_and_rollback_refused_when_a_host_fails(
        ckpt_fleet: tuple[Fleet, str], pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fleet, digest = ckpt_fleet
    with _dispatcher(fleet, pki, tmp_path) as d:
        report = d.list_checkpoints(JOB, list(HOSTS), deep=True)
    row = report.find(digest)
    assert row is not None and row.step == 10 and not row.eligible
    assert row.statuses == {"gpu-a": "verified", "gpu-b": "invalid"}, row
    why = report.refusal(digest)
    assert why is not None and "invalid on gpu-b" in why and "every host must verify" in why
    assert "not listed" in (report.refusal("sha256:" + "1" * 64) or "")

    agents = [fleet.addresses[h] for h in HOSTS]
    common = ["--agents", *agents, *_tls_args(pki), "--state-dir", str(tmp_path / "state")]
    assert run_command(_cli(["checkpoints", "--job", JOB, *common])) == 0
    out = capsys.readouterr().out
    assert digest in out and "invalid on gpu-b" in out
    db = _seed_store(tmp_path / "store.duckdb")
    rc = run_command(_cli(["rollback", "--job", JOB, "--checkpoint", digest, *common, *_op_args(pki, "alice"),
                           *_op_args(pki, "bob", "cosign"), "--db", str(db)]))
    err = capsys.readouterr().err
    assert rc == 1 and "rollback refused" in err and "gpu-b" in err
    con = duckdb.connect(str(db))
    decision = con.execute("SELECT actor, payload FROM audit_log WHERE action = 'rollback.decision'").fetchall()
    con.close()
    assert decision and decision[0][0] == "alice:responder" and json.loads(decision[0][1])["accepted"] is False


# --------------------------------------------------------------------------- CLI


def test_cli_freeze_resume_request_approve_exit_codes(fleet: Fleet, pki: Pki, tmp_path: Path,
                                                       job_procs: list[subprocess.Popen[bytes]],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    agents = [fleet.addresses[h] for h in HOSTS]
    db = _seed_store(tmp_path / "store.duckdb")
    common = ["--agents", *agents, *_tls_args(pki), "--state-dir", str(tmp_path / "state"), "--db", str(db),
              "--commit-delay", "0.5"]
    assert run_command(_cli(["freeze", "--job", JOB, "--reason", "cli test", *common, *_op_args(pki, "alice")])) == 0
    out = capsys.readouterr().out
    assert "2/2 confirmed" in out and "skew" in out
    assert all(_stopped(p.pid) for p in job_procs)
    # Resume with one operator: refused before sending, exit 1, clear message.
    assert run_command(_cli(["resume", "--job", JOB, *common, *_op_args(pki, "alice")])) == 1
    assert "needs 2 distinct operators" in capsys.readouterr().err
    # The same operator as co-signer: refused.
    assert run_command(_cli(["resume", "--job", JOB, *common, *_op_args(pki, "alice"),
                             *_op_args(pki, "alice", "cosign")])) == 1
    assert "cannot co-sign their own" in capsys.readouterr().err
    # Two shells: alice writes a request, alice cannot approve it, bob approves and it is sent.
    req_file = tmp_path / "resume.json"
    assert run_command(_cli(["request", "resume", "--job", JOB, "--reason", "verified", *common,
                             *_op_args(pki, "alice"), "--out", str(req_file)])) == 0
    assert "command approve" in capsys.readouterr().out
    approve_common = [*_tls_args(pki), "--state-dir", str(tmp_path / "state"), "--db", str(db)]
    assert run_command(_cli(["approve", str(req_file), *_op_args(pki, "alice"), *approve_common])) == 1
    assert "already signed" in capsys.readouterr().err
    assert run_command(_cli(["approve", str(req_file), *_op_args(pki, "bob"), *approve_common, "--json"])) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["all_confirmed"] and result["two_phase"] and result["signers"] == ["alice:responder",
                                                                                     "bob:responder"]
    assert not any(_stopped(p.pid) for p in job_procs)
    assert run_command(_cli(["state", *common])) == 0
    assert "nothing frozen" in capsys.readouterr().out
    # Usage errors: exit 2.
    assert run_command(_cli(["freeze", "--job", JOB, *common, "--operator-cert", str(tmp_path / "x.pem"),
                             "--operator-key", str(tmp_path / "x.key")])) == 2
    assert run_command(_cli(["freeze", "--job", "no-such-job", *common, *_op_args(pki, "alice")])) == 2
    capsys.readouterr()
    # An agent that does not answer: nothing sent, exit 1.
    dead = f"127.0.0.1:{_free_port()}"
    assert run_command(_cli(["freeze", "--job", JOB, "--agents", dead, *common[len(agents) + 1:],
                             *_op_args(pki, "alice")])) == 1
    assert "did not answer" in capsys.readouterr().err

    con = duckdb.connect(str(db))
    rows = con.execute("SELECT seq, epoch_us(ts) * 1000, actor, action, target, payload, prev_hash, hash "
                       "FROM audit_log ORDER BY seq").fetchall()
    heads = con.execute("SELECT seq, hash, epoch_us(signed_at) * 1000, key_id, signature FROM audit_heads").fetchall()
    pending = con.execute("SELECT state, decided_by FROM pending_commands").fetchall()
    con.close()
    key = serialization.load_pem_private_key((tmp_path / "state" / "audit-key.pem").read_bytes(), None)
    assert isinstance(key, Ed25519PrivateKey)
    assert verify_rows(rows, heads, [key.public_key()]).ok
    actions = [r[3] for r in rows]
    assert actions.count("command.issued") == 2 and "command.requested" in actions and "command.cosigned" in actions
    assert pending == [("dispatched", "bob:responder")]
    # Pins were taken once and are reused; unpin removes one.
    assert run_command(_cli(["unpin", "gpu-a", "--state-dir", str(tmp_path / "state")])) == 0
    assert run_command(_cli(["unpin", "gpu-a", "--state-dir", str(tmp_path / "state")])) == 1


def test_cli_freeze_records_through_the_collector_that_holds_the_store(
        fleet: Fleet, pki: Pki, tmp_path: Path, job_procs: list[subprocess.Popen[bytes]],
        capsys: pytest.CaptureFixture[str]) -> None:
    """A trial found `command --db` failing with DuckDB's lock error while `collect` held the store:
    it now reads the job's hosts and appends its audit rows through the collector's `<db>.ctl`."""
    db = _seed_store(tmp_path / "store.duckdb")
    state = tmp_path / "collector-state"
    env = {**os.environ, "GPUSOC_CONSOLE_STATE_DIR": str(state)}
    collector = subprocess.Popen(
        [sys.executable, "-m", "console.cli", "collect", "--agents", f"127.0.0.1:{_free_port()}", "--insecure",
         "--db", str(db)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        ctl = Path(f"{db}.ctl")
        deadline = time.monotonic() + 60
        while not ctl.exists() and collector.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ctl.exists(), collector.stderr.read().decode() if collector.poll() is not None else "no socket"
        common = ["--agents", *[fleet.addresses[h] for h in HOSTS], *_tls_args(pki),
                  "--state-dir", str(tmp_path / "cli-state"), "--db", str(db), "--commit-delay", "0.5"]
        assert run_command(_cli(["freeze", "--job", JOB, "--reason", "held store", *common,
                                 *_op_args(pki, "alice")])) == 0
        captured = capsys.readouterr()
        assert "2/2 confirmed" in captured.out and "recording through" in captured.err
        assert all(_stopped(p.pid) for p in job_procs)
        # a job the store has no records of is still refused, through the socket too
        assert run_command(_cli(["freeze", "--job", "no-such-job", *common, *_op_args(pki, "alice")])) == 2
        assert "no training records" in capsys.readouterr().err
    finally:
        collector.terminate()
        collector.wait(timeout=60)
    con = duckdb.connect(str(db), read_only=True)
    rows = con.execute("SELECT seq, epoch_us(ts) * 1000, actor, action, target, payload, prev_hash, hash "
                       "FROM audit_log ORDER BY seq").fetchall()
    heads = con.execute("SELECT seq, hash, epoch_us(signed_at) * 1000, key_id, signature FROM audit_heads").fetchall()
    con.close()
    key = serialization.load_pem_private_key((state / "audit-key.pem").read_bytes(), None)
    assert isinstance(key, Ed25519PrivateKey)
    report = verify_rows(rows, heads, [key.public_key()])
    assert report.ok, report
    actions = [r[3] for r in rows]
    # one chain: the collector's own rows around the command's, in order, signed by the collector's key
    assert actions[0] == "collect.start" and actions[-1] == "collect.stop"
    assert "command.issued" in actions and "command.outcome" in actions
    assert not (tmp_path / "cli-state" / "audit-key.pem").exists()  # the CLI never signed anything itself


# --------------------------------------------------------------------------- the panel (pytest-qt, offscreen)


def test_panel_freeze_then_cosigned_resume(qtbot: Any, fleet: Fleet, pki: Pki, tmp_path: Path,
                                           job_procs: list[subprocess.Popen[bytes]]) -> None:
    from PySide6.QtCore import Qt

    from console.store.writer import StoreWriter
    from console.ui.qt_respond import COLORS, QtResponsePanel

    writer = StoreWriter(tmp_path / "console.duckdb", flush_interval_s=0.05)
    writer.start()
    try:
        key = Ed25519PrivateKey.generate()
        chain = AuditChain(writer.run_on_writer, signing_key=key)
        d = _dispatcher(fleet, pki, tmp_path)
        d.audit = chain
        model = ResponseModel(d, hosts_of=lambda job: list(HOSTS), approvals=ApprovalStore(writer.run_on_writer),
                              audit=chain, submit_on_writer=writer.submit_on_writer, query=writer.read_query)
        files = {"who": "alice"}
        panel = QtResponsePanel(model, refresh_ms=50, choose_operator_files=lambda purpose: pki.ops[files["who"]])
        qtbot.addWidget(panel)
        panel.set_jobs([JOB])
        assert panel.job == JOB
        qtbot.mouseClick(panel.load_operator_button, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: model.operator is not None, timeout=5000)
        assert "alice:responder" in panel.operator_label.text()

        model.on_frame(_frame("gpu-a", JOB, 40, time.time_ns()))
        panel.reason_edit.setText("panel test")
        with qtbot.waitSignal(panel.outcomeReady, timeout=30000):
            qtbot.mouseClick(panel.freeze_button, Qt.MouseButton.LeftButton)
            # while the dispatch runs, the rows are amber (waiting/prepared) and fill in as receipts arrive
            qtbot.waitUntil(lambda: panel.host_table.rowCount() == 2, timeout=20000)

        def confirmed() -> bool:
            t = panel.host_table
            return t.rowCount() == 2 and all(t.item(i, 1) is not None and t.item(i, 1).text() == "CONFIRMED"
                                             for i in range(2))

        qtbot.waitUntil(confirmed, timeout=20000)
        assert panel.host_table.item(0, 1).background().color().name() == COLORS[GREEN]
        assert {panel.host_table.item(i, 0).text() for i in range(2)} == set(HOSTS)
        assert "2/2 confirmed" in panel.summary_label.text() and "skew" in panel.summary_label.text()
        assert all(_stopped(p.pid) for p in job_procs)
        qtbot.waitUntil(lambda: not panel.frozen_label.isHidden(), timeout=5000)
        assert "left before the collective timeout (900 s)" in panel.frozen_label.text()

        # The job's telemetry advances although it is frozen: alert in the panel and in the store.
        model.on_frame(_frame("gpu-b", JOB, 41, time.time_ns() + 10 * 10**9, rank=1))
        qtbot.waitUntil(lambda: not panel.alert_label.isHidden(), timeout=5000)
        assert "ADVANCED WHILE FROZEN" in panel.alert_label.text()
        qtbot.waitUntil(lambda: writer.read_query("SELECT count(*) FROM alerts WHERE kind = ?",
                                                  [ALERT_KIND_ADVANCED])[0][0] == 1, timeout=5000)

        # Resume needs a second operator: it becomes a pending request with a countdown.
        qtbot.mouseClick(panel.resume_button, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: panel.pending_table.rowCount() == 1, timeout=20000)
        assert panel.pending_table.item(0, 0).text() == "RESUME"
        assert panel.pending_table.item(0, 3).text() == "1/2"
        assert ":" in panel.pending_table.item(0, 4).text()
        assert "waits for 1 more" in panel.message_label.text()
        assert all(_stopped(p.pid) for p in job_procs)

        # Alice cannot co-sign her own request.
        panel.pending_table.selectRow(0)
        assert panel.cosign_button.isEnabled()
        with qtbot.waitSignal(panel.failed, timeout=10000) as blocker:
            qtbot.mouseClick(panel.cosign_button, Qt.MouseButton.LeftButton)
        assert "already signed" in blocker.args[0]
        assert "already signed" in panel.message_label.text()
        assert all(_stopped(p.pid) for p in job_procs)
        assert confirmed()  # the refused co-signature left the freeze's confirmations in place

        # Bob co-signs from his own files: dispatched, confirmed on both hosts, request no longer pending.
        files["who"] = "bob"
        panel.pending_table.selectRow(0)
        with qtbot.waitSignal(panel.outcomeReady, timeout=30000) as got:
            qtbot.mouseClick(panel.cosign_button, Qt.MouseButton.LeftButton)
        outcome = got.args[0]
        assert outcome.result is not None and outcome.result.all_confirmed, outcome.result.render()
        qtbot.waitUntil(confirmed, timeout=5000)
        assert not any(_stopped(p.pid) for p in job_procs)
        qtbot.waitUntil(lambda: panel.pending_table.rowCount() == 0, timeout=10000)
        assert panel.frozen_label.isHidden()
        rows = rows_by_host(model.host_rows(JOB))
        assert all(r.color == GREEN for r in rows.values())
        assert writer.read_query("SELECT state, decided_by FROM pending_commands") == [("dispatched", "bob:responder")]
        actions = [r[0] for r in writer.read_query("SELECT action FROM audit_log ORDER BY seq")]
        for a in ("command.issued", "command.requested", "command.cosign_refused", "command.cosigned",
                  "command.receipt", "command.outcome"):
            assert a in actions, actions
        chain.sign_head()
        rows_ = writer.read_query("SELECT seq, epoch_us(ts) * 1000, actor, action, target, payload, prev_hash, hash "
                                  "FROM audit_log ORDER BY seq")
        heads = writer.read_query("SELECT seq, hash, epoch_us(signed_at) * 1000, key_id, signature FROM audit_heads")
        assert verify_rows(rows_, heads, [key.public_key()]).ok
        assert RED in COLORS  # red rows are covered by the alarm tests of the dispatcher
        d.close()
    finally:
        writer.stop()


def test_panel_shows_a_silent_host_as_alarm(qtbot: Any, fleet: Fleet, pki: Pki, tmp_path: Path) -> None:
    from PySide6.QtCore import Qt

    from console.ui.qt_respond import COLORS, QtResponsePanel

    fleet.hang("gpu-b", {PHASE_RESULT})
    d = _dispatcher(fleet, pki, tmp_path, confirm_timeout_s=1.5, result_wait_s=0.5, rpc_timeout_s=1.0)
    model = ResponseModel(d, hosts_of=lambda job: list(HOSTS))
    panel = QtResponsePanel(model, refresh_ms=50, choose_operator_files=lambda p: pki.ops["alice"],
                            load_pending=False)
    qtbot.addWidget(panel)
    panel.select_job(JOB)
    model.set_operator(pki.op("alice"))
    with qtbot.waitSignal(panel.outcomeReady, timeout=30000):
        qtbot.mouseClick(panel.freeze_button, Qt.MouseButton.LeftButton)
    rows = rows_by_host(model.host_rows(JOB))
    assert rows["gpu-a"].color == GREEN and rows["gpu-b"].color == RED and rows["gpu-b"].alarm
    texts = {panel.host_table.item(i, 0).text(): panel.host_table.item(i, 1) for i in range(2)}
    assert "ALARM" in texts["gpu-b"].text() and texts["gpu-b"].background().color().name() == COLORS[RED]
    assert "ALARM" in panel.summary_label.text()
    d.close()


def test_pending_request_from_file_reaches_the_panel_model(pki: Pki, tmp_path: Path) -> None:
    """A request written by `command request` and one from the table are the same object."""
    req = create_request(pki.op("alice"), build_command("rollback", JOB, HOSTS, "bad data", "sha256:" + "a" * 64))
    path = write_request_file(req, tmp_path / "r.json")
    with pytest.raises(ApprovalError, match="exists"):
        write_request_file(req, path)
    back = read_request_file(path)
    assert isinstance(back, PendingRequest) and back.command == req.command and back.required_signers == 2
    shutil.copy(path, tmp_path / "copy.json")


def test_panel_refuses_rollback_to_a_checkpoint_a_host_cannot_verify(
        qtbot: Any, ckpt_fleet: tuple[Fleet, str], pki: Pki, tmp_path: Path, audit: Audit) -> None:
    from PySide6.QtCore import Qt

    from console.ui.qt_respond import COLORS, QtResponsePanel

    fleet, digest = ckpt_fleet
    d = _dispatcher(fleet, pki, tmp_path, audit)
    model = ResponseModel(d, hosts_of=lambda job: list(HOSTS), audit=audit.chain)
    panel = QtResponsePanel(model, refresh_ms=50, load_pending=False)
    qtbot.addWidget(panel)
    model.set_operator(pki.op("alice"))
    panel.select_job(JOB)  # shallow listing on selection
    qtbot.waitUntil(lambda: panel.checkpoint_table.rowCount() >= 1, timeout=20000)
    qtbot.mouseClick(panel.refresh_button, Qt.MouseButton.LeftButton)  # deep: every file re-hashed
    qtbot.waitUntil(lambda: "invalid on gpu-b" in (panel.checkpoint_table.item(0, 1).text() or ""), timeout=20000)
    assert panel.checkpoint_table.item(0, 2).text() == digest
    assert panel.checkpoint_table.item(0, 1).background().color().name() == COLORS[RED]
    assert not panel.rollback_button.isEnabled()
    panel.checkpoint_table.selectRow(0)
    assert panel.selected_checkpoint() == digest and panel.rollback_button.isEnabled()
    with qtbot.waitSignal(panel.outcomeReady, timeout=30000) as got:
        qtbot.mouseClick(panel.rollback_button, Qt.MouseButton.LeftButton)
    assert "rollback refused" in got.args[0].refused and "gpu-b" in got.args[0].refused
    assert "rollback refused" in panel.message_label.text()
    assert "rollback.decision" in audit.actions() and "command.issued" not in audit.actions()
    d.close()
