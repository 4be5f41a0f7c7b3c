"""`icsmon list|tail gpu-box` against a real sshd on loopback, with a real training job "there".

The job runs here with its own runtime dir; the client config's ``SetEnv ICSMON_RUNTIME_DIR``
points the SSH login at it, while the viewer's own runtime dir stays empty: what the CLI shows can
only have come through SSH. After every command no ssh process of ours and no socket file remains.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import eventually, first_sample_line, icsmon, json_lines
from sshd import (
    Sshd,
    SshdUnavailable,
    check_can_run,
    free_port,
    host_entry,
    keygen,
    known_hosts_line,
    processes_mentioning,
    start_sshd,
)

pytestmark = [pytest.mark.slow, pytest.mark.ssh]

JOB = """
import sys, time, torch
from torch import nn
import icsmon_agent
torch.set_num_threads(1)
model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
mon = icsmon_agent.watch(model, every=1, name=sys.argv[1], endpoint=sys.argv[2] if len(sys.argv) > 2 else None)
for step in range(100_000):
    loss = model(torch.randn(4, 8)).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step(); mon.step(loss=loss)
    time.sleep(0.05)
"""


@dataclass
class Lab:
    dir: Path
    open_box: Sshd
    locked_box: Sshd
    user_key: Path
    stranger_key: Path
    host_key: Path
    known_hosts: Path
    authorized: Path


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    try:
        check_can_run()
    except SshdUnavailable as exc:
        pytest.skip(str(exc))
    d = tmp_path_factory.mktemp("ssh")
    host_key, user_key, stranger_key = (keygen(d / n) for n in ("host_key", "id_user", "id_stranger"))
    authorized = d / "authorized_keys"
    authorized.write_text(user_key.with_suffix(".pub").read_text())
    try:
        open_box = start_sshd(d, "open", host_key, authorized, [])
        locked_box = start_sshd(
            d, "locked", host_key, authorized, ["AllowStreamLocalForwarding no", "AllowTcpForwarding no"]
        )
    except SshdUnavailable as exc:
        pytest.skip(str(exc))
    known_hosts = d / "known_hosts"
    known_hosts.write_text("".join(known_hosts_line(s.port, host_key) for s in (open_box, locked_box)))
    yield Lab(d, open_box, locked_box, user_key, stranger_key, host_key, known_hosts, authorized)
    open_box.stop()
    locked_box.stop()


def start_job(directory: Path, runtime: Path, name: str, *args: str) -> subprocess.Popen[str]:
    script = directory / "job.py"
    script.write_text(textwrap.dedent(JOB))
    env = dict(os.environ, ICSMON_RUNTIME_DIR=str(runtime), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    before = set(runtime.glob("*.json"))
    proc = subprocess.Popen(
        [sys.executable, str(script), name, *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        eventually(
            lambda: set(runtime.glob("*.json")) - before or proc.poll() is not None,
            "the training job's discovery file",
            60,
        )
    except AssertionError:
        proc.kill()
        raise
    assert proc.poll() is None, proc.communicate()[1]
    return proc


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """One training job for the module, "on the GPU box": its runtime dir is the remote one."""
    runtime = tmp_path_factory.mktemp("remote_rt")
    proc = start_job(runtime.parent, runtime, "trainer")
    yield proc, runtime
    proc.kill()
    proc.wait()


@dataclass
class Viewer:
    """The person's side: an empty runtime dir of its own, a private TMPDIR, the ssh config."""

    env: dict[str, str]
    tmp: Path
    config: Path
    servers: list[Sshd]

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return icsmon(*args, env=self.env, timeout=timeout)

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "icsmon", *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def assert_nothing_left(self) -> None:
        """No process still names our private directory (the ssh master does, with -S), no file left."""
        eventually(
            lambda: not processes_mentioning(str(self.tmp)),
            "no process left naming the private directory",
            10,
            lambda: processes_mentioning(str(self.tmp)),
        )
        assert list(self.tmp.iterdir()) == [], list(self.tmp.rglob("*"))
        # and the servers see no connection left (their session processes go once ours closed)
        eventually(lambda: not any(s.sessions() for s in self.servers), "the servers' sessions to end", 10)


def make_viewer(lab: Lab, base: Path, remote_runtime: Path, *extra_hosts: str) -> Viewer:
    base.mkdir(parents=True, exist_ok=True)
    # A short TMPDIR of its own: the CLI's private dir (control socket, forwards) goes in there,
    # where the test can look for leftovers (a long one would make the CLI fall back to /tmp).
    tmp = Path(tempfile.mkdtemp(prefix="v", dir=lab.dir))
    own_rt = base / "viewer_rt"
    own_rt.mkdir(exist_ok=True)
    setenv = {"SetEnv": f"ICSMON_RUNTIME_DIR={remote_runtime}"}
    config = base / "ssh_config"
    config.write_text(
        host_entry("gpu-box", lab.open_box.port, lab.user_key, lab.known_hosts, **setenv)
        + host_entry("locked-box", lab.locked_box.port, lab.user_key, lab.known_hosts, **setenv)
        + host_entry("stranger-box", lab.open_box.port, lab.stranger_key, lab.known_hosts, **setenv)
        + host_entry("closed-box", free_port(), lab.user_key, lab.known_hosts)
        + host_entry("lost-box", 22, lab.user_key, lab.known_hosts, hostname="no-such-host.invalid")
        + "".join(extra_hosts)
    )
    env = dict(os.environ)
    env.update(
        ICSMON_RUNTIME_DIR=str(own_rt),
        ICSMON_SSH_COMMAND=f"ssh -F {config}",
        TMPDIR=str(tmp),
        PYTHONUNBUFFERED="1",
    )
    return Viewer(env, tmp, config, [lab.open_box, lab.locked_box])


@pytest.fixture
def viewer(lab: Lab, job: tuple[subprocess.Popen[str], Path], tmp_path: Path) -> Viewer:
    return make_viewer(lab, tmp_path / "v", job[1])


def test_list_over_ssh_shows_the_job(viewer: Viewer, job: tuple[subprocess.Popen[str], Path]) -> None:
    proc, runtime = job
    table = viewer.run("list", "gpu-box")
    assert table.returncode == 0, table.stderr
    assert "PID" in table.stdout and "trainer" in table.stdout and str(proc.pid) in table.stdout
    listing = viewer.run("list", "gpu-box", "--json")
    assert listing.returncode == 0, listing.stderr
    (found,) = json.loads(listing.stdout)
    assert found["pid"] == proc.pid and found["name"] == "trainer"
    assert found["endpoint"].startswith(f"ipc://{runtime}/")
    # the viewer's own runtime dir is empty: the job was found over SSH, not locally
    assert viewer.run("list", "--json").stdout.strip() == "[]"
    viewer.assert_nothing_left()


def test_tail_over_ssh_prints_samples(viewer: Viewer, job: tuple[subprocess.Popen[str], Path]) -> None:
    tail = viewer.run("tail", "gpu-box", "--json", "--count", "5", "--timeout", "60")
    assert tail.returncode == 0, tail.stderr
    lines = json_lines(tail.stdout)
    assert len(lines) == 5 and all(line["type"] == "sample" for line in lines)
    assert lines[0]["run"].startswith("trainer") and set(lines[0]["layers"]) == {"0", "1", "2"}
    steps = [line["step"] for line in lines]
    assert steps == sorted(steps)
    viewer.assert_nothing_left()


def test_several_jobs_pick_by_pid_run_or_newest_then_one_is_killed(
    lab: Lab, job: tuple[subprocess.Popen[str], Path], tmp_path: Path
) -> None:
    first, runtime = job
    viewer = make_viewer(lab, tmp_path / "v", runtime)
    second = start_job(tmp_path, runtime, "second", "tcp")  # also covers a tcp:// endpoint
    try:
        newest = viewer.run("tail", "gpu-box", "--json", "-n", "2", "--timeout", "60")
        assert newest.returncode == 0, newest.stderr
        assert {line["run"].split("-")[0] for line in json_lines(newest.stdout)} == {"second"}
        assert "2 jobs running on gpu-box; taking the most recent" in newest.stderr

        by_pid = viewer.run(
            "tail", "gpu-box", "--pid", str(first.pid), "--json", "-n", "2", "--timeout", "60"
        )
        assert by_pid.returncode == 0, by_pid.stderr
        assert {line["run"].split("-")[0] for line in json_lines(by_pid.stdout)} == {"trainer"}
        assert "taking the most recent" not in by_pid.stderr

        by_run = viewer.run("tail", "gpu-box", "--run", "second", "--json", "-n", "1", "--timeout", "60")
        assert by_run.returncode == 0 and json_lines(by_run.stdout)[0]["run"].startswith("second")

        wrong = viewer.run("tail", "gpu-box", "--pid", "1", "-n", "1")
        assert wrong.returncode == 1 and "no icsmon job with pid 1 on gpu-box" in wrong.stderr

        # the job dies without a goodbye while tail follows it: tail notices and says so
        follower = viewer.start("tail", "gpu-box", "--run", "second")
        assert follower.stdout is not None
        assert first_sample_line(follower.stdout).startswith("step")
        second.kill()
        second.wait()  # reaped, as a remote job's parent would: a zombie still answers kill -0
        _, err = follower.communicate(timeout=60)
        assert follower.returncode == 0, err
        assert "the job ended" in err and "second" in err
    finally:
        second.kill()
        second.wait()
    viewer.assert_nothing_left()


@pytest.mark.parametrize(
    ("host", "says"),
    [
        ("lost-box", "no job named 'lost-box'"),
        ("closed-box", "closed-box refused the SSH connection"),
        ("stranger-box", "authentication to stranger-box failed"),
        ("-oProxyCommand=x", "is not an SSH host"),
    ],
)
def test_connection_failures_say_what_happened(viewer: Viewer, host: str, says: str) -> None:
    for command in ("list", "tail"):
        proc = viewer.run(command, host) if not host.startswith("-") else viewer.run(command, "--", host)
        assert proc.returncode == 1, (command, proc.stderr)
        assert proc.stderr.startswith("icsmon: ") and says in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and proc.stdout == ""
    viewer.assert_nothing_left()


def test_no_jobs_on_the_host(lab: Lab, tmp_path: Path) -> None:
    empty = tmp_path / "empty_rt"
    empty.mkdir()
    viewer = make_viewer(lab, tmp_path / "v", empty)
    listing = viewer.run("list", "gpu-box")
    assert listing.returncode == 0 and listing.stdout.strip() == "no icsmon job running on gpu-box"
    tail = viewer.run("tail", "gpu-box")
    assert tail.returncode == 1
    assert "no icsmon job is running on gpu-box" in tail.stderr and f"looked in {empty}" in tail.stderr
    viewer.assert_nothing_left()


def test_sshd_that_forbids_forwarding(viewer: Viewer) -> None:
    listing = viewer.run("list", "locked-box", "--json")  # listing needs no forward
    assert listing.returncode == 0 and len(json.loads(listing.stdout)) == 1
    tail = viewer.run("tail", "locked-box", "-n", "1")
    assert tail.returncode == 1 and tail.stdout == ""
    assert "refused to forward" in tail.stderr and "AllowStreamLocalForwarding no" in tail.stderr
    assert "ssh -t locked-box icsmon attach" in tail.stderr
    viewer.assert_nothing_left()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_interrupted_tail_leaves_nothing(viewer: Viewer, lab: Lab, sig: int) -> None:
    follower = viewer.start("tail", "gpu-box")
    assert follower.stdout is not None
    assert first_sample_line(follower.stdout).startswith("step")
    assert len(lab.open_box.sessions()) > 0
    assert processes_mentioning(str(viewer.tmp)), "the ssh master runs (in the private dir) meanwhile"
    follower.send_signal(sig)
    _, err = follower.communicate(timeout=30)
    assert "Traceback" not in err
    assert follower.returncode == (0 if sig == signal.SIGINT else 128 + sig), err
    viewer.assert_nothing_left()


def test_dropped_connection_ends_tail_with_an_error(
    lab: Lab, job: tuple[subprocess.Popen[str], Path], tmp_path: Path
) -> None:
    flaky = start_sshd(lab.dir, "flaky", lab.host_key, lab.authorized, [])
    try:
        with lab.known_hosts.open("a") as fh:
            fh.write(known_hosts_line(flaky.port, lab.host_key))
        extra = host_entry(
            "flaky-box", flaky.port, lab.user_key, lab.known_hosts, SetEnv=f"ICSMON_RUNTIME_DIR={job[1]}"
        )
        viewer = make_viewer(lab, tmp_path / "v", job[1], extra)
        follower = viewer.start("tail", "flaky-box")
        assert follower.stdout is not None
        assert first_sample_line(follower.stdout).startswith("step")
        flaky.stop()  # the server and every session of it: the link is gone
        _, err = follower.communicate(timeout=60)
        assert follower.returncode == 1, err
        assert "the SSH connection to flaky-box dropped" in err and "Traceback" not in err
        viewer.assert_nothing_left()
    finally:
        flaky.stop()


def test_icsmon_ssh_command_that_cannot_run(viewer: Viewer) -> None:
    env = dict(viewer.env, ICSMON_SSH_COMMAND="no-such-ssh-client -F x")
    proc = icsmon("list", "gpu-box", env=env)
    assert proc.returncode == 1 and "cannot run 'no-such-ssh-client'" in proc.stderr
    env["ICSMON_SSH_COMMAND"] = "ssh 'unbalanced"
    proc = icsmon("list", "gpu-box", env=env)
    assert proc.returncode == 1 and "ICSMON_SSH_COMMAND cannot be parsed" in proc.stderr
    viewer.assert_nothing_left()


class Tmux:
    """A private tmux server: what a person at a terminal would see and type."""

    def __init__(self, directory: Path) -> None:
        self.socket = directory / "tmux.sock"

    def start(self, command: str, env: dict[str, str], directory: Path) -> None:
        script = directory / "session.sh"
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items() if k.isidentifier())
        script.write_text(f"{exports}{command}\necho EXIT=$?\nsleep 60\n")
        self._tmux("new-session", "-d", "-x", "160", "-y", "40", f"sh {shlex.quote(str(script))}")

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p").stdout

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", *keys)

    def kill(self) -> None:
        subprocess.run(["tmux", "-S", str(self.socket), "kill-server"], capture_output=True)

    def _tmux(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["tmux", "-S", str(self.socket), *args], capture_output=True, text=True, check=True
        )


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    if not shutil.which("tmux"):
        pytest.skip("no tmux (./scripts/install-system-deps installs it)")
    t = Tmux(tmp_path)
    yield t
    t.kill()


def test_attach_over_ssh_shows_the_live_table_and_quits_clean(
    viewer: Viewer, tmux: Tmux, tmp_path: Path, job: tuple[subprocess.Popen[str], Path]
) -> None:
    tmux.start(f"{shlex.quote(sys.executable)} -m icsmon attach gpu-box", viewer.env, tmp_path)
    eventually(
        lambda: "● live" in tmux.screen() and "trainer" in tmux.screen(), "the app live", 60, tmux.screen
    )
    screen = tmux.screen()
    assert f"pid {job[0].pid}" in screen and "layer" in screen
    assert processes_mentioning(str(viewer.tmp)), "the ssh master runs while the app is open"
    tmux.keys("q")
    eventually(lambda: "EXIT=0" in tmux.screen(), "exit status 0", 30, tmux.screen)
    viewer.assert_nothing_left()


def test_attach_inside_an_ssh_session_on_the_box(
    viewer: Viewer, tmux: Tmux, tmp_path: Path, job: tuple[subprocess.Popen[str], Path]
) -> None:
    # The other documented way: `ssh -t gpu-box icsmon attach`, the app running on the box itself.
    # The "box" is this machine, so the interpreter's path names an icsmon installed there.
    remote = f"{shlex.quote(sys.executable)} -m icsmon attach"
    tmux.start(f"ssh -F {viewer.config} -t gpu-box {shlex.quote(remote)}", viewer.env, tmp_path)
    eventually(
        lambda: "● live" in tmux.screen() and "trainer" in tmux.screen(), "the app live", 60, tmux.screen
    )
    assert f"pid {job[0].pid}" in tmux.screen()
    tmux.keys("q")
    eventually(lambda: "EXIT=0" in tmux.screen(), "exit status 0", 30, tmux.screen)


def test_attach_to_a_box_that_forbids_forwarding_says_so_before_the_app(
    viewer: Viewer, tmux: Tmux, tmp_path: Path
) -> None:
    tmux.start(f"{shlex.quote(sys.executable)} -m icsmon attach locked-box", viewer.env, tmp_path)
    eventually(lambda: "EXIT=1" in tmux.screen(), "exit status 1", 60, tmux.screen)
    assert "AllowStreamLocalForwarding no" in tmux.screen().replace("\n", "")
    viewer.assert_nothing_left()


def test_attach_without_a_terminal_is_refused_before_connecting(viewer: Viewer) -> None:
    proc = viewer.run("attach", "gpu-box")
    assert proc.returncode == 1 and "attach needs a terminal" in proc.stderr
    assert "icsmon tail gpu-box" in proc.stderr
    viewer.assert_nothing_left()


def test_connect_again_after_the_master_died_reopens_without_prompting(
    viewer: Viewer, job: tuple[subprocess.Popen[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the app does when the link drops: connect() re-opens the master and the forward."""
    from icsmon.subscriber import Subscriber
    from icsmon.targets.remote import RemoteTarget
    from icsmon_agent.protocol import Sample

    for key in ("ICSMON_SSH_COMMAND", "TMPDIR"):
        monkeypatch.setenv(key, viewer.env[key])
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR

    def one_sample(endpoint: str) -> bool:
        with Subscriber(endpoint) as sub:
            for batch in sub.messages(time.monotonic() + 30):
                if any(isinstance(m, Sample) for m in batch):
                    return True
        return False

    with RemoteTarget("gpu-box") as remote:
        remote.open()
        first = remote.connect()
        assert one_sample(first)
        old_master = remote.conn.master_pid
        assert old_master is not None
        os.kill(old_master, signal.SIGKILL)  # the link is gone, as if the network dropped
        eventually(lambda: not remote.conn.alive(), "the master connection closed", 10)
        second = remote.connect()
        assert remote.conn.master_pid not in (None, old_master)
        assert second != first and one_sample(second)
        assert remote.job is not None and remote.job.pid == job[0].pid
    viewer.assert_nothing_left()


def test_one_tail_follows_a_job_across_two_nodes(
    lab: Lab, job: tuple[subprocess.Popen[str], Path], tmp_path: Path
) -> None:
    """``node1,node2``: each host's job forwarded, one stream each, in one tail (and one listing)."""
    _, runtime = job
    other_runtime = tmp_path / "node2_rt"
    other_runtime.mkdir()
    node2 = host_entry(
        "node2",
        lab.open_box.port,
        lab.user_key,
        lab.known_hosts,
        SetEnv=f"ICSMON_RUNTIME_DIR={other_runtime}",
    )
    viewer = make_viewer(lab, tmp_path / "v", runtime, node2)
    other = start_job(tmp_path, other_runtime, "other")
    try:
        listing = viewer.run("list", "gpu-box,node2", "--json")
        assert listing.returncode == 0, listing.stderr
        assert {j["name"] for j in json.loads(listing.stdout)} == {"trainer", "other"}
        # Not --count: one job's re-sent history alone could fill it. Both send within seconds.
        tail = viewer.run("tail", "gpu-box,node2", "--json", "--timeout", "8")
        assert tail.returncode == 0, tail.stderr
        names = {line["run"].split("-")[0] for line in json_lines(tail.stdout) if line["type"] == "sample"}
        assert names == {"trainer", "other"}
    finally:
        other.kill()
        other.wait()
    viewer.assert_nothing_left()
