"""Host x time history of one metric for the status-history view (Grafana "status history" style).

Qt-free. Columns are wall-clock buckets (1 s by default), not frame arrivals: a frame lands in
the bucket of its own timestamp, so a late batch or an agent replaying its buffer after a
reconnect fills the right columns, and the view scrolls once per bucket even when no host
sends anything. Each cell holds one value per host (the FleetModel reduces the GPUs of a host
to that value) and a grey flag for "no live connection" at that time.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

DEFAULT_BUCKETS: Final = 300
DEFAULT_BUCKET_NS: Final = 1_000_000_000


class HostTimeline:
    """Ring buffer of [host slot, time bucket]; allocated once, grown only when hosts exceed capacity.

    Rows are the FleetModel's stable host slots; `matrix(order)` returns them in display order,
    oldest bucket on the left. A bucket with several frames of one host keeps the last one.
    """

    def __init__(self, capacity: int, n_buckets: int = DEFAULT_BUCKETS,
                 bucket_ns: int = DEFAULT_BUCKET_NS) -> None:
        if capacity < 1 or n_buckets < 2 or bucket_ns < 1:
            raise ValueError("capacity >= 1, n_buckets >= 2 and bucket_ns >= 1 are required")
        self.n_buckets = n_buckets
        self.bucket_ns = bucket_ns
        self._values = np.full((capacity, n_buckets), np.nan, dtype=np.float32)
        self._grey = np.zeros((capacity, n_buckets), dtype=bool)
        self._head: int | None = None  # bucket number of the newest column
        self.version = 0
        # timeline version at each ring column's last change: a view re-encodes only newer columns
        self.col_version = np.zeros(n_buckets, dtype=np.int64)

    @property
    def capacity(self) -> int:
        """Host slots the buffer can hold before it must grow."""
        return int(self._values.shape[0])

    @property
    def head(self) -> int | None:
        """Bucket number (ts // bucket_ns) of the newest column; None before the first advance."""
        return self._head

    def grow(self, capacity: int) -> None:
        """Make room for more host slots; rare (fleet growth), so a copy is fine."""
        if capacity <= self.capacity:
            return
        values = np.full((capacity, self.n_buckets), np.nan, dtype=np.float32)
        grey = np.zeros((capacity, self.n_buckets), dtype=bool)
        values[: self.capacity] = self._values
        grey[: self.capacity] = self._grey
        self._values, self._grey = values, grey
        self.version += 1
        self.col_version[:] = self.version

    def clear(self) -> None:
        """Forget all history (e.g. the selected metric changed: only one metric is buffered)."""
        self._values.fill(np.nan)
        self._grey.fill(False)
        self.version += 1
        self.col_version[:] = self.version

    def advance(self, now_ns: int, grey_rows: npt.NDArray[np.bool_]) -> bool:
        """Move the newest column to `now_ns`'s bucket; new columns start grey where the host is offline.

        `grey_rows` is the current per-slot offline flag (length >= capacity is not required;
        missing slots count as online). Returns whether the head moved.
        """
        bucket = now_ns // self.bucket_ns
        if self._head is None:
            self._head = bucket
            self._fill_columns(np.array([bucket % self.n_buckets]), grey_rows)
            return True
        if bucket <= self._head:
            return False
        first = max(self._head + 1, bucket - self.n_buckets + 1)
        cols = np.arange(first, bucket + 1) % self.n_buckets
        self._fill_columns(cols, grey_rows)
        self._head = bucket
        return True

    def _fill_columns(self, cols: npt.NDArray[np.int64], grey_rows: npt.NDArray[np.bool_]) -> None:
        self._values[:, cols] = np.nan
        grey = np.zeros(self.capacity, dtype=bool)
        n = min(len(grey_rows), self.capacity)
        grey[:n] = grey_rows[:n]
        self._grey[:, cols] = grey[:, None]
        self.version += 1
        self.col_version[cols] = self.version

    def put(self, slot: int, ts_ns: int, value: float) -> bool:
        """Store `value` for host `slot` in the bucket of `ts_ns`.

        A timestamp ahead of the head (host clock ahead of the console's) is clamped to the
        newest column; one older than the window is dropped. Returns whether it was stored.
        """
        if self._head is None:
            return False
        bucket = min(ts_ns // self.bucket_ns, self._head)
        if bucket <= self._head - self.n_buckets:
            return False
        col = bucket % self.n_buckets
        self._values[slot, col] = value
        self._grey[slot, col] = False
        self.version += 1
        self.col_version[col] = self.version
        return True

    def mark_grey(self, slot: int, grey: bool) -> None:
        """A host went offline (or came back): the newest column follows, unless it already has a value."""
        if self._head is None:
            return
        col = self._head % self.n_buckets
        if grey and not np.isnan(self._values[slot, col]):
            return
        if bool(self._grey[slot, col]) != grey:
            self._grey[slot, col] = grey
            self.version += 1
            self.col_version[col] = self.version

    def ring(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        """(values, grey) as stored: [slot, ring column], not copies; for views that cache per column."""
        return self._values, self._grey

    def columns(self) -> npt.NDArray[np.int64]:
        """Ring positions in chronological order (oldest first)."""
        head = 0 if self._head is None else self._head
        return np.arange(head - self.n_buckets + 1, head + 1) % self.n_buckets

    def matrix(self, order: npt.NDArray[np.intp]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        """(values, grey) as [len(order), n_buckets] in display order, oldest bucket first; C-contiguous copies."""
        idx = np.ix_(order, self.columns())
        return np.ascontiguousarray(self._values[idx]), np.ascontiguousarray(self._grey[idx])
