"""Every active alert (worst first) and the log of changes, with the hint for each."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static

from icsmon.feed import Feed
from icsmon.tui.state import ViewState
from icsmon.tui.widgets.alerts import alert_line, change_line
from icsmon.tui.widgets.header import RunHeader, header_text


class AlertsScreen(Screen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,a", "app.pop_screen", "Back", tooltip="Back to the layer table")
    ]

    def __init__(self, feed: Feed, state: ViewState) -> None:
        super().__init__()
        self.feed = feed
        self.state = state

    def compose(self) -> ComposeResult:
        yield RunHeader(id="header")
        with VerticalScroll():
            yield Static(id="active-alerts", classes="plot")
            yield Static(id="alert-history", classes="plot")
        yield Footer()

    def on_mount(self) -> None:
        self.redraw(force=True)

    def redraw(self, force: bool = False) -> None:
        run = self.state.current(self.feed)
        self.query_one(RunHeader).update(header_text(self.feed, run, label=self.app.title))
        active = self.query_one("#active-alerts", Static)
        history = self.query_one("#alert-history", Static)
        if run is None:
            return
        alerts = sorted(self.feed.active_alerts(run), key=lambda a: (a.severity != "critical", a.layer_index))
        active.border_title = f"active alerts ({len(alerts)})"
        text = Text()
        if self.feed.engine_factory is None and not self.feed.engines:
            text.append("alert rules are not available in this build", style="dim")
        elif not alerts:
            text.append("none: every layer looks healthy", style="green")
        for alert in alerts:
            text.append_text(alert_line(alert))
            text.append("\n")
        active.update(text)
        changes = self.feed.alert_history(run)
        history.border_title = f"history ({len(changes)} changes)"
        log = Text()
        for change in changes[-200:]:
            log.append_text(change_line(change))
            log.append("\n")
        history.update(log)
