"""Alerts and events-log view models (Qt-free).

`AlertsModel` mirrors the store's `alerts` table: the detector writes it, the console only reads,
so rows are refreshed by a query that the Qt panel runs on a worker (`fetch`) and hands back to
the GUI thread (`apply`). `EventsLogModel` is the live feed of agent events (XIDs, ECC, process
start/stop, ...) from frames, newest first and bounded.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from console.detect.alerts import HAS_SIMULATED_SQL, data_label
from console.models.training import Query
from protos.types import SEVERITY_NAMES, Event, Frame

DEFAULT_ALERT_STATES: Final[tuple[str, ...]] = ("open", "acknowledged", "resolved")
_SEVERITY_BY_NAME: Final[dict[str, int]] = {name: level for level, name in SEVERITY_NAMES.items()}
_SEVERITY_ALIASES: Final[dict[str, str]] = {"warn": "warning", "crit": "critical", "error": "critical"}


def severity_level(value: object) -> int:
    """Severity as protos.types level (0..3) from an int, a digit string or a name like 'warning'.

    The store keeps severity as text; agents send ints. Unknown values read as 0 ("unknown").
    """
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value if value in SEVERITY_NAMES else 0
    if isinstance(value, str):
        s = value.strip().lower()
        if s.isdigit():
            return severity_level(int(s))
        return _SEVERITY_BY_NAME.get(_SEVERITY_ALIASES.get(s, s), 0)
    return 0


@dataclass(frozen=True, slots=True)
class AlertRow:
    """One row of the alerts table; timestamps are unix ns (None when the store has none)."""

    alert_id: str
    kind: str
    severity: int
    state: str
    host: str | None
    gpu_index: int | None
    job_id: str | None
    rank: int | None
    onset_ns: int | None
    detected_ns: int
    evidence: str
    updated_ns: int
    simulated: bool | None = None  # None: a file from before schema version 2 did not record it

    @property
    def severity_name(self) -> str:
        """'info' / 'warning' / 'critical' / 'unknown'."""
        return SEVERITY_NAMES.get(self.severity, "unknown")

    @property
    def data_label(self) -> str:
        """SIMULATED, real, or - (not recorded): the badge the alerts table shows."""
        return data_label(self.simulated)


@dataclass(frozen=True, slots=True)
class EventRow:
    """One agent event, tagged with its host, for logs and the host drilldown."""

    host: str
    ts_ns: int
    kind: str
    severity: int
    gpu_index: int
    pid: int
    detail: str

    @property
    def severity_name(self) -> str:
        """'info' / 'warning' / 'critical' / 'unknown'."""
        return SEVERITY_NAMES.get(self.severity, "unknown")

    @staticmethod
    def from_event(host: str, ev: Event) -> EventRow:
        """Row for an event of a live frame."""
        return EventRow(host, ev.ts_unix_ns, ev.kind, severity_level(ev.severity), ev.gpu_index, ev.pid, ev.detail)


_ALERT_COLUMNS: Final = (
    "CAST(alert_id AS VARCHAR), kind, CAST(severity AS VARCHAR), state, host, gpu_index, job_id, rank, "
    "epoch_ns(onset_ts), epoch_ns(detected_ts), CAST(evidence AS VARCHAR), epoch_ns(updated_at)"
)

EVENT_COLUMNS: Final = "host, epoch_ns(ts), kind, CAST(severity AS VARCHAR), gpu_index, pid, detail"


def event_key(row: EventRow) -> tuple[str, int, str, int, str]:
    """Identity of an event across live delivery (ns) and the store (us): for deduplication."""
    return (row.host, row.ts_ns // 1000, row.kind, row.gpu_index, row.detail)


def event_row_from_db(row: tuple[object, ...]) -> EventRow:
    """EventRow from a row selected with EVENT_COLUMNS."""
    host, ts_ns, kind, sev, gpu, pid, detail = row
    return EventRow(
        str(host), int(ts_ns or 0), str(kind), severity_level(sev),  # type: ignore[call-overload]
        -1 if gpu is None else int(gpu), 0 if pid is None else int(pid), str(detail or ""),  # type: ignore[call-overload]
    )


class AlertsModel:
    """Alert rows from the store, with an optional state filter ('open', 'acknowledged', ...).

    `fetch` does the I/O (worker thread), `apply` installs the result (GUI thread); `refresh`
    does both for headless use. The filter applies in SQL (so the row limit is spent on matching
    alerts) and again in memory (so the table changes the moment the filter does).
    """

    def __init__(self, query: Query, limit: int = 500,
                 change_state: Callable[[str, str], None] | None = None) -> None:
        self._query = query
        self._limit = limit
        # Set by the app: stores the new state, tells detection, appends to the audit chain.
        # Runs on a worker thread (it does I/O); None = read-only panel (replay).
        self.change_state = change_state
        self._rows: list[AlertRow] = []
        self._state_filter: str | None = None
        self._seen_states: set[str] = set(DEFAULT_ALERT_STATES)
        self._version = 0
        self._refreshed = False
        self._sim_column: str | None = None  # "simulated" once seen (files before schema 2 lack it)

    @property
    def version(self) -> int:
        """Bumped on every change; views redraw only when it moved."""
        return self._version

    @property
    def state_filter(self) -> str | None:
        """The state shown, or None for all."""
        return self._state_filter

    @property
    def refreshed(self) -> bool:
        """True once any fetch result was applied (distinguishes 'no alerts' from 'not loaded')."""
        return self._refreshed

    def set_state_filter(self, state: str | None) -> None:
        """Show only alerts in `state` (None or '' = all)."""
        state = state or None
        if state != self._state_filter:
            self._state_filter = state
            self._version += 1

    def states(self) -> list[str]:
        """States to offer in a filter: the store's defaults plus any seen in data."""
        ordered = [s for s in DEFAULT_ALERT_STATES if s in self._seen_states]
        return ordered + sorted(self._seen_states - set(DEFAULT_ALERT_STATES))

    def rows(self) -> list[AlertRow]:
        """Alerts passing the filter, newest detection first."""
        if self._state_filter is None:
            return list(self._rows)
        return [r for r in self._rows if r.state == self._state_filter]

    def fetch(self, state: str | None = None) -> list[AlertRow]:
        """Read alerts (optionally only one state), newest first. I/O only: safe on a worker."""
        sim_column = self._sim_column
        if sim_column is None:
            has = self._query(HAS_SIMULATED_SQL, [])
            sim_column = "simulated" if has and has[0][0] else "NULL"
            if sim_column != "NULL":
                self._sim_column = sim_column  # a column never goes away; its absence is re-checked
        sql = f"SELECT {_ALERT_COLUMNS}, {sim_column} FROM alerts"
        params: list[object] = []
        if state:
            sql += " WHERE state = ?"
            params.append(state)
        sql += " ORDER BY detected_ts DESC, alert_id LIMIT ?"
        params.append(self._limit)
        out = []
        rows = self._query(sql, params)
        for aid, kind, sev, st, host, gpu, job, rank, onset, detected, evidence, updated, sim in rows:
            out.append(AlertRow(
                str(aid), str(kind), severity_level(sev), str(st), host, None if gpu is None else int(gpu),
                job, None if rank is None else int(rank), None if onset is None else int(onset),
                int(detected or 0), str(evidence or ""), int(updated or 0), None if sim is None else bool(sim),
            ))
        return out

    def apply(self, rows: list[AlertRow]) -> None:
        """Install fetched rows (GUI thread)."""
        self._rows = list(rows)
        self._seen_states.update(r.state for r in rows)
        self._refreshed = True
        self._version += 1

    def refresh(self) -> None:
        """Fetch with the current filter and apply, blocking (headless use and tests)."""
        self.apply(self.fetch(self._state_filter))


class EventsLogModel:
    """Live agent events from frames, newest first, bounded to `max_rows`.

    Order is arrival order (frames of different hosts interleave); within a frame, newer events
    come first. Implements the `on_frame` part of `console.ingest.sink.IngestSink`.
    """

    def __init__(self, query: Query | None = None, max_rows: int = 1000) -> None:
        self._query = query
        self._rows: collections.deque[EventRow] = collections.deque(maxlen=max_rows)
        self._min_severity = 0
        self._host: str | None = None
        self._version = 0

    @property
    def version(self) -> int:
        """Bumped on every change; views redraw only when it moved."""
        return self._version

    @property
    def max_rows(self) -> int:
        """Rows kept; older events fall off the end."""
        return self._rows.maxlen or 0

    @property
    def min_severity(self) -> int:
        """Lowest severity level shown."""
        return self._min_severity

    def set_min_severity(self, level: int) -> None:
        """Hide events below `level` (0 = show all)."""
        if level != self._min_severity:
            self._min_severity = level
            self._version += 1

    def set_host_filter(self, host: str | None) -> None:
        """Show one host's events only (None = all hosts)."""
        if host != self._host:
            self._host = host
            self._version += 1

    def rows(self) -> list[EventRow]:
        """Events passing the filters, newest first."""
        return [
            r for r in self._rows
            if r.severity >= self._min_severity and (self._host is None or r.host == self._host)
        ]

    def __len__(self) -> int:
        return len(self._rows)

    def clear(self) -> None:
        """Drop every row (replay seeks backwards)."""
        self._rows.clear()
        self._version += 1

    def on_frame(self, frame: Frame) -> None:
        """Prepend the frame's events."""
        if not frame.events:
            return
        for ev in sorted(frame.events, key=lambda e: e.ts_unix_ns):
            self._rows.appendleft(EventRow.from_event(frame.host, ev))
        self._version += 1

    def on_frames(self, frames: Iterable[Frame]) -> None:
        """Batch form of `on_frame`."""
        for f in frames:
            self.on_frame(f)

    def fetch_history(self, limit: int | None = None) -> list[EventRow]:
        """Newest stored events, newest first. I/O only: safe on a worker."""
        if self._query is None:
            return []
        rows = self._query(
            f"SELECT {EVENT_COLUMNS} FROM events ORDER BY ts DESC LIMIT ?", [limit or self.max_rows]
        )
        return [event_row_from_db(r) for r in rows]

    def apply_history(self, rows: list[EventRow]) -> None:
        """Put stored events behind the live ones, skipping any already held (GUI thread)."""
        held = {event_key(r) for r in self._rows}
        oldest_live = min((r.ts_ns for r in self._rows), default=None)
        room = self.max_rows - len(self._rows)
        older = [r for r in rows if event_key(r) not in held and (oldest_live is None or r.ts_ns <= oldest_live)]
        if room <= 0 or not older:
            return
        self._rows.extend(older[:room])
        self._version += 1
