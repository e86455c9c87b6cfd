"""Signed checkpoints: strict verification (corrupt, unsigned, symlink, '..', extra, missing, wrong signer),
staging without TOCTOU, no unpickling, listing, and rollback with the step floor and break-glass."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.act import checkpoints as ck
from agent.act.checkpoints import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    CheckpointError,
    load_trusted_keys,
    sign_checkpoint,
    sign_checkpoint_with_key,
    stage_checkpoint,
    verify_checkpoint,
)
from agent.act.commands import Peer
from agent.act.controller import Controller, ControlSettings
from agent.pki import create_operator, load_operator_key
from agent.training import RankRegistration
from protos import signing
from protos.types import PHASE_EXECUTE, CommandRequest, Event, Receipt

HOST = "gpu-01"


def _pem_pub(key: Ed25519PrivateKey, path: Path) -> Path:
    path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def trusted(key: Ed25519PrivateKey) -> dict:
    return {ck.key_id(key): key.public_key()}


def make_ckpt(root: Path, step: int = 100, payload: bytes = b"weights") -> Path:
    d = root / f"step-{step:06d}"
    (d / "rank0").mkdir(parents=True)
    (d / "rank0" / "model.safetensors").write_bytes(payload * 1000)
    (d / "rank1").mkdir()
    (d / "rank1" / "model.safetensors").write_bytes(payload[::-1] * 1000)
    (d / "train_state.json").write_text(json.dumps({"step": step}))
    return d


@pytest.fixture
def signed(tmp_path: Path, key: Ed25519PrivateKey) -> Path:
    d = make_ckpt(tmp_path / "ckpts")
    sign_checkpoint_with_key(d, key, "job-a", "run-1", 100, 2)
    return d


def _code(fn, *a, **kw) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(CheckpointError) as err:
        fn(*a, **kw)
    return err.value.code


# --------------------------------------------------------------------------- sign / verify


def test_sign_and_verify(signed: Path, trusted: dict) -> None:
    m = verify_checkpoint(signed, trusted, expect_job="job-a", expect_run="run-1", expect_world_size=2)
    assert (m.job, m.run, m.step, m.world_size) == ("job-a", "run-1", 100, 2)
    assert set(m.files) == {"rank0/model.safetensors", "rank1/model.safetensors", "train_state.json"}
    raw = (signed / MANIFEST_NAME).read_bytes()
    assert m.digest == "sha256:" + hashlib.sha256(raw).hexdigest() == ck.manifest_digest(signed)
    # Same canonical form as the command layer, and an in-toto Statement v1 shape.
    doc = json.loads(raw)
    assert signing.canonical_json(doc) == raw
    assert doc["_type"] == "https://in-toto.io/Statement/v1"
    assert doc["subject"][0]["digest"]["sha256"] == hashlib.sha256(
        (signed / "rank0" / "model.safetensors").read_bytes()).hexdigest()


def test_sign_checkpoint_from_key_file(tmp_path: Path) -> None:
    op = create_operator(tmp_path / "pki", "pipeline", "responder")
    d = make_ckpt(tmp_path / "c")
    digest = sign_checkpoint(d, op.key, "j", "r", 100, 2)
    trusted = load_trusted_keys([op.cert])  # a certificate pins its key
    assert verify_checkpoint(d, trusted).digest == digest


def test_corrupt_byte(signed: Path, trusted: dict) -> None:
    f = signed / "rank1" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[1234] ^= 1
    f.write_bytes(bytes(data))
    assert _code(verify_checkpoint, signed, trusted) == "hash_mismatch"
    verify_checkpoint(signed, trusted, rehash=False)  # a listing without hashing cannot see it
    dest = signed.parent / "staged"
    assert _code(stage_checkpoint, signed, trusted, dest) == "hash_mismatch"
    assert not dest.exists()


def test_unsigned(tmp_path: Path, signed: Path, trusted: dict) -> None:
    (signed / SIGNATURE_NAME).unlink()
    assert _code(verify_checkpoint, signed, trusted) == "unsigned"
    bare = make_ckpt(tmp_path / "bare")
    assert _code(verify_checkpoint, bare, trusted) == "unsigned"


def test_wrong_signer(signed: Path) -> None:
    stranger = Ed25519PrivateKey.generate()
    assert _code(verify_checkpoint, signed, {ck.key_id(stranger): stranger.public_key()}) == "untrusted"


def test_forged_signature_by_pinned_key_id(signed: Path, trusted: dict) -> None:
    doc = json.loads((signed / SIGNATURE_NAME).read_bytes())
    doc["signatures"][0]["sig"] = base64.b64encode(b"\x00" * 64).decode()
    (signed / SIGNATURE_NAME).write_bytes(signing.canonical_json(doc))
    assert _code(verify_checkpoint, signed, trusted) == "bad_signature"


def test_manifest_edited_after_signing(signed: Path, trusted: dict) -> None:
    raw = (signed / MANIFEST_NAME).read_bytes().replace(b'"step":100', b'"step":900')
    (signed / MANIFEST_NAME).write_bytes(raw)
    assert _code(verify_checkpoint, signed, trusted) == "bad_signature"


def test_symlinks_refused(signed: Path, trusted: dict, tmp_path: Path) -> None:
    outside = tmp_path / "outside.bin"
    outside.write_bytes((signed / "rank0" / "model.safetensors").read_bytes())
    target = signed / "rank0" / "model.safetensors"
    target.unlink()
    target.symlink_to(outside)  # same bytes, but through a link: still refused
    assert _code(verify_checkpoint, signed, trusted) == "layout"
    target.unlink()
    target.write_bytes(outside.read_bytes())
    verify_checkpoint(signed, trusted)
    (signed / "rank1" / "extra-link").symlink_to("/etc")
    assert _code(verify_checkpoint, signed, trusted) == "layout"


def test_symlinked_checkpoint_dir_refused(signed: Path, trusted: dict, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(signed)
    assert _code(verify_checkpoint, link, trusted) == "layout"


def test_dotdot_in_manifest(tmp_path: Path, key: Ed25519PrivateKey, trusted: dict) -> None:
    d = make_ckpt(tmp_path / "c")
    secret = tmp_path / "c" / "secret"
    secret.write_bytes(b"not part of the checkpoint")
    manifest = json.loads(ck.build_manifest(d, "job-a", "run-1", 100, 2))
    manifest["subject"].append({"name": "../secret", "digest": {"sha256": hashlib.sha256(b"x").hexdigest()}})
    raw = signing.canonical_json(manifest)
    (d / MANIFEST_NAME).write_bytes(raw)
    sig = key.sign(ck.CHECKPOINT_DOMAIN + raw)
    (d / SIGNATURE_NAME).write_bytes(signing.canonical_json({
        "type": ck.SIGNATURE_TYPE, "manifest_sha256": hashlib.sha256(raw).hexdigest(),
        "signatures": [{"alg": "ed25519", "key_id": ck.key_id(key), "sig": base64.b64encode(sig).decode()}]}))
    with pytest.raises(CheckpointError, match=r"'\.\.'") as err:
        verify_checkpoint(d, trusted)
    assert err.value.code == "layout"


def test_extra_file(signed: Path, trusted: dict) -> None:
    (signed / "rank0" / "optimizer.pt").write_bytes(b"\x80\x04K\x01.")  # a pickle nobody signed
    assert _code(verify_checkpoint, signed, trusted) == "extra_file"


def test_missing_file(signed: Path, trusted: dict) -> None:
    (signed / "train_state.json").unlink()
    assert _code(verify_checkpoint, signed, trusted) == "missing_file"


def test_special_file(signed: Path, trusted: dict) -> None:
    os.mkfifo(signed / "rank0" / "pipe")
    assert _code(verify_checkpoint, signed, trusted) == "layout"


@pytest.mark.parametrize(("kw", "fragment"), [({"expect_job": "job-b"}, "job"), ({"expect_run": "run-2"}, "run"),
                                              ({"expect_world_size": 8}, "world size"),
                                              ({"expect_digest": "sha256:" + "0" * 64}, "digest")])
def test_binding(signed: Path, trusted: dict, kw: dict, fragment: str) -> None:
    with pytest.raises(CheckpointError, match=fragment) as err:
        verify_checkpoint(signed, trusted, **kw)
    assert err.value.code == "binding"


def test_trusted_keys_must_be_ed25519(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    assert list(load_trusted_keys([_pem_pub(key, tmp_path / "k.pem")])) == [ck.key_id(key)]
    ec_pub = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "ec.pem").write_bytes(ec_pub)
    with pytest.raises(CheckpointError, match="Ed25519"):
        load_trusted_keys([tmp_path / "ec.pem"])


# --------------------------------------------------------------------------- staging, no unpickling


def test_stage_copies_exactly_what_was_hashed(signed: Path, trusted: dict, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("something unpickled during verification")

    (signed / "rank0" / "optimizer.pt").write_bytes(pickle.dumps({"lr": 0.1}))  # a pickle, signed this time
    key2 = Ed25519PrivateKey.generate()
    ck.sign_checkpoint_with_key(signed, key2, "job-a", "run-1", 100, 2)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    dest = tmp_path / "staged"
    m = stage_checkpoint(signed, {ck.key_id(key2): key2.public_key()}, dest, expect_job="job-a")
    for name, digest in m.files.items():
        f = dest / name
        assert hashlib.sha256(f.read_bytes()).hexdigest() == digest
        assert not os.access(f, os.W_OK) or os.geteuid() == 0
        assert oct(f.stat().st_mode & 0o777) == "0o444"
    # Changing the source afterwards does not change what a restore loads.
    (signed / "train_state.json").write_text("evil")
    verify_checkpoint(dest, {ck.key_id(key2): key2.public_key()})
    assert _code(stage_checkpoint, signed, trusted, dest) == "io"  # never overwrites a staged copy


def test_discover(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    root = tmp_path / "job"
    a, b = make_ckpt(root, 10), make_ckpt(root, 20)
    (root / "link").symlink_to(a)
    found = ck.discover_checkpoints([root])
    assert found == [a, b]


# --------------------------------------------------------------------------- rollback through the controller

JOB_SCRIPT = """
import os, sys, time
marker = os.path.join(os.getcwd(), "RESUME_FROM")
if os.path.exists(marker):
    src = open(marker).read().strip()
    with open("resumed.log", "a") as f:
        f.write(src + " " + open(os.path.join(src, "train_state.json")).read() + "\\n")
while True:
    time.sleep(0.02)
"""


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[dict]:
    pki = tmp_path / "pki"
    ops = {}
    for name, role in [("alice", "responder"), ("bob", "responder"), ("dave", "admin"), ("erin", "admin")]:
        p = create_operator(pki, name, role)
        ops[name] = (p.cert.read_bytes(), load_operator_key(p.key))
    signer = Ed25519PrivateKey.generate()
    ckroot = tmp_path / "ckpt-root"
    for step in (100, 200, 300):
        d = make_ckpt(ckroot / "job-r", step, payload=f"w{step}".encode())
        sign_checkpoint_with_key(d, signer, "job-r", "run-1", step, 1)
    untrusted = make_ckpt(ckroot / "job-r", 400)
    sign_checkpoint_with_key(untrusted, Ed25519PrivateKey.generate(), "job-r", "run-1", 400, 1)
    make_ckpt(ckroot / "job-r", 500)  # unsigned
    work = tmp_path / "work"
    work.mkdir()
    (work / "train.py").write_text(JOB_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(work / "train.py")], cwd=work)
    time.sleep(0.2)
    regs = {"job-r": {0: RankRegistration(proc.pid, os.getuid(), 1, 0, {"run_id": "run-1"}, time.time_ns())}}
    events: list[Event] = []
    settings = ControlSettings(host=HOST, state_dir=tmp_path / "state", operator_ca=pki / "operator-ca.pem",
                               checkpoint_root=ckroot,
                               trusted_checkpoint_keys=(_pem_pub(signer, tmp_path / "signer.pem"),),
                               stop_grace_s=2.0)
    ctl = Controller(settings, lambda: regs, events.append)
    yield {"ctl": ctl, "ops": ops, "ckroot": ckroot / "job-r", "work": work, "proc": proc, "regs": regs,
           "events": events}
    for p in [proc, *ctl._children]:
        p.kill()
        p.wait()


async def _rollback(rig: dict, step: int, signers: list[str], break_glass: bool = False) -> Receipt:
    digest = ck.manifest_digest(rig["ckroot"] / f"step-{step:06d}")
    payload = signing.make_payload("rollback", "job-r", [HOST], "bad data since then", checkpoint_digest=digest,
                                   break_glass=break_glass)
    env = signing.build_envelope(payload, [rig["ops"][s] for s in signers])
    ctl: Controller = rig["ctl"]
    return signing.verify_receipt(await ctl.handle(CommandRequest(PHASE_EXECUTE, env), Peer(True, "console")),
                                  ctl.public_key)


def test_list_checkpoints(rig: dict) -> None:
    listing = rig["ctl"].list_checkpoints("job-r", True, Peer(True, "console"))
    by_step = {c.step: c for c in listing.checkpoints}
    assert [by_step[s].status for s in (100, 200, 300)] == ["verified"] * 3
    assert by_step[400].status == "untrusted"
    assert [c.status for c in listing.checkpoints if c.step == -1] == ["unsigned"]
    assert by_step[300].manifest_digest.startswith("sha256:") and listing.step_floor == 0
    with pytest.raises(PermissionError):
        rig["ctl"].list_checkpoints("job-r", False, Peer(False, "plaintext"))


async def test_rollback_restarts_from_the_checkpoint(rig: dict) -> None:
    old = rig["proc"]
    r = await _rollback(rig, 200, ["alice", "bob"])
    assert r.status == "executed", r
    assert r.checkpoint_step == 200 and r.method == "restore" and old.pid in r.pids
    assert old.wait(5) is not None
    staged = Path(r.checkpoint_path)
    assert staged.is_dir() and staged != rig["ckroot"] / "step-000200"
    marker = rig["work"] / "RESUME_FROM"
    assert marker.read_text().strip() == str(staged)
    deadline = time.monotonic() + 10
    log = rig["work"] / "resumed.log"
    while not log.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert log.read_text().startswith(f"{staged} {{\"step\": 200}}")
    assert len(r.restarted_pids) == 1 and r.restarted_pids[0] != old.pid
    kinds = [e.kind for e in rig["events"]]
    assert kinds[-1] == "command_executed" and rig["events"][-1].attrs["checkpoint_step"] == "200"
    # The floor rose to 200: going further back needs break-glass by two admins.
    rig["regs"]["job-r"][0] = RankRegistration(r.restarted_pids[0], os.getuid(), 1, 0, {"run_id": "run-1"},
                                               time.time_ns())
    below = await _rollback(rig, 100, ["alice", "bob"])
    assert below.status == "refused" and below.check == "floor" and "break-glass" in below.reason
    not_admins = await _rollback(rig, 100, ["alice", "bob"], break_glass=True)
    assert not_admins.status == "refused" and not_admins.check == "role"
    glass = await _rollback(rig, 100, ["dave", "erin"], break_glass=True)
    assert glass.status == "executed", glass
    assert marker.read_text().strip() == glass.checkpoint_path


async def test_rollback_refuses_bad_checkpoints(rig: dict) -> None:
    target = rig["ckroot"] / "step-000300" / "train_state.json"
    target.write_text('{"step": 3}')
    r = await _rollback(rig, 300, ["alice", "bob"])
    assert r.status == "refused" and r.check == "checkpoint" and "hash_mismatch" in r.reason, r
    r = await _rollback(rig, 400, ["alice", "bob"])
    assert r.status == "refused" and "untrusted" in r.reason
    assert rig["proc"].poll() is None  # nothing was stopped
    assert not (rig["work"] / "RESUME_FROM").exists()
    # A digest no checkpoint has.
    payload = signing.make_payload("rollback", "job-r", [HOST], "x", checkpoint_digest="sha256:" + "1" * 64)
    env = signing.build_envelope(payload, [rig["ops"]["alice"], rig["ops"]["bob"]])
    r = signing.parse_receipt((await rig["ctl"].handle(CommandRequest(PHASE_EXECUTE, env), Peer(True, "c"))).receipt)
    assert r.status == "refused" and "no checkpoint" in r.reason
    assert all(e.kind == "command_refused" for e in rig["events"])


async def test_rollback_needs_two_operators(rig: dict) -> None:
    r = await _rollback(rig, 200, ["alice"])
    assert r.status == "refused" and r.check == "signers"


def test_cli_sign_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli import main

    op = create_operator(tmp_path / "pki", "pipeline", "viewer")
    other = create_operator(tmp_path / "pki", "other", "viewer")
    d = make_ckpt(tmp_path / "c")
    assert main(["checkpoint", "sign", str(d), "--key", str(op.key), "--job", "j", "--run", "r", "--step", "100",
                 "--world-size", "2"]) == 0
    digest = capsys.readouterr().out.strip()
    assert digest == ck.manifest_digest(d)
    assert main(["checkpoint", "verify", str(d), "--trust", str(other.cert), str(op.cert), "--job", "j",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["digest"] == digest
    assert main(["checkpoint", "verify", str(d), "--trust", str(other.cert)]) == 1
    assert main(["checkpoint", "verify", str(d), "--trust", str(op.cert), "--world-size", "4"]) == 1
    (d / "extra.bin").write_bytes(b"x")
    assert main(["checkpoint", "verify", str(d), "--trust", str(op.cert), "--json"]) == 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["code"] == "extra_file"
    assert main(["checkpoint", "verify", str(d), "--trust", str(tmp_path / "missing.pem")]) == 2
