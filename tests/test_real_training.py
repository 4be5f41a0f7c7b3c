"""Real training code with the two lines added: it must run exactly as it did without them.

The strongest check: the losses of a watched run are bit-identical to the same run without the
agent (same seed, separate processes), on small versions of public training scripts
(``public_models.py``): nanoGPT's GPT with dropout, AdamW warm-up, clipping, accumulation and bf16
autocast; torchvision's ResNet-18 with EMA, checkpoints and eval passes; the word-language-model
LSTM with its hand-written SGD. Compiled runs are judged by ``TORCH_LOGS=recompiles,graph_breaks``.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
import re
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks as global_forward_hooks
from torch.optim import optimizer as optimizer_module

import icsmon_agent
from helpers import wait_watching
from icsmon.store import Store
from icsmon.subscriber import Subscriber
from icsmon_agent.protocol import STAT_INDEX, Event, Sample
from public_models import GPT, RNNModel, copy_task, resnet18

pytestmark = pytest.mark.slow  # real processes: `make check` leaves it out

HERE = Path(__file__).parent
SCRIPT = HERE / "public_models.py"


def job(env: dict[str, str], *args: str, timeout: float = 300) -> tuple[dict[str, Any], str]:
    """Run ``public_models.py`` in a fresh process; its JSON summary and its stderr."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def all_sent(sampled: list[int], unsent: int, steps: list[int]) -> bool:
    """Every step in ``steps`` was sampled and received once, but for those the agent counted as
    not sent: skipped while its offload thread caught up, or dropped while its publisher thread
    did (with every-step sampling, tiny steps on a busy machine). The publisher's count may include
    a queued event it dropped, so the received and the unsent cover the steps at least."""
    received = len(sampled)
    return set(sampled) <= set(steps) and len(set(sampled)) == received and received + unsent >= len(steps)


def losses(summary: dict[str, Any]) -> list[float]:
    return [float.fromhex(v) for v in summary["losses"]]


# ------------------------------------------------------------------ the model's own state


def test_a_watched_model_pickles_copies_and_checkpoints_as_without_the_agent(
    runtime_dir: Path, tmp_path: Path
) -> None:
    """torch.save(model), deepcopy, AveragedModel and state_dict work while watched, paused and
    closed; nothing of ours is in the pickle; a process that cannot import icsmon loads it."""
    torch.manual_seed(0)
    model = resnet18()
    mon = icsmon_agent.watch(model, every=1, runtime_dir=runtime_dir)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 4, (4,))
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9)
    )
    for state in ("watched", "paused", "closed"):
        if state == "watched":
            mon._capture.set_hooks(True)  # as on a sampled step: the copy's calls reach our hooks
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        ema.update_parameters(model)
        if state == "paused":
            mon.pause()
        if state == "closed":
            mon.close()
        blob = pickle.dumps(model)
        assert b"icsmon" not in blob, state
        twin = copy.deepcopy(model)
        calls, hooked = mon._capture.layer_calls, bool(global_forward_hooks)
        twin(x).sum().backward()  # a copy's modules are other objects: never read
        assert mon._capture.layer_calls == calls and (hooked or state != "watched")
        buf = io.BytesIO()
        torch.save({"state": model.state_dict(), "opt": opt.state_dict()}, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=True)
        assert set(loaded["state"]) == set(model.state_dict())
    assert mon.layer_names and mon.errors == 0
    path = tmp_path / "model.pt"
    torch.save(model, path)
    loader = (
        "import sys; sys.modules['icsmon_agent'] = None; sys.modules['icsmon'] = None\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        "import torch\n"
        f"m = torch.load({str(path)!r}, weights_only=False)\n"
        "print(type(m).__name__, sum(p.numel() for p in m.parameters()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", loader], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ResNet", str(sum(p.numel() for p in model.parameters()))]


# ------------------------------------------------------------------ bit-identical losses, eager

EAGER_JOBS = {
    "gpt: dropout, AdamW warm-up, clipping, accumulation x2, bf16 autocast, no_grad evals": [
        "gpt", "--steps", "8", "--dropout", "0.1", "--accum", "2", "--amp", "--eval-every", "3",
    ],
    "resnet18: zero-init residual, in-place ReLU, EMA, checkpoint + deepcopy, eval passes": [
        "resnet", "--steps", "6", "--ema", "--checkpoint", "--eval-every", "2",
    ],
    "lstm: word-language-model, manual SGD, clipping, no optimizer and no step()": [
        "lstm", "--steps", "24", "--eval-every", "5", "--dropout", "0.2",
    ],
}  # fmt: skip


@pytest.mark.parametrize("args", list(EAGER_JOBS.values()), ids=list(EAGER_JOBS))
def test_watched_runs_lose_exactly_what_bare_runs_lose(env: dict[str, str], args: list[str]) -> None:
    bare, _ = job(env, *args)
    watched, err = job(env, *args, "--watch", "--viewer")
    assert losses(watched) == losses(bare)
    steps = int(args[args.index("--steps") + 1])
    assert watched["errors"] == 0 and watched["layers"]
    assert all_sent(watched["sampled_steps"], watched["skipped"] + watched["dropped"], list(range(steps))), (
        watched
    )
    assert "Traceback" not in err
    if args[0] == "lstm":  # no optimizer, no step(): each training forward is a step, said once
        assert err.count("each training forward counts as a step") == 1
    else:
        assert "counts as a step" not in err
    if args[0] == "resnet":
        assert watched["checkpoint_mentions_icsmon"] is False
        assert watched["checkpoint_bytes"] == bare["checkpoint_bytes"]


# ------------------------------------------------------------------ torch.compile


def compiled_job(env: dict[str, str], *args: str) -> tuple[dict[str, Any], int, int, str]:
    """A compiled run: its summary, recompilations and graph breaks as TORCH_LOGS prints them."""
    env = dict(env, TORCH_LOGS="recompiles,graph_breaks")
    summary, err = job(env, *args, "--compile", timeout=400)
    return summary, err.count("Recompiling function"), err.lower().count("graph break"), err


# Three compiles of a model in three processes: minutes on a small CPU machine, so the limit is the
# jobs' own (``compiled_job``), not the suite's default.
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("model", "steps", "exact"),
    [("gpt", "8", True), ("mlp", "6", True), ("resnet", "3", False)],
    ids=["nanoGPT", "Sequential MLP", "ResNet-18"],
)
def test_compiled_models_stream_without_graph_breaks_or_recompiles(
    env: dict[str, str], model: str, steps: str, exact: bool
) -> None:
    """Watched after compile and before it: at most 2 recompilations, no graph break, no frame of
    ours compiled; losses bit-identical to the compiled bare run where the compiler's fusion allows
    (a ResNet's sampled graph exposes BatchNorm outputs, and Inductor fuses its reductions another
    way: equal to within float rounding there, and bit-identical between two watched runs)."""
    # The GPT also runs no_grad evaluation passes: a graph of their own, for bare and watched alike.
    args = [model, "--steps", steps, "--every", "2", *(["--eval-every", "3"] if model == "gpt" else [])]
    variants = [[], ["--watch", "--viewer"], ["--watch", "--viewer", "--watch-before-compile"]]
    with ThreadPoolExecutor(len(variants)) as pool:  # three processes at once: the compiles overlap
        (bare, bare_recompiles, breaks, _), *runs = pool.map(
            lambda extra: compiled_job(env, *args, *extra), variants
        )
    assert breaks == 0 and bare_recompiles == (1 if model == "gpt" else 0)
    for summary, recompiles, breaks, err in runs:
        assert recompiles <= bare_recompiles + 2 and breaks == 0, err[-3000:]
        assert not re.search(r"Recompiling function \w+ in \S*icsmon_agent", err), (
            "a frame of ours was compiled"
        )
        assert summary["compiled"] and summary["errors"] == 0 and summary["layers"]
        assert all_sent(
            summary["sampled_steps"], summary["skipped"] + summary["dropped"], list(range(0, int(steps), 2))
        )
        if exact:
            assert losses(summary) == losses(bare)
        else:
            for got, want in zip(losses(summary), losses(bare), strict=True):
                assert abs(got - want) <= 1e-6 * abs(want), (got, want)
    assert losses(runs[0][0]) == losses(runs[1][0])


# ------------------------------------------------------------------ what counts as training


def train_and_collect(
    model: nn.Module, runtime_dir: Path, steps: int, body: Any, **watch: Any
) -> tuple[icsmon_agent.Monitor, list[Sample]]:
    """Every step sampled unless ``watch`` says otherwise; the samples heard until each step's is
    in or counted as not sent (or, sampling fewer, until the job's closing event)."""
    options = {"every": 1, "endpoint": "tcp", "runtime_dir": runtime_dir, **watch}
    mon = icsmon_agent.watch(model, **options)
    store, got, closed = Store(), [], False

    def hear(timeout: float) -> None:
        nonlocal closed
        for m in sub.poll(timeout):
            if store.add(m):
                got.extend([m] if isinstance(m, Sample) else [])
                closed |= isinstance(m, Event) and m.event == "closing"

    with Subscriber(mon.endpoint or "") as sub:
        assert wait_watching(mon, sub)
        for i in range(steps):
            body(mon, i)
            hear(0)
        mon.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if len(got) + mon.skipped + mon.dropped >= steps or (closed and options["every"] != 1):
                break
            hear(0.05)
    return mon, got


def test_forwards_without_gradients_are_never_sampled(runtime_dir: Path) -> None:
    """no_grad and inference_mode passes, with the model still in train mode, are not steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def body(mon: icsmon_agent.Monitor, i: int) -> None:
        nn.functional.mse_loss(model(torch.randn(4, 8)), torch.zeros(4, 2)).backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            model(torch.full((4, 8), 1e4))  # an evaluation pass, model.training still True
        with torch.inference_mode():
            model(torch.full((4, 8), -1e4))

    mon, samples = train_and_collect(model, runtime_dir, 6, body)
    assert all_sent([s.step for s in samples], mon.skipped + mon.dropped, list(range(6))) and mon.steps == 6
    top = max(float(s.figures[i, STAT_INDEX["max"]]) for s in samples for i in range(3))
    assert top < 100, "an evaluation batch was sampled"


def test_accumulation_samples_the_first_micro_batch_and_gradients_before_clipping(runtime_dir: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    firsts: list[float] = []
    pre_clip: list[float] = []

    stds: list[float] = []
    model[0].register_forward_hook(
        lambda m, a, out: stds.append(float(out.detach().double().std(unbiased=False)))
    )

    def body(mon: icsmon_agent.Monitor, i: int) -> None:
        for micro in range(3):
            x = torch.randn(4, 8) * (1 + micro)  # each micro-batch its own scale
            model(x).pow(2).mean().backward()
        firsts.append(stds[-3])
        pre_clip.append(float(torch.linalg.vector_norm(model[0].weight.grad.double().flatten()).item()))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        opt.step()
        opt.zero_grad()

    # Only the first Linear is watched: its std and gradient norm are what is checked.
    mon, samples = train_and_collect(model, runtime_dir, 5, body, include="0")
    assert all_sent([s.step for s in samples], mon.skipped + mon.dropped, list(range(5))) and mon.errors == 0
    for s in samples:
        std, grad = float(s.figures[0, STAT_INDEX["std"]]), float(s.figures[0, STAT_INDEX["grad_norm"]])
        assert abs(std - firsts[s.step]) <= 1e-5 * firsts[s.step]
        # The layer's norm covers weight and bias: at least the weight's, and far above the clip.
        assert pre_clip[s.step] <= grad * (1 + 1e-5) and grad > 1e-2


# ------------------------------------------------------------------ odd outputs and scalars


class SparseLeaf(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to_sparse()


class MetaLeaf(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.empty(x.shape, device="meta")


class Odd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.sparse, self.meta, self.head = (
            nn.Linear(8, 8),
            SparseLeaf(),
            MetaLeaf(),
            nn.Linear(8, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        self.meta(h)
        return self.head(self.sparse(h).to_dense())


def test_odd_outputs_and_scalars_cost_themselves_alone(runtime_dir: Path) -> None:
    """A sparse and a meta leaf are left out (never a fault, never a detach); a scalar that does
    not fit a float is dropped alone, the sample and the loss still go."""
    torch.manual_seed(0)
    model = Odd()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def body(mon: icsmon_agent.Monitor, i: int) -> None:
        loss = model(torch.randn(4, 8)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        mon.step(loss=loss, tokens=10**400, note="n/a")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon, samples = train_and_collect(model, runtime_dir, 60, body)
    assert mon.errors == 0 and mon.layer_names == ["fc", "head"]
    assert (
        all_sent([s.step for s in samples], mon.skipped + mon.dropped, list(range(60))) and len(samples) >= 20
    )
    assert all(s.loss is not None and "tokens" not in s.scalars for s in samples)
    said = [str(w.message) for w in caught if "icsmon" in str(w.message)]
    assert len([m for m in said if "tokens" in m]) == 1, said


def test_an_lstm_hidden_tuple_and_tied_weights_are_read(runtime_dir: Path) -> None:
    """The LSTM's (output, (h, c)) and a decoder tied to the encoder: the output is read, the
    shared weight's gradient counted for both layers that own it."""
    torch.manual_seed(0)
    model = RNNModel("LSTM", 16, 8, 8, 1, dropout=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def body(mon: icsmon_agent.Monitor, i: int) -> None:
        x = torch.randint(0, 16, (5, 2))
        out, _ = model(x, model.init_hidden(2))
        nn.functional.nll_loss(out, torch.randint(0, 16, (10,))).backward()
        opt.step()
        opt.zero_grad()

    mon, samples = train_and_collect(model, runtime_dir, 3, body)
    assert mon.layer_names == ["encoder", "rnn", "decoder"]  # its dropout of p=0 is no layer
    grads = samples[-1].figures[:, STAT_INDEX["grad_norm"]]
    assert float(grads[0]) > 0 and float(grads[2]) > 0  # encoder, decoder


def test_no_hook_of_ours_is_left_on_the_model_or_after_close(runtime_dir: Path) -> None:
    torch.manual_seed(0)
    model = GPT()
    mon = icsmon_agent.watch(model, runtime_dir=runtime_dir)
    x, y = copy_task(torch.Generator().manual_seed(0))
    model(x, y)[1].backward()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    mon.close()
    assert not global_forward_hooks and not torch.nn.modules.module._global_forward_pre_hooks
    assert not optimizer_module._global_optimizer_post_hooks


def test_a_model_compiled_before_watch_is_named_not_silently_unwatched(runtime_dir: Path) -> None:
    """A graph traced before the hooks existed never calls them: the agent says so, once, with
    what to do, and training goes on."""
    torch.manual_seed(0)
    model = GPT(n_layer=1)
    compiled = torch.compile(model)
    x, y = copy_task(torch.Generator().manual_seed(0))
    try:
        compiled(x, y)[1].backward()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mon = icsmon_agent.watch(compiled, runtime_dir=runtime_dir)
            for _ in range(3):
                compiled(x, y)[1].backward()
            mon.close()
        said = [str(w.message) for w in caught if "compiled before watch()" in str(w.message)]
        assert len(said) == 1 and "torch._dynamo.reset()" in said[0]
        assert mon.errors == 0 and mon.layer_names == []
    finally:
        torch._dynamo.reset()


def test_a_loop_that_marks_no_step_is_told_to_the_viewer(runtime_dir: Path) -> None:
    """The word-language-model's hand-written update, two lines only: every forward is a step, the
    viewer's store learns it (the app's header says "steps = forwards", tail says it on stderr)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mon = icsmon_agent.watch(model, every=1, endpoint="tcp", runtime_dir=runtime_dir)
    store = Store()
    with Subscriber(mon.endpoint or "") as sub:
        assert wait_watching(mon, sub)
        for _ in range(20):
            model.zero_grad()
            model(torch.randn(2, 4)).pow(2).mean().backward()
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-0.01)
            for m in sub.poll(0):
                store.add(m)
        mon.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not ((run := store.newest()) is not None and run.ended):
            for m in sub.poll(0.05):
                store.add(m)
    assert run is not None and run.forward_steps and mon.steps == 20
    assert run.latest_step is not None and run.latest_step + mon.skipped >= 19  # the last one, sent at close
    grads = run.figures[: run.count, 0, STAT_INDEX["grad_norm"]]
    assert run.count >= 10 and np.isfinite(grads).all() and (grads > 0).all(), grads  # taken after backward


def test_two_optimizers_on_one_model_make_one_step(runtime_dir: Path) -> None:
    """A model trained by two optimizers (one per part, as Muon + AdamW set-ups do): the first to
    step marks the steps, the second steps within the same step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opts = [torch.optim.SGD(model[0].parameters(), lr=0.01), torch.optim.Adam(model[2].parameters(), lr=0.01)]
    mon = icsmon_agent.watch(model, every=1, runtime_dir=runtime_dir)
    for _ in range(4):
        model(torch.randn(2, 4)).pow(2).mean().backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
    mon.close()
    assert mon.steps == 4 and mon.errors == 0
