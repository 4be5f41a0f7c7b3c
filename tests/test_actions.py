"""What a job does with its alerts (``icsmon_agent.actions``) and how long it keeps its history
(``icsmon_agent.history``): the log's rate limit on an injected clock, a command that fails, hangs
or cannot keep up, and the bounds of the kept history."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest

from helpers import eventually
from icsmon_agent import actions, history
from icsmon_agent.actions import Actions
from icsmon_agent.alerts.model import Alert, AlertChange
from icsmon_agent.discovery import JobInfo


def alert(step: int, rule: str = "exploding", severity: str = "critical") -> Alert:
    return Alert(
        rule, "fc", 3, step, severity, 1e4, f"{rule}: fc Linear std 1e4 at step {step}", "lower the lr"
    )  # type: ignore[arg-type]


def fired(step: int, rule: str = "exploding") -> AlertChange:
    return AlertChange(alert(step, rule))


def test_alert_lines_are_rate_limited_and_what_was_held_back_is_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    acts = Actions(clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="icsmon"):
        for step in range(actions.LINES_PER_MINUTE + 5):
            acts.alert(fired(step))
        assert len(caplog.records) == actions.LINES_PER_MINUTE and acts.held_back == 5
        now[0] = 61.0  # a minute on: the next line says how many were not written
        acts.alert(fired(99))
    last = caplog.records[-1]
    assert last.levelno == logging.ERROR and "exploding: fc Linear" in last.getMessage()
    assert "step 99" in last.getMessage() and "hint: lower the lr" in last.getMessage()
    assert "(5 more alert lines held back)" in last.getMessage()
    acts.alert(AlertChange(alert(100), cleared=True, step=100))  # a clearing is not an alert line
    assert len(caplog.records) == actions.LINES_PER_MINUTE + 1


def test_quiet_writes_nothing_but_stop_on_still_stops(caplog: pytest.LogCaptureFixture) -> None:
    acts = Actions(quiet=True, stop_on=actions.check_stop_on(["exploding"]))
    with caplog.at_level(logging.INFO, logger="icsmon"):
        acts.say("hello")
        acts.alert(fired(7, "dead_relu"))
        assert acts.stop is None
        acts.alert(fired(8))
        acts.alert(fired(9))
    assert caplog.records == []
    assert acts.stop is not None and acts.stop.step == 8  # the first one


def test_stop_on_refuses_what_is_no_rule() -> None:
    with pytest.raises(ValueError, match="unknown \\['nan'\\]"):
        actions.check_stop_on(["nan"])
    with pytest.raises(TypeError, match="not a string"):
        actions.check_stop_on("nonfinite")


def test_the_command_gets_the_alert_as_json_and_its_failures_are_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "got.jsonl"
    acts = Actions(quiet=True, command=f"cat >> {out}; exit 3")
    with caplog.at_level(logging.INFO, logger="icsmon"):
        acts.alert(fired(5))
        acts.alert(fired(6))
        eventually(lambda: acts.failed == 2, "both hooks' failures")
        acts.close()
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(g["type"], g["rule"], g["step"]) for g in got] == [
        ("alert", "exploding", 5),
        ("alert", "exploding", 6),
    ]
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "exited 3" in said[0]  # said once, however often it fails


def test_a_hanging_command_is_killed_and_a_full_queue_drops_without_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(actions, "COMMAND_TIMEOUT_S", 0.5)
    acts = Actions(quiet=True, command="sleep 30")
    started = time.monotonic()
    for step in range(actions.QUEUE_MAX + 10):  # the first hangs; the queue fills; the rest drop
        acts.alert(fired(step))
    assert time.monotonic() - started < 5, "alert() waited on the command"
    assert acts.dropped >= 9
    eventually(lambda: acts.failed >= 1, "the hook's failure")
    acts.close(timeout=0.1)


def test_on_alert_runs_on_its_own_thread_and_an_error_in_it_is_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    threads: list[str] = []

    def broken(a: Alert) -> None:
        threads.append(threading.current_thread().name)
        raise KeyError("oops")

    acts = Actions(quiet=True, on_alert=broken)
    with caplog.at_level(logging.INFO, logger="icsmon"):
        for step in range(3):
            acts.alert(fired(step))
        eventually(lambda: len(threads) == 3, "three hook threads")
        acts.close()
    assert set(threads) == {"icsmon-actions"}
    assert [r.getMessage() for r in caplog.records] == [
        "on_alert raised KeyError: 'oops' (said once; training continues)"
    ]


def job(pid: int, run: str, started: float) -> JobInfo:
    return JobInfo(
        pid=pid, host="here", run=run, name=run, rank=0, world_size=1, endpoint="", started=started
    )


def test_the_history_keeps_the_newest_ended_jobs_within_its_bounds(tmp_path: Path) -> None:
    directory = history.prepare(tmp_path / "history")
    assert os.stat(directory).st_mode & 0o777 == 0o700
    dead = 2**22 + 12345  # no such pid
    for i in range(5):
        kept = history.start(
            job(dead, f"run{i}", 1000.0 + i), f"run{i}", directory / f"run{i}.icsrec", directory
        )
        kept.recording.write_bytes(b"x" * 1000)
        history.ended(kept)
    assert [k.job.run for k in history.read(directory)] == ["run4", "run3", "run2", "run1", "run0"]
    removed = history.prune(directory, max_bytes=2500)
    assert [k.job.run for k in removed] == ["run0", "run1", "run2"]
    assert sorted(p.name for p in directory.iterdir()) == [
        "run3.icsrec",
        "run3.json",
        "run4.icsrec",
        "run4.json",
    ]
    history.prune(directory, max_jobs=1)
    assert [k.job.run for k in history.read(directory)] == ["run4"]


def test_a_running_job_and_a_file_of_the_users_are_never_pruned(tmp_path: Path) -> None:
    directory = history.prepare(tmp_path / "history")
    mine = tmp_path / "chosen.icsrec"
    mine.write_bytes(b"y" * 5000)
    history.ended(history.start(job(2**22 + 1, "chosen", 1.0), "chosen", mine, directory))
    running = history.start(job(os.getpid(), "live", 2.0), "live", directory / "live.icsrec", directory)
    running.recording.write_bytes(b"z" * 5000)
    history.prune(directory, max_bytes=0)
    assert mine.exists()  # its index goes, the file the user chose to record to stays
    assert [k.job.run for k in history.read(directory)] == ["live"]
