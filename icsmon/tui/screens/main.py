"""The main screen: run header, the layer table, the alert log; a waiting view until a job speaks."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import Footer, Input, Static

from icsmon.feed import Feed
from icsmon.tui import view
from icsmon.tui.screens.laid_out import LaidOutScreen
from icsmon.tui.state import ViewState
from icsmon.tui.widgets.alerts import AlertLog
from icsmon.tui.widgets.header import RunHeader, header_text
from icsmon.tui.widgets.layer_table import LayerTable

WAITING_HELP = (
    "Add two lines to the training script:\n\n"
    "    import icsmon_agent\n"
    "    mon = icsmon_agent.watch(model)\n\n"
    "This screen attaches as soon as the job starts. q quits."
)


class MainScreen(LaidOutScreen):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "detail", "Detail", tooltip="Plots of the selected layer over time"),
        Binding("h", "heatmap", "Heatmap", tooltip="Depth × time of log10(std)"),
        Binding("l", "loss", "Loss", tooltip="The loss and learning rate over the run, alerts marked"),
        Binding(
            "slash", "filter", "Filter", key_display="/", tooltip="Show only layers whose name has a text"
        ),
        Binding("s", "sort", "Sort", tooltip="Cycle the order: depth, severity, name"),
        Binding("p", "pause", "Pause", tooltip="Freeze the display; data keeps flowing"),
        Binding("a", "alerts", "Alerts", tooltip="Active alerts and their history"),
        # The table handles these when focused; these catch keys that arrive before focus is
        # restored on returning from another screen (a fast typist, or send-keys).
        Binding("down,j", "move(1)", "Down", show=False),
        Binding("up,k", "move(-1)", "Up", show=False),
    ]

    def __init__(self, feed: Feed, state: ViewState) -> None:
        super().__init__()
        self.feed = feed
        self.state = state

    def compose(self) -> ComposeResult:
        yield RunHeader(id="header")
        yield Static(id="waiting")
        yield LayerTable(id="layers")
        yield AlertLog(id="alert-log")
        yield Input(placeholder="filter layers by name or type (Enter keeps it, Escape clears)", id="filter")
        yield Footer()

    @property
    def table(self) -> LayerTable:
        return self.query_one("#layers", LayerTable)

    @property
    def alert_log(self) -> AlertLog:
        return self.query_one("#alert-log", AlertLog)

    @property
    def filter_input(self) -> Input:
        return self.query_one("#filter", Input)

    AUTO_FOCUS = "#layers"

    def on_mount(self) -> None:
        self.redraw(force=True)
        self.after_layout()  # column choice and the rows in view depend on the laid-out size

    # ------------------------------------------------------------------ drawing

    def redraw(self, force: bool = False) -> None:
        if self.state.paused and not force:
            self._draw_header()  # keeps saying PAUSED and the connection state
            return
        run = self.state.current(self.feed)
        self._draw_header()
        waiting = self.query_one("#waiting", Static)
        has_data = run is not None and run.schema is not None and run.count > 0
        waiting.display = not has_data
        self.table.display = has_data
        self.alert_log.display = has_data
        if not has_data:
            waiting.update(self._waiting_text())
            return
        assert run is not None
        if self.focused is None or not self.focused.display:
            self.table.focus()  # it was hidden (waiting) when the screen mounted, so nothing had focus
        badges = view.badges(run, self.feed.active_alerts(run))
        order = view.order(run, self.state.sort, badges, self.state.needle)
        self.table.show(run, badges, order, self.size.width)

    def _draw_header(self) -> None:
        run = self.state.current(self.feed)
        extra = f"sort {self.state.sort}"
        if self.state.needle:
            extra += f"  filter {self.state.needle!r}"
        self.query_one(RunHeader).update(
            header_text(self.feed, run, paused=self.state.paused, extra=extra, label=self.app.title)
        )

    def _waiting_text(self) -> Text:
        text = Text()
        run = self.state.current(self.feed)
        if run is not None:
            text.append(f"Connected to {run.run}; waiting for its first sample…\n\n", style="bold")
        elif self.feed.endpoint:
            text.append(f"Listening on {self.feed.endpoint}; waiting for the job to speak…\n\n", style="bold")
        else:
            text.append("Waiting for a training job…\n\n", style="bold")
        if self.feed.error:
            text.append(self.feed.error + "\n\n", style="yellow")
        text.append(WAITING_HELP, style="dim")
        return text

    # ------------------------------------------------------------------ actions

    def action_detail(self) -> None:
        layer = self.table.current_layer
        if layer is not None:
            from icsmon.tui.screens.detail import DetailScreen

            self.app.push_screen(DetailScreen(self.feed, self.state, layer))

    @on(LayerTable.Selected)
    def _row_selected(self, event: LayerTable.Selected) -> None:
        event.stop()
        self.action_detail()

    def action_move(self, delta: int) -> None:
        self.table.focus()
        self.table.action_cursor(delta)

    def action_heatmap(self) -> None:
        from icsmon.tui.screens.heatmap import HeatmapScreen

        self.app.push_screen(HeatmapScreen(self.feed, self.state))

    def action_loss(self) -> None:
        from icsmon.tui.screens.loss import LossScreen

        self.app.push_screen(LossScreen(self.feed, self.state))

    def action_alerts(self) -> None:
        from icsmon.tui.screens.alerts import AlertsScreen

        self.app.push_screen(AlertsScreen(self.feed, self.state))

    def action_sort(self) -> None:
        sorts = view.SORTS
        self.state.sort = sorts[(sorts.index(self.state.sort) + 1) % len(sorts)]
        self.notify(f"sorted by {self.state.sort}", timeout=1.5)
        self.redraw(force=True)

    def action_pause(self) -> None:
        self.state.paused = not self.state.paused
        self.redraw(force=True)

    def action_filter(self) -> None:
        box = self.filter_input
        box.display = True
        box.value = self.state.needle
        box.focus()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.state.needle = event.value.strip()
        self.redraw(force=True)

    @on(Input.Submitted, "#filter")
    def _filter_done(self, event: Input.Submitted) -> None:
        self.filter_input.display = False
        self.table.focus()

    def key_escape(self) -> None:
        if self.filter_input.display:
            self.filter_input.value = ""
            self.state.needle = ""
            self.filter_input.display = False
            self.table.focus()
            self.redraw(force=True)

    def jump_to(self, layer: int) -> None:
        """Put the cursor on ``layer`` (clearing a filter that hides it)."""
        if not self.table.select_layer(layer):
            self.state.needle = ""
            self.redraw(force=True)
            self.table.select_layer(layer)
        self.table.focus()
