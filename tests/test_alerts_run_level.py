"""The rules that look at the run, not a layer's jump: the loss's level and trend, a heavy-tailed
loss, gradients clipped away, and what a layer is compared with; and the hints and rows that come
from what the job is. Synthetic figures, as in ``test_alerts_rules.py``; the same cases on real
networks are in ``test_alerts_modern.py``."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from icsmon_agent.alerts import rules
from icsmon_agent.alerts.hints import hint
from icsmon_agent.layers import candidate_modules
from icsmon_agent.protocol import STAT_INDEX
from icsmon_agent.sample import layer_parameters
from test_alerts_rules import EngineBench, T, healthy_row, series, set_, window


def with_losses(w: rules.Window, losses: list[float], **kw: object) -> rules.Window:
    return dataclasses.replace(w, losses=np.asarray(losses, dtype=np.float64), **kw)  # type: ignore[arg-type]


def test_a_loss_far_above_chance_from_the_start_is_named_and_a_summed_loss_is_not() -> None:
    """A 64-way output at chance has loss ln 64 = 4.16: a run whose loss sits at 13 began sick (its
    weights drawn too large), though nothing in it jumps. A loss summed over a batch starts far
    beyond any chance level and is left to the trend; an output that is no Linear head (a
    generator's image, a hidden state) has no chance level."""
    head = ("linear", "relu") * 3 + ("relu", "linear")
    w = window(series(12), head)
    sick = rules.loss_level(with_losses(w, [13.0] * 12, output_width=64, early_loss=13.5), T)
    assert sick is not None and sick.figure == "loss" and "x chance, ln 64" in sick.detail
    assert sick.severity == "critical"  # > 3x chance
    healthy = rules.loss_level(with_losses(w, [4.0] * 12, output_width=64, early_loss=4.2), T)
    assert healthy is None
    summed = rules.loss_level(with_losses(w, [900.0] * 12, output_width=64, early_loss=1000.0), T)
    assert summed is None
    assert rules.loss_level(with_losses(w, [13.0] * 12, output_width=4, early_loss=13.5), T) is None
    no_head = window(series(12))  # its last layer is a ReLU
    assert rules.loss_level(with_losses(no_head, [13.0] * 12, output_width=64, early_loss=13.5), T) is None


def test_a_loss_that_rose_far_above_its_start_stays_flagged_until_it_comes_back() -> None:
    feed = EngineBench()
    out = [feed.push(loss=2.3) for _ in range(8)]  # where the run began
    for k in range(12):  # a slow divergence: no layer jumps, the loss climbs to 10x
        out.append(feed.push(loss=2.3 * 1.25**k))
    fired = [o for o in out if any(c.startswith("+loss") for c in o)]
    assert fired, out
    assert any(a.rule == "loss" and a.layer == "" for a in feed.engine.active)
    # Stuck high: it stays active however long the plateau lasts.
    assert all(not any(c == "-loss" for c in feed.push(loss=15.0)) for _ in range(40))
    # Back down: it clears.
    cleared = [feed.push(loss=1.0) for _ in range(20)]
    assert any("-loss" in c for c in cleared)


def test_one_hard_batch_late_in_training_is_no_spike_but_a_run_of_them_is() -> None:
    """Near zero the loss is heavy-tailed: one batch at 0.45 among 0.003-0.05 is ordinary. The
    alert waits for it to hold, and names no layer (the loss belongs to none)."""
    feed = EngineBench()
    rng = np.random.default_rng(5)
    for _ in range(60):
        assert feed.push(loss=float(rng.uniform(0.003, 0.05))) == []
    assert feed.push(loss=0.45) == []
    assert all(feed.push(loss=float(rng.uniform(0.003, 0.05))) == [] for _ in range(5))
    out = [feed.push(loss=0.5 + 0.1 * k) for k in range(4)]
    assert ["+spike:warning"] in out, out
    (alert,) = [a for a in feed.engine.active if a.rule == "spike"]
    assert alert.layer == "" and alert.layers == () and alert.layer_index == -1
    assert "at step" in alert.message and "fc.0" not in alert.message


def test_gradients_clipped_to_zero_are_named_though_weight_decay_moves_the_weights() -> None:
    figs = series(6)
    set_(figs, "update_ratio", slice(None), 1e-4)  # AdamW's decay: every weight still moves
    w = window(figs)
    first_grad = float(figs[-1, 0, STAT_INDEX["grad_norm"]])
    clipped = rules.vanishing(dataclasses.replace(w, scalars={"grad_norm_applied": 0.0}), T)
    assert clipped is not None and clipped.figure == "grad_norm_applied" and clipped.first == 0
    assert "clipped to 0" in hint("vanishing", w, "", clipped.figure)
    kept = {"grad_norm_applied": first_grad * 0.5}  # clipped to half: a clip, not a wall
    assert rules.vanishing(dataclasses.replace(w, scalars=kept), T) is None


def test_a_layer_is_compared_with_its_own_input_path_not_across_a_norm_layer() -> None:
    """Pre-norm: a residual stream grown to std 300 feeds the final norm; the head after it reads
    std 0.3, 1e-3 of the stream. That is the norm's work, not a collapse. Without the norm it is."""
    kinds = ("linear", "linear", "norm", "linear")
    figs = series(6)[:, : len(kinds)].copy()
    for i, s in enumerate((1.0, 300.0, 1.0, 0.25)):
        set_(figs, "std", i, s, slice(None))
    assert rules.vanishing(window(figs, kinds), T) is None
    found = rules.vanishing(window(figs, ("linear", "linear", "linear", "linear")), T)
    assert found is not None and found.first == 3


def test_no_vanishing_is_read_into_an_explosion() -> None:
    kinds = ("linear", "linear", "linear", "linear")
    figs = series(12)[:, :4].copy()
    set_(figs, "std", slice(None), 1.0, slice(None))
    set_(figs, "std", 2, 5e4)  # one layer's output blows up: 5e4x its median
    set_(figs, "std", 3, 1.0)
    w = window(figs, kinds)
    assert rules.exploding(w, T) is not None and rules.vanishing(w, T) is None


def test_hints_follow_what_the_job_is() -> None:
    figs = series(12)
    w = window(figs)
    assert "input batch" in hint("nonfinite", w, "default", "nonfinite", first=0)
    assert hint("nonfinite", w, "default", "nonfinite", first=3) == "default"
    recurrent = dataclasses.replace(window(figs, ("other", "linear") * 4), types=("LSTM", "Linear") * 4)
    text = hint("exploding", recurrent, "")
    assert "recurrent" in text and "orthogonal" in text and "BatchNorm" not in text
    assert "1-layer" not in text


def test_rows_are_the_signal_and_every_parameter_has_a_row() -> None:
    """A dropout of p=0 is no step (its output is its input); a block's own parameter (ConvNeXt's
    layer-scale gamma, fused expert weights) counts in the last layer below it."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.drop = nn.Dropout(0.0)
            self.gamma = nn.Parameter(torch.ones(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.gamma * self.drop(self.fc(x))

    model = nn.Sequential(Block(), nn.Dropout(0.1), nn.Linear(4, 2))
    names = [n for n, _ in candidate_modules(model)]
    assert names == ["0.fc", "1", "2"]

    @dataclasses.dataclass
    class Row:
        module: nn.Module
        call: int = 0

    rows = [Row(model[0].fc), Row(model[1]), Row(model[2])]
    owned = layer_parameters(model, rows)  # type: ignore[arg-type]
    assert any(p is model[0].gamma and i == 0 for i, p in owned)
    assert len({id(p) for _, p in owned}) == len(list(model.parameters()))


def test_a_healthy_row_series_with_a_steady_loss_trips_no_run_rule() -> None:
    feed = EngineBench()
    rng = np.random.default_rng(6)
    for _ in range(200):
        assert feed.push(healthy_row(rng), loss=float(2.0 + 0.05 * rng.standard_normal())) == []


def test_a_router_without_gradient_is_no_vanishing_but_another_layer_is() -> None:
    """Under top-1 routing a mixture-of-experts router gets no gradient, by design."""
    figs = series(6)
    set_(figs, "grad_norm", 2, 1e-11)
    types = tuple("Linear" if k == "linear" else "ReLU" for k in window(figs).kinds)
    plain = dataclasses.replace(window(figs), types=types)
    found = rules.vanishing(plain, T)
    assert found is not None and found.first == 2 and found.figure == "grad_norm"
    assert "gradient fades" in hint("vanishing", plain, "", found.figure)
    router = dataclasses.replace(plain, types=(*types[:2], "MixtralTopKRouter", *types[3:]))
    assert rules.vanishing(router, T) is None
    gate = dataclasses.replace(plain, names=(*plain.names[:2], "layers.0.mlp.gate", *plain.names[3:]))
    assert rules.vanishing(gate, T) is None


def test_a_parameter_of_a_module_that_is_no_layer_counts_in_its_block() -> None:
    """T5's relative position bias is a table, not a layer: its weight still has a row."""

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(4, 4)
            self.relative_attention_bias = nn.Embedding(8, 2)
            self.scales = nn.ParameterList([nn.Parameter(torch.ones(4))])

    model = nn.Sequential(Attention(), nn.Linear(4, 2))
    assert [n for n, _ in candidate_modules(model)] == ["0.q", "1"]

    @dataclasses.dataclass
    class Row:
        module: nn.Module
        call: int = 0

    owned = layer_parameters(model, [Row(model[0].q), Row(model[1])])  # type: ignore[arg-type]
    assert len({id(p) for _, p in owned}) == len(list(model.parameters()))
    assert any(p is model[0].relative_attention_bias.weight and i == 0 for i, p in owned)
