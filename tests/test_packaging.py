"""Two distributions: the agent installs alone into a training environment (no Textual, no Rich,
no viewer), and a job watched there streams to the viewer installed in another environment."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

from helpers import icsmon, wait_for_jobs

pytestmark = pytest.mark.slow  # real processes: `make check` leaves it out

ROOT = Path(__file__).resolve().parent.parent
JOB = textwrap.dedent(
    """
    import time, torch
    from torch import nn
    import icsmon_agent
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = icsmon_agent.watch(model, every=1, name="alone")
    for step in range(100_000):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step(); mon.step(loss=loss)
        time.sleep(0.02)
    """
)


def test_importing_the_agent_imports_no_viewer_and_no_framework() -> None:
    code = (
        "import sys, icsmon_agent, icsmon_agent.integrations; "
        "bad = [m for m in ('textual', 'rich', 'icsmon', 'transformers', 'lightning', 'pytorch_lightning') "
        "if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "[]"


@pytest.mark.timeout(300)
def test_the_agent_alone_in_a_fresh_environment_streams_to_the_viewer(
    tmp_path: Path, env: dict[str, str]
) -> None:
    where = tmp_path / "training-env"
    venv.create(where, with_pip=True)
    python = where / "bin" / "python"
    torch = f"torch=={__import__('torch').__version__.split('+')[0]}"  # the one this machine has
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(ROOT / "agent"), torch],
        capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    if install.returncode != 0 and "No matching distribution" in install.stderr:
        pytest.skip(f"no {torch} wheel for a fresh environment here")
    assert install.returncode == 0, install.stderr[-2000:]
    found = subprocess.run(
        [str(python), "-c", "import importlib.util as u, json; "
         "print(json.dumps({m: u.find_spec(m) is not None for m in ('textual', 'rich', 'icsmon', 'icsmon_agent')}))"],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    )  # fmt: skip
    assert json.loads(found.stdout) == {
        "textual": False,
        "rich": False,
        "icsmon": False,
        "icsmon_agent": True,
    }
    script = tmp_path / "job.py"
    script.write_text(JOB)
    job = subprocess.Popen(
        [str(python), str(script)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_jobs(env)
        tail = icsmon("tail", "--json", "-n", "3", env=env, check=True)  # the viewer, in its own environment
        samples = [json.loads(line) for line in tail.stdout.splitlines()]
        assert [s["type"] for s in samples] == ["sample"] * 3 and samples[0]["run"].startswith("alone")
    finally:
        job.kill()
        job.wait()


def readme_install_lines() -> list[str]:
    """The commands of README's Install block, as a reader copies them."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Install") :]
    block = section[section.index("```sh") + len("```sh") : section.index("```", section.index("```sh") + 5)]
    return [line.split("#")[0].strip() for line in block.strip().splitlines() if line.strip()]


@pytest.mark.timeout(600)
def test_the_readmes_install_lines_work_verbatim(tmp_path: Path) -> None:
    """Each pip line, run as written from the clone's root in a fresh environment whose pip is the
    one on PATH, installs what it says; the viewer then runs, and its demo says in one line that it
    needs torch there. The pipx line runs where pipx is installed (checked by hand with pipx 1.1.0,
    Debian's, and 1.18)."""
    lines = readme_install_lines()
    assert [line.split()[0] for line in lines] == ["pip", "pip", "python3"] and "pipx install" in lines[2]
    for n, line in enumerate(lines[:2]):
        where = tmp_path / f"env{n}"
        venv.create(where, with_pip=True)
        path = f"{where / 'bin'}:{os.environ['PATH']}"
        done = subprocess.run(
            ["bash", "-c", line + " -q"], cwd=ROOT, env=dict(os.environ, PATH=path),
            capture_output=True, text=True, timeout=500,
        )  # fmt: skip
        assert done.returncode == 0, (line, done.stderr[-2000:])
    viewer = tmp_path / "env1" / "bin" / "icsmon"
    assert subprocess.run([str(viewer), "--version"], capture_output=True, text=True, check=True).stdout
    demo = subprocess.run([str(viewer), "demo", "--headless"], capture_output=True, text=True, timeout=60)
    assert demo.returncode == 1 and "Traceback" not in demo.stderr and "pip install torch" in demo.stderr
    if shutil.which("pipx"):
        home = tmp_path / "pipx"
        env = dict(os.environ, PIPX_HOME=str(home), PIPX_BIN_DIR=str(home / "bin"))
        done = subprocess.run(
            ["bash", "-c", lines[2]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=500
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert (
            subprocess.run([str(home / "bin" / "icsmon"), "--version"], capture_output=True).returncode == 0
        )
