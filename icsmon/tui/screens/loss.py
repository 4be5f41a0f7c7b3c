"""The run's loss (and learning rate) over every sample held, with the steps where alerts fired."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import Footer, Static

from icsmon.render import fmt
from icsmon.store import RunState
from icsmon.tui.plot import GUTTER, Series, columns_of, plot
from icsmon.tui.screens.laid_out import RunScreen
from icsmon.tui.widgets.header import RunHeader

MARK = {"critical": ("▲", "bold red"), "warning": ("▲", "bold yellow")}
EMPTY = "No loss yet: the job sends one with mon.step(loss=loss) (or a model output's .loss)"


class LossScreen(RunScreen):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,l", "app.pop_screen", "Back", tooltip="Back to the layer table")
    ]

    def compose(self) -> ComposeResult:
        yield RunHeader(id="header")
        yield Static(id="loss-plot")
        yield Static(id="lr-plot")
        yield Footer()

    def redraw(self, force: bool = False) -> None:
        run = self.current(force)
        if run is None:
            return
        width = max(self.size.width - 2, 20)
        lr = run.lr_series()
        # Room for the header, the title, the alert marks and the last alerts, the footer.
        height = max((self.size.height - 13) // (2 if np.isfinite(lr).any() else 1), 4)
        self.query_one("#loss-plot", Static).update(self._loss(run, width, height))
        lr_box = self.query_one("#lr-plot", Static)
        lr_box.display = bool(np.isfinite(lr).any())
        if lr_box.display:
            text = Text("learning rate\n", style="bold")
            text.append_text(plot([Series("lr", lr, "·", "yellow")], width, max(height // 2, 3), log=True))
            lr_box.update(text)

    def _loss(self, run: RunState, width: int, height: int) -> Text:
        losses = run.loss_series()
        if not np.isfinite(losses).any():
            return Text(EMPTY, style="dim")
        steps = run.step_series()
        finite = losses[np.isfinite(losses)]
        # Log scale once the loss spans a decade and stays positive (a cross-entropy's fall).
        log = bool(finite.min() > 0 and finite.max() > 10 * finite.min())
        text = Text(
            f"loss  (steps {steps[0]} to {steps[-1]}, now {fmt(float(losses[-1]), 4)})\n", style="bold"
        )
        text.append_text(plot([Series("loss", losses, "●", "cyan")], width, height, log=log))
        text.append("\n")
        text.append_text(self._marks(run, steps, width))
        return text

    def _marks(self, run: RunState, steps: np.ndarray, width: int) -> Text:
        """A row under the plot: ▲ where an alert fired (red: critical), then which ones."""
        cols = columns_of(len(steps), max(width - GUTTER, 4))
        shown = steps[cols]
        row = [(" ", "")] * len(shown)
        fired = [
            c.alert for _, key, c in self.feed.new_changes(-1) if key == (run.run, run.rank) and not c.cleared
        ]
        for alert in fired:
            at = int(np.searchsorted(shown, alert.step))
            if at < len(row) and (row[at][0] == " " or alert.severity == "critical"):
                row[at] = MARK.get(alert.severity, MARK["warning"])
        text = Text(" " * GUTTER)
        for glyph, style in row:
            text.append(glyph, style=style)
        for alert in fired[-4:]:
            text.append(f"\n  step {alert.step}: {alert.message}"[: width + 1], style="dim")
        return text
