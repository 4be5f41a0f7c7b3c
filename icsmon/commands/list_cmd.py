"""``icsmon list``: the running jobs."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from icsmon.errors import TargetError
from icsmon.kept import ended_jobs
from icsmon.render import age, clean
from icsmon.targets import group_ranks
from icsmon.targets.remote import RemoteTarget
from icsmon.targets.session import exits_cleanly, hosts_of
from icsmon_agent import discovery, history
from icsmon_agent.discovery import JobInfo


def register(sub: Any) -> None:
    p = sub.add_parser(
        "list", help="list the running jobs", description="List the jobs that run the icsmon agent."
    )
    p.add_argument(
        "host", nargs="?", help="an SSH host (alias, user@host) to list jobs on; default: this machine"
    )
    p.add_argument("--json", action="store_true", help="print a JSON array, one object per job")
    p.add_argument(
        "--ended",
        action="store_true",
        help="list the jobs that ended and whose history is kept (`icsmon replay PID` plays one)",
    )
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
    print_table(rows)


def print_table(rows: Sequence[Sequence[str]]) -> None:
    """Columns padded to their widest cell; the last one runs free."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])


def print_ended(as_json: bool) -> None:
    """One line (one JSON object) per ended job whose history is kept, newest first."""
    groups = ended_jobs()
    if as_json:
        out = []
        for g in groups:
            item = g[0].to_json()
            item["ranks"] = [k.to_json() for k in g]
            out.append(item)
        print(json.dumps(out, indent=1))
        return
    if not groups:
        print(f"no ended job kept in {history.history_dir()}")
        return
    rows = [("PID", "NAME", "RANKS", "STARTED", "ENDED", "SIZE", "RUN")]
    for g in groups:
        first = g[0].job
        ends = [k.ended for k in g]
        how = "died" if any(e is None for e in ends) else age(max(e for e in ends if e is not None)) + " ago"
        ranks = f"{len(g)}/{first.world_size}" if first.world_size > 1 else "1"
        size = sum(k.size for k in g)
        rows.append(
            (
                str(first.pid),
                clean(first.name),
                ranks,
                age(first.started) + " ago",
                how,
                _mb(size),
                clean(first.run),
            )
        )
    print_table(rows)


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.0f} kB"


def run(args: argparse.Namespace) -> int:
    if args.ended:
        if args.host:
            raise TargetError("--ended lists the jobs kept on this machine; run it on the host itself")
        print_ended(args.json)
        return 0
    if args.host:
        return list_remote(args.host, args.json)
    print_jobs(discovery.read_jobs(), args.json, "on this machine")
    return 0


def list_remote(target: str, as_json: bool) -> int:
    """The jobs on one host, or on each of ``node1,node2`` (a job across nodes is one line)."""
    jobs = []
    try:
        for host in hosts_of(target):
            with exits_cleanly(), RemoteTarget(host) as remote:
                remote.open()
                jobs += remote.jobs()
    except KeyboardInterrupt:
        return 130
    print_jobs(jobs, as_json, f"on {target}")
    return 0
