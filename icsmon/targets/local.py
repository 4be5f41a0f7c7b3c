"""Turn what the user typed (nothing, a PID, an endpoint) into an endpoint to subscribe to."""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path

from icsmon.endpoint import Endpoint
from icsmon.errors import TargetError
from icsmon_agent import discovery
from icsmon_agent.discovery import JobInfo


@dataclass
class Resolved:
    """What to subscribe to: one endpoint per rank of the chosen job (one, for a plain endpoint)."""

    endpoints: list[str]
    jobs: list[JobInfo] = field(default_factory=list)
    note: str = ""  # something worth saying on stderr (several jobs, which one was taken)

    @property
    def job(self) -> JobInfo | None:
        return self.jobs[0] if self.jobs else None


def is_endpoint(text: str) -> bool:
    return text.startswith(("ipc://", "tcp://", "inproc://"))


def as_endpoint(target: str) -> str:
    """A socket path typed without its scheme (``/run/x.sock``, ``./x.sock``) as the ipc:// endpoint
    it names; anything else as it is."""
    if target.startswith(("/", "./", "../", "~")):
        return "ipc://" + os.path.abspath(os.path.expanduser(target))
    return target


def typed_targets(typed: list[str], key: str | None = None) -> list[str]:
    """The targets as typed, socket paths made endpoints; a ``--key`` given is the key of each
    tcp:// one (a job beyond loopback speaks CURVE)."""
    targets = [as_endpoint(t) for t in typed]
    return [Endpoint(t, key) if key and t.startswith("tcp://") else t for t in targets]


def is_local_run(target: str, runtime: Path | None = None) -> bool:
    return any(target in (job.run, job.name) for job in discovery.read_jobs(runtime))


def is_ssh_host(target: str) -> bool:
    """Neither a PID, an endpoint nor the run id or name of a job on this machine: an SSH host."""
    return bool(target) and not target.isdigit() and not is_endpoint(target) and not is_local_run(target)


def ssh_host_of(targets: list[str]) -> str | None:
    """The SSH host among the targets, for a command that follows one host at a time (None: the
    targets are all local); a host beside anything else is a usage error."""
    hosts = [t for t in targets if is_ssh_host(t)]
    if hosts and len(targets) > 1:
        raise TargetError(f"one SSH host at a time ({', '.join(hosts)} and more given)")
    return hosts[0] if hosts else None


def describe(job: JobInfo) -> str:
    return f"{job.name} (pid {job.pid}, run {job.run}, rank {job.rank})"


def group_ranks(jobs: list[JobInfo]) -> list[list[JobInfo]]:
    """Processes grouped by job (run id), newest job first, each group in rank order."""
    groups: dict[str, list[JobInfo]] = {}
    for job in jobs:
        groups.setdefault(job.run, []).append(job)
    ordered = sorted(groups.values(), key=lambda g: max(j.started for j in g), reverse=True)
    return [sorted(g, key=lambda j: j.rank) for g in ordered]


def pick_job(
    jobs: list[JobInfo],
    *,
    pid: int | None = None,
    run: str | None = None,
    rank: int | None = None,
    where: str,
) -> Resolved:
    """Choose among discovered processes: by pid, by run or name, else the most recent job; every
    rank of it unless ``rank`` (or a pid) names one."""
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
    groups = group_ranks(jobs)
    chosen = groups[0]
    if rank is not None:
        chosen = [j for j in chosen if j.rank == rank]
        if not chosen:
            ranks = ", ".join(str(j.rank) for j in groups[0])
            raise TargetError(f"the job {groups[0][0].run} {where} has no rank {rank} (it has {ranks})")
    note = ""
    if len(groups) > 1:
        note = (
            f"{len(groups)} jobs running {where}; taking the most recent: {describe(chosen[0])}. "
            "Name one by PID or --run to choose."
        )
    return Resolved([Endpoint(j.endpoint, j.key) for j in chosen], chosen, note)


def check_socket(path: str) -> None:
    """A socket that this user may connect to, or a TargetError that says what is wrong with it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise TargetError(f"no socket at {path}: the job has ended or the endpoint is wrong") from None
    except PermissionError:
        raise TargetError(f"permission denied: {path} is in another user's directory") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise TargetError(f"{path} is not a socket (a job's socket is listed by `icsmon list`)")
    if not os.access(path, os.R_OK | os.W_OK):
        raise TargetError(f"permission denied: the socket {path} belongs to another user (uid {st.st_uid})")


def resolve_local(
    target: str | None,
    *,
    runtime: Path | None = None,
    run: str | None = None,
    pid: int | None = None,
    rank: int | None = None,
) -> Resolved:
    if target and is_endpoint(target):
        if target.startswith("ipc://"):
            check_socket(target[len("ipc://") :])
        return Resolved([target])
    directory = runtime or discovery.runtime_dir()
    if directory.exists():
        try:
            discovery.check_private_dir(directory)
        except OSError as exc:
            raise TargetError(f"not reading the jobs in {directory}: {exc}") from None
    jobs = discovery.read_jobs(runtime)
    where = "on this machine"
    if target is None:
        return pick_job(jobs, pid=pid, run=run, rank=rank, where=where)
    if target.isdigit():
        return pick_job(jobs, pid=int(target), run=run, rank=rank, where=where)
    raise TargetError(f"{target!r} is not a PID or an endpoint (ipc://PATH, tcp://HOST:PORT)")


def live_endpoints(jobs: list[JobInfo]) -> list[str]:
    """The endpoints of those of ``jobs`` that still run: a job that ended has no publisher left,
    and subscribing would wait for it in silence.

    Ended: discovery no longer lists it. Its file goes when the agent closes, or when a reader finds
    its pid dead; the pid alone would not do, since a child that its parent has not reaped yet (the
    demo's finished runs) still answers kill -0. Jobs of another host are taken as they are.
    """
    here = socket.gethostname()
    live = {j.endpoint for j in discovery.read_jobs()}
    endpoints: list[str] = [Endpoint(j.endpoint, j.key) for j in jobs if j.host != here or j.endpoint in live]
    if not endpoints:
        raise TargetError(f"{describe(jobs[0])} has ended; its figures ended with it. q quits.")
    return endpoints


def resolve_targets(
    targets: list[str],
    *,
    pid: int | None = None,
    run: str | None = None,
    rank: int | None = None,
    runtime: Path | None = None,
) -> Resolved:
    """Several local targets at once (PIDs, run ids or names, endpoints; none: the newest job),
    every rank of each unless ``rank`` names one; their endpoints, without repeats."""
    if pid is not None and not targets:
        targets = [str(pid)]
    endpoints: list[str] = []
    jobs: list[JobInfo] = []
    notes: list[str] = []
    wanted: list[str | None] = list(targets) or [None]
    for target in wanted:
        if target is not None and not target.isdigit() and not is_endpoint(target):
            one = resolve_local(None, run=target, rank=rank, runtime=runtime)
        else:
            one = resolve_local(target, run=run, rank=rank, runtime=runtime)
        endpoints += [e for e in one.endpoints if e not in endpoints]
        jobs += one.jobs
        notes += [one.note] if one.note else []
    return Resolved(endpoints, jobs, " ".join(notes))
