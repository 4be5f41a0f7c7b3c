"""What the person chose on screen, shared by the screens (the data itself lives in the feed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from icsmon.store import RunKey, RunState

if TYPE_CHECKING:
    from icsmon.feed import Feed


@dataclass
class ViewState:
    sort: str = "depth"  # one of view.SORTS
    needle: str = ""  # the / filter
    paused: bool = False  # the display is frozen; the feed keeps ingesting
    selected: RunKey | None = None  # the stream a single-stream screen shows (None: the newest)

    def current(self, feed: Feed) -> RunState | None:
        """The stream a single-stream screen shows: the one selected, else the one heard from last."""
        if self.selected is not None:
            run = feed.store.runs.get(self.selected)
            if run is not None:
                return run
        return feed.store.newest()

    def select(self, feed: Feed, delta: int) -> RunState | None:
        """Move the selection ``delta`` streams on (wrapping); the new current stream."""
        streams = feed.streams()
        if not streams:
            return None
        now = self.current(feed)
        at = streams.index(now) if now in streams else 0
        chosen = streams[(at + delta) % len(streams)]
        self.selected = (chosen.run, chosen.rank)
        return chosen
