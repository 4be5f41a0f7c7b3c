"""Discovery files: one small JSON file per running agent, so viewers can find jobs.

The directory is ``$ICSMON_RUNTIME_DIR`` if set, else ``$XDG_DATA_HOME/icsmon/runtime`` (default
``~/.local/share/icsmon/runtime``). Not ``XDG_RUNTIME_DIR``: it differs between a batch job and an
SSH login to the same box, and the two must agree. The directory is 0700 and each file 0600, so
only the same user sees the jobs (and can reach their ``ipc://`` sockets, which live beside them).

:data:`icsmon.targets.listing.REMOTE_LIST_SCRIPT` (the viewer's) is the same reading done by a plain
POSIX shell over SSH, so the GPU box needs no ``icsmon`` on its PATH. Keep the two in step.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SUFFIX = ".json"


def runtime_dir(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    explicit = env.get("ICSMON_RUNTIME_DIR")
    if explicit:
        return Path(explicit).expanduser()
    data_home = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "icsmon" / "runtime"


@dataclass
class JobInfo:
    """What one discovery file says about a running agent."""

    pid: int
    host: str
    run: str
    name: str
    rank: int
    world_size: int
    endpoint: str
    started: float
    cmd: list[str] = field(default_factory=list)
    version: int = 1
    local_rank: int = 0
    key: str = ""  # the job's CURVE public key (Z85) when it publishes beyond loopback
    path: str = ""  # where the file was found (not written into it)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("path")
        return data

    @classmethod
    def from_json(cls, data: Any, path: str = "") -> JobInfo:
        if not isinstance(data, dict):
            raise ValueError("discovery file is not a JSON object")
        try:
            cmd = data.get("cmd", [])
            return cls(
                pid=int(data["pid"]),
                host=str(data.get("host", "")),
                run=str(data["run"]),
                name=str(data.get("name", "")),
                rank=int(data.get("rank", 0)),
                world_size=int(data.get("world_size", 1)),
                endpoint=str(data["endpoint"]),
                started=float(data.get("started", 0.0)),
                cmd=[str(c) for c in cmd] if isinstance(cmd, list) else [str(cmd)],
                version=int(data.get("version", 1)),
                local_rank=int(data.get("local_rank", 0)),
                key=str(data.get("key", "")),
                path=path,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"discovery file is malformed: {exc}") from None


class UntrustedDirectory(OSError):
    """A runtime directory that another user could read from or write into: not used."""


def check_private_dir(path: Path) -> None:
    """Raise :class:`UntrustedDirectory` unless ``path`` is a real directory (not a symlink) owned by
    this user and writable by nobody else; a directory like that is where another local user could
    swap a job's discovery file for one that points at their own socket."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UntrustedDirectory(f"{path} is a symbolic link; icsmon wants a real directory of its own there")
    if not stat.S_ISDIR(st.st_mode):
        raise UntrustedDirectory(f"{path} is not a directory")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise UntrustedDirectory(f"{path} belongs to another user (uid {st.st_uid}); set ICSMON_RUNTIME_DIR")
    if st.st_mode & 0o022:
        raise UntrustedDirectory(
            f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}); `chmod 700 {path}`"
        )


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (parents as usual, itself 0700) or check the one that is there; never chmod
    what this process did not create. Raises :class:`UntrustedDirectory` for a directory that fails
    :func:`check_private_dir`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    check_private_dir(path)
    return path


def trusted(directory: Path) -> bool:
    try:
        check_private_dir(directory)
    except OSError:
        return False
    return True


def write(info: JobInfo, directory: Path | None = None, *, stem: str | None = None) -> Path:
    """Write ``info`` atomically as ``<stem>.json`` (0600; stem defaults to the run) and return its path."""
    directory = ensure_private_dir(directory or runtime_dir())
    target = directory / f"{stem or info.run}{SUFFIX}"
    write_json(target, info.to_json())
    return target


def write_json(target: Path, data: dict[str, Any]) -> None:
    """``data`` as ``target`` (0600), atomically: a reader sees the old file or the new, whole."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=SUFFIX)  # mkstemp creates 0600
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


#: The private directory of sockets whose runtime-dir path is too long (publisher.default_endpoint).
SHORT_SOCKET_DIR = Path("/tmp") / f"icsmon-{os.getuid() if hasattr(os, 'getuid') else 0}"


def remove_leftovers(info: JobInfo, path: Path) -> None:
    """What a job that died without closing left: its discovery file and its socket file (only one
    that lies beside the discovery file: a path elsewhere is not ours to delete)."""
    if info.endpoint.startswith("ipc://"):
        sock = Path(info.endpoint[len("ipc://") :])
        if sock.parent in (path.parent, SHORT_SOCKET_DIR) or _short_fallback(sock.parent):
            remove(sock)
            if _short_fallback(sock.parent):
                with contextlib.suppress(OSError):
                    sock.parent.rmdir()  # the job's own fallback directory, empty now
    remove(path)


def _short_fallback(directory: Path) -> bool:
    """A job's own short-socket directory, made when SHORT_SOCKET_DIR was taken by someone else."""
    return (
        directory.parent == SHORT_SOCKET_DIR.parent
        and directory.name.startswith(f"{SHORT_SOCKET_DIR.name}-")
        and directory.is_dir()
        and not directory.is_symlink()
        and directory.stat().st_uid == os.getuid()
    )


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def own_json_files(directory: Path) -> list[tuple[Path, Any]]:
    """The JSON files of ``directory`` that are ours to read, parsed: none if the directory is
    not private (see :func:`check_private_dir`), and never a link, a dot file, another user's
    file or one that does not parse."""
    try:
        entries = sorted(directory.glob(f"*{SUFFIX}"))
    except OSError:
        return []
    if not trusted(directory):
        return []  # someone else could have written these files
    uid = os.getuid() if hasattr(os, "getuid") else None
    out: list[tuple[Path, Any]] = []
    for path in entries:
        if path.name.startswith("."):
            continue
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or (uid is not None and st.st_uid != uid):
                continue  # a link, or a file another user put there: not ours
            out.append((path, json.loads(path.read_text())))
        except (OSError, ValueError, RecursionError):
            continue  # half-written or foreign
    return out


def read_jobs(directory: Path | None = None, *, clean: bool = True) -> list[JobInfo]:
    """Jobs of this host whose process is alive, newest first. Stale files of dead pids are deleted.

    Files written by another host (a home directory shared across a cluster) are skipped, as the
    remote listing script skips them: their pid cannot be checked and their ipc socket cannot be
    reached from here (reach that host with ``icsmon list HOST``).
    """
    directory = directory or runtime_dir()
    jobs: list[JobInfo] = []
    here = socket.gethostname()
    for path, data in own_json_files(directory):
        try:
            info = JobInfo.from_json(data, str(path))
        except ValueError:
            continue  # half-written or foreign file: skip, never crash the viewer
        if info.host != here:
            continue
        if not pid_alive(info.pid):
            if clean:
                remove_leftovers(info, path)
            continue
        jobs.append(info)
    jobs.sort(key=lambda j: j.started, reverse=True)
    return jobs
