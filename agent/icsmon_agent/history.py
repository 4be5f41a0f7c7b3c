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
import json
import os
import stat
import tempfile
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
        return Path(explicit).expanduser()
    state_home = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "icsmon" / "history"


def enabled(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get(OFF_ENV, "1").strip().lower() not in ("0", "off", "no", "false")


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
        return self.ended is None and discovery.pid_alive(self.job.pid)

    def to_json(self) -> dict[str, Any]:
        return {"job": self.job.to_json(), "recording": str(self.recording), "ended": self.ended}


def _write_json(target: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".json")  # 0600
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def prepare(directory: Path | None = None) -> Path:
    """The history directory, made private and with room for one more job (raises OSError)."""
    directory = discovery.ensure_private_dir(directory or history_dir())
    prune(directory)
    return directory


def start(info: JobInfo, stem: str, recording: Path, directory: Path) -> KeptJob:
    """Index a job that starts, recording to ``recording``."""
    kept = KeptJob(info, recording, None, directory / f"{stem}.json")
    _write_json(kept.index, kept.to_json())
    return kept


def ended(kept: KeptJob) -> None:
    """The job closed: said in its index (an index that never says so belonged to a job that died)."""
    kept.ended = time.time()
    with contextlib.suppress(OSError):
        _write_json(kept.index, kept.to_json())


def read(directory: Path | None = None) -> list[KeptJob]:
    """The kept jobs (every rank, newest first); unreadable, linked or foreign files are skipped."""
    directory = directory or history_dir()
    if not discovery.trusted(directory):
        return []
    uid = os.getuid() if hasattr(os, "getuid") else None
    out: list[KeptJob] = []
    try:
        entries = sorted(directory.glob("*.json"))
    except OSError:
        return []
    for path in entries:
        if path.name.startswith("."):
            continue
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or (uid is not None and st.st_uid != uid):
                continue
            data = json.loads(path.read_text())
            job = JobInfo.from_json(data["job"])
            end = data.get("ended")
            out.append(
                KeptJob(job, Path(str(data["recording"])), float(end) if end is not None else None, path)
            )
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            continue
    out.sort(key=lambda k: k.job.started, reverse=True)
    return out


def prune(directory: Path, max_bytes: int = TOTAL_MAX_BYTES, max_jobs: int = MAX_JOBS) -> list[KeptJob]:
    """Remove the oldest jobs that are over (never a running one); returns those removed. Only
    recordings inside ``directory`` are deleted: a ``record=PATH`` file is the user's."""
    kept = [k for k in read(directory) if not k.alive]  # newest first
    total = sum(k.size for k in kept)
    removed: list[KeptJob] = []
    for i in range(len(kept) - 1, -1, -1):
        if total <= max_bytes and i < max_jobs:
            break
        k = kept[i]
        total -= k.size
        if k.recording.parent == directory:
            for path in k.files:
                discovery.remove(path)
        discovery.remove(k.index)
        removed.append(k)
    return removed
