"""The life of a command's SSH targets: each host's master connection opened in the foreground
(prompts happen there, before any output or app), a watchdog on the link and the remote job while
the command runs, and everything torn down on the way out, whatever the way out is: done, an error,
Ctrl-C, SIGTERM or a closed terminal (SIGHUP)."""

from __future__ import annotations

import _thread
import argparse
import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

from icsmon.targets.remote import RemoteTarget

WATCH_EVERY_S = 2.0  # how often the watchdog checks the link and the remote job


@contextlib.contextmanager
def exits_cleanly() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into SystemExit, so the ``finally`` that ends the ssh master runs."""

    def leave(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.signal(s, leave) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


class Watchdog:
    """Checks the SSH link and the remote job while `tail` runs; interrupts it when either is gone.

    The subscriber alone cannot tell: through a dead forward ZeroMQ just reconnects quietly, and a
    killed job never says goodbye.
    """

    def __init__(self, remotes: list[RemoteTarget]) -> None:
        self.remotes = remotes  # each with its job chosen (connect() was called)
        self.reason: str | None = None  # "dropped" or "ended" once it fired
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="icsmon-ssh-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(WATCH_EVERY_S):
            if not all(remote.conn.alive() for remote in self.remotes):
                self._fire("dropped")
            elif all(
                remote.job is None or remote.job_state(remote.job) == "ended" for remote in self.remotes
            ):
                self._fire("ended")  # with several hosts: once the job ended on all of them
            if self.reason:
                return

    def _fire(self, reason: str) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            self.reason = reason
            _thread.interrupt_main()  # a KeyboardInterrupt in tail's loop, within one poll tick

    def stop(self) -> None:
        with self._lock:
            self._stop.set()
        # Short: a check still in flight cannot fire any more (the lock), and it ends at once when
        # the master it asks is closed, which is what the caller does next.
        self._thread.join(timeout=3)


def hosts_of(target: str) -> list[str]:
    """``node1,node2`` (one job across nodes) as its hosts; one host as itself."""
    return [h for h in target.split(",") if h]


def open_all(hosts: list[str], args: argparse.Namespace, stack: contextlib.ExitStack) -> list[RemoteTarget]:
    """Open an SSH master to each host, in the foreground (prompts happen here, one host at a time)."""
    remotes = []
    for host in hosts:
        remote = stack.enter_context(RemoteTarget(host, pid=args.pid, run=args.run, rank=args.rank))
        remote.open()
        remotes.append(remote)
    return remotes


def connect_all(remotes: list[RemoteTarget]) -> list[str]:
    """Every host's chosen job (all its ranks there), forwarded here."""
    endpoints: list[str] = []
    for remote in remotes:
        endpoints += remote.connect()
    return endpoints
