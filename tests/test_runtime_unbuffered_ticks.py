"""A tick whose frame cannot be buffered (disk full, I/O error) is reported, and loses no events or records."""

from __future__ import annotations

import asyncio

import pytest

from agent.buffer import FrameBuffer
from agent.collect.simulated import SimulatedCollector
from agent.runtime import AgentRuntime
from protos import serde
from protos.types import SEVERITY_WARNING, Event, TrainRecord


class FlakyBuffer(FrameBuffer):
    """Fails the next `fail` appends with ENOSPC, like a spool on a full disk with nothing to evict."""

    def __init__(self) -> None:
        super().__init__(max_frames=100)
        self.fail = 0

    async def append(self, seq: int, frame_bytes: bytes) -> None:
        if self.fail:
            self.fail -= 1
            raise OSError(28, "No space left on device")
        await super().append(seq, frame_bytes)


class Records:
    dropped = 0

    def __init__(self) -> None:
        self.step = 0

    def drain(self) -> list[TrainRecord]:
        self.step += 1
        return [TrainRecord(self.step, "job", 0, 0, 1, 100, 1000, self.step, loss=1.0)]


def test_unbuffered_ticks_are_reported_and_their_content_carried() -> None:
    async def run() -> None:
        buf = FlakyBuffer()
        rt = AgentRuntime("gpu-a", SimulatedCollector(1, host="gpu-a"), buf, 0.1, training=Records())
        await rt.tick()  # seq 1: agent_start
        rt.add_event(Event(1, "file_changed", SEVERITY_WARNING, -1, 0, "/opt/job/train.py", {}))
        buf.fail = 2
        for _ in range(2):
            with pytest.raises(OSError):
                await rt.tick()
        frame = await rt.tick()
        assert frame.seq == 2  # no seq was consumed by the failed ticks: nothing to show as a gap
        kinds = [e.kind for e in frame.events]
        assert kinds.count("file_changed") == 1  # carried once, not duplicated
        lost = [e for e in frame.events if e.kind == "ticks_not_stored"]
        assert len(lost) == 1 and lost[0].attrs["count"] == "2" and "No space left" in lost[0].attrs["error"]
        assert [r.step for r in frame.train] == [2, 3, 4]  # SDK records of the failed ticks are kept
        again = await rt.tick()
        assert "ticks_not_stored" not in [e.kind for e in again.events]
        # What went on the wire is what the runtime returned.
        stored = serde.decode_frame(buf._frames[1])  # seq 2 as buffered for subscribers
        assert stored.seq == 2 and "ticks_not_stored" in [e.kind for e in stored.events]

    asyncio.run(run())


def test_agent_gap_is_recorded_once_not_again_as_missing() -> None:
    """An explicit agent Gap advances the client's position, so the next frame adds no `missing` gap."""
    import numpy as np

    from console.ingest.client import AgentClient
    from protos.types import Frame, Gap

    class Store:
        accepting = True

        def __init__(self) -> None:
            self.gaps: list[Gap] = []
            self.frames: list[int] = []

        def submit_frame(self, frame: Frame, received_at_ns: int, address: str = "") -> None:
            self.frames.append(frame.seq)

        def submit_gap(self, host: str, gap: Gap) -> None:
            self.gaps.append(gap)

        def submit_description(self, address: str, desc: object) -> None: ...

        def last_committed(self, host: str) -> tuple[str, int] | None:
            return None

    def frame(seq: int) -> bytes:
        f = Frame("gpu-a", "e1", seq, seq, True, np.zeros((1, len(serde.metric_names_from_proto())), np.float32),
                  [0], [1])
        return serde.wrap_frame(serde.encode_frame(f))

    async def run() -> Store:
        store = Store()
        client = AgentClient("127.0.0.1:1", store, None)
        client.host, client.position = "gpu-a", ("e1", 3)
        await client._handle(serde.encode_gap(Gap("e1", 4, 9, "evicted", 0)))
        await client._handle(frame(10))
        await client._handle(frame(12))  # 11 silently skipped: that one is recorded as missing
        return store

    store = asyncio.run(run())
    assert store.frames == [10, 12]
    assert [(g.first_seq, g.last_seq, g.reason) for g in store.gaps] == [(4, 9, "evicted"), (11, 11, "missing")]


def test_an_event_naming_a_non_utf8_file_is_stored_escaped() -> None:
    async def run() -> None:
        buf = FlakyBuffer()
        rt = AgentRuntime("gpu-a", SimulatedCollector(1, host="gpu-a"), buf, 0.1)
        await rt.tick()
        bad_name = b"/opt/job/\xff.py".decode("utf-8", "surrogateescape")  # a non-UTF-8 file name
        rt.add_event(Event(1, "file_added", SEVERITY_WARNING, -1, 0, bad_name, {"path": bad_name}))
        for _ in range(3):
            await rt.tick()
        assert buf.newest_seq == 4
        stored = serde.decode_frame(buf._frames[1])
        ev = [e for e in stored.events if e.kind == "file_added"]
        assert len(ev) == 1 and ev[0].detail == "/opt/job/\\xff.py" and ev[0].attrs["path"] == ev[0].detail

    asyncio.run(run())
