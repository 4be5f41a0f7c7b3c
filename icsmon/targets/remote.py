"""A job on a GPU box reached over SSH: list the jobs there, pick one, forward its socket here.

The remote side needs only ``sh`` and the job's agent: the listing is
:data:`icsmon_agent.REMOTE_LIST_SCRIPT`, and the agent's socket is forwarded through the
SSH master, so no TCP port opens on the box.
"""

from __future__ import annotations

import shlex
import socket
import threading

from icsmon.endpoint import Endpoint
from icsmon.errors import TargetError
from icsmon.targets.listing import REMOTE_LIST_SCRIPT, parse_remote_listing
from icsmon.targets.local import Resolved, describe, pick_job
from icsmon.targets.ssh import PROBE_TIMEOUT_S, Connection, SSHError
from icsmon_agent.discovery import JobInfo

# The first bytes a ZeroMQ peer sends on a fresh connection (the ZMTP signature starts with 0xFF).
ZMTP_FIRST_BYTE = b"\xff"


class ForwardRefused(TargetError):
    """The job is alive but the host's sshd will not forward its socket: retrying will not help."""


class RemoteTarget:
    """Jobs on ``host``, and a forward to the chosen one. Call :meth:`open` first (in the foreground)."""

    def __init__(
        self, host: str, *, pid: int | None = None, run: str | None = None, rank: int | None = None
    ) -> None:
        self.conn = Connection(host)
        self.host = self.conn.host
        self.pid = pid
        self.run = run
        self.rank = rank
        self.job: JobInfo | None = None  # the chosen job's first rank
        self.ranks: list[JobInfo] = []  # every rank of it that is followed
        self.directory = ""
        self.note = ""  # which job was taken when several run, for stderr
        self._lock = threading.Lock()

    @property
    def where(self) -> str:
        return f"on {self.host}"

    def open(self, *, interactive: bool = True) -> None:
        self.conn.open(interactive=interactive)

    def jobs(self) -> list[JobInfo]:
        """The live jobs on the host, newest first."""
        proc = self.conn.run_script(REMOTE_LIST_SCRIPT)
        if proc.returncode == 255:  # ssh's own failure, not the script's
            raise SSHError(f"listing the jobs on {self.host} failed (ssh said: {_last(proc.stderr)})")
        try:
            self.directory, jobs = parse_remote_listing(proc.stdout)
        except ValueError:
            raise SSHError(
                f"could not list the jobs on {self.host}: `sh -s` there printed no listing"
                f" (exit {proc.returncode}: {_last(proc.stderr)}). Is it a POSIX system with sh, sed and cat?"
            ) from None
        return jobs

    def resolve(self) -> Resolved:
        """Pick a job (``pid``/``run``, else the most recent); the note says which when several run."""
        jobs = self.jobs()
        try:
            resolved = pick_job(jobs, pid=self.pid, run=self.run, rank=self.rank, where=self.where)
        except TargetError as exc:
            if not jobs and self.directory:
                raise TargetError(
                    f"{exc} (looked in {self.directory} there; a job started with another "
                    "ICSMON_RUNTIME_DIR is not seen: set it for SSH logins too, e.g. in the remote "
                    "shell's rc file)"
                ) from None
            raise
        return resolved

    def connect(self) -> list[str]:
        """(Re)establish the forwards to the chosen job's ranks; return the local endpoints.

        Called again by the app whenever the job is lost: the master is re-opened without prompts
        if the link dropped, the jobs are listed again (a restarted job has a new socket), and the
        previous forward is cancelled.
        """
        with self._lock:
            if not self.conn.alive():
                self.conn.cancel_forwards()
                try:
                    self.conn.open(interactive=False)
                except SSHError as exc:
                    raise SSHError(
                        f"the SSH connection to {self.host} dropped; reconnecting: {exc}"
                    ) from None
            resolved = self.resolve()
            assert resolved.job is not None
            self.job, self.ranks, self.note = resolved.job, resolved.jobs, resolved.note
            self.conn.cancel_forwards()
            endpoints: list[str] = []
            for job in resolved.jobs:
                local = Endpoint(self.conn.forward(job.endpoint), job.key)
                if not probe(local):
                    raise self._why_unanswered(job)
                endpoints.append(local)
            return endpoints

    def connect_job(self, jobs: list[JobInfo]) -> list[str]:
        """After the app's picker: that job by run id; if it restarted (new run id), the newest of its
        name. Over SSH one job at a time: the first one picked."""
        job = jobs[0]
        self.pid = None
        for key in (job.run, job.name):
            self.run = key
            try:
                return self.connect()
            except ForwardRefused:
                raise
            except TargetError as exc:
                last = exc
        raise last

    def job_state(self, job: JobInfo) -> str:
        """``alive``, ``ended`` or ``unknown`` (the link is down) for a job on the host."""
        if not self.conn.alive():
            return "unknown"
        script = f"kill -0 {int(job.pid)} 2>/dev/null && echo alive || echo ended\n"
        try:
            proc = self.conn.run_script(script, timeout=10)
        except SSHError:
            return "unknown"
        out = proc.stdout.strip().splitlines()
        return out[-1] if proc.returncode == 0 and out and out[-1] in ("alive", "ended") else "unknown"

    def _why_unanswered(self, job: JobInfo) -> TargetError:
        """The forward is there but nothing answers through it: the job ended, or sshd refuses."""
        if job.endpoint.startswith("ipc://"):
            path = shlex.quote(job.endpoint[len("ipc://") :])
            script = f"kill -0 {int(job.pid)} 2>/dev/null && [ -S {path} ] && echo open || echo gone\n"
        else:
            script = f"kill -0 {int(job.pid)} 2>/dev/null && echo open || echo gone\n"
        try:
            state = self.conn.run_script(script, timeout=10).stdout.strip()
        except SSHError:
            state = ""
        if state.endswith("gone"):
            return TargetError(f"the job {describe(job)} {self.where} has ended; `icsmon list {self.host}`")
        kind = "AllowStreamLocalForwarding" if job.endpoint.startswith("ipc://") else "AllowTcpForwarding"
        if state.endswith("open") or self.conn.forward_refused():
            return ForwardRefused(
                f"{self.host}'s SSH server refused to forward the job's socket (its sshd_config has "
                f"`{kind} no`, or a similar rule). Ask its admin to allow it, or run the viewer "
                f"there: `ssh -t {self.host} icsmon attach`"
            )
        return TargetError(f"the job {describe(job)} {self.where} does not answer through the SSH forward")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> RemoteTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def probe(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a ZeroMQ peer answers at the forwarded ``endpoint``.

    ssh accepts on the local side first and opens the remote side only then; when that fails it
    just closes the connection, which ZeroMQ would retry quietly forever. So connect once by hand:
    a live agent greets at once with the ZMTP signature, a refusal closes with no byte.
    """
    if endpoint.startswith("ipc://"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: str | tuple[str, int] = endpoint[len("ipc://") :]
    else:
        host, _, port = endpoint[len("tcp://") :].rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        address = (host, int(port))
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect(address)
            return sock.recv(1) == ZMTP_FIRST_BYTE
        except OSError:
            return False


def _last(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "nothing"


__all__ = ["RemoteTarget", "SSHError", "probe"]
