"""Training SDK (agent/sdk.py) and its agent-side receiver (agent/training.py)."""

from __future__ import annotations

import math
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import sdk
from agent.training import TrainingReceiver, parse_datagram
from protos.types import TrainRecord

ROOT = Path(__file__).resolve().parent.parent
ENV_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "SLURM_JOB_ID",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NTASKS",
    sdk.ENV_JOB_ID,
    sdk.ENV_SOCKET,
    sdk.ENV_DISABLED,
    sdk.ENV_COALESCE_MS,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No launcher variables from the CI environment, and no SDK client left behind."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    yield
    sdk.close()


@pytest.fixture
def sock_path() -> Iterator[str]:
    """A short path: AF_UNIX paths are limited to 108 bytes, pytest's tmp_path can be longer."""
    d = tempfile.mkdtemp(prefix="gs-")
    yield os.path.join(d, "agent.sock")
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def rx(sock_path: str) -> Iterator[TrainingReceiver]:
    r = TrainingReceiver(sock_path, background=False)
    yield r
    r.close()


def _drain_until(r: TrainingReceiver, n: int, timeout: float = 5.0) -> list[TrainRecord]:
    out: list[TrainRecord] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out += r.drain()
        if len(out) < n:
            time.sleep(0.005)
    return out


def _logs(records: list[TrainRecord]) -> list[TrainRecord]:
    return [r for r in records if r.kind == "log"]


# ---- no agent, disabled --------------------------------------------------------------------


def test_no_agent_counts_drops_and_never_raises(sock_path: str) -> None:
    sdk.init(socket_path=sock_path)  # nothing bound there
    for i in range(10_000):
        sdk.log(step=i, loss=1.0, grad_norm=2.0, lr=3e-4, tokens=4096, mfu=0.5)
    sdk.flush()
    assert sdk.stats() == {"sent": 0, "dropped": 10_000, "pending": 0}


def test_socket_file_without_listener_is_a_drop(sock_path: str) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(sock_path)
    s.close()  # leaves a stale socket file: connect() gets ECONNREFUSED
    sdk.init(socket_path=sock_path)
    sdk.log(step=1)
    assert sdk.stats()["dropped"] == 1


def test_disabled_is_a_noop(rx: TrainingReceiver, monkeypatch: pytest.MonkeyPatch) -> None:
    sdk.init(socket_path=rx.socket_path, enabled=False)
    sdk.log(step=1, loss=2.0)
    sdk.flush()
    assert sdk.stats() == {"sent": 0, "dropped": 0, "pending": 0}
    monkeypatch.setenv(sdk.ENV_DISABLED, "1")
    assert not sdk.init(socket_path=rx.socket_path).enabled
    sdk.log(step=2)
    assert rx.drain() == []
    # An explicit keyword wins over the environment.
    assert sdk.init(socket_path=rx.socket_path, enabled=True).enabled


def test_log_before_init_auto_inits_from_env(rx: TrainingReceiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sdk.ENV_SOCKET, rx.socket_path)
    monkeypatch.setenv(sdk.ENV_JOB_ID, "auto-job")
    sdk.close()
    sdk.log(step=5, loss=1.5)
    recs = _drain_until(rx, 2)
    assert [r.kind for r in recs] == ["init", "log"]
    assert recs[1].job_id == "auto-job" and recs[1].step == 5 and recs[1].loss == 1.5


# ---- records through a receiver ------------------------------------------------------------


def test_records_arrive_with_kernel_identity(rx: TrainingReceiver) -> None:
    sdk.init(socket_path=rx.socket_path, job_id="j1", rank=3, local_rank=1, world_size=8, info={"note": "x"})
    sdk.log(step=100, loss=2.3, grad_norm=1.1, lr=3e-4, tokens=4096)
    recs = _drain_until(rx, 2)
    assert [r.kind for r in recs] == ["init", "log"]
    init, rec = recs
    for r in recs:
        assert (r.job_id, r.rank, r.local_rank, r.world_size) == ("j1", 3, 1, 8)
        assert r.pid == os.getpid()
        assert r.uid == os.getuid()
    assert init.info["note"] == "x"
    assert init.info["cwd"] == os.getcwd()
    assert "argv" in init.info
    assert (rec.step, rec.loss, rec.grad_norm, rec.lr, rec.tokens) == (100, 2.3, 1.1, 3e-4, 4096.0)
    assert rec.extra == {} and rec.info == {}
    assert abs(rec.ts_unix_ns - time.time_ns()) < 10 * 10**9
    assert sdk.stats() == {"sent": 1, "dropped": 0, "pending": 0}
    assert rx.dropped == 0


def test_pid_comes_from_the_kernel_not_the_payload(rx: TrainingReceiver) -> None:
    code = (
        "import os, sys\n"
        "from agent import sdk\n"
        "sdk.init(socket_path=sys.argv[1], job_id='child', rank=1)\n"
        "sdk.log(step=7, loss=0.5)\n"
        "sdk.log(step=8, loss=0.4)\n"  # held by coalescing: the atexit flush sends it
        "print(os.getpid())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code, rx.socket_path], capture_output=True, text=True, env=env, check=True
    )
    child_pid = int(out.stdout.strip())
    recs = _drain_until(rx, 3)
    assert [r.kind for r in recs] == ["init", "log", "log"]
    assert all(r.pid == child_pid != os.getpid() for r in recs)
    assert [r.step for r in recs[1:]] == [7, 8] and recs[1].job_id == "child"
    assert rx.jobs()["child"][1].pid == child_pid


def test_extra_kwargs_and_nan_for_missing(rx: TrainingReceiver) -> None:
    np = pytest.importorskip("numpy")
    c = sdk.init(socket_path=rx.socket_path)
    c._window_ns = 0  # one datagram per call
    sdk.log(step=1, mfu=0.41, tps=1000, done=True, gpu_mem=np.float32(2.5))
    sdk.log(step=2)
    sdk.log()
    sdk.log(step=np.int64(3), loss=np.float64(0.25))
    sdk.log(step=4.0)  # type: ignore[arg-type]  # an integral float step is accepted
    recs = _logs(_drain_until(rx, 6))
    assert [r.step for r in recs] == [1, 2, -1, 3, 4]
    assert recs[0].extra == {"mfu": 0.41, "tps": 1000.0, "done": 1.0, "gpu_mem": 2.5}
    assert math.isnan(recs[0].loss)
    for r in recs[1:3]:
        assert r.extra == {}
        assert all(math.isnan(v) for v in (r.loss, r.grad_norm, r.lr, r.tokens))
    assert recs[3].loss == 0.25
    assert sdk.stats()["dropped"] == 0


def test_non_numeric_values_are_dropped_not_raised(rx: TrainingReceiver) -> None:
    sdk.init(socket_path=rx.socket_path)
    sdk.log(step=1, loss="high")  # type: ignore[arg-type]
    sdk.log(step=1, loss="1.5")  # type: ignore[arg-type]  # strings are not numbers, even numeric ones
    sdk.log(step=1, phase="train")  # type: ignore[arg-type]
    sdk.log(step=2.5)  # type: ignore[arg-type]
    sdk.log(step="x")  # type: ignore[arg-type]
    sdk.log(step=1, loss=complex(1, 2))  # type: ignore[arg-type]
    sdk.log(step=1, **{"n" * 300: 1.0})  # name too long for the wire
    sdk.log(step=3, loss=1.0)
    sdk.flush()
    assert sdk.stats() == {"sent": 1, "dropped": 7, "pending": 0}
    assert [r.step for r in _logs(_drain_until(rx, 2))] == [3]


def test_coalesced_records_arrive_in_order(rx: TrainingReceiver) -> None:
    sdk.init(socket_path=rx.socket_path)
    sdk._client._window_ns = 10**10  # type: ignore[union-attr]  # hold everything until flush()
    for i in range(200):
        sdk.log(step=i, loss=float(i), k=float(i) if i % 2 else 0.0)
    st = sdk.stats()
    assert st["pending"] >= 199 and st["sent"] <= 1
    sdk.flush()
    assert sdk.stats()["sent"] == 200
    recs = _logs(_drain_until(rx, 201))
    assert [r.step for r in recs] == list(range(200))
    assert recs[7].extra == {"k": 7.0} and recs[8].extra == {"k": 0.0}
    assert recs[-1].ts_unix_ns >= recs[0].ts_unix_ns


def test_full_queue_drops_without_blocking(rx: TrainingReceiver) -> None:
    c = sdk.init(socket_path=rx.socket_path)
    c._window_ns = 0
    for i in range(2000):  # nobody drains: the kernel queue fills up
        sdk.log(step=i)
    st = sdk.stats()
    assert st["dropped"] > 0 and st["sent"] + st["dropped"] == 2000
    assert c.connected  # EAGAIN keeps the connection
    assert len(_logs(rx.drain())) == st["sent"]


def test_background_reader_thread(sock_path: str) -> None:
    with TrainingReceiver(sock_path) as r:  # background=True by default
        c = sdk.init(socket_path=sock_path, job_id="bg")
        c._window_ns = 0
        for i in range(300):  # more than the kernel queue holds; the thread keeps it empty
            sdk.log(step=i)
            if i % 8 == 7:
                time.sleep(0.003)
        recs = _logs(_drain_until(r, 300))
        assert len(recs) + sdk.stats()["dropped"] == 300
        assert len(recs) > 50  # far more than the kernel queue holds: the thread drained it
        assert r.jobs()["bg"][0].pid == os.getpid()


# ---- environment ---------------------------------------------------------------------------


def test_torchrun_env(monkeypatch: pytest.MonkeyPatch, sock_path: str) -> None:
    for k, v in {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "16", "TORCHELASTIC_RUN_ID": "run-42"}.items():
        monkeypatch.setenv(k, v)
    c = sdk.init(socket_path=sock_path)
    assert (c.job_id, c.rank, c.local_rank, c.world_size) == ("run-42", 5, 1, 16)
    assert c.info["launcher"] == "torchrun"


def test_slurm_env(monkeypatch: pytest.MonkeyPatch, sock_path: str) -> None:
    for k, v in {"SLURM_JOB_ID": "123456", "SLURM_PROCID": "7", "SLURM_LOCALID": "3", "SLURM_NTASKS": "32"}.items():
        monkeypatch.setenv(k, v)
    c = sdk.init(socket_path=sock_path)
    assert (c.job_id, c.rank, c.local_rank, c.world_size) == ("123456", 7, 3, 32)
    assert c.info["launcher"] == "slurm"


def test_env_precedence_and_overrides(monkeypatch: pytest.MonkeyPatch, sock_path: str) -> None:
    # torchrun inside a Slurm allocation: ranks from torchrun, job id from Slurm.
    env = {"SLURM_JOB_ID": "99", "SLURM_PROCID": "1", "RANK": "9", "WORLD_SIZE": "12"}
    env |= {"TORCHELASTIC_RUN_ID": "r"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    c = sdk.init(socket_path=sock_path)
    assert (c.job_id, c.rank, c.world_size) == ("99", 9, 12)
    monkeypatch.setenv(sdk.ENV_JOB_ID, "mine")
    assert sdk.init(socket_path=sock_path).job_id == "mine"
    c = sdk.init(socket_path=sock_path, job_id="kw", rank=2, local_rank=0, world_size=4)
    assert (c.job_id, c.rank, c.local_rank, c.world_size) == ("kw", 2, 0, 4)


def test_default_job_id_and_bad_values(monkeypatch: pytest.MonkeyPatch, sock_path: str) -> None:
    c = sdk.init(socket_path=sock_path)
    assert c.job_id == f"local-{socket.gethostname()}-{os.getpid()}"
    assert (c.rank, c.local_rank, c.world_size) == (0, 0, 1)
    # torchrun's default run id is the literal "none"; ranks of one launcher share its pid.
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("RANK", "oops")
    monkeypatch.setenv("WORLD_SIZE", "")
    c = sdk.init(socket_path=sock_path)
    assert c.job_id == f"local-{socket.gethostname()}-{os.getppid()}"
    assert (c.rank, c.world_size) == (0, 1)
    c = sdk.init(socket_path=sock_path, job_id="é" * 300)  # trimmed to 255 bytes, whole characters
    assert c.job_id == "é" * 127


def test_default_socket_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(sdk.ENV_SOCKET, "/x/y.sock")
    assert sdk.default_socket_path() == sdk.default_socket_path(for_agent=True) == "/x/y.sock"
    monkeypatch.delenv(sdk.ENV_SOCKET)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    system = tmp_path / "sys" / "gpusoc" / "agent.sock"
    monkeypatch.setattr(sdk, "SYSTEM_SOCKET_PATH", str(system))
    user = tmp_path / "gpusoc" / "agent.sock"
    assert sdk.default_socket_path() == str(system)  # neither exists: the system path
    user.parent.mkdir()
    user.touch()
    assert sdk.default_socket_path() == str(user)  # only the per-user socket exists
    assert sdk.default_socket_path(for_agent=True) == str(system)  # its parent can be created
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert sdk.default_socket_path() == str(system)


# ---- receiver ------------------------------------------------------------------------------


def test_malformed_datagrams_are_counted(rx: TrainingReceiver) -> None:
    good = sdk.Client(socket_path=rx.socket_path, job_id="ok", enabled=False)
    record = sdk.RECORD.pack(sdk.RECORD.size, 0, 1, 1.0, 2.0, 3.0, 4.0)
    bad = [
        b"",
        b"garbage",
        b"XX" + good._prefix[2:] + record,  # bad magic
        good._prefix[:2] + b"\x09" + good._prefix[3:] + record,  # unknown version
        good._prefix,  # header without a record
        good._prefix + record[:-1],  # truncated record
        good._prefix + sdk.RECORD.pack(40, 0, 1, 1.0, 2.0, 3.0, 4.0),  # length below minimum
        good._prefix + sdk.RECORD.pack(60, 0, 1, 1.0, 2.0, 3.0, 4.0) + b"\x02\x01a" + b"\0" * 7,  # extras
        good._init_datagram[: -len(b"}")],  # init with broken JSON
        good._init_datagram.replace(b'"1"', b"1 "),  # info value not a string
        good._prefix + record + b"\xff",  # trailing byte
        b"\xff" * 70_000,  # larger than the receive buffer: truncated
    ]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.connect(rx.socket_path)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    for data in bad:
        s.send(data)
        rx.drain()  # the kernel queue holds only a few datagrams
    s.send(good._prefix + record)
    recs = rx.drain()
    s.close()
    assert rx.dropped == len(bad)
    assert len(recs) == 1 and recs[0].job_id == "ok" and recs[0].step == 1
    assert recs[0].ts_unix_ns > 0  # 0 in the payload: stamped on receipt


def test_parse_datagram_rejects_without_raising_other_errors() -> None:
    from agent.training import MalformedDatagram

    for data in (b"GS", b"GS\x01\x01" + b"\0" * 14 + b"\xff\xff", b"GS\x01\x03" + b"\0" * 80):
        with pytest.raises(MalformedDatagram):
            parse_datagram(data, 1, 0, 5)


def test_receiver_restart_sdk_reconnects(sock_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sdk, "RETRY_INTERVAL_S", 0.05)
    first = TrainingReceiver(sock_path, background=False)
    c = sdk.init(socket_path=sock_path, job_id="restart")
    c._window_ns = 0
    sdk.log(step=1)
    assert [r.step for r in _logs(_drain_until(first, 2))] == [1]
    first.close()
    assert not os.path.exists(sock_path)
    sdk.log(step=2)  # agent gone: dropped, connection forgotten
    assert not c.connected
    second = TrainingReceiver(sock_path, background=False)
    try:
        time.sleep(0.1)
        sdk.log(step=3)
        recs = _drain_until(second, 2)
        assert [r.kind for r in recs] == ["init", "log"]  # re-registered on reconnect
        assert recs[1].step == 3
        assert second.jobs()["restart"][0].pid == os.getpid()
        assert sdk.stats() == {"sent": 2, "dropped": 1, "pending": 0}
    finally:
        second.close()


def test_reconnect_attempts_are_rate_limited(sock_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    c = sdk.init(socket_path=sock_path)
    c._window_ns = 0
    calls = 0
    real = sdk.Client._connect

    def counting(self: sdk.Client) -> socket.socket | None:
        nonlocal calls
        calls += 1
        return real(self)

    monkeypatch.setattr(sdk.Client, "_connect", counting)
    for i in range(1000):
        sdk.log(step=i)
    assert calls == 0  # init() just failed: the next attempt waits RETRY_INTERVAL_S
    assert sdk.stats()["dropped"] == 1000


def test_socket_file_handling(sock_path: str) -> None:
    d = os.path.dirname(sock_path)
    shutil.rmtree(d)
    nested = os.path.join(d, "sub", "agent.sock")
    r = TrainingReceiver(nested, background=False)
    try:
        assert stat.S_ISSOCK(os.stat(nested).st_mode)
        assert stat.S_IMODE(os.stat(nested).st_mode) == 0o666
        with pytest.raises(OSError, match="another receiver"):
            TrainingReceiver(nested, background=False)
    finally:
        r.close()
    assert not os.path.exists(nested)
    # A stale socket (nobody bound) is replaced; a regular file is not.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(nested)
    s.close()
    TrainingReceiver(nested, background=False, socket_mode=0o660).close()
    Path(nested).write_text("not a socket")
    with pytest.raises(FileExistsError):
        TrainingReceiver(nested, background=False)
    assert Path(nested).read_text() == "not a socket"


def test_jobs_registry_and_prune(rx: TrainingReceiver) -> None:
    sdk.init(socket_path=rx.socket_path, job_id="jobA", rank=0, local_rank=0, world_size=2, info={"k": "v"})
    sdk.log(step=1)
    other = sdk.Client(socket_path=rx.socket_path, job_id="jobA", rank=1, local_rank=1, world_size=2)
    other.log(step=1)
    other.close()
    _drain_until(rx, 4)
    jobs = rx.jobs()
    assert set(jobs) == {"jobA"} and set(jobs["jobA"]) == {0, 1}
    reg = jobs["jobA"][0]
    assert (reg.pid, reg.uid, reg.world_size, reg.local_rank) == (os.getpid(), os.getuid(), 2, 0)
    assert reg.info["k"] == "v" and reg.last_seen > 0
    jobs["jobA"][0].info["k"] = "changed"  # a copy
    assert rx.jobs()["jobA"][0].info["k"] == "v"
    assert rx.prune(3600) == 0
    assert rx.prune(0) == 2 and rx.jobs() == {}


def test_forked_child_does_not_resend_parent_records(rx: TrainingReceiver) -> None:
    c = sdk.init(socket_path=rx.socket_path, job_id="fork")
    c._window_ns = 10**10
    sdk.log(step=1)  # sent
    sdk.log(step=2)  # held
    pid = os.fork()
    if pid == 0:  # child: its own record only, then exit without atexit handlers
        try:
            sdk.log(step=3)
            sdk.flush()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    sdk.flush()
    recs = _logs(_drain_until(rx, 4))
    assert sorted((r.step, r.pid) for r in recs) == [(1, os.getpid()), (2, os.getpid()), (3, pid)]


def test_wire_constants() -> None:
    assert sdk.RECORD.size == 50  # the hot path packs this length as a literal
    assert sdk.HEADER.size == 18


def test_fingerprint_and_checkpoint_reach_the_agent_registration(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """sdk.fingerprint() and sdk.checkpoint_saved() update what the agent knows about the rank."""
    from agent.pki import create_dev_pki, create_operator
    from agent.training import TrainingReceiver

    sock = str(tmp_path / "agent.sock")
    rx = TrainingReceiver(sock)
    try:
        sdk.init(job_id="fp-job", rank=0, local_rank=0, world_size=1, socket_path=sock)
        code = tmp_path / "code"
        code.mkdir()
        (code / "train.py").write_text("print('v1')\n")
        first = sdk.fingerprint([str(code)], config={"lr": 3e-4}, seed=7)
        (code / "train.py").write_text("print('v2: sabotaged')\n")
        second = sdk.fingerprint([str(code)], config={"lr": 3e-4}, seed=7)
        assert first["code_fingerprint"] != second["code_fingerprint"]
        assert first["config_fingerprint"] == second["config_fingerprint"] and first["seed"] == "7"

        create_dev_pki(tmp_path / "pki", agents=["h"], consoles=["c"])
        op = create_operator(tmp_path / "pki", "alice", "responder")
        ckpt = tmp_path / "ckpt"
        ckpt.mkdir()
        (ckpt / "model.bin").write_bytes(b"\0" * 64)
        digest = sdk.checkpoint_saved(str(ckpt), step=100, key_path=str(op.key))
        assert digest.startswith("sha256:") and (ckpt / "gpusoc-manifest.sig").exists()
        sdk.flush()
        deadline = time.monotonic() + 5
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            rx.drain()
            reg = rx.jobs().get("fp-job", {}).get(0)
            info = dict(reg.info) if reg else {}
            if info.get("last_checkpoint_step") == "100":
                break
            time.sleep(0.05)
        assert info["code_fingerprint"] == second["code_fingerprint"]
        assert info["last_checkpoint"] == str(ckpt)
    finally:
        sdk.close()
        rx.close()
