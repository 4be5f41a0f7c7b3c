"""The job's presence on the wire: who it is, where it publishes, and the file that says so.

An :class:`Outlet` owns the publisher thread's socket and the discovery file. It opens both or
neither (a failure leaves no file behind), and everything the monitor sends goes through it: its
events, the layer table, and each sample the sampler finished (:meth:`Outlet.send`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import socket
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from . import discovery, history, protocol
from .actions import Actions
from .alerts.judge import Judge
from .publisher import Publisher, Work, default_endpoint
from .recording import DEFAULT_KEEP, DEFAULT_MAX_BYTES, Recorder

#: What ``watch(record=...)`` takes: None (keep the history), False (keep nothing), or a path.
Record = str | os.PathLike[str] | bool | None


def _default_name() -> str:
    arg0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    if arg0 in ("", "-", "-c", "-m"):
        return "python"
    return Path(arg0).stem or "python"


def _env_int(name: str, default: int) -> int:
    """An integer from the launcher's environment; a malformed one must not stop training."""
    try:
        return int(os.environ.get(name, "") or default)
    except ValueError:
        return default


#: Where launchers put an identity that every rank of one launch shares, in order of preference.
JOB_ID_VARIABLES = ("ICSMON_RUN", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID")


def _distributed_rank() -> tuple[int, int] | None:
    """(rank, world size) from an initialised ``torch.distributed`` (``mp.spawn`` sets no RANK)."""
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            return int(dist.get_rank()), int(dist.get_world_size())
    except Exception:  # a half-initialised process group must not stop training
        return None
    return None


def _job_id(name: str, world_size: int) -> str:
    """The run id: the launcher's job id, so all ranks of one launch share it; else one of our own.

    A multi-rank job launched without an id (``mp.spawn`` with MASTER_ADDR/PORT) gets one from its
    rendezvous address, which every rank of that launch shares.
    """
    for variable in JOB_ID_VARIABLES:
        value = os.environ.get(variable, "")
        if not value or value == "none":
            continue
        if variable == "ICSMON_RUN":
            return value
        if world_size <= 1:
            break  # one process: a launcher's id may be shared by several (an sbatch of two runs)
        if variable == "SLURM_JOB_ID" and os.environ.get("SLURM_STEP_ID"):
            value += "." + os.environ["SLURM_STEP_ID"]
        # Short (it names the socket file, whose path has a length limit) but whole: hashed.
        short = value if len(value) <= 12 else value[:6] + hashlib.sha1(value.encode()).hexdigest()[:6]
        return f"{name}-{short}"
    master = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    if world_size > 1 and all(master):
        digest = hashlib.sha1(":".join(master).encode()).hexdigest()[:6]
        return f"{name}-{digest}"
    return f"{name}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Identity:
    """Who the job is: its name, run id (shared by the ranks of one launch), rank and world."""

    name: str
    run: str
    rank: int
    world_size: int
    started: float
    pid: int
    local_rank: int = 0

    @classmethod
    def from_environment(cls, name: str | None) -> Identity:
        name = name or _default_name()
        rank, world = _env_int("RANK", -1), _env_int("WORLD_SIZE", 0)
        if rank < 0 or world <= 0:
            rank, world = _distributed_rank() or (max(rank, 0), max(world, 1))
        local_rank = _env_int("LOCAL_RANK", rank)
        return cls(name, _job_id(name, world), rank, world, time.time(), os.getpid(), local_rank)


def resolve_endpoint(endpoint: str | None, runtime: Path, key: str) -> str:
    if endpoint is None or endpoint == "ipc":
        return default_endpoint(runtime, key)
    if endpoint == "tcp":
        warnings.warn(
            "icsmon: publishing on tcp://127.0.0.1 as asked: every local user can connect to a loopback "
            "port (the default ipc:// socket is private to you)",
            RuntimeWarning,
            stacklevel=5,
        )
        return "tcp://127.0.0.1:*"
    if not is_loopback(endpoint):
        warnings.warn(
            f"icsmon: publishing on {endpoint}, beyond loopback, encrypted (CURVE): a viewer needs the "
            "job's key, which only its discovery file holds (`icsmon list --json`, field 'key')",
            RuntimeWarning,
            stacklevel=5,
        )
    return endpoint


def is_loopback(endpoint: str) -> bool:
    """ipc:// (a file) and loopback TCP stay on this machine; anything else can be reached from off it."""
    return not endpoint.startswith("tcp://") or endpoint.startswith(
        ("tcp://127.", "tcp://localhost", "tcp://[::1]")
    )


class Outlet:
    """The publisher and the discovery file of one watched model."""

    def __init__(
        self,
        who: Identity,
        endpoint: str | None,
        runtime_dir: str | os.PathLike[str] | None,
        on_error: Callable[[str, BaseException], None],
        record: Record = None,
        judge: Judge | None = None,
        actions: Actions | None = None,
    ) -> None:
        self.who = who
        self._discovery_path: Path | None = None
        self.kept: history.KeptJob | None = None
        key = f"{who.run}.r{who.rank}.{who.pid}"  # the pid too: two processes never share a file
        runtime = Path(runtime_dir) if runtime_dir is not None else discovery.runtime_dir()
        discovery.ensure_private_dir(runtime)
        where = resolve_endpoint(endpoint, runtime, key)
        public, secret = (None, None) if is_loopback(where) else zmq.curve_keypair()
        recorder, kept_in = _open_recorder(who, key, record)
        try:
            self.publisher = Publisher(
                where,
                run=who.run,
                rank=who.rank,
                on_error=on_error,
                curve_secret=secret,
                recorder=recorder,
                judge=judge,
                actions=actions,
            )
        except BaseException:
            if recorder is not None:  # opened both or neither
                recorder.close()
            raise
        try:
            info = discovery.JobInfo(
                pid=who.pid,
                host=socket.gethostname(),
                run=who.run,
                name=who.name,
                rank=who.rank,
                world_size=who.world_size,
                local_rank=who.local_rank,
                endpoint=self.endpoint,
                key=public.decode() if public is not None else "",
                started=who.started,
                cmd=list(sys.argv),
            )
            self._discovery_path = discovery.write(info, runtime, stem=key)
        except BaseException:
            self.close()
            raise
        if recorder is not None and kept_in is not None:
            try:
                self.kept = history.start(info, key, recorder.path.absolute(), kept_in)
            except OSError as exc:
                warnings.warn(f"icsmon: cannot index the job's history ({exc})", RuntimeWarning, stacklevel=5)

    @property
    def endpoint(self) -> str:
        return self.publisher.endpoint

    @property
    def watching(self) -> bool:
        return self.publisher.watching

    def send(self, work: Work) -> None:
        """A finished sample, for the publisher thread to encode and send."""
        self.publisher.submit(work)

    def event(self, name: str, step: int, errors: int, **extra: Any) -> None:
        detail: dict[str, Any] = {"step": step, "errors": errors, "dropped": self.publisher.dropped, **extra}
        who = self.who
        # seq 0: the publisher numbers every message it sends, from one counter.
        self.publisher.submit(protocol.Event(who.run, who.rank, 0, time.time(), name, detail))

    def schema(self, layers: tuple[protocol.LayerInfo, ...], every: int | None, *, sharded: bool) -> None:
        who = self.who
        self.publisher.set_schema(
            protocol.Schema(
                run=who.run,
                rank=who.rank,
                seq=0,  # a table is not numbered: it is sent again as it is, and viewers keep the last
                t=time.time(),
                layers=layers,
                name=who.name,
                host=socket.gethostname(),
                pid=who.pid,
                world_size=who.world_size,
                every=every or 0,  # 0: adaptive
                started=who.started,
                schema_id=protocol.schema_id_for(layers),
                alerts=self.publisher.judge is not None,
                sharded=sharded,
            )
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.publisher.close()
        if self.kept is not None:
            history.ended(self.kept)
            self.kept = None
        if self._discovery_path is not None and os.getpid() == self.who.pid:
            discovery.remove(self._discovery_path)
            self._discovery_path = None


def _open_recorder(who: Identity, key: str, record: Record) -> tuple[Recorder | None, Path | None]:
    """The job's recording, and the history directory that indexes it (None: not indexed).

    ``record=PATH`` (or ``ICSMON_RECORD``) records there, one file a rank, indexed in the history;
    by default the job keeps its history (:mod:`.history`); ``record=False`` keeps nothing, and
    ``ICSMON_HISTORY=0`` keeps nothing but a file asked for. A place
    that cannot be used costs the recording, never the job.
    """
    if record is False:
        return None, None
    chosen = record if record not in (None, True) else os.environ.get("ICSMON_RECORD") or None
    indexed = history.enabled()
    if chosen is None and not indexed:
        return None, None
    try:
        directory = history.prepare() if indexed else None
    except OSError as exc:
        directory = None
        if chosen is None:
            warnings.warn(
                f"icsmon: cannot keep the job's history ({exc}); set {history.STATE_ENV} or record=PATH",
                RuntimeWarning,
                stacklevel=5,
            )
            return None, None
    if chosen is not None:
        path = Path(chosen)  # type: ignore[arg-type]
        if who.world_size > 1:  # one file a rank: name.r<rank>.icsrec
            path = path.with_name(f"{path.stem}.r{who.rank}{path.suffix}")
        max_bytes, keep = DEFAULT_MAX_BYTES, DEFAULT_KEEP
    else:
        assert directory is not None
        path = directory / f"{key}{history.SUFFIX}"
        max_bytes, keep = history.JOB_MAX_BYTES, history.JOB_KEEP
    try:
        return Recorder(path, max_bytes=max_bytes, keep=keep), directory
    except OSError as exc:
        warnings.warn(
            f"icsmon: cannot record to {path} ({exc}); publishing only", RuntimeWarning, stacklevel=5
        )
        return None, None
