"""A scrolling table of text cells under two sticky header lines (column groups, then columns).

Line API, like the layer table: only the rows in view are turned into segments, so a thousand
layers times several runs cost what the window shows.
"""

from __future__ import annotations

from rich.segment import Segment
from rich.style import Style
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip

from icsmon.tui.compare import Table

HEADER_LINES = 2


class GroupedTable(ScrollView, can_focus=True):
    DEFAULT_CSS = """
    GroupedTable { height: 1fr; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.table: Table | None = None
        self._styles: dict[str, Style] = {}

    def show(self, table: Table) -> None:
        self.table = table
        width = sum(c.width + 1 for c in table.columns) + 1
        self.virtual_size = Size(width, len(table.rows) + HEADER_LINES)
        self.refresh()

    def _style(self, name: str) -> Style:
        style = self._styles.get(name)
        if style is None:
            style = self._styles[name] = Style.parse(name) if name else Style()
        return style

    def _segments(self, cells: list[tuple[str, str]], base: Style) -> list[Segment]:
        assert self.table is not None
        segs = [Segment(" ", base)]
        for column, (text, style) in zip(self.table.columns, cells, strict=False):
            text = text[: column.width]
            text = text.rjust(column.width) if column.numeric else text.ljust(column.width)
            segs.append(Segment(text + " ", base + self._style(style)))
        return segs

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        scroll_x, scroll_y = self.scroll_offset
        base = self.rich_style
        table = self.table
        if table is None:
            return Strip.blank(width, base)
        if y == 0:
            segs = [Segment(" ", base)]
            at = 0
            for text, span in table.groups:
                cols = table.columns[at : at + span]
                at += span
                room = sum(c.width + 1 for c in cols)
                label = f"─ {text} " if text else ""
                segs.append(
                    Segment((label + "─" * room)[:room] if text else " " * room, base + Style(bold=True))
                )
        elif y == 1:
            segs = self._segments(
                [(c.label, "") for c in table.columns], base + Style(bold=True, underline=True)
            )
        else:
            row = scroll_y + y - HEADER_LINES
            if row >= len(table.rows):
                return Strip.blank(width, base)
            style = base + Style(dim=False) if row % 2 == 0 else base + Style(bgcolor="grey11")
            segs = self._segments(table.rows[row], style)
        return Strip(segs).crop(scroll_x, scroll_x + width).extend_cell_length(width, style=base)
