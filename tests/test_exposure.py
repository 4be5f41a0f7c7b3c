"""Nobody else can read or steer a job: the socket stays private, the runtime directory is checked,
and nothing that the agent did not create is ever chmod-ed."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import icsmon_agent
from helpers import icsmon, start_script, wait_for_jobs
from icsmon_agent import discovery
from icsmon_agent.discovery import SHORT_SOCKET_DIR

pytestmark = pytest.mark.slow  # real processes: `make check` leaves it out

NOBODY = 65534
as_root = pytest.mark.skipif(
    not hasattr(os, "getuid") or os.getuid() != 0, reason="needs root to play another user"
)

JOB = textwrap.dedent(
    """
    import time, torch
    from torch import nn
    import icsmon_agent
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    mon = icsmon_agent.watch(model, every=1, name="private-job")
    for step in range(100_000):
        model(torch.randn(2, 4)).sum().backward(); mon.step()
        time.sleep(0.02)
    """
)


def watch_quietly(model: nn.Module, runtime: Path) -> tuple[icsmon_agent.Monitor, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = icsmon_agent.watch(model, runtime_dir=runtime)
    return mon, [str(w.message) for w in caught]


def test_a_socket_path_too_long_goes_to_a_short_private_directory_not_to_tcp(tmp_path: Path) -> None:
    runtime = tmp_path / ("r" * 90)  # with the run id, past the unix-socket limit
    model = nn.Sequential(nn.Linear(4, 4))
    mon, said = watch_quietly(model, runtime)
    try:
        assert mon.endpoint is not None and mon.endpoint.startswith(f"ipc://{SHORT_SOCKET_DIR}/"), (
            mon.endpoint
        )
        assert not any("tcp" in s for s in said), said
        st = os.lstat(SHORT_SOCKET_DIR)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
        (job,) = discovery.read_jobs(runtime)
        assert job.endpoint == mon.endpoint
    finally:
        mon.close()
    assert not Path(mon.endpoint[len("ipc://") :]).exists()


@pytest.mark.parametrize("kind", ["world-writable", "symlink", "another user's"])
def test_an_untrusted_runtime_directory_is_refused_and_left_as_it_was(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "target"
    target.mkdir(mode=0o755)
    target.chmod(0o755)
    runtime = tmp_path / "runtime"
    if kind == "world-writable":
        runtime.mkdir()
        runtime.chmod(0o777)
    elif kind == "symlink":
        runtime.symlink_to(target)  # someone's directory (a web root, say) behind a link
    else:
        if os.getuid() != 0:
            pytest.skip("needs root to play another user")
        runtime.mkdir(mode=0o700)
        os.chown(runtime, NOBODY, NOBODY)
    before = os.lstat(runtime).st_mode, os.stat(target).st_mode
    model = nn.Sequential(nn.Linear(4, 4))
    mon, said = watch_quietly(model, runtime)
    try:
        assert mon.endpoint is None and any("training continues unmonitored" in s for s in said), said
        # The job trains on as it would without us.
        model(torch.randn(2, 4)).sum().backward()
        mon.step()
    finally:
        mon.close()
    assert (os.lstat(runtime).st_mode, os.stat(target).st_mode) == before  # nothing chmod-ed
    assert list(target.iterdir()) == []
    listing = icsmon("list", env=dict(os.environ, ICSMON_RUNTIME_DIR=str(runtime)))
    assert listing.returncode == 0 and "no icsmon job" in listing.stdout
    tail = icsmon("tail", env=dict(os.environ, ICSMON_RUNTIME_DIR=str(runtime)))
    assert tail.returncode == 1 and "not reading the jobs in" in tail.stderr, tail.stderr


@as_root
def test_a_discovery_file_another_user_put_there_is_not_read(env: dict[str, str]) -> None:
    runtime = Path(env["ICSMON_RUNTIME_DIR"])
    forged = runtime / "forged.r0.json"
    forged.write_text(
        json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "run": "forged", "name": "forged",
                    "rank": 0, "world_size": 1, "endpoint": "tcp://127.0.0.1:9", "started": 1.0})
    )  # fmt: skip
    os.chown(forged, NOBODY, NOBODY)
    listing = icsmon("list", "--json", env=env, check=True)
    assert json.loads(listing.stdout) == []


@as_root
def test_what_another_local_user_sees_of_a_job(env: dict[str, str], tmp_path: Path) -> None:
    """Run the viewer as another user: the runtime directory cannot be listed, the socket cannot
    be reached, and each command says so rather than "no job" or "ended"."""
    script = tmp_path / "job.py"
    script.write_text(JOB)
    job = start_script(script, env)
    try:
        (found,) = wait_for_jobs(env, 1)
        stranger = dict(env, HOME=str(tmp_path))

        def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
            try:
                return subprocess.run(
                    [sys.executable, "-m", "icsmon", *args], env=stranger, capture_output=True, text=True,
                    timeout=60, user=NOBODY, group=NOBODY, cwd="/",
                )  # fmt: skip
            except PermissionError:
                pytest.skip("this Python is not readable by another user here")

        listing = as_nobody("list", "--json")
        assert listing.returncode in (0, 1) and "private-job" not in listing.stdout, listing
        tail = as_nobody("tail", found["endpoint"], "--count", "1", "--timeout", "3")
        assert tail.returncode == 1 and "permission denied" in tail.stderr, tail.stderr
        assert "ended" not in tail.stderr
    finally:
        job.kill()
        job.wait()


def test_a_socket_path_typed_without_its_scheme_is_checked_as_a_socket(
    env: dict[str, str], tmp_path: Path
) -> None:
    not_a_socket = icsmon("tail", str(tmp_path), env=env)
    assert not_a_socket.returncode == 1 and f"{tmp_path} is not a socket" in not_a_socket.stderr
    missing = icsmon("tail", "./no-such.sock", env=env)
    assert missing.returncode == 1 and "no socket at" in missing.stderr and "SSH" not in missing.stderr
    malformed = icsmon("tail", "tcp://foo", env=env)
    assert malformed.returncode == 1 and malformed.stderr.startswith("icsmon: cannot connect to tcp://foo")
    assert "Traceback" not in malformed.stderr


def test_beyond_loopback_the_job_speaks_only_to_viewers_with_its_key(env: dict[str, str]) -> None:
    """An endpoint on every interface is encrypted (CURVE); the key is in the private discovery
    file, so `icsmon tail` with no target gets in, and a subscriber without it gets nothing."""
    from icsmon.endpoint import Endpoint, key_of
    from icsmon.subscriber import Subscriber
    from icsmon.targets import live_endpoints, resolve_local

    runtime = Path(env["ICSMON_RUNTIME_DIR"])
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = icsmon_agent.watch(model, every=1, endpoint="tcp://0.0.0.0:*", runtime_dir=runtime)
    assert any("CURVE" in str(w.message) for w in caught)
    try:
        (job,) = discovery.read_jobs(runtime)
        assert len(job.key) == 40 and mon.endpoint == job.endpoint
        port = job.endpoint.rsplit(":", 1)[1]
        stop = threading.Event()

        def train() -> None:
            while not stop.is_set():
                model(torch.randn(2, 4)).sum().backward()
                mon.step()
                time.sleep(0.02)

        trainer = threading.Thread(target=train, daemon=True)
        trainer.start()
        with Subscriber(f"tcp://127.0.0.1:{port}") as stranger:  # no key: the handshake fails
            assert not [m for _ in range(10) for m in stranger.poll(0.1)]
        # The key travels with the endpoint, from wherever the job was found: no registry.
        assert [key_of(e) for e in resolve_local(None, runtime=runtime).endpoints] == [job.key]
        assert [key_of(e) for e in live_endpoints([job])] == [job.key]
        with Subscriber(Endpoint(f"tcp://127.0.0.1:{port}", job.key)) as keyed_sub:
            heard = []
            for _ in range(100):
                heard += keyed_sub.poll(0.1)
                if heard:
                    break
            assert heard, "a subscriber given the key hears the job"
        # A viewer without the key says why it hears nothing, rather than wait in silence.
        keyless = icsmon("tail", f"tcp://127.0.0.1:{port}", "--timeout", "15", env=env)
        said = f"tcp://127.0.0.1:{port} is encrypted (CURVE)"
        assert said in keyless.stderr and "--key" in keyless.stderr, keyless.stderr
        keyed = icsmon("tail", "--json", "-n", "2", "--timeout", "30", env=env)
        assert keyed.returncode == 0 and len(keyed.stdout.splitlines()) >= 2, keyed.stderr
        by_hand = icsmon(
            "tail", f"tcp://127.0.0.1:{port}", "--key", job.key, "-n", "1", "--timeout", "30", env=env
        )
        assert by_hand.returncode == 0, by_hand.stderr
        stop.set()
        trainer.join(5)
    finally:
        mon.close()


@as_root
def test_a_squatted_short_socket_directory_leaves_the_job_watchable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another user made /tmp/icsmon-UID first: the job's socket goes to a fresh private directory
    beside it, it says so once, a viewer finds it, and its files go when it closes."""
    import shutil
    import tempfile

    from icsmon_agent import discovery as disc
    from icsmon_agent import publisher

    short = Path(tempfile.mkdtemp(prefix="sq", dir="/tmp"))  # a socket path must stay short
    squatted = short / f"icsmon-{os.getuid()}"
    squatted.mkdir(mode=0o777)
    os.chown(squatted, NOBODY, NOBODY)
    monkeypatch.setattr(disc, "SHORT_SOCKET_DIR", squatted)
    monkeypatch.setattr(publisher, "SHORT_SOCKET_DIR", squatted)
    runtime = tmp_path / ("r" * 90)
    mon, said = watch_quietly(nn.Sequential(nn.Linear(4, 4)), runtime)
    try:
        assert mon.endpoint is not None, said
        sock = Path(mon.endpoint[len("ipc://") :])
        assert sock.parent.parent == short and sock.parent.name.startswith(f"{squatted.name}-")
        st = os.lstat(sock.parent)
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
        assert any("belongs to another user" in s and str(sock.parent) in s for s in said), said
        (job,) = discovery.read_jobs(runtime)
        assert job.endpoint == mon.endpoint
    finally:
        mon.close()
    try:
        assert not sock.exists()
        assert os.lstat(squatted).st_uid == NOBODY  # the squatter's directory is left as it was
    finally:
        shutil.rmtree(short, ignore_errors=True)
