"""Depth × time of log10(std): vanishing and exploding show as colour running down the network.

Drawn with the line API: each terminal row is two depth bins (upper half-block in the foreground
colour, lower in the background), built once per redraw into cached strips; Textual asks only for
the lines it paints. Under NO_COLOR each row is one bin shaded with ``░▒▓█`` so the picture survives.
"""

from __future__ import annotations

import functools

import numpy as np
import numpy.typing as npt
from rich.color import Color
from rich.segment import Segment
from rich.style import Style
from textual.strip import Strip
from textual.widget import Widget

from icsmon.store import RunState
from icsmon.tui import view

GUTTER = 7
# A perceptually ordered ramp (dark blue → teal → yellow): low std dark, high std bright.
RAMP = [
    (13, 8, 135),
    (84, 2, 163),
    (139, 10, 165),
    (185, 50, 137),
    (219, 92, 104),
    (244, 136, 73),
    (254, 188, 43),
    (240, 249, 33),
]
LEVELS = 24
SHADES = " ░▒▓█"
BAD = Style(color="white", bgcolor="magenta")


def _palette() -> list[Color]:
    ramp = np.array(RAMP, dtype=np.float64)
    xs = np.linspace(0, len(RAMP) - 1, LEVELS)
    out = []
    for x in xs:
        i = min(int(x), len(RAMP) - 2)
        f = x - i
        rgb = ramp[i] * (1 - f) + ramp[i + 1] * f
        out.append(Color.from_rgb(*(float(c) for c in rgb)))
    return out


PALETTE = _palette()


def bin_depth(logs: npt.NDArray[np.float64], cells: int) -> npt.NDArray[np.float64]:
    """Resample (time x layers) to (time x cells) along depth; bins average, small nets repeat."""
    n = logs.shape[1]
    if n == 0 or cells <= 0:
        return np.full((logs.shape[0], max(cells, 0)), np.nan)
    if n <= cells:
        return logs[:, (np.arange(cells) * n // cells)]
    edges = np.arange(cells) * n // cells
    vals = np.where(np.isfinite(logs), logs, 0.0)
    counts = np.add.reduceat(np.isfinite(logs).astype(np.float64), edges, axis=1)
    sums = np.add.reduceat(vals, edges, axis=1)
    with np.errstate(all="ignore"):
        return np.where(counts > 0, sums / counts, np.nan)


_DIM = Style(dim=True)
_PLAIN = Style()
_BOLD = Style(bold=True)  # every segment carries a style: Textual's NO_COLOR filter reads style.color
_SPAN = LEVELS + 2  # cell levels run from -2 (NaN/Inf) through -1 (no data) to LEVELS - 1


@functools.cache
def _cell(code: int) -> Segment:
    u, d = divmod(code, _SPAN)
    u, d = u - 2, d - 2
    if u == -2 or d == -2:
        return Segment("!", BAD)
    return Segment("▀", Style(color=PALETTE[u] if u >= 0 else None, bgcolor=PALETTE[d] if d >= 0 else None))


@functools.cache
def _mono_cell(code: int) -> Segment:
    u = code // _SPAN - 2
    if u == -2:
        return Segment("!", _BOLD)
    if u < 0:
        return Segment("·", _PLAIN)
    return Segment(SHADES[min(u * len(SHADES) // LEVELS, len(SHADES) - 1)], _PLAIN)


class Heatmap(Widget):
    """Call :meth:`show` with the run on each redraw tick."""

    DEFAULT_CSS = """
    Heatmap { height: 1fr; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._strips: list[Strip] = []
        self.range: tuple[float, float] | None = None
        self.n_layers = 0
        self.samples = 0

    def show(self, run: RunState) -> None:
        width, height = self.size.width, self.size.height
        plot_w = max(width - GUTTER, 1)
        mono = self.app.no_color
        cells = height if mono else height * 2
        std = run.series("std", n=plot_w)
        self.n_layers, self.samples = std.shape[1] if std.ndim == 2 else 0, std.shape[0]
        raw = std.astype(np.float64)
        logs = view.log_std(std)
        bad = ~np.isfinite(raw)
        finite = logs[np.isfinite(logs)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        self.range = (lo, hi)
        grid = bin_depth(np.where(np.isneginf(logs), lo, logs), cells)  # std 0: the darkest colour
        bad_grid = bin_depth(bad.astype(np.float64), cells) > 0
        with np.errstate(all="ignore"):
            scaled = np.clip(np.nan_to_num((grid - lo) / (hi - lo) * (LEVELS - 1), nan=-1), -1, LEVELS - 1)
        level = scaled.astype(np.int64)
        level[bad_grid] = -2
        pad = plot_w - level.shape[0]
        self._strips = [
            self._row(level, r, pad, plot_w, mono, cells, run_layers=self.n_layers) for r in range(height)
        ]
        self.refresh()

    def _row(
        self,
        level: npt.NDArray[np.int64],
        r: int,
        pad: int,
        plot_w: int,
        mono: bool,
        cells: int,
        run_layers: int,
    ) -> Strip:
        first_cell = r if mono else 2 * r
        label = ""
        if run_layers and (r % 4 == 0):
            label = str(first_cell * run_layers // max(cells, 1))
        segs = [Segment(f"{label:>{GUTTER - 2}} ", _DIM), Segment("│", _DIM)]
        if pad > 0:
            segs.append(Segment(" " * pad, _PLAIN))
        if first_cell >= level.shape[1]:
            return Strip(segs)
        upper = level[:, first_cell]
        lower = level[:, first_cell + 1] if not mono and first_cell + 1 < level.shape[1] else upper
        # One cached Segment per (upper, lower) pair: a 200×60 frame is ~12,000 cells, and building a
        # Segment and a Style for each took most of a redraw.
        codes = (upper + 2) * _SPAN + (lower + 2)
        cell = _mono_cell if mono else _cell
        segs.extend(cell(c) for c in codes.tolist())
        return Strip(segs)

    def render_line(self, y: int) -> Strip:
        if y < len(self._strips):
            return self._strips[y]
        return Strip.blank(self.size.width, _PLAIN)
