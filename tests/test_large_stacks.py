"""What large models train with: fp16 loss scaling, activation checkpointing, compiled train steps.

Each runs a small public-style loop twice, bare and watched, and asks for the same losses and for
figures equal to a reference taken by the test itself (an own hook, the unscaled gradient).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import icsmon_agent
from icsmon_agent.alerts.model import Alert
from icsmon_agent.protocol import STAT_INDEX, Sample
from test_real_training import all_sent, train_and_collect

pytestmark = pytest.mark.slow  # real processes: `make check` leaves it out

HERE = Path(__file__).parent
GRAD = STAT_INDEX["grad_norm"]

# ------------------------------------------------------------------ fp16 loss scaling

SCALER_STEPS = 40


def scaled_run(
    runtime_dir: Path | None, *, user_steps: bool, init_scale: float = 1e5, every: int = 1
) -> tuple[list[float], dict[int, float], dict[int, bool], list[Sample], list[Alert], Any]:
    """An fp16 autocast loop with torch.amp.GradScaler whose scale grows every step, so it
    overflows and skips a step every few: unscale_, clip, scaler.step, update, as its docs
    write it. Which steps overflow depends on the CPU's fp16 arithmetic; a scale of 1e8 makes
    the first few overflow on any. Returns the losses, each step's unscaled pre-clip norm of the
    first Linear, whether the scaler skipped each step, and (watched) the samples and the alerts
    the job raised."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1)
    data = torch.Generator().manual_seed(1)
    losses: list[float] = []
    norms: dict[int, float] = {}
    skipped: dict[int, bool] = {}
    alerts: list[Alert] = []

    def body(mon: icsmon_agent.Monitor | None, i: int) -> None:
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(torch.randn(8, 16, generator=data))
        loss = out.float().pow(2).mean()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        first = model[0]
        norms[i] = float(torch.cat([first.weight.grad.flatten(), first.bias.grad.flatten()]).norm())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped[i] = scaler.get_scale() < before
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if mon is not None and user_steps:
            mon.step(loss=loss)

    if runtime_dir is None:
        for i in range(SCALER_STEPS):
            body(None, i)
        return losses, norms, skipped, [], [], None
    mon, samples = train_and_collect(
        model, runtime_dir, SCALER_STEPS, body, on_alert=alerts.append, every=every
    )
    return losses, norms, skipped, samples, alerts, mon


@pytest.mark.parametrize(
    ("user_steps", "init_scale", "every"),
    [(False, 1e5, 1), (True, 1e5, 1), (False, 1e8, 1), (False, 1e8, 5), (True, 1e8, 5)],
    ids=["optimizer-marked", "mon.step", "first-steps-overflow", "sparse-sampling", "sparse-mon.step"],
)
def test_a_loss_scalers_gradients_read_unscaled_and_its_skipped_steps_are_marked(
    runtime_dir: Path, user_steps: bool, init_scale: float, every: int
) -> None:
    """Whatever the steps' pattern of overflows (the first steps too, before any optimizer
    step shows the scaler) and whether or not they are sampled (between samples none of our
    hooks runs), the step count is the loop's and each sample's figures are its own step's."""
    run = {"user_steps": user_steps, "init_scale": init_scale}
    # Another scaler alive in the process (an earlier job's) must not be taken for this one.
    other = torch.amp.GradScaler("cpu")
    other.scale(torch.ones(()))
    bare, _, _, _, _, _ = scaled_run(None, **run)
    losses, norms, skipped, samples, alerts, mon = scaled_run(runtime_dir, **run, every=every)
    assert losses == bare and mon.errors == 0
    assert 3 <= sum(skipped.values()) <= SCALER_STEPS - 10  # the run does skip, and does step
    if init_scale > 1e7:
        assert skipped[0] and skipped[1]
    # A step the scaler skips is still a step: the count is the loop's.
    assert mon.steps == SCALER_STEPS
    if every == 1:
        assert all_sent([s.step for s in samples], mon.skipped + mon.dropped, list(range(SCALER_STEPS)))
    else:
        assert len(samples) >= 3
    for s in samples:
        assert s.scalars["scaler_skipped"] == float(skipped[s.step]), s.step
        assert s.scalars["loss_scale"] is not None and s.scalars["loss_scale"] >= 1e5 / 2**8
        grad = float(s.figures[0, GRAD])
        if skipped[s.step]:
            assert math.isnan(grad), (s.step, grad)  # absent, not a scaled Inf
        else:
            assert math.isclose(grad, norms[s.step], rel_tol=1e-2), (s.step, grad, norms[s.step])
    # The scaler's overflows are its own working: no rule takes them for a fault.
    assert not alerts, [(a.rule, a.layer, a.step) for a in alerts]


def test_a_scaler_updated_after_each_of_two_optimizers_counts_each_step_once(runtime_dir: Path) -> None:
    """Accelerate with two prepared optimizers, or a loop that steps and updates per optimizer: two
    update()s a step. They are not taken for two steps (nor, sampled every fifth step, for skipped
    ones in between): the count is the loop's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    first = torch.optim.SGD(model[0].parameters(), lr=0.01)
    second = torch.optim.SGD(model[2].parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=10**6)  # never overflows
    data = torch.Generator().manual_seed(1)

    def body(mon: icsmon_agent.Monitor, i: int) -> None:
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(torch.randn(8, 16, generator=data))
        scaler.scale(out.float().pow(2).mean()).backward()
        for opt in (first, second):
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)

    mon, samples = train_and_collect(model, runtime_dir, SCALER_STEPS, body, every=5)
    assert mon.errors == 0 and samples
    assert mon.steps == SCALER_STEPS


# ------------------------------------------------------------------ activation checkpointing


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.act = nn.GELU()
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.act(self.fc(x)))


class CheckpointedNet(nn.Module):
    """Blocks run through torch.utils.checkpoint, as Hugging Face's gradient_checkpointing and
    older code (use_reentrant=True, the old default) do; dropout inside, whose RNG the recompute
    replays."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.out = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=self.reentrant)
        return self.out(x)


def checkpointed_run(
    runtime_dir: Path | None, reentrant: bool, steps: int
) -> tuple[list[float], dict[str, list[float]], Any, list[Sample]]:
    torch.manual_seed(0)
    model = CheckpointedNet(reentrant)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(1)
    losses: list[float] = []
    # Each layer's every call this step, by an own hook: the forward's and the recompute's.
    calls: dict[str, list[float]] = {}

    def own(name: str) -> Callable[..., None]:
        return lambda m, a, out: calls.setdefault(name, []).append(
            float(out.detach().double().std(unbiased=False))
        )

    for name, module in model.named_modules():
        if name and not list(module.children()):
            module.register_forward_hook(own(name))

    def body(mon: icsmon_agent.Monitor | None, i: int) -> None:
        loss = nn.functional.mse_loss(model(torch.randn(4, 8, generator=data)), torch.zeros(4, 2))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    if runtime_dir is None:
        for i in range(steps):
            body(None, i)
        return losses, calls, None, []
    mon, samples = train_and_collect(model, runtime_dir, steps, body)
    return losses, calls, mon, samples


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_every_layer_inside_a_checkpointed_block_is_read_once_from_its_forward(
    runtime_dir: Path, reentrant: bool
) -> None:
    steps = 4
    bare, _, _, _ = checkpointed_run(None, reentrant, steps)
    losses, calls, mon, samples = checkpointed_run(runtime_dir, reentrant, steps)
    assert losses == bare and mon.errors == 0
    inner = [f"blocks.{b}.{leaf}" for b in range(3) for leaf in ("fc", "act", "drop")]
    assert mon.layer_names == ["inp", *inner, "out"]  # each once: the recompute adds no "#1"
    assert all_sent([s.step for s in samples], mon.skipped + mon.dropped, list(range(steps)))
    for s in samples:
        for row, name in enumerate(mon.layer_names):
            # The step's own forward is the layer's first call of it (the recompute, if any, the
            # second, with equal values: the checkpoint replays the RNG).
            per_step = len(calls[name]) // steps
            want = calls[name][s.step * per_step]
            got = float(s.figures[row, STAT_INDEX["std"]])
            assert math.isclose(got, want, rel_tol=1e-5), (name, s.step, got, want)
            assert not math.isnan(float(s.figures[row, GRAD])) or name.endswith(("act", "drop"))


# ------------------------------------------------------------------ compiled train steps

COMPILED_JOB = HERE / "compiled_step_job.py"


def compiled_step(env: dict[str, str], *args: str) -> tuple[dict[str, Any], int, set[str], str]:
    """A run of ``compiled_step_job.py``: its summary, recompilations, where its graphs broke (the
    source lines of the breaks' stacks: a recompiled graph breaks again at the same ones), stderr."""
    proc = subprocess.run(
        [sys.executable, str(COMPILED_JOB), *args],
        env=dict(env, TORCH_LOGS="recompiles,graph_breaks"),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    breaks = set(re.findall(r'__graph_breaks\]\s+File "([^"]+", line \d+)', err))
    return json.loads(proc.stdout.strip().splitlines()[-1]), err.count("Recompiling function"), breaks, err


@pytest.mark.timeout(900)
@pytest.mark.parametrize("fn", ["forward", "step"], ids=["fullgraph forward+loss", "whole train step"])
def test_a_compiled_train_step_streams_with_no_break_of_ours(env: dict[str, str], fn: str) -> None:
    """The forward compiled inside a bigger function (fullgraph, or with backward and optimizer):
    no warning from icsmon, no graph break beyond the bare run's, one recompilation at most (the
    sampled graph), the losses bit-identical, and every second step's figures arriving."""
    with ThreadPoolExecutor(2) as pool:
        (bare, bare_recompiles, bare_breaks, _), (watched, recompiles, breaks, err) = pool.map(
            lambda extra: compiled_step(env, "--fn", fn, *extra), [[], ["--watch"]]
        )
    assert watched["losses"] == bare["losses"]
    assert recompiles <= bare_recompiles + 1 and breaks <= bare_breaks, err[-3000:]
    assert not any("icsmon" in where for where in breaks)
    assert "icsmon_agent" not in "".join(
        line for line in err.splitlines() if "Warning" in line and "loopback" not in line
    ), err[-3000:]
    assert watched["errors"] == 0 and len(watched["layers"]) == 5
    assert all_sent(watched["sampled"], watched["unsent"], [0, 2, 4, 6])
    assert all(loss is not None for loss in watched["losses_sent"])
