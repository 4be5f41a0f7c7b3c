"""Training scripts written here from scratch get the two lines; the real CLI reads them.

The scripts dump every layer's output at each step so the figures that `icsmon tail --json` prints
can be checked against float64 truth computed on the very same tensors.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import first_sample_line, icsmon, json_lines, start_script, wait_for_jobs
from truth import close, figures, grad_norm, per_unit, published, update_ratio

pytestmark = pytest.mark.slow  # real processes: `make check` leaves it out

SCRIPT_HEAD = """
import sys, time, pickle
import torch
from torch import nn
import icsmon_agent

torch.manual_seed(0)
torch.set_num_threads(1)
dump = {}

def capture(model):
    def hook(module, args, out):
        dump.setdefault(step, {"out": [], "mods": []})
        dump[step]["out"].append(out.detach().double().numpy().copy())
        dump[step]["mods"].append(module)
    for m in model.modules():
        if next(m.children(), None) is None:
            m.register_forward_hook(hook)

def params_of(model):
    return [[p.detach().double().numpy().copy() for p in m.parameters()] for m in dump[step]["mods"]]

def grads_of(model):
    return [[p.grad.double().numpy().copy() for p in m.parameters() if p.grad is not None] for m in dump[step]["mods"]]
"""

MLP_SCRIPT = (
    SCRIPT_HEAD
    + """
layers = []
for i in range(50):
    layers += [nn.Linear(32, 32), nn.ReLU()]
model = nn.Sequential(*layers, nn.Linear(32, 4))
for m in model.modules():
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0, (2 / 32) ** 0.5)
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
mon = icsmon_agent.watch(model, every=1)
capture(model)
step = 0
deadline = time.time() + 60
for step in range(int(sys.argv[2])):
    x, y = torch.randn(16, 32), torch.randn(16, 4)
    loss = nn.functional.mse_loss(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
    dump[step]["grads"] = grads_of(model)
    dump[step]["params"] = params_of(model)
    dump[step]["loss"] = loss.item()
    while step == 0 and not mon.watching and time.time() < deadline:
        time.sleep(0.05)   # wait for the viewer so every later step is seen live
    mon.step(loss=loss, lr=1e-3)   # the next step's sampling is decided here
for s in dump:
    dump[s].pop("mods")
pickle.dump(dump, open(sys.argv[1], "wb"))
"""
)

CNN_SCRIPT = (
    SCRIPT_HEAD
    + """
model = nn.Sequential(
    nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(6, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(12 * 4 * 4, 32), nn.Tanh(), nn.Linear(32, 10),
)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
mon = icsmon_agent.watch(model, every=1)   # no mon.step(): steps come from optimizer.step()
capture(model)
step = 0
deadline = time.time() + 60
for step in range(int(sys.argv[2])):
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward()
    while step == 0 and not mon.watching and time.time() < deadline:
        time.sleep(0.05)   # the next step's sampling is decided at opt.step()
    opt.step()
    dump[step]["grads"] = grads_of(model)
    dump[step]["params"] = params_of(model)
for s in dump:
    dump[s]["conv"] = [o.ndim == 4 for o in dump[s]["out"]]
    dump[s]["kinds"] = [
        "tanh" if isinstance(m, nn.Tanh) else "relu" if isinstance(m, nn.ReLU) else "x" for m in dump[s].pop("mods")
    ]
pickle.dump(dump, open(sys.argv[1], "wb"))
"""
)


def run_job(tmp_path: Path, env: dict[str, str], script: str, steps: int) -> tuple[list[dict], dict, str]:
    import pickle

    path = tmp_path / "train.py"
    path.write_text(textwrap.dedent(script))
    dump_path = tmp_path / "dump.pkl"
    job = start_script(path, env, str(dump_path), str(steps))
    try:
        jobs = wait_for_jobs(env)
        assert jobs[0]["name"] == "train" and jobs[0]["pid"] == job.pid
        tail = icsmon("tail", "--json", "--count", str(steps), "--timeout", "90", env=env, timeout=120)
        assert tail.returncode == 0, tail.stderr
        _, err = job.communicate(timeout=60)
        assert job.returncode == 0, err
    finally:
        if job.poll() is None:
            job.kill()
    return json_lines(tail.stdout), pickle.loads(dump_path.read_bytes()), tail.stderr


def check(lines: list[dict], dump: dict, kinds: list[str] | None = None) -> int:
    checked = 0
    prev: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for line in lines:
        assert line["type"] == "sample"
        step = line["step"]
        outs, grads = dump[step]["out"], dump[step]["grads"]
        names = list(line["layers"])
        assert len(names) == len(outs)
        conv = dump[step].get("conv", [False] * len(outs))
        for i, name in enumerate(names):
            kind = (kinds or dump[step].get("kinds"))[i]
            want = published(figures(outs[i], kind, conv[i], prev.get(i)), kind)
            want["grad_norm"] = grad_norm(grads[i])
            if step - 1 in dump and prev:  # the step before was sampled too (every=1 here)
                want["update_ratio"] = update_ratio(dump[step - 1]["params"][i], dump[step]["params"][i], 1)
            got = line["layers"][name]
            for stat, value in want.items():
                assert close(got[stat], value), f"step {step} {name} {stat}: got {got[stat]} want {value}"
                checked += 1
            prev[i] = per_unit(outs[i], conv[i])[:2]
    return checked


def test_fifty_layer_mlp_streams_float64_exact_figures(
    tmp_path: Path, env: dict[str, str], runtime_dir: Path
) -> None:
    lines, dump, _ = run_job(tmp_path, env, MLP_SCRIPT, 6)
    assert [line["step"] for line in lines] == list(range(6))
    names = list(lines[0]["layers"])
    assert len(names) == 101 and names[0] == "0" and names[-1] == "100"
    assert abs(lines[3]["loss"] - dump[3]["loss"]) < 1e-5 and lines[3]["scalars"]["lr"] == 1e-3
    # The first layer's gradient norm as the optimizer got it (no clipping here: the backward's).
    assert lines[3]["scalars"]["grad_norm_applied"] > 0
    assert check(lines, dump, ["relu" if i % 2 else "x" for i in range(101)]) == 6 * 101 * 12
    assert not list(runtime_dir.glob("*.json")), "the job left its discovery file"
    assert not list(runtime_dir.glob("*.sock")), "the job left its socket"


def test_small_cnn_with_only_the_two_lines(tmp_path: Path, env: dict[str, str], runtime_dir: Path) -> None:
    lines, dump, _ = run_job(tmp_path, env, CNN_SCRIPT, 5)
    assert [line["step"] for line in lines] == list(range(5))
    assert lines[0]["loss"] is None  # no step(loss=...) was called
    assert lines[0]["layers"]["9"]["sat_frac"] is not None  # the Tanh
    assert lines[0]["layers"]["0"]["sat_frac"] is None
    assert check(lines, dump) > 0
    assert not list(runtime_dir.glob("*.json"))


def test_tail_human_lines_and_list_table(tmp_path: Path, env: dict[str, str]) -> None:
    path = tmp_path / "slow.py"
    path.write_text(
        textwrap.dedent("""
        import time, torch
        from torch import nn
        import icsmon_agent
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        mon = icsmon_agent.watch(model, every=1, name="slowjob")
        for step in range(400):
            loss = model(torch.randn(4, 8)).pow(2).mean()
            opt.zero_grad(); loss.backward(); opt.step(); mon.step(loss=loss)
            time.sleep(0.02)
    """)
    )
    job = start_script(path, env)
    try:
        wait_for_jobs(env)
        listing = icsmon("list", env=env, check=True)
        assert "slowjob" in listing.stdout and str(job.pid) in listing.stdout and "PID" in listing.stdout
        tail = icsmon("tail", str(job.pid), "--count", "3", env=env, check=True)
        lines = tail.stdout.strip().splitlines()
        assert len(lines) == 3 and all(line.startswith("step") and "loss" in line for line in lines)
    finally:
        job.kill()
        job.wait()
    # the killed job's discovery file is stale: list skips and deletes it, and its socket file
    assert list(Path(env["ICSMON_RUNTIME_DIR"]).glob("*.sock"))
    listing = icsmon("list", "--json", env=env, check=True)
    assert listing.stdout.strip() == "[]"
    assert list(Path(env["ICSMON_RUNTIME_DIR"]).iterdir()) == []


def test_tail_on_dead_or_wrong_targets_exits_1_with_a_message(env: dict[str, str], tmp_path: Path) -> None:
    for args in (
        ["tcp://127.0.0.1:9", "--timeout", "1"],
        ["ipc://" + str(tmp_path / "none.sock")],
        ["999999999"],
        [],
    ):
        proc = icsmon("tail", *args, env=env)
        assert proc.returncode == 1, (args, proc.stderr)
        assert proc.stderr.startswith("icsmon: ") and "Traceback" not in proc.stderr
        assert proc.stdout == ""


def test_unknown_flag_is_a_usage_error(env: dict[str, str]) -> None:
    proc = icsmon("tail", "--bogus", env=env)
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr
    for args in (["tail", "--count", "0"], ["demo", "--steps", "-3"], ["tail", "-n", "x"]):
        proc = icsmon(*args, env=env)
        assert proc.returncode == 2 and "usage:" in proc.stderr and "Traceback" not in proc.stderr, args


def test_agent_imports_neither_textual_nor_rich_nor_torch() -> None:
    code = (
        "import sys, icsmon_agent, icsmon_agent.protocol, icsmon_agent.discovery; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'rich', 'torch')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    code = "import sys, torch, icsmon_agent.monitor; print(sorted({m.split('.')[0] for m in sys.modules} & {'textual', 'rich'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_tail_of_a_job_killed_before_its_first_sample_ends_by_itself(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """A job that watched its model and died before its first forward sent nothing at all: tail,
    pointed at it by pid, notices the pid is gone instead of waiting forever."""
    path = tmp_path / "early.py"
    path.write_text(
        textwrap.dedent("""
        import time
        from torch import nn
        import icsmon_agent
        mon = icsmon_agent.watch(nn.Sequential(nn.Linear(4, 4)), quiet=True)
        time.sleep(600)  # still loading its data when it is killed
    """)
    )
    job = start_script(path, env)
    try:
        (listed,) = wait_for_jobs(env)
        tail = subprocess.Popen(
            [sys.executable, "-m", "icsmon", "tail", str(listed["pid"])],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(1.0)  # tail is waiting on the job's socket
        job.kill()
        job.wait()
        _, err = tail.communicate(timeout=20)
        assert tail.returncode == 1 and "died before any sample arrived" in err, err
    finally:
        if job.poll() is None:
            job.kill()


def test_tail_ends_when_the_job_is_killed(tmp_path: Path, env: dict[str, str]) -> None:
    path = tmp_path / "doomed.py"
    path.write_text(
        textwrap.dedent("""
        import time, torch
        from torch import nn
        import icsmon_agent
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        mon = icsmon_agent.watch(model, every=1)
        while True:
            model(torch.randn(2, 4)).sum().backward(); opt.step(); opt.zero_grad()
            time.sleep(0.02)
    """)
    )
    job = start_script(path, env)
    try:
        wait_for_jobs(env)
        tail = subprocess.Popen(
            [sys.executable, "-m", "icsmon", "tail", "--pid", str(job.pid)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert tail.stdout is not None
        assert first_sample_line(tail.stdout).startswith("step")  # following it live
        job.kill()
        job.wait()
        _, err = tail.communicate(timeout=30)  # without a closing event, tail notices the pid is gone
        assert tail.returncode == 0
        assert f"pid {job.pid}) is gone" in err
    finally:
        if job.poll() is None:
            job.kill()


def test_tail_count_means_new_samples_and_history_is_marked(tmp_path: Path, env: dict[str, str]) -> None:
    """`tail -n N` prints N samples of steps that ran after it connected; the recent history the job
    re-sends on connect is printed only with --history, marked "replayed"."""
    path = tmp_path / "steady.py"
    path.write_text(
        textwrap.dedent("""
        import time, torch
        from torch import nn
        import icsmon_agent
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        mon = icsmon_agent.watch(model, every=1, name="steady")
        for step in range(100_000):
            model(torch.randn(4, 8)).sum().backward(); mon.step()
            time.sleep(0.02)
    """)
    )
    job = start_script(path, env)
    try:
        wait_for_jobs(env)
        time.sleep(2.0)  # dozens of steps before the viewers come: a history to re-send
        out = icsmon("tail", "--json", "-n", "3", env=env, check=True).stdout.splitlines()
        new = [s for s in map(json.loads, out) if s["type"] == "sample"]
        assert len(new) == 3 and not any(s.get("replayed") for s in new)
        both = icsmon("tail", "--json", "--history", "-n", "3", env=env, check=True).stdout.splitlines()
        lines = [s for s in map(json.loads, both) if s["type"] == "sample"]
        replayed = [s for s in lines if s.get("replayed")]
        assert len(replayed) >= 10 and lines[: len(replayed)] == replayed  # history first, marked
        assert len(lines) - len(replayed) == 3
        assert max(s["step"] for s in replayed) < min(s["step"] for s in lines[len(replayed) :])
        readable = icsmon("tail", "--history", "-n", "1", env=env, check=True).stdout.splitlines()
        readable = [line for line in readable if "step" in line.split("  ")[0]]  # samples, not alerts
        assert readable[0].startswith("(history) step")
        assert [line for line in readable if line.startswith("step")], readable
    finally:
        job.kill()
        job.wait()
