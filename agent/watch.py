"""`gpusoc-agent watch`: a live text view of one agent's frames, for on-call at a shell."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import grpc

from protos import serde
from protos.types import GPU_STATE_NAMES, METRIC_INDEX, Frame, Gap, SubscribeRequest

# (metric, column header): headers short enough to read whole, with units, like `nvidia-smi dmon`.
_COLS = (("gpu_util_pct", "util %"), ("mem_used_mib", "mem MiB"), ("temp_c", "temp C"), ("power_w", "power W"),
         ("sm_clock_mhz", "sm MHz"), ("ecc_uncorrected", "ecc uncor"))


def open_channel(address: str, insecure: bool, ca: str | None, cert: str | None, key: str | None) -> grpc.aio.Channel:
    """A channel to an agent: mTLS unless insecure was asked for."""
    if insecure:
        return grpc.aio.insecure_channel(address)
    missing = [
        f"{flag} {path}"
        for flag, path in (("--ca", ca), ("--cert", cert), ("--key", key))
        if not path or not os.path.isfile(path)
    ]
    if missing:
        raise SystemExit(
            "gpusoc-agent watch: mTLS needs the console's CA, certificate and key; not found: "
            + ", ".join(missing)
            + " (give --ca/--cert/--key, or --insecure for an --insecure agent)"
        )
    assert ca and cert and key
    from agent.pki import channel_credentials

    return grpc.aio.secure_channel(address, channel_credentials(ca, cert, key))


def connection_hint(code: grpc.StatusCode, details: str, *, insecure: bool, received: int = 0) -> str:
    """What to change when the connection itself failed; "" when the error says enough."""
    if code != grpc.StatusCode.UNAVAILABLE:
        return ""
    if "Connection refused" in details or "connection refused" in details:
        return " (nothing listens there: is the agent running, and is this its --listen port?)"
    if insecure:
        return " (an agent started without --insecure needs mTLS: give --ca, --cert and --key)"
    if "WRONG_VERSION_NUMBER" in details:  # our TLS ClientHello was answered in plaintext
        return " (is the agent running with --insecure? then pass --insecure)"
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return (
            " (the agent's certificate was not accepted: --ca must be the agent CA that issued it,"
            " pki/agent-ca.pem, and the certificate must be valid now)"
        )
    if "Socket closed" in details and received == 0:  # the agent ended the handshake: our certificate
        return (
            " (the agent may have refused --cert: its --tls-client-ca must be the console CA that issued it,"
            " pki/console-ca.pem)"
        )
    return ""


def _fmt(v: float) -> str:
    return "  n/a" if math.isnan(v) else f"{v:5.0f}"


def render(frame: Frame) -> str:
    """A few lines per frame, like `nvidia-smi dmon`, with the simulated label up front."""
    label = "SIMULATED " if frame.simulated else ""
    ts = time.strftime("%H:%M:%S", time.gmtime(frame.ts_unix_ns / 1e9))
    lines = [
        f"{label}{frame.host} epoch {frame.epoch[:8]} seq {frame.seq} {ts}Z"
        f"  records {len(frame.train)} events {len(frame.events)}"
    ]
    header = "  gpu state " + " ".join(f"{label:>10}" for _, label in _COLS)
    lines.append(header)
    for row, idx in enumerate(frame.gpu_index):
        vals = " ".join(f"{_fmt(float(frame.gpu_values[row, METRIC_INDEX[c]])):>10}" for c, _ in _COLS)
        lines.append(f"  {idx:3d} {GPU_STATE_NAMES.get(frame.gpu_state[row], '?'):>5} {vals}")
    for r in frame.train[-3:]:
        lines.append(f"  train job={r.job_id} rank={r.rank} step={r.step} loss={r.loss:.4g} pid={r.pid}")
    for e in frame.events:
        lines.append(f"  event {e.kind}: {e.detail}")
    return "\n".join(lines)


async def watch(args: argparse.Namespace) -> int:
    channel = open_channel(args.address, args.insecure, args.ca, args.cert, args.key)
    call = channel.unary_stream(
        serde.SUBSCRIBE_METHOD,
        request_serializer=serde.encode_subscribe_request,
        response_deserializer=serde.decode_stream_item,
    )
    n = 0
    try:
        async for item in call(SubscribeRequest(from_now=True)):
            if isinstance(item, Gap):
                print(f"GAP epoch {item.epoch[:8]} seq {item.first_seq}..{item.last_seq or '?'} ({item.reason})")
                continue
            print(render(item), flush=True)
            n += 1
            if args.count and n >= args.count:
                break
    except grpc.aio.AioRpcError as exc:
        hint = connection_hint(exc.code(), exc.details() or "", insecure=args.insecure, received=n)
        print(f"gpusoc-agent watch: {args.address}: {exc.code().name}: {exc.details()}{hint}", file=sys.stderr)
        return 1
    finally:
        await channel.close(None)
    return 0
