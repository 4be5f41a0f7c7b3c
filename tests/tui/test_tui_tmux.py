"""End to end in a real terminal: a training job with the two lines, `icsmon attach` in tmux,
keys sent with send-keys, the screen read back with capture-pane."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_tui_live import N_LAYERS, SCRIPT

from helpers import wait_for_jobs

pytestmark = [
    pytest.mark.slow,
    pytest.mark.tmux,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux"),
]


class Tmux:
    def __init__(self, name: str, env: dict[str, str]) -> None:
        self.name = name
        self.env = env

    def start(self, command: str, width: int = 100, height: int = 30) -> None:
        self.run("new-session", "-d", "-s", self.name, "-x", str(width), "-y", str(height), command)

    def run(self, *args: str) -> str:
        proc = subprocess.run(["tmux", *args], env=self.env, capture_output=True, text=True, timeout=20)
        return proc.stdout

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", self.name)

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", self.name, *keys)

    def wait(self, cond: Callable[[str], bool], what: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if cond(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; the pane shows:\n{text}")
            time.sleep(0.2)


def terminal(tmp_path: Path, env: dict[str, str], name: str) -> Tmux:
    """A tmux of its own (its socket under tmp_path) with a terminal type the app can draw on."""
    return Tmux(name, dict(env, TERM="xterm-256color", TMUX_TMPDIR=str(tmp_path)))


def start_job(tmp_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """The live test's training job, long enough to outlast the test."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    return subprocess.Popen([sys.executable, str(script), "100000"], env=env)


@pytest.mark.timeout(110)
def test_attach_in_tmux(tmp_path: Path, env: dict[str, str]) -> None:
    job = start_job(tmp_path, env)
    status = tmp_path / "status"
    tmux = terminal(tmp_path, env, f"icsmon-{job.pid}")
    try:
        tmux.start(f"{sys.executable} -m icsmon attach; echo EXIT=$? > {status}")
        # The table fills in: every layer's row, live, sparklines drawn.
        text = tmux.wait(lambda t: "● live" in t and "tui-live" in t, "the live table")
        assert "std trend" in text and "status" in text
        tmux.wait(lambda t: any(ch in t for ch in "▁▂▃▄▅▆▇█"), "sparklines")
        # The heatmap, and back.
        tmux.keys("h")
        tmux.wait(lambda t: "log10(std) by depth" in t and f"{N_LAYERS} layers" in t, "the heatmap")
        tmux.keys("Escape")
        tmux.wait(lambda t: "std trend" in t, "the table again")
        # Drill into the second layer, and back.
        # j, not Down: an arrow is an escape sequence that a loaded machine can deliver split
        # across reads (then it reads as Alt+O, B); a human never types that fast, a test does.
        tmux.keys("j")
        tmux.keys("Enter")
        tmux.wait(lambda t: "mean ± std" in t and "layer 1:" in t, "the layer detail")
        tmux.keys("Escape")
        tmux.wait(lambda t: "std trend" in t, "the table again")
        # Help lists the keys.
        tmux.keys("?")
        tmux.wait(lambda t: "Depth × time of log10(std)" in t, "the help")
        tmux.keys("Escape")
        # Wait for the help to close: an Escape followed at once by q reads as Alt+q.
        tmux.wait(lambda t: "Every key and what" not in t and "std trend" in t, "the help to close")
        tmux.keys("q")
        deadline = time.monotonic() + 20
        while not status.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status.read_text().strip() == "EXIT=0"
        assert job.poll() is None  # quitting the viewer leaves the job running
    finally:
        tmux.run("kill-server")
        job.kill()
        job.wait()


def _alive(pid: int) -> bool:
    """Running, not a zombie that nobody reaped yet (the tmux server that forked it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return fields[0] != "Z"


def _gone_within(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _kill(pids: list[int]) -> None:
    """What a failed test leaves behind (an app ignoring SIGHUP, its jobs) must not outlive it."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@linux_only
@pytest.mark.timeout(110)
def test_closing_the_terminal_ends_the_app_even_when_sighup_never_reaches_it(
    tmp_path: Path, env: dict[str, str]
) -> None:
    # The launcher takes the hang-up and does not pass it on (as make does): SIGHUP is ignored
    # from the start, so only the app's look at its terminal can tell it to leave.
    job = start_job(tmp_path, env)
    pidfile = tmp_path / "app.pid"
    tmux = terminal(tmp_path, env, f"icsmon-hup-{job.pid}")
    command = f"sh -c 'echo $$ > {pidfile}; trap \"\" HUP; exec {sys.executable} -m icsmon attach'"
    app_pid: list[int] = []
    try:
        tmux.start(command)
        tmux.wait(lambda t: "● live" in t and "tui-live" in t, "the live table")
        app_pid.append(int(pidfile.read_text()))
        assert _alive(app_pid[0])
        tmux.run("kill-session", "-t", tmux.name)  # the window closes: its terminal hangs up
        assert not _gone_within(app_pid, 15), "the app outlived its terminal"
        assert job.poll() is None  # the job it watched goes on
    finally:
        tmux.run("kill-server")
        _kill(app_pid)
        job.kill()
        job.wait()


@linux_only
@pytest.mark.timeout(110)
@pytest.mark.parametrize("hangup", ["ignored", "default"])
def test_closing_the_terminal_of_the_demo_stops_its_training_jobs(
    tmp_path: Path, env: dict[str, str], hangup: str
) -> None:
    # "ignored": SIGHUP reaches neither the app nor the training jobs (they inherit the launcher's
    # disposition), so the jobs stop only if the app leaves the ordinary way and stops them.
    # "default": SIGHUP reaches all of them; the demo must still leave the ordinary way (its
    # handler), which the removal of its temporary directory shows: a death by SIGHUP leaves it.
    pidfile = tmp_path / "demo.pid"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    tmux = terminal(tmp_path, dict(env, TMPDIR=str(scratch)), f"icsmon-demo-{hangup}-{tmp_path.name}")
    trap = 'trap "" HUP; ' if hangup == "ignored" else ""
    command = f"sh -c 'echo $$ > {pidfile}; {trap}exec {sys.executable} -m icsmon demo --steps 100000'"
    pids: list[int] = []
    try:
        tmux.start(command, 160, 35)
        # No picker: both runs at once, side by side. (A run's column title grows when it ends
        # and can cut the other's name short: its first letters are enough.)
        tmux.wait(
            lambda t: "runs side by side" in t and "uncapp" in t and "capped" in t and "step" in t,
            "the demo's two runs side by side",
        )
        pids = [int(pidfile.read_text()), *(int(j["pid"]) for j in wait_for_jobs(env, 2))]
        assert all(_alive(p) for p in pids)
        assert list(scratch.glob("icsmon-demo-*"))  # the demo's logs of its jobs
        tmux.run("kill-session", "-t", tmux.name)
        left = _gone_within(pids, 20)
        assert not left, f"still running after the terminal closed: {left}"
        assert not list(scratch.glob("icsmon-demo-*")), "the demo did not leave the ordinary way"
        # Its jobs were stopped by a signal; the demo removed their discovery and socket files.
        assert not list(Path(env["ICSMON_RUNTIME_DIR"]).iterdir())
    finally:
        tmux.run("kill-server")
        _kill(pids)
