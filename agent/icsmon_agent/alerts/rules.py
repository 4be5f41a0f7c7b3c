"""The alert rules: pure functions of a run's recent figures. No state, no I/O, no Textual.

Each rule looks at a :class:`Window` (the last few samples of every layer, newest last) and returns
a :class:`Finding` (which layers, how bad, the figure and value that tripped it) or None. The
:class:`~icsmon.alerts.engine.AlertEngine` adds persistence and hysteresis on top.

A rule names the *first* layer in depth order where its condition holds and counts the others: a
failure that starts at one layer spreads to every layer after it, and one line saying where it
starts is worth more than forty saying the same thing.

Causes before consequences: a ReLU layer that is dead switches off the signal downstream and the
gradient upstream, so ``vanishing`` does not also fire for what a dead layer explains; and a ReLU
layer whose input has already vanished is ``vanishing``, not ``dead_relu``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from ..protocol import STAT_INDEX
from .config import Thresholds
from .loss_rules import RUN_FIGURES, finite_tail, loss_level, spike
from .window import (
    ACTIVATION_KINDS,
    Finding,
    FloatArray,
    Window,
    _above,
    _finding,
    _finite,
    _Hit,
    _kind_is,
    _nanmax,
    _nanmedian,
)

__all__ = ["RULES", "RUN_FIGURES", "Finding", "FloatArray", "Window", "finite_tail", "loss_level", "spike"]


# ------------------------------------------------------------------------------------------ rules


def nonfinite(w: Window, t: Thresholds) -> Finding | None:
    """Any NaN/Inf in a layer's output (or a non-finite std), named at the first layer in depth order."""
    count, std = w.now("nonfinite"), w.now("std")
    with np.errstate(invalid="ignore"):
        counted = count > 0
    hits = [
        _Hit(i, "critical", "nonfinite", float(count[i]))
        if counted[i]
        else _Hit(i, "critical", "std", float(std[i]))
        for i in np.flatnonzero(counted | np.isinf(std)).tolist()
    ]
    return _finding(hits)


def dead_layers(w: Window, t: Thresholds) -> list[_Hit]:
    dead, std = w.now("dead_frac"), w.now("std")
    with np.errstate(invalid="ignore"):
        # The input of a ReLU is (almost always) the layer just before it. Vanished input: not dead.
        input_alive = np.concatenate(([True], std[:-1] >= t.vanish_std))
        found = _kind_is(w, "relu") & (dead >= t.dead_frac) & input_alive
    return [
        _Hit(i, "critical" if d >= t.dead_frac_critical else "warning", "dead_frac", d)
        for i, d in zip(np.flatnonzero(found).tolist(), dead[found].tolist(), strict=True)
    ]


def dead_relu(w: Window, t: Thresholds) -> Finding | None:
    """ReLU units never positive over the batch while the layer's input is alive.

    About half of every healthy ReLU output is 0 (``zero_frac`` ~0.5), and a deep He-init net has up
    to ~45% of units silent for a whole batch at init; only a larger fraction is reported.
    """
    return _finding(dead_layers(w, t))


def vanishing(w: Window, t: Thresholds) -> Finding | None:
    """Activation std collapsing toward 0 (absolutely, with depth, or against its own recent peak),
    a parameter-gradient norm vanishing, no weight moving at all (every layer's update ratio 0: a
    learning rate of 0), or the gradients clipped to 0 before the optimizer."""
    std, grad = w.now("std"), w.now("grad_norm")
    lo, hi = w.now("min"), w.now("max")
    dead = [h for h in dead_layers(w, t) if h.severity == "critical"]
    first_dead = dead[0].layer if dead else None
    peak = _nanmax(w.past("std", t.window))
    hits: list[_Hit] = []
    # A layer's reference: the largest std on its input path, the layers since the last norm layer
    # (which starts a new scale; comparing across it, with un-normalised residual streams and
    # sibling branches, named a healthy head "vanishing" after every explosion), or its own peak.
    # Exactly constant (std 0, min = max) is by design, as a zero-init residual BatchNorm (gamma
    # 0) or a constant embedding, not a collapse; a collapse passes through tiny stds first.
    judged = np.isfinite(std) & ~((std == 0) & (lo == hi))
    reference = np.maximum(
        _path_max_before(std, judged & _kind_is(w, "norm"), judged), np.where(np.isfinite(peak), peak, 0.0)
    )
    if first_dead is not None:
        judged[first_dead:] = False  # a dead layer explains what follows it
    with np.errstate(invalid="ignore", divide="ignore"):
        critical = judged & (std < t.vanish_std_critical)
        warning = judged & ~critical & (std < t.vanish_std)
        # (A norm layer's output std is its learned gain: small by choice, not collapse.)
        below = judged & ~critical & ~warning & (reference > 0) & (std < t.vanish_ratio * reference)
        below &= ~_kind_is(w, "norm")
        # A dead layer anywhere blocks the gradient of every layer before it: dead_relu says so.
        faint = (
            (np.isfinite(grad) & (grad < t.vanish_grad)) if first_dead is None else np.zeros(len(std), bool)
        )
    for i in np.flatnonzero(critical | warning).tolist():
        hits.append(_Hit(i, "critical" if critical[i] else "warning", "std", float(std[i])))
    ratio_hits = [
        _Hit(i, "warning", "std", float(std[i]), f"{reference[i] / max(float(std[i]), 1e-300):.2g}x below")
        for i in np.flatnonzero(below).tolist()
    ]
    # A top-1 router gets no gradient by design (its one weight renormalises to 1).
    hits += [
        _Hit(i, "warning", "grad_norm", float(grad[i]))
        for i in np.flatnonzero(faint).tolist()
        if not is_router(w, i)
    ]
    # No weight moved at all (every layer's update ratio exactly 0): the optimizer applied nothing.
    # (Not while a gradient is non-finite: a loss scaler skips those steps on purpose.)
    update = w.now("update_ratio")
    has = np.isfinite(update)
    if has.any() and not update[has].any() and not np.isinf(grad).any() and not np.isnan(grad[has]).any():
        hits.append(_Hit(int(np.argmax(has)), "warning", "update_ratio", 0.0, "no weight moved"))
    clipped = _clipped_away(w, t, grad)
    if clipped is not None:
        hits.append(clipped)
    # A layer far below the ones before it is a collapse, unless the others exploded: then it is
    # the explosion's doing, and exploding says so.
    if ratio_hits and exploding(w, t) is None:
        hits += ratio_hits
    # Name where the activations collapse when they do: gradients vanish upstream of it as a result.
    return _finding(hits, prefer="std")


def _path_max_before(
    std: FloatArray, starts: npt.NDArray[np.bool_], judged: npt.NDArray[np.bool_]
) -> FloatArray:
    """Each layer's largest judged std among the layers before it back to the last norm layer
    (that one's included: it sets the new scale); 0 with none."""
    values = np.where(judged, std, 0.0)
    running = np.empty_like(values)
    bounds = [0, *np.flatnonzero(starts).tolist(), len(values)]
    for a, b in itertools.pairwise(bounds):
        if b > a:
            running[a:b] = np.maximum.accumulate(values[a:b])
    return np.concatenate(([0.0], running))[: len(values)]


def is_router(w: Window, i: int) -> bool:
    """A mixture-of-experts router (Mixtral's ``gate``, a ``*Router``): its gradient is the
    routing's, zero by design under top-1 routing."""
    kind = w.types[i] if i < len(w.types) else ""
    return "Router" in kind or w.names[i].rsplit(".", 1)[-1] in ("gate", "router")


def _clipped_away(w: Window, t: Thresholds, grad: FloatArray) -> _Hit | None:
    """The optimizer was given (next to) no gradient while the backward made one: clipped to 0
    (``clip_grad_norm_`` with ``max_norm`` 0). Weight decay still moves every weight, so the update
    ratio alone cannot tell. The agent reads the first layer's gradient norm again at
    ``optimizer.step()`` (``grad_norm_applied``); clipping scales every gradient alike, so one
    layer tells."""
    applied = w.scalars.get("grad_norm_applied")
    present = np.flatnonzero(~np.isnan(grad))  # the agent's first layer with a gradient
    if applied is None or not _finite(applied) or not present.size:
        return None
    first = int(present[0])
    backward = float(grad[first])
    if not _finite(backward) or backward <= t.vanish_grad or applied > t.clipped_ratio * backward:
        return None
    return _Hit(first, "warning", "grad_norm_applied", applied, "clipped to 0 before the optimizer")


def _jump(w: Window, t: Thresholds, stat: str) -> list[_Hit]:
    """A figure far above its level: the larger of its recent median and the run's early scale.

    Why the early scale: late in a healthy run most batches are fit and the gradient norm's recent
    median falls orders of magnitude below its start; an ordinary hard batch then reads as a huge
    jump against that median while it stays below where the run began. A real divergence leaves
    the start behind too.
    """
    now = w.now(stat)
    # A gradient jump must hold two samples in a row: one hard batch spikes a healthy run's gradient
    # for a step, a divergence keeps climbing. The level is taken from before both.
    confirm = 2 if stat == "grad_norm" else 1
    level = _nanmedian(
        w.figures[max(0, w.figures.shape[0] - confirm - t.window) : -confirm, :, STAT_INDEX[stat]]
    )
    before = w.figures[-confirm:-1, :, STAT_INDEX[stat]]  # the earlier samples of the confirmation
    if w.early is not None:
        early = w.early[:, STAT_INDEX[stat]]
        level = np.where(np.isfinite(early) & (early > level), early, level)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = now / level
        found = np.isfinite(now) & np.isfinite(level) & (level > 0) & (now >= t.explode_jump_floor)
        found &= ratio >= t.explode_jump
        if before.size:
            found &= (before >= t.explode_jump * level).all(axis=0)
    return [
        _Hit(i, "critical" if r >= t.explode_jump_critical else "warning", stat, v, f"{r:.3g}x its median")
        for i, v, r in zip(
            np.flatnonzero(found).tolist(), now[found].tolist(), ratio[found].tolist(), strict=True
        )
    ]


def exploding(w: Window, t: Thresholds) -> Finding | None:
    """Activation std above a level, or std / gradient norm jumping across a few samples.

    The jump half is what catches a diverging run while its loss is still finite: each step
    multiplies the scale, so the last finite samples are orders of magnitude above their median.
    """
    above = _above(w.now("std"), t.explode_std, t.explode_std_critical)
    hits = [_Hit(i, severity, "std", v) for i, severity, v in above]
    hits += _jump(w, t, "std")
    hits += _jump(w, t, "grad_norm")
    return _finding(hits)


def saturation(w: Window, t: Thresholds) -> Finding | None:
    """tanh/sigmoid outputs pinned near their limits (``sat_frac``; absent for other layers)."""
    above = _above(w.now("sat_frac"), t.saturation, t.saturation_critical)
    return _finding([_Hit(i, severity, "sat_frac", v) for i, severity, v in above])


def shift(w: Window, t: Thresholds) -> Finding | None:
    """The seed's KL shift far above the layer's own running level: internal layers only (not
    activation layers, whose shift mirrors their input, nor the output, which is not an input)."""
    now = w.now("shift")
    hist = w.past("shift", t.shift_window)
    enough = np.isfinite(hist).sum(axis=0) >= t.shift_min_history if hist.size else None
    if enough is None or not enough.any():
        return None
    level = _nanmedian(hist)
    judged = enough & ~_kind_is(w, ACTIVATION_KINDS)
    judged[-1] = False  # the output (logits): it is meant to move as the model learns
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = now / np.maximum(level, 1e-12)
        found = (
            judged & np.isfinite(now) & np.isfinite(level) & (now >= t.shift_min) & (ratio >= t.shift_factor)
        )
    hits = [
        _Hit(i, "critical" if r >= 10 * t.shift_factor else "warning", "shift", v, f"{r:.3g}x its median")
        for i, v, r in zip(
            np.flatnonzero(found).tolist(), now[found].tolist(), ratio[found].tolist(), strict=True
        )
    ]
    return _finding(hits)


Rule = Callable[[Window, Thresholds], "Finding | None"]

RULES: dict[str, tuple[Rule, bool, str]] = {
    "nonfinite": (
        nonfinite,
        True,
        "NaN/Inf starts at this layer: usually the end of an explosion (lower the learning rate, cap "
        "the warm-up, clip gradients), else a log, sqrt or division of 0 in it",
    ),
    "exploding": (
        exploding,
        True,
        "lower the learning rate (without normalisation a 50-layer net wants ~1e-4, not 1e-2), cap the "
        "warm-up, clip gradients; check the init scale (He N(0, 2/fan_in)); normalise before the nonlinearity",
    ),
    "vanishing": (
        vanishing,
        False,
        "weights too small for the depth: use He init N(0, 2/fan_in) for ReLU (Xavier for tanh), or "
        "normalise before each nonlinearity (Linear -> BatchNorm/LayerNorm -> activation)",
    ),
    "dead_relu": (
        dead_relu,
        False,
        "these units' pre-activations are <= 0 for every input, so they get no gradient and never "
        "recover: look for large negative biases, lower the learning rate, normalise before the ReLU, "
        "or use LeakyReLU",
    ),
    "saturation": (
        saturation,
        False,
        "pre-activations too large: smaller init (Xavier N(0, 1/fan_in) for tanh/sigmoid), normalise "
        "before the nonlinearity, or lower the learning rate",
    ),
    "loss": (
        loss_level,
        False,
        "the loss sits far above where it should: if it began there, the init or the inputs are off "
        "(an output layer's logits far too large, unnormalised inputs); if it rose or blew up, lower "
        "the learning rate and lengthen the warm-up, clip gradients",
    ),
    "spike": (
        spike,
        False,
        "the loss stays far above its own recent level: an instability starting (lower the learning "
        "rate, clip gradients) or a run of bad batches (look at the data loader's shards)",
    ),
    "shift": (
        shift,
        False,  # a warning waits for confirmation: one odd batch moves a layer without harm
        "this layer's input distribution jumped (upstream layers moved fast): lower the learning "
        "rate, or normalise its input (BatchNorm for CNNs, LayerNorm for transformers, pre-norm "
        "residuals for very deep stacks)",
    ),
}
