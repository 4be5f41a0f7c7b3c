"""Every watched job keeps its recent history without being asked, the way TensorBoard keeps event
files: a recording of what it published (samples, events, its own alerts) in the user's private
state directory, so ``icsmon replay PID`` shows the morning after what happened in the night.

``$ICSMON_STATE_DIR`` if set, else ``$XDG_STATE_HOME/icsmon/history`` (default
``~/.local/state/icsmon/history``), 0700, each file 0600. Per job (and rank) a recording
``<key>.icsrec`` and an index ``<key>.json`` saying who the job was, where it recorded and when it
ended. Bounded: a job's recording rotates past :data:`JOB_MAX_BYTES` keeping one older file, and
when a job starts, the oldest ended jobs go until at most :data:`MAX_JOBS` jobs and
:data:`TOTAL_MAX_BYTES` remain. ``watch(record=False)`` or ``ICSMON_HISTORY=0`` keeps nothing;
``record=PATH`` (or ``ICSMON_RECORD``) records there instead, indexed here all the same.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import discovery
from .discovery import JobInfo

OFF_ENV = "ICSMON_HISTORY"
STATE_ENV = "ICSMON_STATE_DIR"
SUFFIX = ".icsrec"
#: One job's recording rotates past this, one older file kept: two of these at most per job and rank.
JOB_MAX_BYTES = 16 * 1024 * 1024
JOB_KEEP = 1
#: Over all kept jobs; when a job starts, the oldest ended ones go first.
TOTAL_MAX_BYTES = 512 * 1024 * 1024
MAX_JOBS = 200


def history_dir(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    explicit = env.get(STATE_ENV)
    if explicit:
        return Path(explicit).expanduser().absolute()
    state_home = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return (Path(state_home) / "icsmon" / "history").absolute()


def switched_off(value: str) -> bool:
    """An environment switch that says no (``0``, ``off``, ``no``, ``false``)."""
    return value.strip().lower() in ("0", "off", "no", "false")


def enabled(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return not switched_off(env.get(OFF_ENV, "1"))


@dataclass
class KeptJob:
    """What the index of one kept job (one rank) says."""

    job: JobInfo
    recording: Path  # the newest file; older ones are ``<recording>.1``
    ended: float | None  # when it closed (None: it did not say: running, or it died)
    index: Path

    @property
    def files(self) -> list[Path]:
        """Its recording, oldest file first (as replay plays a rotated set)."""
        older = self.recording.with_name(self.recording.name + ".1")
        return [p for p in (older, self.recording) if p.is_file()]

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.files)

    @property
    def alive(self) -> bool:
        """Not known to be over: it did not say it ended and its pid lives; a job of another host
        (a home shared across a cluster) whose end was not said counts as alive."""
        if self.ended is not None:
            return False
        return self.job.host != socket.gethostname() or discovery.pid_alive(self.job.pid)

    def to_json(self) -> dict[str, Any]:
        return {"job": self.job.to_json(), "recording": str(self.recording), "ended": self.ended}


def prepare(directory: Path | None = None) -> Path:
    """The history directory, made private and with room for one more job (raises OSError)."""
    directory = discovery.ensure_private_dir(directory or history_dir())
    prune(directory)
    return directory


def start(info: JobInfo, stem: str, recording: Path, directory: Path) -> KeptJob:
    """Index a job that starts, recording to ``recording``."""
    kept = KeptJob(info, recording, None, directory / f"{stem}.json")
    discovery.write_json(kept.index, kept.to_json())
    return kept


def ended(kept: KeptJob) -> None:
    """The job closed: said in its index (an index that never says so belonged to a job that died)."""
    kept.ended = time.time()
    with contextlib.suppress(OSError):
        discovery.write_json(kept.index, kept.to_json())


def read(directory: Path | None = None) -> list[KeptJob]:
    """The kept jobs (every rank, newest first); unreadable, linked or foreign files are skipped."""
    out: list[KeptJob] = []
    for path, data in discovery.own_json_files(directory or history_dir()):
        try:
            job = JobInfo.from_json(data["job"])
            end = data.get("ended")
            out.append(
                KeptJob(job, Path(str(data["recording"])), float(end) if end is not None else None, path)
            )
        except (ValueError, KeyError, TypeError):
            continue
    out.sort(key=lambda k: k.job.started, reverse=True)
    return out


def prune(directory: Path, max_bytes: int = TOTAL_MAX_BYTES, max_jobs: int = MAX_JOBS) -> list[KeptJob]:
    """Remove the oldest ended jobs (every rank of one) until the recordings inside ``directory``
    take at most ``max_bytes`` and at most ``max_jobs`` jobs are kept; returns the ranks removed.
    A running job is never removed (its bytes count), nor a ``record=PATH`` file (the user's)."""
    directory = directory.absolute()
    groups: dict[str, list[KeptJob]] = {}
    for kept in read(directory):  # newest first
        groups.setdefault(kept.job.run, []).append(kept)

    def ours(k: KeptJob) -> list[Path]:
        return [p for p in k.files if p.parent == directory]

    total = sum(p.stat().st_size for g in groups.values() for k in g for p in ours(k))
    jobs = list(groups.values())
    removed: list[KeptJob] = []
    for i in range(len(jobs) - 1, -1, -1):  # oldest first
        if total <= max_bytes and i < max_jobs:
            break
        group = jobs[i]
        if any(k.alive for k in group):
            continue
        for k in group:
            for path in ours(k):
                total -= path.stat().st_size
                discovery.remove(path)
            discovery.remove(k.index)
            removed.append(k)
    return removed
