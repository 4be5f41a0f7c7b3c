"""The main screen, layer detail, heatmap and keys, on fixed synthetic runs through the real protocol."""

from __future__ import annotations

import numpy as np
from screen_text import screen_text, until
from synthetic import filled_feed, messages
from textual.widgets import Input

from icsmon.render import run_label
from icsmon.tui.app import IcsmonApp
from icsmon.tui.screens.alerts import AlertsScreen
from icsmon.tui.screens.detail import DetailScreen
from icsmon.tui.screens.heatmap import HeatmapScreen
from icsmon.tui.screens.help import HelpScreen
from icsmon.tui.screens.main import MainScreen
from icsmon.tui.view import natural, sparklines
from icsmon.tui.widgets.heatmap import Heatmap
from icsmon.tui.widgets.layer_table import LayerTable


def app_on(**kwargs: object) -> IcsmonApp:
    return IcsmonApp(filled_feed(messages(**kwargs)), live=False)  # type: ignore[arg-type]


async def test_table_has_one_row_per_layer_in_depth_order() -> None:
    app = app_on(n_layers=30)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        table = app.screen.query_one(LayerTable)
        assert table.row_count == 30
        assert table.shown == list(range(30))
        assert table.cell_text(0, "name") == "net.0.fc"
        text = screen_text(app)
        assert "step 790" in text and "● live" in text and "gpu-box" in text and "pid 4242" in text


async def test_nonfinite_layers_get_their_own_badge_and_sort_first() -> None:
    app = app_on(n_layers=20, nan_from=15)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        table = app.screen.query_one(LayerTable)
        status = [table.cell_text(i, "status") for i in range(table.row_count)]
        assert "NaN/Inf" not in status[:15]
        assert status[15:] == ["NaN/Inf"] * 5
        await pilot.press("s")  # depth -> severity
        assert app.view_state.sort == "severity"
        assert table.shown[:5] == [15, 16, 17, 18, 19]
        await pilot.press("s")  # severity -> name
        assert app.view_state.sort == "name"
        names = [app.view_state.current(app.feed).layer_names[i] for i in table.shown]  # type: ignore[union-attr]
        assert names == sorted(names, key=natural) and names[:2] == ["net.0.act", "net.0.fc"]
        assert names.index("net.2.fc") < names.index("net.9.fc")  # numbers read as numbers


def test_natural_order_and_honest_sparklines() -> None:
    assert sorted(["blocks.11", "blocks.2", "blocks.14", "head"], key=natural) == [
        "blocks.2", "blocks.11", "blocks.14", "head",
    ]  # fmt: skip
    # A std moving 2% (a LayerNorm's output) draws flat; one that grows tenfold fills the height.
    series = np.stack([np.linspace(1.01, 1.03, 16), np.geomspace(1.0, 10.0, 16)], axis=1).astype(np.float32)
    steady, grows = sparklines(series, 16)
    assert set(steady) == {"▁"} and grows[0] == "▁" and grows[-1] == "█"


async def test_filter_narrows_and_escape_restores() -> None:
    app = app_on(n_layers=30)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        table = app.screen.query_one(LayerTable)
        await pilot.press("slash")
        assert app.screen.query_one("#filter", Input).has_focus
        await pilot.press(*"tanh")
        assert app.view_state.needle == "tanh"
        assert [app.view_state.current(app.feed).layer_names[i] for i in table.shown] == ["net.9.act"]  # type: ignore[union-attr]
        await pilot.press("escape")
        assert app.view_state.needle == ""
        assert table.row_count == 30


async def test_enter_opens_detail_escape_comes_back_h_heatmap() -> None:
    app = app_on(n_layers=12)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        await pilot.press("down", "down", "enter")
        assert isinstance(app.screen, DetailScreen)
        assert app.screen.layer_index == 2
        await pilot.press("right")
        assert app.screen.layer_index == 3
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)
        await pilot.press("h")
        assert isinstance(app.screen, HeatmapScreen)
        await pilot.pause()
        heat = app.screen.query_one(Heatmap)
        assert heat.n_layers == 12 and heat.samples == 80
        await pilot.press("escape", "a")
        assert isinstance(app.screen, AlertsScreen)
        await pilot.press("escape", "question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape", "q")
    assert app.return_code in (0, None)


async def test_help_lists_the_keys_that_work_here() -> None:
    """A live session's help has no replay controls; a replay's has them."""
    from icsmon.replay import ReplayFeed

    def keys_of(app: IcsmonApp) -> list[str]:
        assert isinstance(app.screen, HelpScreen)
        return [description for _, description in app.screen.keys]

    live = app_on(n_layers=6)
    async with live.run_test(size=(120, 40)) as pilot:
        await pilot.press("question_mark")
        assert "Cycle the order: depth, severity, name" in keys_of(live)
        assert "Play or pause the recording" not in keys_of(live)
        assert "Pick the jobs to watch" not in keys_of(live)  # no list of jobs here: o is not offered
    recorded = [(float(i), m) for i, m in enumerate(messages(n_layers=6, n_samples=5))]
    replay = IcsmonApp(ReplayFeed(recorded), live=False)
    async with replay.run_test(size=(120, 40)) as pilot:
        await pilot.press("question_mark")
        assert "Play or pause the recording" in keys_of(replay)


async def test_pause_freezes_the_table_while_data_flows() -> None:
    app = app_on(n_layers=6, n_samples=10)
    async with app.run_test(size=(120, 30)) as pilot:
        await pilot.pause()
        await pilot.press("p")
        assert app.view_state.paused
        before = screen_text(app)
        for msg in messages(n_layers=6, n_samples=20)[11:]:  # ten more samples arrive
            app.feed.ingest(msg)
        app._tick(force=True)
        await pilot.pause()
        after = screen_text(app)
        assert "step 90" in before
        table_rows = [line for line in after.splitlines() if "net.0.fc" in line]
        assert table_rows and table_rows[0] in before
        await pilot.press("p")
        await pilot.pause()
        resumed = [line for line in screen_text(app).splitlines() if "net.0.fc" in line]
        assert resumed and resumed[0] not in before  # the table caught up with the new samples


async def test_keys_reach_the_table_when_data_arrives_after_the_waiting_view() -> None:
    from synthetic import no_job

    from icsmon.feed import Feed

    feed = Feed(no_job)
    app = IcsmonApp(feed, live=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        for msg in messages(n_layers=8, n_samples=5):
            feed.ingest(msg)
        app._tick(force=True)
        await pilot.pause()
        table = app.screen.query_one(LayerTable)
        assert table.has_focus
        await pilot.press("down", "enter")
        assert isinstance(app.screen, DetailScreen) and app.screen.layer_index == 1


async def test_a_key_that_reaches_the_detail_before_it_is_composed_is_harmless() -> None:
    app = app_on(n_layers=6, n_samples=5)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        detail = DetailScreen(app.feed, app.view_state, 0)
        app.push_screen(detail)
        detail.action_step(1)  # what a typed-ahead → did in a real terminal: it used to raise NoMatches
        await pilot.pause()
        assert app.screen is detail and detail.layer_index == 1
        assert "layer 1:" in screen_text(app)


async def test_l_shows_the_loss_over_the_run_with_the_alerts_marked() -> None:
    app = app_on(n_layers=20, nan_from=15)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        await pilot.press("l")
        assert type(app.screen).__name__ == "LossScreen"
        await until(
            pilot, lambda: "step 790: nonfinite" in screen_text(app), "the loss plot"
        )  # once laid out
        text = screen_text(app)
        assert "loss  (steps 0 to 790" in text and "▲" in text and "step 790: nonfinite" in text
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)


def test_two_runs_of_one_script_are_told_apart() -> None:
    """Both called train_cnn: each gets its run id's suffix wherever a run is named."""
    names = ["train_cnn", "train_cnn", "gpt"]
    assert run_label("train_cnn", "train_cnn-1a2b3c", names) == "train_cnn·1a2b3c"
    assert run_label("train_cnn", "train_cnn-9f8e7d", names) == "train_cnn·9f8e7d"
    assert run_label("gpt", "gpt-000001", names) == "gpt"
