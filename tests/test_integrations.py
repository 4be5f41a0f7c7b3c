"""The framework callbacks: Lightning's and Hugging Face ``Trainer``'s train a real small model,
stream the loss and the figures to a viewer, and stop training cleanly on an injected NaN."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from icsmon.store import Store
from icsmon.subscriber import Subscriber
from icsmon_agent import discovery
from icsmon_agent.protocol import Sample

pytestmark = pytest.mark.slow  # real processes: `make check` leaves it out

STEPS = 40
NAN_FROM = 15


class Regression(nn.Module):
    """y = x @ w: learnable, small; ``bad_from`` makes the inputs NaN from that call on."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        self.calls = 0
        self.bad_from: int | None = None
        self.losses: list[float] = []  # each training call's own loss, as the model returned it

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.bad_from is not None and self.calls > self.bad_from:
            x = x * float("nan")
        out = self.net(x)
        result = {"logits": out}
        if y is not None:
            result["loss"] = nn.functional.mse_loss(out.squeeze(-1), y)
            if self.training and torch.is_grad_enabled():
                self.losses.append(float(result["loss"].detach()))
        return result


def dataset(n: int = 4 * STEPS) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, generator=g)
    xs = torch.randn(n, 8, generator=g)
    return [{"x": x, "y": x @ w} for x in xs]


def watch_from_outside(runtime: Path, train: Callable[[], Any]) -> tuple[Any, list[Sample]]:
    """Train in a thread; meanwhile find the job by its discovery file and read what it sends, as a
    viewer would (the agent re-sends its recent history to a viewer that joins late)."""
    result: list[Any] = []
    trainer = threading.Thread(target=lambda: result.append(train()), daemon=True)
    trainer.start()
    deadline = time.monotonic() + 120
    jobs: list[discovery.JobInfo] = []
    while not jobs and time.monotonic() < deadline and trainer.is_alive():
        jobs = discovery.read_jobs(runtime)
        time.sleep(0.05)
    samples: list[Sample] = []
    if jobs:
        store = Store()
        with Subscriber(jobs[0].endpoint) as sub:
            while trainer.is_alive() and time.monotonic() < deadline:
                for msg in sub.poll(0.1):
                    if store.add(msg) and isinstance(msg, Sample):
                        samples.append(msg)
            for msg in sub.poll(0.5):
                if store.add(msg) and isinstance(msg, Sample):
                    samples.append(msg)
    trainer.join(30)
    assert result, "training did not finish"
    return result[0], samples


# ---------------------------------------------------------------------------------- Hugging Face


def hf_train(
    runtime: Path,
    tmp: Path,
    bad_from: int | None,
    every: int | None = 1,
    logging_steps: int = 1,
    accumulate: int = 1,
) -> tuple[Any, Any]:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip(
        "accelerate", reason="transformers' Trainer needs accelerate (the test extra brings it)"
    )
    from icsmon_agent.integrations.transformers import IcsmonCallback

    torch.manual_seed(0)
    model = Regression()
    model.bad_from = bad_from
    callback = IcsmonCallback(stop_on=("nonfinite",), every=every, runtime_dir=runtime, name="hf-job")
    args = transformers.TrainingArguments(
        output_dir=str(tmp / "out"), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=logging_steps, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False, gradient_accumulation_steps=accumulate,
    )  # fmt: skip

    def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        time.sleep(0.02)  # a step a viewer can follow
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=dataset(), data_collator=collate, callbacks=[callback]
    )
    return trainer, callback


@pytest.mark.timeout(180)
def test_hf_trainer_streams_loss_and_figures(runtime_dir: Path, tmp_path: Path) -> None:
    trainer, callback = hf_train(runtime_dir, tmp_path, None)
    _, samples = watch_from_outside(runtime_dir, lambda: trainer.train() and trainer.state)
    steps = [s.step for s in samples]
    assert len(samples) >= STEPS // 2 and steps == sorted(steps)
    assert any(s.loss is not None for s in samples)
    assert callback.monitor is None and callback.stopped_at is None  # closed at the end
    assert trainer.state.global_step == STEPS


@pytest.mark.timeout(180)
def test_hf_trainer_accumulation_shows_each_layer_once_and_the_models_own_loss(
    runtime_dir: Path, tmp_path: Path
) -> None:
    """gradient_accumulation_steps=2: two forwards an optimizer step. Each layer is shown once, from
    the step's first micro-batch, with the model's own loss (the Trainer divides the one it
    backpropagates by the accumulation)."""
    trainer, _ = hf_train(runtime_dir, tmp_path, None, accumulate=2)
    model = trainer.model
    state, samples = watch_from_outside(runtime_dir, lambda: trainer.train() and trainer.state)
    assert state.global_step == STEPS and len(model.losses) == 2 * STEPS
    assert len(samples) >= STEPS // 2
    for s in samples:
        assert s.figures.shape[0] == 3  # net.0, net.1, net.2: no "#1" from the second micro-batch
        assert s.loss is not None and math.isclose(s.loss, model.losses[2 * s.step], rel_tol=1e-6), (
            s.step,
            s.loss,
            model.losses[:6],
        )


@pytest.mark.timeout(180)
def test_hf_trainer_stops_on_nan(runtime_dir: Path, tmp_path: Path) -> None:
    """No viewer, the default cadence, and the Trainer's own logging every 10 steps (which filters a
    NaN window into a finite number): the step's own loss stops it within a step of the first NaN."""
    trainer, callback = hf_train(runtime_dir, tmp_path, NAN_FROM, every=None, logging_steps=10)
    trainer.train()
    # The model's call NAN_FROM + 1 is the first with NaN: the Trainer's step NAN_FROM + 1.
    assert callback.stopped_at is not None and NAN_FROM + 1 <= callback.stopped_at <= NAN_FROM + 2
    assert trainer.state.global_step == callback.stopped_at  # stopped at once, cleanly


# -------------------------------------------------------------------------------------- Lightning


def lightning_train(
    runtime: Path, bad_from: int | None, every: int | None = 1, accumulate: int = 1
) -> tuple[Any, Any, Callable[[], Any]]:
    pl = pytest.importorskip(
        "pytorch_lightning", reason="pytorch-lightning is not installed (the test extra)"
    )
    from icsmon_agent.integrations.lightning import IcsmonCallback

    class Module(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.model = Regression()
            self.model.bad_from = bad_from
            self.losses: list[float] = []  # every micro-batch's, as the user computed it

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            time.sleep(0.02)
            loss: torch.Tensor = self.model(batch["x"], batch["y"])["loss"]
            self.losses.append(float(loss))
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    module = Module()
    callback = IcsmonCallback(stop_on=("nonfinite",), every=every, runtime_dir=runtime, name="pl-job")
    trainer = pl.Trainer(
        max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        accumulate_grad_batches=accumulate,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(dataset(), batch_size=4)  # type: ignore[arg-type,var-annotated]

    def fit() -> Any:
        trainer.fit(module, loader)
        return module

    return trainer, callback, fit


@pytest.mark.timeout(180)
def test_lightning_streams_loss_and_figures(runtime_dir: Path) -> None:
    trainer, callback, fit = lightning_train(runtime_dir, None)
    _, samples = watch_from_outside(runtime_dir, fit)
    steps = [s.step for s in samples]
    assert len(samples) >= STEPS // 2 and steps == sorted(steps)
    assert all(s.loss is not None for s in samples[1:])
    assert callback.monitor is None and trainer.global_step == STEPS


@pytest.mark.timeout(180)
def test_lightning_stops_on_nan(runtime_dir: Path) -> None:
    """No viewer, the default cadence: stopped within a step of the first NaN loss."""
    trainer, callback, fit = lightning_train(runtime_dir, NAN_FROM, every=None)
    fit()
    assert callback.stopped_at is not None and NAN_FROM + 1 <= callback.stopped_at <= NAN_FROM + 2
    assert trainer.global_step < STEPS and trainer.should_stop


@pytest.mark.timeout(180)
def test_lightning_accumulation_shows_each_layer_once_and_the_users_loss(runtime_dir: Path) -> None:
    """accumulate_grad_batches=2: two micro-batches a step, both through the training step. Each
    layer once (not net.0 and net.0#1), and the loss the user's own, not Lightning's halved one."""
    _, _, fit = lightning_train(runtime_dir, None, accumulate=2)
    module, samples = watch_from_outside(runtime_dir, fit)
    layers = {len(s.figures) for s in samples}
    assert samples and layers == {3}, layers  # Linear, ReLU, Linear
    losses = module.losses  # micro-batches 2k and 2k+1 make step k; the step's loss is the last one's
    for s in samples[1:]:
        want = losses[2 * s.step + 1]
        assert s.loss is not None and math.isclose(s.loss, want, rel_tol=1e-6), (s.step, s.loss, want)
