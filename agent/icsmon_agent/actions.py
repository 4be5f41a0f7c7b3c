"""What the job does with its own alerts, with or without a viewer: say them in its log, hand them
to the user's callback and command, and raise the stop flag ``stop_on`` asked for.

The log line is written where the alert is judged (the publisher thread); the callback and the
command run on a thread of their own behind a bounded queue, so a slow or failing one delays
nothing else. Nothing here ever runs on the training thread or raises into it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from . import history
from .alerts.model import Alert, AlertChange
from .alerts.rules import RULES

LOGGER = "icsmon"
#: The environment variable naming a command run for each alert, the alert as JSON on its stdin.
COMMAND_ENV = "ICSMON_ON_ALERT"
QUIET_ENV = "ICSMON_QUIET"
#: Alert lines in the log per minute at most; the rest are counted and said with the next line.
LINES_PER_MINUTE = 10
#: Alerts waiting for the callback and the command; past it the newest is dropped and counted.
QUEUE_MAX = 32
#: A command still running after this long is killed (and counted as failed).
COMMAND_TIMEOUT_S = 30.0
#: What ``stop_on`` may name: the rules, and ``"nonfinite"`` also for the step's own loss.
STOP_REASONS = frozenset(RULES)


def check_stop_on(stop_on: Iterable[str]) -> frozenset[str]:
    if isinstance(stop_on, str):
        raise TypeError(f"stop_on takes rule names, e.g. stop_on=({stop_on!r},), not a string")
    names = frozenset(stop_on)
    unknown = names - STOP_REASONS
    if unknown:
        raise ValueError(f"stop_on: unknown {sorted(unknown)}; choose from {sorted(STOP_REASONS)}")
    return names


class _UnlessConfigured(logging.Filter):
    """Our own stderr handler speaks only while the script has not configured logging: once it has,
    the records reach its handlers instead (they propagate), never both."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not logging.getLogger().handlers


def logger() -> logging.Logger:
    """The ``icsmon`` logger: INFO and up, to the script's logging if configured, else to stderr."""
    log = logging.getLogger(LOGGER)
    if not any(isinstance(f, _UnlessConfigured) for h in log.handlers for f in h.filters):
        handler = logging.StreamHandler()
        handler.addFilter(_UnlessConfigured())
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        log.addHandler(handler)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    return log


def alert_line(alert: Alert) -> str:
    rank = f" (rank {alert.rank})" if alert.rank else ""
    return f"{alert.severity} {alert.message}{rank}; hint: {alert.hint}"


@dataclass
class Actions:
    """Configured once by ``watch()``; :meth:`alert` is called for each alert change the job judges."""

    quiet: bool = False
    on_alert: Callable[[Alert], object] | None = None
    command: str | None = None
    stop_on: frozenset[str] = frozenset()
    clock: Callable[[], float] = time.monotonic
    stop: Alert | None = None  # the first alert of a rule in ``stop_on``
    dropped: int = 0  # alerts the callback and the command never got (queue full)
    failed: int = 0  # command runs that failed or timed out
    held_back: int = 0  # alert lines not written (rate limit), said with the next one
    _lines: deque[float] = field(default_factory=lambda: deque(maxlen=LINES_PER_MINUTE))
    _queue: queue.Queue[Alert | None] = field(default_factory=lambda: queue.Queue(QUEUE_MAX))
    _thread: threading.Thread | None = None
    _reported: set[str] = field(default_factory=set)

    @classmethod
    def from_environment(
        cls,
        *,
        quiet: bool | None,
        on_alert: Callable[[Alert], object] | None,
        stop_on: Iterable[str],
    ) -> Actions:
        if quiet is None:
            value = os.environ.get(QUIET_ENV, "")
            quiet = bool(value.strip()) and not history.switched_off(value)
        command = os.environ.get(COMMAND_ENV) or None
        return cls(quiet=quiet, on_alert=on_alert, command=command, stop_on=check_stop_on(stop_on))

    def say(self, message: str) -> None:
        """One line in the job's log (unless quiet)."""
        if not self.quiet:
            with contextlib.suppress(Exception):
                logger().info(message)

    def alert(self, change: AlertChange) -> None:
        """An alert fired or cleared in the job (the publisher thread)."""
        if change.cleared:
            return
        alert = change.alert
        if alert.rule in self.stop_on and self.stop is None:
            self.stop = alert
        if not self.quiet:
            self._log(alert)
        if self.on_alert is not None or self.command:
            try:
                self._queue.put_nowait(alert)
            except queue.Full:
                self.dropped += 1
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="icsmon-actions", daemon=True)
                self._thread.start()

    def stop_for_loss(self, step: int) -> None:
        """The step's own loss was NaN/Inf (seen before any sample of it was judged)."""
        if "nonfinite" in self.stop_on and self.stop is None:
            self.stop = Alert(
                rule="nonfinite",
                layer="",
                layer_index=0,
                step=step,
                severity="critical",
                value=float("nan"),
                message=f"nonfinite: loss at step {step}",
                hint="stop_on: the loss is NaN/Inf",
                figure="loss",
            )
            self.say(f"stopping: the loss is NaN/Inf at step {step} (stop_on)")

    def _log(self, alert: Alert) -> None:
        now = self.clock()
        if len(self._lines) == LINES_PER_MINUTE and now - self._lines[0] < 60.0:
            self.held_back += 1
            return
        self._lines.append(now)
        held, self.held_back = self.held_back, 0
        more = f" ({held} more alert lines held back)" if held else ""
        log = logger()
        with contextlib.suppress(Exception):
            log.log(
                logging.ERROR if alert.severity == "critical" else logging.WARNING, alert_line(alert) + more
            )

    def close(self, timeout: float = 1.0) -> None:
        """Let the queued actions finish for up to ``timeout`` seconds (never longer: exit waits)."""
        if self._thread is None:
            return
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the actions' thread

    def _run(self) -> None:
        while True:
            alert = self._queue.get()
            if alert is None:
                return
            if self.on_alert is not None:
                try:
                    self.on_alert(alert)
                except Exception as exc:  # the user's code: said once, never fatal
                    self._report("callback", f"on_alert raised {type(exc).__name__}: {exc}")
            if self.command:
                self._run_command(alert)

    def _run_command(self, alert: Alert) -> None:
        assert self.command is not None
        payload = json.dumps(alert.to_json()).encode() + b"\n"
        try:
            done = subprocess.run(
                self.command,
                shell=True,
                input=payload,
                stdout=subprocess.DEVNULL,
                timeout=COMMAND_TIMEOUT_S,
                check=False,
            )
            if done.returncode != 0:
                self.failed += 1
                self._report("command", f"{COMMAND_ENV} command exited {done.returncode}")
        except subprocess.TimeoutExpired:
            self.failed += 1
            self._report("command", f"{COMMAND_ENV} command ran past {COMMAND_TIMEOUT_S:g} s; killed")
        except Exception as exc:
            self.failed += 1
            self._report("command", f"{COMMAND_ENV} command failed: {exc}")

    def _report(self, key: str, message: str) -> None:
        if key in self._reported:
            return
        self._reported.add(key)
        with contextlib.suppress(Exception):
            logger().warning(f"{message} (said once; training continues)")
