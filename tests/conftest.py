from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where every job a test starts keeps its history: a directory of the test's own, never the
    user's (subprocesses inherit it through ``env``)."""
    path = Path(tmp_path_factory.mktemp("state")) / "history"
    monkeypatch.setenv("ICSMON_STATE_DIR", str(path))
    return path


@pytest.fixture
def runtime_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private runtime dir for discovery files and ipc sockets, set in the environment."""
    # A short base keeps ipc:// paths under the 107-byte unix socket limit.
    path = Path(tmp_path_factory.mktemp("rt"))
    monkeypatch.setenv("ICSMON_RUNTIME_DIR", str(path))
    return path


@pytest.fixture
def env(runtime_dir: Path) -> dict[str, str]:
    """Environment for subprocesses: the runtime dir, unbuffered output, one CPU thread."""
    e = dict(os.environ)
    e["ICSMON_RUNTIME_DIR"] = str(runtime_dir)
    e["PYTHONUNBUFFERED"] = "1"
    e["OMP_NUM_THREADS"] = "1"
    e.pop("NO_COLOR", None)
    return e
