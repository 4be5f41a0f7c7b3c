"""Every key and what it does, from the bindings themselves so the help never drifts from them."""

from __future__ import annotations

from typing import ClassVar

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

INTRO = (
    "icsmon shows every layer's activation figures live. The status column names an alert "
    "(vanishing, exploding, saturation, dead relu, shift) or NaN/Inf; the sparkline is the layer's "
    "std over recent samples (log scale, each row its own range of at least half a decade)."
)


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,question_mark,q", "dismiss", "Close", tooltip="Close the help")
    ]

    def __init__(self, bindings: list[tuple[str, str]]) -> None:
        super().__init__()
        self.keys = bindings

    def compose(self) -> ComposeResult:
        table = Table(box=None, show_header=False, padding=(0, 2))
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        for key, description in self.keys:
            table.add_row(key, description)
        with VerticalScroll(id="help-box"):
            yield Static(INTRO, id="help-intro")
            yield Static(table)
            yield Static("Escape closes this help.", classes="dim")


def describe(bindings: list[BindingType]) -> list[tuple[str, str]]:
    out = []
    for b in bindings:
        if not isinstance(b, Binding) or b.key == "ctrl+c":  # a terminal's habit, not a key to learn
            continue
        key = b.key_display or b.key.split(",")[0]
        key = {"slash": "/", "question_mark": "?", "enter": "Enter", "escape": "Escape"}.get(key, key)
        out.append((key, b.tooltip or b.description))
    return out
