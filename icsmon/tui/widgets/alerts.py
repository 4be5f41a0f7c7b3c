"""The alert log: one line per alert firing or clearing, newest at the bottom."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import RichLog

from icsmon.render import clean
from icsmon_agent.alerts.model import Alert, AlertChange

SEVERITY_STYLE = {"critical": "bold red", "warning": "bold yellow"}


def alert_line(alert: Alert) -> Text:
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append(f"{alert.severity.upper():<8} ", style=SEVERITY_STYLE.get(alert.severity, ""))
    text.append(clean(alert.message))  # a Text: layer names are never markup
    if alert.hint:
        text.append(f" — {alert.hint}", style="dim")
    return text


def change_line(change: AlertChange, where: str = "") -> Text:
    """One change; ``where`` names the run (and rank) when several are watched."""
    line = Text(f"[{clean(where)}] " if where else "", style="bold")
    if not change.cleared:
        line.append(f"step {change.alert.step:>7}  ", style="dim")
        return line.append_text(alert_line(change.alert))
    line.append(f"step {change.step:>7}  ", style="dim")
    line.append("cleared  ", style="green")
    on = f" on {change.alert.layer}" if change.alert.layer else ""  # a run-level alert names no layer
    line.append(clean(f"{change.alert.rule.replace('_', ' ')}{on}"))
    return line


class AlertLog(RichLog):
    """Fed by the app with every new change; bounded like every other buffer of the viewer."""

    DEFAULT_CSS = """
    AlertLog { height: 20%; min-height: 3; max-height: 10; border-top: solid $primary; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, max_lines=500, wrap=False, markup=False, auto_scroll=True)
        self.can_focus = False
        self.lines_written = 0

    def add(self, change: AlertChange, where: str = "") -> None:
        self.write(change_line(change, where))
        self.lines_written += 1
