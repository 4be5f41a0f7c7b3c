"""What the alert rules read and return: a run's recent figures (:class:`Window`) and what a rule
found in them (:class:`Finding`), with the column helpers the rules share."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ..protocol import STAT_INDEX
from .model import Severity

FloatArray = npt.NDArray[np.float64]

#: Layer kinds whose output is an activation: their `shift` mirrors their input's, and a ReLU output's
#: shift is dominated by units flipping between dead (variance 0) and alive, so `shift` is judged on
#: the other layers (the project's first notes measure it on z = W h + b).
ACTIVATION_KINDS = frozenset({"relu", "tanh", "sigmoid"})


@dataclass(frozen=True)
class Window:
    """A run's recent figures: ``figures[t, layer, stat]`` oldest to newest; the last row is now."""

    names: tuple[str, ...]
    kinds: tuple[str, ...]
    figures: FloatArray  # (n, n_layers, n_stats), float64, NaN where absent
    step: int
    # The run's own early scale: each figure's median over its first samples ((n_layers, n_stats)),
    # a reference that does not collapse when the loss does (None: not known).
    early: FloatArray | None = None
    types: tuple[str, ...] = ()  # module type of each layer, for the alert's line
    losses: FloatArray | None = None  # a longer history of the run's loss, newest last
    output_width: int = 0  # the last layer's output width: a classifier's classes, an LM's vocabulary
    early_loss: float | None = None  # where the run's loss began (engine.EARLY_LOSSES; None: not known)
    scalars: Mapping[str, float | None] = field(default_factory=dict)  # the newest sample's

    def now(self, stat: str) -> FloatArray:
        out: FloatArray = self.figures[-1, :, STAT_INDEX[stat]]
        return out

    def past(self, stat: str, n: int) -> FloatArray:
        """The ``n`` samples before now (fewer if the history is shorter): shape (m, n_layers)."""
        lo = max(0, self.figures.shape[0] - 1 - n)
        out: FloatArray = self.figures[lo:-1, :, STAT_INDEX[stat]]
        return out


@dataclass(frozen=True)
class Finding:
    """What a rule found in one sample."""

    severity: Severity
    layers: tuple[int, ...]  # every layer where the condition holds, in depth order
    figure: str  # the figure of the layer named in the alert
    value: float
    detail: str = ""  # e.g. "10.2x its median"
    first: int = 0  # the layer named in the alert: the first in depth order unless a rule prefers one


@dataclass(frozen=True)
class _Hit:
    layer: int
    severity: Severity
    figure: str
    value: float
    detail: str = ""


def _finding(hits: list[_Hit], prefer: str = "") -> Finding | None:
    """One finding from per-layer hits; it names the first layer (the first hit on ``prefer`` if any)."""
    if not hits:
        return None
    hits.sort(key=lambda h: (h.layer, h.severity != "critical"))
    preferred = [h for h in hits if h.figure == prefer]
    first = preferred[0] if preferred else hits[0]
    severity: Severity = "critical" if any(h.severity == "critical" for h in hits) else "warning"
    layers = tuple(dict.fromkeys(h.layer for h in hits))
    return Finding(severity, layers, first.figure, first.value, first.detail, first.layer)


def _finite(x: float) -> bool:
    return math.isfinite(x)


def _kind_is(w: Window, kinds: frozenset[str] | str) -> npt.NDArray[np.bool_]:
    """Which layers are of these kinds, as a mask (the rules run on every layer at once)."""
    wanted = frozenset([kinds]) if isinstance(kinds, str) else kinds
    return np.fromiter((k in wanted for k in w.kinds), dtype=bool, count=len(w.kinds))


def _above(values: FloatArray, warning: float, critical: float) -> list[tuple[int, Severity, float]]:
    """The layers whose finite value is at least ``warning``: (layer, severity, value)."""
    with np.errstate(invalid="ignore"):
        hit = np.flatnonzero(np.isfinite(values) & (values >= warning))
    return [
        (i, "critical" if v >= critical else "warning", v)
        for i, v in zip(hit.tolist(), values[hit].tolist(), strict=True)
    ]


def _column_reduce(a: FloatArray, reduce: Callable[..., Any]) -> FloatArray:
    """Column-wise ``reduce`` over finite values; NaN for a column with none (without a warning)."""
    out = np.full(a.shape[1] if a.ndim == 2 else 0, np.nan)
    if a.size == 0:
        return out
    a = np.where(np.isfinite(a), a, np.nan)
    ok = np.isfinite(a).any(axis=0)
    if ok.any():
        out[ok] = reduce(a[:, ok], axis=0)
    return out


def _nanmedian(a: FloatArray) -> FloatArray:
    return _column_reduce(a, np.nanmedian)


def _nanmax(a: FloatArray) -> FloatArray:
    return _column_reduce(a, np.nanmax)
