"""`gpusoc-agent`: run the agent, make a development PKI, watch an agent's stream, sign checkpoints."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from agent import __version__

# gRPC's C core prints its own INFO lines (a failed TLS handshake, for one) on stderr ahead of
# our one-line diagnosis; keep its errors only. GRPC_VERBOSITY=debug in the environment wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

log = logging.getLogger("gpusoc.agent")


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the agent (NVML, or simulated GPUs with --simulate-gpus)")
    p.add_argument("--config", help="TOML config file (default /etc/gpusoc/agent.toml if it exists)")
    p.add_argument("--listen", help="HOST:PORT to serve gRPC on (default 0.0.0.0:7443)")
    p.add_argument("--simulate-gpus", type=int, metavar="N", help="simulate N GPUs instead of NVML")
    p.add_argument("--training-socket", metavar="PATH", help="Unix socket the training SDK sends to")
    p.add_argument(
        "--sample-interval",
        type=float,
        dest="sample_interval_s",
        metavar="SECONDS",
        help="seconds between frames (0.1..60, default 1)",
    )
    p.add_argument("--host", help="host identity in frames (default: hostname; must match the cert CN)")
    p.add_argument("--tls-cert", help="agent certificate (PEM)")
    p.add_argument("--tls-key", help="agent private key (PEM)")
    p.add_argument("--tls-client-ca", help="CA that console certificates must chain to (PEM)")
    p.add_argument(
        "--no-spool",
        dest="spool",
        action="store_false",
        default=None,
        help="keep history in memory only (default: durable spool under the state dir)",
    )
    p.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus /metrics with dcgm-exporter names (default: off)",
    )
    p.add_argument(
        "--insecure", action="store_true", default=None, help="plaintext, no client auth: binds loopback only and warns"
    )


def _add_pki(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pki", help="development certificate authority and certificates")
    psub = p.add_subparsers(dest="pki_cmd", required=True)
    init = psub.add_parser("init", help="create (or extend) a dev PKI: agent CA, console CA, certs")
    init.add_argument("--out", required=True, help="directory to write into")
    init.add_argument(
        "--agent",
        action="append",
        default=[],
        metavar="HOST",
        help="agent host name to issue a server certificate for (repeatable)",
    )
    init.add_argument(
        "--console",
        action="append",
        default=[],
        metavar="NAME",
        help="console name to issue a client certificate for (repeatable)",
    )
    init.add_argument("--days", type=int, default=30, help="validity of new certificates")
    init.add_argument("--overwrite", action="store_true", help="replace existing files")
    op = psub.add_parser(
        "operator",
        help="issue an operator signing identity (Ed25519, role in the certificate) from the operator CA",
    )
    op.add_argument("--out", required=True, help="PKI directory (operator-ca.pem/.key created there if missing)")
    op.add_argument("--name", required=True, help="operator name (certificate CN)")
    op.add_argument("--role", required=True, choices=["viewer", "responder", "admin"], help="operator role")
    op.add_argument("--days", type=int, default=1, help="validity (default 1 day: operator certs are short-lived)")
    op.add_argument("--overwrite", action="store_true", help="reissue an existing operator")


def _add_checkpoint(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("checkpoint", help="sign or verify a checkpoint directory (docs/response.md)")
    csub = p.add_subparsers(dest="ckpt_cmd", required=True)
    sign = csub.add_parser("sign", help="write gpusoc-manifest.json + gpusoc-manifest.sig into DIR")
    sign.add_argument("dir", help="checkpoint directory")
    sign.add_argument("--key", required=True, help="Ed25519 private key (PEM): an operator or pipeline signer key")
    sign.add_argument("--job", required=True)
    sign.add_argument("--run", required=True)
    sign.add_argument("--step", type=int, required=True)
    sign.add_argument("--world-size", type=int, required=True)
    verify = csub.add_parser("verify", help="verify DIR strictly against pinned keys; exit 1 when it fails")
    verify.add_argument("dir", help="checkpoint directory")
    verify.add_argument(
        "--trust",
        action="extend",
        nargs="+",
        required=True,
        metavar="PEM",
        help="trusted Ed25519 public key(s) or certificate(s); repeatable",
    )
    verify.add_argument("--job", help="require this job")
    verify.add_argument("--run", help="require this run")
    verify.add_argument("--world-size", type=int, help="require this world size")
    verify.add_argument("--json", action="store_true", help="print the result as JSON")


def _add_watch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("watch", help="live text view of an agent's frame stream")
    p.add_argument("address", help="HOST:PORT of the agent")
    # Same defaults as gpusoc-console (docs/pki.md), so on a console machine no flags are needed.
    tls_dir = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "gpusoc" / "tls"
    p.add_argument(
        "--ca",
        default=os.environ.get("GPUSOC_CONSOLE_TLS_CA", str(tls_dir / "agent-ca.pem")),
        help="agent CA (PEM) to verify the agent with (default: $GPUSOC_CONSOLE_TLS_CA or %(default)s)",
    )
    p.add_argument(
        "--cert",
        default=os.environ.get("GPUSOC_CONSOLE_TLS_CERT", str(tls_dir / "console.pem")),
        help="console certificate (PEM) (default: $GPUSOC_CONSOLE_TLS_CERT or %(default)s)",
    )
    p.add_argument(
        "--key",
        default=os.environ.get("GPUSOC_CONSOLE_TLS_KEY", str(tls_dir / "console.key")),
        help="console private key (PEM) (default: $GPUSOC_CONSOLE_TLS_KEY or %(default)s)",
    )
    p.add_argument("--insecure", action="store_true", help="plaintext (agent started with --insecure)")
    p.add_argument("--count", type=int, default=0, help="stop after N frames (0 = forever)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpusoc-agent",
        description="gpusoc agent: streams GPU (NVML) and training telemetry to gpusoc consoles over mTLS.",
    )
    parser.add_argument("--version", action="version", version=f"gpusoc-agent {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_run(sub)
    _add_pki(sub)
    _add_watch(sub)
    _add_checkpoint(sub)
    from agent.fleetsim import add_arguments

    add_arguments(sub.add_parser("fleet-sim", help="serve many simulated agents (load tests, demos)"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.cmd == "run":
        from agent.main import run_agent_cli

        return run_agent_cli(args)
    if args.cmd == "pki" and args.pki_cmd == "operator":
        from agent.pki import PkiError, create_operator

        try:
            op = create_operator(Path(args.out), args.name, args.role, days=args.days, overwrite=args.overwrite)
        except (PkiError, FileExistsError) as exc:
            print(f"gpusoc-agent pki operator: {exc}", file=sys.stderr)
            return 2
        print(op)
        return 0
    if args.cmd == "checkpoint":
        return _checkpoint(args)
    if args.cmd == "pki":
        from agent.pki import PkiError, create_dev_pki

        try:
            paths = create_dev_pki(
                Path(args.out), agents=args.agent, consoles=args.console, days=args.days, overwrite=args.overwrite
            )
        except (PkiError, FileExistsError) as exc:
            print(f"gpusoc-agent pki: {exc}", file=sys.stderr)
            return 2
        print(paths)
        return 0
    if args.cmd == "fleet-sim":
        from agent.fleetsim import run_fleet

        return run_fleet(args)
    if args.cmd == "watch":
        from agent.watch import watch

        try:
            return asyncio.run(watch(args))
        except KeyboardInterrupt:
            return 0
    return 2


def _checkpoint(args: argparse.Namespace) -> int:
    """`checkpoint sign|verify`: 0 ok, 1 verification failed, 2 usage or I/O error."""
    import json

    from agent.act.checkpoints import CheckpointError, load_trusted_keys, sign_checkpoint, verify_checkpoint

    if args.ckpt_cmd == "sign":
        try:
            digest = sign_checkpoint(args.dir, args.key, args.job, args.run, args.step, args.world_size)
        except (CheckpointError, OSError) as exc:
            print(f"gpusoc-agent checkpoint sign: {exc}", file=sys.stderr)
            return 2
        print(digest)
        return 0
    try:
        trusted = load_trusted_keys(args.trust)
    except (CheckpointError, ValueError) as exc:
        print(f"gpusoc-agent checkpoint verify: {exc}", file=sys.stderr)
        return 2
    try:
        m = verify_checkpoint(
            args.dir, trusted, expect_job=args.job, expect_run=args.run, expect_world_size=args.world_size
        )
    except CheckpointError as exc:
        if args.json:
            print(json.dumps({"ok": False, "code": exc.code, "reason": str(exc)}))
        else:
            print(f"FAILED ({exc.code}): {exc}", file=sys.stderr)
        return 1
    result = {
        "ok": True,
        "digest": m.digest,
        "job": m.job,
        "run": m.run,
        "step": m.step,
        "world_size": m.world_size,
        "files": len(m.files),
        "signer_key_id": m.signer_key_id,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"OK {m.digest} job={m.job} run={m.run} step={m.step} world_size={m.world_size} files={len(m.files)}")
    return 0


def install_signal_handlers(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


if __name__ == "__main__":
    sys.exit(main())
