"""The remote listing script run by a real ``sh`` here, and the small parsers around ssh."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from icsmon.targets.listing import REMOTE_LIST_SCRIPT, parse_remote_listing
from icsmon.targets.ssh import SSHError, base_command, check_host, explain_failure, remote_tcp_target
from icsmon_agent import discovery
from icsmon_agent.discovery import JobInfo


def job(pid: int, run: str, started: float, host: str | None = None) -> JobInfo:
    return JobInfo(
        pid=pid,
        host=host or socket.gethostname(),
        run=run,
        name=run.split("-")[0],
        rank=0,
        world_size=1,
        endpoint=f"ipc:///x/{run}.sock",
        started=started,
        cmd=["python", "train.py", '--note="pid": 1'],  # a decoy the pid extraction must not take
    )


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def run_script(runtime: Path, shell: str = "sh") -> str:
    env = {"PATH": os.environ["PATH"], "HOME": str(runtime), "ICSMON_RUNTIME_DIR": str(runtime)}
    proc = subprocess.run(
        [shell, "-s"], input=REMOTE_LIST_SCRIPT, env=env, capture_output=True, text=True, check=True
    )
    return proc.stdout


@pytest.mark.parametrize("shell", ["sh", "dash", "bash"])
def test_script_lists_live_jobs_of_this_host_and_deletes_dead_ones(tmp_path: Path, shell: str) -> None:
    if not shutil.which(shell):
        pytest.skip(f"no {shell} here")
    live_old = discovery.write(job(os.getpid(), "old-1", 100.0), tmp_path)
    live_new = discovery.write(job(os.getppid(), "new-2", 200.0), tmp_path)
    dead = discovery.write(job(dead_pid(), "dead-3", 300.0), tmp_path)
    foreign = discovery.write(job(os.getpid(), "far-4", 400.0, host="another-node"), tmp_path)
    (tmp_path / "junk.json").write_text("not json at all")
    (tmp_path / ".tmp-half.json").write_text('{"pid": ')

    directory, jobs = parse_remote_listing(run_script(tmp_path, shell))

    assert directory == str(tmp_path)
    assert [j.run for j in jobs] == ["new-2", "old-1"]  # newest first
    assert jobs[1].pid == os.getpid() and jobs[1].path == str(live_old)
    assert jobs[1].cmd[-1] == '--note="pid": 1'
    assert not dead.exists(), "a dead pid's file is deleted, as read_jobs() does"
    assert foreign.exists() and live_new.exists()


def test_script_on_a_missing_runtime_dir(tmp_path: Path) -> None:
    directory, jobs = parse_remote_listing(run_script(tmp_path / "nothing-here"))
    assert directory == str(tmp_path / "nothing-here") and jobs == []


def test_default_runtime_dir_matches_the_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("ICSMON_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    out = subprocess.run(
        ["sh", "-s"], input=REMOTE_LIST_SCRIPT, env=env, capture_output=True, text=True
    ).stdout
    assert parse_remote_listing(out)[0] == str(discovery.runtime_dir())
    env["XDG_DATA_HOME"] = str(tmp_path / "data")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    out = subprocess.run(
        ["sh", "-s"], input=REMOTE_LIST_SCRIPT, env=env, capture_output=True, text=True
    ).stdout
    assert parse_remote_listing(out)[0] == str(discovery.runtime_dir())


def test_parse_ignores_banners_and_rejects_a_cut_listing() -> None:
    body = json.dumps(job(7, "r-1", 1.0).to_json(), indent=1)
    text = f"Welcome to the GPU box!\r\nICSMON-DIR /d\nICSMON-FILE /d/r.json\n{body}\n\nICSMON-END\nICSMON-DONE\n"
    directory, jobs = parse_remote_listing(text)
    assert directory == "/d" and [j.pid for j in jobs] == [7]
    with pytest.raises(ValueError):
        parse_remote_listing(text.replace("ICSMON-DONE\n", ""))
    with pytest.raises(ValueError):
        parse_remote_listing("sh: not found\n")


def test_ssh_command_from_the_environment() -> None:
    assert base_command({}) == ["ssh"]
    assert base_command({"ICSMON_SSH_COMMAND": "ssh -F '/my dir/config' -p 2222"}) == [
        "ssh",
        "-F",
        "/my dir/config",
        "-p",
        "2222",
    ]
    with pytest.raises(SSHError, match="cannot be parsed"):
        base_command({"ICSMON_SSH_COMMAND": "ssh 'open"})


@pytest.mark.parametrize("host", ["", "-oProxyCommand=touch x", "gpu box", "a\nb"])
def test_hosts_that_would_be_options_or_nonsense_are_refused(host: str) -> None:
    with pytest.raises(SSHError, match="is not an SSH host"):
        check_host(host)
    assert check_host("me@gpu-box.example.org") == "me@gpu-box.example.org"


def test_failures_are_explained_with_sshs_own_words() -> None:
    said = explain_failure("box", "debug\nssh: Could not resolve hostname box: Name or service not known\n")
    assert said.startswith("no job named 'box' (") and "no SSH host of that name" in said
    assert said.endswith("Name or service not known)")
    assert "authentication to box failed" in explain_failure("box", "me@box: Permission denied (publickey).")
    assert "host key" in explain_failure("box", "Host key verification failed.")
    assert explain_failure("box", "").startswith("ssh to box failed (ssh said: nothing)")


def test_tcp_endpoints_are_reached_on_the_remote_loopback() -> None:
    assert remote_tcp_target("tcp://127.0.0.1:5555") == ("127.0.0.1", 5555)
    assert remote_tcp_target("tcp://0.0.0.0:5555") == ("127.0.0.1", 5555)
    assert remote_tcp_target("tcp://[::1]:6000") == ("::1", 6000)
    with pytest.raises(SSHError):
        remote_tcp_target("tcp://127.0.0.1:*")
