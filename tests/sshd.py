"""A real OpenSSH server on loopback for the SSH tests, and ways to look for what a command left.

Everything lives in a temporary directory: host and user keys generated for the run, the server's
own sshd_config, a known_hosts file, and the client config the CLI gets through
``ICSMON_SSH_COMMAND="ssh -F <config>"``. The machine's ssh setup and ``~/.ssh`` are not touched.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
# As root, sshd insists on its privilege-separation directory (the service unit normally creates it).
PRIVSEP_DIR = Path("/run/sshd")


class SshdUnavailable(Exception):
    """sshd cannot be started here; the tests skip with this reason."""


@dataclass
class Sshd:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        """Stop the server and every connection it serves (as a crash or a lost link would)."""
        sessions = self.sessions()  # before the server goes: then they would have a new parent
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        for pid in sessions:
            kill(pid)

    def sessions(self) -> list[int]:
        """The server's per-connection processes: one pair per live SSH connection."""
        return descendants(self.proc.pid)


def keygen(path: Path) -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "icsmon-test", "-f", str(path)], check=True
    )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_can_run() -> None:
    if not os.path.exists(SSHD) or not shutil.which("ssh") or not shutil.which("ssh-keygen"):
        raise SshdUnavailable("OpenSSH server/client not installed (./scripts/install-system-deps)")
    if os.geteuid() == 0 and not PRIVSEP_DIR.is_dir():
        try:
            PRIVSEP_DIR.mkdir(mode=0o755)
        except OSError as exc:
            raise SshdUnavailable(f"sshd needs {PRIVSEP_DIR}: {exc}") from None


def start_sshd(directory: Path, name: str, host_key: Path, authorized: Path, extra: list[str]) -> Sshd:
    """Start ``sshd -D`` on a free loopback port with its own config; wait until it accepts."""
    config = directory / f"{name}_sshd_config"
    log = directory / f"{name}_sshd.log"
    for _attempt in range(3):  # the free port can be taken between picking and binding
        port = free_port()
        lines = [
            f"Port {port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {host_key}",
            f"PidFile {directory / f'{name}_sshd.pid'}",
            f"AuthorizedKeysFile {authorized}",
            "StrictModes no",  # the keys live under /tmp, which is world-writable
            "UsePAM no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password",
            # The tests tell the "remote" side where the job's runtime dir is (SetEnv in the client).
            "AcceptEnv ICSMON_RUNTIME_DIR",
            *extra,
        ]
        config.write_text("\n".join(lines) + "\n")
        with open(log, "ab") as fh:
            proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=fh, stderr=fh)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    if s.recv(4) == b"SSH-":
                        return Sshd(name, port, proc, log)
            except OSError:
                time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    raise SshdUnavailable(f"sshd did not start: {log.read_text()[-500:]}")


def host_entry(
    alias: str, port: int, key: Path, known_hosts: Path, *, hostname: str = "127.0.0.1", **more: str
) -> str:
    options = {
        "HostName": hostname,
        "Port": str(port),
        "User": getpass.getuser(),
        "IdentityFile": str(key),
        "IdentitiesOnly": "yes",
        "UserKnownHostsFile": str(known_hosts),
        "GlobalKnownHostsFile": "/dev/null",
        "StrictHostKeyChecking": "yes",
        "BatchMode": "yes",  # a test must never wait on a prompt
        "ConnectTimeout": "10",
        **more,
    }
    return f"Host {alias}\n" + "".join(f"  {k} {v}\n" for k, v in options.items())


def known_hosts_line(port: int, host_key: Path) -> str:
    kind, blob = host_key.with_suffix(".pub").read_text().split()[:2]
    return f"[127.0.0.1]:{port} {kind} {blob}\n"


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def descendants(root: int) -> list[int]:
    parents = {pid: _ppid(pid) for pid in _pids()}
    found: list[int] = []
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        kids = [pid for pid, pp in parents.items() if pp == parent]
        found += kids
        frontier += kids
    return found


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text`` (e.g. a private directory's path)."""
    found = []
    for pid in _pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and pid != os.getpid():
            found.append(f"{pid}: {cmdline}")
    return found


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
