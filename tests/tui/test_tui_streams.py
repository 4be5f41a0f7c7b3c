"""Several streams in the app: runs side by side, every rank of a job, and the picker's keys."""

from __future__ import annotations

import dataclasses
import time

from screen_text import screen_text, until
from synthetic import filled_feed, messages, no_job

from icsmon.feed import Feed
from icsmon.tui.app import IcsmonApp
from icsmon.tui.screens.compare import CompareScreen
from icsmon.tui.screens.main import MainScreen
from icsmon.tui.screens.picker import PickerScreen
from icsmon_agent.discovery import JobInfo
from icsmon_agent.protocol import Message, Sample, Schema


def two_runs() -> list[Message]:
    plain = messages(n_layers=6, n_samples=30, run="plain-1", name="plain", decay=0.5)
    batchnorm = messages(n_layers=6, n_samples=30, run="batchnorm-2", name="batchnorm", decay=1.0)
    return plain + batchnorm


def two_ranks(nan_on_rank_1: bool) -> list[Message]:
    rank0 = messages(n_layers=6, n_samples=30, run="ddp-9", name="ddp", decay=1.0)
    rank1 = messages(
        n_layers=6, n_samples=30, run="ddp-9", name="ddp", decay=1.0, nan_from=3 if nan_on_rank_1 else None
    )
    out: list[Message] = []
    for a, b in zip(rank0, rank1, strict=True):
        if isinstance(a, Schema):
            a, b = dataclasses.replace(a, world_size=2), dataclasses.replace(b, world_size=2)
        out += [a, dataclasses.replace(b, rank=1)]
    return out


async def test_the_compare_screen_shows_two_runs_side_by_side_and_tab_switches_the_main_screen() -> None:
    feed = filled_feed(two_runs(), engine=False)
    app = IcsmonApp(feed, live=False, compare=True)
    async with app.run_test(size=(160, 30)) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, CompareScreen)
        text = screen_text(app)
        assert "runs side by side" in text and "plain" in text and "batchnorm" in text, text
        assert "step 290" in text and "net.0.fc Linear" in text
        await pilot.press("c")  # back to one run's layer table
        await pilot.pause()
        assert isinstance(app.screen, MainScreen)
        first = app.view_state.current(feed)
        await pilot.press("n")
        await pilot.pause()
        second = app.view_state.current(feed)
        assert first is not None and second is not None and first.run != second.run
        assert (second.schema.name if second.schema else "") in screen_text(app).split("\n")[0]


async def test_every_rank_of_a_job_shows_its_spread_and_a_nan_on_one_rank_is_named() -> None:
    feed = filled_feed(two_ranks(nan_on_rank_1=True))
    app = IcsmonApp(feed, live=False)
    async with app.run_test(size=(160, 30)) as pilot:
        await pilot.pause()
        await pilot.press("c")
        await until(pilot, lambda: "2 of 2 ranks" in screen_text(app), "the ranks side by side")
        text = screen_text(app)
        assert "every rank of one job" in text and "2 of 2 ranks" in text, text
        assert "std across ranks" in text and "r1" in text
        divergence = [c.alert for _, _, c in feed.changes if c.alert.rule == "rank_divergence"]
        assert divergence and divergence[0].rank == 1 and "rank 1 only" in divergence[0].message
        await pilot.press("escape")
        # In the main screen's alert log (written on the app's next tick; with the NaN's own alerts
        # it may have scrolled past the log's few visible lines).
        log = app.main_screen.alert_log
        await until(
            pilot, lambda: any("rank_divergence" in line.text for line in log.lines), "the alert in the log"
        )


def job(pid: int, name: str, started: float) -> JobInfo:
    return JobInfo(
        pid=pid, host="h", run=f"{name}-1", name=name, rank=0, world_size=1,
        endpoint=f"ipc:///x/{name}", started=started,
    )  # fmt: skip


async def test_the_picker_quits_goes_back_marks_several_and_shows_an_ended_job() -> None:
    now = time.time()
    listed = [job(101, "alpha", now - 10), job(102, "beta", now - 20), job(103, "gamma", now - 30)]
    chosen: list[list[str]] = []

    def connect_jobs(jobs: list[JobInfo]) -> str:
        chosen.append([j.run for j in jobs])
        return no_job()

    # q quits from the picker, as its footer says.
    app = IcsmonApp(Feed(no_job), jobs=lambda: list(listed), connect_job=connect_jobs)
    async with app.run_test(size=(120, 30)) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, PickerScreen)
        await pilot.press("q")
        await pilot.pause()
    assert app.return_code == 0 and not chosen

    # Escape goes back (nothing chosen: the main screen says how to pick); o opens the picker again.
    app = IcsmonApp(Feed(no_job), jobs=lambda: list(listed), connect_job=connect_jobs)
    async with app.run_test(size=(120, 30)) as pilot:
        await pilot.pause()
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, MainScreen) and "no job chosen" in screen_text(app)
        await pilot.press("o")
        await pilot.pause()
        picker = app.screen
        assert isinstance(picker, PickerScreen)
        # A job that ended since is kept, marked as ended, and cannot be watched.
        del listed[2]
        picker.refresh_jobs()
        await pilot.pause()
        text = screen_text(app)
        assert "gamma" in text and "ended" in text and "2 jobs run" in text, text
        # Mark alpha and beta (space), then watch both (Enter): side by side.
        await pilot.press("space", "down", "space", "enter")
        await until(pilot, lambda: bool(chosen) and isinstance(app.screen, CompareScreen), "both runs")
        assert chosen and chosen[0] == ["alpha-1", "beta-1"]  # retried while nothing answers
        assert isinstance(app.screen, CompareScreen)


def test_synthetic_ranks_share_one_layer_table() -> None:
    msgs = two_ranks(nan_on_rank_1=False)
    schemas = [m for m in msgs if isinstance(m, Schema)]
    assert {s.schema_id for s in schemas} == {schemas[0].schema_id} and {s.rank for s in schemas} == {0, 1}
    assert {m.rank for m in msgs if isinstance(m, Sample)} == {0, 1}
