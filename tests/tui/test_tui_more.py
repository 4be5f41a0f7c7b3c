"""Command palette, picker, alerts (log, toasts, bell), and the CLI's errors for bad input."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from screen_text import screen_text, until
from synthetic import filled_feed, messages, no_job
from textual.command import CommandList, CommandPalette
from textual.widgets import OptionList

from helpers import icsmon
from icsmon.alerts.config import default_engine_factory
from icsmon.feed import Feed
from icsmon.tui.app import IcsmonApp
from icsmon.tui.screens.main import MainScreen
from icsmon.tui.screens.picker import PickerScreen
from icsmon.tui.widgets.alerts import AlertLog
from icsmon.tui.widgets.layer_table import LayerTable
from icsmon_agent.discovery import JobInfo


async def test_palette_jumps_to_a_layer() -> None:
    app = IcsmonApp(filled_feed(messages(n_layers=30), engine=False), live=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        await pilot.press("ctrl+p")
        assert isinstance(app.screen, CommandPalette)
        await pilot.press(*"net.12.act")

        # The palette searches in a worker and lists its hits as they come, best first.
        def first_hit() -> str:
            hits = app.screen.query_one(CommandList)
            return str(hits.get_option_at_index(0).prompt) if hits.option_count else ""

        await until(pilot, lambda: "net.12.act" in first_hit(), "the layer as the palette's first hit")
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, MainScreen)
        table = app.screen.query_one(LayerTable)
        assert table.current_layer == 25  # net.12.act is the 26th layer
        assert table.has_focus


async def test_picker_chooses_among_several_jobs() -> None:
    jobs = [
        JobInfo(
            pid=101,
            host="h",
            run="a-1",
            name="alpha",
            rank=0,
            world_size=1,
            endpoint="ipc:///x/a",
            started=time.time() - 60,  # the older: listed second
        ),
        JobInfo(
            pid=102,
            host="h",
            run="b-2",
            name="beta",
            rank=0,
            world_size=1,
            endpoint="ipc:///x/b",
            started=time.time(),
        ),
    ]
    chosen: list[str] = []

    def connect_job(picked: list[JobInfo]) -> str:
        chosen.extend(job.run for job in picked)
        return no_job()  # nothing listens there: the app waits, which is all this test needs

    feed = Feed(no_job)
    app = IcsmonApp(feed, jobs=lambda: jobs, connect_job=connect_job)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, PickerScreen)
        assert "alpha" in screen_text(app) and "beta" in screen_text(app)
        app.screen.query_one(OptionList).focus()
        await pilot.press("down", "enter")
        await until(pilot, lambda: isinstance(app.screen, MainScreen) and bool(chosen), "the chosen job")
        assert chosen and set(chosen) == {"a-1"}  # connect is retried while nothing answers


async def test_a_picked_job_that_has_ended_says_so_instead_of_waiting_in_silence() -> None:
    import os
    import socket
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    # Exited and left unreaped, as the demo leaves its finished runs: a zombie still answers kill -0.
    os.waitid(os.P_PID, gone.pid, os.WEXITED | os.WNOWAIT)
    here = socket.gethostname()

    def job(pid: int, name: str) -> JobInfo:
        return JobInfo(
            pid=pid,
            host=here,
            run=f"{name}-1",
            name=name,
            rank=0,
            world_size=1,
            endpoint=f"ipc:///nonexistent/{name}",
            started=time.time(),
        )

    jobs = [job(gone.pid, "plain"), job(gone.pid, "batchnorm")]
    feed = Feed(no_job)
    app = IcsmonApp(feed, jobs=lambda: jobs)  # no connect_job: the demo's way
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, PickerScreen)
        app.screen.query_one(OptionList).focus()
        await pilot.press("enter")
        await until(pilot, lambda: "has ended" in screen_text(app), "the ended job's note")
        text = screen_text(app)
        assert f"(pid {gone.pid}" in text and "has ended" in text, text
        assert not feed.endpoints  # it never subscribed to the dead endpoint
    gone.wait()


async def test_alerts_reach_the_log_the_badges_and_a_toast() -> None:
    feed = Feed(no_job, engine_factory=default_engine_factory())
    app = IcsmonApp(feed, live=False, bell=True)
    rang: list[bool] = []
    app.bell = lambda: rang.append(True)  # type: ignore[method-assign]
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        for msg in messages(n_layers=20, n_samples=30, nan_from=15):
            feed.ingest(msg)  # the last sample has NaN/Inf from layer 15: a critical alert fires
        app._tick(force=True)
        await pilot.pause()
        log = app.screen.query_one(AlertLog)
        assert log.lines_written >= 1
        assert app.toasts >= 1 and rang  # critical: a toast and the bell
        table = app.screen.query_one(LayerTable)
        assert table.cell_text(15, "status") == "NaN/Inf"
        await pilot.press("a")
        assert "active alerts" in screen_text(app)


def test_cli_rejects_bad_input_with_a_clear_message(env: dict[str, str], tmp_path: Path) -> None:
    proc = icsmon("attach", "--theme", "no-such-theme", env=env)
    assert proc.returncode == 1 and "unknown theme 'no-such-theme'" in proc.stderr and "nord" in proc.stderr
    proc = icsmon("attach", "4000000", env=env)
    assert proc.returncode == 1 and "no process with pid 4000000" in proc.stderr
    proc = icsmon("attach", f"ipc://{tmp_path}/nothing.sock", env=env)
    assert proc.returncode == 1 and "no socket at" in proc.stderr
    assert "Traceback" not in proc.stderr
    # A flag the command does not know: that command's usage, not the top-level one.
    for command in ("attach", "tail", "list", "relay"):
        proc = icsmon(command, "--bogus", env=env)
        assert proc.returncode == 2 and proc.stderr.startswith(f"usage: icsmon {command}"), proc.stderr
        assert "unrecognized arguments: --bogus" in proc.stderr


def test_a_malformed_config_file_is_one_line_of_error_for_every_command(
    env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "icsmon.toml").write_text("[alerts]\ndead_frac = 'lots'\n")
    for command in (
        ["attach"],
        ["tail", "--timeout", "1"],
        ["rules"],
        ["demo", "--headless", "--steps", "1"],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "icsmon", *command],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 1, (command, proc.stderr)
        assert (
            proc.stderr.startswith("icsmon: ")
            and "icsmon.toml" in proc.stderr
            and "Traceback" not in proc.stderr
        )


async def test_a_quiet_job_shows_stale_then_a_sample_makes_it_live_again() -> None:
    feed = filled_feed(messages(n_layers=4, n_samples=5), engine=False)
    app = IcsmonApp(feed, live=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        run = app.view_state.current(feed)
        assert run is not None
        run.last_recv = time.monotonic() - 60  # nothing heard for a minute
        app._tick(force=True)
        await pilot.pause()
        assert "● stale" in screen_text(app)
        for msg in messages(n_layers=4, n_samples=6)[-1:]:
            feed.ingest(msg)
        app._tick(force=True)
        await pilot.pause()
        assert "● live" in screen_text(app)


async def test_ctrl_c_quits_like_q() -> None:
    app = IcsmonApp(filled_feed(messages(n_layers=10)), live=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        await pilot.press("ctrl+c")
        await pilot.pause()
        assert not app.is_running


async def test_the_side_by_side_view_shows_the_alerts_where_the_eye_is() -> None:
    """Two runs side by side (the demo's first screen): the alert log is on it, with what fired
    before it opened and what fires after, each line naming its run."""
    feed = filled_feed(
        messages(run="calm-1a", name="calm") + messages(run="sick-2b", name="sick", nan_from=36)
    )
    app = IcsmonApp(feed, live=False, compare=True)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        log = app.screen.query_one("#compare-alert-log", AlertLog)
        assert log.lines_written > 0
        text = screen_text(app)
        assert "nonfinite" in text and "sick" in text
