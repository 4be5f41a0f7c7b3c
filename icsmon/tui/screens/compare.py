"""Side by side: the ranks of one job (their spread, the outlier) or several runs (a column group each)."""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.widgets import Footer

from icsmon.feed import Feed
from icsmon.store import RunKey
from icsmon.tui import compare
from icsmon.tui.widgets.alerts import AlertLog
from icsmon.tui.widgets.grouped_table import GroupedTable
from icsmon.tui.widgets.header import RunHeader
from icsmon_agent.alerts.model import AlertChange


@runtime_checkable
class HasAlertLogs(Protocol):
    def write_changes(self, logs: list[AlertLog], changes: list[tuple[int, RunKey, AlertChange]]) -> None: ...


EMPTY = "Nothing to compare yet: waiting for the runs' first samples…  (c or Escape: back)"


class CompareScreen(Screen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,c", "app.pop_screen", "Back", tooltip="Back to one run's layer table"),
        Binding("q", "app.quit", "Quit", tooltip="Quit icsmon (the jobs keep running)"),
    ]

    def __init__(self, feed: Feed) -> None:
        super().__init__()
        self.feed = feed

    def compose(self) -> ComposeResult:
        yield RunHeader(id="compare-header")
        yield GroupedTable(id="compare")
        yield AlertLog(id="compare-alert-log")
        yield Footer()

    @property
    def alert_log(self) -> AlertLog:
        return self.query_one("#compare-alert-log", AlertLog)

    def on_mount(self) -> None:
        # What fired before this view opened (the app adds what comes next to every log).
        app = self.app
        if isinstance(app, HasAlertLogs):
            app.write_changes([self.alert_log], self.feed.new_changes(-1))
        self.redraw(force=True)
        self.query_one(GroupedTable).focus()

    def redraw(self, force: bool = False) -> None:
        table = compare.build(self.feed, self.size.width or 200)
        header = self.query_one(RunHeader)
        grid = self.query_one(GroupedTable)
        if not table.rows:
            header.update(EMPTY)
            grid.display = False
            return
        grid.display = True
        kinds = {"ranks": "every rank of one job", "runs": "runs side by side", "one": "one run"}
        alerts = sum(len(self.feed.active_alerts(s)) for s in self.feed.streams())
        header.update(
            f" {self.app.title}  ·  {kinds[table.mode]}  ·  {alerts} alerts active  (c: back, n: next run or rank)"
        )
        grid.show(table)
