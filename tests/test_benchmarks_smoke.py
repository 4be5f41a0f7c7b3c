"""Each benchmark script runs end to end in its --quick mode and prints its table.

Only that it runs and what it prints are checked, never a timing: the figures themselves are
measured by running the scripts (see benchmarks/README.md), not by CI.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real processes: `make check` leaves it out

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script: str, env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_overhead_quick(env: dict[str, str]) -> None:
    out = _run("overhead.py", env, "--no-tensorboard")
    assert "wall ratio" in out
    assert "every=1+viewer" in out
    assert "<= 1.10" in out
    assert "agent faults: 0" in out


def test_memory_quick(env: dict[str, str]) -> None:
    out = _run("memory.py", env)
    assert "agent growth after step" in out


@pytest.mark.parametrize("viewer", ["tail", "app"])
def test_viewer_quick(env: dict[str, str], viewer: str) -> None:
    out = _run("viewer.py", env, "--viewer", viewer)
    assert "p99 ms" in out
    assert "tail --json" in out if viewer == "tail" else "app (headless)" in out


def test_compiled_quick(env: dict[str, str]) -> None:
    """Each watched compiled copy streams samples and Dynamo counts no graph break for it."""
    out = _run("compiled.py", env)
    rows = {
        line.split()[0]: line.split()
        for line in out.splitlines()
        if line.startswith(("bare", "default", "every"))
    }
    assert set(rows) == {"bare", "default+viewer", "every=1+viewer"}
    for name in ("default+viewer", "every=1+viewer"):
        recompiles, breaks, samples = (int(v) for v in rows[name][3:6])
        assert recompiles <= 2 and breaks == 0 and samples > 0, out
