"""SVG snapshots of the main, detail, heatmap and waiting screens, at 80×24 and wide.

The app is fed from fixed synthetic runs through the real protocol encode/decode (see
``synthetic.py``) with the alert rules off, so a snapshot changes only when the app's drawing does,
not when a rule threshold is tuned. Update with ``pytest tests/tui --snapshot-update``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from synthetic import filled_feed, messages, no_job

from icsmon.feed import Feed
from icsmon.tui.app import IcsmonApp

Snap = Callable[..., bool]


def app_on(**kwargs: Any) -> IcsmonApp:
    return IcsmonApp(filled_feed(messages(**kwargs), engine=False), live=False)


def test_main_80x24(snap_compare: Snap) -> None:
    assert snap_compare(app_on(n_layers=40, nan_from=36), terminal_size=(80, 24))


def test_main_200x60(snap_compare: Snap) -> None:
    assert snap_compare(app_on(n_layers=60, nan_from=56), terminal_size=(200, 60))


async def settled(pilot: Any) -> None:
    """Keys go in once the table is drawn: on a loaded machine they could land before it is."""
    await pilot.pause()
    await pilot.wait_for_scheduled_animations()
    await pilot.pause()


def test_detail_120x40(snap_compare: Snap) -> None:
    assert snap_compare(
        app_on(n_layers=40),
        press=["down", "down", "down", "enter"],
        terminal_size=(120, 40),
        run_before=settled,
    )


def test_heatmap_120x40(snap_compare: Snap) -> None:
    assert snap_compare(
        app_on(n_layers=60, nan_from=56), press=["h"], terminal_size=(120, 40), run_before=settled
    )


def test_heatmap_no_color(snap_compare: Snap, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    assert snap_compare(
        app_on(n_layers=60, nan_from=56), press=["h"], terminal_size=(80, 24), run_before=settled
    )


def test_waiting_80x24(snap_compare: Snap) -> None:
    feed = Feed(no_job)
    feed.error = "no icsmon job is running on this machine"
    assert snap_compare(IcsmonApp(feed, live=False), terminal_size=(80, 24))


def test_main_theme_light(snap_compare: Snap) -> None:
    app = IcsmonApp(filled_feed(messages(n_layers=20), engine=False), live=False, theme="textual-light")
    assert snap_compare(app, terminal_size=(100, 30))
