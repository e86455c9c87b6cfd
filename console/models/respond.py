"""Response view model: freeze, resume and rollback of one job, approvals, confirmations, frozen clock.

Qt-free (`console.ui.qt_respond.QtResponsePanel` draws it). Work is split the same way as the
other models: `issue`, `cosign_and_dispatch` and `fetch_*` do gRPC and DuckDB I/O and run on a
worker; `apply_*`, `drain_updates` and `on_frame` run on the GUI thread. A dispatch in flight
reports each host's progress through `post_update` (thread-safe), which the panel drains on a
timer, so the confirmation table fills in as receipts arrive.

Rule "telemetry advanced while frozen" (alert kind `frozen_job_advanced`, critical):
a job is frozen on a host from the confirmed freeze receipt (`frozen_since_ns`, agent clock)
until a confirmed resume. The baseline is the highest step of the job seen in frames the
agents built no later than `frozen_since + ADVANCE_GRACE_S` (records already on their way
when the processes stopped; at start-up the store's highest step before the freeze). A
"log" record of the job in a frame built after that grace with a step above the baseline
means a rank runs although the job is frozen (thawed by someone else, or a rank the freeze
missed): one alert per freeze command, upserted into the `alerts` table through the store
writer, and shown in the panel. Frame times are the agent's clock, never the job's.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Final

from console.detect.alerts import CRITICAL, OPEN, Alert, alert_id_for, dedup_key, upsert_alerts
from console.respond.approvals import (
    DISPATCHED,
    ApprovalStore,
    PendingRequest,
    approve,
    create_request,
    with_state,
)
from console.respond.audit import ACTION_ROLLBACK as AUDIT_ROLLBACK_DECISION
from console.respond.audit import AuditChain
from console.respond.commands import (
    ABORTED,
    BAD_RECEIPT,
    CONFIRMED,
    FAILED,
    NCCL_DEFAULT_TIMEOUT_S,
    NO_ANSWER,
    NOT_SENT,
    PREPARED,
    REFUSED,
    WAITING,
    CheckpointReport,
    CommandDispatcher,
    CommandError,
    DispatchResult,
    HostResult,
    Operator,
    build_command,
    sign,
)
from protos.types import ACTION_FREEZE, ACTION_RESUME, ACTION_ROLLBACK, ControlState, Frame

ALERT_KIND_ADVANCED: Final = "frozen_job_advanced"
ADVANCE_GRACE_S: Final = 3.0
#: Below this many seconds before the collective timeout the frozen clock turns red.
COLLECTIVE_WARN_S: Final = 120.0

# Row colours of the confirmation table (names; the Qt view maps them to brushes).
GREEN: Final = "green"
RED: Final = "red"
AMBER: Final = "amber"
GREY: Final = "grey"
_STATE_COLOR: Final = {
    CONFIRMED: GREEN, REFUSED: RED, FAILED: RED, NO_ANSWER: RED, BAD_RECEIPT: RED,
    WAITING: AMBER, PREPARED: AMBER, ABORTED: GREY, NOT_SENT: GREY,
}

# (sql, params) -> rows, callable from a worker thread (StoreWriter.read_query).
Query = Callable[[str, list[object]], list[tuple[Any, ...]]]
# StoreWriter.submit_on_writer: queue fn(con) on the writer thread, never blocks.
SubmitOnWriter = Callable[[Callable[[Any], Any]], "Future[Any]"]


@dataclass(slots=True)
class HostRow:
    """One line of the confirmation table as the view shows it."""

    host: str
    state: str
    color: str
    alarm: bool
    method: str
    executed_at_ns: int
    detail: str


@dataclass(slots=True)
class FrozenHost:
    """Where and since when a job is frozen on one host (agent clock)."""

    frozen_since_ns: int
    collective_timeout_s: float
    command_id: str = ""


@dataclass(slots=True)
class FrozenStatus:
    """The frozen clock of a job: since when, for how long, and time left before collectives time out."""

    job: str
    hosts: list[str]
    frozen_since_ns: int
    collective_timeout_s: float
    seconds_frozen: float
    seconds_left: float

    @property
    def warning(self) -> bool:
        return self.seconds_left < COLLECTIVE_WARN_S

    def text(self) -> str:
        """"FROZEN 1:05 on 2 host(s); 8:55 left before the collective timeout (600 s)"."""
        left = self.seconds_left
        left_s = f"{_mmss(left)} left before the collective timeout" if left > 0 else \
            f"collective timeout PASSED {_mmss(-left)} ago: a resume will likely kill the job"
        return (f"FROZEN {_mmss(self.seconds_frozen)} on {len(self.hosts)} host(s); {left_s} "
                f"({self.collective_timeout_s:.0f} s)")


def _mmss(seconds: float) -> str:
    s = max(0, int(seconds))
    return f"{s // 60}:{s % 60:02d}"


@dataclass(slots=True)
class IssueOutcome:
    """What a button press led to: a dispatch, a request waiting for approval, or a refusal."""

    job: str
    action: str
    result: DispatchResult | None = None
    pending: PendingRequest | None = None
    refused: str = ""


@dataclass(slots=True)
class FrozenFetch:
    """ControlState of a job's hosts plus the store's highest step before the freeze (worker → GUI)."""

    job: str
    states: dict[str, ControlState | str]
    baseline_step: int | None = None


@dataclass(slots=True)
class AdvanceAlert:
    """The in-memory side of a `frozen_job_advanced` alert (the panel's red line)."""

    job: str
    host: str
    rank: int
    step: int
    baseline_step: int
    frozen_since_ns: int
    frame_ts_ns: int
    count: int = 1

    def text(self) -> str:
        return (f"TELEMETRY ADVANCED WHILE FROZEN: {self.job} rank {self.rank} on {self.host} reported step "
                f"{self.step} > {self.baseline_step} at freeze ({self.count} record(s))")


@dataclass(slots=True)
class _JobView:
    rows: dict[str, HostResult] = field(default_factory=dict)
    result: DispatchResult | None = None
    in_flight: str = ""
    frozen: dict[str, FrozenHost] = field(default_factory=dict)
    baseline_step: int = -1
    alert: AdvanceAlert | None = None
    alert_key: str = ""
    checkpoints: CheckpointReport | None = None
    refused: str = ""
    replace_rows: bool = False


class ResponseModel:
    """State of the Response panel; see the module docstring for the thread split."""

    def __init__(
        self,
        dispatcher: CommandDispatcher | None,
        *,
        hosts_of: Callable[[str], Sequence[str]],
        approvals: ApprovalStore | None = None,
        audit: AuditChain | None = None,
        submit_on_writer: SubmitOnWriter | None = None,
        query: Query | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
        advance_grace_s: float = ADVANCE_GRACE_S,
    ) -> None:
        self.dispatcher = dispatcher
        self.hosts_of = hosts_of
        self.approvals = approvals
        self.audit = audit
        self.submit_on_writer = submit_on_writer
        self.query = query
        self.clock_ns = clock_ns
        self.advance_grace_ns = int(advance_grace_s * 1e9)
        self.operator: Operator | None = None
        self._jobs: dict[str, _JobView] = {}
        self._max_step: dict[str, int] = {}
        self._pending: list[PendingRequest] = []
        self._updates: deque[tuple[str, HostResult]] = deque()
        self._updates_lock = threading.Lock()
        self._version = 0
        self.alerts_raised: list[Alert] = []

    # ---------------------------------------------------------------- state the view polls

    @property
    def version(self) -> int:
        """Bumped on every change (coalesced redraws)."""
        return self._version

    def _job(self, job: str) -> _JobView:
        jv = self._jobs.get(job)
        if jv is None:
            jv = self._jobs[job] = _JobView()
        return jv

    def host_rows(self, job: str, now_ns: int | None = None) -> list[HostRow]:
        """The confirmation table of `job`: green confirmed, red refused/failed/silent, amber waiting."""
        now = self.clock_ns() if now_ns is None else now_ns
        jv = self._jobs.get(job)
        if jv is None:
            return []
        out = []
        for host in sorted(jv.rows):
            hr = jv.rows[host]
            overdue = hr.overdue(now)
            alarm = hr.alarm or overdue
            color = RED if overdue else _STATE_COLOR.get(hr.state, GREY)
            state = hr.state.upper() + (" - ALARM" if alarm else "")
            if hr.state == CONFIRMED:
                detail = (f"confirmed +{(hr.confirmed_at_ns - hr.executed_at_ns) / 1e6:.1f} ms"
                          if hr.confirmed_at_ns and hr.executed_at_ns else "confirmed")
                if hr.reason:
                    detail += f" ({hr.reason})"
            elif overdue:
                detail = "no confirmation before the deadline" + (f": {hr.reason}" if hr.reason else "")
            else:
                detail = hr.reason
            out.append(HostRow(host, state, color, alarm, hr.method, hr.executed_at_ns, detail))
        return out

    def last_result(self, job: str) -> DispatchResult | None:
        jv = self._jobs.get(job)
        return jv.result if jv else None

    def in_flight(self, job: str) -> str:
        """The action being dispatched for `job` ("" when idle)."""
        jv = self._jobs.get(job)
        return jv.in_flight if jv else ""

    def refusal(self, job: str) -> str:
        """The last refusal shown for the job (before anything was sent)."""
        jv = self._jobs.get(job)
        return jv.refused if jv else ""

    def frozen_status(self, job: str, now_ns: int | None = None) -> FrozenStatus | None:
        """The job's frozen clock (None when not frozen on any host)."""
        jv = self._jobs.get(job)
        if jv is None or not jv.frozen:
            return None
        now = self.clock_ns() if now_ns is None else now_ns
        since = min(f.frozen_since_ns for f in jv.frozen.values())
        timeout = min(f.collective_timeout_s or NCCL_DEFAULT_TIMEOUT_S for f in jv.frozen.values())
        frozen_s = (now - since) / 1e9
        return FrozenStatus(job, sorted(jv.frozen), since, timeout, frozen_s, timeout - frozen_s)

    def advance_alert(self, job: str) -> AdvanceAlert | None:
        jv = self._jobs.get(job)
        return jv.alert if jv else None

    def checkpoints(self, job: str) -> CheckpointReport | None:
        jv = self._jobs.get(job)
        return jv.checkpoints if jv else None

    def pending(self, job: str | None = None) -> list[PendingRequest]:
        """Requests waiting for approval (of one job, or all), newest first."""
        return [p for p in self._pending if job is None or p.command.job == job]

    # ---------------------------------------------------------------- operator

    @staticmethod
    def load_operator(cert_path: str, key_path: str) -> Operator:
        """Read an operator's certificate and key (file I/O: call from a worker)."""
        return Operator.load(cert_path, key_path)

    def set_operator(self, operator: Operator | None) -> None:
        """The operator signing this console's requests (GUI thread)."""
        self.operator = operator
        self._version += 1

    # ---------------------------------------------------------------- worker side

    def post_update(self, job: str, hr: HostResult) -> None:
        """A host's progress, from the dispatching worker (thread-safe)."""
        with self._updates_lock:
            self._updates.append((job, hr))

    def _require(self) -> CommandDispatcher:
        if self.dispatcher is None:
            raise CommandError("this console has no command channel to the agents (read-only)")
        return self.dispatcher

    def issue(self, operator: Operator, action: str, job: str, reason: str, checkpoint_digest: str = "",
              break_glass: bool = False) -> IssueOutcome:
        """Build and sign; dispatch now when the policy needs one operator, else store a pending request.

        Rollback first lists the job's checkpoints on every host (deep) and refuses, with the reason,
        a digest that is not verified everywhere; the decision is audited either way. Worker thread.
        """
        dispatcher = self._require()
        hosts = sorted(dict.fromkeys(self.hosts_of(job)))
        if not hosts:
            raise CommandError(f"no hosts known for job {job}")
        why = operator.refusal(action, break_glass)
        if why:
            return IssueOutcome(job, action, refused=why)
        probes = dispatcher.probe(hosts)
        need = dispatcher.min_signers(action, hosts, break_glass, probes)
        if action == ACTION_ROLLBACK:
            report = dispatcher.list_checkpoints(job, hosts, deep=True)
            why = report.refusal(checkpoint_digest) if checkpoint_digest else "pick a checkpoint to roll back to"
            row = report.find(checkpoint_digest)
            if self.audit is not None:
                self.audit.append(operator.label, AUDIT_ROLLBACK_DECISION, job, {
                    "checkpoint_digest": checkpoint_digest, "step": row.step if row else None,
                    "statuses": row.statuses if row else {}, "accepted": why is None, "refusal": why,
                    "break_glass": break_glass, "reason": reason, "hosts": hosts,
                })
            if why is not None and not (break_glass and row is not None and row.below_floor
                                        and all(s == "verified" for s in row.statuses.values())):
                return IssueOutcome(job, action, refused=f"rollback refused: {why}")
        payload = build_command(action, job, hosts, reason, checkpoint_digest, break_glass)
        if need <= 1:
            env = sign(payload, operator)
            result = dispatcher.dispatch(env, on_update=lambda hr: self.post_update(job, hr))
            return IssueOutcome(job, action, result=result)
        agents = {p.host: p.address for p in probes.values() if p.address}
        req = create_request(operator, payload, need, agents=agents, audit=self.audit)
        if self.approvals is not None:
            self.approvals.add(req)
        return IssueOutcome(job, action, pending=req)

    def cosign_and_dispatch(self, request: PendingRequest, operator: Operator) -> IssueOutcome:
        """The second operator's approval, then the dispatch once enough operators signed. Worker thread."""
        dispatcher = self._require()
        env = approve(request, operator, audit=self.audit)
        job, action = request.command.job, request.command.action
        if len(env.signatures) < request.required_signers:
            more = PendingRequest.from_envelope(env, request.required_signers, request.requested_by, request.agents)
            if self.approvals is not None:
                self.approvals.set_state(request.command_id, "pending", signatures=env.signatures)
            return IssueOutcome(job, action, pending=more)
        result = dispatcher.dispatch(env, on_update=lambda hr: self.post_update(job, hr))
        if self.approvals is not None:
            self.approvals.set_state(request.command_id, DISPATCHED, operator.label, result.summary(),
                                     signatures=env.signatures)
        return IssueOutcome(job, action, pending=with_state(request, DISPATCHED, operator.label, result.summary()),
                            result=result)

    def cancel(self, request: PendingRequest, operator_label: str) -> None:
        """Withdraw a request (worker thread)."""
        if self.approvals is not None:
            self.approvals.cancel(request.command_id, operator_label, self.audit)

    def fetch_pending(self) -> list[PendingRequest]:
        """Pending requests from the store (worker thread)."""
        return self.approvals.list_requests() if self.approvals is not None else list(self._pending)

    def fetch_checkpoints(self, job: str, deep: bool = False) -> CheckpointReport:
        """Every host's checkpoints of `job` (worker thread).

        Shallow by default (signature and file set): a deep listing re-hashes every file of every
        checkpoint on every host, so it runs only when asked and before a rollback is signed.
        """
        hosts = sorted(dict.fromkeys(self.hosts_of(job)))
        return self._require().list_checkpoints(job, hosts, deep=deep)

    def fetch_frozen(self, job: str) -> FrozenFetch:
        """ControlState of the job's hosts and the baseline step before the freeze (worker thread)."""
        hosts = sorted(dict.fromkeys(self.hosts_of(job)))
        states = self._require().control_states(hosts) if hosts else {}
        baseline: int | None = None
        since = [f.frozen_since_unix_ns for s in states.values() if isinstance(s, ControlState)
                 for f in s.frozen if f.job == job]
        if since and self.query is not None:
            rows = self.query("SELECT max(step) FROM train_samples WHERE job_id = ? AND epoch_ns(ts) <= ?",
                              [job, min(since) + self.advance_grace_ns])
            if rows and rows[0][0] is not None:
                baseline = int(rows[0][0])
        return FrozenFetch(job, states, baseline)

    # ---------------------------------------------------------------- GUI side

    def begin(self, job: str, action: str) -> None:
        """A dispatch starts: rows of the job's hosts go amber."""
        jv = self._job(job)
        jv.in_flight = action
        jv.refused = ""
        jv.replace_rows = True  # the first progress report replaces the previous command's table
        self._version += 1

    def fail(self, job: str, message: str) -> None:
        """A button press ended in an error before anything was sent."""
        jv = self._job(job)
        jv.in_flight = ""
        jv.replace_rows = False
        jv.refused = message
        self._version += 1

    def drain_updates(self) -> int:
        """Apply progress posted by workers; returns how many."""
        with self._updates_lock:
            items = list(self._updates)
            self._updates.clear()
        for job, hr in items:
            jv = self._job(job)
            if jv.in_flight and hr.updated_ns and (jv.result is None or hr.updated_ns >= jv.result.started_ns):
                if jv.replace_rows:
                    jv.rows, jv.replace_rows = {}, False
                jv.rows[hr.host] = hr
        if items:
            self._version += 1
        return len(items)

    def apply_outcome(self, outcome: IssueOutcome) -> None:
        """The end of a button press (GUI thread)."""
        self.drain_updates()
        jv = self._job(outcome.job)
        jv.in_flight = ""
        jv.replace_rows = False
        jv.refused = outcome.refused
        if outcome.pending is not None:
            self._pending = [p for p in self._pending if p.command_id != outcome.pending.command_id]
            if outcome.pending.state == "pending":
                self._pending.insert(0, outcome.pending)
        if outcome.result is not None:
            self.apply_result(outcome.result)
        self._version += 1

    def apply_result(self, result: DispatchResult) -> None:
        """Final table of a dispatch; updates the frozen hosts from the confirmed receipts."""
        jv = self._job(result.job)
        jv.result = result
        jv.rows = {h: r.copy() for h, r in result.hosts.items()}
        for host, hr in result.hosts.items():
            if hr.state != CONFIRMED or hr.final is None:
                continue
            if result.action == ACTION_FREEZE:
                if not jv.frozen:
                    jv.baseline_step = self._max_step.get(result.job, -1)
                jv.frozen[host] = FrozenHost(hr.final.frozen_since_ns or hr.final.executed_at_ns,
                                             float(hr.final.collective_timeout_s or NCCL_DEFAULT_TIMEOUT_S),
                                             result.command_id)
            elif result.action in (ACTION_RESUME, ACTION_ROLLBACK):
                jv.frozen.pop(host, None)
        if not jv.frozen:
            jv.alert_key = ""
        self._version += 1

    def apply_checkpoints(self, report: CheckpointReport) -> None:
        self._job(report.job).checkpoints = report
        self._version += 1

    def apply_pending(self, requests: Iterable[PendingRequest]) -> None:
        self._pending = list(requests)
        self._version += 1

    def apply_frozen(self, fetched: FrozenFetch) -> None:
        """Frozen state as the agents report it (after a restart of the console, or another console's freeze)."""
        jv = self._job(fetched.job)
        known: dict[str, FrozenHost] = {}
        answered = set()
        for host, st in fetched.states.items():
            if not isinstance(st, ControlState):
                continue
            answered.add(host)
            for f in st.frozen:
                if f.job == fetched.job:
                    known[host] = FrozenHost(f.frozen_since_unix_ns, f.collective_timeout_s, f.command_id)
        was_frozen = bool(jv.frozen)
        for host in answered:
            if host in known:
                jv.frozen[host] = known[host]
            else:
                jv.frozen.pop(host, None)
        if jv.frozen and not was_frozen:
            jv.baseline_step = max(self._max_step.get(fetched.job, -1),
                                   fetched.baseline_step if fetched.baseline_step is not None else -1)
        self._version += 1

    # ---------------------------------------------------------------- IngestSink: the advance rule

    def on_frame(self, frame: Frame) -> None:
        """Watch training records of frozen jobs (see the module docstring for the rule)."""
        if not frame.train:
            return
        for rec in frame.train:
            if rec.kind != "log" or rec.step < 0 or not rec.job_id:
                continue
            job = rec.job_id
            if rec.step > self._max_step.get(job, -1):
                self._max_step[job] = rec.step
            jv = self._jobs.get(job)
            if jv is None or not jv.frozen:
                continue
            fh = jv.frozen.get(frame.host)
            since = fh.frozen_since_ns if fh is not None else min(f.frozen_since_ns for f in jv.frozen.values())
            if frame.ts_unix_ns <= since + self.advance_grace_ns:
                jv.baseline_step = max(jv.baseline_step, rec.step)  # already on its way at the freeze
                continue
            if rec.step <= jv.baseline_step:
                continue
            self._raise_advance(job, jv, frame, rec.rank, rec.step, since, fh.command_id if fh else "")

    def on_frames(self, frames: Iterable[Frame]) -> None:
        for f in frames:
            self.on_frame(f)

    def _raise_advance(self, job: str, jv: _JobView, frame: Frame, rank: int, step: int, since: int,
                       command_id: str) -> None:
        key = dedup_key(ALERT_KIND_ADVANCED, job, command_id or since)
        if jv.alert is not None and jv.alert_key == key:
            jv.alert.count += 1
            jv.alert.step = max(jv.alert.step, step)
            self._version += 1
            return
        jv.alert_key = key
        jv.alert = AdvanceAlert(job, frame.host, rank, step, jv.baseline_step, since, frame.ts_unix_ns)
        now = self.clock_ns()
        alert = Alert(
            alert_id_for(key), ALERT_KIND_ADVANCED, CRITICAL, OPEN, frame.host, None, job, rank,
            frame.ts_unix_ns, now,
            {"summary": "training telemetry advanced while the job is frozen", "step": step,
             "step_at_freeze": jv.baseline_step, "frozen_since_ns": since, "frame_ts_ns": frame.ts_unix_ns,
             "command_id": command_id, "frozen_hosts": sorted(jv.frozen)},
            key, now, frame.simulated,
        )
        self.alerts_raised.append(alert)
        if self.submit_on_writer is not None:
            self.submit_on_writer(lambda con: upsert_alerts(con, [alert]))
        self._version += 1


def rows_by_host(rows: Sequence[HostRow]) -> Mapping[str, HostRow]:
    """Index rows by host (tests, tooltips)."""
    return {r.host: r for r in rows}
