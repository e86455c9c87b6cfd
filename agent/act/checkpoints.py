"""Signed checkpoint manifests: sign right after a save, verify strictly before any restore.

A checkpoint directory gets two files next to its contents:

    gpusoc-manifest.json  canonical JSON, an in-toto Statement v1 whose subjects are every
                          other file (relative POSIX path + SHA-256) and whose predicate binds
                          job, run, step and world size
    gpusoc-manifest.sig   canonical JSON: Ed25519 signature(s) over
                          b"gpusoc-checkpoint-v1\\x00" + manifest bytes, with the signer's key id

Verification trusts only pinned keys (never a key shipped with the checkpoint), demands that
the files on disk are exactly the manifest's (no extra, no missing, no symlinks, no '..'),
and re-hashes the bytes: `stage_checkpoint` hashes the copy it writes into an agent-owned
directory, so what a job loads is what was hashed. Nothing here ever unpickles anything.

Standard library and `cryptography` only: training processes import this (the SDK calls
`sign_checkpoint`). docs/response.md describes the format and the OpenSSF model-signing choice.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import stat
import time
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "MANIFEST_NAME",
    "SIGNATURE_NAME",
    "CheckpointError",
    "Manifest",
    "TrustedKeys",
    "build_manifest",
    "discover_checkpoints",
    "inspect_checkpoint",
    "key_id",
    "load_trusted_keys",
    "manifest_digest",
    "sign_checkpoint",
    "sign_checkpoint_with_key",
    "stage_checkpoint",
    "verify_checkpoint",
]

MANIFEST_NAME: Final = "gpusoc-manifest.json"
SIGNATURE_NAME: Final = "gpusoc-manifest.sig"
CHECKPOINT_DOMAIN: Final = b"gpusoc-checkpoint-v1\x00"
STATEMENT_TYPE: Final = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE: Final = "https://gpusoc.dev/checkpoint/v1"
SIGNATURE_TYPE: Final = "gpusoc.checkpoint-signature.v1"
MAX_MANIFEST_BYTES: Final = 64 * 1024 * 1024
MAX_SIGNATURE_FILE_BYTES: Final = 64 * 1024
MAX_FILES: Final = 1_000_000
_CHUNK: Final = 1 << 20
_RESERVED: Final = frozenset({MANIFEST_NAME, SIGNATURE_NAME})

TrustedKeys = Mapping[str, Ed25519PublicKey]  # key id -> pinned public key


class CheckpointError(ValueError):
    """A checkpoint that must not be restored; `code` says which class of problem.

    Codes: unsigned, untrusted, bad_signature, manifest, layout (symlink, '..', special file),
    extra_file, missing_file, hash_mismatch, binding (job/run/world size), below_floor, io.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Manifest:
    """A parsed manifest; `digest` ("sha256:<hex>" of the manifest bytes) is what commands name."""

    job: str
    run: str
    step: int
    world_size: int
    created_unix_ns: int
    files: Mapping[str, str]  # relative POSIX path -> hex sha256
    digest: str
    signer_key_id: str = ""


# ---------------------------------------------------------------- small helpers


def _canonical(obj: Any) -> bytes:
    """Same canonical form as protos.signing.canonical_json (sorted keys, no spaces, UTF-8)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def _strict_json(data: bytes, what: str) -> Any:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if k in out:
                raise CheckpointError("manifest", f"{what}: duplicate key {k!r}")
            out[k] = v
        return out

    def no_float(text: str) -> Any:
        raise CheckpointError("manifest", f"{what}: floats are not allowed")

    try:
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=pairs, parse_float=no_float, parse_constant=no_float)
    except CheckpointError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError("manifest", f"{what}: not JSON ({exc})") from None
    if _canonical(obj) != data:
        raise CheckpointError("manifest", f"{what}: not in canonical form")
    return obj


def key_id(public_key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """Hex SHA-256 of the raw 32-byte public key."""
    pub = public_key.public_key() if isinstance(public_key, Ed25519PrivateKey) else public_key
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def _check_rel_path(name: str) -> None:
    """Reject names that could escape the checkpoint or mean two things (path traversal, aliases)."""
    if not name or len(name) > 4096 or "\x00" in name or "\\" in name:
        raise CheckpointError("layout", f"bad file name {name!r}")
    if name.startswith("/"):
        raise CheckpointError("layout", f"absolute path {name!r}")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise CheckpointError("layout", f"path {name!r} has an empty, '.' or '..' segment")
    if unicodedata.normalize("NFC", name) != name:
        raise CheckpointError("layout", f"path {name!r} is not NFC-normalised")


def _open_dir(path: Path) -> int:
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise CheckpointError("io", f"{path}: {exc.strerror or exc}") from None
    if stat.S_ISLNK(st.st_mode):
        raise CheckpointError("layout", f"{path} is a symlink")
    if not stat.S_ISDIR(st.st_mode):
        raise CheckpointError("layout", f"{path} is not a directory")
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)


def _walk(root: Path) -> dict[str, os.stat_result]:
    """Every file below root (reserved names at the top excluded), refusing symlinks and specials."""
    out: dict[str, os.stat_result] = {}
    stack: list[str] = [""]
    while stack:
        rel = stack.pop()
        here = root / rel if rel else root
        try:
            entries = list(os.scandir(here))
        except OSError as exc:
            raise CheckpointError("io", f"{here}: {exc.strerror or exc}") from None
        for entry in entries:
            name = f"{rel}/{entry.name}" if rel else entry.name
            if not rel and entry.name in _RESERVED:
                continue
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise CheckpointError("layout", f"symlink in checkpoint: {name}")
            if stat.S_ISDIR(st.st_mode):
                stack.append(name)
            elif stat.S_ISREG(st.st_mode):
                _check_rel_path(name)
                out[name] = st
                if len(out) > MAX_FILES:
                    raise CheckpointError("layout", f"more than {MAX_FILES} files")
            else:
                raise CheckpointError("layout", f"not a regular file: {name}")
    return out


def _open_file(root_fd: int, rel: str) -> int:
    """Open root/rel without following a symlink in any component."""
    parts = rel.split("/")
    fd = os.dup(root_fd)
    try:
        for part in parts[:-1]:
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        ffd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
    except OSError as exc:
        raise CheckpointError("layout", f"cannot open {rel} without following links: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(ffd).st_mode):
        os.close(ffd)
        raise CheckpointError("layout", f"not a regular file: {rel}")
    return ffd


def _hash_fd(fd: int, sink: Any = None) -> str:
    h = hashlib.sha256()
    while True:
        chunk = os.read(fd, _CHUNK)
        if not chunk:
            break
        h.update(chunk)
        if sink is not None:
            sink.write(chunk)
    return h.hexdigest()


def _read_small(root_fd: int, name: str, limit: int) -> bytes | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=root_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointError("layout", f"cannot open {name}: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError("layout", f"{name} is not a regular file")
        data = b""
        while len(data) <= limit:
            chunk = os.read(fd, _CHUNK)
            if not chunk:
                break
            data += chunk
        if len(data) > limit:
            raise CheckpointError("manifest", f"{name} exceeds {limit} bytes")
        return data
    finally:
        os.close(fd)


# ---------------------------------------------------------------- signing


def build_manifest(
    directory: str | os.PathLike[str],
    job: str,
    run: str,
    step: int,
    world_size: int,
    created_unix_ns: int | None = None,
) -> bytes:
    """Hash every file of a checkpoint directory into canonical manifest bytes (not yet signed)."""
    if not job or not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError("manifest", "job must be non-empty and step a non-negative integer")
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise CheckpointError("manifest", "world_size must be a positive integer")
    root = Path(directory)
    files = _walk(root)
    root_fd = _open_dir(root)
    try:
        subjects = []
        for name in sorted(files):
            fd = _open_file(root_fd, name)
            try:
                digest = _hash_fd(fd)
            finally:
                os.close(fd)
            subjects.append(
                {"name": name, "digest": {"sha256": digest}, "annotations": {"actual_hash_algorithm": "file-sha256"}}
            )
    finally:
        os.close(root_fd)
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": subjects,
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "job": str(job),
            "run": str(run),
            "step": step,
            "world_size": world_size,
            "created_unix_ns": time.time_ns() if created_unix_ns is None else int(created_unix_ns),
            "hash_algorithm": "sha256",
        },
    }
    return _canonical(statement)


def sign_checkpoint_with_key(
    directory: str | os.PathLike[str],
    key: Ed25519PrivateKey,
    job: str,
    run: str,
    step: int,
    world_size: int,
) -> str:
    """Write gpusoc-manifest.json and gpusoc-manifest.sig into `directory`; returns the manifest digest."""
    root = Path(directory)
    manifest = build_manifest(root, job, run, step, world_size)
    sig = key.sign(CHECKPOINT_DOMAIN + manifest)
    sig_doc = _canonical(
        {
            "type": SIGNATURE_TYPE,
            "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
            "signatures": [{"alg": "ed25519", "key_id": key_id(key), "sig": base64.b64encode(sig).decode("ascii")}],
        }
    )
    _atomic_write(root / MANIFEST_NAME, manifest)
    _atomic_write(root / SIGNATURE_NAME, sig_doc)
    return "sha256:" + hashlib.sha256(manifest).hexdigest()


def sign_checkpoint(
    directory: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
    job: str,
    run: str,
    step: int,
    world_size: int,
) -> str:
    """What a training loop calls after saving: manifest + Ed25519 signature with the key at `key_path`.

    The key is an Ed25519 PKCS#8 PEM (an operator key from `gpusoc-agent pki operator`, or a
    dedicated pipeline signer). Returns "sha256:<hex>" of the manifest, the id rollbacks name.
    """
    try:
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError("io", f"cannot load signing key {key_path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise CheckpointError("io", f"{key_path} is not an Ed25519 private key")
    return sign_checkpoint_with_key(directory, key, job, run, step, world_size)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# ---------------------------------------------------------------- trust


def load_trusted_keys(paths: Iterable[str | os.PathLike[str]]) -> dict[str, Ed25519PublicKey]:
    """Pinned checkpoint signer keys from PEM files (public keys or certificates, several per file)."""
    out: dict[str, Ed25519PublicKey] = {}
    for p in paths:
        path = Path(p)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CheckpointError("io", f"cannot read trusted key {path}: {exc.strerror or exc}") from None
        found = 0
        for block in _pem_blocks(data):
            pub: object
            if b"CERTIFICATE" in block.split(b"\n", 1)[0]:
                pub = x509.load_pem_x509_certificate(block).public_key()
            elif b"PUBLIC KEY" in block.split(b"\n", 1)[0]:
                pub = serialization.load_pem_public_key(block)
            else:
                continue
            if not isinstance(pub, Ed25519PublicKey):
                raise CheckpointError("io", f"{path}: trusted checkpoint keys must be Ed25519")
            out[key_id(pub)] = pub
            found += 1
        if not found:
            raise CheckpointError("io", f"{path}: no PEM public key or certificate")
    return out


def _pem_blocks(data: bytes) -> list[bytes]:
    blocks, current = [], []
    for line in data.splitlines(keepends=True):
        if line.startswith(b"-----BEGIN "):
            current = [line]
        elif current:
            current.append(line)
            if line.startswith(b"-----END "):
                blocks.append(b"".join(current))
                current = []
    return blocks


# ---------------------------------------------------------------- verification


def manifest_digest(directory: str | os.PathLike[str]) -> str | None:
    """The manifest's id, "sha256:<hex>" of its bytes, or None when there is none (no verification)."""
    root_fd = _open_dir(Path(directory))
    try:
        data = _read_small(root_fd, MANIFEST_NAME, MAX_MANIFEST_BYTES)
    finally:
        os.close(root_fd)
    return None if data is None else "sha256:" + hashlib.sha256(data).hexdigest()


def _check_signature(manifest: bytes, sig_doc: bytes | None, trusted: TrustedKeys) -> str:
    if sig_doc is None:
        raise CheckpointError("unsigned", f"no {SIGNATURE_NAME}")
    doc = _strict_json(sig_doc, SIGNATURE_NAME)
    if not isinstance(doc, dict) or doc.get("type") != SIGNATURE_TYPE or not isinstance(doc.get("signatures"), list):
        raise CheckpointError("manifest", f"{SIGNATURE_NAME} is not a {SIGNATURE_TYPE} document")
    seen_trusted = False
    for entry in doc["signatures"]:
        if not isinstance(entry, dict) or entry.get("alg") != "ed25519":
            continue
        kid = entry.get("key_id")
        if not isinstance(kid, str) or kid not in trusted:
            continue
        seen_trusted = True
        try:
            raw = base64.b64decode(str(entry.get("sig", "")), validate=True)
            trusted[kid].verify(raw, CHECKPOINT_DOMAIN + manifest)
        except (InvalidSignature, ValueError):
            raise CheckpointError("bad_signature", f"signature by pinned key {kid[:16]} does not verify") from None
        return kid
    if not seen_trusted:
        raise CheckpointError("untrusted", "not signed by any pinned checkpoint key")
    raise CheckpointError("bad_signature", "no valid signature")  # pragma: no cover


def _parse_manifest(data: bytes, digest: str, signer: str) -> Manifest:
    doc = _strict_json(data, MANIFEST_NAME)
    if not isinstance(doc, dict) or doc.get("_type") != STATEMENT_TYPE or doc.get("predicateType") != PREDICATE_TYPE:
        raise CheckpointError("manifest", "not a gpusoc checkpoint statement")
    pred, subjects = doc.get("predicate"), doc.get("subject")
    if not isinstance(pred, dict) or not isinstance(subjects, list):
        raise CheckpointError("manifest", "predicate/subject missing")
    job, run, step, ws, created = (
        pred.get("job"),
        pred.get("run"),
        pred.get("step"),
        pred.get("world_size"),
        pred.get("created_unix_ns", 0),
    )
    if not isinstance(job, str) or not job or not isinstance(run, str):
        raise CheckpointError("manifest", "job/run missing")
    for v in (step, ws, created):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise CheckpointError("manifest", "step/world_size/created must be non-negative integers")
    if pred.get("hash_algorithm", "sha256") != "sha256":
        raise CheckpointError("manifest", "only sha256 manifests are supported")
    files: dict[str, str] = {}
    for s in subjects:
        if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not isinstance(s.get("digest"), dict):
            raise CheckpointError("manifest", "malformed subject")
        name, hexd = s["name"], s["digest"].get("sha256")
        _check_rel_path(name)
        if name in _RESERVED or name in files:
            raise CheckpointError("manifest", f"subject {name!r} reserved or listed twice")
        if not isinstance(hexd, str) or len(hexd) != 64 or any(c not in "0123456789abcdef" for c in hexd):
            raise CheckpointError("manifest", f"bad sha256 for {name!r}")
        files[name] = hexd
    return Manifest(job, run, int(step or 0), int(ws or 0), int(created or 0), files, digest, signer)


def _read_and_authenticate(root_fd: int, trusted: TrustedKeys) -> Manifest:
    manifest = _read_small(root_fd, MANIFEST_NAME, MAX_MANIFEST_BYTES)
    if manifest is None:
        raise CheckpointError("unsigned", f"no {MANIFEST_NAME}")
    sig_doc = _read_small(root_fd, SIGNATURE_NAME, MAX_SIGNATURE_FILE_BYTES)
    signer = _check_signature(manifest, sig_doc, trusted)  # before the manifest is even parsed
    return _parse_manifest(manifest, "sha256:" + hashlib.sha256(manifest).hexdigest(), signer)


def _mismatch(name: str, got: str, want: str) -> str:
    return f"{name}: sha256 {got[:16]}... is not the signed {want[:16]}..."


def _check_binding(
    m: Manifest,
    expect_job: str | None,
    expect_run: str | None,
    expect_world_size: int | None,
    expect_digest: str | None,
) -> None:
    if expect_digest is not None and m.digest != expect_digest:
        raise CheckpointError("binding", f"manifest digest {m.digest} is not the requested {expect_digest}")
    if expect_job is not None and m.job != expect_job:
        raise CheckpointError("binding", f"checkpoint belongs to job {m.job!r}, not {expect_job!r}")
    if expect_run is not None and m.run != expect_run:
        raise CheckpointError("binding", f"checkpoint belongs to run {m.run!r}, not {expect_run!r}")
    if expect_world_size is not None and m.world_size != expect_world_size:
        raise CheckpointError("binding", f"checkpoint world size {m.world_size} is not the job's {expect_world_size}")


def _check_file_set(root: Path, m: Manifest) -> dict[str, os.stat_result]:
    on_disk = _walk(root)
    extra = sorted(set(on_disk) - set(m.files))
    missing = sorted(set(m.files) - set(on_disk))
    if extra:
        raise CheckpointError("extra_file", f"file(s) not in the manifest: {', '.join(extra[:5])}")
    if missing:
        raise CheckpointError("missing_file", f"file(s) in the manifest but absent: {', '.join(missing[:5])}")
    return on_disk


def verify_checkpoint(
    directory: str | os.PathLike[str],
    trusted: TrustedKeys,
    *,
    expect_job: str | None = None,
    expect_run: str | None = None,
    expect_world_size: int | None = None,
    expect_digest: str | None = None,
    rehash: bool = True,
) -> Manifest:
    """Verify a checkpoint in place: pinned signature, binding, exact file set, every hash.

    Raises CheckpointError (with `code`) on the first problem. `rehash=False` skips hashing
    file contents (a quick listing); never restore on that basis.
    """
    root = Path(directory)
    root_fd = _open_dir(root)
    try:
        m = _read_and_authenticate(root_fd, trusted)
        _check_binding(m, expect_job, expect_run, expect_world_size, expect_digest)
        _check_file_set(root, m)
        if rehash:
            for name, want in sorted(m.files.items()):
                fd = _open_file(root_fd, name)
                try:
                    got = _hash_fd(fd)
                finally:
                    os.close(fd)
                if got != want:
                    raise CheckpointError("hash_mismatch", _mismatch(name, got, want))
    finally:
        os.close(root_fd)
    return m


def stage_checkpoint(
    directory: str | os.PathLike[str],
    trusted: TrustedKeys,
    dest: str | os.PathLike[str],
    *,
    expect_job: str | None = None,
    expect_run: str | None = None,
    expect_world_size: int | None = None,
    expect_digest: str | None = None,
) -> Manifest:
    """Verify while copying into `dest` (must not exist): the copy is what was hashed (no TOCTOU).

    `dest` ends up root/agent-owned, directories 0755 and files 0444, with the manifest and
    signature alongside; on any failure nothing is left at `dest`.
    """
    root, out = Path(directory), Path(dest)
    if out.exists() or out.is_symlink():
        raise CheckpointError("io", f"staging directory {out} already exists")
    tmp = out.with_name(f".{out.name}.staging-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    root_fd = _open_dir(root)
    try:
        m = _read_and_authenticate(root_fd, trusted)
        _check_binding(m, expect_job, expect_run, expect_world_size, expect_digest)
        _check_file_set(root, m)
        os.makedirs(tmp, mode=0o755)
        for name, want in sorted(m.files.items()):
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            fd = _open_file(root_fd, name)
            try:
                with open(target, "xb") as sink:
                    got = _hash_fd(fd, sink)
                    sink.flush()
                    os.fsync(sink.fileno())
            finally:
                os.close(fd)
            if got != want:
                raise CheckpointError("hash_mismatch", _mismatch(name, got, want))
            os.chmod(target, 0o444)
        for reserved in (MANIFEST_NAME, SIGNATURE_NAME):
            data = _read_small(root_fd, reserved, MAX_MANIFEST_BYTES)
            if data is not None:
                (tmp / reserved).write_bytes(data)
                os.chmod(tmp / reserved, 0o444)
        # The manifest copied must be the one authenticated above.
        if "sha256:" + hashlib.sha256((tmp / MANIFEST_NAME).read_bytes()).hexdigest() != m.digest:
            raise CheckpointError("hash_mismatch", "manifest changed while staging")
        os.rename(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
    finally:
        os.close(root_fd)
    return m


def inspect_checkpoint(
    directory: str | os.PathLike[str], trusted: TrustedKeys, *, deep: bool = False
) -> tuple[str, str, Manifest | None]:
    """(status, reason, manifest) for listings: verified | signed | unsigned | untrusted | invalid.

    An untrusted manifest is still parsed so an operator sees what it claims; its status says
    it must not be believed.
    """
    root = Path(directory)
    try:
        m = verify_checkpoint(root, trusted, rehash=deep)
        return ("verified" if deep else "signed"), "", m
    except CheckpointError as exc:
        status = {"unsigned": "unsigned", "untrusted": "untrusted"}.get(exc.code, "invalid")
        claimed: Manifest | None = None
        with contextlib.suppress(CheckpointError, OSError):
            root_fd = _open_dir(root)
            try:
                data = _read_small(root_fd, MANIFEST_NAME, MAX_MANIFEST_BYTES)
            finally:
                os.close(root_fd)
            if data is not None:
                claimed = _parse_manifest(data, "sha256:" + hashlib.sha256(data).hexdigest(), "")
        return status, f"{exc.code}: {exc}", claimed


def discover_checkpoints(roots: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Checkpoint directories: each root that holds a manifest, and its direct subdirectories.

    Symlinked directories are skipped; the walk is one level deep so a listing stays cheap.
    """
    found: dict[str, Path] = {}
    for r in roots:
        root = Path(r)
        if root.is_symlink() or not root.is_dir():
            continue
        if (root / MANIFEST_NAME).is_file():
            found[str(root)] = root
        try:
            children = sorted(os.scandir(root), key=lambda e: e.name)
        except OSError:
            continue
        for entry in children:
            if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
                found[entry.path] = Path(entry.path)
    return list(found.values())
