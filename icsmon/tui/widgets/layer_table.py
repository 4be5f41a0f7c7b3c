"""The layer table: one row per layer, sparklines drawn as text, rows updated in place by layer.

Why not ``DataTable``: it renders every cell through Rich (padding, wrapping) and any
``update_cell`` invalidates its whole line cache, so with 1,000 layers at 200×60 a redraw took
~0.3 s (measured) and the screen fell behind. Why not Textual's ``Sparkline``: one widget per row
(200 of them redraw at ~5 fps) and it raises on NaN. So this is one line-API widget: each redraw
formats only the rows in view into plain (text, style) cells keyed by layer index and column key;
``render_line`` joins the cached cells of the row asked for. The cost follows the window, not the
model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding, BindingType
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from icsmon.store import RunState
from icsmon.tui import view
from icsmon.tui.safe import clean
from icsmon_agent.protocol import STAT_INDEX

BADGE_STYLE = {
    "ok": Style(color="green"),
    "warning": Style(color="yellow", bold=True),
    "critical": Style(color="red", bold=True),
    "nonfinite": Style(color="white", bgcolor="red", bold=True),
    "none": Style(dim=True),
}
SPARK_STYLE = Style(color="cyan")
NUMERIC = frozenset({"mean", "std", "dead", "sat", "shift", "grad"})


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    width: int


def columns_for(width: int, *, sharded: bool = False) -> list[Column]:
    """The columns that fit a terminal ``width`` wide: 80 columns get the essentials, wide ones all.
    A sharded job's (FSDP2) gradient norms are of this rank's shard, and the header says so."""
    spark = 24 if width >= 160 else 16 if width >= 120 else 10
    name = 28 if width >= 160 else 22 if width >= 120 else 16
    cols = [Column("name", "layer", name)]
    # The type always: a Sequential's layers are called 0, 1, 2, which say nothing alone.
    cols += [Column("type", "type", 10 if width >= 120 else 8)]
    if width >= 160:
        cols += [Column("shape", "shape", 12)]
    cols += [Column("spark", "std trend", spark)]
    if width >= 100:
        cols += [Column("mean", "mean", 9)]
    cols += [Column("std", "std", 9), Column("dead", "dead", 4)]
    if width >= 120:
        cols += [Column("sat", "sat", 4)]
    cols += [Column("shift", "shift", 9)]
    if width >= 100:
        cols += [Column("grad", "grad/shd" if sharded else "grad", 9)]
    cols += [Column("status", "status", 11)]
    return cols


Cell = tuple[str, Style | None]


class LayerTable(ScrollView, can_focus=True):
    """Layers in the chosen order; call :meth:`show` on every redraw tick."""

    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "layer-table--header",
        "layer-table--cursor",
        "layer-table--even",
    }
    DEFAULT_CSS = """
    LayerTable { height: 1fr; }
    LayerTable > .layer-table--header { text-style: bold; background: $panel; }
    LayerTable > .layer-table--cursor { background: $block-cursor-background; color: $block-cursor-foreground; }
    LayerTable:blur > .layer-table--cursor { background: $block-cursor-blurred-background; }
    LayerTable > .layer-table--even { background: $surface-lighten-1 20%; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up,k", "cursor(-1)", "Up", show=False),
        Binding("down,j", "cursor(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "edge(0)", "First", show=False),
        Binding("end", "edge(1)", "Last", show=False),
    ]

    cursor_row: reactive[int] = reactive(0)

    class Selected(Message):
        """Enter (or a click on the selected row) on a layer."""

        def __init__(self, layer: int) -> None:
            super().__init__()
            self.layer = layer

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._columns: list[Column] = []
        self._order: list[int] = []
        self._schema_id = ""
        self._cells: dict[int, list[Cell]] = {}

    # ------------------------------------------------------------------ queries (tests, screens)

    @property
    def shown(self) -> list[int]:
        """Layer indices in table order."""
        return list(self._order)

    @property
    def row_count(self) -> int:
        return len(self._order)

    @property
    def columns(self) -> list[Column]:
        return list(self._columns)

    def cell_text(self, layer: int, key: str) -> str:
        """What the table shows for ``layer`` in column ``key`` ('' until the row was drawn)."""
        keys = [c.key for c in self._columns]
        row = self._cells.get(layer)
        if row is None or key not in keys:
            return ""
        return row[keys.index(key)][0]

    @property
    def current_layer(self) -> int | None:
        if not self._order or not 0 <= self.cursor_row < len(self._order):
            return None
        return self._order[self.cursor_row]

    def select_layer(self, layer: int) -> bool:
        if layer not in self._order:
            return False
        self.cursor_row = self._order.index(layer)
        return True

    # ------------------------------------------------------------------ updates

    def show(self, run: RunState, badges: list[view.Badge], order: list[int], width: int) -> None:
        cols = columns_for(width, sharded=run.schema is not None and run.schema.sharded)
        schema_id = run.schema.schema_id if run.schema else ""
        if cols != self._columns or order != self._order or schema_id != self._schema_id:
            current = self.current_layer
            self._columns, self._order, self._schema_id = cols, list(order), schema_id
            self._cells.clear()
            self.virtual_size = Size(sum(c.width + 1 for c in cols), len(order) + 1)
            if current is not None and current in order:
                self.cursor_row = order.index(current)
            else:
                self.cursor_row = min(self.cursor_row, max(len(order) - 1, 0))
        if order:
            # Only the rows in view (and a screen's worth around them, for scrolling) are formatted.
            height = self.size.height or 100  # not laid out yet: the first screenful
            top = max(int(self.scroll_offset.y) - height, 0)
            self._fill(run, badges, order[top : top + 3 * height + 1], cols)
        self.refresh()

    def _fill(self, run: RunState, badges: list[view.Badge], rows: list[int], cols: list[Column]) -> None:
        latest = run.latest()
        if latest is None or run.schema is None:
            return
        keys = {c.key for c in cols}
        widths = {c.key: c.width for c in cols}
        spark_w = widths.get("spark", 0)
        idx = np.asarray(rows, dtype=np.int64)
        sparks = view.sparklines(run.series("std", n=spark_w)[:, idx], spark_w) if spark_w else []
        layers = run.schema.layers
        for pos, i in enumerate(rows):
            fig = latest[i]
            badge = badges[i]
            values: dict[str, Cell] = {
                "name": (view.shorten(clean(layers[i].name), widths["name"]), None),
                "spark": (sparks[pos] if sparks else "", SPARK_STYLE),
                "mean": (view.num(fig[STAT_INDEX["mean"]]), None),
                "std": (view.num(fig[STAT_INDEX["std"]]), None),
                "dead": (view.pct(float(fig[STAT_INDEX["dead_frac"]])), None),
                "shift": (view.num(fig[STAT_INDEX["shift"]]), None),
                "status": (badge.text, BADGE_STYLE.get(badge.level)),
            }
            if "type" in keys:
                values["type"] = (clean(layers[i].type), None)
            if "shape" in keys:
                values["shape"] = (view.shape_text(layers[i].shape), None)
            if "sat" in keys:
                values["sat"] = (view.pct(float(fig[STAT_INDEX["sat_frac"]])), None)
            if "grad" in keys:
                values["grad"] = (view.num(fig[STAT_INDEX["grad_norm"]]), None)
            self._cells[i] = [values[c.key] for c in cols]

    # ------------------------------------------------------------------ drawing

    def _line(self, cells: list[Cell], base: Style) -> list[Segment]:
        segs = [Segment(" ", base)]
        for col, (text, style) in zip(self._columns, cells, strict=True):
            text = text[: col.width]
            text = text.rjust(col.width) if col.key in NUMERIC else text.ljust(col.width)
            segs.append(Segment(text + " ", base + style if style is not None else base))
        return segs

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        scroll_x, scroll_y = self.scroll_offset
        base = self.rich_style
        if y == 0:  # the header stays put while the rows scroll under it
            header = self.get_component_rich_style("layer-table--header")
            cells: list[Cell] = [(c.label, None) for c in self._columns]
            segs = self._line(cells, base + header)
        else:
            row = scroll_y + y - 1
            if row >= len(self._order):
                return Strip.blank(width, base)
            layer = self._order[row]
            style = base
            if row % 2:
                style = style + self.get_component_rich_style("layer-table--even")
            if row == self.cursor_row:
                style = style + self.get_component_rich_style("layer-table--cursor")
            row_cells = self._cells.get(layer) or [("", None)] * len(self._columns)
            segs = self._line(row_cells, style)
        strip = Strip(segs).crop(scroll_x, scroll_x + width)
        return strip.extend_cell_length(width, style=base)

    # ------------------------------------------------------------------ cursor and keys

    def watch_cursor_row(self, old: int, new: int) -> None:
        # Keep the cursor row in view (row r is drawn at y = r + 1 - scroll_y; the header is y 0).
        view_rows = max(self.size.height - 1, 1)
        if new < self.scroll_offset.y:
            self.scroll_to(y=new, animate=False)
        elif new >= self.scroll_offset.y + view_rows:
            self.scroll_to(y=new - view_rows + 1, animate=False)
        self.refresh()

    def validate_cursor_row(self, row: int) -> int:
        return max(0, min(row, len(self._order) - 1)) if self._order else 0

    def action_cursor(self, delta: int) -> None:
        self.cursor_row += delta

    def action_page(self, direction: int) -> None:
        self.cursor_row += direction * max(self.size.height - 2, 1)

    def action_edge(self, end: int) -> None:
        self.cursor_row = len(self._order) - 1 if end else 0

    def key_enter(self) -> None:
        layer = self.current_layer
        if layer is not None:
            self.post_message(self.Selected(layer))

    def on_click(self, event: events.Click) -> None:
        row = int(self.scroll_offset.y) + event.y - 1
        if event.y == 0 or not 0 <= row < len(self._order):
            return
        if row == self.cursor_row:
            self.key_enter()
        self.cursor_row = row
