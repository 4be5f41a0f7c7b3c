"""The layer table: one row per layer, sparklines drawn as text, cells updated in place.

Textual's ``Sparkline`` widget costs a widget per row (200 of them redraw at ~5 fps) and raises on
NaN, so the std history is a string of block glyphs in a cell of one ``DataTable``. Rows and
columns have stable keys (layer index, figure name): a redraw only calls ``update_cell`` for the
cells whose text changed in the rows on screen, so the cost follows the window, not the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rich.text import Text
from textual.widgets import DataTable

from icsmon.store import RunState
from icsmon.tui import view
from icsmon_agent.protocol import STAT_INDEX

BADGE_STYLE = {
    "ok": "green",
    "warning": "bold yellow",
    "critical": "bold red",
    "nonfinite": "bold white on red",
    "none": "dim",
}


NUMERIC = frozenset({"mean", "std", "dead", "sat", "shift", "grad"})


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    width: int


def columns_for(width: int) -> list[Column]:
    """The columns that fit a terminal ``width`` wide: 80 columns get the essentials, wide ones all."""
    spark = 24 if width >= 160 else 16 if width >= 120 else 10
    name = 28 if width >= 160 else 22 if width >= 120 else 16
    cols = [Column("name", "layer", name)]
    if width >= 120:
        cols += [Column("type", "type", 10)]
    if width >= 160:
        cols += [Column("shape", "shape", 12)]
    cols += [
        Column("spark", "std history", spark),
        Column("mean", "mean", 9),
        Column("std", "std", 9),
        Column("dead", "dead", 4),
    ]
    if width >= 120:
        cols += [Column("sat", "sat", 4)]
    cols += [Column("shift", "shift", 9)]
    if width >= 100:
        cols += [Column("grad", "grad", 9)]
    cols += [Column("status", "status", 11)]
    return cols


class LayerTable(DataTable[Text | str]):
    """Layers in the chosen order; call :meth:`show` on every redraw tick."""

    DEFAULT_CSS = """
    LayerTable { height: 1fr; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self._columns: list[Column] = []
        self._order: list[int] = []
        self._schema_id = ""
        self._cells: dict[tuple[int, str], str] = {}

    @property
    def shown(self) -> list[int]:
        """Layer indices in table order."""
        return list(self._order)

    @property
    def current_layer(self) -> int | None:
        if not self._order or not 0 <= self.cursor_row < len(self._order):
            return None
        return self._order[self.cursor_row]

    def select_layer(self, layer: int) -> bool:
        if layer not in self._order:
            return False
        self.move_cursor(row=self._order.index(layer), animate=False)
        return True

    def _rebuild(self, run: RunState, cols: list[Column], order: list[int]) -> None:
        current = self.current_layer
        self.clear(columns=cols != self._columns)
        if cols != self._columns:
            for col in cols:
                self.add_column(col.label, width=col.width, key=col.key)
            self._columns = cols
        self._cells.clear()
        blank = ["" for _ in cols]
        for i in order:
            self.add_row(*blank, key=str(i))
        self._order = order
        if current is not None:
            self.select_layer(current)

    def show(self, run: RunState, badges: list[view.Badge], order: list[int], width: int) -> None:
        cols = columns_for(width)
        schema_id = run.schema.schema_id if run.schema else ""
        if cols != self._columns or order != self._order or schema_id != self._schema_id:
            self._schema_id = schema_id
            self._rebuild(run, cols, order)
        if not order:
            return
        # Only the rows in view (plus a margin for scrolling) are recomputed and touched.
        top = max(int(self.scroll_offset.y) - 5, 0)
        rows = order[top : top + self.size.height + 10]
        self._fill(run, badges, rows, cols)

    def _fill(self, run: RunState, badges: list[view.Badge], rows: list[int], cols: list[Column]) -> None:
        latest = run.latest()
        if latest is None or run.schema is None:
            return
        idx = np.asarray(rows, dtype=np.int64)
        keys = {c.key for c in cols}
        spark_w = next((c.width for c in cols if c.key == "spark"), 0)
        sparks = view.sparklines(run.series("std", n=spark_w)[:, idx], spark_w) if spark_w else []
        layers = run.schema.layers
        for pos, i in enumerate(rows):
            fig = latest[i]
            badge = badges[i]
            values: dict[str, str] = {
                "name": view.shorten(layers[i].name, next(c.width for c in cols if c.key == "name")),
                "spark": sparks[pos] if sparks else "",
                "mean": view.num(fig[STAT_INDEX["mean"]]),
                "std": view.num(fig[STAT_INDEX["std"]]),
                "dead": view.pct(float(fig[STAT_INDEX["dead_frac"]])),
                "shift": view.num(fig[STAT_INDEX["shift"]]),
                "status": f"{badge.level}:{badge.text}",
            }
            if "type" in keys:
                values["type"] = layers[i].type
            if "shape" in keys:
                values["shape"] = view.shape_text(layers[i].shape)
            if "sat" in keys:
                values["sat"] = view.pct(float(fig[STAT_INDEX["sat_frac"]]))
            if "grad" in keys:
                values["grad"] = view.num(fig[STAT_INDEX["grad_norm"]])
            for key, text in values.items():
                if self._cells.get((i, key)) == text:
                    continue
                self._cells[(i, key)] = text
                self.update_cell(str(i), key, self._styled(key, text, badge))

    @staticmethod
    def _styled(key: str, text: str, badge: view.Badge) -> Text | str:
        if key == "status":
            return Text(badge.text, style=BADGE_STYLE.get(badge.level, ""))
        if key == "spark":
            return Text(text, style="cyan")
        if key in NUMERIC:
            return Text(text, justify="right")
        return text
