"""``icsmon list``: the running jobs."""

from __future__ import annotations

import argparse
import json
from typing import Any

from icsmon.render import age, clean
from icsmon.targets import group_ranks
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


def job_json(ranks: list[JobInfo]) -> dict[str, Any]:
    """One job: its first rank's record, with every rank's pid and endpoint under ``ranks``."""
    out = ranks[0].to_json()
    out["ranks"] = [
        {"rank": j.rank, "local_rank": j.local_rank, "pid": j.pid, "host": j.host, "endpoint": j.endpoint}
        for j in ranks
    ]
    return out


def print_jobs(jobs: list[JobInfo], as_json: bool, where: str) -> None:
    """One line (one JSON object) per job, its ranks together, newest first."""
    groups = group_ranks(jobs)
    if as_json:
        print(json.dumps([job_json(g) for g in groups], indent=1))
        return
    if not groups:
        print(f"no icsmon job running {where}")
        return
    rows = [("PID", "NAME", "RANKS", "AGE", "RUN", "ENDPOINT")]
    for g in groups:
        first = g[0]
        pids = ",".join(str(j.pid) for j in g[:4]) + (f",+{len(g) - 4}" if len(g) > 4 else "")
        ranks = f"{len(g)}/{first.world_size}" if first.world_size > 1 else "1"
        more = f"  (+{len(g) - 1} more)" if len(g) > 1 else ""
        rows.append(
            (pids, clean(first.name), ranks, age(first.started), clean(first.run), first.endpoint + more)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])


def run(args: argparse.Namespace) -> int:
    if args.host:
        from icsmon.commands.remote import list_remote

        return list_remote(args.host, args.json)
    print_jobs(discovery.read_jobs(), args.json, "on this machine")
    return 0
