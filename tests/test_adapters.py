"""Lightning and Hugging Face adapters, against minimal fake framework modules in sys.modules.

The fakes carry only what the adapters touch (a Callback / TrainerCallback base class); the
records go through the real SDK to a real TrainingReceiver socket, so the test covers the wire.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import sdk
from agent.training import TrainingReceiver
from protos.types import TrainRecord


class FakeTensor:
    """Enough of torch.Tensor: item(), numel(), detach(); counts item() calls (GPU syncs)."""

    items = 0

    def __init__(self, value: float, numel: int = 1) -> None:
        self.value = value
        self._numel = numel

    def item(self) -> float:
        FakeTensor.items += 1
        return self.value

    def numel(self) -> int:
        return self._numel

    def detach(self) -> FakeTensor:
        return self


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TrainingReceiver]:
    path = str(tmp_path / "agent.sock")
    monkeypatch.setenv(sdk.ENV_SOCKET, path)
    monkeypatch.setenv("GPUSOC_SDK_COALESCE_MS", "0")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_JOB_ID", "GPUSOC_JOB_ID", sdk.ENV_DISABLED):
        monkeypatch.delenv(var, raising=False)
    rx = TrainingReceiver(path, background=False)
    sdk.close()
    yield rx
    sdk.close()
    rx.close()


def received(rx: TrainingReceiver) -> list[TrainRecord]:
    sdk.flush()
    deadline = time.monotonic() + 2
    out: list[TrainRecord] = []
    while time.monotonic() < deadline:
        rx.pump()
        out.extend(rx.drain())
        if out:
            time.sleep(0.02)
            rx.pump()
            out.extend(rx.drain())
            break
        time.sleep(0.01)
    return [r for r in out if r.kind == "log"]


def _fresh(module: str) -> Any:
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        del sys.modules[name]
    return importlib.import_module(module)


# ---------------------------------------------------------------- Lightning


@pytest.fixture
def fake_lightning(monkeypatch: pytest.MonkeyPatch) -> type:
    class Callback:
        pass

    pkg = types.ModuleType("lightning")
    sub = types.ModuleType("lightning.pytorch")
    sub.Callback = Callback  # type: ignore[attr-defined]
    pkg.pytorch = sub  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lightning", pkg)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", sub)
    monkeypatch.delitem(sys.modules, "agent.adapters.lightning", raising=False)
    return Callback


class FakeTrainer:
    def __init__(self) -> None:
        self.global_step = 0
        self.global_rank = 5
        self.local_rank = 1
        self.world_size = 16
        self.log_every_n_steps = 10
        self.max_steps = 100
        self.max_epochs = None
        self.callback_metrics: dict[str, Any] = {}
        opt = types.SimpleNamespace(param_groups=[{"lr": 3e-4}])
        self.optimizers = [opt]


def test_lightning_callback_reports_steps_and_logged_metrics(fake_lightning: type, receiver: TrainingReceiver) -> None:
    from agent.adapters import GpusocLightningCallback

    cb = GpusocLightningCallback(job_id="pl-job")
    assert isinstance(cb, fake_lightning)
    trainer, module = FakeTrainer(), object()
    cb.setup(trainer, module, "fit")
    FakeTensor.items = 0
    for step in range(1, 11):
        trainer.global_step = step
        if step == 10:
            trainer.callback_metrics = {
                "grad_2.0_norm_total": FakeTensor(1.25),
                "tokens": FakeTensor(4096.0),
                "val_acc": FakeTensor(0.5),
                "not_scalar": FakeTensor(1.0, numel=3),
                "label": "text",
            }
        cb.on_train_batch_end(trainer, module, {"loss": FakeTensor(2.0 + step)}, None, step)
    cb.on_train_end(trainer, module)
    # Tensors are read only on the logging step (10), not on the nine heartbeats.
    assert FakeTensor.items == 4
    recs = received(receiver)
    assert [r.step for r in recs] == list(range(1, 11))
    assert all(r.job_id == "pl-job" and r.rank == 5 and r.local_rank == 1 and r.world_size == 16 for r in recs)
    assert all(r.lr == pytest.approx(3e-4) for r in recs)
    heartbeat, full = recs[0], recs[-1]
    assert heartbeat.loss != heartbeat.loss  # NaN: not read on a heartbeat
    assert full.loss == 12.0 and full.grad_norm == 1.25 and full.tokens == 4096.0
    assert full.extra == {"val_acc": 0.5}
    jobs = receiver.jobs()
    assert jobs["pl-job"][5].info["framework"] == "lightning"


def test_lightning_callback_prefers_the_imported_package(monkeypatch: pytest.MonkeyPatch) -> None:
    class OldCallback:
        pass

    class NewCallback:
        pass

    old = types.ModuleType("pytorch_lightning")
    old.Callback = OldCallback  # type: ignore[attr-defined]
    new = types.ModuleType("lightning.pytorch")
    new.Callback = NewCallback  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pytorch_lightning", old)
    monkeypatch.setitem(sys.modules, "lightning", types.ModuleType("lightning"))
    monkeypatch.setitem(sys.modules, "lightning.pytorch", new)
    monkeypatch.delitem(sys.modules, "agent.adapters.lightning", raising=False)
    mod = importlib.import_module("agent.adapters.lightning")
    assert issubclass(mod.GpusocLightningCallback, NewCallback)  # both loaded: lightning.pytorch first
    monkeypatch.delitem(sys.modules, "lightning.pytorch")
    monkeypatch.delitem(sys.modules, "lightning")
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)  # type: ignore[arg-type]
    mod = _fresh("agent.adapters.lightning")
    assert issubclass(mod.GpusocLightningCallback, OldCallback)
    monkeypatch.delitem(sys.modules, "agent.adapters.lightning")


def test_lightning_missing_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lightning", None)  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)  # type: ignore[arg-type]
    monkeypatch.delitem(sys.modules, "agent.adapters.lightning", raising=False)
    with pytest.raises(ImportError, match="pip install lightning"):
        from agent.adapters import GpusocLightningCallback  # noqa: F401
    monkeypatch.delitem(sys.modules, "agent.adapters.lightning", raising=False)


# ---------------------------------------------------------------- Hugging Face


@pytest.fixture
def fake_transformers(monkeypatch: pytest.MonkeyPatch) -> type:
    class TrainerCallback:
        pass

    mod = types.ModuleType("transformers")
    mod.TrainerCallback = TrainerCallback  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "transformers", mod)
    monkeypatch.delitem(sys.modules, "agent.adapters.hf", raising=False)
    return TrainerCallback


def test_hf_callback_reports_steps_and_logs(fake_transformers: type, receiver: TrainingReceiver) -> None:
    from agent.adapters import GpusocHFCallback

    cb = GpusocHFCallback()
    assert isinstance(cb, fake_transformers)
    args = types.SimpleNamespace(process_index=2, local_process_index=0, world_size=4, run_name="r", output_dir="o")
    state = types.SimpleNamespace(global_step=0, max_steps=3, num_input_tokens_seen=0)
    control = object()
    sdk.init(job_id="user-given")  # a job id the user set before Trainer runs is kept
    cb.on_train_begin(args, state, control, model=object())
    for step in (1, 2, 3):
        state.global_step = step
        state.num_input_tokens_seen = 1000 * step
        cb.on_step_end(args, state, control)
    cb.on_log(args, state, control, logs={"loss": 1.5, "grad_norm": 0.75, "learning_rate": 2e-5, "epoch": 0.1,
                                          "train_runtime": 9.0, "note": "x"})
    cb.on_train_end(args, state, control)
    recs = received(receiver)
    assert [r.step for r in recs] == [1, 2, 3, 3]
    assert all(r.job_id == "user-given" and r.rank == 2 and r.world_size == 4 for r in recs)
    assert recs[0].tokens == 1000.0
    assert recs[0].loss != recs[0].loss
    last = recs[-1]
    assert (last.loss, last.grad_norm, last.lr, last.tokens) == (1.5, 0.75, pytest.approx(2e-5), 3000.0)
    assert last.extra == {"epoch": pytest.approx(0.1)}


def test_hf_callback_without_heartbeat_or_extras(fake_transformers: type, receiver: TrainingReceiver) -> None:
    from agent.adapters import GpusocHFCallback

    cb = GpusocHFCallback(heartbeat=False, extras=False, job_id="hf")
    args = types.SimpleNamespace(process_index=0, local_process_index=-1, world_size=1)
    state = types.SimpleNamespace(global_step=7, max_steps=10)
    cb.on_train_begin(args, state, None)
    cb.on_step_end(args, state, None)
    cb.on_log(args, state, None, logs={"loss": 0.5, "eval_loss": 0.7})
    cb.on_log(args, state, None, logs=None)
    recs = received(receiver)
    assert len(recs) == 1 and recs[0].loss == 0.5 and recs[0].extra == {} and recs[0].local_rank == 0


def test_hf_missing_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # type: ignore[arg-type]
    monkeypatch.delitem(sys.modules, "agent.adapters.hf", raising=False)
    with pytest.raises(ImportError, match="pip install transformers"):
        from agent.adapters import GpusocHFCallback  # noqa: F401


def test_unknown_adapter_name() -> None:
    import agent.adapters

    with pytest.raises(AttributeError):
        agent.adapters.NoSuchCallback  # noqa: B018


def test_package_import_pulls_in_no_framework() -> None:
    frameworks = ("lightning", "pytorch_lightning", "transformers", "torch")
    code = f"import sys, agent.adapters; print(sorted(m for m in {frameworks!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
