"""``icsmon list|tail|attach HOST``: the same commands against a GPU box reached over SSH.

Each one opens the SSH master in the foreground first (prompts happen here, before any output or
TUI), works through it, and tears everything down on the way out, whatever the way out is: done,
an error, Ctrl-C, SIGTERM or a closed terminal (SIGHUP).
"""

from __future__ import annotations

import _thread
import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import TextIO

from icsmon.alerts.config import thresholds_from_args
from icsmon.commands.common import error, note
from icsmon.commands.list_cmd import print_jobs
from icsmon.commands.tail import Printer, tail_endpoint
from icsmon.ssh_target import ForwardRefused, RemoteTarget
from icsmon.targets import TargetError, describe

WATCH_EVERY_S = 2.0  # how often `tail` checks the link and the remote job


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


def list_remote(target: str, as_json: bool) -> int:
    """The jobs on one host, or on each of ``node1,node2`` (a job across nodes is one line)."""
    jobs = []
    try:
        for host in hosts_of(target):
            with exits_cleanly(), RemoteTarget(host) as remote:
                remote.open()
                jobs += remote.jobs()
    except TargetError as exc:
        return error(str(exc))
    except KeyboardInterrupt:
        return 130
    print_jobs(jobs, as_json, f"on {target}")
    return 0


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


def tail_remote(target: str, args: argparse.Namespace) -> int:
    printers: list[Printer] = []
    hosts = hosts_of(target)

    def make_printer(out: TextIO, as_json: bool) -> Printer:
        printers.append(Printer(out, as_json))
        return printers[-1]

    try:
        with exits_cleanly(), contextlib.ExitStack() as stack:
            remotes = open_all(hosts, args, stack)
            endpoints = connect_all(remotes)
            for remote in remotes:
                if remote.note:
                    note(remote.note)
            jobs = [f"{describe(r.job)} on {r.host}" for r in remotes if r.job is not None]
            watchdog = Watchdog(remotes)
            try:
                try:
                    return tail_endpoint(
                        endpoints,
                        as_json=args.json,
                        count=args.count,
                        timeout=args.timeout,
                        make_printer=make_printer,
                        # the same alert thresholds as a local tail (flags checked by tail already)
                        thresholds=thresholds_from_args(args),
                        check_pids=False,  # the watchdog asks the remote host instead
                        history=args.history,
                    )
                finally:
                    watchdog.stop()
            except KeyboardInterrupt:
                if watchdog.reason is None:
                    return 0  # Ctrl-C, as for a local tail
            printed = printers[0].samples if printers else 0
            if watchdog.reason == "ended":
                if printed:
                    note(f"the job ended: {'; '.join(jobs)}")
                    return 0
                return error(f"the job {'; '.join(jobs)} ended before any sample arrived")
            return error(
                f"the SSH connection to {target} dropped after {printed} samples; "
                f"run the command again once `ssh {hosts[0]}` works"
            )
    except TargetError as exc:
        return error(str(exc))
    except KeyboardInterrupt:
        return 130


def attach_remote(args: argparse.Namespace) -> int:
    target: str = args.target
    hosts = hosts_of(target)
    if not sys.stdout.isatty():
        return error(f"attach needs a terminal; `icsmon tail {target}` prints figures as text")
    from icsmon import tui

    try:
        with exits_cleanly(), contextlib.ExitStack() as stack:
            remotes = open_all(hosts, args, stack)  # prompts, if any, on the terminal, before the app
            if len(remotes) > 1:
                return tui.run_app(
                    lambda: connect_all(remotes),
                    title=f"icsmon · {target}",
                    thresholds=_thresholds(args),
                    theme=args.theme,
                    bell=args.bell,
                )
            remote = remotes[0]
            listing = remote.jobs()
            if len(listing) <= 1 or args.pid is not None or args.run is not None:
                # One try now: a refused forward will not get better by waiting, so say it here.
                # Other failures (no job yet, it ended) are the app's waiting screen.
                with contextlib.suppress(TargetError):
                    try:
                        remote.connect()
                    except ForwardRefused as exc:
                        return error(str(exc))
            picker = args.pid is None and args.run is None and args.rank is None
            return tui.run_app(
                remote.connect,
                title=f"icsmon · {remote.host}",
                thresholds=_thresholds(args),
                theme=args.theme,
                bell=args.bell,
                jobs=(lambda: listing) if picker else None,
                connect_job=remote.connect_job,
            )
    except TargetError as exc:
        return error(str(exc))
    except KeyboardInterrupt:
        return 130


def _thresholds(args: argparse.Namespace) -> object:
    # The same flags as a local attach; the attach command owns how they are read.
    from icsmon.commands import attach

    return attach._thresholds(args)
