"""Healthy modern networks, sampled every step over whole runs to low loss, raise no alert.

The networks of ``public_models.py`` (nanoGPT's GPT with AdamW warm-up and cosine decay, the
torchvision ResNet-18 with and without zero-init residual BatchNorm, the word-language-model LSTM)
and, where ``transformers`` is installed, a post-LayerNorm BERT with token-type embeddings: the
real agent, a real subscriber, the viewer's own store and alert engine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import icsmon_agent
from helpers import wait_watching
from hf_nets import convnext, llama, mixtral, t5, vit
from icsmon.store import Store
from icsmon.subscriber import Subscriber
from icsmon_agent.alerts.engine import AlertEngine
from icsmon_agent.alerts.model import AlertChange
from icsmon_agent.protocol import Sample
from public_models import (
    GPT,
    RNNModel,
    copy_task,
    counting_corpus,
    gpt_lr,
    quadrant_task,
    repackage_hidden,
    resnet18,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

Step = Callable[[int], float]  # trains one step, returns its loss


def watch_run(
    model: nn.Module, step: Step, steps: int, runtime_dir: Path
) -> tuple[list[AlertChange], list[float], int, list[str]]:
    """Train ``steps`` steps sampled every step; (alerts fired, losses, samples seen, the rules
    still active at the end)."""
    mon = icsmon_agent.watch(model, every=1, endpoint="tcp", runtime_dir=runtime_dir)
    store, engine = Store(), AlertEngine()
    fired: list[AlertChange] = []
    losses: list[float] = []
    seen = 0

    def take(wait: float) -> None:
        nonlocal seen
        for msg in sub.poll(wait):
            if store.add(msg) and isinstance(msg, Sample):
                seen += 1
                run = store.get(msg.run, msg.rank)
                assert run is not None
                fired.extend(c for c in engine.update(run) if not c.cleared)

    with Subscriber(mon.endpoint or "") as sub:
        assert wait_watching(mon, sub)
        for i in range(steps):
            losses.append(step(i))
            mon.step(loss=losses[-1])  # as README asks: the loss rides with the sample
            take(0)
        mon.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and seen + mon.skipped + mon.dropped < steps:
            take(0.05)
    assert mon.errors == 0
    return fired, losses, seen, [a.rule for a in engine.active]


def gpt_run() -> tuple[nn.Module, Step]:
    torch.manual_seed(0)
    model = GPT(n_layer=2, n_embd=32, dropout=0.0)
    opt = model.configure_optimizers(weight_decay=0.1, lr=1e-2)
    gen = torch.Generator().manual_seed(1)

    def step(i: int) -> float:  # to the task's floor (~1.73: the first half of each sequence is random)
        for group in opt.param_groups:
            group["lr"] = gpt_lr(i, lr=1e-2, warmup=20, decay_iters=400, min_lr=1e-3)
        x, y = copy_task(gen)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return model, step


def resnet_run(zero_init: bool, lr: float = 0.05) -> Callable[[], tuple[nn.Module, Step]]:
    """torchvision's ResNet-18 recipe (SGD with momentum and weight decay) at learning rate ``lr``."""

    def make() -> tuple[nn.Module, Step]:
        torch.manual_seed(0)
        model = resnet18(zero_init_residual=zero_init)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        gen = torch.Generator().manual_seed(1)

        def step(i: int) -> float:
            x, y = quadrant_task(gen)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return float(loss.detach())

        return model, step

    return make


def language_model_run(rnn: str, lr: float, clip: float | None) -> Callable[[], tuple[nn.Module, Step]]:
    """The word-language-model example's train(): manual SGD at ``lr``, clipping at ``clip``."""

    def make() -> tuple[nn.Module, Step]:
        torch.manual_seed(0)
        model = RNNModel(rnn, 32, 32, 32, 2, dropout=0.0)
        gen = torch.Generator().manual_seed(1)
        hidden = [model.init_hidden(8)]

        def step(i: int) -> float:
            data, targets = counting_corpus(gen)
            model.zero_grad()
            hidden[0] = repackage_hidden(hidden[0])
            output, hidden[0] = model(data, hidden[0])
            loss = F.nll_loss(output, targets)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-lr)
            return float(loss.detach())

        return model, step

    return make


def bert_run() -> tuple[nn.Module, Step]:
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    model = transformers.BertForMaskedLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)

    def step(i: int) -> float:
        x, _ = copy_task(gen, batch=8, block=16, vocab=32)
        masked = x.clone()
        masked[:, 8:] = 0  # the second half hidden: predictable from the first
        loss = model(input_ids=masked, token_type_ids=torch.zeros_like(x), labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        return float(loss.detach())

    return model, step


HEALTHY = {
    "nanoGPT GPT (pre-LN, GELU, tied, AdamW warm-up + cosine)": (gpt_run, 400),
    "ResNet-18, zero-init residual BN": (resnet_run(True), 150),
    "ResNet-18, plain init": (resnet_run(False), 150),
    "LSTM word-language-model (manual SGD, clipping)": (language_model_run("LSTM", 5.0, 0.25), 300),
    "BERT (post-LN, token types)": (bert_run, 200),
    "Llama (RMSNorm, SwiGLU, rotary), to near-zero loss": (llama(), 300),
    "Mixtral (top-2 routed experts)": (mixtral(2), 200),
    "Mixtral (top-1 routing: the router gets no gradient, by design)": (mixtral(1), 150),
    "T5 (ReLU feed-forward, relative position bias)": (t5, 200),
    "ViT (pre-LN)": (vit, 200),
    "ConvNeXt (layer scale)": (convnext, 200),
}


@pytest.mark.parametrize(("make", "steps"), list(HEALTHY.values()), ids=list(HEALTHY))
def test_healthy_networks_raise_no_alert_over_whole_runs(
    make: Callable[[], tuple[nn.Module, Step]], steps: int, runtime_dir: Path
) -> None:
    model, step = make()
    fired, losses, seen, _ = watch_run(model, step, steps, runtime_dir)
    assert seen >= steps // 2, "most steps were sampled"
    early, late = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert late < 0.7 * early, f"it did not learn: {early:.3f} -> {late:.3f}"
    assert [c.alert.message for c in fired] == []


# ------------------------------------------------------------------ the same networks, sick


def gpt_hot() -> tuple[nn.Module, Step]:
    """nanoGPT with no warm-up and a high learning rate."""
    torch.manual_seed(0)
    model = GPT(n_layer=2, n_embd=32)
    opt = model.configure_optimizers(weight_decay=0.1, lr=0.5)
    gen = torch.Generator().manual_seed(1)

    def step(i: int) -> float:
        x, y = copy_task(gen)
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return model, step


LLAMA_HOT = llama(lr=0.15, warmup=0)
SICK = {
    # What follows the explosion (dead ReLUs, or vanished gradients) hangs on the CPU's rounding;
    # the explosion itself, named before the first NaN, does not.
    "ResNet-18 at 20x its learning rate": (resnet_run(True, lr=1.0), {"exploding"}),
    # No clipping to save it.
    "RNN-ReLU language model at 10x its learning rate": (
        language_model_run("RNN_RELU", 50.0, None),
        {"exploding"},
    ),
    "nanoGPT with no warm-up and a high learning rate": (gpt_hot, {"exploding"}),
    "LSTM whose clipping zeroes the gradients (max_norm 0)": (
        language_model_run("LSTM", 5.0, 0.0),
        {"vanishing"},
    ),
    # AdamW's weight decay still moves every weight: only the gradients given to it tell.
    "Llama whose clipping zeroes the gradients, under AdamW": (llama(clip=0.0), {"vanishing"}),
    # Nothing jumps: the run is sick from its first step, its loss 3x chance.
    "Llama with N(0, 1) weights": (llama(init_std=1.0), {"loss"}),
    "Llama at 50x its learning rate, no warm-up": (LLAMA_HOT, {"exploding"}),
}


@pytest.mark.parametrize(("make", "rules"), list(SICK.values()), ids=list(SICK))
def test_sick_networks_fire_the_right_rule_early(
    make: Callable[[], tuple[nn.Module, Step]], rules: set[str], runtime_dir: Path
) -> None:
    model, step = make()
    fired, losses, _, _ = watch_run(model, step, 60, runtime_dir)
    first_nan = next((i for i, v in enumerate(losses) if not math.isfinite(v)), len(losses))
    got = {c.alert.rule: c.alert.step for c in reversed(fired)}  # the first of each rule
    assert rules <= set(got), [c.alert.message for c in fired]
    if "exploding" in rules:
        assert got["exploding"] < first_nan and got["exploding"] <= 30, got
        if make is LLAMA_HOT:  # pre-norm: the head after the final norm is no collapse
            assert "vanishing" not in got, [c.alert.message for c in fired]
        if make is gpt_hot:  # the hint names the job's own optimizer and rate, from the agent
            hint = next(c.alert.hint for c in fired if c.alert.rule == "exploding")
            assert "AdamW, lr 0.5 now" in hint and "normalis" not in hint, hint
    elif "vanishing" in rules:  # the gradients never reach the optimizer: said from the first samples
        (alert,) = [c.alert for c in fired if c.alert.rule == "vanishing"]
        assert alert.figure in ("update_ratio", "grad_norm_applied") and alert.step <= 5
        assert "clipped to 0" in alert.hint
    else:
        (alert,) = [c.alert for c in fired if c.alert.rule == "loss"]
        assert alert.layer == "" and "chance" in alert.message and alert.step <= 20


def test_a_run_stuck_high_after_a_blow_up_stays_flagged_to_its_last_step(runtime_dir: Path) -> None:
    """The word-language-model LSTM at 10x its learning rate (200): it blows up at once and sits at
    several times its start, with nothing jumping any more. An alert is still active at the end."""
    model, step = language_model_run("LSTM", 200.0, 0.25)()
    fired, losses, _, active = watch_run(model, step, 100, runtime_dir)
    assert sum(losses[-10:]) / 10 > 2 * losses[0], "the run is not sick"
    assert "loss" in active, [c.alert.message for c in fired]
