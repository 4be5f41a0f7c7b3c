"""The run-level rules: the loss, judged as a whole run's figure (an alert on it names no layer)."""

from __future__ import annotations

import math

import numpy as np

from .config import Thresholds
from .model import Severity
from .window import Finding, FloatArray, Window, _finite

#: Figures of the whole run, not of a layer: an alert on one names no layer.
RUN_FIGURES = frozenset({"loss"})


def _spiking(history: FloatArray | None, t: Thresholds) -> tuple[float, float] | None:
    """(now, limit) when the newest value is above its recent median + ``spike_sigma`` robust
    deviations (1.4826 x the median absolute deviation) and ``spike_ratio`` times that median.

    Why robust and relative: late in training and when fine-tuning the loss is heavy-tailed (most
    batches near 0, a hard one now and then); a mean and standard deviation taken over those put
    one ordinary hard batch six sigmas out (OLMo's mean + 6σ test fired on healthy ResNets).
    """
    if history is None or history.size < t.spike_min_history + 1:
        return None
    now = float(history[-1])
    past = history[-1 - t.spike_window : -1]
    past = past[np.isfinite(past)]
    if not _finite(now) or past.size < t.spike_min_history:
        return None
    level = float(np.median(past))
    spread = 1.4826 * float(np.median(np.abs(past - level)))
    limit = max(level + t.spike_sigma * spread, t.spike_ratio * level)
    return (now, limit) if now > limit and spread > 0 else None


def spike(w: Window, t: Thresholds) -> Finding | None:
    """The loss far above its own recent distribution, sample after sample (the engine waits for
    it to hold: one hard batch is no instability). A run-level figure: the alert names no layer."""
    # The same test on the total gradient norm fired on healthy runs (its tail is heavy: the healthy
    # suite of tests/test_alerts_modern.py trips mean+6σ on ordinary hard batches): not judged yet.
    found = _spiking(w.losses, t)
    if found is None:
        return None
    now, limit = found
    return Finding(
        "warning", (0,), "loss", now, f"above its recent median + {t.spike_sigma:g} deviations = {limit:.3g}"
    )


def finite_tail(losses: FloatArray | None, n: int, skip: int = 0) -> FloatArray:
    """The finite values among the last ``n`` losses (before the last ``skip``)."""
    if losses is None:
        return np.zeros(0)
    recent = losses[: len(losses) - skip][-n:]
    out: FloatArray = recent[np.isfinite(recent)]
    return out


def loss_level(w: Window, t: Thresholds) -> Finding | None:
    """The loss's level (the median of its last samples) far above chance, or far above where the
    run began: a start that is sick already, a slow divergence, a run stuck high after a blow-up.
    It holds as long as the loss stays there, so the alert stays active until the run recovers.

    Chance is ln of the output layer's width, for a Linear head 10 wide or more (a classifier's
    classes, a language model's vocabulary), and only for a loss that began within 10x of it (a
    summed, not averaged, loss starts far beyond and is left to the rise test).
    """
    recent = finite_tail(w.losses, t.loss_window)
    if recent.size < t.loss_window:
        return None
    level = float(np.median(recent))
    start = w.early_loss
    if w.output_width >= t.loss_chance_classes and w.kinds and w.kinds[-1] == "linear":
        chance = math.log(w.output_width)
        if level > t.loss_chance * chance and (start is None or start < 10 * chance):
            severity: Severity = "critical" if level > 2 * t.loss_chance * chance else "warning"
            detail = f"{level / chance:.3g}x chance, ln {w.output_width} = {chance:.3g}"
            return Finding(severity, (0,), "loss", level, detail)
    if start is not None and start > 0 and level > t.loss_rise * start:
        severity = "critical" if level > 10 * t.loss_rise * start else "warning"
        return Finding(severity, (0,), "loss", level, f"{level / start:.3g}x its start {start:.3g}")
    return None


#: name -> (rule, fires at once?, hint). Order: how alerts are listed when several fire together.
