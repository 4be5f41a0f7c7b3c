"""The offload thread on its own: order, faults, bounded waits, and what happens after close."""

from __future__ import annotations

import threading
import time

from icsmon_agent.offload import Offload


def test_jobs_run_in_order_off_the_caller_and_count_their_bytes() -> None:
    errors: list[BaseException] = []
    off = Offload(errors.append)
    seen: list[tuple[int, str]] = []
    gate = threading.Event()
    off.submit(gate.wait, 0)  # holds the thread so the counters can be read mid-flight
    for i in range(5):
        off.submit(lambda i=i: seen.append((i, threading.current_thread().name)), 100)
    assert off.pending == 6 and off.outstanding == 500
    gate.set()
    assert off.drain(5.0)
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4]
    assert {name for _, name in seen} == {"icsmon-offload"}
    assert off.pending == 0 and off.outstanding == 0 and errors == []
    assert off.close(1.0)


def test_a_failing_job_is_reported_and_the_thread_lives_on() -> None:
    errors: list[BaseException] = []
    off = Offload(errors.append)
    ran: list[int] = []

    def boom() -> None:
        raise ValueError("bad tensor")

    off.submit(boom)
    off.submit(lambda: ran.append(1))
    assert off.drain(5.0)
    assert [type(e) for e in errors] == [ValueError] and ran == [1]
    off.close(1.0)


def test_close_waits_a_bounded_time_and_later_jobs_run_inline() -> None:
    off = Offload(lambda exc: None)
    release = threading.Event()
    off.submit(lambda: release.wait(10))
    started = time.monotonic()
    assert off.close(0.2) is False  # the stuck job is not waited out
    assert time.monotonic() - started < 2.0
    release.set()
    caller = threading.current_thread().name
    where: list[str] = []
    off.submit(lambda: where.append(threading.current_thread().name))
    assert where == [caller]  # closed: run at once on the caller, never queued to a dead thread
