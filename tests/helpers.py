"""Shared helpers for tests that run real processes: the CLI, training scripts."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def eventually(
    cond: Callable[[], object], what: str, timeout: float = 30.0, detail: Callable[[], object] | None = None
) -> None:
    """Wait for ``cond()`` to hold, polling; past ``timeout`` (a guard against hanging, never a
    speed limit: a loaded machine takes longer, not another path) fail saying ``what`` was awaited,
    with ``detail()`` (what the screen or the processes showed) when given."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            shown = f":\n{detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{shown}")
        time.sleep(0.05)


def icsmon(
    *args: str, env: dict[str, str], timeout: float = 60, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run the real ``icsmon`` CLI in a subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "icsmon", *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"icsmon {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def start_script(path: Path, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(path), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_jobs(
    env: dict[str, str], n: int = 1, timeout: float = 60, ranks: int = 1
) -> list[dict[str, Any]]:
    """Poll ``icsmon list --json`` until ``n`` jobs show up, the newest with ``ranks`` ranks."""
    deadline = time.monotonic() + timeout
    jobs: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        proc = icsmon("list", "--json", env=env)
        if proc.returncode == 0:
            jobs = json.loads(proc.stdout)
            if len(jobs) >= n and len(jobs[0]["ranks"]) >= ranks:
                return jobs
        time.sleep(0.2)
    raise AssertionError(f"{n} job(s) did not appear within {timeout}s; saw {jobs}")


def wait_watching(mon: Any, sub: Any, timeout: float = 10) -> bool:
    """Poll ``sub`` (an icsmon Subscriber) until the agent ``mon`` sees its subscription; True if
    it did. What arrives meanwhile (the schema) is read and dropped."""
    deadline = time.monotonic() + timeout
    while not mon.watching and time.monotonic() < deadline:
        sub.poll(0.05)
    return bool(mon.watching)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def first_sample_line(stream: Any) -> str:
    """The first sample line `icsmon tail` writes to ``stream``. Alert lines may come before it: the
    rules see the history a job re-sends on connect, which tail prints only with --history."""
    line = stream.readline()
    while line.startswith(("  !!", "     hint:", "  ok")):
        line = stream.readline()
    return str(line)
