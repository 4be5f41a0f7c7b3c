"""``icsmon list``: the running jobs."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from icsmon_agent import discovery
from icsmon_agent.discovery import JobInfo


def register(sub: Any) -> None:
    p = sub.add_parser(
        "list", help="list the running jobs", description="List the jobs that run the icsmon agent."
    )
    p.add_argument(
        "host", nargs="?", help="an SSH host (alias, user@host) to list jobs on; default: this machine"
    )
    p.add_argument("--json", action="store_true", help="print a JSON array, one object per job")
    p.set_defaults(func=run)


def _age(started: float) -> str:
    secs = max(0, int(time.time() - started))
    if secs < 120:
        return f"{secs}s"
    if secs < 7200:
        return f"{secs // 60}m"
    return f"{secs // 3600}h{(secs % 3600) // 60:02d}m"


def print_jobs(jobs: list[JobInfo], as_json: bool, where: str) -> None:
    if as_json:
        print(json.dumps([j.to_json() for j in jobs], indent=1))
        return
    if not jobs:
        print(f"no icsmon job running {where}")
        return
    rows = [("PID", "NAME", "RANK", "AGE", "RUN", "ENDPOINT")]
    rows += [
        (str(j.pid), j.name, f"{j.rank}/{j.world_size}", _age(j.started), j.run, j.endpoint) for j in jobs
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])


def run(args: argparse.Namespace) -> int:
    if args.host:
        from icsmon.commands.remote import list_remote

        return list_remote(args.host, args.json)
    print_jobs(discovery.read_jobs(), args.json, "on this machine")
    return 0
