"""PyTorch Lightning callback that reports training progress to the local gpusoc agent.

    from agent.adapters import GpusocLightningCallback
    trainer = lightning.Trainer(callbacks=[GpusocLightningCallback()])

Every rank reports to the agent on its own host (the agent matches ranks to GPUs). Each batch
sends the step and learning rate, which costs no GPU sync; loss, gradient norm and the other
logged metrics are read (`.item()`) only on Lightning's own logging steps
(`Trainer(log_every_n_steps=...)`), where Lightning already syncs. To report a gradient norm, log
it yourself, e.g. `self.log_dict(lightning.pytorch.utilities.grad_norm(self, norm_type=2))` in
`on_before_optimizer_step`; the callback picks up `grad_2.0_norm_total` or `grad_norm`.

Works with `lightning` (lightning.pytorch) and the older standalone `pytorch_lightning`; when both
are installed it subclasses the one your program imported first, because a Trainer only accepts
callbacks derived from its own package's Callback.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from typing import Any

from agent import sdk
from agent.adapters import MAX_EXTRAS, init_sdk, scalar

__all__ = ["GpusocLightningCallback"]

GRAD_NORM_KEYS = ("grad_norm", "grad_2.0_norm_total", "train/grad_norm")
LOSS_KEYS = ("loss", "train_loss", "train/loss")


def _callback_base() -> tuple[type, str]:
    """Lightning's Callback class and the package it came from, preferring one already imported."""
    candidates = ("lightning.pytorch", "pytorch_lightning")
    loaded = [name for name in candidates if name in sys.modules]
    for name in (*loaded, *candidates):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        base = getattr(module, "Callback", None)
        if isinstance(base, type):
            return base, name
    raise ImportError(
        "GpusocLightningCallback needs PyTorch Lightning: pip install lightning (or pytorch-lightning)"
    )


_Base, LIGHTNING_PACKAGE = _callback_base()


class GpusocLightningCallback(_Base):  # type: ignore[misc, valid-type]
    """Send step, loss, grad norm, learning rate, tokens and logged metrics through `agent.sdk`."""

    def __init__(
        self,
        *,
        job_id: str | None = None,
        log_every_n_steps: int | None = None,
        tokens_key: str = "tokens",
        extras: bool = True,
    ) -> None:
        """`log_every_n_steps=None` follows the Trainer's; `extras=False` sends only the five core values."""
        super().__init__()
        self.job_id = job_id
        self.log_every_n_steps = log_every_n_steps
        self.tokens_key = tokens_key
        self.extras = extras
        self._last_full_step = -1

    # -- hooks ---------------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Register once per rank process, after Lightning has launched it (ranks are known)."""
        if stage != "fit":
            return
        init_sdk(
            "lightning",
            job_id=self.job_id,
            rank=int(getattr(trainer, "global_rank", 0)),
            local_rank=int(getattr(trainer, "local_rank", 0)),
            world_size=int(getattr(trainer, "world_size", 1)),
            info={
                "lightning_package": LIGHTNING_PACKAGE,
                "max_steps": getattr(trainer, "max_steps", ""),
                "max_epochs": getattr(trainer, "max_epochs", ""),
                "model": type(pl_module).__name__,
            },
        )

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = int(getattr(trainer, "global_step", 0))
        lr = _learning_rate(trainer)
        every = self.log_every_n_steps or int(getattr(trainer, "log_every_n_steps", 50) or 50)
        if step == self._last_full_step or step % max(every, 1) != 0:
            sdk.log(step=step, lr=lr)  # heartbeat: no tensor reads, no GPU sync
            return
        self._last_full_step = step
        metrics: Mapping[str, Any] = getattr(trainer, "callback_metrics", None) or {}
        loss = _loss(outputs)
        if loss is None:
            loss = _first(metrics, LOSS_KEYS)
        grad_norm = _first(metrics, GRAD_NORM_KEYS)
        tokens = scalar(metrics[self.tokens_key]) if self.tokens_key in metrics else None
        more = self._extras(metrics) if self.extras else {}
        sdk.log(step=step, loss=loss, grad_norm=grad_norm, lr=lr, tokens=tokens, **more)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        sdk.flush()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        sdk.flush()

    # -- helpers -------------------------------------------------------------------------

    def _extras(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        skip = {*LOSS_KEYS, *GRAD_NORM_KEYS, self.tokens_key, "step", "lr", "loss", "grad_norm", "tokens"}
        out: dict[str, float] = {}
        for name, value in metrics.items():
            if len(out) >= MAX_EXTRAS:
                break
            if name in skip or not isinstance(name, str):
                continue
            number = scalar(value)
            if number is not None:
                out[name] = number
        return out


def _first(metrics: Mapping[str, Any], keys: tuple[str, ...]) -> float | None:
    for key in keys:
        if key in metrics:
            value = scalar(metrics[key])
            if value is not None:
                return value
    return None


def _loss(outputs: Any) -> float | None:
    """training_step's loss: a tensor, or the 'loss' entry of the dict it returned."""
    if outputs is None:
        return None
    if isinstance(outputs, Mapping):
        outputs = outputs.get("loss")
        if outputs is None:
            return None
    detach = getattr(outputs, "detach", None)
    return scalar(detach() if callable(detach) else outputs)


def _learning_rate(trainer: Any) -> float | None:
    """First param group's lr of the first optimizer: a Python float, so reading it is free."""
    try:
        groups = trainer.optimizers[0].param_groups
        return scalar(groups[0]["lr"])
    except (AttributeError, IndexError, KeyError, TypeError):
        return None
