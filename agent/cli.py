"""`gpusoc-agent`: run the agent, make a development PKI, watch an agent's stream."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from agent import __version__

log = logging.getLogger("gpusoc.agent")


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the agent (NVML, or simulated GPUs with --simulate-gpus)")
    p.add_argument("--config", help="TOML config file (default /etc/gpusoc/agent.toml if it exists)")
    p.add_argument("--listen", help="HOST:PORT to serve gRPC on (default 0.0.0.0:7443)")
    p.add_argument("--simulate-gpus", type=int, metavar="N", help="simulate N GPUs instead of NVML")
    p.add_argument("--training-socket", metavar="PATH", help="Unix socket the training SDK sends to")
    p.add_argument("--sample-interval", type=float, dest="sample_interval_s", metavar="SECONDS",
                   help="seconds between frames (0.1..60, default 1)")
    p.add_argument("--host", help="host identity in frames (default: hostname; must match the cert CN)")
    p.add_argument("--tls-cert", help="agent certificate (PEM)")
    p.add_argument("--tls-key", help="agent private key (PEM)")
    p.add_argument("--tls-client-ca", help="CA that console certificates must chain to (PEM)")
    p.add_argument("--insecure", action="store_true", default=None,
                   help="plaintext, no client auth: binds loopback only and warns")


def _add_pki(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pki", help="development certificate authority and certificates")
    psub = p.add_subparsers(dest="pki_cmd", required=True)
    init = psub.add_parser("init", help="create (or extend) a dev PKI: agent CA, console CA, certs")
    init.add_argument("--out", required=True, help="directory to write into")
    init.add_argument("--agent", action="append", default=[], metavar="HOST",
                      help="agent host name to issue a server certificate for (repeatable)")
    init.add_argument("--console", action="append", default=[], metavar="NAME",
                      help="console name to issue a client certificate for (repeatable)")
    init.add_argument("--days", type=int, default=30, help="validity of new certificates")
    init.add_argument("--overwrite", action="store_true", help="replace existing files")


def _add_watch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("watch", help="live text view of an agent's frame stream")
    p.add_argument("address", help="HOST:PORT of the agent")
    p.add_argument("--ca", help="agent CA (PEM) to verify the agent with")
    p.add_argument("--cert", help="console certificate (PEM)")
    p.add_argument("--key", help="console private key (PEM)")
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
    if args.cmd == "pki":
        from agent.pki import PkiError, create_dev_pki

        try:
            paths = create_dev_pki(Path(args.out), agents=args.agent, consoles=args.console,
                                   days=args.days, overwrite=args.overwrite)
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


def install_signal_handlers(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


if __name__ == "__main__":
    sys.exit(main())
