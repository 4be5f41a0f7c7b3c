"""The job's presence on the wire: who it is, where it publishes, and the file that says so.

An :class:`Outlet` owns the publisher thread's socket and the discovery file. It opens both or
neither (a failure leaves no file behind), and everything the monitor sends goes through it.
"""

from __future__ import annotations

import contextlib
import itertools
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

from . import discovery, protocol
from .publisher import Publisher, Work, default_endpoint


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


@dataclass(frozen=True)
class Identity:
    """Who the job is: its name, run id (shared by the ranks of one launch), rank and world."""

    name: str
    run: str
    rank: int
    world_size: int
    started: float
    pid: int

    @classmethod
    def from_environment(cls, name: str | None) -> Identity:
        name = name or _default_name()
        run = os.environ.get("ICSMON_RUN") or os.environ.get("TORCHELASTIC_RUN_ID") or ""
        if not run or run == "none":
            run = f"{name}-{secrets.token_hex(3)}"
        return cls(name, run, _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), time.time(), os.getpid())


def resolve_endpoint(endpoint: str | None, runtime: Path, key: str) -> str:
    if endpoint is None or endpoint == "ipc":
        return default_endpoint(runtime, key)
    if endpoint == "tcp":
        return "tcp://127.0.0.1:*"
    if endpoint.startswith("tcp://") and not endpoint.startswith(
        ("tcp://127.", "tcp://localhost", "tcp://[::1]")
    ):
        warnings.warn(
            f"icsmon: publishing on {endpoint}, beyond loopback: anyone who can reach it can read the figures",
            RuntimeWarning,
            stacklevel=5,
        )
    return endpoint


class Outlet:
    """The publisher and the discovery file of one watched model."""

    def __init__(
        self,
        who: Identity,
        endpoint: str | None,
        runtime_dir: str | os.PathLike[str] | None,
        on_error: Callable[[str, BaseException], None],
    ) -> None:
        self.who = who
        self._seq = itertools.count(1)
        self._discovery_path: Path | None = None
        key = f"{who.run}.r{who.rank}"
        runtime = Path(runtime_dir) if runtime_dir is not None else discovery.runtime_dir()
        discovery.ensure_private_dir(runtime)
        self.publisher = Publisher(
            resolve_endpoint(endpoint, runtime, key), run=who.run, rank=who.rank, on_error=on_error
        )
        try:
            info = discovery.JobInfo(
                pid=who.pid,
                host=socket.gethostname(),
                run=who.run,
                name=who.name,
                rank=who.rank,
                world_size=who.world_size,
                endpoint=self.endpoint,
                started=who.started,
                cmd=list(sys.argv),
            )
            self._discovery_path = discovery.write(info, runtime, stem=key)
        except BaseException:
            self.close()
            raise

    @property
    def endpoint(self) -> str:
        return self.publisher.endpoint

    @property
    def watching(self) -> bool:
        return self.publisher.watching

    def send(self, work: Work) -> None:
        self.publisher.submit(work)

    def event(self, name: str, step: int, errors: int, **extra: Any) -> None:
        detail: dict[str, Any] = {"step": step, "errors": errors, "dropped": self.publisher.dropped, **extra}
        who = self.who
        self.publisher.submit(protocol.Event(who.run, who.rank, next(self._seq), time.time(), name, detail))

    def schema(self, layers: tuple[protocol.LayerInfo, ...], every: int | None) -> None:
        who = self.who
        self.publisher.set_schema(
            protocol.Schema(
                run=who.run,
                rank=who.rank,
                seq=next(self._seq),
                t=time.time(),
                layers=layers,
                name=who.name,
                host=socket.gethostname(),
                pid=who.pid,
                world_size=who.world_size,
                every=every or 0,  # 0: adaptive
                started=who.started,
                schema_id=protocol.schema_id_for(layers),
            )
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.publisher.close()
        if self._discovery_path is not None and os.getpid() == self.who.pid:
            discovery.remove(self._discovery_path)
            self._discovery_path = None
