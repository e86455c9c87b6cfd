"""`gpusoc-console`: the desktop console, and its headless commands (collect, export, query).

Subcommand-free invocation opens the window; `--demo` starts a local simulated fleet first.
`query`, `export` and `alerts` open the store read-only; when a running console holds it, they
ask that console over its control socket `<db>.ctl` instead (console/store/control.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from console import __version__

# gRPC's C core prints its own INFO lines (a failed TLS handshake, for one) on stderr ahead of
# our one-line diagnosis; keep its errors only. GRPC_VERBOSITY=debug in the environment wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

log = logging.getLogger("gpusoc.console")

DEFAULT_TLS_DIR = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "gpusoc" / "tls"


def _add_tls(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mTLS (default: $GPUSOC_CONSOLE_TLS_* or ~/.config/gpusoc/tls/)")
    env = os.environ.get
    g.add_argument("--tls-ca", default=env("GPUSOC_CONSOLE_TLS_CA", str(DEFAULT_TLS_DIR / "agent-ca.pem")),
                   help="CA that agent certificates chain to")
    g.add_argument("--tls-cert", default=env("GPUSOC_CONSOLE_TLS_CERT", str(DEFAULT_TLS_DIR / "console.pem")),
                   help="this console's client certificate")
    g.add_argument("--tls-key", default=env("GPUSOC_CONSOLE_TLS_KEY", str(DEFAULT_TLS_DIR / "console.key")),
                   help="this console's private key")
    g.add_argument("--insecure", action="store_true",
                   help="plaintext to agents on loopback addresses only (agents started with --insecure); warns")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpusoc-console",
        description="gpusoc operator console. Without a command it opens the desktop window.",
    )
    p.add_argument("--version", action="version", version=f"gpusoc-console {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--agents", nargs="+", metavar="FILE|HOST:PORT",
                   help="inventory file (re-read on change) or agent addresses")
    p.add_argument("--db", help="DuckDB file to store into (default: ./gpusoc.duckdb, or a temp dir with --demo)")
    p.add_argument("--demo", action="store_true",
                   help="start a local simulated fleet (mTLS, 32 hosts x 8 GPUs, two jobs, faults) and open it")
    p.add_argument("--demo-hosts", type=int, default=32, help="hosts in the demo fleet")
    p.add_argument("--open", metavar="FILE", help="open an exported audit file read-only and replay it")
    _add_tls(p)
    sub = p.add_subparsers(dest="cmd")

    c = sub.add_parser("collect", help="headless: subscribe to the fleet and store into DuckDB until stopped")
    c.add_argument("--agents", nargs="+", required=True, metavar="FILE|HOST:PORT",
                   help="inventory file (one 'HOST:PORT [NAME]' per line, re-read on change) or addresses")
    c.add_argument("--db", required=True, help="DuckDB file")
    c.add_argument("--raw-retention", type=float, default=None, metavar="SECONDS",
                   help="keep raw GPU samples this long, then roll them up to 1-minute min/mean/max")
    c.add_argument("--status-every", type=float, default=10.0, metavar="SECONDS", help="status line period")
    _add_tls(c)

    e = sub.add_parser("export", help="write a standalone DuckDB file for auditors and print its audit head "
                                      "(asks the running console when one holds the store)")
    e.add_argument("--db", required=True)
    e.add_argument("--out", required=True)

    q = sub.add_parser("query", help="run SQL against a store (read-only) and print the result "
                                     "(asks the running console when one holds the store)")
    q.add_argument("--db", required=True)
    q.add_argument("sql")
    q.add_argument("--json", action="store_true", help="JSON lines instead of a table")

    al = sub.add_parser("alerts", help="list the alerts stored in a store or an exported file")
    al.add_argument("--db", required=True)
    al.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    al.add_argument("--state", choices=("open", "acknowledged", "resolved"), help="only alerts in this state")
    al.add_argument("--limit", type=int, default=None)

    d = sub.add_parser("detect", help="run the detectors offline over a collected or exported file")
    d.add_argument("--db", required=True)
    d.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    d.add_argument("--store", action="store_true", help="also upsert the alerts into the file's alerts table")

    from console.respond.cli_audit import add_audit_parser

    add_audit_parser(sub)
    from console.respond.cli_command import add_command_parser

    add_command_parser(sub)
    return p


def tls_from_args(args: argparse.Namespace, addresses: list[str]) -> object | None:
    """ConsoleTls, or None with --insecure (then only loopback agents are allowed)."""
    from console.ingest.tls import ConsoleTls

    if args.insecure:
        import ipaddress

        from console.ingest.inventory import parse_address

        for a in addresses:
            host, _ = parse_address(a)
            try:
                loop = ipaddress.ip_address(host).is_loopback
            except ValueError:
                loop = host == "localhost"
            if not loop:
                raise SystemExit(f"gpusoc-console: --insecure only talks to loopback agents; {a} is not one")
        log.warning("INSECURE: plaintext gRPC without mutual TLS (loopback agents only)")
        return None
    for path in (args.tls_ca, args.tls_cert, args.tls_key):
        if not Path(path).is_file():
            raise SystemExit(
                f"gpusoc-console: mTLS file {path} not found. Give --tls-ca/--tls-cert/--tls-key "
                "(see docs/pki.md: gpusoc-agent pki init), or --insecure for loopback test agents."
            )
    return ConsoleTls(args.tls_ca, args.tls_cert, args.tls_key)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.cmd in ("query", "alerts", "detect"):
        _quiet_on_closed_pipe()
    if args.cmd == "collect":
        from console.collect import run_collect

        return run_collect(args)
    if args.cmd == "export":
        return _export(args)
    if args.cmd == "query":
        return _query(args)
    if args.cmd == "alerts":
        return _alerts(args)
    if args.cmd == "detect":
        from console.detect.alerts import format_alerts
        from console.detect.engine import detect_file

        try:
            print(format_alerts(detect_file(args.db, store=args.store), as_json=args.json))
        except Exception as exc:
            print(f"gpusoc-console detect: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.cmd == "audit":
        from console.respond.cli_audit import run_audit

        return run_audit(args)
    if args.cmd == "command":
        from console.respond.cli_command import run_command

        return run_command(args)
    from console.app import run_desktop

    return run_desktop(args)


def _quiet_on_closed_pipe() -> None:
    """`gpusoc-console alerts ... | head` ends quietly, as `cat` would, instead of printing Broken pipe.

    Only for commands that print a result and exit: a long-running console must survive a peer
    that closes a socket.
    """
    import signal

    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)


def _is_locked(exc: BaseException) -> bool:
    """True when opening the store failed because another process holds DuckDB's file lock."""
    from console.store.query import StoreLockedError, is_lock_error

    return isinstance(exc, StoreLockedError) or is_lock_error(exc)


def _ask_running_console(cmd: str, db: str, locked: BaseException, payload: dict[str, Any],
                         timeout: float) -> tuple[bool, Any]:
    """The store is locked: ask the console that holds it over `<db>.ctl` (docs/operator-guide.md).

    Returns (True, result), or (False, None) after printing why on stderr.
    """
    from console.store import control

    path = control.socket_path(db)
    try:
        result, pid = control.request(path, payload, timeout)
    except control.ControlUnavailable as why:
        _, holder = control.lock_holder(str(locked))
        print(
            f"gpusoc-console {cmd}: cannot open {db}: it is locked by {holder}, and no gpusoc console answers "
            f"on {path} ({why}). If that process is a gpusoc console without a control socket (an older "
            "version), stop it and run this again; otherwise stop the program that holds the file.",
            file=sys.stderr,
        )
        return False, None
    except control.ControlError as err:
        _note_running_console(cmd, err.pid, path)
        print(f"gpusoc-console {cmd}: {err}", file=sys.stderr)
        return False, None
    _note_running_console(cmd, pid, path)
    return True, result


def _note_running_console(cmd: str, pid: int | None, path: Path) -> None:
    who = f"pid {pid}" if pid is not None else "pid ?"
    print(f"gpusoc-console {cmd}: store is in use by a running console ({who}); asked it over {path}",
          file=sys.stderr)


def _export(args: argparse.Namespace) -> int:
    import json

    from console.store import control
    from console.store.export import export_db

    try:
        info = export_db(args.db, args.out)
    except Exception as exc:
        if not _is_locked(exc):
            print(f"gpusoc-console export: {exc}", file=sys.stderr)
            return 1
        out = str(Path(args.out).expanduser().resolve())  # the console's cwd is not ours
        ok, info = _ask_running_console("export", args.db, exc, {"op": "export", "out": out},
                                        control.DEFAULT_EXPORT_TIMEOUT_S + 60)
        if not ok:
            return 1
    try:
        head = control.audit_head_of(info["path"])  # the head of what the auditor receives
    except Exception as exc:
        print(f"gpusoc-console export: wrote {info.get('path')} but cannot read its audit head: {exc}",
              file=sys.stderr)
        return 1
    for k in head:  # same keys in the same order on both paths (export_signed sets two of them)
        info.pop(k, None)
    info.update(head)
    print(json.dumps(info, default=str, indent=1))
    print(f"gpusoc-console export: {control.audit_head_note(head)}", file=sys.stderr)
    return 0


def _query(args: argparse.Namespace) -> int:
    from console.store import control
    from console.store.query import QueryError, StoreLockedError, format_json, format_table, run_query

    locked: StoreLockedError | None = None
    try:  # the same read-only rules offline as through a running console's control socket
        control.check_read_only(args.sql)
    except control.ControlError as exc:
        print(f"gpusoc-console query: {exc}", file=sys.stderr)
        return 1
    try:
        cols, rows = run_query(args.db, args.sql)
    except StoreLockedError as exc:
        locked = exc
    except QueryError as exc:
        print(f"gpusoc-console query: {exc}", file=sys.stderr)
        return 1
    if locked is not None:
        ok, res = _ask_running_console("query", args.db, locked, {"op": "query", "sql": args.sql},
                                       control.DEFAULT_QUERY_TIMEOUT_S + 60)
        if not ok:
            return 1
        cols, rows = list(res["columns"]), control.decode_rows(res["types"], res["rows"])
        if res.get("truncated"):
            print(f"gpusoc-console query: the running console returned the first {len(rows)} rows only; "
                  "add a LIMIT or aggregate, or export the store and query the copy", file=sys.stderr)
    print(format_json(cols, rows) if args.json else format_table(cols, rows))
    return 0


def _alerts(args: argparse.Namespace) -> int:
    from console.detect.alerts import Alert, format_alerts, list_alerts

    try:
        text = list_alerts(args.db, json=args.json, state=args.state, limit=args.limit)
        if text:  # JSON lines: no alerts is no output
            print(text)
        return 0
    except Exception as exc:
        if not _is_locked(exc):
            print(f"gpusoc-console alerts: {exc}", file=sys.stderr)
            return 1
        locked = exc
    ok, res = _ask_running_console("alerts", args.db, locked,
                                   {"op": "alerts", "state": args.state, "limit": args.limit}, 120.0)
    if not ok:
        return 1
    text = format_alerts([Alert(**a) for a in res], as_json=args.json)
    if text:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
