"""Independent float64 reference implementation of the figures (README's table, docs/design.md), for the tests.

Written from the definitions, not from the agent's code: numpy, float64, one layer at a time.
"""

from __future__ import annotations

import math

import numpy as np

SAT = {"tanh": lambda y: np.abs(y) > 0.99, "sigmoid": lambda y: (y < 0.01) | (y > 0.99)}


def unit_axis(ndim: int, conv_like: bool) -> int | None:
    if ndim <= 1:
        return None
    return 1 if conv_like else ndim - 1


def per_unit(y: np.ndarray, conv_like: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, var, max) per unit, float64."""
    axis = unit_axis(y.ndim, conv_like)
    flat = y.reshape(1, -1) if axis is None else np.moveaxis(y, axis, 0).reshape(y.shape[axis], -1)
    return flat.mean(axis=1), flat.var(axis=1), flat.max(axis=1)


def figures(y_in: np.ndarray, kind: str, conv_like: bool, prev: tuple[np.ndarray, np.ndarray] | None) -> dict:
    y = np.asarray(y_in, dtype=np.float64)
    fin = np.isfinite(y)
    out: dict[str, float | None] = {
        "mean": float(y.mean()),
        "std": float(y.std()),
        "min": float(y[fin].min()) if fin.any() else None,
        "max": float(y[fin].max()) if fin.any() else None,
        "zero_frac": float((y == 0).mean()),
        "nonfinite": float((~fin).sum()),
    }
    mu, var, umax = per_unit(y, conv_like)
    out["dead_frac"] = float((~(umax > 0)).mean())
    out["update_ratio"] = None  # a figure of the weights, not of the output: see update_ratio()
    out["peak_ratio"] = None  # derived at the hand-off: see published()
    out["sat_frac"] = float(SAT[kind](y).mean()) if kind in SAT else None
    if prev is None:
        out["shift"] = None
    else:
        m1, v1 = prev
        # unit variances floored at 1% of the layer's total variance (the larger moment's)
        total1, total = (
            v1.mean() + ((m1 - m1.mean()) ** 2).mean(),
            var.mean() + ((mu - mu.mean()) ** 2).mean(),
        )
        floor = 0.01 * max(total1, total) + 1e-12
        v1e, v2e = np.maximum(v1, floor), np.maximum(var, floor)
        kl = 0.5 * (np.log(v2e / v1e) + (v1e + (m1 - mu) ** 2) / v2e - 1.0)
        out["shift"] = float(kl.mean())
    return out


SKETCH = 64  # as icsmon_agent.updates.SKETCH: the elements of each parameter the agent reads


def update_ratio(before: list[np.ndarray], after: list[np.ndarray], steps: int) -> float | None:
    """‖Δw‖ / ‖w‖ per step over each parameter's sketch (evenly spaced elements), float64."""
    if not before or steps <= 0:
        return None
    moved = size = 0.0
    for b, a in zip(before, after, strict=True):
        flat_b, flat_a = np.asarray(b, np.float64).reshape(-1), np.asarray(a, np.float64).reshape(-1)
        n = flat_b.size
        k = min(n, SKETCH)
        idx = np.arange(k) * (n - 1) // (k - 1) if k > 1 else np.zeros(k, dtype=np.int64)
        moved += float(((flat_a[idx] - flat_b[idx]) ** 2).sum())
        size += float((flat_b[idx] ** 2).sum())
    return math.sqrt(moved) / math.sqrt(size) / steps if size > 0 else None


def grad_norm(grads: list[np.ndarray]) -> float | None:
    if not grads:
        return None
    return math.sqrt(sum(float((np.asarray(g, dtype=np.float64) ** 2).sum()) for g in grads))


def close(got: float | None, want: float | None, rel: float = 1e-3, abs_: float = 1e-6) -> bool:
    if want is None or (isinstance(want, float) and not math.isfinite(want)):
        return got is None or not math.isfinite(got)
    if got is None:
        return False
    return abs(got - want) <= max(rel * abs(want), abs_)


def published(want: dict, kind: str) -> dict:
    """What the agent sends of ``figures``: ``dead_frac`` only for ReLU-family layers whose output is
    all finite (units never positive mean dead ReLU units there, and nothing elsewhere), and
    ``peak_ratio``, max |y| over the std, derived from the others."""
    if kind != "relu" or want["nonfinite"]:
        want = dict(want, dead_frac=None)
    lo, hi, std = want["min"], want["max"], want["std"]
    if lo is not None and hi is not None and std is not None and math.isfinite(std) and std > 0:
        want = dict(want, peak_ratio=max(abs(lo), abs(hi)) / std)
    return want
