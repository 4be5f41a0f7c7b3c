"""Small character plots for the layer detail screen, drawn as Rich text (no chart widget).

A chart widget per figure would mean one more widget to lay out and a NaN that raises; a grid of
glyphs is cheap, cannot raise on a NaN (non-finite samples get their own mark) and prints the same
in an SVG snapshot as in a terminal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from rich.text import Text

from icsmon.render import fmt

GUTTER = 10  # y-axis labels: 8 characters of number, a space and the axis
BAD_MARK = "!"


@dataclass
class Series:
    label: str
    values: npt.NDArray[np.floating]
    glyph: str
    style: str


def columns_of(n: int, width: int) -> npt.NDArray[np.int64]:
    """Which sample each plot column shows: the newest ``width`` samples, or all spread out."""
    if n <= width:
        return np.arange(n, dtype=np.int64)
    return np.linspace(0, n - 1, width).round().astype(np.int64)


def plot(
    series: list[Series],
    width: int,
    height: int,
    *,
    band: tuple[npt.NDArray[np.floating], npt.NDArray[np.floating]] | None = None,
    band_style: str = "blue",
    log: bool = False,
    ylim: tuple[float, float] | None = None,
) -> Text:
    """Plot ``series`` (oldest to newest) into ``width`` x ``height`` cells, y labels on the left."""
    width = max(width - GUTTER, 4)
    height = max(height, 2)
    n = max((len(s.values) for s in series), default=0)
    cols = columns_of(n, width)

    def tr(v: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
        a = v.astype(np.float64)
        if not log:
            return a
        with np.errstate(all="ignore"):
            return np.log10(np.where(np.isfinite(a) & (a > 0), a, np.nan))

    raws = [s.values.astype(np.float64)[cols[cols < len(s.values)]] for s in series]
    data = [tr(r) for r in raws]
    bands = None
    if band is not None and len(band[0]) == n:
        bands = (tr(band[0].astype(np.float64)[cols]), tr(band[1].astype(np.float64)[cols]))
    pool = [d[np.isfinite(d)] for d in data]
    if bands is not None:
        pool += [b[np.isfinite(b)] for b in bands]
    finite = np.concatenate(pool) if pool else np.zeros(0)
    grid = [[(" ", "")] * width for _ in range(height)]
    if finite.size or ylim is not None:
        lo, hi = ylim if ylim is not None else (float(finite.min()), float(finite.max()))
        if hi - lo <= 1e-9 * max(abs(hi), abs(lo)) or hi == lo:
            # A flat line: give it a band around itself, relative to its size (a vanished layer's
            # figures are ~1e-15, so an absolute pad would squash them onto one row).
            pad = 0.5 if log or hi == 0 else abs(hi) * 0.5
            lo, hi = lo - pad, hi + pad

        def row_of(v: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
            with np.errstate(all="ignore"):
                r = (hi - v) / (hi - lo) * (height - 1)
            return np.clip(np.nan_to_num(r), 0, height - 1).round().astype(np.int64)

        if bands is not None:
            top, bot = row_of(bands[1]), row_of(bands[0])
            ok = np.isfinite(bands[0]) & np.isfinite(bands[1])
            for col in np.flatnonzero(ok).tolist():
                for y in range(int(top[col]), int(bot[col]) + 1):
                    grid[y][col] = ("░", band_style)
        for s, d, raw in zip(series, data, raws, strict=True):
            rows = row_of(d)
            for x in range(min(len(d), width)):
                if np.isfinite(d[x]):
                    grid[int(rows[x])][x] = (s.glyph, s.style)
                elif np.isinf(raw[x]):  # NaN is "does not apply"; Inf is a blow-up worth a mark
                    grid[0][x] = (BAD_MARK, "bold red")
        labels = {0: hi, height - 1: lo}
        if height >= 5:
            labels[(height - 1) // 2] = (hi + lo) / 2
    else:
        if log:
            return Text(
                "nothing to plot on a log scale: every value is 0, missing or not finite", style="dim"
            )
        return Text("no finite value yet (or the figure does not apply to this layer)", style="dim")
    text = Text(no_wrap=True, overflow="crop")
    for y, row in enumerate(grid):
        if y in labels:
            v = labels[y]
            text.append(f"{fmt(10**v if log else v, 2):>{GUTTER - 2}} ┤", style="dim")
        else:
            text.append(" " * (GUTTER - 1) + "│", style="dim")
        for glyph, style in row:
            text.append(glyph, style=style or None)
        text.append("\n")
    legend = Text("  ".join(f"{s.glyph} {s.label} {_last(s.values)}" for s in series), style="dim")
    text.append(" " * GUTTER)
    text.append_text(legend)
    return text


def _last(values: npt.NDArray[np.floating]) -> str:
    if not len(values):
        return "-"
    v = float(values[-1])
    return "NaN" if math.isnan(v) else fmt(v)
