"""Coverage-guided fuzzing (atheris / libFuzzer) of the parsers a remote peer or insider can feed.

Targets:
  frame     protos.serde.decode_frame and decode_stream_item: only WireError may escape, and an
            accepted frame must satisfy the storage invariants and re-encode to an equal frame
  payload   protos.signing.parse_payload (signed command payloads): only SigningError, and an
            accepted payload re-encodes to exactly the input bytes (one canonical form)
  manifest  agent.act.checkpoints' strict manifest/signature-document parsing: only CheckpointError

atheris is not a project dependency (`pip install atheris`; wheels exist for CPython 3.11 on
x86-64 Linux). The seed corpus is generated from valid inputs; crashes are written by libFuzzer
as crash-<sha1> in the working directory and should become regression tests.

    python benchmarks/fuzz_atheris.py --target frame --seconds 300
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import tempfile
import time
from pathlib import Path

import atheris
import numpy as np

with atheris.instrument_imports():
    from agent.act import checkpoints as ck
    from protos import serde, signing
    from protos.types import METRIC_SCHEMA, N_METRICS, Event, Frame, Gap, GpuProcess, TrainRecord, WireError


def _frame_invariants(f: Frame) -> None:
    assert f.host and f.epoch and f.seq >= 1 and f.metric_schema == METRIC_SCHEMA
    n = len(f.gpu_index)
    assert f.gpu_values.shape == (n, N_METRICS) and len(f.gpu_state) == n
    again = serde.decode_frame(serde.encode_frame(f))
    assert again.host == f.host and again.seq == f.seq and again.epoch == f.epoch
    assert np.array_equal(again.gpu_values, f.gpu_values, equal_nan=True)
    assert len(again.events) == len(f.events) and len(again.train) == len(f.train)
    for a, b in zip(again.train, f.train, strict=True):
        assert a.step == b.step and (a.loss == b.loss or (math.isnan(a.loss) and math.isnan(b.loss)))


def fuzz_frame(data: bytes) -> None:
    try:
        f = serde.decode_frame(data)
    except WireError:
        f = None
    if f is not None:
        _frame_invariants(f)
    try:
        item = serde.decode_stream_item(data)
    except WireError:
        return
    if isinstance(item, Frame):
        _frame_invariants(item)
    else:
        assert item.epoch and item.first_seq >= 1


def fuzz_payload(data: bytes) -> None:
    try:
        p = signing.parse_payload(data)
    except signing.SigningError:
        return
    assert signing.payload_bytes(p) == data, "two byte forms of one payload"


def fuzz_manifest(data: bytes) -> None:
    try:
        ck._parse_manifest(data, "sha256:" + hashlib.sha256(data).hexdigest(), "k")
    except ck.CheckpointError:
        pass
    try:
        ck._check_signature(b"manifest", data, {})
    except ck.CheckpointError:
        pass


def seeds(target: str) -> list[bytes]:
    now = time.time_ns()
    if target == "frame":
        out = []
        for n in (0, 1, 8):
            f = Frame("gpu-01", "a" * 32, 7, now, True, np.full((n, N_METRICS), 1.5, dtype=np.float32), list(range(n)),
                      [0] * n, [GpuProcess(0, 42, 1.0)] if n else [],
                      [TrainRecord(now, "job", 0, 0, 8, 42, 1000, 3, loss=2.5, extra={"mfu": 0.4}, info={"a": "b"})],
                      [Event(now, "xid", 3, 0, 0, "XID 79", {"xid": "79"})])
            raw = serde.encode_frame(f)
            out += [raw, serde.wrap_frame(raw)]
        return [*out, serde.encode_gap(Gap("a" * 32, 3, 9, "evicted", now))]
    if target == "payload":
        p = signing.make_payload("freeze", "job", ["gpu-01", "gpu-02"], "fuzz seed", now_ns=now)
        r = signing.make_payload("rollback", "job", ["gpu-01"], "seed", now_ns=now,
                                 checkpoint_digest="sha256:" + "0" * 64)
        return [signing.payload_bytes(p), signing.payload_bytes(r)]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "a").mkdir()
        (d / "a" / "w.bin").write_bytes(b"w" * 100)
        (d / "s.json").write_text("{}")
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        ck.sign_checkpoint_with_key(d, Ed25519PrivateKey.generate(), "job", "run", 5, 2)
        return [(d / ck.MANIFEST_NAME).read_bytes(), (d / ck.SIGNATURE_NAME).read_bytes()]


TARGETS = {"frame": fuzz_frame, "payload": fuzz_payload, "manifest": fuzz_manifest}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", choices=sorted(TARGETS), default="frame")
    ap.add_argument("--seconds", type=int, default=300)
    ap.add_argument("--corpus", type=Path, help="corpus dir (default: a fresh temp dir with the seeds)")
    ap.add_argument("libfuzzer_args", nargs="*", help="extra libFuzzer flags, e.g. -jobs=2")
    args = ap.parse_args()
    corpus = args.corpus or Path(tempfile.mkdtemp(prefix=f"gpusoc-fuzz-{args.target}-"))
    corpus.mkdir(parents=True, exist_ok=True)
    for s in seeds(args.target):
        (corpus / hashlib.sha1(s).hexdigest()).write_bytes(s)
    argv = [sys.argv[0], str(corpus), f"-max_total_time={args.seconds}", "-print_final_stats=1",
            "-rss_limit_mb=2048", "-timeout=5", *args.libfuzzer_args]
    print(f"fuzzing {args.target} for {args.seconds} s, corpus {corpus}", flush=True)
    atheris.Setup(argv, TARGETS[args.target])
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
