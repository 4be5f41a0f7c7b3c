"""What the person chose on screen, shared by the screens (the data itself lives in the feed)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ViewState:
    sort: str = "depth"  # one of view.SORTS
    needle: str = ""  # the / filter
    paused: bool = False  # the display is frozen; the feed keeps ingesting
