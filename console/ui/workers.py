"""Run blocking calls (DuckDB history queries, replay reads) off the GUI thread.

`run_in_pool(fn, on_done)` runs `fn` on a QThreadPool and calls `on_done(result)` on the GUI
thread through a queued signal, so widgets never wait on I/O and never touch Qt objects from a
worker. `SingleFlight` keeps at most one call of a kind in flight and runs only the newest
request made meanwhile, so a slow query never builds a backlog of stale refreshes.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QObject, QRunnable, QThreadPool, Signal, Slot
from PySide6.QtCore import Qt as _Qt

log = logging.getLogger("gpusoc.console.ui")


class Task(QObject):
    """Handle of one background call. `done(result)` / `failed(exception)` fire on the GUI thread."""

    done = Signal(object)
    failed = Signal(object)

    def __init__(self) -> None:
        super().__init__()  # no parent: kept alive by _PENDING until delivered
        self.finished = False


class _Relay(QObject):
    """One GUI-thread object that receives every worker's answer through a queued signal."""

    answer = Signal(int)  # task id; emitted by workers after parking the outcome in _OUTCOMES

    def __init__(self) -> None:
        super().__init__()
        self.answer.connect(self._deliver, _Qt.ConnectionType.QueuedConnection)

    @Slot(int)
    def _deliver(self, task_id: int) -> None:
        with _OUTCOMES_LOCK:
            ok, value = _OUTCOMES.pop(task_id)
        entry = _PENDING.pop(task_id, None)
        if entry is None:
            return
        _fn, task = entry  # the last references to fn (and what it captured) drop here, on the GUI thread
        task.finished = True
        if ok:
            task.done.emit(value)
        else:
            task.failed.emit(value)


# GUI-thread registry: task id -> (fn, Task). Workers never hold the last reference to either,
# so no QObject captured by a callable (a widget in a lambda) is ever destroyed on a worker
# thread; doing that crashed PySide6 in tests (segfault in a pool thread at teardown).
_PENDING: dict[int, tuple[Callable[[], Any], Task]] = {}
_OUTCOMES: dict[int, tuple[bool, object]] = {}  # task id -> (ok, result or exception), worker -> GUI
_OUTCOMES_LOCK = threading.Lock()
_ids = itertools.count(1)
_relay: _Relay | None = None


class _Runnable(QRunnable):
    def __init__(self, task_id: int, fn: Callable[[], Any], relay: _Relay) -> None:
        super().__init__()
        self._task_id = task_id
        self._fn: Callable[[], Any] | None = fn
        self._relay = relay
        self.setAutoDelete(True)

    def run(self) -> None:
        fn, self._fn = self._fn, None
        if fn is None:
            return
        outcome: tuple[bool, object]
        try:
            outcome = (True, fn())
        except Exception as exc:  # delivered to the GUI thread, not lost in the pool
            outcome = (False, exc)
        # Park the outcome and drop every local reference *before* signalling, so the GUI thread
        # is the one that releases the callable, its captures, the result and any traceback.
        del fn
        with _OUTCOMES_LOCK:
            _OUTCOMES[self._task_id] = outcome
        del outcome
        self._relay.answer.emit(self._task_id)


def _log_failure(exc: object) -> None:
    log.error("background task failed: %r", exc, exc_info=exc if isinstance(exc, BaseException) else None)


def run_in_pool(fn: Callable[[], Any], on_done: Callable[[Any], None] | None = None,
                on_error: Callable[[BaseException], None] | None = None, *,
                pool: QThreadPool | None = None) -> Task:
    """Run `fn()` on `pool` (default: the global pool); deliver the result on the GUI thread.

    Exceptions from `fn` go to `on_error` (default: logged). Call from the GUI thread.
    """
    global _relay
    if _relay is None:
        _relay = _Relay()
    task = Task()
    if on_done is not None:
        task.done.connect(on_done)
    task.failed.connect(on_error if on_error is not None else _log_failure)
    task_id = next(_ids)
    _PENDING[task_id] = (fn, task)
    (pool or QThreadPool.globalInstance()).start(_Runnable(task_id, fn, _relay))
    return task


class SingleFlight:
    """At most one call in flight; a request made while busy replaces any earlier queued one.

    For refreshes where only the newest answer matters (alerts table, history of the selected
    job or host). GUI thread only.
    """

    def __init__(self, pool: QThreadPool | None = None) -> None:
        self._pool = pool
        self._busy = False
        self._queued: tuple[Callable[[], Any], Callable[[Any], None], Callable[[BaseException], None] | None] | None
        self._queued = None

    @property
    def busy(self) -> bool:
        """True while a call runs."""
        return self._busy

    def submit(self, fn: Callable[[], Any], on_done: Callable[[Any], None],
               on_error: Callable[[BaseException], None] | None = None) -> None:
        """Run now if idle, else remember as the next call (dropping any older queued one)."""
        if self._busy:
            self._queued = (fn, on_done, on_error)
            return
        self._start(fn, on_done, on_error)

    def _start(self, fn: Callable[[], Any], on_done: Callable[[Any], None],
               on_error: Callable[[BaseException], None] | None) -> None:
        self._busy = True

        def done(result: Any) -> None:
            try:
                on_done(result)
            finally:
                self._next()

        def failed(exc: BaseException) -> None:
            try:
                (on_error or _log_failure)(exc)
            finally:
                self._next()

        run_in_pool(fn, done, failed, pool=self._pool)

    def _next(self) -> None:
        self._busy = False
        if self._queued is not None:
            queued, self._queued = self._queued, None
            self._start(*queued)
