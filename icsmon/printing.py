"""A stream printed as text or JSON lines: the :class:`Printer`, the feed listener that drives it
and :func:`tail_endpoint`, the loop that ``tail``, ``replay --json`` and ``demo --headless`` share.
Notes go to stderr, so that ``--json`` output stays one object a line."""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from icsmon.alerts.config import Thresholds, default_engine_factory
from icsmon.errors import IcsmonError
from icsmon.feed import Feed, FeedEvents
from icsmon.render import clean, sample_json_line, sample_line
from icsmon.store import RunKey, RunState
from icsmon_agent.alerts.model import AlertChange
from icsmon_agent.protocol import Event, Sample, Schema

#: After this long with no sample, tail says it is still waiting.
WAIT_NOTE_S = 5.0


def note(message: str) -> None:
    """``icsmon: message`` on stderr (every command's notes and errors)."""
    print(f"icsmon: {message}", file=sys.stderr, flush=True)


# ANSI colours for alert lines on a terminal (NO_COLOR disables them: https://no-color.org).
_COLOURS = {"critical": "\033[1;31m", "warning": "\033[33m", "cleared": "\033[32m"}
_RESET = "\033[0m"


def use_colour(out: TextIO) -> bool:
    isatty = getattr(out, "isatty", None)
    return bool(isatty and isatty()) and not os.environ.get("NO_COLOR")


def alert_lines(change: AlertChange, colour: bool = False) -> list[str]:
    """The readable lines of one alert change: the alert with its hint, or its clearing."""
    alert = change.alert
    where = f" [{alert.run}{f' rank {alert.rank}' if alert.rank else ''}]" if alert.run else ""
    if change.cleared:
        at = f"at {alert.layer}, " if alert.layer else "at "  # a run-level alert (the loss) has none
        lines = [clean(f"  ok {alert.rule} cleared {at}step {change.step}{where}")]
        key = "cleared"
    else:
        lines = [clean(f"  !! {alert.severity:<8} {alert.message}{where}"), clean(f"     hint: {alert.hint}")]
        key = alert.severity
    if colour:
        lines[0] = _COLOURS[key] + lines[0] + _RESET
    return lines


class Printer:
    """Writes samples (and alerts, when rules are wired) to ``out``."""

    def __init__(self, out: TextIO, as_json: bool) -> None:
        self.out = out
        self.as_json = as_json
        self.samples = 0
        self.new_samples = 0  # not counting re-sent history
        self.alerts = 0  # alerts fired (not cleared) so far
        self.colour = not as_json and use_colour(out)
        self.label_runs = False  # several runs in one stream: say whose each line is

    def sample(self, sample: Sample, schema: Schema, label: str = "") -> None:
        """``label``: the run as the viewer names it (``Feed.label``), for the line's prefix."""
        if self.as_json:
            self.out.write(sample_json_line(sample, schema) + "\n")
        else:
            rank = f" r{sample.rank}" if schema.world_size > 1 else ""
            prefix = f"[{clean(label or schema.name or sample.run)}{rank}] " if self.label_runs else ""
            prefix += "(history) " if sample.replayed else ""
            self.out.write(prefix + sample_line(sample, schema) + "\n")
        self.samples += 1
        self.new_samples += not sample.replayed
        self.out.flush()

    def alert(self, change: AlertChange) -> None:
        if self.as_json:
            self.out.write(json.dumps(change.to_json()) + "\n")
        else:
            prefix = "(history) " if change.replayed and not change.active else ""
            self.out.write(prefix + "\n".join(alert_lines(change, self.colour)) + "\n")
        if not change.cleared:
            self.alerts += 1
        self.out.flush()


class TailListener(FeedEvents):
    """What ``tail`` does with what the feed hears: print it, and stop when it is done."""

    def __init__(
        self, printer: Printer, feed: Feed, count: int | None, where: str, history: bool = False
    ) -> None:
        self.printer = printer
        self.history = history
        self.feed = feed
        self.count = count
        self.where = where
        self.start = time.monotonic()
        self.warned = False
        self.said = ""  # the feed's last error, once said
        self.done = False  # count reached

    def sample(self, sample: Sample, run: RunState) -> None:
        if self.done or run.schema is None or (sample.replayed and not self.history):
            return  # the history the job re-sends on connect: the rules have it, the output does not
        self.printer.label_runs = self.printer.label_runs or len(self.feed.store.runs) > 1
        printer = self.printer
        label = self.feed.label(run) if printer.label_runs and not printer.as_json else ""
        printer.sample(sample, run.schema, label)
        if self.count is not None and self.printer.new_samples >= self.count:
            self.done = True
            self.feed.stop()

    def alert(self, key: RunKey, change: AlertChange) -> None:
        # Of the alerts a job re-sends on connect, those still in force are news to this reader;
        # the rest of its recent alert history is printed with --history, as its samples are.
        if not self.done and (not change.replayed or change.active or self.history):
            self.printer.alert(change)

    def event(self, event: Event, run: RunState) -> None:
        # On stderr, like every note: --json output stays one sample a line.
        if event.event == "forward_steps":
            note(clean(f"the job marks no step (run {event.run}): each training forward counts as one"))
        elif event.event in ("paused", "resumed"):
            step = event.detail.get("step", "?")
            note(clean(f"the job {event.event} sampling (run {event.run}, {_rank(run)}step {step})"))

    def gone(self, run: RunState, how: str) -> None:
        step = run.latest_step if run.latest_step is not None else "?"
        if how == "closed":
            note(clean(f"the job ended (run {run.run}, {_rank(run)}step {step})"))
        elif how == "died":
            pid = run.schema.pid if run.schema is not None else "?"
            note(f"the job's process (pid {pid}) is gone: it died without closing")

    def tick(self) -> None:
        if self.feed.error and self.feed.error != self.said:  # e.g. an encrypted job and no key
            note(self.feed.error)
            self.said = self.feed.error
        if not self.warned and self.printer.samples == 0 and time.monotonic() - self.start > WAIT_NOTE_S:
            note(f"no sample from {self.where} yet; waiting (Ctrl-C to stop)")
            self.warned = True


def _rank(run: RunState) -> str:
    world = run.schema.world_size if run.schema is not None else 1
    return f"rank {run.rank}/{world}, " if world > 1 else ""


def tail_endpoint(
    endpoint: str | Sequence[str],
    *,
    as_json: bool = False,
    count: int | None = None,
    timeout: float | None = None,
    out: TextIO | None = None,
    make_printer: Any = None,
    thresholds: Thresholds | None = None,
    check_pids: bool = True,
    history: bool = False,
    pids: Sequence[int] = (),
) -> int:
    """Print what ``endpoint`` (or several: the ranks of a job, runs side by side) publishes, with
    alerts, until done.

    Done: ``count`` samples, ``timeout`` seconds, or every stream heard (at least one an endpoint)
    ended or died (its pid, on this host, is gone; ``check_pids=False`` where someone else watches
    that, as the SSH watchdog does for a remote job).
    """
    out = out or sys.stdout
    printer = make_printer(out, as_json) if make_printer else Printer(out, as_json)
    endpoints = [endpoint] if isinstance(endpoint, str) else list(endpoint)
    printer.label_runs = len(endpoints) > 1
    where = " ".join(endpoints)
    feed = Feed(
        lambda: endpoints,
        engine_factory=default_engine_factory(thresholds),
        lost_after=math.inf,  # a quiet job is not over: tail waits, as the user asked
        check_pids=check_pids,
        reconnect=False,
        rules_per_sample=False,  # once a batch: a viewer behind catches up (see feed.py)
        pids=pids,
    )
    listener = feed.listener = TailListener(printer, feed, count, where, history)
    try:
        asyncio.run(asyncio.wait_for(feed.run(), timeout))
    except asyncio.TimeoutError:  # the builtin TimeoutError only from Python 3.11
        if printer.samples:
            return 0
        extra = f" ({feed.rejected} malformed frames: {feed.last_reject})" if feed.rejected else ""
        assert timeout is not None
        raise IcsmonError(f"no sample from {where} in {timeout:g} s: is the job running?{extra}") from None
    if listener.done or printer.samples:
        return 0
    if feed.died or feed.died_silent:
        raise IcsmonError("the job died before any sample arrived")
    raise IcsmonError("the job ended before any sample arrived")
