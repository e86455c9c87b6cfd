"""Agent side of the training SDK: receive its datagrams and turn them into TrainRecords.

The receiver binds the Unix datagram socket the SDK (agent/sdk.py) sends to and sets
SO_PASSCRED, so the kernel attaches the sender's pid/uid/gid to every datagram; identity in
a TrainRecord therefore comes from the kernel, never from the payload. Malformed datagrams
are counted in `dropped` and never raise.

Linux caps an AF_UNIX datagram queue at net.unix.max_dgram_qlen datagrams (10 unless the
host's sysctl raises it; systemd hosts set 512), whatever SO_RCVBUF says, so a receiver read
only once per agent tick would make busy training loops drop records. Keep the kernel queue
empty: by default the receiver runs a small daemon thread (`background=True`, see `start`)
that reads every 2 ms while records flow and sleeps in poll() when idle; the agent's tick
calls `drain()`, which returns what was buffered (bounded) plus anything still queued.
`loop.add_reader(rx.fileno(), rx.pump)` also works but wakes per datagram, which costs each
sender the wakeup.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import math
import os
import select
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass, field, fields, replace
from typing import Final

from agent.sdk import HEADER, KIND_INIT, KIND_NAMES, MAGIC, RECORD, VERSION, default_socket_path
from protos.types import TrainRecord

__all__ = ["RankRegistration", "TrainingReceiver", "parse_datagram"]

RECV_BYTES: Final = 1 << 16  # larger than any SDK datagram (sdk.MAX_DATAGRAM); bigger ones are truncated
RCVBUF_BYTES: Final = 4 << 20
DEFAULT_MAX_PER_DRAIN: Final = 10_000
DEFAULT_MAX_BUFFERED: Final = 100_000
DEFAULT_MAX_RANKS: Final = 100_000  # registrations kept across all jobs
UCRED: Final = struct.Struct("=iII")  # struct ucred: pid_t pid, uid_t uid, gid_t gid
_SO_PASSCRED: Final = getattr(socket, "SO_PASSCRED", 16)
_SCM_CREDENTIALS: Final = getattr(socket, "SCM_CREDENTIALS", 2)
_ANC_BYTES: Final = socket.CMSG_SPACE(UCRED.size)
_NAN: Final = math.nan


class MalformedDatagram(ValueError):
    """A datagram that is not a valid SDK message."""


@dataclass(slots=True)
class RankRegistration:
    """What the agent knows about one rank of a job: who the kernel says sent it, and when."""

    pid: int
    uid: int
    world_size: int
    local_rank: int
    info: dict[str, str] = field(default_factory=dict)
    last_seen: int = 0  # unix ns of the newest datagram from this rank


_EXPECTED_FIELDS: Final = (
    "ts_unix_ns", "job_id", "rank", "local_rank", "world_size", "pid", "uid", "step",
    "loss", "grad_norm", "lr", "tokens", "extra", "kind", "info",
)  # fmt: skip
# Positional construction is ~4x cheaper than keywords; use it only while the field order holds.
_POSITIONAL: Final = tuple(f.name for f in fields(TrainRecord)) == _EXPECTED_FIELDS


def _record(
    ts: int, job_id: str, ids: tuple[int, int, int, int, int], body: tuple[int, float, float, float, float], kind: str
) -> TrainRecord:
    rank, local_rank, world_size, pid, uid = ids
    step, loss, grad_norm, lr, tokens = body
    if _POSITIONAL:
        return TrainRecord(
            ts, job_id, rank, local_rank, world_size, pid, uid, step, loss, grad_norm, lr, tokens, {}, kind, {}
        )
    return TrainRecord(
        ts_unix_ns=ts, job_id=job_id, rank=rank, local_rank=local_rank, world_size=world_size, pid=pid,
        uid=uid, step=step, loss=loss, grad_norm=grad_norm, lr=lr, tokens=tokens, kind=kind,
    )  # fmt: skip


def parse_datagram(data: bytes | memoryview, pid: int, uid: int, recv_ns: int) -> list[TrainRecord]:
    """Decode one SDK datagram (one or more records); pid/uid are the kernel's.

    Raises MalformedDatagram; then no record of the datagram is kept.
    """
    try:
        n = len(data)
        if n < HEADER.size:
            raise MalformedDatagram("short header")
        magic, version, kind, rank, local_rank, world_size, job_len = HEADER.unpack_from(data, 0)
        if magic != MAGIC or version != VERSION or kind not in KIND_NAMES:
            raise MalformedDatagram("bad magic, version or kind")
        at = HEADER.size + job_len
        if n < at + RECORD.size:
            raise MalformedDatagram("no record")
        job_id = bytes(data[HEADER.size : at]).decode("utf-8")
        ids = (rank, local_rank, world_size, pid, uid)
        kind_name = KIND_NAMES[kind]
        if kind == KIND_INIT:  # one record, then JSON info to the end
            size, ts, *body = RECORD.unpack_from(data, at)
            if size != RECORD.size:
                raise MalformedDatagram("bad init record")
            rec = _record(ts if ts > 0 else recv_ns, job_id, ids, tuple(body), kind_name)  # type: ignore[arg-type]
            if n > at + size:
                rec.info = _parse_info(bytes(data[at + size : n]))
            return [rec]
        rsize = RECORD.size
        if (n - at) % rsize == 0:  # common case: no extras anywhere, fixed-size records
            rows = list(RECORD.iter_unpack(data[at:n]))
            if all(row[0] == rsize for row in rows):
                return [_record(row[1] if row[1] > 0 else recv_ns, job_id, ids, row[2:], kind_name) for row in rows]
        out = []
        while at < n:
            size, ts, *body = RECORD.unpack_from(data, at)
            if size < rsize or at + size > n:
                raise MalformedDatagram("bad record length")
            rec = _record(ts if ts > 0 else recv_ns, job_id, ids, tuple(body), kind_name)  # type: ignore[arg-type]
            if size > rsize:
                rec.extra = _parse_extras(data, at + rsize, at + size)
            out.append(rec)
            at += size
        return out
    except MalformedDatagram:
        raise
    except (struct.error, UnicodeDecodeError, ValueError, IndexError) as exc:
        raise MalformedDatagram(str(exc)) from exc


def _parse_extras(data: bytes | memoryview, at: int, end: int) -> dict[str, float]:
    count = data[at]
    at += 1
    names = []
    for _ in range(count):
        if at >= end:
            raise MalformedDatagram("extra name past end")
        size = data[at]
        at += 1
        if at + size > end:
            raise MalformedDatagram("extra name past end")
        names.append(bytes(data[at : at + size]).decode("utf-8"))
        at += size
    if end - at != 8 * count or len(set(names)) != count:
        raise MalformedDatagram("extra values do not match names")
    return dict(zip(names, struct.unpack_from(f"<{count}d", data, at), strict=True))


def _parse_info(raw: bytes) -> dict[str, str]:
    obj = json.loads(raw.decode("utf-8"))
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in obj.items()):
        raise MalformedDatagram("info is not a JSON object of strings")
    return obj


class TrainingReceiver:
    """The agent's end of the SDK socket: bind, receive with kernel credentials, parse, bound.

    The socket's directory is created 0o755 when missing (an existing one is left alone) and
    the socket is chmod'ed to `socket_mode`, 0o666 by default: any local user's training job
    may report, which is safe because identity comes from the kernel, not the payload. Pass
    0o660 (and chown to a group) to restrict senders.

    A socket file left behind by a crashed agent (connect() is refused) is unlinked before the
    bind; a live one (another receiver answers) raises OSError(EADDRINUSE) naming the path, and a
    file that is not a socket raises FileExistsError: neither is ever replaced.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        socket_mode: int = 0o666,
        dir_mode: int = 0o755,
        rcvbuf: int = RCVBUF_BYTES,
        max_per_drain: int = DEFAULT_MAX_PER_DRAIN,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
        max_ranks: int = DEFAULT_MAX_RANKS,
        poll_interval_s: float = 0.002,
        idle_after_s: float = 0.05,
        background: bool = True,
    ) -> None:
        self.socket_path = socket_path or default_socket_path(for_agent=True)
        self.max_per_drain = max_per_drain
        self.max_buffered = max_buffered
        self.max_ranks = max_ranks
        self.poll_interval_s = poll_interval_s
        self.idle_after_s = idle_after_s
        self.received = 0
        self._dropped = 0
        self._buffer: collections.deque[TrainRecord] = collections.deque()
        self._jobs: dict[str, dict[int, RankRegistration]] = {}
        self._n_ranks = 0
        self._recv_buf = bytearray(RECV_BYTES)
        self._recv_view = memoryview(self._recv_buf)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False

        parent = os.path.dirname(self.socket_path) or "."
        os.makedirs(parent, mode=dir_mode, exist_ok=True)
        _remove_stale_socket(self.socket_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, _SO_PASSCRED, 1)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.bind(self.socket_path)
            os.chmod(self.socket_path, socket_mode)
            self._inode = os.stat(self.socket_path).st_ino
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        if background:
            self.start()

    # ---- wiring ----
    def fileno(self) -> int:
        """For `loop.add_reader(rx.fileno(), rx.pump)`."""
        return self._sock.fileno()

    @property
    def dropped(self) -> int:
        """Datagrams that were malformed, had no kernel credentials, or overflowed the buffer."""
        return self._dropped

    def start(self) -> None:
        """Keep the kernel queue empty from a daemon thread (every `poll_interval_s` while busy).

        Called by the constructor unless `background=False`. Preferred over `add_reader`: an
        event-driven reader is woken per datagram, which costs each training-loop send() the
        wakeup.
        """
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="gpusoc-sdk-rx", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # While records flow, read on a timer instead of sleeping in poll(): a receiver that
        # waits on the socket makes every sender's send() pay for waking it (measured ~14 us
        # instead of ~4 us on a 2-vCPU VM). After `idle_after_s` without data, block in poll()
        # again, so senders slower than that pay the wakeup (negligible at their rate) and an
        # idle agent does not tick.
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        active = False
        last_data = 0.0
        while not self._stop.is_set():
            try:
                if active:
                    self._stop.wait(self.poll_interval_s)
                    if self.pump():
                        last_data = time.monotonic()
                    elif time.monotonic() - last_data > self.idle_after_s:
                        active = False
                elif poller.poll(100) and self.pump():
                    active, last_data = True, time.monotonic()
            except (OSError, ValueError):
                if self._closed:
                    return
                time.sleep(0.1)

    def close(self) -> None:
        """Stop, close and unlink the socket (only if it is still the one we bound)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        with self._lock:
            self._sock.close()
        with contextlib.suppress(OSError):
            if os.stat(self.socket_path).st_ino == self._inode:
                os.unlink(self.socket_path)

    def __enter__(self) -> TrainingReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- data ----
    def pump(self, limit: int | None = None) -> int:
        """Move pending datagrams from the kernel queue into the buffer; returns how many read."""
        limit = self.max_per_drain if limit is None else limit
        n = 0
        with self._lock:
            if self._closed:
                return 0
            sock, buf, view = self._sock, self._recv_buf, self._recv_view
            while n < limit:
                try:
                    nbytes, anc, flags, _addr = sock.recvmsg_into([buf], _ANC_BYTES, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                        break
                    raise
                n += 1
                self._accept(view[:nbytes], anc, flags)
        return n

    def _accept(self, data: memoryview, anc: list[tuple[int, int, bytes]], flags: int) -> None:
        recv_ns = time.time_ns()
        self.received += 1
        creds = None
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == _SCM_CREDENTIALS and len(payload) >= UCRED.size:
                creds = UCRED.unpack_from(payload)
        if creds is None or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            self._dropped += 1
            return
        pid, uid, _gid = creds
        try:
            records = parse_datagram(data, pid, uid, recv_ns)
        except MalformedDatagram:
            self._dropped += 1
            return
        if len(self._buffer) + len(records) > self.max_buffered:
            self._dropped += 1
            return
        self._buffer.extend(records)
        self._register(records[-1], recv_ns)

    def drain(self) -> list[TrainRecord]:
        """Records received since the last call (init registrations included), oldest first.

        Non-blocking; reads what is queued in the kernel too. Returns at most `max_per_drain`
        records; the rest stay buffered for the next call.
        """
        self.pump()
        out: list[TrainRecord] = []
        buf = self._buffer
        while buf and len(out) < self.max_per_drain:
            out.append(buf.popleft())
        return out

    # ---- registrations ----
    def _register(self, rec: TrainRecord, now_ns: int) -> None:
        ranks = self._jobs.get(rec.job_id)
        if ranks is None:
            ranks = self._jobs[rec.job_id] = {}
        reg = ranks.get(rec.rank)
        if reg is None:
            if self._n_ranks >= self.max_ranks:
                self._evict_oldest_job(keep=rec.job_id)
            reg = ranks[rec.rank] = RankRegistration(rec.pid, rec.uid, rec.world_size, rec.local_rank)
            self._n_ranks += 1
        reg.pid, reg.uid = rec.pid, rec.uid
        reg.world_size, reg.local_rank = rec.world_size, rec.local_rank
        reg.last_seen = now_ns
        if rec.kind == "init":
            reg.info = dict(rec.info)

    def _evict_oldest_job(self, keep: str) -> None:
        candidates = [
            (max(r.last_seen for r in ranks.values()), job)
            for job, ranks in self._jobs.items()
            if job != keep and ranks
        ]
        if not candidates:
            return
        _, victim = min(candidates)
        self._n_ranks -= len(self._jobs.pop(victim))

    def jobs(self) -> dict[str, dict[int, RankRegistration]]:
        """job_id -> rank -> registration (copies), so the agent can map pids to jobs."""
        with self._lock:
            return {
                job: {rank: replace(reg, info=dict(reg.info)) for rank, reg in ranks.items()}
                for job, ranks in self._jobs.items()
            }

    def prune(self, max_idle_s: float) -> int:
        """Forget ranks silent for longer than `max_idle_s`; returns how many were dropped."""
        cutoff = time.time_ns() - int(max_idle_s * 1e9)
        removed = 0
        with self._lock:
            for job in list(self._jobs):
                ranks = self._jobs[job]
                for rank in [r for r, reg in ranks.items() if reg.last_seen < cutoff]:
                    del ranks[rank]
                    removed += 1
                if not ranks:
                    del self._jobs[job]
            self._n_ranks -= removed
        return removed


def _remove_stale_socket(path: str) -> None:
    """Unlink a socket no one listens on; refuse to replace a live agent or a non-socket file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "not a socket, refusing to replace it", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError:
        return  # vanished or unreadable: bind() will report what is wrong
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"training socket {path} is in use: another receiver (a running agent?) is "
                  "bound to it; stop it or give this agent its own --training-socket", path)
