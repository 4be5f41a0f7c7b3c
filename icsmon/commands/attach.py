"""``icsmon attach``: open the terminal app on a job (this machine, a PID, an endpoint or an SSH host)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from typing import Any

from icsmon.alerts.config import Thresholds, add_threshold_flags, thresholds_from_args
from icsmon.commands.common import error
from icsmon.targets import (
    TargetError,
    is_endpoint,
    resolve_local,
    resolve_targets,
    ssh_host_of,
    typed_targets,
)
from icsmon.targets.remote import ForwardRefused
from icsmon.targets.session import connect_all, exits_cleanly, hosts_of, open_all
from icsmon_agent import discovery
from icsmon_agent.discovery import JobInfo


def register(sub: Any) -> None:
    p = sub.add_parser(
        "attach",
        help="open the live terminal app on a job (or several side by side)",
        description="Open the terminal app: every layer's figures live, the alerts, a heatmap of the "
        "network, plots of one layer. Keys: q quit, ? help, / filter, s sort, p pause, a alerts, "
        "Enter detail, h heatmap, c compare runs and ranks side by side, tab next run or rank, "
        "ctrl+p jump to a layer.",
        epilog="TARGET: nothing (the job on this machine, every rank of it: several jobs open a picker, none "
        "a waiting screen that attaches as soon as one starts), PIDs, run ids or names (several: side by "
        "side), endpoints (ipc://PATH, tcp://HOST:PORT), or one SSH host (alias or user@host).",
    )
    p.add_argument(
        "target", nargs="*", metavar="TARGET", help="PID, run, endpoint or SSH host; default: local"
    )
    p.add_argument("--pid", type=int, help="the job's pid (on the SSH host, with a host)")
    p.add_argument("--run", help="the job's run id or name (when several run)")
    p.add_argument("--rank", type=int, metavar="N", help="rank N only (default: every rank of the job)")
    p.add_argument("--key", metavar="KEY", help="the job's CURVE key, for a tcp:// endpoint beyond loopback")
    p.add_argument("--theme", help="a colour theme, e.g. nord, gruvbox, dracula, textual-light")
    p.add_argument("--bell", action="store_true", help="ring the terminal bell on every new critical alert")
    add_threshold_flags(p)
    p.set_defaults(func=run)


def local_connect(
    targets: list[str], pid: int | None, run_id: str | None, rank: int | None = None
) -> Callable[[], list[str]]:
    """What the app calls to (re)find the jobs: re-resolved each time, so a restarted job is found."""
    return lambda: resolve_targets(targets, pid=pid, run=run_id, rank=rank).endpoints


def connect_jobs(jobs: list[JobInfo]) -> list[str]:
    """After the picker: each job by run id; if it restarted (new run id), the newest of its name."""
    endpoints: list[str] = []
    for job in jobs:
        for key in (job.run, job.name):
            try:
                endpoints += resolve_local(None, run=key).endpoints
                break
            except TargetError:
                continue
    if not endpoints:
        names = ", ".join(f"{j.name} (run {j.run})" for j in jobs)
        raise TargetError(f"{names} is not running; waiting for it to come back")
    return endpoints


def run(args: argparse.Namespace) -> int:
    from icsmon import tui

    if args.theme is not None and args.theme not in tui.theme_names():
        return error(f"unknown theme {args.theme!r}; choose one of: {', '.join(tui.theme_names())}")
    thresholds = thresholds_from_args(args)
    targets = typed_targets(args.target, args.key)
    host = ssh_host_of(targets)
    if host is not None:
        return attach_remote(host, args, thresholds)
    if any(t.isdigit() for t in targets) and args.pid is not None:
        return error("give the PID once: as TARGET or with --pid")
    for target in targets:
        if is_endpoint(target):
            resolve_local(target)  # a typo in an ipc path is an error now, not a wait forever
        if target.isdigit() and not discovery.pid_alive(int(target)):
            return error(
                f"no process with pid {target} on this machine; `icsmon list` shows the running jobs"
            )
    if args.pid is not None and not discovery.pid_alive(args.pid):
        return error(f"no process with pid {args.pid} on this machine; `icsmon list` shows the running jobs")
    connect = local_connect(targets, args.pid, args.run, args.rank)
    explicit = bool(targets) or args.pid is not None or args.run is not None or args.rank is not None
    jobs = None if explicit else discovery.read_jobs
    if not sys.stdout.isatty():
        return error("attach needs a terminal; `icsmon tail` prints figures as text")
    return tui.run_app(
        connect,
        title="",
        thresholds=thresholds,
        theme=args.theme,
        bell=args.bell,
        jobs=jobs,
        connect_job=connect_jobs,
        compare=len(targets) > 1,
    )


def attach_remote(target: str, args: argparse.Namespace, thresholds: Thresholds) -> int:
    """The app on an SSH host's job: the master opened first (prompts on the terminal, before the
    app), a picker when the host runs several jobs."""
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
                    thresholds=thresholds,
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
                thresholds=thresholds,
                theme=args.theme,
                bell=args.bell,
                jobs=(lambda: listing) if picker else None,
                connect_job=remote.connect_job,
            )
    except KeyboardInterrupt:
        return 130
