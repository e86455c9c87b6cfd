"""Wiring for `gpusoc-agent run`: config → collector → SDK receiver → buffer → server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import math
import sys
from pathlib import Path
from typing import Any

from agent.buffer import FrameBuffer
from agent.collect.base import Collector, NoDriverError
from agent.config import AgentConfig
from agent.runtime import AgentRuntime
from protos.types import Event

log = logging.getLogger("gpusoc.agent")


def _issued_by(cert_path: str, cas: list[Any]) -> bool:
    """Whether the certificate at `cert_path` names one of `cas` as its issuer (a mix-up check)."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    except (OSError, ValueError):
        return False
    return any(cert.issuer == ca.subject for ca in cas)


class StartupError(Exception):
    """A setting the agent cannot start with (exit 2, one line)."""


def make_collector(simulate_gpus: int, host: str) -> Collector:
    """NVML unless simulation was asked for; NoDriverError propagates with its one-line message."""
    if simulate_gpus > 0:
        from agent.collect.simulated import SimulatedCollector

        return SimulatedCollector(simulate_gpus, host=host)  # serve_forever points its load at the runtime
    from agent.collect.nvml import NvmlCollector

    collector = NvmlCollector()
    collector.gpus()  # forces NVML init now, so a missing driver fails at start-up
    return collector


def _listen_problem(listen: str) -> OSError | None:
    """Why `listen` cannot be bound now (one line, exit 4), or None: probed as gRPC binds it.

    Checked before gRPC starts, so a port in use is reported in our words alone (gRPC's C core
    logs its own "Failed to add port" line first) and before the spool is opened. Like gRPC, one
    address of a name that binds is enough (`localhost` without IPv6 still works).
    """
    import socket

    host, _, port = listen.rpartition(":")
    try:
        if int(port) == 0:
            return None
        infos = socket.getaddrinfo(host.strip("[]") or None, int(port), type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        return OSError(f"cannot listen on {listen}: cannot resolve {host!r} ({err.strerror or err})")
    except (ValueError, OSError):
        return None  # not HOST:PORT: the config check or gRPC says so
    first: OSError | None = None
    for family, kind, proto, _, addr in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
                probe.bind(addr)
            return None
        except OSError as err:
            first = first or err
    if first is None:
        return None
    why = first.strerror or str(first)
    if first.errno == errno.EACCES:
        return OSError(
            f"cannot listen on {listen}: no permission ({why}); ports below 1024 need root or CAP_NET_BIND_SERVICE"
        )
    return OSError(f"cannot listen on {listen}: the port is in use or the address is not local ({why})")


def _cannot_listen(listen: str, exc: RuntimeError) -> OSError:
    """gRPC's bind failure as one line (exit 4), with the reason the kernel gives for the address now."""
    problem = _listen_problem(listen)
    if problem is None:
        return OSError(f"cannot listen on {listen}: gRPC could not bind it, although the address binds now ({exc})")
    return problem


async def serve_forever(c: AgentConfig, collector: Collector) -> None:
    """Run the tick loop and the gRPC server until SIGINT/SIGTERM.

    Everything started is undone on the way out, in reverse order, also when a later part fails to
    start (a /metrics port in use, a bad operator CA): no stale training socket, no spool left
    unflushed or locked, no integrity thread.
    """
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(collector.close)
        await _serve(c, collector, stack)


async def _serve(c: AgentConfig, collector: Collector, stack: contextlib.AsyncExitStack) -> None:
    from agent.serve import start_server
    from agent.tls import check_host_matches_certificate, load_server_credentials
    from agent.training import TrainingReceiver

    interval = float(c.sample_interval_s)
    max_frames = max(60, math.ceil(float(c.buffer_seconds) / interval))
    # Checks first (TLS, listen address, operator CA path): a refused start must not touch the spool
    # (a host-name typo would move it aside).
    creds = None
    if not c.insecure:
        creds = load_server_credentials(c.tls_cert, c.tls_key, c.tls_client_ca)
        check_host_matches_certificate(c.host, c.tls_cert)
    problem = _listen_problem(c.listen)
    if problem is not None:
        raise problem
    if c.operator_ca and Path(c.operator_ca).exists() and not Path(c.operator_ca).is_file():
        raise StartupError(
            f"operator CA {c.operator_ca} is not a file (operator_ca / GPUSOC_AGENT_OPERATOR_CA): point it at the "
            "operator CA's PEM certificate, e.g. /etc/gpusoc/tls/operator-ca.pem"
        )
    buffer: FrameBuffer | None = None
    if c.spool:
        from agent.spool import SpoolBuffer, SpoolError, kept_aside

        try:
            buffer = SpoolBuffer(
                Path(c.state_dir) / "spool",
                max_bytes=int(c.buffer_max_bytes),
                max_age_s=float(c.buffer_seconds),
                host=c.host,
            )
        except (SpoolError, OSError) as exc:
            if exc.errno == errno.EBUSY:
                raise  # another agent owns this state dir: refuse to start (exit 4) rather than run without it
            log.error("%s: falling back to the in-memory buffer (a restart loses unsent frames)", exc)
        old = kept_aside(Path(c.state_dir) / "spool")
        if old:
            log.warning("%d spool(s) kept after a host change (never deleted by the agent): %s; serve each as "
                        "its host (rename it back to spool under that host's state dir) or delete it once no "
                        "console needs its frames", len(old),
                        ", ".join(f"{p} ({n / 1e6:.1f} MB)" for p, n in old))
    if buffer is None:
        buffer = FrameBuffer(max_frames=max_frames, max_bytes=int(c.buffer_max_bytes))
    close_buffer = getattr(buffer, "close", None)
    if close_buffer is not None:
        stack.callback(close_buffer)  # flushes and unlocks the spool
    # Poll every 5 ms while a loop logs, back to a blocking wait after 20 ms idle:
    # about 1% of a core with a loop logging at 10 Hz (docs/benchmarks.md).
    receiver = TrainingReceiver(c.training_socket or None, poll_interval_s=0.005, idle_after_s=0.02)
    stack.callback(receiver.close)  # removes the training socket
    runtime = AgentRuntime(c.host, collector, buffer, interval, training=receiver)
    from agent.collect.simulated import SimulatedCollector

    if isinstance(collector, SimulatedCollector):
        collector.load_source = runtime.gpu_activity  # GPUs run hot while their ranks log
    control = None
    if c.operator_ca and Path(c.operator_ca).is_file():  # else commands are refused (no crypto loaded: -10 MB)
        from agent.act.controller import controller_from_config
        from agent.pki import PkiError

        try:
            control = controller_from_config(c, receiver.jobs, runtime.add_event)
        except PkiError as exc:
            raise StartupError(
                f"operator CA unusable (operator_ca / GPUSOC_AGENT_OPERATOR_CA): {exc}; point it at the PEM "
                "certificate(s) of the operator CA that signs commands, or remove it to refuse all commands"
            ) from None
        if control is not None:
            names = ", ".join(ca.subject.rfc4514_string() for ca in control.verifier.operator_cas)
            log.info("control commands enabled: operator CA %s (%s); commands signed by operators it issued "
                     "are accepted", c.operator_ca, names)
            if creds is not None and _issued_by(c.tls_cert, control.verifier.operator_cas):
                log.warning("the operator CA %s is the CA that issued this agent's own certificate: operators "
                            "are normally issued by a CA of their own (pki/operator-ca.pem from `gpusoc-agent "
                            "pki init`); check operator_ca", c.operator_ca)
    else:
        log.warning("control commands disabled: operator CA %s not found", c.operator_ca or "(unset)")
    try:
        server, port = await start_server(runtime, c.listen, creds, control)
    except RuntimeError as exc:  # grpc: "Failed to bind to address X; set GRPC_VERBOSITY=debug ..."
        if "Failed to bind" not in str(exc):
            raise
        raise _cannot_listen(c.listen, exc) from None
    stack.push_async_callback(server.stop, 1.0)  # streams end before the spool closes
    from agent.integrity import IntegrityMonitor

    loop = asyncio.get_running_loop()
    integrity = IntegrityMonitor(
        watch_paths=[p.strip() for p in c.watch_paths.split(",") if p.strip()],
        check_packages=[p.strip() for p in c.integrity_packages.split(",") if p.strip()],
        interval_s=c.integrity_interval_s,
    )

    def to_next_frame(event: Event) -> None:  # called on the integrity thread
        with contextlib.suppress(RuntimeError):  # the loop closed while a check ran: the agent is stopping
            loop.call_soon_threadsafe(runtime.add_event, event)

    integrity.start(to_next_frame)
    stack.callback(integrity.stop)
    if c.metrics_listen:
        from agent.prometheus import MetricsExporter

        try:
            exporter = MetricsExporter.from_listen(c.metrics_listen).start()
        except OSError as exc:
            raise OSError(
                f"cannot serve /metrics on {c.metrics_listen} (--metrics-listen): {exc.strerror or exc}"
            ) from None
        stack.callback(exporter.close)
        runtime.frame_listeners.append(exporter.listener(collector.gpus()))
    n_gpus = len(collector.gpus())
    log.info(
        "serving %s on %s (port %d), %s, %s, training socket %s, epoch %s",
        c.host,
        c.listen,
        port,
        f"{n_gpus} SIMULATED GPUs" if collector.simulated else f"{n_gpus} GPUs via NVML",
        "INSECURE plaintext" if creds is None else "mTLS",
        receiver.socket_path,
        buffer.epoch,
    )
    from agent.cli import install_signal_handlers

    stop = asyncio.Event()
    install_signal_handlers(loop, stop)
    task = asyncio.create_task(runtime.run())
    await stop.wait()
    log.info("stopping")
    runtime.stop()
    await task


def _os_error_text(exc: OSError) -> str:
    """An OSError as a sentence: without Python's `[Errno N]` prefix, the file name after it."""
    if exc.errno is None or not exc.strerror:
        return str(exc)
    if exc.filename and str(exc.filename) not in exc.strerror:
        return f"{exc.strerror}: {exc.filename}"
    return exc.strerror


def run_agent_cli(args: argparse.Namespace) -> int:
    from agent.config import ConfigError, enforce_insecure_loopback, load_config

    overrides = {
        k: getattr(args, k)
        for k in (
            "listen",
            "simulate_gpus",
            "training_socket",
            "sample_interval_s",
            "host",
            "tls_cert",
            "tls_key",
            "tls_client_ca",
            "insecure",
            "metrics_listen",
            "spool",
        )
        if getattr(args, k, None) is not None
    }
    try:
        cfg = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"gpusoc-agent: config error: {exc}", file=sys.stderr)
        return 2
    try:
        collector = make_collector(cfg.simulate_gpus, cfg.host)
    except NoDriverError as exc:
        print(f"gpusoc-agent: {exc}", file=sys.stderr)
        return 3
    cfg, warning = enforce_insecure_loopback(cfg)
    if cfg.insecure:
        log.warning("INSECURE: no TLS and no client authentication; listening on loopback only (%s)", cfg.listen)
    if warning:
        log.warning("%s", warning)
    try:
        asyncio.run(serve_forever(cfg, collector))
    except OSError as exc:
        print(f"gpusoc-agent: {_os_error_text(exc)}", file=sys.stderr)
        return 4
    except Exception as exc:
        from agent.prometheus import MetricsUnavailableError
        from agent.tls import TlsFileError

        if isinstance(exc, MetricsUnavailableError | StartupError):
            print(f"gpusoc-agent: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, TlsFileError):
            print(f"gpusoc-agent: TLS setup failed: {exc}", file=sys.stderr)
            return 2
        raise
    return 0
