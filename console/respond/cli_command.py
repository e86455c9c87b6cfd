"""`gpusoc-console command ...`: signed freeze/resume/rollback, checkpoints, two-person approval from a shell.

The console CLI wires this in with `add_command_parser(subparsers)` and dispatches
`cmd == "command"` to `run_command(args)`. Exit codes: 0 every host confirmed (or the listing /
request succeeded), 1 refused, partial or silent (the per-host table says which), 2 usage
(bad arguments, unreadable files, unknown job). docs/response.md "Console side" has examples.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from console.respond.approvals import (
    DISPATCHED,
    ApprovalError,
    ApprovalStore,
    PendingRequest,
    approve,
    create_request,
    read_request_file,
    write_request_file,
)
from console.respond.audit import ACTION_ROLLBACK as AUDIT_ROLLBACK_DECISION
from console.respond.audit import (
    AuditChain,
    AuditTrail,
    ControlSocketAudit,
    Runner,
    connection_runner,
    load_or_create_audit_key,
)
from console.respond.commands import (
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    CommandDispatcher,
    CommandError,
    Operator,
    Query,
    ReceiptKeyPins,
    build_command,
    cosign,
    default_state_dir,
    job_hosts,
    sign,
)
from console.store.control import ControlError
from console.store.query import is_lock_error
from protos.types import ACTION_ROLLBACK, ACTIONS, ControlState

PINS_FILE = "receipt-keys.json"
AUDIT_KEY_FILE = "audit-key.pem"


def _common(p: argparse.ArgumentParser, *, agents_required: bool = True) -> None:
    from console.cli import _add_tls

    p.add_argument("--agents", nargs="+", required=agents_required, metavar="FILE|HOST:PORT",
                   help="inventory file or agent addresses (host names are learned from each agent)")
    p.add_argument("--db", metavar="PATH",
                   help="console store: jobs -> hosts from train_samples, audit trail, pending_commands "
                        "(not while a console holds it open)")
    p.add_argument("--state-dir", default=None, metavar="DIR",
                   help="receipt key pins and the audit key (default $GPUSOC_CONSOLE_STATE_DIR or "
                        "~/.local/state/gpusoc/console)")
    p.add_argument("--audit-key", default=None, metavar="PEM",
                   help="audit head signing key (default <state-dir>/audit-key.pem, created 0600)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--timeout", type=float, default=20.0, metavar="S",
                   help="how long to wait for every host to confirm (default 20 s)")
    p.add_argument("--commit-delay", type=float, default=0.3, metavar="S",
                   help="minimum delay between PREPARE and the shared commit deadline (default 0.3 s)")
    _add_tls(p)


def _operator(p: argparse.ArgumentParser, cosign_args: bool) -> None:
    g = p.add_argument_group("operator identity (gpusoc-agent pki operator)")
    g.add_argument("--operator-cert", required=True, metavar="PEM", help="your operator certificate")
    g.add_argument("--operator-key", required=True, metavar="PEM", help="your operator private key")
    g.add_argument("--operator-ca", metavar="PEM", help="optional: check the certificate chains to this CA")
    if cosign_args:
        g.add_argument("--cosign-cert", metavar="PEM", help="a second, different operator's certificate")
        g.add_argument("--cosign-key", metavar="PEM", help="the second operator's private key")


def _action_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--job", required=True, help="the SDK job id")
    p.add_argument("--reason", default="", help="why (recorded in the command, receipts and audit trail)")
    p.add_argument("--checkpoint", default="", metavar="DIGEST",
                   help="rollback: the checkpoint's manifest digest sha256:<hex> (see `command checkpoints`)")
    p.add_argument("--break-glass", action="store_true", help="rollback below the step floor (two admins)")


def add_command_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `command` command (freeze, resume, rollback, checkpoints, request, approve, state, unpin)."""
    c = subparsers.add_parser(
        "command", help="signed freeze/resume/rollback of a job, checkpoints, two-person approval",
        description="Exit 0: every host confirmed. 1: refused, partial or silent. 2: usage error.")
    sub = c.add_subparsers(dest="command_cmd",
                           metavar="{freeze,resume,rollback,checkpoints,request,approve,state,unpin}")
    sub.required = True
    for action in ACTIONS:
        p = sub.add_parser(action, help=f"{action} a job on every host it runs on (two-phase for several hosts)")
        _action_args(p)
        _operator(p, cosign_args=True)
        _common(p)
    k = sub.add_parser("checkpoints", help="list a job's checkpoints on every host with their verification status")
    k.add_argument("--job", required=True)
    k.add_argument("--shallow", action="store_true", help="signature and file set only (no re-hash)")
    _common(k)
    r = sub.add_parser("request", help="sign as the first operator and write a request for a second one")
    r.add_argument("action", choices=ACTIONS)
    _action_args(r)
    _operator(r, cosign_args=False)
    r.add_argument("--out", required=True, metavar="FILE", help="request file to hand to the second operator")
    _common(r)
    a = sub.add_parser("approve", help="review a request file, co-sign it as a different operator and send it")
    a.add_argument("file", metavar="FILE")
    _operator(a, cosign_args=False)
    a.add_argument("--yes", action="store_true", help="do not ask for confirmation on a terminal")
    _common(a, agents_required=False)
    s = sub.add_parser("state", help="frozen jobs and time left before their collective timeout, per agent")
    _common(s)
    u = sub.add_parser("unpin", help="forget a host's pinned receipt key (after a checked agent reinstall)")
    u.add_argument("host")
    u.add_argument("--state-dir", default=None, metavar="DIR")
    return c


# --------------------------------------------------------------------------- running


def _err(msg: str, code: int = EXIT_USAGE) -> int:
    print(f"gpusoc-console command: {msg}", file=sys.stderr)
    return code


@dataclass
class _Ctx:
    args: argparse.Namespace
    state_dir: Path
    pins: ReceiptKeyPins
    tls: Any = None
    runner: Runner | None = None
    audit: AuditTrail | None = None
    query: Query | None = None
    closers: list[Callable[[], None]] = field(default_factory=list)

    def dispatcher(self, address_of: Callable[[str], str], actor: str) -> CommandDispatcher:
        d = CommandDispatcher(address_of, self.tls, self.audit, pins=self.pins, actor=actor,
                              min_commit_delay_s=self.args.commit_delay, confirm_timeout_s=self.args.timeout)
        self.closers.append(d.close)
        return d


@contextlib.contextmanager
def _context(args: argparse.Namespace, addresses: list[str]) -> Iterator[_Ctx]:
    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()
    ctx = _Ctx(args, state_dir, ReceiptKeyPins(state_dir / PINS_FILE))
    if addresses:
        from console.cli import tls_from_args

        try:
            ctx.tls = tls_from_args(args, addresses)
        except SystemExit as exc:
            raise CommandError(str(exc.code)) from None
    try:
        if getattr(args, "db", None):
            import duckdb

            from console.store.schema import ensure_schema

            try:
                con = duckdb.connect(args.db)
            except duckdb.Error as exc:
                if not is_lock_error(exc):
                    raise CommandError(f"cannot open store {args.db}: {str(exc).splitlines()[0]}") from None
                _through_running_console(ctx, args.db, exc)
            else:
                ctx.closers.append(con.close)
                runner = connection_runner(con)
                runner(ensure_schema)
                ctx.runner = runner
                ctx.query = lambda sql, params: runner(lambda c: c.execute(sql, params).fetchall())
                key_path = Path(args.audit_key) if args.audit_key else state_dir / AUDIT_KEY_FILE
                ctx.audit = AuditChain(runner, signing_key=load_or_create_audit_key(key_path))
        elif args.command_cmd not in ("checkpoints", "state"):
            print("gpusoc-console command: warning: no --db, so this is not recorded in an audit trail "
                  "(the agents still record their events)", file=sys.stderr)
        yield ctx
    finally:
        if ctx.audit is not None:
            with contextlib.suppress(Exception):
                ctx.audit.sign_head()
        for close in reversed(ctx.closers):
            with contextlib.suppress(Exception):
                close()


def _through_running_console(ctx: _Ctx, db: str, locked: BaseException) -> None:
    """The store is held by `collect` or a window: read the job's hosts and record the audit rows
    through that process's control socket (`<db>.ctl`), so its chain stays the only writer."""
    from console.store import control

    path = control.socket_path(db)
    try:
        info, _pid = control.request(path, {"op": "ping"}, timeout=10.0)
    except control.ControlError as exc:
        _pid, holder = control.lock_holder(str(locked))
        raise CommandError(
            f"cannot open store {db}: {holder} holds it and no gpusoc console answers on {path} ({exc}); "
            "stop that process, or run the command without --db (it is then not recorded on the console side)"
        ) from None

    if not (isinstance(info, dict) and info.get("audit_chain")):
        raise CommandError(
            f"cannot record in {db}: the console holding it keeps no audit chain (see its log: its audit key is "
            "unusable, or it predates this feature), so a command would go unrecorded; fix that, or stop it"
        )

    def query(sql: str, params: list[object]) -> list[tuple[Any, ...]]:
        res, _pid = control.request(path, {"op": "query", "sql": sql, "params": list(params)}, timeout=120.0)
        return control.decode_rows(res["types"], res["rows"])

    ctx.query = query
    ctx.audit = ControlSocketAudit(path)
    print(f"gpusoc-console command: {db} is held by a running console: recording through {path}",
          file=sys.stderr)


def _addresses(specs: list[str] | None) -> list[str]:
    from console.ingest.fleet import AgentSource
    from console.ingest.inventory import InventoryError

    if not specs:
        return []
    try:
        entries, _ = AgentSource(specs).entries()
    except (InventoryError, OSError) as exc:
        raise CommandError(str(exc)) from None
    if not entries:
        raise CommandError("no agents given")
    return [e.address for e in entries]


def _discover(ctx: _Ctx, addresses: list[str], actor: str) -> tuple[CommandDispatcher, dict[str, str]]:
    hosts: dict[str, str] = {}
    d = ctx.dispatcher(lambda h: hosts[h], actor)
    found, errors = d.discover(addresses)
    if errors:
        listed = "; ".join(f"{a}: {e}" for a, e in sorted(errors.items()))
        raise _Refused(f"agent(s) did not answer, nothing was sent: {listed}")
    hosts.update(found)
    return d, hosts


class _Refused(Exception):
    """Refused before anything was sent (exit 1)."""


def _targets(ctx: _Ctx, job: str, discovered: dict[str, str]) -> list[str]:
    if ctx.query is None:
        return sorted(discovered)
    hosts = job_hosts(ctx.query, job)
    if not hosts:
        raise CommandError(f"job {job!r} has no training records in {ctx.args.db}")
    missing = sorted(set(hosts) - set(discovered))
    if missing:
        raise CommandError(f"job {job} runs on {', '.join(missing)}, not in --agents: give every host of the job")
    return hosts


def _print(ctx: _Ctx, obj: Any, text: str) -> None:
    print(json.dumps(obj, indent=1, sort_keys=True, default=str) if ctx.args.json else text)


def _load_operator(args: argparse.Namespace, cert: str, key: str) -> Operator:
    return Operator.load(cert, key, operator_ca=getattr(args, "operator_ca", None))


def _check_rollback(ctx: _Ctx, d: CommandDispatcher, operator: Operator, job: str, hosts: list[str]) -> None:
    args = ctx.args
    if not args.checkpoint:
        raise CommandError("rollback needs --checkpoint DIGEST (list them with `command checkpoints`)")
    report = d.list_checkpoints(job, hosts, deep=True)
    why = report.refusal(args.checkpoint)
    row = report.find(args.checkpoint)
    if why and args.break_glass and row is not None and row.below_floor and \
            all(s == "verified" for s in row.statuses.values()):
        why = None
    if ctx.audit is not None:
        ctx.audit.append(operator.label, AUDIT_ROLLBACK_DECISION, job, {
            "checkpoint_digest": args.checkpoint, "step": row.step if row else None,
            "statuses": row.statuses if row else {}, "accepted": why is None, "refusal": why,
            "break_glass": args.break_glass, "reason": args.reason, "hosts": hosts})
    if why:
        raise _Refused(f"rollback refused: {why}")


def _run_action(args: argparse.Namespace, request_only: bool) -> int:
    action = args.action if request_only else args.command_cmd
    ops = [_load_operator(args, args.operator_cert, args.operator_key)]
    if not request_only and (args.cosign_cert or args.cosign_key):
        if not (args.cosign_cert and args.cosign_key):
            raise CommandError("give both --cosign-cert and --cosign-key")
        ops.append(_load_operator(args, args.cosign_cert, args.cosign_key))
        if ops[0].same_as(ops[1]):
            raise _Refused(f"{ops[1].label} cannot co-sign their own command: a second, different operator must "
                           "co-sign (--cosign-cert/--cosign-key of another operator, or `command request` + "
                           "`command approve`)")
    for op in ops:
        why = op.refusal(action, args.break_glass)
        if why:
            raise _Refused(why)
    with _context(args, _addresses(args.agents)) as ctx:
        d, discovered = _discover(ctx, _addresses(args.agents), ops[0].label)
        hosts = _targets(ctx, args.job, discovered)
        probes = d.probe(hosts)
        bad = {h: p.error for h, p in probes.items() if not p.ok}
        if bad:
            raise _Refused("cannot check " + "; ".join(f"{h}: {e}" for h, e in sorted(bad.items())))
        need = d.min_signers(action, hosts, args.break_glass, probes)
        if action == ACTION_ROLLBACK:
            _check_rollback(ctx, d, ops[0], args.job, hosts)
        reason = args.reason or f"{action} by {ops[0].label} from gpusoc-console"
        payload = build_command(action, args.job, hosts, reason, args.checkpoint, args.break_glass)
        print(f"{action.upper()} job {args.job} on {', '.join(hosts)} (needs {need} operator(s)); "
              f"command {payload.command_id}", file=sys.stderr)
        if request_only:
            req = create_request(ops[0], payload, need, agents={h: discovered[h] for h in hosts}, audit=ctx.audit)
            out = write_request_file(req, args.out)
            if ctx.runner is not None:
                ApprovalStore(ctx.runner).add(req)
            _print(ctx, {"request": str(out), "command_id": payload.command_id, "needs": need,
                         "expires_in_s": round(req.seconds_left(), 1)},
                   f"request written to {out}; it expires in {req.countdown()}.\n"
                   f"A second operator runs: gpusoc-console command approve {out} --operator-cert C --operator-key K")
            return EXIT_OK
        if len(ops) < need:
            raise _Refused(f"refused before sending: {action} needs {need} distinct operators, got {len(ops)}; "
                           "add --cosign-cert/--cosign-key, or use `command request` then `command approve`")
        env = sign(payload, ops[0])
        for op in ops[1:]:
            env = cosign(env, op)
        result = d.dispatch(env)
        _print(ctx, result.to_dict(), result.render())
        return result.exit_code


def _run_approve(args: argparse.Namespace) -> int:
    req = read_request_file(args.file)
    print(req.render(), file=sys.stderr)
    if sys.stdin.isatty() and not args.yes:
        answer = input("co-sign and send this command? [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            return _err("not co-signed", EXIT_REFUSED)
    op = _load_operator(args, args.operator_cert, args.operator_key)
    addresses = _addresses(args.agents) if args.agents else list(dict(req.agents).values())
    if not addresses:
        raise CommandError("the request names no agent addresses: give --agents")
    with _context(args, addresses) as ctx:
        env = approve(req, op, audit=ctx.audit)
        if len(env.signatures) < req.required_signers:
            more = PendingRequest.from_envelope(env, req.required_signers, req.requested_by, req.agents)
            out = write_request_file(more, Path(args.file).with_suffix(f".{len(env.signatures)}.json"))
            print(f"co-signed; {more.missing} more operator(s) needed: pass {out} on", file=sys.stderr)
            return EXIT_REFUSED
        if args.agents:
            d, discovered = _discover(ctx, addresses, op.label)
        else:
            discovered = dict(req.agents)
            d = ctx.dispatcher(lambda h: discovered[h], op.label)
        missing = sorted(set(req.command.target_hosts) - set(discovered))
        if missing:
            raise CommandError(f"no address for {', '.join(missing)}: give --agents")
        result = d.dispatch(env)
        if ctx.runner is not None:
            store = ApprovalStore(ctx.runner)
            if store.get(req.command_id) is not None:
                store.set_state(req.command_id, DISPATCHED, op.label, result.summary(), signatures=env.signatures)
        elif isinstance(ctx.audit, ControlSocketAudit):
            print(f"gpusoc-console command: note: if {req.command_id} is listed under Pending approvals in the "
                  "console, it stays there: withdraw it in that window (agents refuse a command id seen before)",
                  file=sys.stderr)
        _print(ctx, result.to_dict(), result.render())
        return result.exit_code


def _run_checkpoints(args: argparse.Namespace) -> int:
    with _context(args, _addresses(args.agents)) as ctx:
        d, discovered = _discover(ctx, _addresses(args.agents), "console")
        hosts = _targets(ctx, args.job, discovered)
        report = d.list_checkpoints(args.job, hosts, deep=not args.shallow)
        _print(ctx, report.to_dict(), report.render())
        return EXIT_REFUSED if report.errors else EXIT_OK


def _run_state(args: argparse.Namespace) -> int:
    import time

    with _context(args, _addresses(args.agents)) as ctx:
        d, discovered = _discover(ctx, _addresses(args.agents), "console")
        states = d.control_states(sorted(discovered))
        out: dict[str, Any] = {}
        lines = []
        now = time.time_ns()
        for host, st in sorted(states.items()):
            if not isinstance(st, ControlState):
                out[host] = {"error": st}
                lines.append(f"{host}: ERROR {st}")
                continue
            frozen = []
            for f in st.frozen:
                left = (f.frozen_since_unix_ns + int(f.collective_timeout_s * 1e9) - now) / 1e9
                frozen.append({"job": f.job, "method": f.method, "frozen_since_ns": f.frozen_since_unix_ns,
                               "collective_timeout_s": f.collective_timeout_s, "seconds_left": round(left, 1)})
                lines.append(f"{host}: FROZEN {f.job} ({f.method}) for {(now - f.frozen_since_unix_ns) / 1e9:.0f} s, "
                             f"{left:.0f} s left before the collective timeout ({f.collective_timeout_s:.0f} s)")
            if not st.frozen:
                lines.append(f"{host}: nothing frozen; key {st.agent_key_id[:16]}; policy {st.min_signers}")
            out[host] = {"key_id": st.agent_key_id, "min_signers": st.min_signers, "frozen": frozen}
        _print(ctx, out, "\n".join(lines))
        return EXIT_OK if all(isinstance(s, ControlState) for s in states.values()) else EXIT_REFUSED


def _run_unpin(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()
    pins = ReceiptKeyPins(state_dir / PINS_FILE)
    old = pins.get(args.host)
    if not pins.unpin(args.host):
        return _err(f"no pinned receipt key for {args.host}", EXIT_REFUSED)
    print(f"removed the pin of {args.host} (key {old.key_id if old else '?'}); the next command pins anew")
    return EXIT_OK


def run_command(args: argparse.Namespace) -> int:
    """Run `gpusoc-console command ...`; returns the exit code."""
    cmd = args.command_cmd
    try:
        if cmd in ACTIONS:
            return _run_action(args, request_only=False)
        if cmd == "request":
            return _run_action(args, request_only=True)
        if cmd == "approve":
            return _run_approve(args)
        if cmd == "checkpoints":
            return _run_checkpoints(args)
        if cmd == "state":
            return _run_state(args)
        if cmd == "unpin":
            return _run_unpin(args)
    except _Refused as exc:
        return _err(str(exc), EXIT_REFUSED)
    except ApprovalError as exc:
        return _err(str(exc), EXIT_REFUSED)
    except CommandError as exc:
        return _err(str(exc), EXIT_USAGE)
    except ControlError as exc:  # the console holding --db stopped answering or refused to record
        return _err(f"the running console could not record: {exc}", EXIT_REFUSED)
    return _err(f"unknown command {cmd!r}")
