"""The detection engine: an IngestSink that accumulates frames and evaluates every rule in batches.

`on_frame` and friends only queue (they run on the ingest thread and must not block);
`evaluate(now_ns)`, called about once per second by the host application, drains the queue,
updates per-host/per-rank state with vectorized numpy operations, runs every rule and returns the
alerts that are new or changed (also passed to `on_alert`). `replay_db` / `detect_file` run the
same engine over a stored DuckDB file.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import numpy as np

from console.detect import alerts as K
from console.detect.alerts import Alert, AlertBook
from console.detect.rules import RecordBatch, Rule, SampleBatch, default_rules
from console.detect.state import DetectConfig, DetectState, HostState
from console.ingest.sink import CONNECTED, CONNECTING, GAP, LAGGING, HostStatus
from protos.types import (
    GPU_STATE_NAMES,
    METRIC_NAMES,
    N_METRICS,
    SEVERITY_NAMES,
    Description,
    Event,
    Frame,
    Gap,
    GpuProcess,
    TrainRecord,
)

log = logging.getLogger("gpusoc.detect")

_LIVE_STATES: Final = frozenset({CONNECTED, CONNECTING, LAGGING, GAP})
_HOOKS: Final = ("on_samples", "on_event", "on_init", "on_records", "on_processes", "periodic", "observe")
_NAN: Final = math.nan


class DetectionEngine:
    """Runs every detection rule over the live stream; implements console.ingest.sink.IngestSink.

    Thread model: the ingest thread calls on_*; one other thread (or the same) calls evaluate().
    """

    def __init__(
        self,
        on_alert: Callable[[Alert], None] | None = None,
        config: DetectConfig | None = None,
        rules: list[Rule] | None = None,
    ) -> None:
        self.config = config or DetectConfig()
        self.on_alert = on_alert
        self._st = DetectState(self.config, AlertBook(min_update_ns=self.config.ns(self.config.min_update_s)))
        self._st.book.simulated_of = self._st.alert_is_simulated
        self._rules = rules if rules is not None else default_rules()
        self._auto_kinds = frozenset(k for r in self._rules if r.auto_resolve for k in r.kinds)
        # per hook, only the rules that implement it (dispatch cost is per frame and per event)
        self._hooks: dict[str, list[Rule]] = {
            hook: [r for r in self._rules if getattr(type(r), hook) is not getattr(Rule, hook)] for hook in _HOOKS
        }
        self._lock = threading.Lock()
        self._frames: list[Frame] = []
        self._gaps: list[tuple[str, Gap]] = []
        self._statuses: list[HostStatus] = []
        self._descs: list[Description] = []
        self._last_compact = 0
        self.cpu_s = 0.0  # thread CPU spent in evaluate(), for the benchmark and status lines
        self.frames_in = 0
        self.records_in = 0

    # -- IngestSink: cheap, any thread ------------------------------------------------------------

    def on_description(self, address: str, desc: Description) -> None:
        """Queue an agent's description (GPU count)."""
        with self._lock:
            self._descs.append(desc)

    def on_frame(self, frame: Frame) -> None:
        """Queue a frame for the next evaluate()."""
        with self._lock:
            self._frames.append(frame)

    def on_gap(self, host: str, gap: Gap) -> None:
        """Queue a gap: consecutive-sample counters of that host restart."""
        with self._lock:
            self._gaps.append((host, gap))

    def on_status(self, status: HostStatus) -> None:
        """Queue a connection state change: disconnected hosts leave peer comparisons."""
        with self._lock:
            self._statuses.append(status)

    # -- evaluation ------------------------------------------------------------------------------------

    @property
    def state(self) -> DetectState:
        """The engine's state (tests and benchmarks read it)."""
        return self._st

    def alerts(self) -> list[Alert]:
        """Every alert the engine holds, in its current state."""
        return list(self._st.book.alerts.values())

    def pending(self) -> int:
        """Frames queued for the next evaluate()."""
        return len(self._frames)

    def evaluate(self, now_ns: int | None = None) -> list[Alert]:
        """Process everything queued and run the rules; returns new/changed alerts (also to on_alert).

        Call about once per second (console clock `now_ns`, default time.time_ns()).
        """
        t0 = time.thread_time()
        now = time.time_ns() if now_ns is None else int(now_ns)
        with self._lock:
            frames, self._frames = self._frames, []
            gaps, self._gaps = self._gaps, []
            statuses, self._statuses = self._statuses, []
            descs, self._descs = self._descs, []
        st = self._st
        st.now_ns = now
        st.evaluations += 1
        for d in descs:
            h = st.host(d.host)
            h.n_gpus = len(d.gpus)
            st.fleet.ensure(len(st.host_list), max(h.n_gpus, st.fleet.G, 1))
        for s in statuses:
            if s.host in st.hosts:
                st.hosts[s.host].connected = s.state in _LIVE_STATES
        for host, _gap in gaps:
            if host in st.hosts:
                self._reset_runs(st.hosts[host])
        for h in st.host_list:
            h.fresh_frame = False
        if frames:
            self._ingest(frames)
        for rule in self._hooks["periodic"]:
            rule.periodic(st)
        if now - self._last_compact >= self.config.ns(self.config.compact_every_s):
            self._last_compact = now
            dropped = st.compact()
            if dropped:
                log.debug("forgot %d silent ranks", dropped)
        changed = st.book.take_changed()
        for rule in self._hooks["observe"]:
            rule.observe(st, changed)
        self._auto_resolve()
        st.book.flush_due(now)
        more = st.book.take_changed()
        if more:
            byk = {a.dedup_key: a for a in changed}
            byk.update({a.dedup_key: a for a in more})
            changed = list(byk.values())
        if self.on_alert is not None:
            for a in changed:
                try:
                    self.on_alert(a)
                except Exception:  # a broken consumer must not stop detection
                    log.exception("on_alert failed")
        self.cpu_s += time.thread_time() - t0
        return changed

    def acknowledge(self, alert_id: str, now_ns: int | None = None) -> Alert | None:
        """An operator acknowledged the alert; returns the changed alert (store it)."""
        return self._st.book.acknowledge(alert_id, time.time_ns() if now_ns is None else now_ns)

    def resolve(self, alert_id: str, now_ns: int | None = None) -> Alert | None:
        """An operator resolved the alert; returns the changed alert (store it)."""
        for key, a in self._st.book.alerts.items():
            if a.alert_id == alert_id:
                return self._st.book.resolve(key, time.time_ns() if now_ns is None else now_ns, "operator")
        return None

    def stats(self) -> dict[str, Any]:
        """Counters for status lines and benchmarks."""
        st = self._st
        return {"hosts": len(st.host_list), "ranks": st.ranks.n, "jobs": len(st.job_list),
                "evaluations": st.evaluations, "frames": self.frames_in, "records": self.records_in,
                "alerts": len(st.book.alerts), "cpu_s": round(self.cpu_s, 3)}

    # -- internals ----------------------------------------------------------------------------------------

    def _auto_resolve(self) -> None:
        st = self._st
        quiet = self.config.ns(self.config.resolve_after_s)
        fresh = st.fresh_slots()
        for key, a in list(st.book.alerts.items()):
            if a.kind not in self._auto_kinds or a.state == K.RESOLVED:
                continue
            if st.now_ns - st.book.last_held(key) < quiet:
                continue
            h = st.hosts.get(a.host) if a.host else None
            if h is not None and not fresh[h.slot]:
                continue  # no news from the host is not evidence that the condition cleared
            st.book.resolve(key, st.now_ns)

    def _reset_runs(self, h: HostState) -> None:
        f = self._st.fleet
        for k in ("therm_run", "power_run", "err_run", "peer_run"):
            f.ints[k][h.slot] = 0
        f.host_ints["peer_run"][h.slot] = 0

    def _ingest(self, frames: list[Frame]) -> None:
        st = self._st
        rounds: list[list[tuple[HostState, Frame]]] = []
        count: dict[int, int] = {}
        for fr in frames:
            h = st.host(fr.host)
            h.simulated = fr.simulated  # as its newest frame says (a name can move to real hardware)
            if fr.epoch != h.epoch:
                h.epoch = fr.epoch
                h.last_seq = -1
            elif fr.seq <= h.last_seq:
                continue  # delivered twice
            elif h.last_seq >= 0 and fr.seq > h.last_seq + 1:
                self._reset_runs(h)
            h.last_seq = fr.seq
            k = count.get(h.slot, 0)
            count[h.slot] = k + 1
            if k == len(rounds):
                rounds.append([])
            rounds[k].append((h, fr))
        ordered: list[tuple[HostState, Frame]] = []
        for rnd in rounds:
            self._samples(rnd)
            ordered.extend(rnd)
        self.frames_in += len(ordered)
        self._events_records(ordered)

    def _samples(self, rnd: list[tuple[HostState, Frame]]) -> None:
        st = self._st
        f = st.fleet
        n = len(rnd)
        g_need = max(max((max(fr.gpu_index) + 1 if fr.gpu_index else 0) for _, fr in rnd), f.G, 1)
        f.ensure(len(st.host_list), g_need)
        G = f.G
        slots = np.fromiter((h.slot for h, _ in rnd), np.int64, n)
        ts = np.fromiter((fr.ts_unix_ns for _, fr in rnd), np.int64, n)
        vals = [fr.gpu_values for _, fr in rnd]
        simple = all(
            v.shape == (G, N_METRICS) and len(fr.gpu_index) == G and fr.gpu_index[0] == 0
            and fr.gpu_index[-1] == G - 1 and len(fr.gpu_state) == G
            for v, (_, fr) in zip(vals, rnd, strict=True)
        )
        if simple:
            values = np.stack(vals).astype(np.float32, copy=False)
            state = np.array([fr.gpu_state for _, fr in rnd], dtype=np.int64)
            present = np.ones((n, G), bool)
        else:
            values = np.full((n, G, N_METRICS), np.nan, np.float32)
            state = np.zeros((n, G), np.int64)
            present = np.zeros((n, G), bool)
            for i, (_, fr) in enumerate(rnd):
                v = np.asarray(fr.gpu_values, dtype=np.float32)
                for row, gi in enumerate(fr.gpu_index):
                    if 0 <= gi < G and row < v.shape[0]:
                        values[i, gi, : v.shape[1]] = v[row, :N_METRICS]
                        state[i, gi] = fr.gpu_state[row] if row < len(fr.gpu_state) else 0
                        present[i, gi] = True
        f.values[slots] = values
        f.state[slots] = state
        f.present[slots] = present
        f.host_ints["last_ts"][slots] = ts
        f.host_ints["last_arrival"][slots] = st.now_ns
        for h, fr in rnd:
            if not h.first_ts:
                h.first_ts = fr.ts_unix_ns
            h.last_ts = fr.ts_unix_ns
            h.last_arrival = st.now_ns
            h.fresh_frame = True
        batch = SampleBatch(slots, ts, values, state, present)
        for rule in self._hooks["on_samples"]:
            rule.on_samples(st, batch)

    def _events_records(self, frames: list[tuple[HostState, Frame]]) -> None:
        st = self._st
        r = st.ranks
        ev_rules = self._hooks["on_event"]
        proc_rules = self._hooks["on_processes"]
        # Few new containers per frame: the GC's cost grows with every tuple allocated here.
        recs: list[TrainRecord] = []
        rec_slots: list[int] = []
        rec_counts: list[int] = []
        proc_hosts: list[HostState] = []
        proc_frames: list[Frame] = []
        for h, fr in frames:
            if fr.events:
                for ev in fr.events:
                    for rule in ev_rules:
                        rule.on_event(st, h, ev)
            tr = fr.train
            if tr:
                recs.extend(tr)
                rec_slots.append(h.slot)
                rec_counts.append(len(tr))
            if fr.processes or h.proc_pids:
                proc_hosts.append(h)
                proc_frames.append(fr)
        n = len(recs)
        b: RecordBatch | None = None
        if n:
            b = self._record_columns(recs, rec_slots, rec_counts)
        for h, fr in zip(proc_hosts, proc_frames, strict=True):
            procs = fr.processes
            pids = [p.pid for p in procs]
            gpus = [p.gpu_index for p in procs]
            changed = pids != h.proc_pids or gpus != h.proc_gpus
            if changed:
                h.proc_pids, h.proc_gpus = pids, gpus
                self._processes(h, fr)
            if changed or h.suspects or h.ranks_changed:
                for rule in proc_rules:
                    rule.on_processes(st, h, fr, changed or h.ranks_changed)
            h.ranks_changed = False
        r.new[: r.n] = False
        if b is None or len(b.ridx) == 0:
            return
        self.records_in += len(b.ridx)
        b.group()
        r.new[b.uniq] = True
        for j in np.unique(r.job[b.uniq]):
            st.job_list[int(j)].last_record_arrival = st.now_ns
        for rule in self._hooks["on_records"]:
            rule.on_records(st, b)

    def _record_columns(self, recs: list[TrainRecord], rec_slots: list[int], rec_counts: list[int]) -> RecordBatch:
        """SDK records -> columns; registers ranks and runs init rules for the few that need it."""
        st = self._st
        r = st.ranks
        n = len(recs)
        # One list comprehension per column (several times faster than zip(*rows) here). The
        # kernel-stamped pid names the rank on its host: look it up by the int slot<<32|pid.
        slot = np.repeat(np.asarray(rec_slots, np.int64), rec_counts)
        keys = (slot << 32) | np.array([x.pid for x in recs], np.int64)
        get = r.by_slot_pid.get
        ridx = np.array([get(k, -1) for k in keys.tolist()], np.int64)
        rank = np.array([x.rank for x in recs], np.int64)
        kinds = {x.kind for x in recs}
        if r.n:
            safe = np.maximum(ridx, 0)
            bad = (ridx < 0) | (r.rank[safe] != rank) | (r.slot[safe] != slot)
        else:
            bad = np.ones(n, bool)
        keep = np.ones(n, bool)
        if kinds != {"log"}:
            bad |= np.array([x.kind != "log" for x in recs], bool)
        if bad.any():
            init_rules = self._hooks["on_init"]
            for pos in np.flatnonzero(bad).tolist():
                rec = recs[pos]
                h = st.host_list[int(slot[pos])]
                ri = r.key.get((rec.job_id, rec.rank))
                if rec.kind == "init":
                    ri = self._register(h, rec, ri, init=True)
                    for rule in init_rules:
                        rule.on_init(st, h, rec, ri)
                    keep[pos] = False
                    continue
                if ri is None or r.pid_list[ri] != rec.pid or r.slot_list[ri] != h.slot:
                    ri = self._register(h, rec, ri, init=False)
                ridx[pos] = ri
        step_time = np.array([x.extra.get("step_time_s", _NAN) for x in recs], np.float64)
        cks = np.array([x.extra.get("param_checksum", _NAN) for x in recs], np.float64)
        checksums: list[tuple[int, float, str]] = []
        with_ck = np.flatnonzero(np.isfinite(cks) & keep)
        if len(with_ck):
            offset = np.cumsum(~keep) if not keep.all() else None
            for pos in with_ck.tolist():
                grp = recs[pos].extra.get("param_group")
                at = pos - int(offset[pos]) if offset is not None else pos
                checksums.append((at, float(cks[pos]), "" if grp is None else f"{grp:g}"))
        b = RecordBatch(
            ridx, np.array([x.step for x in recs], np.int64), np.array([x.loss for x in recs], np.float64),
            np.array([x.grad_norm for x in recs], np.float64), np.array([x.ts_unix_ns for x in recs], np.int64),
            step_time, np.array([x.tokens for x in recs], np.float64), checksums,
        )
        if not keep.all():
            b.ridx, b.step, b.loss, b.grad = b.ridx[keep], b.step[keep], b.loss[keep], b.grad[keep]
            b.ts, b.step_time, b.tokens = b.ts[keep], b.step_time[keep], b.tokens[keep]
        return b

    def _register(self, h: HostState, rec: TrainRecord, ri: int | None, init: bool) -> int:
        """Rank (job_id, rank) runs as rec.pid on host h: add it, or reset it if its process changed."""
        st = self._st
        r = st.ranks
        job = st.job(rec.job_id)
        if rec.world_size > 0:
            job.world_size = rec.world_size
        gpu = h.pid_gpu.get(rec.pid, rec.local_rank)
        if ri is None:
            ri = r.add(job.index, rec.rank, h.slot, gpu, rec.pid, rec.ts_unix_ns)
            r.key[(rec.job_id, rec.rank)] = ri
            job.ranks[rec.rank] = ri
        elif r.pid_list[ri] != rec.pid or r.slot_list[ri] != h.slot:
            old = st.host_list[r.slot_list[ri]]
            old.pids.pop(r.pid_list[ri], None)
            r.by_slot_pid.pop((r.slot_list[ri] << 32) | r.pid_list[ri], None)
            r.reset(ri, job.index, rec.rank, h.slot, gpu, rec.pid, rec.ts_unix_ns)
        h.pids[rec.pid] = ri
        r.by_slot_pid[(h.slot << 32) | rec.pid] = ri
        h.ranks_changed = True
        if init:
            r.i("init_arrival")[ri] = st.now_ns
        return ri

    def _processes(self, h: HostState, fr: Frame) -> None:
        """Refresh the host's pid -> GPU map after its process list changed."""
        procs = fr.processes
        r = self._st.ranks
        where: dict[int, list[GpuProcess]] = {}
        for p in procs:
            where.setdefault(p.pid, []).append(p)
        pid_gpu: dict[int, int] = {}
        mem: dict[int, float] = {}
        for pid, ps in where.items():
            ri = h.pids.get(pid)
            pick = None
            if ri is not None:
                pick = next((p for p in ps if p.gpu_index == int(r.gpu[ri])), None)
            if pick is None:
                pick = max(ps, key=lambda p: 0.0 if math.isnan(p.used_memory_mib) else p.used_memory_mib)
            pid_gpu[pid] = pick.gpu_index
            mem[pid] = pick.used_memory_mib
        h.pid_gpu = pid_gpu
        h.proc_mem = mem
        for pid, ri in h.pids.items():
            g = pid_gpu.get(pid)
            if g is not None:
                r.gpu[ri] = g


# -- offline: a stored DuckDB file ---------------------------------------------------------------------

_STATE_CODE: Final = {name: code for code, name in GPU_STATE_NAMES.items()}
_SEV_CODE: Final = {name: code for code, name in SEVERITY_NAMES.items()}


def _columns(con: Any, table: str) -> set[str]:
    rows = con.execute(
        "SELECT column_name FROM duckdb_columns() WHERE schema_name = 'main' AND table_name = ?", [table]
    ).fetchall()
    return {str(r[0]) for r in rows}


def _as_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, dict):
        if set(value) == {"key", "value"} and isinstance(value["key"], list):
            return dict(zip(value["key"], value["value"], strict=False))
        return value
    if isinstance(value, str):
        try:
            out = json.loads(value)
        except ValueError:
            return {}
        return out if isinstance(out, dict) else {}
    if isinstance(value, list):  # list of (k, v) pairs
        try:
            return dict(value)
        except (TypeError, ValueError):
            return {}
    return {}


def _float(v: Any) -> float:
    try:
        return _NAN if v is None else float(v)
    except (TypeError, ValueError):
        return _NAN


def frames_from_db(db_path: str | Path, chunk_s: float = 300.0) -> Iterator[Frame]:
    """Frames rebuilt from gpu_samples/train_samples/events, in time order (read-only open).

    Each host's frames keep their sequence order even if its clock stepped back; hosts interleave
    by timestamp. Records and events of a (host, epoch, seq) without GPU rows get a GPU-less frame.
    """
    import duckdb

    con = duckdb.connect(str(db_path), read_only=True)
    try:
        con.execute("SET TimeZone = 'UTC'")
        tables = {str(r[0]) for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main'").fetchall()}
        spans = []
        for t in ("gpu_samples", "train_samples", "events"):
            if t in tables:
                row = con.execute(f"SELECT epoch_ns(min(ts)), epoch_ns(max(ts)) FROM {t}").fetchone()
                if row and row[0] is not None:
                    spans.append((int(row[0]), int(row[1])))
        if not spans:
            return
        t_lo = min(s[0] for s in spans)
        t_hi = max(s[1] for s in spans)
        step = int(chunk_s * 1e9)
        last_key: dict[str, tuple[str, int]] = {}
        t_at = t_lo
        while t_at <= t_hi:
            t1 = t_at + step
            frames = _chunk(con, tables, t_at, t1)
            frames.sort(key=lambda fr: fr.ts_unix_ns)
            # keep per-host seq order whatever the clock did
            by_host: dict[str, list[Frame]] = {}
            for fr in frames:
                by_host.setdefault(fr.host, []).append(fr)
            for host, lst in by_host.items():
                lst.sort(key=lambda fr: (fr.epoch != last_key.get(host, ("", 0))[0], fr.ts_unix_ns, fr.seq))
                last_key[host] = (lst[-1].epoch, lst[-1].seq)
            yield from _merge_in_time(by_host)
            t_at = t1
    finally:
        con.close()


def _merge_in_time(by_host: dict[str, list[Frame]]) -> Iterator[Frame]:
    import heapq

    heap: list[tuple[int, int, str, int]] = []
    for i, (host, lst) in enumerate(by_host.items()):
        if lst:
            heap.append((lst[0].ts_unix_ns, i, host, 0))
    heapq.heapify(heap)
    while heap:
        _, i, host, k = heapq.heappop(heap)
        lst = by_host[host]
        yield lst[k]
        if k + 1 < len(lst):
            # never earlier than the frame just given: per-host order wins over its clock
            heapq.heappush(heap, (max(lst[k + 1].ts_unix_ns, lst[k].ts_unix_ns), i, host, k + 1))


def _chunk(con: Any, tables: set[str], t0: int, t1: int) -> list[Frame]:
    frames: dict[tuple[str, str, int], Frame] = {}
    rng = f"epoch_ns(ts) >= {int(t0)} AND epoch_ns(ts) < {int(t1)}"
    if "gpu_samples" in tables:
        cols = _columns(con, "gpu_samples")
        metric_sql = ", ".join(f"CAST({m} AS REAL) AS {m}" if m in cols else f"CAST(NULL AS REAL) AS {m}"
                               for m in METRIC_NAMES)
        sim = "simulated" if "simulated" in cols else "FALSE AS simulated"
        rel = con.sql(
            f"SELECT host, epoch, seq, epoch_ns(ts) AS ts_ns, gpu_index, CAST(gpu_state AS VARCHAR) AS gpu_state, "
            f"{sim}, {metric_sql} FROM gpu_samples WHERE {rng} ORDER BY host, epoch, seq, gpu_index"
        )
        # DuckDB 2.0 names it to_arrow_table(); older releases arrow()
        tbl = rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()
        if hasattr(tbl, "read_all"):
            tbl = tbl.read_all()
        n = tbl.num_rows
        if n:
            hosts = tbl.column("host").to_pylist()
            epochs = tbl.column("epoch").to_pylist()
            seqs = tbl.column("seq").to_numpy(zero_copy_only=False).astype(np.int64)
            tss = tbl.column("ts_ns").to_numpy(zero_copy_only=False).astype(np.int64)
            gidx = tbl.column("gpu_index").to_numpy(zero_copy_only=False).astype(np.int64)
            states = tbl.column("gpu_state").to_pylist()
            sims = tbl.column("simulated").to_pylist()
            mat = np.stack([tbl.column(m).to_numpy(zero_copy_only=False).astype(np.float32) for m in METRIC_NAMES],
                           axis=1)
            change = np.ones(n, bool)
            change[1:] = (seqs[1:] != seqs[:-1]) | np.array(
                [hosts[k] != hosts[k - 1] or epochs[k] != epochs[k - 1] for k in range(1, n)], bool)
            starts = [*np.flatnonzero(change).tolist(), n]
            for a, z in itertools.pairwise(starts):
                fr = Frame(
                    host=str(hosts[a]), epoch=str(epochs[a]), seq=int(seqs[a]), ts_unix_ns=int(tss[a]),
                    simulated=bool(sims[a]), gpu_values=mat[a:z], gpu_index=gidx[a:z].tolist(),
                    gpu_state=[_STATE_CODE.get(str(x), 0) for x in states[a:z]],
                )
                frames[(fr.host, fr.epoch, fr.seq)] = fr

    def frame_for(host: Any, epoch: Any, seq: Any, ts: Any, sim: Any) -> Frame:
        key = (str(host), str(epoch), int(seq))
        fr = frames.get(key)
        if fr is None:
            fr = Frame(str(host), str(epoch), int(seq), int(ts), bool(sim),
                       np.zeros((0, N_METRICS), np.float32), [], [])
            frames[key] = fr
        return fr

    if "train_samples" in tables:
        cols = _columns(con, "train_samples")
        sel = ["host", "epoch", "seq", "epoch_ns(ts)", "job_id", "rank", "local_rank", "world_size", "pid", "uid",
               "step", "kind", "loss", "grad_norm", "lr", "tokens", "extra", "info", "simulated"]
        sql_cols = ", ".join(c if (c.startswith("epoch_ns") or c in cols) else "NULL" for c in sel)
        sql = f"SELECT {sql_cols} FROM train_samples WHERE {rng} ORDER BY host, epoch, seq"
        for row in con.execute(sql).fetchall():
            (host, epoch, seq, ts, job, rank, lrank, ws, pid, uid, step, kind, loss, gn, lr, tok, extra, info,
             sim) = row
            fr = frame_for(host, epoch, seq, ts, sim)
            ex = {str(k): _float(v) for k, v in _as_dict(extra).items()}
            fr.train.append(TrainRecord(
                int(ts), str(job or ""), int(rank or 0), int(lrank or 0), int(ws or 0), int(pid or 0), int(uid or 0),
                int(step if step is not None else -1), _float(loss), _float(gn), _float(lr), _float(tok), ex,
                str(kind or "log"), {str(k): str(v) for k, v in _as_dict(info).items()},
            ))
    if "events" in tables:
        cols = _columns(con, "events")
        sel = ["host", "epoch", "seq", "epoch_ns(ts)", "kind", "severity", "gpu_index", "pid", "detail", "attrs",
               "simulated"]
        sql_cols = ", ".join(c if (c.startswith("epoch_ns") or c in cols) else "NULL" for c in sel)
        sql = f"SELECT {sql_cols} FROM events WHERE {rng} ORDER BY host, epoch, seq"
        for row in con.execute(sql).fetchall():
            host, epoch, seq, ts, kind, sev, gpu, pid, detail, attrs, sim = row
            fr = frame_for(host, epoch, seq, ts, sim)
            sev_code = int(sev) if isinstance(sev, int) else _SEV_CODE.get(str(sev).lower(), 0)
            if isinstance(sev, str) and sev.isdigit():
                sev_code = int(sev)
            fr.events.append(Event(int(ts), str(kind), sev_code, -1 if gpu is None else int(gpu), int(pid or 0),
                                   str(detail or ""), {str(k): str(v) for k, v in _as_dict(attrs).items()}))
    return list(frames.values())


def replay_db(
    db_path: str | Path,
    config: DetectConfig | None = None,
    on_alert: Callable[[Alert], None] | None = None,
    step_s: float = 1.0,
) -> list[Alert]:
    """Run every detector over a stored file; returns the final state of each alert.

    Frames are fed in time order and evaluated every `step_s` of data time, which stands in for
    the console clock (detected times are data times).
    """
    eng = DetectionEngine(on_alert=on_alert, config=config)
    step = int(step_s * 1e9)
    next_eval: int | None = None
    for fr in frames_from_db(db_path):
        if next_eval is None:
            next_eval = fr.ts_unix_ns + step
        while fr.ts_unix_ns >= next_eval:
            eng.evaluate(next_eval)
            next_eval += step
        eng.on_frame(fr)
    if next_eval is not None:
        eng.evaluate(next_eval)
    return eng.alerts()


def detect_file(db_path: str | Path, store: bool = False, config: DetectConfig | None = None) -> list[Alert]:
    """Offline detection over an exported/collected file; with store=True, upsert into its alerts table.

    Storing opens the file read-write (it must not be held by a running collector).
    """
    alerts = replay_db(db_path, config=config)
    if store and alerts:
        import duckdb

        from console.store.schema import ensure_schema

        con = duckdb.connect(str(db_path))
        try:
            ensure_schema(con)  # an older file gains the columns the rows carry (alerts.simulated)
            K.upsert_alerts(con, alerts)
        finally:
            con.close()
    return alerts
