"""A screen whose drawing depends on its laid-out size (the rows in view, the heatmap's grid)."""

from __future__ import annotations

from textual.screen import Screen


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
