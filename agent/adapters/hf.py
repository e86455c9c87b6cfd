"""Hugging Face `transformers.Trainer` callback that reports training progress to the local gpusoc agent.

    from agent.adapters import GpusocHFCallback
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=[GpusocHFCallback()])

Every process reports to the agent on its own host. Each optimizer step sends the step (and the
token count when `include_num_input_tokens_seen` is on), so the console sees a live job between
logging steps; the values Trainer logs every `logging_steps` (loss, grad_norm, learning_rate and
any other numbers, e.g. eval_loss) go out as they are logged. Trainer has already turned them into
Python floats, so nothing here waits for the GPU. Callbacks only read Trainer state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent import sdk
from agent.adapters import MAX_EXTRAS, init_sdk, scalar

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError("GpusocHFCallback needs Hugging Face Transformers: pip install transformers") from exc

__all__ = ["GpusocHFCallback"]

# Trainer's log keys -> SDK fields. Everything else numeric rides along as an extra.
_CORE = {"loss": "loss", "grad_norm": "grad_norm", "learning_rate": "lr"}
# Summary keys Trainer logs once at the end; the agent gains nothing from them per step.
_SKIP = frozenset({"total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second"})


class GpusocHFCallback(TrainerCallback):  # type: ignore[misc]
    """Send each step, and each set of logged metrics, through `agent.sdk`."""

    def __init__(self, *, job_id: str | None = None, heartbeat: bool = True, extras: bool = True) -> None:
        """`heartbeat=False` sends only on logging steps; `extras=False` only loss/grad_norm/lr/tokens."""
        super().__init__()
        self.job_id = job_id
        self.heartbeat = heartbeat
        self.extras = extras

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Register this process with its rank; TrainingArguments knows it once distributed is set up."""
        model = kwargs.get("model")
        init_sdk(
            "transformers",
            job_id=self.job_id,
            rank=int(getattr(args, "process_index", 0)),
            local_rank=max(int(getattr(args, "local_process_index", 0)), 0),
            world_size=int(getattr(args, "world_size", 1)),
            info={
                "run_name": getattr(args, "run_name", "") or "",
                "output_dir": getattr(args, "output_dir", "") or "",
                "max_steps": getattr(state, "max_steps", ""),
                "model": type(model).__name__ if model is not None else "",
            },
        )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.heartbeat:
            sdk.log(step=int(state.global_step), tokens=_tokens(state))

    def on_log(self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None,
               **kwargs: Any) -> None:
        if not logs:
            return
        core: dict[str, float] = {}
        more: dict[str, float] = {}
        for key, value in logs.items():
            number = scalar(value)
            if number is None or key in _SKIP:
                continue
            if key in _CORE:
                core[_CORE[key]] = number
            elif self.extras and len(more) < MAX_EXTRAS and key not in ("step", "tokens"):
                more[key] = number
        sdk.log(step=int(state.global_step), tokens=_tokens(state), **core, **more)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        sdk.flush()


def _tokens(state: Any) -> float | None:
    """Input tokens seen so far; Trainer keeps it at 0 unless include_num_input_tokens_seen is set."""
    value = scalar(getattr(state, "num_input_tokens_seen", None))
    return value if value else None
