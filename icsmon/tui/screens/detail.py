"""One layer over time: mean with a ±std band, min/max, fractions, shift, grad norm, its alerts."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import numpy.typing as npt
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Static

from icsmon.feed import Feed
from icsmon.render import fmt
from icsmon.store import RunState
from icsmon.tui import view
from icsmon.tui.plot import Series, plot
from icsmon.tui.safe import clean
from icsmon.tui.state import ViewState
from icsmon.tui.widgets.alerts import change_line
from icsmon.tui.widgets.header import RunHeader, header_text
from icsmon_agent.protocol import STAT_INDEX

PANELS = ("mean", "range", "fractions", "shift", "grad")
TITLES = {
    "mean": "mean ± std",
    "range": "min / max",
    "fractions": "zero / dead / sat fraction",
    "shift": "shift (KL between samples, log scale)",
    "grad": "gradient norm, update/weight ratio (log scale)",
}


class PlotBox(Static):
    """A plot's box: says when its size changed, so the plot is drawn again at its new width."""

    class Resized(Message):
        pass

    def on_resize(self) -> None:
        self.post_message(self.Resized())


class DetailScreen(Screen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back", tooltip="Back to the layer table"),
        Binding("left,k", "step(-1)", "Prev layer", key_display="←", tooltip="The layer above"),
        Binding("right,j", "step(1)", "Next layer", key_display="→", tooltip="The layer below"),
    ]

    def __init__(self, feed: Feed, state: ViewState, layer: int) -> None:
        super().__init__()
        self.feed = feed
        self.state = state
        self.layer_index = layer

    def compose(self) -> ComposeResult:
        yield RunHeader(id="header")
        yield Static(id="layer-title")
        with VerticalScroll(id="detail-body"), Grid(id="plots"):
            for key in PANELS:
                yield PlotBox(id=f"plot-{key}", classes="plot")
            yield Static(id="layer-alerts", classes="plot")
        yield Footer()

    def on_mount(self) -> None:
        self.redraw(force=True)

    def on_plot_box_resized(self) -> None:
        # A plot is drawn at its box's width: once the layout settles (a scrollbar that came and
        # went), the last width wins, not whichever the last tick saw.
        self.redraw(force=True)

    def on_resize(self) -> None:
        self.redraw(force=True)

    def action_step(self, delta: int) -> None:
        run = self.state.current(self.feed)
        if run is None:
            return
        self.layer_index = max(0, min(len(run.layer_names) - 1, self.layer_index + delta))
        self.redraw(force=True)

    def redraw(self, force: bool = False) -> None:
        if not self.is_mounted:
            return  # a key (→, j) can arrive between the push and the first compose
        run = self.state.current(self.feed)
        paused = getattr(self.app, "view_state", None)
        is_paused = bool(paused and paused.paused)
        self.query_one(RunHeader).update(header_text(self.feed, run, paused=is_paused, label=self.app.title))
        if (is_paused and not force) or run is None or run.schema is None:
            return
        if not 0 <= self.layer_index < len(run.layer_names):
            return
        self._title(run)
        grid = self.query_one("#plots", Grid)
        wide = self.size.width >= 120
        grid.styles.grid_size_columns = 2 if wide else 1
        # The box's own content width once laid out; before that, what the grid will give it.
        guess = (self.size.width - 1) // 2 - 4 if wide else self.size.width - 6
        plot_h = max(5, (self.size.height - 8) // 3 - 3) if wide else 7
        for key in PANELS:
            box = self.query_one(f"#plot-{key}", PlotBox)
            sharded = key == "grad" and run.schema is not None and run.schema.sharded
            box.border_title = TITLES[key] + (", this rank's shard" if sharded else "")
            plot_w = box.content_size.width or guess
            box.update(self._plot(run, key, plot_w, plot_h))
        self._alerts(run)

    def _title(self, run: RunState) -> None:
        assert run.schema is not None
        info = run.schema.layers[self.layer_index]
        latest = run.latest()
        text = Text()
        text.append(f" layer {self.layer_index}: ", style="dim")
        text.append(clean(info.name), style="bold")
        text.append(clean(f"  {info.type}  {view.shape_text(info.shape)}  {info.kind}"), style="dim")
        if latest is not None:
            row = latest[self.layer_index]
            peak, update = float(row[STAT_INDEX["peak_ratio"]]), float(row[STAT_INDEX["update_ratio"]])
            if np.isfinite(peak):
                text.append(f"  peak {fmt(peak)}×std", style="dim")
            if np.isfinite(update):
                text.append(f"  update {fmt(update)}/step", style="dim")
            nonfinite = float(latest[self.layer_index][7])
            if nonfinite > 0 or not np.isfinite(latest[self.layer_index][1]):
                text.append(f"  NaN/Inf ({fmt(nonfinite)} elements)", style="bold white on red")
        self.query_one("#layer-title", Static).update(text)

    def _plot(self, run: RunState, key: str, width: int, height: int) -> Text:
        i = self.layer_index

        def s(stat: str) -> npt.NDArray[np.float32]:
            return run.series(stat, layer=i)

        if key == "mean":
            mean, std = s("mean").astype(np.float64), s("std").astype(np.float64)
            return plot(
                [Series("mean", mean, "●", "bold cyan")], width, height, band=(mean - std, mean + std)
            )
        if key == "range":
            return plot(
                [Series("max", s("max"), "▴", "red"), Series("min", s("min"), "▾", "blue")], width, height
            )
        if key == "fractions":
            return plot(
                [
                    Series("zero", s("zero_frac"), "·", "white"),
                    Series("dead", s("dead_frac"), "x", "red"),
                    Series("sat", s("sat_frac"), "o", "yellow"),
                ],
                width,
                height,
                ylim=(0.0, 1.0),
            )
        if key == "shift":
            return plot([Series("shift", s("shift"), "●", "magenta")], width, height, log=True)
        return plot(
            [
                Series("grad", s("grad_norm"), "●", "green"),
                Series("update", s("update_ratio"), "+", "yellow"),
            ],
            width,
            height,
            log=True,
        )

    def _alerts(self, run: RunState) -> None:
        box = self.query_one("#layer-alerts", Static)
        box.border_title = "alerts of this layer"
        name = run.layer_names[self.layer_index]
        changes = [
            c
            for c in self.feed.alert_history(run)
            if c.alert.layer == name or name in getattr(c.alert, "layers", ())
        ]
        if not changes:
            box.update(Text("no alert on this layer so far", style="dim"))
            return
        text = Text()
        for change in changes[-12:]:
            text.append_text(change_line(change))
            text.append("\n")
        box.update(text)
