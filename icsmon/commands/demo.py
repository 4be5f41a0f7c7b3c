"""``icsmon demo``: train one of the built-in sick (or healthy) networks and watch it.

Starts ``python -m icsmon.demo.train SCENARIO`` (one process per run of the scenario) with the
agent, waits for the jobs' discovery files, then opens the terminal app on them, or with
``--headless`` prints the tail (samples and alert lines). The training processes are ours: they are
stopped when the viewer exits, on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

from icsmon.alerts.config import Thresholds, add_threshold_flags, thresholds_from_args
from icsmon.commands.common import error, note, positive_int
from icsmon.demo.scenarios import DEFAULT, SCENARIOS, Scenario
from icsmon.errors import IcsmonError
from icsmon.targets import live_endpoints
from icsmon_agent import discovery
from icsmon_agent.discovery import JobInfo

#: Importing torch on a cold or busy machine takes a while: after this long the demo says it still
#: waits, and gives up only after START_GIVE_UP_S (or when a training process died).
START_PATIENCE_S = 20.0
START_GIVE_UP_S = 300.0
STOP_GRACE_S = 3.0
#: Slow motion for the terminal app: the nets train faster than anyone can read (the default
#: scenario's uncapped run explodes at ~step 110: about half a minute on screen).
INTERACTIVE_DELAY_S = 0.15


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="train a built-in network (healthy or sick) and watch it",
        description="Train one of the built-in scenarios (the classic failure modes of deep nets) in a "
        "subprocess with the agent, and open the viewer on it. `icsmon demo --list` describes them.",
        epilog=f"Default scenario: {DEFAULT}. Exit status: 0 when the training ended or you quit, 1 if a "
        "training process failed, 2 for bad usage.",
    )
    p.add_argument(
        "scenario", nargs="?", default=DEFAULT, metavar="SCENARIO", help=f"one of {', '.join(SCENARIOS)}"
    )
    p.add_argument("--list", action="store_true", help="describe the scenarios and exit")
    p.add_argument("--headless", action="store_true", help="print the tail (samples and alerts), no app")
    p.add_argument("--json", action="store_true", help="with --headless: JSON lines, as `icsmon tail --json`")
    p.add_argument("--steps", type=positive_int, metavar="N", help="training steps (default: the scenario's)")
    p.add_argument(
        "--every", type=positive_int, default=1, metavar="N", help="sample every N steps (default 1)"
    )
    p.add_argument(
        "--threads", type=positive_int, default=1, metavar="N", help="torch CPU threads a run (default 1)"
    )
    p.add_argument(
        "--delay",
        type=float,
        metavar="S",
        help=f"sleep S seconds per step (default {INTERACTIVE_DELAY_S} in the app, 0 headless)",
    )
    add_threshold_flags(p)
    p.set_defaults(func=run)


def describe(as_json: bool) -> int:
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "name": s.name,
                        "summary": s.summary,
                        "expect": s.expect,
                        "runs": [n.label for n in s.nets],
                    }
                    for s in SCENARIOS.values()
                ],
                indent=1,
            )
        )
        return 0
    print("Scenarios (icsmon demo SCENARIO; batch 128, synthetic 10-class task, SGD momentum 0.9):")
    for s in SCENARIOS.values():
        mark = "  (default)" if s.name == DEFAULT else ""
        print(f"\n  {s.name}{mark}\n    {s.summary}\n    expect: {s.expect}")
    print(
        f"\nThe default, {DEFAULT}, shows the most in the least time: the uncapped run's alerts fire "
        "before its loss turns NaN, while the capped run trains on without one.\n"
        "In the app a scenario's runs open side by side (c: one run's layer table, n: the next run) "
        "and stay on screen after they end, until you quit (q)."
    )
    return 0


@dataclass
class DemoJob:
    label: str
    proc: subprocess.Popen[str]
    log: IO[str]  # the process's stderr (kept off the terminal: the app owns it)
    job: JobInfo | None = None


def start_jobs(
    scenario: Scenario, args: argparse.Namespace, logdir: Path, wait_viewer: float
) -> list[DemoJob]:
    delay = args.delay if args.delay is not None else (0.0 if args.headless else INTERACTIVE_DELAY_S)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    jobs: list[DemoJob] = []
    try:
        for net in scenario.nets:
            cmd = [sys.executable, "-m", "icsmon.demo.train", scenario.name, "--net", net.label]
            cmd += ["--every", str(args.every), "--wait-viewer", str(wait_viewer), "--delay", str(delay)]
            cmd += ["--threads", str(args.threads)]
            if args.steps is not None:
                cmd += ["--steps", str(args.steps)]
            log = (logdir / f"{net.label}.log").open("w+")
            try:
                proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
            except BaseException:
                log.close()
                raise
            jobs.append(DemoJob(net.label, proc, log))
    except BaseException:
        stop(jobs)  # a later start failed: the ones already started must not outlive us
        raise
    return jobs


def log_tail(job: DemoJob, lines: int = 15) -> str:
    job.log.flush()
    job.log.seek(0)
    return "".join(job.log.readlines()[-lines:]).rstrip()


def wait_for_discovery(
    jobs: list[DemoJob], timeout: float = START_GIVE_UP_S, say: Callable[[str], None] = note
) -> str | None:
    """Fill in each job's discovery record; an error message if one died or never showed up."""
    started = time.monotonic()
    deadline = started + timeout
    patient = started + START_PATIENCE_S
    while time.monotonic() < deadline:
        if patient and time.monotonic() > patient:
            say(f"still starting (a busy machine imports torch slowly); waiting up to {timeout:g} s in all")
            patient = 0.0
        found = {j.pid: j for j in discovery.read_jobs()}
        for job in jobs:
            if job.job is None:
                job.job = found.get(job.proc.pid)
            if job.job is None and job.proc.poll() is not None:
                return f"the {job.label} training process exited ({job.proc.returncode}) before it started:\n{log_tail(job)}"
        if all(j.job is not None for j in jobs):
            return None
        time.sleep(0.1)
    return f"the training process did not start within {timeout:g} s"


def stop(jobs: list[DemoJob]) -> None:
    for job in jobs:
        if job.proc.poll() is None:
            job.proc.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for job in jobs:
        try:
            job.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            job.proc.kill()
            job.proc.wait()


def summaries(jobs: list[DemoJob]) -> list[dict[str, Any]]:
    """Each finished job's last stdout line (its JSON summary)."""
    out = []
    for job in jobs:
        if job.proc.poll() is None or job.proc.stdout is None:
            continue
        lines = [ln for ln in job.proc.stdout.read().splitlines() if ln.strip()]
        with contextlib.suppress(ValueError, IndexError):
            out.append(json.loads(lines[-1]) | {"type": "run_summary", "exit": job.proc.returncode})
    return out


def run(args: argparse.Namespace) -> int:
    if args.list:
        return describe(args.json)
    scenario = SCENARIOS.get(args.scenario)
    if scenario is None:
        return error(
            f"unknown scenario {args.scenario!r}; choose one of: {', '.join(SCENARIOS)} (see --list)"
        )
    thresholds = thresholds_from_args(args)
    if importlib.util.find_spec("torch") is None:
        return error(
            "the demo trains its networks with PyTorch, which this environment lacks: "
            "pip install torch (CPU: --index-url https://download.pytorch.org/whl/cpu), "
            "or run the demo from the repository with `make demo`"
        )
    app: Callable[..., int] | None = None
    if not args.headless:
        from icsmon.tui import run_app  # only here: the headless demo never loads Textual

        app = run_app
    with tempfile.TemporaryDirectory(prefix="icsmon-demo-") as logdir:
        # Headless, the jobs wait for the viewer so the tail sees every sample from step 0.
        jobs = start_jobs(scenario, args, Path(logdir), wait_viewer=10.0 if app is None else 0.0)
        try:
            if not args.json:
                runs = ", ".join(n.label for n in scenario.nets)
                note(f"demo {scenario.name}: starting {runs} (importing torch takes a few seconds)…")
            problem = wait_for_discovery(jobs, say=note if not args.json else lambda _: None)
            if problem:
                return error(problem)
            if app is not None:
                return view_in_app(app, jobs, scenario, thresholds)
            return view_headless(jobs, scenario, args, thresholds)
        except KeyboardInterrupt:
            return 0
        finally:
            stop(jobs)
            discovery.read_jobs()  # a job stopped by SIGTERM leaves its files: reading removes them
            for job in jobs:
                job.log.close()


def view_in_app(
    app: Callable[..., int], jobs: list[DemoJob], scenario: Scenario, thresholds: Thresholds
) -> int:
    infos = [j.job for j in jobs if j.job is not None]
    # Every run at once, side by side; what they sent stays on screen after they end, until q.
    return app(
        partial(live_endpoints, infos),
        title=f"icsmon demo {scenario.name}",
        thresholds=thresholds,
        compare=len(infos) > 1,
    )


def view_headless(
    jobs: list[DemoJob], scenario: Scenario, args: argparse.Namespace, thresholds: Thresholds
) -> int:
    from icsmon.printing import tail_endpoint

    if not args.json:
        note(f"demo {scenario.name}: {scenario.summary}")
        note(f"expect: {scenario.expect}")
    endpoints = [j.job.endpoint for j in jobs if j.job is not None]
    try:
        rc = tail_endpoint(endpoints, as_json=args.json, thresholds=thresholds)
    except IcsmonError as exc:  # what the training processes said comes after, still
        rc = error(str(exc))
    for job in jobs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            job.proc.wait(timeout=10)
    failed = [j for j in jobs if j.proc.poll() not in (0, None)]
    for s in summaries(jobs):
        if args.json:
            print(json.dumps(s), flush=True)
        else:
            nan = s.get("first_nonfinite_loss_step")
            where = f"; first non-finite loss at step {nan}" if nan is not None else ""
            note(f"{s.get('net')}: trained {s.get('steps')} steps{where}")
    for job in failed:
        rc = error(f"the {job.label} training process failed ({job.proc.returncode}):\n{log_tail(job)}")
    return rc
