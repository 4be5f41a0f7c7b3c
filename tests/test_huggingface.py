"""Hugging Face models, built from small configs (no download), with the two lines added.

BERT is post-LayerNorm with token-type embeddings (a constant output over the batch); GPT-2 is
pre-LayerNorm with tied embeddings and returns a ``ModelOutput`` (a dict subclass). Both train
bit-identically with and without the agent, and their figures stream.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import icsmon_agent
from helpers import wait_watching
from icsmon.store import Store
from icsmon.subscriber import Subscriber
from icsmon_agent.protocol import Sample

pytestmark = pytest.mark.slow  # real processes: `make check` leaves it out

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (the test extra brings it)"
)


def bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, type_vocab_size=2,
    )  # fmt: skip
    return transformers.BertForMaskedLM(config)


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(config)


def train(
    make: Callable[[], nn.Module], steps: int, runtime_dir: Path | None
) -> tuple[list[float], int, list[str]]:
    torch.manual_seed(0)
    model = make()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    mon = icsmon_agent.watch(model, every=1, endpoint="tcp", runtime_dir=runtime_dir) if runtime_dir else None
    store, samples, losses = Store(), 0, []
    sub = Subscriber(mon.endpoint or "") if mon is not None else None
    try:
        if mon is not None and sub is not None:
            sub.__enter__()
            assert wait_watching(mon, sub)
        for _ in range(steps):
            ids = torch.randint(0, 64, (4, 16), generator=gen)
            out = model(input_ids=ids, labels=ids)  # a ModelOutput: loss, logits, ...
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            losses.append(float(out.loss.detach()))
            if sub is not None:
                samples += sum(1 for m in sub.poll(0) if store.add(m) and isinstance(m, Sample))
        if mon is not None and sub is not None:
            mon.close()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and samples + mon.skipped + mon.dropped < steps:
                samples += sum(1 for m in sub.poll(0.05) if store.add(m) and isinstance(m, Sample))
            assert mon.errors == 0
            assert samples + mon.skipped + mon.dropped >= steps and samples > 0
            copy.deepcopy(model)  # a watched Hugging Face model copies (EMA, best-checkpoint copies)
            return losses, samples, mon.layer_names
    finally:
        if sub is not None:
            sub.__exit__(None, None, None)
    return losses, 0, []


@pytest.mark.parametrize("make", [bert, gpt2], ids=["BERT", "GPT-2"])
def test_hugging_face_models_train_bit_identically_and_stream(
    make: Callable[[], nn.Module], runtime_dir: Path
) -> None:
    bare, _, _ = train(make, 6, None)
    watched, samples, layers = train(make, 6, runtime_dir)
    assert watched == bare
    assert samples > 0 and layers
    if make is bert:
        assert "bert.embeddings.token_type_embeddings" in layers
