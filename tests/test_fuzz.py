"""Property-based fuzzing of the three parsers/verifiers an attacker can feed: no crash, no false accept.

* frames and stream items (protos.serde): random bytes and mutated valid frames raise only
  WireError, and whatever is accepted satisfies the frame invariants and re-encodes stably;
* signed command envelopes (agent.act.commands.CommandVerifier): a mutated envelope is never
  authorized unless it is, byte for byte, still the operator-signed command, and a payload
  re-signed after mutation is authorized only if it independently meets the command spec;
* signed checkpoint manifests (agent.act.checkpoints.verify_checkpoint): a mutated manifest,
  signature file or checkpoint file never verifies unless the bytes that matter are unchanged,
  and a mutated manifest re-signed by the trusted key verifies only if it exactly describes
  the files on disk.

CI runs GPUSOC_FUZZ_EXAMPLES (default 300) examples per property; for a long run:

    GPUSOC_FUZZ_EXAMPLES=20000 python -m pytest tests/test_fuzz.py -q

benchmarks/fuzz_atheris.py is the coverage-guided (atheris) harness for the frame parser.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.act import checkpoints as ck
from agent.act.commands import CommandVerifier, Peer, Refusal
from agent.act.replay import ReplayStore
from agent.pki import create_dev_pki, create_operator, load_operator_cas, load_operator_key
from protos import serde, signing
from protos.types import (
    METRIC_SCHEMA,
    N_METRICS,
    CommandEnvelope,
    CommandSignature,
    Event,
    Frame,
    Gap,
    GpuProcess,
    TrainRecord,
    WireError,
)

EXAMPLES = int(os.environ.get("GPUSOC_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])

# --------------------------------------------------------------------------- mutations


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """1-4 byte-level edits of `data`: flip, overwrite, insert, delete, truncate, duplicate a slice."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "dup"]))
        i = draw(st.integers(0, max(len(out) - 1, 0)))
        if op == "flip" and out:
            out[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and out:
            out[i] = draw(st.integers(0, 255))
        elif op == "insert":
            out[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and out:
            del out[i : i + draw(st.integers(1, 8))]
        elif op == "truncate":
            del out[i:]
        elif op == "dup" and out:
            j = draw(st.integers(i, len(out)))
            out[j:j] = out[i:j][:64]
    if bytes(out) == data:  # every example really changes something
        out = bytearray(data[:-1]) if data else bytearray(b"\0")
    return bytes(out)


# --------------------------------------------------------------------------- frames

names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)


@st.composite
def frames(draw: st.DrawFn) -> Frame:
    n = draw(st.integers(0, 4))
    raw = draw(st.binary(min_size=4 * n * N_METRICS, max_size=4 * n * N_METRICS))  # any float32, NaN/inf too
    values = np.frombuffer(raw, dtype="<f4").reshape(n, N_METRICS).astype(np.float32)
    events = [Event(draw(st.integers(0, 2**62)), draw(st.sampled_from(["xid", "gpu_lost", "command_refused",
                                                                          "file_changed", "process_start"])),
                    draw(st.integers(0, 4)), draw(st.integers(-1, 7)), draw(st.integers(0, 2**31)),
                    draw(names), draw(st.dictionaries(names, names, max_size=2)))
              for _ in range(draw(st.integers(0, 2)))]
    train = [TrainRecord(draw(st.integers(0, 2**62)), draw(names), draw(st.integers(0, 63)), draw(st.integers(0, 7)),
                         64, draw(st.integers(1, 2**31)), 1000, draw(st.integers(0, 10**6)),
                         loss=draw(st.floats(allow_nan=True)), extra=draw(st.dictionaries(names, st.floats(
                             allow_nan=False), max_size=2)),
                         kind=draw(st.sampled_from(["log", "init"])), info=draw(st.dictionaries(names, names,
                                                                                                  max_size=2)))
             for _ in range(draw(st.integers(0, 2)))]
    return Frame(host=draw(names), epoch=draw(st.text("0123456789abcdef", min_size=1, max_size=32)),
                 seq=draw(st.integers(1, 2**62)), ts_unix_ns=draw(st.integers(0, 2**62)), simulated=draw(st.booleans()),
                 gpu_values=values, gpu_index=list(range(n)), gpu_state=draw(st.lists(st.integers(0, 4), min_size=n,
                                                                                     max_size=n)),
                 processes=[GpuProcess(0, draw(st.integers(0, 2**31)), 10.0)] if n else [], train=train, events=events,
                 sdk_dropped=draw(st.integers(0, 1000)))


def _norm(v: Any) -> Any:
    """A comparable form: NaN-safe floats, arrays as bytes."""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else v
    if isinstance(v, np.ndarray):
        return (v.shape, v.astype("<f4").tobytes())
    if isinstance(v, list | tuple):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in sorted(v.items())}
    if hasattr(v, "__dataclass_fields__"):
        return {k: _norm(getattr(v, k)) for k in v.__dataclass_fields__}
    return v


def check_frame(f: Frame) -> None:
    """What storage relies on for every accepted frame."""
    assert isinstance(f.host, str) and f.host and isinstance(f.epoch, str) and f.epoch
    assert f.seq >= 1 and f.metric_schema == METRIC_SCHEMA
    n = len(f.gpu_index)
    assert f.gpu_values.dtype == np.float32 and f.gpu_values.shape == (n, N_METRICS)
    assert len(f.gpu_state) == n and n <= 1024
    assert all(isinstance(e.kind, str) and isinstance(e.attrs, dict) for e in f.events)
    assert all(isinstance(r.kind, str) and r.kind for r in f.train)
    again = serde.decode_frame(serde.encode_frame(f))  # accepted frames re-encode and stay equal
    assert _norm(again) == _norm(f)


def _decode_only_wire_errors(fn: Callable[[bytes], Any], data: bytes) -> Any:
    try:
        return fn(data)
    except WireError:
        return None


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_frame_parser(data: bytes) -> None:
    f = _decode_only_wire_errors(serde.decode_frame, data)
    if f is not None:
        check_frame(f)
    item = _decode_only_wire_errors(serde.decode_stream_item, data)
    if isinstance(item, Frame):
        check_frame(item)
    elif isinstance(item, Gap):
        assert item.epoch and item.first_seq >= 1


@FUZZ
@given(frames())
def test_valid_frames_round_trip(f: Frame) -> None:
    got = serde.decode_frame(serde.encode_frame(f))
    check_frame(got)


@FUZZ
@given(st.data(), frames())
def test_mutated_frames_and_stream_items(data: st.DataObject, f: Frame) -> None:
    raw = serde.encode_frame(f)
    bad = data.draw(mutated(raw))
    got = _decode_only_wire_errors(serde.decode_frame, bad)
    if got is not None:
        check_frame(got)
    wrapped = data.draw(mutated(serde.wrap_frame(raw)))
    item = _decode_only_wire_errors(serde.decode_stream_item, wrapped)
    if isinstance(item, Frame):
        check_frame(item)
    gap = serde.encode_gap(Gap(f.epoch, 5, 9, "evicted", 1))
    g = _decode_only_wire_errors(serde.decode_stream_item, data.draw(mutated(gap)))
    if isinstance(g, Gap):
        assert g.epoch and g.first_seq >= 1
    elif isinstance(g, Frame):
        check_frame(g)


# --------------------------------------------------------------------------- command envelopes

HOST = "gpu-fuzz"
_ids = itertools.count()


@pytest.fixture(scope="module")
def operators(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fuzz-pki")
    create_dev_pki(root, agents=[HOST], consoles=["console"])
    ops = {}
    for name, role in [("alice", "responder"), ("bob", "responder"), ("carol", "viewer")]:
        p = create_operator(root, name, role)
        ops[name] = (p.cert.read_bytes(), load_operator_key(p.key))
    now = time.time_ns()  # fixed from here on; operator certificates are short-lived, so taken now
    verifier = CommandVerifier(HOST, load_operator_cas(root / "operator-ca.pem"),
                               ReplayStore(root / "replay", now), clock=lambda: now)
    return {"ops": ops, "verifier": verifier, "now": now}


def _fresh_id() -> str:
    return hashlib.sha256(f"{uuid.uuid4()}{next(_ids)}".encode()).hexdigest()[:32]


def _envelope(fx: dict[str, Any], action: str = "freeze", signers: tuple[str, ...] = ("alice",)) -> CommandEnvelope:
    ops = fx["ops"]
    payload = signing.make_payload(action, "job-fuzz", [HOST], "fuzzing", ttl_s=60, now_ns=fx["now"],
                                   command_id=_fresh_id())
    return signing.build_envelope(payload, [ops[s] for s in signers])


def meets_command_spec(payload: bytes, signers: int, now: int) -> bool:
    """Independent reading of docs/response.md for a payload the verifier accepted."""
    try:
        obj = json.loads(payload)
    except ValueError:
        return False
    if json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() != payload:
        return False
    keys = {"type", "command_id", "action", "job", "target_hosts", "issued_at_ns", "expires_at_ns", "reason",
            "checkpoint_digest", "break_glass"}
    if not isinstance(obj, dict) or set(obj) != keys or obj["type"] != signing.PAYLOAD_TYPE:
        return False
    if obj["action"] not in ("freeze", "resume", "rollback") or not re.fullmatch(r"[0-9a-f]{32}", obj["command_id"]):
        return False
    if not isinstance(obj["target_hosts"], list) or HOST not in obj["target_hosts"]:
        return False
    issued, expires = obj["issued_at_ns"], obj["expires_at_ns"]
    if not (type(issued) is int and type(expires) is int and issued < expires <= issued + 120 * 10**9):
        return False
    if not issued - 5 * 10**9 <= now <= expires or type(obj["break_glass"]) is not bool:
        return False
    if obj["action"] == "rollback":
        return signers >= 2 and bool(re.fullmatch(r"sha256:[0-9a-f]{64}", obj["checkpoint_digest"]))
    if obj["break_glass"] or obj["checkpoint_digest"]:
        return False
    return signers >= (1 if obj["action"] == "freeze" else 2)


def _verify(verifier: CommandVerifier, env: CommandEnvelope, why: list[str] | None = None) -> bool:
    try:
        verifier.verify(env, Peer(True, "console", "ssl"))
    except Refusal as exc:
        if why is not None:
            why.append(f"{exc.check}: {exc.reason}")
        return False
    return True


@FUZZ
@given(st.data())
def test_mutated_command_envelopes_are_refused(operators: dict[str, Any], data: st.DataObject) -> None:
    ops, verifier = operators["ops"], operators["verifier"]
    env = _envelope(operators)
    sig = env.signatures[0]
    where = data.draw(st.sampled_from(["payload", "signature", "certificate", "swap", "extra", "drop"]))
    if where == "payload":
        bad = replace(env, payload=data.draw(mutated(env.payload)))
    elif where == "signature":
        bad = replace(env, signatures=(CommandSignature(sig.certificate_pem, data.draw(mutated(sig.signature))),))
    elif where == "certificate":
        bad = replace(env, signatures=(CommandSignature(data.draw(mutated(sig.certificate_pem)), sig.signature),))
    elif where == "swap":  # bob's certificate with alice's signature, or a viewer's
        who = data.draw(st.sampled_from(["bob", "carol"]))
        bad = replace(env, signatures=(CommandSignature(ops[who][0], sig.signature),))
    elif where == "extra":  # alice twice, or a signature over another command
        other = _envelope(operators).signatures[0]
        bad = replace(env, signatures=(sig, data.draw(st.sampled_from([sig, other]))))
    else:
        bad = replace(env, signatures=())
    accepted = _verify(verifier, bad)
    if accepted:
        # Only an edit that changed nothing that matters may pass: same payload, same signature
        # bytes, and a certificate that still parses to the same signer.
        assert bad.payload == env.payload, f"accepted a changed payload ({where})"
        assert [s.signature for s in bad.signatures] == [sig.signature], f"accepted changed signatures ({where})"
        from agent.pki import verify_operator_certificate

        a = verify_operator_certificate(bad.signatures[0].certificate_pem, verifier.operator_cas, None)
        b = verify_operator_certificate(sig.certificate_pem, verifier.operator_cas, None)
        assert (a.cert_sha256, a.key_id) == (b.cert_sha256, b.key_id)
    else:
        why: list[str] = []
        assert _verify(verifier, env, why), f"the unmutated envelope must pass, but: {why}"


@FUZZ
@given(st.data())
def test_resigned_malformed_payloads_need_to_meet_the_spec(operators: dict[str, Any], data: st.DataObject) -> None:
    """An insider with a valid operator key signs garbage: the payload checks, not the signature, stop it."""
    ops, verifier = operators["ops"], operators["verifier"]
    env = _envelope(operators, action=data.draw(st.sampled_from(["freeze", "resume"])), signers=("alice", "bob"))
    payload = data.draw(mutated(env.payload))
    signers = data.draw(st.sampled_from([("alice",), ("alice", "bob"), ("alice", "carol")]))
    bad = signing.build_envelope(payload, [ops[s] for s in signers]) if payload else replace(env, payload=b"")
    if _verify(verifier, bad):
        assert "carol" not in signers
        assert meets_command_spec(payload, len(signers), operators["now"]), f"authorized a bad payload {payload!r}"


# --------------------------------------------------------------------------- checkpoint manifests


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fuzz-ckpt")
    d = root / "step-000100"
    (d / "rank0").mkdir(parents=True)
    (d / "rank0" / "model.safetensors").write_bytes(b"weights" * 50)
    (d / "rank1").mkdir()
    (d / "rank1" / "model.safetensors").write_bytes(b"sthgiew" * 50)
    (d / "train_state.json").write_text('{"step": 100}')
    key = Ed25519PrivateKey.generate()
    ck.sign_checkpoint_with_key(d, key, "job-a", "run-1", 100, 2)
    trusted = {ck.key_id(key): key.public_key()}
    ck.verify_checkpoint(d, trusted)  # sanity: the original verifies
    return {"dir": d, "key": key, "trusted": trusted, "scratch": root / "scratch"}


def _copy(cp: dict[str, Any]) -> Path:
    dest = cp["scratch"] / uuid.uuid4().hex
    shutil.copytree(cp["dir"], dest, symlinks=True)
    return dest


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _sig_bytes(sig_doc: bytes) -> set[bytes]:
    try:
        doc = json.loads(sig_doc)
        return {base64.b64decode(e["sig"]) for e in doc["signatures"]}
    except (ValueError, KeyError, TypeError):
        return set()


def describes_exactly(d: Path, manifest: bytes) -> bool:
    """Independent check: canonical statement whose subjects are exactly the files, hashes right."""
    try:
        doc = json.loads(manifest)
    except ValueError:
        return False
    if json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() != manifest:
        return False
    try:
        subjects = {s["name"]: s["digest"]["sha256"] for s in doc["subject"]}
        pred = doc["predicate"]
        ok_types = doc["_type"] == ck.STATEMENT_TYPE and doc["predicateType"] == ck.PREDICATE_TYPE
    except (KeyError, TypeError):
        return False
    on_disk = {k: hashlib.sha256(v).hexdigest() for k, v in _snapshot(d).items()
               if k not in (ck.MANIFEST_NAME, ck.SIGNATURE_NAME)}
    ints = all(type(pred.get(k, 0)) is int and pred.get(k, 0) >= 0 for k in ("step", "world_size"))
    return ok_types and ints and isinstance(pred.get("job"), str) and bool(pred["job"]) and subjects == on_disk


@FUZZ
@given(st.data())
def test_mutated_checkpoints_never_verify(checkpoint: dict[str, Any], data: st.DataObject) -> None:
    d = _copy(checkpoint)
    before = _snapshot(d)
    what = data.draw(st.sampled_from(["manifest", "signature", "file", "add", "remove", "rename", "symlink"]))
    files = sorted(k for k in before if k not in (ck.MANIFEST_NAME, ck.SIGNATURE_NAME))
    if what == "manifest":
        (d / ck.MANIFEST_NAME).write_bytes(data.draw(mutated(before[ck.MANIFEST_NAME])))
    elif what == "signature":
        (d / ck.SIGNATURE_NAME).write_bytes(data.draw(mutated(before[ck.SIGNATURE_NAME])))
    elif what == "file":
        name = data.draw(st.sampled_from(files))
        (d / name).write_bytes(data.draw(mutated(before[name])))
    elif what == "add":
        name = data.draw(st.sampled_from(["extra.bin", "rank0/extra.pt", ".hidden", "rank1/model.safetensors.bak"]))
        (d / name).write_bytes(b"not signed")
    elif what == "remove":
        (d / data.draw(st.sampled_from(files))).unlink()
    elif what == "rename":
        name = data.draw(st.sampled_from(files))
        (d / name).rename(d / (name + "x"))
    else:
        name = data.draw(st.sampled_from(files))
        target = d / name
        target.unlink()
        target.symlink_to(checkpoint["dir"] / name)  # same bytes, but via a link
    try:
        ck.verify_checkpoint(d, checkpoint["trusted"])
        accepted = True
    except ck.CheckpointError:
        accepted = False
    after = _snapshot(d)
    if accepted:
        assert what in ("manifest", "signature"), f"verified after a {what} mutation"
        assert after[ck.MANIFEST_NAME] == before[ck.MANIFEST_NAME], "verified a changed manifest"
        assert {k: v for k, v in after.items() if k != ck.SIGNATURE_NAME} == {
            k: v for k, v in before.items() if k != ck.SIGNATURE_NAME}
        assert _sig_bytes(after[ck.SIGNATURE_NAME]) & _sig_bytes(before[ck.SIGNATURE_NAME])
    shutil.rmtree(d)


@FUZZ
@given(st.data())
def test_resigned_mutated_manifests_must_describe_the_files(checkpoint: dict[str, Any], data: st.DataObject) -> None:
    """The signer's key signs a malformed manifest: strict parsing and re-hashing must still refuse it."""
    d = _copy(checkpoint)
    manifest = data.draw(mutated((d / ck.MANIFEST_NAME).read_bytes()))
    sig = checkpoint["key"].sign(ck.CHECKPOINT_DOMAIN + manifest)
    doc = {"type": ck.SIGNATURE_TYPE, "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
           "signatures": [{"alg": "ed25519", "key_id": ck.key_id(checkpoint["key"]),
                           "sig": base64.b64encode(sig).decode()}]}
    (d / ck.MANIFEST_NAME).write_bytes(manifest)
    (d / ck.SIGNATURE_NAME).write_bytes(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())
    try:
        ck.verify_checkpoint(d, checkpoint["trusted"])
        accepted = True
    except ck.CheckpointError:
        accepted = False
    if accepted:
        assert describes_exactly(d, manifest), f"verified a manifest that does not describe the files: {manifest!r}"
    shutil.rmtree(d)
