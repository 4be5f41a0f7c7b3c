"""``icsmon attach``: open the terminal app on a job (this machine, a PID, an endpoint or an SSH host)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from icsmon.alerts.config import add_threshold_flags, thresholds_from_args
from icsmon.commands.common import error
from icsmon.targets import TargetError, is_endpoint, resolve_local
from icsmon_agent import discovery
from icsmon_agent.discovery import JobInfo


def register(sub: Any) -> None:
    p = sub.add_parser(
        "attach",
        help="open the live terminal app on a job",
        description="Open the terminal app: every layer's figures live, the alerts, a heatmap of the "
        "network, plots of one layer. Keys: q quit, ? help, / filter, s sort, p pause, a alerts, "
        "Enter detail, h heatmap, ctrl+p jump to a layer.",
        epilog="TARGET: nothing (the job on this machine: several open a picker, none a waiting screen "
        "that attaches as soon as one starts), a PID, an endpoint (ipc://PATH, tcp://HOST:PORT), or an "
        "SSH host (alias or user@host).",
    )
    p.add_argument("target", nargs="?", metavar="TARGET", help="PID, endpoint or SSH host; default: local")
    p.add_argument("--pid", type=int, help="the job's pid (on the SSH host, with a host)")
    p.add_argument("--run", help="the job's run id or name (when several run)")
    p.add_argument("--theme", help="a colour theme, e.g. nord, gruvbox, dracula, textual-light")
    p.add_argument("--bell", action="store_true", help="ring the terminal bell on every new critical alert")
    _add_threshold_flags(p)
    p.set_defaults(func=run)


def _add_threshold_flags(p: argparse.ArgumentParser) -> None:
    add_threshold_flags(p)


def _thresholds(args: argparse.Namespace) -> Any:
    return thresholds_from_args(args)


def is_ssh_host(target: str | None) -> bool:
    return target is not None and target != "" and not target.isdigit() and not is_endpoint(target)


def local_connect(target: str | None, pid: int | None, run_id: str | None) -> Callable[[], str]:
    """What the app calls to (re)find the job: re-resolved each time, so a restarted job is found."""
    if pid is not None and target is None:
        target = str(pid)

    def connect() -> str:
        return resolve_local(target, run=run_id).endpoint

    return connect


def connect_job(job: JobInfo) -> str:
    """After the picker: the same job by run id; if it restarted (new run id), the newest of its name."""
    for key in (job.run, job.name):
        try:
            return resolve_local(None, run=key).endpoint
        except TargetError:
            continue
    raise TargetError(f"{job.name} (run {job.run}) is not running; waiting for it to come back")


def run(args: argparse.Namespace) -> int:
    from icsmon import tui

    if args.theme is not None and args.theme not in tui.theme_names():
        return error(f"unknown theme {args.theme!r}; choose one of: {', '.join(tui.theme_names())}")
    if is_ssh_host(args.target):
        from icsmon.commands.remote import attach_remote

        return attach_remote(args)
    if args.target is not None and args.target.isdigit() and args.pid is not None:
        return error("give the PID once: as TARGET or with --pid")
    if args.target and is_endpoint(args.target):
        try:
            resolve_local(args.target)  # a typo in an ipc path is an error now, not a wait forever
        except TargetError as exc:
            return error(str(exc))
    pid = int(args.target) if args.target and args.target.isdigit() else args.pid
    if pid is not None and not discovery.pid_alive(pid):
        return error(f"no process with pid {pid} on this machine; `icsmon list` shows the running jobs")
    connect = local_connect(args.target, args.pid, args.run)
    explicit = args.target is not None or args.pid is not None or args.run is not None
    jobs = None if explicit else discovery.read_jobs
    if not sys.stdout.isatty():
        return error("attach needs a terminal; `icsmon tail` prints figures as text")
    return tui.run_app(
        connect,
        title="",
        thresholds=_thresholds(args),
        theme=args.theme,
        bell=args.bell,
        jobs=jobs,
        connect_job=connect_job,
    )
