"""The whole network at a glance: depth (down) × time (right) of log10(std)."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import Footer, Static

from icsmon.render import fmt
from icsmon.tui.screens.laid_out import RunScreen
from icsmon.tui.widgets.header import RunHeader
from icsmon.tui.widgets.heatmap import PALETTE, Heatmap


class HeatmapScreen(RunScreen):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,h", "app.pop_screen", "Back", tooltip="Back to the layer table")
    ]

    def compose(self) -> ComposeResult:
        yield RunHeader(id="header")
        yield Static(id="heatmap-title")
        yield Heatmap(id="heatmap")
        yield Static(id="heatmap-legend")
        yield Footer()

    @property
    def heatmap(self) -> Heatmap:
        return self.query_one(Heatmap)

    def redraw(self, force: bool = False) -> None:
        run = self.current(force)
        if run is None:
            return
        self.heatmap.show(run)
        steps = run.step_series(self.heatmap.samples)
        self.query_one("#heatmap-title", Static).update(
            Text.assemble(
                (" log10(std) by depth ", "bold"),
                (f"— {self.heatmap.n_layers} layers top to bottom, ", "dim"),
                (
                    f"steps {int(steps[0]) if len(steps) else '-'} → {int(steps[-1]) if len(steps) else '-'} left to right",
                    "dim",
                ),
            )
        )
        self.query_one("#heatmap-legend", Static).update(self._legend())

    def _legend(self) -> Text:
        rng = self.heatmap.range
        text = Text(" ")
        if rng is None:
            return text
        lo, hi = rng
        text.append(f"std {fmt(10**lo)} ", style="dim")
        if self.app.no_color:
            text.append(" ░▒▓█")
        else:
            for color in PALETTE:
                text.append(" ", style=f"on {color.name}")
        text.append(f" {fmt(10**hi)}", style="dim")
        text.append("   ! NaN/Inf", style="bold")
        return text
