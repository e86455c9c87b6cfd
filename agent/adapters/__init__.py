"""Training-framework adapters for the gpusoc SDK: a PyTorch Lightning callback and a Hugging Face
Trainer callback.

Nothing here imports Lightning or Transformers until an adapter is asked for, so the agent and the
plain SDK never need them; asking for one without its library raises ImportError that names the
package to install. Two lines each:

    from agent.adapters import GpusocLightningCallback
    trainer = lightning.Trainer(callbacks=[GpusocLightningCallback()])

    from agent.adapters import GpusocHFCallback
    trainer = transformers.Trainer(..., callbacks=[GpusocHFCallback()])
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.adapters.hf import GpusocHFCallback
    from agent.adapters.lightning import GpusocLightningCallback

__all__ = ["GpusocHFCallback", "GpusocLightningCallback"]

_WHERE = {
    "GpusocLightningCallback": "agent.adapters.lightning",
    "GpusocHFCallback": "agent.adapters.hf",
}


def __getattr__(name: str) -> Any:
    """Import an adapter's module (and so its framework) only on first use."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


# ---- shared by the adapters (no framework imports here) -----------------------------------

MAX_EXTRAS = 32  # extra metrics per record; the SDK allows 255, dashboards rarely want more


def scalar(value: Any) -> float | None:
    """A plain float from a Python number or a one-element tensor/array; None for anything else.

    Tensors go through `.item()`, which waits for the GPU, so callers only do this on the
    steps the framework itself logs on.
    """
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    item = getattr(value, "item", None)
    if item is None:
        return None
    numel = getattr(value, "numel", None)
    try:
        if numel is not None and int(numel()) != 1:
            return None
        got = item()
    except Exception:  # a metric we cannot read must not break training
        return None
    return float(got) if isinstance(got, int | float) else None


def init_sdk(framework: str, *, job_id: str | None, rank: int, local_rank: int, world_size: int,
             info: dict[str, Any]) -> None:
    """Register this rank with the agent, keeping a job id the user already gave `sdk.init`."""
    from agent import sdk

    existing = getattr(sdk, "_client", None)
    existing_job: str = str(getattr(existing, "job_id", "") or "") if existing is not None else ""
    if job_id is None and existing_job:
        job_id = existing_job
    sdk.init(job_id=job_id, rank=rank, local_rank=local_rank, world_size=world_size,
             info={"framework": framework, **{k: str(v) for k, v in info.items()}})
