"""Turn what the user typed (nothing, a PID, an endpoint) into an endpoint to subscribe to."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from icsmon_agent import discovery
from icsmon_agent.discovery import JobInfo


class TargetError(Exception):
    """The target cannot be resolved; the message says what to do."""


@dataclass
class Resolved:
    endpoint: str
    job: JobInfo | None = None
    note: str = ""  # something worth saying on stderr (several jobs, which one was taken)


def is_endpoint(text: str) -> bool:
    return text.startswith(("ipc://", "tcp://", "inproc://"))


def describe(job: JobInfo) -> str:
    return f"{job.name} (pid {job.pid}, run {job.run}, rank {job.rank})"


def pick_job(jobs: list[JobInfo], *, pid: int | None = None, run: str | None = None, where: str) -> Resolved:
    """Choose among discovered jobs: by pid, by run or name, else the most recent (saying so)."""
    if pid is not None:
        jobs = [j for j in jobs if j.pid == pid]
        if not jobs:
            raise TargetError(f"no icsmon job with pid {pid} {where}; `icsmon list` shows the running ones")
    if run is not None:
        jobs = [j for j in jobs if run in (j.run, j.name)]
        if not jobs:
            raise TargetError(f"no icsmon job named or with run id {run!r} {where}; `icsmon list` shows them")
    if not jobs:
        raise TargetError(
            f"no icsmon job is running {where}. Start one with `icsmon_agent.watch(model)` in the training "
            "script, or try `icsmon demo`"
        )
    job = jobs[0]  # newest first
    note = ""
    if len(jobs) > 1:
        note = f"{len(jobs)} jobs running {where}; taking the most recent: {describe(job)}. Name one by PID to choose."
    return Resolved(job.endpoint, job, note)


def resolve_local(
    target: str | None, *, runtime: Path | None = None, run: str | None = None, pid: int | None = None
) -> Resolved:
    if target and is_endpoint(target):
        if target.startswith("ipc://"):
            path = target[len("ipc://") :]
            if not os.path.exists(path):
                raise TargetError(f"no socket at {path}: the job has ended or the endpoint is wrong")
        return Resolved(target)
    jobs = discovery.read_jobs(runtime)
    where = "on this machine"
    if target is None:
        return pick_job(jobs, pid=pid, run=run, where=where)
    if target.isdigit():
        return pick_job(jobs, pid=int(target), run=run, where=where)
    raise TargetError(f"{target!r} is not a PID or an endpoint (ipc://PATH, tcp://HOST:PORT)")
