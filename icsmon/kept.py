"""The jobs' kept histories as the viewer sees them: which ended jobs there are (``icsmon list
--ended``) and which recordings a PID, run or name means (``icsmon replay``)."""

from __future__ import annotations

from pathlib import Path

from icsmon.errors import TargetError
from icsmon_agent import history
from icsmon_agent.history import KeptJob


def kept_jobs(directory: Path | None = None) -> list[list[KeptJob]]:
    """Every kept job, its ranks together (rank order), newest job first."""
    groups: dict[str, list[KeptJob]] = {}
    for kept in history.read(directory):
        groups.setdefault(kept.job.run, []).append(kept)
    ordered = sorted(groups.values(), key=lambda g: max(k.job.started for k in g), reverse=True)
    return [sorted(g, key=lambda k: k.job.rank) for g in ordered]


def ended_jobs(directory: Path | None = None) -> list[list[KeptJob]]:
    """The kept jobs none of whose ranks still runs."""
    return [g for g in kept_jobs(directory) if not any(k.alive for k in g)]


def recordings_of(target: str, directory: Path | None = None) -> list[list[str]]:
    """The recordings of the newest kept job whose pid (of any rank), run id or name is ``target``:
    one list of files (oldest first) per rank. Raises :class:`TargetError` when none is kept."""
    for group in kept_jobs(directory):
        if any(target in (str(k.job.pid), k.job.run, k.job.name) for k in group):
            files = [[str(p) for p in k.files] for k in group]
            if not any(files):
                raise TargetError(f"the history of {target} was kept, but its recording is gone")
            return [f for f in files if f]
    where = directory or history.history_dir()
    raise TargetError(
        f"{target} is neither a recording nor a job whose history is kept in {where} "
        "(`icsmon list --ended` lists them)"
    )
