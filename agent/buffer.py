"""The agent's bounded history of encoded frames, addressed by (epoch, seq).

A console resumes from the last (epoch, seq) it stored and gets every later frame exactly
once. When a bound forces the buffer to drop, it drops the oldest frames and a subscriber
that asked for them receives an explicit Gap, never a silent skip.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from protos.types import Gap


def new_epoch() -> str:
    """A fresh epoch id: the buffer state it names has never existed before."""
    return uuid.uuid4().hex


@dataclass(slots=True)
class StreamItem:
    """What a subscriber gets next: an encoded frame or a gap record."""

    frame_bytes: bytes | None = None
    gap: Gap | None = None
    seq: int = 0


class FrameBuffer:
    """Bounded by frame count and bytes; appends and reads happen on one asyncio loop."""

    def __init__(self, max_frames: int = 7200, max_bytes: int = 64 * 1024 * 1024,
                 epoch: str | None = None) -> None:
        if max_frames < 1 or max_bytes < 1:
            raise ValueError("buffer bounds must be positive")
        self.epoch = epoch or new_epoch()
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self._frames: deque[bytes] = deque()
        self._oldest = 1  # seq of _frames[0]
        self._next = 1  # seq the next frame gets
        self._bytes = 0
        self.evicted = 0
        self._changed = asyncio.Condition()

    @property
    def next_seq(self) -> int:
        return self._next

    @property
    def oldest_seq(self) -> int:
        """Oldest seq held (== next_seq when empty)."""
        return self._oldest

    @property
    def newest_seq(self) -> int:
        return self._next - 1

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._frames)

    async def append(self, seq: int, frame_bytes: bytes) -> None:
        """Add the frame numbered `seq` (must be next_seq) and wake subscribers."""
        self.append_nowait(seq, frame_bytes)
        async with self._changed:
            self._changed.notify_all()

    def append_nowait(self, seq: int, frame_bytes: bytes) -> None:
        if seq != self._next:
            raise ValueError(f"frame seq {seq} is not the next seq {self._next}")
        self._frames.append(frame_bytes)
        self._bytes += len(frame_bytes)
        self._next += 1
        while len(self._frames) > self.max_frames or (self._bytes > self.max_bytes and len(self._frames) > 1):
            dropped = self._frames.popleft()
            self._bytes -= len(dropped)
            self._oldest += 1
            self.evicted += 1

    def start_cursor(self, epoch: str, after_seq: int, from_now: bool) -> tuple[int, list[Gap]]:
        """Where a subscription starts, and the gaps to announce before it.

        Raises ValueError for a position this epoch never produced.
        """
        now = time.time_ns()
        gaps: list[Gap] = []
        if from_now:
            return self._next, gaps
        if epoch == self.epoch:
            if after_seq > self.newest_seq:
                raise ValueError(
                    f"after_seq {after_seq} is beyond the newest seq {self.newest_seq} of epoch {epoch}"
                )
            cursor = after_seq + 1
        else:
            if epoch:
                # The console's epoch is gone (agent restarted): what followed after_seq is lost.
                gaps.append(Gap(epoch, after_seq + 1, 0, "epoch_changed", now))
            cursor = 1
        if cursor < self._oldest:
            gaps.append(Gap(self.epoch, cursor, self._oldest - 1, "evicted", now))
            cursor = self._oldest
        return cursor, gaps

    async def stream(self, cursor: int) -> AsyncIterator[StreamItem]:
        """Yield frames from `cursor` on, forever; a gap whenever the cursor was evicted."""
        while True:
            if cursor < self._oldest:
                yield StreamItem(gap=Gap(self.epoch, cursor, self._oldest - 1, "evicted", time.time_ns()))
                cursor = self._oldest
            if cursor < self._next:
                frame = self._frames[cursor - self._oldest]
                yield StreamItem(frame_bytes=frame, seq=cursor)
                cursor += 1
                continue
            async with self._changed:
                await self._changed.wait_for(lambda c=cursor: self._next > c)  # type: ignore[misc]
