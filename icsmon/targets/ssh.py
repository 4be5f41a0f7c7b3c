"""One SSH connection to a GPU box: a master authenticated in the foreground, commands and
socket forwards multiplexed through it, and a teardown that leaves nothing behind.

The system ``ssh`` client does the work (``ICSMON_SSH_COMMAND`` overrides it, split like git's
``GIT_SSH_COMMAND``), so ``~/.ssh/config``, keys, agents, jump hosts and 2FA behave as in a plain
``ssh HOST``. Everything of ours lives in one private (0700) temporary directory: the control
socket, ssh's log and the forwarded sockets; :meth:`Connection.close` ends the master and removes
the directory. pyzmq's ``zmq.ssh`` is not used: it prompts into whatever owns the terminal and can
leave a dead tunnel behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from icsmon.errors import TargetError
from icsmon_agent import discovery

ENV_COMMAND = "ICSMON_SSH_COMMAND"
# A unix socket path holds 103 bytes on macOS (107 on Linux), and ssh binds the control socket as
# "<path>.XXXXXXXXXXXXXXXX" before renaming it: the private dir must leave room for that.
MAX_SOCKET_PATH = 103
DIR_PREFIX = "icsmon-ssh-"
CONTROL_NAME = "ctl"
COMMAND_TIMEOUT_S = 30.0
PROBE_TIMEOUT_S = 10.0


class SSHError(TargetError):
    """Reaching the host failed; the message says what happened and what to do."""


def base_command(environ: dict[str, str] | None = None) -> list[str]:
    """``ssh``, or the words of ``$ICSMON_SSH_COMMAND`` (e.g. ``ssh -F my_config``)."""
    env = os.environ if environ is None else environ
    text = env.get(ENV_COMMAND, "").strip()
    if not text:
        return ["ssh"]
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise SSHError(f"{ENV_COMMAND} cannot be parsed ({exc}): {text!r}") from None
    return words


def check_host(host: str) -> str:
    # A leading "-" would be read by ssh as an option; whitespace cannot be a host or an alias.
    if not host or host.startswith("-") or any(c.isspace() for c in host):
        raise SSHError(f"{host!r} is not an SSH host: give an alias from ~/.ssh/config, HOST or USER@HOST")
    return host


def explain_failure(host: str, log: str) -> str:
    """What ssh's own words (its log) mean for the user, and what to do about them."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    said = lines[-1] if lines else "nothing"
    low = log.lower()
    if "could not resolve hostname" in low:
        # A name that is no host may be a job's name misspelt: say which jobs run here.
        names = sorted({job.name for job in discovery.read_jobs()})
        running = f"running here: {', '.join(names)}" if names else "none runs here"
        what = (
            f"no job named {host!r} ({running}) and no SSH host of that name: check the name, "
            f"or add a `Host {host}` entry to ~/.ssh/config"
        )
    elif "connection refused" in low:
        what = f"{host} refused the SSH connection: is sshd running there, and on that port?"
    elif "permission denied" in low or "too many authentication failures" in low:
        what = f"authentication to {host} failed: check that `ssh {host}` works in this terminal (user, keys, agent)"
    elif "host key verification failed" in low or "remote host identification has changed" in low:
        what = f"{host}'s host key is unknown or has changed: run `ssh {host}` once to check and accept it"
    elif any(s in low for s in ("timed out", "no route to host", "network is unreachable")):
        what = f"cannot reach {host}: check the network, a VPN or the jump host"
    else:
        what = f"ssh to {host} failed"
    return f"{what} (ssh said: {said})"


def _private_dir() -> Path:
    base = tempfile.gettempdir()
    # mkdtemp adds 8 characters; ssh adds 17 to the control path while binding it.
    longest = len(base) + len(f"/{DIR_PREFIX}12345678/{CONTROL_NAME}") + 17
    if longest > MAX_SOCKET_PATH:
        base = "/tmp"  # a long $TMPDIR would overflow the socket paths
    return Path(tempfile.mkdtemp(prefix=DIR_PREFIX, dir=base))  # mkdtemp creates it 0700


def _free_local_port() -> int:
    # ssh cannot tell a mux client which port it picked for `-L 0:...`, so pick one here. Another
    # process could take it in between; the forward then fails with a clear message.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def remote_tcp_target(endpoint: str) -> tuple[str, int]:
    """``tcp://HOST:PORT`` as bound on the remote; a wildcard bind is reached on its loopback."""
    rest = endpoint[len("tcp://") :]
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    if host in ("*", "0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if not port.isdigit():
        raise SSHError(f"cannot forward {endpoint}: no port in it")
    return host, int(port)


class Connection:
    """A master connection to ``host``; use as a context manager, or call :meth:`close`."""

    def __init__(self, host: str, *, environ: dict[str, str] | None = None) -> None:
        self.host = check_host(host)
        self.base = base_command(environ)
        self.dir = _private_dir()
        self.control = self.dir / CONTROL_NAME
        self.log = self.dir / "ssh.log"
        self.master_pid: int | None = None
        self._forwards: list[str] = []
        self._counter = 0
        self._lock = threading.Lock()

    # -- the master ---------------------------------------------------------------------------

    def open(self, *, interactive: bool = True) -> None:
        """Connect and authenticate in the foreground; return once the master is ready.

        ``ssh -f`` forks into the background only after authentication, so password, passphrase
        and 2FA prompts happen on this terminal before any TUI takes it over; in the background it
        is in its own session, so a Ctrl-C meant for us does not kill it before we tear it down.
        ``interactive=False`` (a reconnection from inside the app) forbids prompts altogether.
        """
        for stale in (self.log, self.control):
            # A previous attempt's words would mislead explain_failure(), and a dead master's
            # socket file would make the new master run without multiplexing.
            with contextlib.suppress(OSError):
                stale.unlink()
        cmd = [
            *self.base,
            "-M",
            "-S",
            str(self.control),
            "-E",
            str(self.log),  # ssh's messages, for explain_failure(); prompts still go to the tty
            "-o",
            "ControlPersist=no",
            "-o",
            "ClearAllForwardings=yes",  # the user's LocalForward lines are not ours to open
            "-o",
            "ServerAliveInterval=10",  # a dead link is noticed in ~30 s, so `tail` can say so
            "-o",
            "ServerAliveCountMax=3",
        ]
        if not interactive:
            cmd += ["-o", "BatchMode=yes"]
        cmd += ["-f", "-N", self.host]
        try:
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        except FileNotFoundError:
            raise SSHError(
                f"cannot run {self.base[0]!r}: install the OpenSSH client, or set {ENV_COMMAND}"
            ) from None
        if proc.returncode != 0 or not self.control.exists():
            raise SSHError(explain_failure(self.host, self._read_log() + proc.stderr))
        self.master_pid = self._check()

    def _check(self) -> int | None:
        """The master's pid if it still runs (``-O check`` never opens a new connection)."""
        try:
            proc = self._mux("-O", "check", timeout=5)
        except SSHError:
            return None
        if proc.returncode != 0:
            return None
        m = re.search(r"pid=(\d+)", proc.stderr)
        return int(m.group(1)) if m else self.master_pid

    def alive(self) -> bool:
        return self.master_pid is not None and self._check() is not None

    def _read_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def _mux(
        self,
        *options: str,
        command: str | None = None,
        stdin: str | None = None,
        timeout: float = COMMAND_TIMEOUT_S,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ssh -S ctl OPTIONS HOST [COMMAND]`` through the master, never prompting.

        Its own session, so a Ctrl-C meant for us does not cut a teardown step short.
        """
        cmd = [*self.base, "-S", str(self.control), "-o", "ControlMaster=no", "-o", "BatchMode=yes"]
        cmd += [*options, self.host]
        if command is not None:
            cmd.append(command)
        try:
            return subprocess.run(
                cmd, input=stdin, capture_output=True, text=True, timeout=timeout, start_new_session=True
            )
        except subprocess.TimeoutExpired:
            raise SSHError(f"{self.host} did not answer within {timeout:g} s") from None
        except FileNotFoundError:
            raise SSHError(
                f"cannot run {self.base[0]!r}: install the OpenSSH client, or set {ENV_COMMAND}"
            ) from None

    def run_script(self, script: str, timeout: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """Run a POSIX shell script on the host: fed to ``sh -s``, so any login shell will do."""
        return self._mux("-T", command="sh -s", stdin=script, timeout=timeout)

    # -- forwards -----------------------------------------------------------------------------

    def forward(self, remote_endpoint: str) -> str:
        """Forward the remote ZeroMQ endpoint to a private local one; return the local endpoint."""
        with self._lock:
            self._counter += 1
            if remote_endpoint.startswith("ipc://"):
                remote = remote_endpoint[len("ipc://") :]
                if not remote.startswith("/") or ":" in remote:
                    raise SSHError(f"cannot forward {remote_endpoint}: not an absolute path ssh can name")
                local = str(self.dir / f"f{self._counter}.sock")
                spec = f"{local}:{remote}"
                endpoint = f"ipc://{local}"
            elif remote_endpoint.startswith("tcp://"):
                rhost, rport = remote_tcp_target(remote_endpoint)
                lport = _free_local_port()
                spec = (
                    f"127.0.0.1:{lport}:[{rhost}]:{rport}"
                    if ":" in rhost
                    else f"127.0.0.1:{lport}:{rhost}:{rport}"
                )
                endpoint = f"tcp://127.0.0.1:{lport}"
            else:
                raise SSHError(f"cannot forward {remote_endpoint}: only ipc:// and tcp:// endpoints")
            proc = self._mux("-O", "forward", "-L", spec)
            if proc.returncode != 0:
                said = proc.stderr.strip().splitlines()
                raise SSHError(
                    f"could not forward the job's socket from {self.host}"
                    f" (ssh said: {said[-1] if said else 'nothing'})"
                )
            self._forwards.append(spec)
            return endpoint

    def cancel_forwards(self) -> None:
        with self._lock:
            specs, self._forwards = self._forwards, []
        for spec in specs:
            with contextlib.suppress(SSHError):
                self._mux("-O", "cancel", "-L", spec, timeout=5)
            local = spec.split(":")[0]
            if local.startswith("/"):
                with contextlib.suppress(OSError):
                    os.unlink(local)  # ssh leaves the listening socket's file behind

    def forward_refused(self) -> bool:
        """Whether ssh logged that the server refused a forward (said for TCP forwards only)."""
        return "administratively prohibited" in self._read_log()

    # -- teardown -----------------------------------------------------------------------------

    def close(self) -> None:
        """End the forwards and the master, remove the private directory. Safe to call twice."""
        if self.control.exists():
            with contextlib.suppress(SSHError):
                self._mux("-O", "exit", timeout=5)
        pid, self.master_pid = self.master_pid, None
        if pid is not None:
            _wait_gone(pid, 2.0)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_gone(pid: int, timeout: float) -> None:
    """Wait for the master (the pid ssh reported) to exit; terminate it if `-O exit` did not."""
    deadline = time.monotonic() + timeout
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _running(pid):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
