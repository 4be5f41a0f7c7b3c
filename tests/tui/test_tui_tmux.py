"""End to end in a real terminal: a training job with the two lines, `icsmon attach` in tmux,
keys sent with send-keys, the screen read back with capture-pane."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_tui_live import N_LAYERS, SCRIPT

pytestmark = [
    pytest.mark.tmux,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux"),
]


class Tmux:
    def __init__(self, name: str, env: dict[str, str]) -> None:
        self.name = name
        self.env = env

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


@pytest.mark.timeout(110)
def test_attach_in_tmux(tmp_path: Path, env: dict[str, str]) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    job = subprocess.Popen([sys.executable, str(script), "100000"], env=env)
    status = tmp_path / "status"
    env = dict(env, TERM="xterm-256color", TMUX_TMPDIR=str(tmp_path))
    tmux = Tmux(f"icsmon-{job.pid}", env)
    command = f"{sys.executable} -m icsmon attach; echo EXIT=$? > {status}"
    try:
        tmux.run("new-session", "-d", "-s", tmux.name, "-x", "100", "-y", "30", command)
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
        tmux.wait(lambda t: "Cycle the order" in t, "the help")
        tmux.keys("Escape")
        # Wait for the help to close: an Escape followed at once by q reads as Alt+q.
        tmux.wait(lambda t: "Cycle the order" not in t and "std trend" in t, "the help to close")
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
