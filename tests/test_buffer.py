"""Epoch/seq addressing: resume without loss or duplicates, and explicit gaps when data is gone."""

from __future__ import annotations

import asyncio

import pytest

from agent.buffer import FrameBuffer


async def _collect(buf: FrameBuffer, cursor: int, n: int) -> list:
    out = []
    agen = buf.stream(cursor)
    async for item in agen:
        out.append(item)
        if len(out) >= n:
            break
    await agen.aclose()
    return out


async def test_resume_gets_each_frame_once() -> None:
    buf = FrameBuffer(max_frames=100)
    for s in range(1, 11):
        buf.append_nowait(s, b"f%d" % s)
    cursor, gaps = buf.start_cursor(buf.epoch, 4, False)
    assert gaps == [] and cursor == 5
    items = await _collect(buf, cursor, 6)
    assert [i.seq for i in items] == [5, 6, 7, 8, 9, 10]


async def test_evicted_range_announced_as_gap() -> None:
    buf = FrameBuffer(max_frames=5)
    for s in range(1, 21):
        buf.append_nowait(s, b"x")
    assert buf.oldest_seq == 16 and buf.evicted == 15
    cursor, gaps = buf.start_cursor(buf.epoch, 3, False)
    assert cursor == 16
    assert [(g.first_seq, g.last_seq, g.reason) for g in gaps] == [(4, 15, "evicted")]


async def test_byte_bound_drops_oldest() -> None:
    buf = FrameBuffer(max_frames=1000, max_bytes=100)
    for s in range(1, 12):
        buf.append_nowait(s, b"0123456789")
    assert buf.nbytes <= 100 and buf.oldest_seq == 2


async def test_unknown_epoch_gets_epoch_changed_gap() -> None:
    buf = FrameBuffer()
    buf.append_nowait(1, b"a")
    cursor, gaps = buf.start_cursor("old-epoch", 77, False)
    assert cursor == 1
    assert (gaps[0].epoch, gaps[0].first_seq, gaps[0].last_seq, gaps[0].reason) == ("old-epoch", 78, 0,
                                                                                    "epoch_changed")


async def test_position_beyond_newest_is_an_error() -> None:
    buf = FrameBuffer()
    buf.append_nowait(1, b"a")
    with pytest.raises(ValueError, match="beyond the newest"):
        buf.start_cursor(buf.epoch, 5, False)


async def test_live_subscriber_wakes_on_append_and_sees_eviction_gap() -> None:
    buf = FrameBuffer(max_frames=2)
    got: list = []

    async def reader() -> None:
        async for item in buf.stream(1):
            got.append(item)
            if len(got) == 3:
                return

    task = asyncio.create_task(reader())
    await asyncio.sleep(0)
    await buf.append(1, b"a")
    await asyncio.sleep(0.01)
    for s in (2, 3, 4, 5):  # reader is slower than these appends: 2 and 3 are evicted before it reads
        buf.append_nowait(s, b"b")
    await buf.append(6, b"c")
    await asyncio.wait_for(task, 2)
    assert got[0].seq == 1
    assert got[1].gap is not None and (got[1].gap.first_seq, got[1].gap.last_seq) == (2, 4)
    assert got[2].seq == 5


async def test_out_of_order_append_refused() -> None:
    buf = FrameBuffer()
    with pytest.raises(ValueError):
        buf.append_nowait(2, b"x")
