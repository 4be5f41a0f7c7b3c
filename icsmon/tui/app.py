"""The Textual app: one feed worker fills the store; a timer redraws the screen on top from it.

The worker (``Feed.run`` on zmq.asyncio) never posts a message per sample: Textual's message queue
is unbounded and a fast job would bury the screen. Instead :meth:`IcsmonApp._tick` runs a few times
a second, takes the alert changes that arrived since the last tick, and asks the visible screen to
redraw itself from the store. The frame rate is therefore independent of the message rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import ClassVar

from rich.markup import escape
from textual.app import App, ScreenStackError
from textual.binding import Binding, BindingType
from textual.css.query import NoMatches
from textual.driver import Driver
from textual.screen import Screen
from textual.worker import Worker, WorkerState

from icsmon.feed import Feed, Sources
from icsmon.replay import SPEEDS, ReplayFeed
from icsmon.store import RunKey
from icsmon.targets import live_endpoints
from icsmon.tui.commands import LayerCommands
from icsmon.tui.safe import clean
from icsmon.tui.screens.compare import CompareScreen
from icsmon.tui.screens.help import HelpScreen, describe
from icsmon.tui.screens.main import MainScreen
from icsmon.tui.screens.picker import PickerScreen
from icsmon.tui.state import ViewState
from icsmon.tui.terminal import HANGUP_EXIT, hangup_safe, hung_up, input_tty
from icsmon.tui.widgets.alerts import AlertLog
from icsmon_agent.alerts.model import AlertChange
from icsmon_agent.discovery import JobInfo

REFRESH_HZ = 10.0  # a 1,000-layer redraw fits many times a second (benchmarks/viewer.py)
#: How often the app checks that its terminal is still there (see _watch_terminal).
TERMINAL_CHECK_S = 1.0
TOASTS_PER_TICK = 3
#: With nothing new, a screen with a live stream is still redrawn this often (ages, rates, staleness).
CLOCK_REDRAW_S = 1.0


#: Actions of a replay's controls: they do nothing, and are not listed, in a live session.
REPLAY_ACTIONS = ("play", "speed", "seek")


class IcsmonApp(App[int]):
    CSS_PATH = "app.tcss"
    TITLE = "icsmon"
    COMMANDS = App.COMMANDS | {LayerCommands}
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit", tooltip="Quit icsmon (the job keeps running)"),
        # A terminal tool's Ctrl-C quits (Textual's own only says how to quit).
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
        Binding("question_mark", "help", "Help", key_display="?", tooltip="Every key and what it does"),
        Binding("n", "next_stream(1)", "Next run/rank", tooltip="Show the next run or rank", show=False),
        Binding("N", "next_stream(-1)", "Previous run/rank", show=False),
        Binding("c", "compare", "Compare", tooltip="Runs or ranks side by side"),
        Binding("o", "pick", "Jobs", tooltip="Pick the jobs to watch", show=False),
        # A replay's controls (shown only when replaying):
        Binding("space", "play", "Play/pause", tooltip="Play or pause the recording"),
        Binding("plus,equals_sign", "speed(1)", "Faster", key_display="+"),
        Binding("minus", "speed(-1)", "Slower", key_display="-"),
        Binding("greater_than_sign", "seek(1)", "Seek on", key_display=">", show=False),
        Binding("less_than_sign", "seek(-1)", "Seek back", key_display="<", show=False),
        Binding("0", "seek(0)", "Restart", show=False),
    ]

    def __init__(
        self,
        feed: Feed,
        *,
        title: str = "",
        bell: bool = False,
        theme: str | None = None,
        live: bool = True,
        jobs: Callable[[], list[JobInfo]] | None = None,
        connect_job: Callable[[list[JobInfo]], Sources] | None = None,
        refresh_hz: float = REFRESH_HZ,
        compare: bool = False,
    ) -> None:
        super().__init__()
        self.feed = feed
        self.view_state = ViewState()
        self.bell_on_critical = bell
        self.live = live
        self.jobs = jobs
        self.connect_job = connect_job
        self.refresh_hz = refresh_hz
        self.compare_at_start = compare
        self.frames = 0  # redraw ticks done: what the throughput check counts
        self._drawn_version = -1
        self._drawn_at = 0.0
        self.toasts = 0
        self._seen_change = 0
        self._feed_worker: Worker[None] | None = None
        if title:
            self.title = title
        if theme:
            self.theme = theme

    def get_driver_class(self) -> type[Driver]:
        driver = super().get_driver_class()
        if sys.platform == "win32":
            return driver
        from textual.drivers.linux_driver import LinuxDriver

        return hangup_safe(driver) if issubclass(driver, LinuxDriver) else driver

    def get_default_screen(self) -> Screen[None]:
        return MainScreen(self.feed, self.view_state)

    @property
    def main_screen(self) -> MainScreen:
        for screen in self.screen_stack:
            if isinstance(screen, MainScreen):
                return screen
        raise LookupError("the main screen is not mounted")

    def on_mount(self) -> None:
        self.set_interval(1 / self.refresh_hz, self._tick)
        if not self.is_headless:
            self._watch_terminal()
        if self.compare_at_start:
            self.action_compare()
        if not self.live:
            return
        jobs = self.jobs() if self.jobs is not None else []
        if len({j.run for j in jobs}) > 1:
            self.action_pick()
        else:
            self._start_feed()

    def _watch_terminal(self) -> None:
        """Leave, the ordinary way (the demo then stops its jobs), when the terminal goes away.

        Two signs, because either can be missing: SIGHUP, which a parent may take and not pass on
        (``make demo`` in a closed tmux window), and the terminal itself (see terminal.py). A
        SIGHUP that somebody set to be ignored (``nohup``) or handled stays theirs.
        """
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError, AttributeError):
            if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:
                # The loop removes its handlers when it closes: the disposition is restored.
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._terminal_gone)
        fd = input_tty()
        if fd is not None:
            self.set_interval(TERMINAL_CHECK_S, partial(self._check_terminal, fd))

    def _check_terminal(self, fd: int) -> None:
        if hung_up(fd):
            self._terminal_gone()

    def _terminal_gone(self) -> None:
        self.exit(return_code=HANGUP_EXIT)

    def action_pick(self) -> None:
        if self.jobs is not None and not isinstance(self.screen, PickerScreen):
            self.push_screen(PickerScreen(self.jobs), self._picked)

    def _picked(self, jobs: list[JobInfo] | None) -> None:
        if not jobs:
            if self._feed_worker is None:
                self.feed.error = "no job chosen: o opens the list of jobs, q quits"
                self.feed.version += 1
            return  # Escape: back to what was on screen
        pick = self.connect_job or live_endpoints
        self.feed.connect = partial(pick, jobs)
        self.view_state.selected = None
        if self._feed_worker is not None:
            self._feed_worker.cancel()  # follow the new choice from scratch
            self.feed.reset()
        self._start_feed()
        if len({j.run for j in jobs}) > 1 and not isinstance(self.screen, CompareScreen):
            self.action_compare()

    def action_next_stream(self, delta: int) -> None:
        chosen = self.view_state.select(self.feed, delta)
        if chosen is not None:
            world = chosen.schema.world_size if chosen.schema is not None else 1
            rank = f" rank {chosen.rank}/{world}" if world > 1 else ""
            name = chosen.schema.name if chosen.schema is not None and chosen.schema.name else chosen.run
            self.notify(escape(clean(f"showing {name}{rank}")), timeout=1.5)
            self._tick(force=True)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in REPLAY_ACTIONS:
            return isinstance(self.feed, ReplayFeed)  # replay keys exist in a replay only
        if action == "pick":
            return self.jobs is not None  # no list of jobs to pick from (the demo, a replay, an endpoint)
        return True

    def action_play(self) -> None:
        if isinstance(self.feed, ReplayFeed):
            self.feed.playing = not self.feed.playing
            self._tick(force=True)

    def action_speed(self, step: int) -> None:
        feed = self.feed
        if isinstance(feed, ReplayFeed):
            at = min(range(len(SPEEDS)), key=lambda i: abs(SPEEDS[i] - feed.speed))
            feed.speed = SPEEDS[max(0, min(len(SPEEDS) - 1, at + step))]
            self._tick(force=True)

    def action_seek(self, direction: int) -> None:
        feed = self.feed
        if isinstance(feed, ReplayFeed):
            total = len(feed.recorded)
            feed.seek(0 if direction == 0 else feed.position + direction * max(1, total // 10))
            self._seen_change = 0
            with contextlib.suppress(LookupError):
                self.main_screen.alert_log.clear()  # the log is rebuilt from the changes replayed
            self._tick(force=True)

    def action_compare(self) -> None:
        if isinstance(self.screen, CompareScreen):
            self.pop_screen()
        else:
            self.push_screen(CompareScreen(self.feed))

    def _start_feed(self) -> None:
        # exit_on_error=False: a bug in the feed shows as a notification, never kills the screen.
        self._feed_worker = self.run_worker(self.feed.run(), name="feed", exit_on_error=False)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker is self._feed_worker and event.state == WorkerState.ERROR:
            self.notify(f"the connection failed: {event.worker.error}; retrying", severity="error")
            self.set_timer(2.0, self._start_feed)

    # ------------------------------------------------------------------ the clock

    def _tick(self, force: bool = False) -> None:
        """Redraw when something changed, and once a second while a stream is live (its age and
        rate move); an app on ended jobs with nothing arriving draws nothing at all."""
        self._take_alert_changes()
        now = time.monotonic()
        if not force and self.feed.version == self._drawn_version:
            ticking = any(not run.ended for run in self.feed.store.runs.values())
            if not ticking or now - self._drawn_at < CLOCK_REDRAW_S:
                return
        self._drawn_version, self._drawn_at = self.feed.version, now
        try:
            screen = self.screen
        except ScreenStackError:
            return  # a tick queued just before the app tore its screens down (quitting)
        redraw: Callable[[], None] | None = getattr(screen, "redraw", None)
        if redraw is None or not screen.is_attached:
            return
        try:
            redraw()
        except NoMatches:
            return  # the screen is being torn down (quitting, or popped since the tick was queued)
        self.frames += 1

    def write_changes(self, logs: list[AlertLog], changes: list[tuple[int, RunKey, AlertChange]]) -> None:
        """Alert changes into logs, each named by its run (and rank) when several are watched."""
        streams = self.feed.streams()
        several = len(streams) > 1
        names = {(s.run, s.rank): self.feed.label(s) for s in streams}
        for _, key, change in changes:
            where = ""
            if several:
                world = len({s.rank for s in streams if s.run == key[0]})
                where = names.get(key, key[0]) + (f" r{key[1]}" if world > 1 else "")
            for log in logs:
                log.add(change, where)

    def _take_alert_changes(self) -> None:
        changes = self.feed.new_changes(self._seen_change)
        if not changes:
            return
        self._seen_change = changes[-1][0]
        try:
            logs = [self.main_screen.alert_log]
        except LookupError:
            return
        # The side-by-side view has its log too: the alerts where the eye is.
        logs += [s.alert_log for s in self.screen_stack if isinstance(s, CompareScreen) and s.is_mounted]
        self.write_changes(logs, changes)
        critical = [c.alert for _, _, c in changes if not c.cleared and c.alert.severity == "critical"]
        for alert in critical[:TOASTS_PER_TICK]:
            # Toasts are markup: a layer named "[/]" would raise, "[@click=...]" would be an action.
            self.notify(
                escape(clean(alert.message)),
                title=f"{alert.rule.replace('_', ' ')}",
                severity="error",
                timeout=8,
                markup=True,
            )
            self.toasts += 1
        if len(critical) > TOASTS_PER_TICK:
            more = len(critical) - TOASTS_PER_TICK
            self.notify(f"and {more} more critical alerts: press a", severity="error", timeout=8)
        if critical and self.bell_on_critical:
            self.bell()

    # ------------------------------------------------------------------ actions

    def action_help(self) -> None:
        from icsmon.tui.screens.detail import DetailScreen

        bindings = [*self.BINDINGS, *MainScreen.BINDINGS, *DetailScreen.BINDINGS]
        # Only the keys that do something here: a live session lists no replay controls.
        usable = [
            b
            for b in bindings
            if not isinstance(b, Binding) or self.check_action(b.action.split("(")[0], ()) is not False
        ]
        keys = describe(usable)
        keys.append(("ctrl+p", "Command palette: jump to a layer by name"))
        self.push_screen(HelpScreen(keys))

    def jump_to_layer(self, layer: int) -> None:
        while len(self.screen_stack) > 1 and not isinstance(self.screen, MainScreen):
            self.pop_screen()
        self.main_screen.jump_to(layer)
