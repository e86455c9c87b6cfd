"""Fingerprints a training job reports so the console can tell when its code, config or weights drift.

Stdlib only; torch is imported lazily and only by `param_checksum`. The SDK puts
`code_fingerprint` / `config_fingerprint` / `seed` into its init record's info, and logs
`param_checksum` as an extra every N steps: data-parallel replicas must agree on it (threats
T1, T2, T4, T9 in docs/detection.md).

Cost of `param_checksum` (measured, docs/detection.md): one strided gather of at most `sample`
elements per parameter tensor, one float64 sum and one device sync per call, so call it every
~100 steps, not every step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

_SKIP_DIRS: Final = frozenset({"__pycache__", ".git", ".hg", ".svn", ".mypy_cache", ".pytest_cache", ".ruff_cache"})
_CODE_SUFFIXES: Final = (".py", ".pyx", ".pxd", ".so", ".cu", ".cpp", ".h", ".yaml", ".yml", ".json", ".toml", ".cfg")
_CHUNK: Final = 1 << 20


def _files(path: Path, suffixes: tuple[str, ...] | None) -> list[Path]:
    if path.is_file():
        return [path]
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if suffixes is None or name.endswith(suffixes):
                out.append(Path(dirpath) / name)
    return out


def code_fingerprint(paths: Iterable[str | Path], suffixes: tuple[str, ...] | None = _CODE_SUFFIXES) -> str:
    """'sha256:<hex>' over every code file under `paths` (relative name + content), order-independent.

    Why: two ranks (or two restarts) running different code get different fingerprints, whatever
    the files' timestamps say. Directories are walked (caches and VCS dirs skipped); files with
    other suffixes are ignored unless `suffixes` is None.
    """
    entries: list[tuple[str, str]] = []
    for raw in paths:
        root = Path(raw)
        for f in _files(root, suffixes):
            rel = f.name if root.is_file() else f.relative_to(root).as_posix()
            h = hashlib.sha256()
            try:
                with open(f, "rb") as fh:
                    while chunk := fh.read(_CHUNK):
                        h.update(chunk)
            except OSError:
                continue
            entries.append((f"{root.name}/{rel}", h.hexdigest()))
    top = hashlib.sha256()
    for name, digest in sorted(entries):
        top.update(name.encode("utf-8", "surrogateescape") + b"\0" + digest.encode() + b"\n")
    return "sha256:" + top.hexdigest()


def _plain(obj: Any) -> Any:
    """JSON-able form of a config object: dataclasses, namespaces, mappings, sets, paths, floats."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, set | frozenset):
        return sorted((_plain(v) for v in obj), key=lambda v: json.dumps(v, sort_keys=True, default=str))
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else repr(obj)
    if obj is None or isinstance(obj, str | int | bool):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return _plain(obj.to_dict())
    if hasattr(obj, "__dict__"):
        return {k: _plain(v) for k, v in vars(obj).items() if not k.startswith("_")}
    return repr(obj)


def config_fingerprint(obj: Any) -> str:
    """'sha256:<hex>' of a config's canonical JSON (sorted keys), so equal configs hash equal.

    Why: a hyper-parameter quietly changed between restarts (or on one rank) shows up as a new
    fingerprint. Accepts dicts, dataclasses, argparse.Namespace, objects with to_dict()/__dict__.
    """
    text = json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _named_params(model: Any) -> list[tuple[str, Any]]:
    if hasattr(model, "named_parameters"):
        return sorted(model.named_parameters(), key=lambda kv: kv[0])
    if hasattr(model, "parameters"):
        return [(str(i), p) for i, p in enumerate(model.parameters())]
    if isinstance(model, dict):  # a state_dict
        return sorted(model.items())
    raise TypeError("param_checksum needs a module (named_parameters/parameters) or a state_dict")


def param_checksum(model: Any, sample: int = 4096) -> float:
    """Cheap float64 checksum of a model's parameters; data-parallel replicas must get the same value.

    Why: replicas that disagree after the same step mean corrupted updates or weights (T4, T9).
    Per parameter (sorted by name) at most `sample` elements are taken with a fixed stride, weighted
    by position (so swaps and sign flips count) and summed in float64; one device sync in total.
    Deterministic for identical parameters on identical hardware. Torch is imported lazily; any
    object with named_parameters()/parameters() of tensor-likes works.
    """
    params = _named_params(model)
    try:
        import torch
    except ImportError:  # duck-typed fallback (tests, non-torch frameworks): iterate in Python
        return _checksum_py(params, sample)
    if not params or not all(isinstance(p, torch.Tensor) for _, p in params):
        return _checksum_py(params, sample)
    parts = []
    with torch.no_grad():
        for i, (_, p) in enumerate(params):
            flat = p.detach().reshape(-1)
            n = flat.numel()
            if n == 0:
                continue
            step = max(1, n // sample)
            s = flat[::step][:sample].to(torch.float64)
            w = (torch.arange(s.numel(), device=s.device, dtype=torch.float64) % 13 + 1.0) * (1.0 + (i % 97) / 97.0)
            parts.append((s * w).sum())
        if not parts:
            return 0.0
        return float(torch.stack(parts).sum().item())


def _checksum_py(params: list[tuple[str, Any]], sample: int) -> float:
    total = 0.0
    for i, (_, p) in enumerate(params):
        flat = p.detach().reshape(-1) if hasattr(p, "detach") else p
        seq = flat.tolist() if hasattr(flat, "tolist") else list(flat)
        n = len(seq)
        if n == 0:
            continue
        step = max(1, n // sample)
        vals = seq[::step][:sample]
        scale = 1.0 + (i % 97) / 97.0
        total += math.fsum(float(v) * ((k % 13) + 1.0) * scale for k, v in enumerate(vals))
    return total
