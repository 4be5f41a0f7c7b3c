"""What the screens show, computed from the store with numpy: no widgets here, so it is cheap to test.

Everything is vectorised over layers because a model can have thousands of them and the table
redraws several times a second.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from icsmon.render import fmt
from icsmon.store import RunState
from icsmon_agent.alerts.model import Alert
from icsmon_agent.protocol import STAT_INDEX

BLOCKS = "▁▂▃▄▅▆▇█"
GAP = " "  # no sample that far back yet
BAD = "!"  # a NaN/Inf sample: its own glyph, never a bar (and never passed to a chart that raises)

#: The least range a sparkline's height stands for, in decades of std (half a decade: about 3x). A
#: change of a few percent draws flat, a doubling as 60% of the height; a layer that moves by
#: orders of magnitude fills it.
MIN_SPAN_DECADES = 0.5

SEVERITY_RANK = {"critical": 2, "warning": 1}
SORTS = ("depth", "severity", "name")


def log_std(values: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    """log10 of a std series; NaN where the value is missing, non-finite or not positive."""
    v = values.astype(np.float64)
    with np.errstate(all="ignore"):
        out = np.log10(np.where(np.isfinite(v) & (v > 0), v, np.nan))
    # A std of exactly 0 is a fully vanished layer: draw it at the bottom, not as a gap.
    out[np.isfinite(v) & (v == 0)] = -np.inf
    return out


def sparklines(series: npt.NDArray[np.float32], width: int) -> list[str]:
    """One block-glyph sparkline per layer of ``series`` (shape samples x layers), in log scale.

    Each line is scaled to its own range over the window, but never to less than
    ``MIN_SPAN_DECADES``: a LayerNorm output moving from 1.01 to 1.03 stays flat, so the rows that
    really move stand out. A flat line sits at the bottom.
    """
    n_layers = series.shape[1] if series.ndim == 2 else 0
    if n_layers == 0:
        return []
    window = series[-width:]
    raw = window.astype(np.float64)
    logs = log_std(window)
    finite = np.isfinite(logs)
    lo = np.where(finite, logs, np.inf).min(axis=0)
    hi = np.where(finite, logs, -np.inf).max(axis=0)
    span = np.where(hi > lo, np.maximum(hi - lo, MIN_SPAN_DECADES), 1.0)
    with np.errstate(all="ignore"):
        level = np.where(finite, (logs - lo) / span * (len(BLOCKS) - 1), 0.0)
    level = np.clip(np.nan_to_num(level), 0, len(BLOCKS) - 1).astype(np.int64)
    glyphs = np.array(list(BLOCKS))[level]
    # std is over all elements, so a NaN std means NaN activations, not a missing figure.
    glyphs[~np.isfinite(raw)] = BAD
    pad = width - window.shape[0]
    lines = ["".join(col) for col in glyphs.T]
    return [GAP * pad + line for line in lines] if pad > 0 else lines


@dataclass
class Badge:
    text: str
    level: str  # ok | warning | critical | nonfinite | none


def badges(run: RunState, alerts: list[Alert]) -> list[Badge]:
    """The status of every layer: NaN/Inf first (its own badge), then the worst alert, else ok."""
    n = len(run.layer_names)
    out = [Badge("ok", "ok") for _ in range(n)]
    latest = run.latest()
    if latest is None:
        return [Badge("·", "none") for _ in range(n)]
    index = {name: i for i, name in enumerate(run.layer_names)}
    by_layer: dict[int, Alert] = {}
    for alert in alerts:
        # One alert can cover a run of layers (vanishing from layer 12 down): badge each of them.
        covered = [index[n] for n in getattr(alert, "layers", ()) if n in index] or [alert.layer_index]
        for i in covered:
            cur = by_layer.get(i)
            if cur is None or SEVERITY_RANK[alert.severity] > SEVERITY_RANK[cur.severity]:
                by_layer[i] = alert
    for i, alert in by_layer.items():
        if 0 <= i < n:
            out[i] = Badge(alert.rule.replace("_", " "), alert.severity)
    nonfinite = latest[:, STAT_INDEX["nonfinite"]]
    std = latest[:, STAT_INDEX["std"]]
    bad = (np.nan_to_num(nonfinite) > 0) | np.isinf(std)
    for j in np.flatnonzero(bad).tolist():
        out[j] = Badge("NaN/Inf", "nonfinite")
    return out


def severity_order(badge_list: list[Badge]) -> list[int]:
    """Layer indices, worst first, depth order within a level."""
    rank = {"nonfinite": 0, "critical": 1, "warning": 2, "ok": 3, "none": 4}
    return sorted(range(len(badge_list)), key=lambda i: (rank[badge_list[i].level], i))


def natural(name: str) -> list[tuple[int, int | str]]:
    """A sort key that reads numbers as numbers: blocks.2 before blocks.11 (as ``ls -v`` does)."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part]


def order(run: RunState, sort: str, badge_list: list[Badge], needle: str = "") -> list[int]:
    """Which layers the table shows, in which order: filtered by a substring, sorted by ``sort``."""
    names = run.layer_names
    keep = list(range(len(names)))
    if needle:
        low = needle.lower()
        types = [layer.type.lower() for layer in run.schema.layers] if run.schema else []
        keep = [i for i in keep if low in names[i].lower() or (i < len(types) and low in types[i])]
    if sort == "severity":
        pos = {i: p for p, i in enumerate(severity_order(badge_list))}
        keep.sort(key=lambda i: pos.get(i, i))
    elif sort == "name":
        keep.sort(key=lambda i: natural(names[i]))
    return keep


def pct(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    return f"{value * 100:.0f}%"


def num(value: float) -> str:
    return fmt(float(value), 3)


def shape_text(shape: tuple[int, ...]) -> str:
    return "×".join(str(d) for d in shape) if shape else "-"


def shorten(name: str, width: int) -> str:
    """Keep the end of a long qualified name: its last parts say which layer it is."""
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def steps_rate(run: RunState) -> str:
    rate = run.steps_per_second()
    if rate is None:
        return "-"
    return f"{rate:.1f}" if rate < 100 else f"{rate:.0f}"
