"""``icsmon tail``: print a job's figures (and alerts) as they arrive, readable or as JSON lines."""

from __future__ import annotations

import argparse
import contextlib
from typing import Any, TextIO

from icsmon.alerts.config import Thresholds, add_threshold_flags, thresholds_from_args
from icsmon.commands.common import error, note, positive_int
from icsmon.printing import Printer, tail_endpoint
from icsmon.targets import describe, resolve_targets, ssh_host_of, typed_targets
from icsmon.targets.session import Watchdog, connect_all, exits_cleanly, hosts_of, open_all


def register(sub: Any) -> None:
    p = sub.add_parser(
        "tail",
        help="print a job's figures as they arrive",
        description="Print one line per sample (step, loss, the layers worth a look), or JSON lines with --json.",
        epilog="TARGET: nothing (the job on this machine, every rank of it; the most recent if several), a PID, "
        "an endpoint "
        "(ipc://PATH, tcp://HOST:PORT), or an SSH host (alias or user@host).",
    )
    p.add_argument(
        "target",
        nargs="*",
        metavar="TARGET",
        help="PID, run, endpoint or SSH host (several: side by side); default: the local job",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line, flushed as written")
    p.add_argument("--count", "-n", type=positive_int, metavar="N", help="exit after N new samples")
    p.add_argument(
        "--history",
        action="store_true",
        help='first print the recent samples the job re-sends on connect, marked ("replayed": true)',
    )
    p.add_argument("--timeout", type=float, metavar="S", help="exit after S seconds (1 if no sample arrived)")
    p.add_argument("--pid", type=int, help="with an SSH host: the job's pid there")
    p.add_argument("--run", help="the job's run id or name (when several run)")
    p.add_argument(
        "--rank", type=int, metavar="N", help="follow rank N only (default: every rank of the job)"
    )
    p.add_argument("--key", metavar="KEY", help="the job's CURVE key, for a tcp:// endpoint beyond loopback")
    add_threshold_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    thresholds = thresholds_from_args(args)
    targets = typed_targets(args.target, args.key)
    host = ssh_host_of(targets)
    if host is not None:
        return tail_remote(host, args, thresholds)
    resolved = resolve_targets(targets, pid=args.pid, run=args.run, rank=args.rank)
    if resolved.note:
        note(resolved.note)
    try:
        return tail_endpoint(
            resolved.endpoints,
            as_json=args.json,
            count=args.count,
            timeout=args.timeout,
            thresholds=thresholds,
            history=args.history,
            pids=[job.pid for job in resolved.jobs],
        )
    except KeyboardInterrupt:
        return 0


def tail_remote(target: str, args: argparse.Namespace, thresholds: Thresholds) -> int:
    """The job on an SSH host (or on each of ``node1,node2``), through forwards, watched by a
    watchdog that ends the tail when the link or the job is gone."""
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
                        thresholds=thresholds,
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
    except KeyboardInterrupt:
        return 130
