"""``icsmon relay``: two local jobs, one relay, one viewer that needs one connection for both."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import start_script, wait_for_jobs

pytestmark = pytest.mark.slow  # real processes: `make check` leaves it out

JOB = textwrap.dedent(
    """
    import sys, time
    import torch
    from torch import nn
    import icsmon_agent

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    mon = icsmon_agent.watch(model, every=1, name=sys.argv[1])
    for step in range(int(sys.argv[2])):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        mon.step(loss=loss)
        time.sleep(0.02)
    mon.close()
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(120)
def test_one_viewer_reads_two_jobs_through_the_relay(tmp_path: Path, env: dict[str, str]) -> None:
    script = tmp_path / "job.py"
    script.write_text(JOB)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    first = start_script(script, env, "alpha", "100000")
    relay = subprocess.Popen(
        [sys.executable, "-m", "icsmon", "relay", "--bind", endpoint],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    second = None
    try:
        wait_for_jobs(env, 1)
        # A job that starts after the relay joins it (the relay lists the jobs again).
        second = start_script(script, env, "beta", "100000")
        wait_for_jobs(env, 2)
        # Read until both jobs' samples came through: the relay takes up the second job when it
        # next lists the jobs, which a loaded machine may delay past many of the first's samples.
        tail = subprocess.Popen(
            [sys.executable, "-m", "icsmon", "tail", "--json", endpoint, "--timeout", "60"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        names: set[str] = set()
        try:
            assert tail.stdout is not None
            for line in tail.stdout:
                msg = json.loads(line)
                if msg["type"] == "sample":
                    names.add(msg["run"].split("-")[0])
                if names == {"alpha", "beta"}:
                    break
        finally:
            tail.kill()
            _, tail_err = tail.communicate(timeout=15)
        assert names == {"alpha", "beta"}, (names, tail_err[-2000:])
        assert relay.poll() is None
        relay.send_signal(signal.SIGTERM)
        _, err = relay.communicate(timeout=15)
        assert relay.returncode == 0, err
        assert "relaying 2 endpoint(s)" in err and f"icsmon attach {endpoint}" in err
    finally:
        for proc in (first, second, relay):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_relay_that_cannot_bind_says_so(env: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "icsmon", "relay", "--bind", "tcp://256.0.0.1:1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1 and "cannot bind tcp://256.0.0.1:1" in proc.stderr, proc.stderr


@pytest.mark.timeout(120)
def test_tail_on_a_relay_outlives_one_of_its_jobs(tmp_path: Path, env: dict[str, str]) -> None:
    """A run that says goodbye on a shared endpoint ends that run, not the tail of the others."""
    script = tmp_path / "job.py"
    script.write_text(JOB)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    short = start_script(script, env, "short", "250")
    long = start_script(script, env, "long", "100000")
    relay = subprocess.Popen(
        [sys.executable, "-m", "icsmon", "relay", "--bind", endpoint], env=env, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_jobs(env, 2)
        started = time.monotonic()
        tail = subprocess.run(
            [sys.executable, "-m", "icsmon", "tail", "--json", endpoint, "--timeout", "12"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        took = time.monotonic() - started
        assert tail.returncode == 0, tail.stderr
        assert "the job ended (run short" in tail.stderr
        assert took > 11, f"tail stopped after {took:.1f} s, when the short job ended"
        runs = [json.loads(line)["run"].split("-")[0] for line in tail.stdout.splitlines()]
        assert runs[-1] == "long" and "short" in runs
    finally:
        for proc in (short, long, relay):
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.mark.timeout(120)
def test_a_relay_leaves_no_socket_and_a_second_one_names_the_first(
    runtime_dir: Path, env: dict[str, str]
) -> None:
    """The default ipc:// socket is removed when the relay stops; a second relay on the same
    runtime directory refuses, naming the first one's pid, instead of binding over it."""
    sock = runtime_dir / "relay.sock"
    first = subprocess.Popen(
        [sys.executable, "-m", "icsmon", "relay"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sock.exists()
        second = subprocess.run(
            [sys.executable, "-m", "icsmon", "relay"], env=env, capture_output=True, text=True, timeout=60
        )
        assert second.returncode == 1 and f"pid {first.pid}" in second.stderr, second.stderr
        assert first.poll() is None and sock.exists()  # the first goes on, reachable
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=15)
        assert first.returncode == 0, err
        assert not sock.exists()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
