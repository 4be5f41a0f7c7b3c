"""A screen whose drawing depends on its laid-out size (the rows in view, the heatmap's grid)."""

from __future__ import annotations

from textual.screen import Screen

from icsmon.feed import Feed
from icsmon.store import RunState
from icsmon.tui.state import ViewState
from icsmon.tui.widgets.header import RunHeader, header_text


class LaidOutScreen(Screen[None]):
    """Redrawn once layout is known (call ``after_layout()`` from ``on_mount``) and on every resize."""

    def redraw(self, force: bool = False) -> None:
        raise NotImplementedError

    def after_layout(self) -> None:
        self.call_after_refresh(self._redraw_laid_out)

    def on_resize(self) -> None:
        self.after_layout()

    def _redraw_laid_out(self) -> None:
        # By then the screen may already be gone (a quick Escape, or quitting), which is fine.
        if self.is_attached and self.app.screen is self:
            self.redraw(force=True)


class RunScreen(LaidOutScreen):
    """A full screen about the current run: its header on top, the rest drawn from its size."""

    def __init__(self, feed: Feed, state: ViewState) -> None:
        super().__init__()
        self.feed = feed
        self.state = state

    def on_mount(self) -> None:
        self.after_layout()  # what it draws is sized from its own size, known only after layout

    def current(self, force: bool) -> RunState | None:
        """Update the header; the run to draw, or None (none yet, or frozen by the pause)."""
        run = self.state.current(self.feed)
        self.query_one(RunHeader).update(
            header_text(self.feed, run, paused=self.state.paused, label=self.app.title)
        )
        if (self.state.paused and not force) or run is None or run.schema is None or run.count == 0:
            return None
        return run
