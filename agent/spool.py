"""Durable agent spool: FrameBuffer's interface over checksummed segment files on disk.

Why: a memory-only buffer loses every frame no console has stored when the agent restarts
(upgrade, OOM kill, host reboot), and with them the security events in those frames. The
spool keeps them on disk under `<state_dir>/spool/`, keeps its epoch across restarts, and
resumes numbering where it stopped, so a console resumes from its stored (epoch, seq) as if
nothing happened. docs/reliability.md describes the format and the guarantees.

Layout:
    epoch                         the epoch id (32 hex + newline), replaced atomically
    host                          the host name the spool holds frames of (+ newline), replaced atomically
    seg-<first seq, 20 digits>.log segments of about `segment_bytes`, oldest first
    prio.log                      security/control frames rescued from force-evicted segments

A segment is a 52-byte header (magic, epoch, first seq, CRC32) and then records; a record is
`<IIQQB` (payload length, CRC32, seq, append wall time in ns, flags) and the encoded frame.
The CRC (zlib CRC-32) covers length, seq, time, flags and payload. On open every segment is
scanned; the first record that is short, fails its CRC or breaks seq continuity ends the
segment and the file is truncated there (a torn tail).

Durability: a frame is fdatasync'ed *before* any subscriber can see it ("durable before
visible"), so a power cut can only take back frames that no console has received; their seq
numbers are then reused for new frames without any console ever holding two versions. With
`fsync=False` (tests, tmpfs) frames are visible at once and a power cut may lose the last
few seconds of dirty pages; a kill -9 of the agent loses nothing written in either mode.

Bounds and priority: `max_bytes` and `max_age_s` are the soft bounds and apply only to data a
console has acknowledged as durably stored (`acknowledge(epoch, seq)`, from the console's
`x-gpusoc-durable` metadata). Unacknowledged data is dropped only when the spool exceeds the
hard bound `hard_max_bytes` (default 2 x max_bytes): then the oldest whole segments go, but
their frames holding security/control events (`PRIORITY_KINDS`) are first copied to prio.log
under their original seq, so security events outlive every metric frame around them. Only
when nothing but the active segment and prio.log is left are the oldest prio frames dropped.
Every dropped range reaches subscribers as a Gap with reason "evicted".

Host: the spool belongs to one host name (`host=`, the agent's identity), not to the machine.
Its frames carry that name, and a console rejects frames whose host differs from the agent's
certified identity, so a spool opened under another name must not be replayed. On open, when
the `host` file names another host, the whole spool directory is renamed aside to
`<dir>.<old host>.<UTC time>` in the same parent (kept, never deleted: an operator may still
serve or inspect it) with a warning naming both hosts and the kept path, and a fresh spool with
a new epoch starts in its place. A spool without a `host` file (written by an older version)
adopts the current host, unless its newest frame names another host: then it is moved aside the
same way. `host=None` (tests, tools) skips the check and leaves the file alone.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import logging
import os
import re
import struct
import time
import zlib
from array import array
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from google.protobuf.message import DecodeError

from agent.buffer import FrameBuffer, StreamItem, new_epoch
from protos.types import Gap
from protos.v1 import telemetry_pb2

log = logging.getLogger("gpusoc.agent.spool")

MIB: Final = 1024 * 1024
SEGMENT_MAGIC: Final = b"GSPOOL1\n"
PRIO_FIRST_SEQ: Final = 0  # prio.log's header carries first seq 0: its seqs are sparse
_SEG_HEADER: Final = struct.Struct("<8s32sQI")  # magic, epoch (ascii hex), first seq, CRC32 of the rest
_REC_HEADER: Final = struct.Struct("<IIQQB")  # payload length, CRC32, seq, ts ns, flags
_REC_BODY: Final = struct.Struct("<IQQB")  # what the CRC covers before the payload
FLAG_PRIORITY: Final = 1
MAX_RECORD_BYTES: Final = 64 * MIB  # a longer length field is corruption, not a frame
_SEG_NAME: Final = re.compile(r"^seg-(\d{20})\.log$")
_EPOCH_RE: Final = re.compile(r"^[0-9a-f]{32}$")
EPOCH_FILE: Final = "epoch"
HOST_FILE: Final = "host"
PRIO_FILE: Final = "prio.log"

#: Event kinds that make a frame a priority (security/control) frame.
PRIORITY_KINDS: Final = frozenset(
    {"file_changed", "file_added", "file_removed", "record_mismatch", "xid", "gpu_lost"}
)
PRIORITY_PREFIXES: Final = ("command_",)
# Cheap pre-filter: a frame holding none of these byte strings cannot hold a priority event.
_PRIORITY_TOKENS: Final = (b"command_", b"file_", b"record_mismatch", b"xid", b"gpu_lost")


class SpoolError(OSError):
    """The spool directory cannot be used at all (not creatable, not writable)."""


def is_priority_kind(kind: str) -> bool:
    return kind in PRIORITY_KINDS or kind.startswith(PRIORITY_PREFIXES)


def is_priority_frame(frame_bytes: bytes) -> bool:
    """True when the encoded frame holds a security/control event (parsed only if a token matches)."""
    if not any(t in frame_bytes for t in _PRIORITY_TOKENS):
        return False
    msg = telemetry_pb2.Frame()
    try:
        msg.ParseFromString(frame_bytes)
    except DecodeError:
        return True  # cannot tell: keeping it longer is the safe mistake
    return any(is_priority_kind(e.kind) for e in msg.events)


def _segment_header(epoch: str, first_seq: int) -> bytes:
    head = SEGMENT_MAGIC + epoch.encode("ascii") + struct.pack("<Q", first_seq)
    return head + struct.pack("<I", zlib.crc32(head))


def _parse_segment_header(data: bytes) -> tuple[str, int] | None:
    if len(data) < _SEG_HEADER.size:
        return None
    magic, epoch_b, first, crc = _SEG_HEADER.unpack_from(data)
    if magic != SEGMENT_MAGIC or zlib.crc32(data[: _SEG_HEADER.size - 4]) != crc:
        return None
    try:
        epoch = epoch_b.decode("ascii")
    except UnicodeDecodeError:
        return None
    return (epoch, int(first)) if _EPOCH_RE.match(epoch) else None


def encode_record(seq: int, ts_ns: int, flags: int, payload: bytes) -> bytes:
    """One spool record: header with CRC32 over length, seq, time, flags and payload."""
    body = _REC_BODY.pack(len(payload), seq, ts_ns, flags)
    crc = zlib.crc32(payload, zlib.crc32(body))
    return _REC_HEADER.pack(len(payload), crc, seq, ts_ns, flags) + payload


def _check_record(data: bytes | memoryview, off: int) -> tuple[int, int, int, int] | None:
    """(seq, ts_ns, flags, payload length) of the valid record at `off`, or None."""
    if off + _REC_HEADER.size > len(data):
        return None
    length, crc, seq, ts, flags = _REC_HEADER.unpack_from(data, off)
    if length > MAX_RECORD_BYTES or off + _REC_HEADER.size + length > len(data):
        return None
    body = _REC_BODY.pack(length, seq, ts, flags)
    start = off + _REC_HEADER.size
    if zlib.crc32(data[start : start + length], zlib.crc32(body)) != crc:
        return None
    return int(seq), int(ts), int(flags), int(length)


@dataclass(slots=True)
class _Index:
    """Where each record of one file lives; `seqs` is only kept for prio.log (sparse seqs)."""

    offsets: array[int] = field(default_factory=lambda: array("Q"))
    lengths: array[int] = field(default_factory=lambda: array("I"))
    flags: bytearray = field(default_factory=bytearray)
    seqs: array[int] = field(default_factory=lambda: array("Q"))

    def add(self, off: int, length: int, flags: int, seq: int, sparse: bool) -> None:
        self.offsets.append(off)
        self.lengths.append(length)
        self.flags.append(flags)
        if sparse:
            self.seqs.append(seq)


@dataclass(slots=True, eq=False)
class _Segment:
    path: Path
    first_seq: int
    fd: int
    size: int
    index: _Index = field(default_factory=_Index)
    last_ts_ns: int = 0

    @property
    def count(self) -> int:
        return len(self.index.offsets)

    @property
    def end_seq(self) -> int:
        """One past the last seq held."""
        return self.first_seq + len(self.index.offsets)


@dataclass(slots=True)
class _ScanResult:
    index: _Index
    valid_end: int
    last_ts_ns: int
    last_seq: int


def _scan(data: bytes, first_seq: int, sparse: bool) -> _ScanResult:
    """Records from the header on, stopping at the first invalid or out-of-order one."""
    idx = _Index()
    off = _SEG_HEADER.size
    expect = first_seq
    last_ts = 0
    last_seq = first_seq - 1 if not sparse else 0
    view = memoryview(data)
    while True:
        rec = _check_record(view, off)
        if rec is None:
            break
        seq, ts, flags, length = rec
        if (not sparse and seq != expect) or (sparse and seq <= last_seq):
            break
        idx.add(off, length, flags, seq, sparse)
        off += _REC_HEADER.size + length
        expect = seq + 1
        last_seq = seq
        last_ts = ts
    return _ScanResult(idx, off, last_ts, last_seq)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_file(directory: Path, name: str, data: bytes, sync_dir: bool = True) -> None:
    """Atomically replace a small state file (epoch, host): write a temp file, fsync, rename."""
    tmp = directory / (name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _pwrite_all(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, directory / name)
    if sync_dir:
        _fsync_dir(directory)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    return os.pread(fd, n, offset)


def kept_aside(directory: Path) -> list[tuple[Path, int]]:
    """Spools moved aside after a host change next to `directory`, with their size in bytes.

    The agent never deletes them (they may hold another host's unstored frames); it names them at
    every start so they are not forgotten.
    """
    out = []
    try:
        siblings = sorted(directory.parent.glob(f"{directory.name}.*"))
    except OSError:
        return []
    for path in siblings:
        if not path.is_dir() or path.is_symlink():
            continue
        size = 0
        with contextlib.suppress(OSError):
            size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        out.append((path, size))
    return out


class SpoolBuffer(FrameBuffer):
    """FrameBuffer's public interface (epoch, seqs, append, start_cursor, stream) on disk.

    It subclasses FrameBuffer only so `AgentRuntime` and `agent.serve` take it unchanged; no
    state of the in-memory buffer is used. Appends and reads happen on one asyncio loop;
    fdatasync runs in the loop's default executor so a slow disk never stalls the loop.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int = 64 * MIB,
        max_age_s: float = 3600.0,
        hard_max_bytes: int | None = None,
        segment_bytes: int = 4 * MIB,
        cache_bytes: int = 8 * MIB,
        fsync: bool = True,
        host: str | None = None,
    ) -> None:
        if max_bytes < 1 or segment_bytes < 1 or max_age_s < 0:
            raise ValueError("spool bounds must be positive")
        self.directory = Path(directory)
        self.max_bytes = int(max_bytes)
        self.hard_max_bytes = int(hard_max_bytes if hard_max_bytes is not None else 2 * max_bytes)
        if self.hard_max_bytes < self.max_bytes:
            raise ValueError("hard_max_bytes must be >= max_bytes")
        self.max_frames = 0  # FrameBuffer's count bound does not apply (bytes and age do)
        self.max_age_ns = int(max_age_s * 1e9)
        # Segments small enough that dropping one whole segment is a small step of the bound.
        self.segment_bytes = max(4096, min(int(segment_bytes), self.max_bytes // 4 or 1))
        self.cache_bytes = int(cache_bytes)
        self.fsync = fsync
        self.evicted = 0
        self.rescued = 0  # priority frames copied to prio.log on a forced eviction
        self.truncated_bytes = 0  # torn/corrupt bytes cut off when opening
        self.reset_reason = ""  # why a new epoch was started, "" when the old one was kept
        self.host = host  # whose frames the spool holds; None = not checked
        self.moved_aside: Path | None = None  # where another host's spool was moved on open
        self._acked = 0
        self._changed = asyncio.Condition()
        self._segments: list[_Segment] = []
        self._firsts: list[int] = []
        self._prio_fd = -1
        self._prio_size = 0
        self._prio = _Index()
        self._disk_bytes = 0
        self._cache: deque[bytes] = deque()
        self._cache_first = 1
        self._cache_bytes = 0
        self._next = 1
        self._visible = 1  # frames below this seq are durable and may be streamed
        self._closed = False
        self._lock_fd: int | None = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._take_lock()
            why = self._claim_host() if host is not None else ""
            if why:
                self._reset(why)
            else:
                self._open()
        except OSError as exc:
            self._close_fds()
            self._release_lock()
            if isinstance(exc, SpoolError):
                raise
            raise SpoolError(exc.errno, f"spool {self.directory}: {exc.strerror or exc}") from exc

    def _take_lock(self) -> None:
        """One agent per spool: a second one (same state_dir) would interleave seqs and corrupt it."""
        import fcntl

        fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            # POSIX record lock: held per process, so one agent reopening its own spool is fine
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise SpoolError(errno.EBUSY, f"spool {self.directory} is in use by another agent (pid {holder}); "
                             "give each agent its own state_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    # ------------------------------------------------------------------ host

    def _claim_host(self) -> str:
        """Make the spool this host's; returns why a fresh epoch is needed ("" = open as usual).

        Called with the lock held, before anything of the spool is read for replay.
        """
        host = self.host
        assert host is not None
        recorded = self._read_host()
        if recorded is None:
            frame_host = self._newest_frame_host()  # a spool from before the host file
            if frame_host is None or frame_host == host:
                self._write_host()
                return ""
            recorded = frame_host
        elif recorded == host:
            return ""
        aside = self._move_aside(recorded)
        self.moved_aside = aside
        log.warning("spool %s held frames of host %r, but this agent is %r: that spool is kept in %s "
                    "(not replayed) and a new one starts. If %r was the right name, stop the agent, move %s "
                    "back to %s and start it with --host %s; otherwise delete %s once no console needs it",
                    self.directory, recorded, host, aside, recorded, aside, self.directory, recorded, aside)
        self._write_host()
        return f"host changed from {recorded!r} to {host!r}; old spool kept in {aside}"

    def _read_host(self) -> str | None:
        """The recorded host; None when there is no host file, "" when it is unreadable."""
        try:
            raw = (self.directory / HOST_FILE).read_bytes()
        except FileNotFoundError:
            return None
        try:
            return raw.decode("utf-8").removesuffix("\n")
        except UnicodeDecodeError:
            return ""

    def _write_host(self) -> None:
        assert self.host is not None
        _replace_file(self.directory, HOST_FILE, (self.host + "\n").encode("utf-8"))

    def _newest_frame_host(self) -> str | None:
        """The `host` field of the newest intact frame in the segments, None if there is none."""
        d = self.directory
        names = sorted(((int(m.group(1)), p) for p in d.iterdir() if (m := _SEG_NAME.match(p.name))), reverse=True)
        for first, path in names[:3]:  # the active segment may be empty after a roll
            try:
                data = path.read_bytes()
            except OSError:
                continue
            head = _parse_segment_header(data)
            if head is None or head[1] != first:
                continue
            scan = _scan(data, first, sparse=False)
            if not len(scan.index.offsets):
                continue
            start = int(scan.index.offsets[-1]) + _REC_HEADER.size
            msg = telemetry_pb2.Frame()
            try:
                msg.ParseFromString(data[start : start + int(scan.index.lengths[-1])])
            except DecodeError:
                return None
            return msg.host or None
        return None

    def _move_aside(self, old_host: str) -> Path:
        """Rename the spool directory to `<name>.<old host>.<UTC time>` and reopen an empty one locked."""
        d = self.directory
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", old_host)[:64].strip(".") or "unknown"
        stem = f"{d.name}.{safe}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        target = d.parent / stem
        n = 1
        while target.exists():
            target = d.parent / f"{stem}.{n}"
            n += 1
        try:
            os.rename(d, target)
        except OSError as exc:
            raise SpoolError(exc.errno or errno.EIO,
                             f"spool {d} holds frames of host {old_host!r}, not {self.host!r}, and could not be "
                             f"moved aside to {target}: {exc.strerror or exc}; move or remove it") from exc
        old_lock, self._lock_fd = self._lock_fd, None
        try:
            d.mkdir(mode=0o700, exist_ok=True)
            self._take_lock()
        finally:
            if old_lock is not None:
                with contextlib.suppress(OSError):
                    os.close(old_lock)
        _fsync_dir(d.parent)
        return target

    def _release_lock(self) -> None:
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    # ------------------------------------------------------------------ FrameBuffer interface

    @property
    def next_seq(self) -> int:
        return self._next

    @property
    def oldest_seq(self) -> int:
        """Oldest seq held (== next_seq when empty); prio frames may sit below the segments."""
        first = self._segments[0].first_seq
        if len(self._prio.seqs):
            return min(first, int(self._prio.seqs[0]))
        return first

    @property
    def newest_seq(self) -> int:
        return self._next - 1

    @property
    def nbytes(self) -> int:
        """Bytes on disk: segments (headers included) and prio.log."""
        return self._disk_bytes

    @property
    def acked_seq(self) -> int:
        """Highest seq of this epoch a console said it stored durably (0 = none yet)."""
        return self._acked

    @property
    def visible_seq(self) -> int:
        """Highest seq subscribers may receive (durable on disk)."""
        return self._visible - 1

    def __len__(self) -> int:
        return sum(s.count for s in self._segments) + len(self._prio.seqs)

    async def append(self, seq: int, frame_bytes: bytes) -> None:
        """Write the frame numbered `seq` (must be next_seq), make it durable, wake subscribers."""
        self._write(seq, frame_bytes)
        if self.fsync:
            target, fd = self._next, self._segments[-1].fd
            await asyncio.get_running_loop().run_in_executor(None, os.fdatasync, fd)
            self._visible = max(self._visible, target)
        else:
            self._visible = self._next
        self._enforce_bounds()
        async with self._changed:
            self._changed.notify_all()

    def append_nowait(self, seq: int, frame_bytes: bytes) -> None:
        """Like append, syncing inline (for callers without a loop); does not wake subscribers."""
        self._write(seq, frame_bytes)
        if self.fsync:
            os.fdatasync(self._segments[-1].fd)
        self._visible = self._next
        self._enforce_bounds()

    def start_cursor(self, epoch: str, after_seq: int, from_now: bool) -> tuple[int, list[Gap]]:
        """Where a subscription starts; evicted ranges below it come out of `stream` as gaps.

        Raises ValueError for a position this epoch never produced.
        """
        gaps: list[Gap] = []
        if from_now:
            return self._visible, gaps
        if epoch == self.epoch:
            if after_seq > self.newest_seq:
                raise ValueError(
                    f"after_seq {after_seq} is beyond the newest seq {self.newest_seq} of epoch {epoch}"
                )
            return max(after_seq + 1, 1), gaps
        if epoch:
            gaps.append(Gap(epoch, after_seq + 1, 0, "epoch_changed", time.time_ns()))
        return 1, gaps

    async def stream(self, cursor: int) -> AsyncIterator[StreamItem]:
        """Yield frames from `cursor` on, forever; a gap for every range no longer held."""
        while True:
            item, nxt = self._item_at(cursor)
            if item is not None:
                cursor = nxt
                yield item
                continue
            async with self._changed:
                await self._changed.wait_for(lambda c=cursor: self._visible > c or self._closed)  # type: ignore[misc]
            if self._closed:
                return

    # ------------------------------------------------------------------ the durable-position protocol

    def acknowledge(self, epoch: str, seq: int) -> bool:
        """A console durably stored everything of `epoch` up to `seq`: that part may be evicted first.

        Positions of another epoch, or beyond what subscribers could have received, are
        ignored (False): a console cannot have stored what it was never sent.
        """
        if self._closed or epoch != self.epoch or seq < 1:
            return False
        if seq > self.visible_seq:
            log.warning("ignoring durable position %s:%d beyond the newest sent seq %d", epoch[:8], seq,
                        self.visible_seq)
            return False
        if seq > self._acked:
            self._acked = seq
            self._enforce_bounds()
        return True

    # ------------------------------------------------------------------ lifecycle

    def sync(self) -> None:
        """fdatasync the active segment and publish everything written (blocking)."""
        if self.fsync and self._segments:
            os.fdatasync(self._segments[-1].fd)
        self._visible = self._next

    def close(self) -> None:
        """Sync and close the files; subscribers' streams end."""
        if self._closed:
            return
        with contextlib.suppress(OSError):
            self.sync()
        self._closed = True
        self._close_fds()
        self._release_lock()

    async def aclose(self) -> None:
        """close() and wake subscribers so their streams return."""
        self.close()
        async with self._changed:
            self._changed.notify_all()

    def stats(self) -> dict[str, int]:
        return {
            "frames": len(self), "bytes": self._disk_bytes, "segments": len(self._segments),
            "prio_frames": len(self._prio.seqs), "oldest_seq": self.oldest_seq, "newest_seq": self.newest_seq,
            "acked_seq": self._acked, "evicted": self.evicted, "rescued": self.rescued,
            "truncated_bytes": self.truncated_bytes,
        }

    # ------------------------------------------------------------------ opening

    def _open(self) -> None:
        d = self.directory
        epoch = self._read_epoch()
        names = sorted((int(m.group(1)), p) for p in d.iterdir() if (m := _SEG_NAME.match(p.name)))
        if epoch is None or not names:
            why = "no spool yet" if epoch is None and not names else (
                "epoch file missing or unreadable" if epoch is None else "no segment files")
            self._reset(why)
            return
        self.epoch = epoch
        changed = False
        segments: list[_Segment] = []
        rescue: list[tuple[int, int, int, bytes]] = []  # frames of discarded segments worth keeping
        for i, (first, path) in enumerate(names):
            fd = os.open(path, os.O_RDWR)
            data = _read_all(fd)
            head = _parse_segment_header(data)
            last = i == len(names) - 1
            if head is None or head != (epoch, first):
                os.close(fd)
                log.warning("spool segment %s has a bad header: discarded", path.name)
                self.truncated_bytes += len(data)
                path.unlink()
                changed = True
                continue
            scan = _scan(data, first, sparse=False)
            if scan.valid_end < len(data):
                cut = len(data) - scan.valid_end
                log.warning("spool segment %s: %s tail of %d bytes truncated", path.name,
                            "torn" if last else "corrupt", cut)
                os.ftruncate(fd, scan.valid_end)
                self.truncated_bytes += cut
                changed = True
            seg = _Segment(path, first, fd, scan.valid_end, scan.index, scan.last_ts_ns)
            if segments and segments[-1].end_seq != first:
                # A hole (a corrupt or missing segment): keep the newest contiguous run, and the
                # security frames of what came before it.
                saved = [r for old in segments for r in _priority_records(old)]
                rescue.extend(saved)
                for old in segments:
                    self._discard_file(old)
                self.evicted += first - segments[0].first_seq - len(saved)
                self.rescued += len(saved)
                segments = []
                changed = True
            segments.append(seg)
        if not segments:
            self._reset("every segment was unreadable")
            return
        self._segments = segments
        self._firsts = [s.first_seq for s in segments]
        self._disk_bytes = sum(s.size for s in segments)
        self._open_prio(rescue)
        self._next = segments[-1].end_seq
        self._visible = self._next
        self._cache_first = self._next
        if changed:
            _fsync_dir(d)
        if self.fsync:
            os.fdatasync(segments[-1].fd)  # what a crashed agent left in the page cache
        if self.evicted:
            log.warning("spool %s: %d frames lost to corruption (reported as evicted)", d, self.evicted)
        log.info("spool %s: epoch %s, seqs %d..%d, %d bytes (%d prio frames) kept across restart",
                 d, self.epoch[:8], self.oldest_seq, self.newest_seq, self._disk_bytes, len(self._prio.seqs))

    def _read_epoch(self) -> str | None:
        try:
            text = (self.directory / EPOCH_FILE).read_text("ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return text if _EPOCH_RE.match(text) else None

    def _reset(self, why: str) -> None:
        """Start a new epoch: nothing of an old one can be trusted or continued."""
        d = self.directory
        for p in d.iterdir():
            if _SEG_NAME.match(p.name) or p.name in (PRIO_FILE, EPOCH_FILE) or p.name.endswith(".tmp"):
                p.unlink()
        self.epoch = new_epoch()
        _replace_file(d, EPOCH_FILE, (self.epoch + "\n").encode("ascii"), sync_dir=False)
        self._segments = []
        self._firsts = []
        self._disk_bytes = 0
        self._new_segment(1)
        self._open_prio([])
        self._next = self._visible = self._cache_first = 1
        _fsync_dir(d)
        self.reset_reason = why
        log.info("spool %s: new epoch %s (%s)", d, self.epoch[:8], why)

    def _open_prio(self, rescue: list[tuple[int, int, int, bytes]]) -> None:
        path = self.directory / PRIO_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        data = _read_all(fd)
        head = _parse_segment_header(data)
        if head != (self.epoch, PRIO_FIRST_SEQ):
            if data:
                log.warning("spool %s: bad header, %d bytes discarded", PRIO_FILE, len(data))
                self.truncated_bytes += len(data)
            os.ftruncate(fd, 0)
            header = _segment_header(self.epoch, PRIO_FIRST_SEQ)
            _pwrite_all(fd, header, 0)
            self._prio, self._prio_size = _Index(), len(header)
        else:
            scan = _scan(data, 1, sparse=True)
            if scan.valid_end < len(data):
                log.warning("spool %s: torn tail of %d bytes truncated", PRIO_FILE, len(data) - scan.valid_end)
                self.truncated_bytes += len(data) - scan.valid_end
                os.ftruncate(fd, scan.valid_end)
            self._prio, self._prio_size = scan.index, scan.valid_end
        self._prio_fd = fd
        self._disk_bytes += self._prio_size
        main_first = self._segments[0].first_seq if self._segments else 1
        if len(self._prio.seqs) and self._prio.seqs[-1] >= main_first:
            # Never expected (prio frames come from below the segments); keep the invariant anyway.
            self._rewrite_prio([s for s in self._prio.seqs if s < main_first])
        if rescue:
            self._append_prio(sorted(r for r in rescue if r[0] < main_first))
        if self.fsync:
            os.fdatasync(fd)

    # ------------------------------------------------------------------ writing

    def _write(self, seq: int, frame_bytes: bytes) -> None:
        if self._closed:
            raise ValueError("spool is closed")
        if seq != self._next:
            raise ValueError(f"frame seq {seq} is not the next seq {self._next}")
        flags = FLAG_PRIORITY if is_priority_frame(frame_bytes) else 0
        ts = time.time_ns()
        rec = encode_record(seq, ts, flags, frame_bytes)
        seg = self._segments[-1]
        if seg.count and seg.size + len(rec) > self.segment_bytes:
            seg = self._roll()
        while True:
            try:
                _pwrite_all(seg.fd, rec, seg.size)
                break
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.ftruncate(seg.fd, seg.size)
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or len(self._segments) < 2:
                    raise
                log.error("spool disk full: dropping the oldest segment to keep writing")
                self._drop_oldest(rescue=True)
        seg.index.add(seg.size, len(frame_bytes), flags, seq, sparse=False)
        seg.size += len(rec)
        seg.last_ts_ns = ts
        self._disk_bytes += len(rec)
        self._next += 1
        self._cache.append(frame_bytes)
        self._cache_bytes += len(frame_bytes)
        while self._cache_bytes > self.cache_bytes and len(self._cache) > 1:
            self._cache_bytes -= len(self._cache.popleft())
            self._cache_first += 1

    def _roll(self) -> _Segment:
        """Seal the active segment (fdatasync) and start the next one."""
        old = self._segments[-1]
        if self.fsync:
            os.fdatasync(old.fd)
        return self._new_segment(self._next)

    def _new_segment(self, first_seq: int) -> _Segment:
        path = self.directory / f"seg-{first_seq:020d}.log"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        header = _segment_header(self.epoch, first_seq)
        try:
            _pwrite_all(fd, header, 0)
            if self.fsync:
                os.fdatasync(fd)
                _fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        seg = _Segment(path, first_seq, fd, len(header))
        self._segments.append(seg)
        self._firsts.append(first_seq)
        self._disk_bytes += len(header)
        return seg

    # ------------------------------------------------------------------ bounds

    def _enforce_bounds(self, now_ns: int | None = None) -> None:
        now = time.time_ns() if now_ns is None else now_ns
        while len(self._segments) > 1:
            old = self._segments[0]
            delivered = old.end_seq - 1 <= self._acked
            aged = self.max_age_ns > 0 and old.last_ts_ns < now - self.max_age_ns
            if delivered and (self._disk_bytes > self.max_bytes or aged):
                self._drop_oldest(rescue=False)
            elif self._disk_bytes > self.hard_max_bytes:
                self._drop_oldest(rescue=True)
            else:
                break
        prio = self._prio.seqs
        if len(prio) and prio[0] <= self._acked:
            self._rewrite_prio([s for s in prio if s > self._acked])
        if self._disk_bytes > self.hard_max_bytes and len(self._prio.seqs):
            # Nothing but the active segment is left: only now do security frames go, oldest first.
            excess = self._disk_bytes - self.hard_max_bytes
            n = freed = 0
            while n < len(self._prio.seqs) and freed < excess:
                freed += _REC_HEADER.size + self._prio.lengths[n]
                n += 1
            self.evicted += n
            log.error("spool over its hard bound with only security frames left: %d dropped", n)
            self._rewrite_prio(list(self._prio.seqs)[n:])

    def _drop_oldest(self, rescue: bool) -> None:
        """Delete the oldest segment; with `rescue`, first copy its undelivered priority frames."""
        old = self._segments[0]
        kept = 0
        if rescue:
            recs = [r for r in _priority_records(old) if r[0] > self._acked]
            if recs:
                try:
                    self._append_prio(recs)
                    kept = len(recs)
                except OSError as exc:
                    log.error("spool: could not rescue %d security frames: %s", len(recs), exc)
        lost = old.count - kept
        if old.end_seq - 1 > self._acked:
            log.warning("spool over its hard bound: dropping undelivered seqs %d..%d (%d security frames kept)",
                        max(old.first_seq, self._acked + 1), old.end_seq - 1, kept)
        self.evicted += lost
        self.rescued += kept
        self._discard_file(old)
        self._segments.pop(0)
        self._firsts.pop(0)

    def _discard_file(self, seg: _Segment) -> None:
        with contextlib.suppress(OSError):
            os.close(seg.fd)
        seg.path.unlink(missing_ok=True)
        if seg in self._segments:
            self._disk_bytes -= seg.size

    def _append_prio(self, recs: Iterable[tuple[int, int, int, bytes]]) -> None:
        off = self._prio_size
        out = bytearray()
        added: list[tuple[int, int, int]] = []
        last = int(self._prio.seqs[-1]) if len(self._prio.seqs) else 0
        for seq, ts, flags, payload in recs:
            if seq <= last:  # prio.log keeps seqs strictly increasing
                continue
            last = seq
            added.append((seq, off + len(out), len(payload)))
            out += encode_record(seq, ts, flags, payload)
        if not out:
            return
        _pwrite_all(self._prio_fd, bytes(out), off)
        if self.fsync:
            os.fdatasync(self._prio_fd)
        for seq, o, length in added:
            self._prio.add(o, length, FLAG_PRIORITY, seq, sparse=True)
        self._prio_size += len(out)
        self._disk_bytes += len(out)

    def _rewrite_prio(self, keep_seqs: Iterable[int]) -> None:
        """Replace prio.log by one holding only `keep_seqs` (atomic rename; it is small)."""
        keep = set(keep_seqs)
        recs: list[tuple[int, int, int, bytes]] = []
        for i, seq in enumerate(self._prio.seqs):
            if seq in keep:
                got = self._read_at(self._prio_fd, int(self._prio.offsets[i]), int(self._prio.lengths[i]), seq)
                if got is not None:
                    recs.append((seq, got[1], FLAG_PRIORITY, got[0]))
        path = self.directory / PRIO_FILE
        tmp = self.directory / (PRIO_FILE + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            header = _segment_header(self.epoch, PRIO_FIRST_SEQ)
            _pwrite_all(fd, header, 0)
            idx, off, out = _Index(), len(header), bytearray()
            for seq, ts, flags, payload in recs:
                idx.add(off + len(out), len(payload), flags, seq, sparse=True)
                out += encode_record(seq, ts, flags, payload)
            _pwrite_all(fd, bytes(out), off)
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)
        if self.fsync:
            _fsync_dir(self.directory)
        os.close(self._prio_fd)
        self._disk_bytes += off + len(out) - self._prio_size
        self._prio_fd, self._prio, self._prio_size = fd, idx, off + len(out)

    # ------------------------------------------------------------------ reading

    def _item_at(self, cursor: int) -> tuple[StreamItem | None, int]:
        """The stream item at `cursor` and the cursor after it; (None, cursor) = wait for more."""
        main_first = self._segments[0].first_seq
        if cursor < main_first:
            prio = self._prio.seqs
            i = bisect.bisect_left(prio, cursor)
            if i < len(prio) and prio[i] < main_first:
                p = int(prio[i])
                if p > cursor:
                    return self._gap(cursor, p - 1, "evicted"), p
                got = self._read_at(self._prio_fd, int(self._prio.offsets[i]), int(self._prio.lengths[i]), p)
                if got is None:
                    return self._gap(p, p, "corrupt"), p + 1
                return StreamItem(frame_bytes=got[0], seq=p), p + 1
            return self._gap(cursor, main_first - 1, "evicted"), main_first
        if cursor >= self._visible:
            return None, cursor
        data = self._read(cursor)
        if data is None:
            return self._gap(cursor, cursor, "corrupt"), cursor + 1
        return StreamItem(frame_bytes=data, seq=cursor), cursor + 1

    def _gap(self, first: int, last: int, reason: str) -> StreamItem:
        return StreamItem(gap=Gap(self.epoch, first, last, reason, time.time_ns()))

    def _read(self, seq: int) -> bytes | None:
        k = seq - self._cache_first
        if 0 <= k < len(self._cache):
            return self._cache[k]
        i = bisect.bisect_right(self._firsts, seq) - 1
        seg = self._segments[i]
        j = seq - seg.first_seq
        got = self._read_at(seg.fd, int(seg.index.offsets[j]), int(seg.index.lengths[j]), seq)
        if got is None:
            log.error("spool: record %d failed its checksum on read (disk corruption)", seq)
            return None
        return got[0]

    @staticmethod
    def _read_at(fd: int, off: int, length: int, seq: int) -> tuple[bytes, int] | None:
        """(payload, ts_ns) of the record at `off` if it is intact and is `seq`."""
        try:
            data = _pread_exact(fd, _REC_HEADER.size + length, off)
        except OSError:
            return None
        rec = _check_record(data, 0)
        if rec is None or rec[0] != seq or rec[3] != length:
            return None
        return data[_REC_HEADER.size :], rec[1]

    def _close_fds(self) -> None:
        for s in self._segments:
            with contextlib.suppress(OSError):
                os.close(s.fd)
        if self._prio_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._prio_fd)
            self._prio_fd = -1


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks: list[bytes] = []
    off = 0
    while off < size:
        chunk = os.pread(fd, size - off, off)
        if not chunk:
            break
        chunks.append(chunk)
        off += len(chunk)
    return b"".join(chunks)


def _priority_records(seg: _Segment) -> list[tuple[int, int, int, bytes]]:
    """(seq, ts_ns, flags, payload) of the intact priority frames of a segment."""
    out: list[tuple[int, int, int, bytes]] = []
    for j, flags in enumerate(seg.index.flags):
        if flags & FLAG_PRIORITY:
            seq = seg.first_seq + j
            got = SpoolBuffer._read_at(seg.fd, int(seg.index.offsets[j]), int(seg.index.lengths[j]), seq)
            if got is not None:
                out.append((seq, got[1], flags, got[0]))
    return out
