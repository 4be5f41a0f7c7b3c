"""``icsmon tail``: print a job's figures (and alerts) as they arrive, readable or as JSON lines."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from icsmon.alerts.config import ConfigError, Thresholds, add_threshold_flags, thresholds_from_args
from icsmon.alerts.engine import AlertEngine
from icsmon.alerts.model import AlertChange
from icsmon.commands.common import error, note, positive_int
from icsmon.render import sample_json, sample_line
from icsmon.store import Store
from icsmon.subscriber import Subscriber
from icsmon.targets import TargetError
from icsmon_agent.discovery import pid_alive
from icsmon_agent.protocol import Event, Sample, Schema

WAIT_NOTE_S = 5.0
LOST_CHECK_S = 1.0
HOST = socket.gethostname()


def died(store: Store, ended: set[tuple[str, int]]) -> list[tuple[str, int]]:
    """Runs on this host whose process is gone without a closing event (killed, crashed)."""
    gone = []
    for key, run in store.runs.items():
        schema = run.schema
        if key in ended or run.ended or schema is None or not schema.pid or schema.host != HOST:
            continue
        if not pid_alive(schema.pid):
            gone.append(key)
    return gone


def pid_of(store: Store, key: tuple[str, int]) -> int:
    run = store.runs[key]
    return run.schema.pid if run.schema is not None else 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "tail",
        help="print a job's figures as they arrive",
        description="Print one line per sample (step, loss, the layers worth a look), or JSON lines with --json.",
        epilog="TARGET: nothing (the job on this machine; the most recent if several), a PID, an endpoint "
        "(ipc://PATH, tcp://HOST:PORT), or an SSH host (alias or user@host).",
    )
    p.add_argument(
        "target", nargs="?", metavar="TARGET", help="PID, endpoint or SSH host; default: the local job"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line, flushed as written")
    p.add_argument("--count", "-n", type=positive_int, metavar="N", help="exit after N samples")
    p.add_argument("--timeout", type=float, metavar="S", help="exit after S seconds (1 if no sample arrived)")
    p.add_argument("--pid", type=int, help="with an SSH host: the job's pid there")
    p.add_argument("--run", help="the job's run id or name (when several run)")
    add_threshold_flags(p)
    p.set_defaults(func=run)


# ANSI colours for alert lines on a terminal (NO_COLOR disables them: https://no-color.org).
_COLOURS = {"critical": "\033[1;31m", "warning": "\033[33m", "cleared": "\033[32m"}
_RESET = "\033[0m"


def use_colour(out: TextIO) -> bool:
    isatty = getattr(out, "isatty", None)
    return bool(isatty and isatty()) and not os.environ.get("NO_COLOR")


def alert_lines(change: AlertChange, colour: bool = False) -> list[str]:
    """The readable lines of one alert change: the alert with its hint, or its clearing."""
    alert = change.alert
    where = f" [{alert.run}]" if alert.run else ""
    if change.cleared:
        lines = [f"  ok {alert.rule} cleared at {alert.layer}, step {change.step}{where}"]
        key = "cleared"
    else:
        lines = [f"  !! {alert.severity:<8} {alert.message}{where}", f"     hint: {alert.hint}"]
        key = alert.severity
    if colour:
        lines[0] = _COLOURS[key] + lines[0] + _RESET
    return lines


class Printer:
    """Writes samples (and alerts, when rules are wired) to ``out``."""

    def __init__(self, out: TextIO, as_json: bool, engine: Any = None) -> None:
        self.out = out
        self.as_json = as_json
        self.engine = engine
        self.samples = 0
        self.alerts = 0  # alerts fired (not cleared) so far
        self.colour = not as_json and use_colour(out)
        self.label_runs = False  # several runs in one stream: say whose each line is

    def sample(self, sample: Sample, schema: Schema) -> None:
        if self.as_json:
            self.out.write(json.dumps(sample_json(sample, schema)) + "\n")
        else:
            prefix = f"[{schema.name or sample.run}] " if self.label_runs else ""
            self.out.write(prefix + sample_line(sample, schema) + "\n")
        self.samples += 1
        self.out.flush()

    def alert(self, change: AlertChange) -> None:
        if self.as_json:
            self.out.write(json.dumps(change.to_json()) + "\n")
        else:
            self.out.write("\n".join(alert_lines(change, self.colour)) + "\n")
        if not change.cleared:
            self.alerts += 1
        self.out.flush()


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
) -> int:
    """Print what ``endpoint`` (or several, one job each) publishes, with alerts, until done.

    Done: ``count`` samples, ``timeout`` seconds, or every job ended (one closing run per endpoint)
    or died (its pid, on this host, is gone; ``check_pids=False`` where someone else watches that,
    as the SSH watchdog does for a remote job).
    """
    out = out or sys.stdout
    printer = make_printer(out, as_json) if make_printer else Printer(out, as_json)
    endpoints = [endpoint] if isinstance(endpoint, str) else list(endpoint)
    printer.label_runs = len(endpoints) > 1
    engine = AlertEngine(thresholds)
    ended: set[tuple[str, int]] = set()
    store = Store()
    start = time.monotonic()
    until = None if timeout is None else start + timeout
    warned = False
    next_check = 0.0
    where = " ".join(endpoints)
    with Subscriber(endpoints) as sub:
        for batch in sub.messages(until):
            for msg in batch:
                run = store.get(msg.run, msg.rank)
                before = run.count if run is not None else 0
                new = store.add(msg)
                state = store.get(msg.run, msg.rank)
                assert state is not None
                if isinstance(msg, Sample) and state.count > before and state.schema is not None:
                    printer.sample(msg, state.schema)
                    for change in engine.update(state):
                        printer.alert(change)
                    if count is not None and printer.samples >= count:
                        return 0
                if isinstance(msg, Event) and msg.event == "forward_steps" and new:
                    note(f"the job marks no step (run {msg.run}): each training forward counts as one")
                if isinstance(msg, Event) and msg.event in ("paused", "resumed") and new:
                    # On stderr, like every note: --json output stays one sample a line.
                    note(f"the job {msg.event} sampling (run {msg.run}, step {msg.detail.get('step', '?')})")
                if isinstance(msg, Event) and msg.event == "closing" and state.ended:
                    ended.add((msg.run, msg.rank))
                    if len(ended) < len(endpoints):
                        continue
                    if printer.samples:
                        note(f"the job ended (run {msg.run}, step {msg.detail.get('step', '?')})")
                        return 0
                    return error("the job ended before any sample arrived")
            now = time.monotonic()
            if check_pids and now >= next_check:
                next_check = now + LOST_CHECK_S
                for key in died(store, ended):
                    ended.add(key)
                    note(f"the job's process (pid {pid_of(store, key)}) is gone: it died without closing")
                if ended and len(ended) >= len(endpoints):
                    return 0 if printer.samples else error("the job died before any sample arrived")
            if (
                not warned
                and printer.samples == 0
                and time.monotonic() - start > WAIT_NOTE_S
                and until is None
            ):
                note(f"no sample from {where} yet; waiting (Ctrl-C to stop)")
                warned = True
    if printer.samples:
        return 0
    extra = f" ({sub.rejected} malformed frames: {sub.last_error})" if sub.rejected else ""
    return error(f"no sample from {where} in {timeout:g} s: is the job running?{extra}")


def run(args: argparse.Namespace) -> int:
    try:
        thresholds = thresholds_from_args(args)
    except ConfigError as exc:
        return error(str(exc))
    target = args.target
    try:
        from icsmon.targets import is_endpoint, resolve_local

        if target and not target.isdigit() and not is_endpoint(target):
            from icsmon.commands.remote import tail_remote

            return tail_remote(target, args)
        resolved = resolve_local(target, run=args.run, pid=args.pid)
    except TargetError as exc:
        return error(str(exc))
    if resolved.note:
        note(resolved.note)
    try:
        return tail_endpoint(
            resolved.endpoint,
            as_json=args.json,
            count=args.count,
            timeout=args.timeout,
            thresholds=thresholds,
        )
    except KeyboardInterrupt:
        return 0
