"""A job nobody watches is still protected: its own rules judge every sample, its log says the
alerts, a command and a callback receive them, ``stop_on`` stops it, and its history is kept for
``icsmon replay PID``. Real training processes, no viewer unless a test attaches one late."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import icsmon_agent
from helpers import icsmon, json_lines, start_script, wait_for_jobs
from icsmon_agent.alerts.model import Alert

pytestmark = pytest.mark.slow  # real processes: `make check` leaves it out


def test_a_diverging_job_with_no_viewer_says_it_before_its_first_nan(
    tmp_path: Path, env: dict[str, str], state_dir: Path
) -> None:
    """The seed's diverging MLP at the agent's own cadence, no viewer, no record=: its stderr names
    the explosion at a step before the first non-finite loss; the ICSMON_ON_ALERT command gets the
    alert as JSON; once it ended, `icsmon replay PID --json` prints its samples and alerts."""
    received = tmp_path / "alerts.jsonl"
    env = env | {"ICSMON_ON_ALERT": f"cat >> {received}"}
    job = subprocess.run(
        [sys.executable, "-m", "icsmon.demo.train", "exploding", "--every", "0"],
        env=env, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    summary = json.loads(job.stdout.splitlines()[-1])
    first_nan = summary["first_nonfinite_loss_step"]
    assert first_nan is not None, summary
    said = [line for line in job.stderr.splitlines() if line.startswith("icsmon: ")]
    assert len([line for line in said if "to look: icsmon attach" in line]) == 1, said
    exploding = [re.search(r"exploding: .* at step (\d+)", line) for line in said]
    steps = [int(m.group(1)) for m in exploding if m]
    assert steps and min(steps) < first_nan, said
    assert all("hint: " in line for line in said if re.match(r"icsmon: (warning|critical) ", line))

    deadline = time.monotonic() + 30  # the command runs on the agent's own thread: it may lag
    while (
        "exploding" not in (received.read_text() if received.exists() else "") and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    hooked = json_lines(received.read_text())
    assert any(a["rule"] == "exploding" and a["step"] < first_nan for a in hooked), hooked

    pid = str(json.loads(next(state_dir.glob("*.json")).read_text())["job"]["pid"])
    listed = icsmon("list", "--ended", env=env, check=True).stdout
    assert pid in listed and "exploding" in listed, listed
    replayed = json_lines(icsmon("replay", pid, "--json", env=env, check=True).stdout)
    samples = [r for r in replayed if r["type"] == "sample"]
    alerts = [r for r in replayed if r["type"] == "alert"]
    assert samples and max(s["step"] for s in samples) >= first_nan
    assert {a["rule"] for a in alerts} >= {"exploding", "nonfinite"}, alerts
    # The job's own alerts, said once each: the viewer did not judge the recording again.
    assert len({(a["rule"], a["step"]) for a in alerts}) == len(alerts)
    assert [a["step"] for a in alerts] == [a["step"] for a in hooked][: len(alerts)]


def test_a_plain_loop_stops_within_a_step_of_its_first_nan(runtime_dir: Path) -> None:
    """`stop_on=("nonfinite",)` and `mon.should_stop` in a plain loop at the default cadence: the
    step's own loss is checked every step, sampled or not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = icsmon_agent.watch(model, stop_on=("nonfinite",), quiet=True)
    stopped = None
    for step in range(200):
        x = torch.randn(16, 8) * (float("nan") if step == 50 else 1.0)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(loss=loss)
        if mon.should_stop:
            stopped = step
            break
    reason = mon.stop_reason
    mon.close()
    assert stopped == 50
    assert reason is not None and reason.rule == "nonfinite" and reason.step == 50


def test_on_alert_gets_each_alert_off_the_training_thread_and_its_error_costs_nothing(
    runtime_dir: Path,
) -> None:
    """A callback that raises is the user's bug: said once, training goes on, alerts go on."""
    import threading

    got: list[tuple[Alert, str]] = []

    def on_alert(alert: Alert) -> None:
        got.append((alert, threading.current_thread().name))
        raise RuntimeError("the user's callback is broken")

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    mon = icsmon_agent.watch(model, every=1, on_alert=on_alert, quiet=True)
    for step in range(40):
        x = torch.randn(16, 8) * (float("nan") if step >= 10 else 1.0)
        model(x).sum().backward()
        mon.step()
    deadline = time.monotonic() + 30
    while "nonfinite" not in [a.rule for a, _ in got] and time.monotonic() < deadline:
        time.sleep(0.05)
    mon.close()
    said = [(a.rule, a.step, a.severity) for a, _ in got]
    nan = [a for a, _ in got if a.rule == "nonfinite"]
    assert len(nan) == 1, said  # once: it stays active, never fires again
    assert nan[0].step >= 10 and nan[0].severity == "critical", said
    assert got[0][0].rule != "nonfinite", said  # an earlier alert's callback raised; this one still came
    assert all(thread != threading.main_thread().name for _, thread in got)


def test_a_viewer_attaching_late_sees_the_active_alert_at_once(tmp_path: Path, env: dict[str, str]) -> None:
    """An alert fired long before the viewer came (more samples ago than the re-sent history holds)
    is shown at once, marked as re-sent and still active; tail prints it without --history."""
    script = tmp_path / "sick.py"
    script.write_text(
        textwrap.dedent("""
        import time, torch
        from torch import nn
        import icsmon_agent
        model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        mon = icsmon_agent.watch(model, every=1, name="sick", quiet=True)
        for step in range(100_000):
            x = torch.randn(4, 8) * (float("nan") if step == 5 else 1.0)  # NaN weights from here on
            opt.zero_grad(); model(x).sum().backward(); opt.step(); mon.step()
            time.sleep(0.005)
    """)
    )
    job = start_script(script, env)
    try:
        wait_for_jobs(env)
        time.sleep(3.0)  # hundreds of samples: the alert is older than the re-sent history
        out = icsmon("tail", "--json", "-n", "1", env=env, check=True).stdout
        alerts = [r for r in json_lines(out) if r["type"] == "alert"]
        assert [a["rule"] for a in alerts] == ["nonfinite"], out  # once: the viewer did not judge again
        assert alerts[0]["replayed"] is True and alerts[0]["step"] == 5
    finally:
        job.kill()
        job.wait()


def test_the_job_says_where_to_look_once_and_quiet_silences_it(tmp_path: Path, env: dict[str, str]) -> None:
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent("""
        import sys, torch
        from torch import nn
        import icsmon_agent
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        mon = icsmon_agent.watch(model, name="hello")
        for _ in range(5):
            model(torch.randn(4, 8)).sum().backward(); mon.step()
        mon.close()
    """)
    )
    loud = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    lines = loud.stderr.splitlines()
    assert len([line for line in lines if line.startswith("icsmon: watching")]) == 1, loud.stderr
    assert re.search(r"to look: icsmon attach \d+", loud.stderr)
    quiet = subprocess.run(
        [sys.executable, str(script)],
        env=env | {"ICSMON_QUIET": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "icsmon:" not in quiet.stderr, quiet.stderr
