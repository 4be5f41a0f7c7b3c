"""watch() options, layer naming, late joiners behind a relay, and target choice among several jobs."""

from __future__ import annotations

import contextlib
import functools
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq
from torch import nn
from torch.nn.modules.module import _global_forward_hooks as global_forward_hooks

import icsmon_agent
import icsmon_agent.monitor
from helpers import icsmon, start_script, wait_for_jobs, wait_watching
from icsmon.store import Store
from icsmon.subscriber import Subscriber
from icsmon_agent import cadence as agent_cadence
from icsmon_agent.layers import clean_name
from icsmon_agent.protocol import STATS, Event, LayerInfo, Sample, Schema, schema_id_for
from test_real_training import train_and_collect


def step_once(model: nn.Module, mon: icsmon_agent.Monitor, shape: tuple[int, ...] = (2, 4)) -> None:
    model(torch.randn(*shape)).sum().backward()
    mon.step()


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("_orig_mod.encoder.fc", "encoder.fc"),
        ("module.0", "0"),
        ("module._orig_mod.head", "head"),
        ("blocks.0._fsdp_wrapped_module.mlp", "blocks.0.mlp"),
        ("net.module_list.0", "net.module_list.0"),
    ],
)
def test_wrapper_prefixes_are_removed(raw: str, clean: str) -> None:
    assert clean_name(raw) == clean


def test_names_through_a_real_wrapper(runtime_dir: Path) -> None:
    inner = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    wrapped = nn.DataParallel(inner)  # on CPU it just calls the module, but names get "module."
    mon = icsmon_agent.watch(wrapped, runtime_dir=runtime_dir)
    step_once(wrapped, mon)
    assert mon.layer_names == ["0", "1"]
    mon.close()


def test_include_and_exclude_take_globs_and_types(runtime_dir: Path) -> None:
    model = nn.Sequential(
        nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Dropout(0.1)), nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    )
    mon = icsmon_agent.watch(model, include="0.*", exclude=nn.Dropout, runtime_dir=runtime_dir)
    step_once(model, mon)
    assert mon.layer_names == ["0.0", "0.1"]
    mon.close()
    mon = icsmon_agent.watch(model, include=[nn.Linear, "1.1"], runtime_dir=runtime_dir)
    step_once(model, mon)
    assert mon.layer_names == ["0.0", "1.0", "1.1"]
    mon.close()


def test_close_is_idempotent_and_context_manager_removes_discovery(runtime_dir: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with icsmon_agent.watch(model, runtime_dir=runtime_dir) as mon:
        assert mon.endpoint is not None and mon.endpoint.startswith("ipc://")
        assert len(list(runtime_dir.glob("*.json"))) == 1
        step_once(model, mon)
    mon.close()
    assert not list(runtime_dir.glob("*"))
    # hooks are gone: training after close costs nothing and publishes nothing
    step_once(model, mon)
    assert mon.steps == 1


def test_eval_forwards_are_not_sampled(runtime_dir: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    mon = icsmon_agent.watch(model, every=1, runtime_dir=runtime_dir)
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 4))
    mon.step()
    assert mon.layer_names == []  # nothing seen yet: eval passes do not build the table
    model.train()
    step_once(model, mon)
    assert mon.layer_names == ["0", "1"]
    mon.close()


def test_late_viewer_behind_a_relay_decodes_within_two_seconds(runtime_dir: Path) -> None:
    """A relay keeps one upstream subscription, so the agent never sees the second viewer join:
    the periodic schema re-send is what lets that viewer decode."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    mon = icsmon_agent.watch(model, every=1, endpoint="tcp", runtime_dir=runtime_dir)
    ctx = zmq.Context()
    front, back = ctx.socket(zmq.XSUB), ctx.socket(zmq.XPUB)
    front.connect(mon.endpoint or "")
    relay_port = back.bind_to_random_port("tcp://127.0.0.1")
    relay = threading.Thread(target=lambda: _proxy(front, back), daemon=True)
    relay.start()
    stop = threading.Event()

    def train() -> None:
        while not stop.is_set():
            step_once(model, mon)
            time.sleep(0.01)

    trainer = threading.Thread(target=train, daemon=True)
    first = Subscriber(f"tcp://127.0.0.1:{relay_port}")
    try:
        trainer.start()
        store = Store()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(isinstance(m, Sample) for m in first.poll(0.1)):
            pass
        # the second viewer joins the relay; the relay does not forward a duplicate subscription
        joined = time.monotonic()
        second = Subscriber(f"tcp://127.0.0.1:{relay_port}")
        decoded_at = None
        while time.monotonic() - joined < 5 and decoded_at is None:
            for msg in second.poll(0.05):
                store.add(msg)
                if isinstance(msg, Sample) and store.get(msg.run) and store.get(msg.run).count:  # type: ignore[union-attr]
                    decoded_at = time.monotonic()
        second.close()
        assert decoded_at is not None, "the late viewer never decoded a sample"
        assert decoded_at - joined < 2.5
    finally:
        stop.set()
        trainer.join(5)
        first.close()
        mon.close()
        ctx.destroy(linger=0)


def _proxy(front: zmq.Socket[bytes], back: zmq.Socket[bytes]) -> None:
    with contextlib.suppress(zmq.ZMQError):  # the test destroys the context to stop the relay
        zmq.proxy(front, back)


def test_schema_is_resent_periodically(runtime_dir: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    mon = icsmon_agent.watch(model, endpoint="tcp", runtime_dir=runtime_dir)
    step_once(model, mon)
    with Subscriber(mon.endpoint or "") as sub:
        schemas = 0
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            schemas += sum(isinstance(m, Schema) for m in sub.poll(0.1))
    mon.close()
    assert schemas >= 3  # one on subscribing, then about one a second


SLOW_JOB = """
import sys, time, torch
from torch import nn
import icsmon_agent
model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
opt = torch.optim.SGD(model.parameters(), lr=0.01)
mon = icsmon_agent.watch(model, every=1, name=sys.argv[1])
for _ in range(3000):
    model(torch.randn(2, 4)).sum().backward(); opt.step(); opt.zero_grad()
    time.sleep(0.01)
"""


def test_several_jobs_tail_takes_the_newest_and_says_so(tmp_path: Path, env: dict[str, str]) -> None:
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(SLOW_JOB))
    older = start_script(path, env, "older")
    try:
        wait_for_jobs(env, 1)
        newer = start_script(path, env, "newer")
        try:
            jobs = wait_for_jobs(env, 2)
            assert [j["name"] for j in jobs] == ["newer", "older"]
            proc = icsmon("tail", "--json", "--count", "1", "--timeout", "30", env=env)
            assert proc.returncode == 0, proc.stderr
            assert "2 jobs running on this machine; taking the most recent: newer" in proc.stderr
            assert '"run": "newer-' in proc.stdout
            by_name = icsmon("tail", "--run", "older", "--json", "--count", "1", "--timeout", "30", env=env)
            assert '"run": "older-' in by_name.stdout
            timed = icsmon("tail", str(older.pid), "--timeout", "1.5", env=env)
            assert timed.returncode == 0 and timed.stdout.count("step") >= 1
        finally:
            newer.kill()
            newer.wait()
    finally:
        older.kill()
        older.wait()


class FakeClock:
    """The cadence's clock, advanced by the test: what it decides depends on the steps' lengths as
    the test sets them, never on how loaded the machine is."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(icsmon_agent.monitor, "Cadence", functools.partial(agent_cadence.Cadence, clock=fake))
    return fake


class Takes(nn.Module):
    """A layer whose forward takes ``seconds`` on the cadence's clock (a big model on a GPU, or a
    tiny one), whatever the machine's load."""

    def __init__(self, clock: FakeClock, seconds: float) -> None:
        super().__init__()
        self.clock, self.seconds = clock, seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.now += self.seconds
        return x


def sampled_steps(steps: int, runtime_dir: Path, clock: FakeClock, step_s: float) -> list[int]:
    """The steps the default cadence samples when each step takes ``step_s`` seconds."""
    model = nn.Sequential(nn.Linear(4, 4), Takes(clock, step_s), nn.ReLU())
    _, samples = train_and_collect(
        model, runtime_dir, steps, lambda mon, i: step_once(model, mon), every=None
    )
    return [s.step for s in samples]


def test_default_cadence_samples_every_slow_step_and_thins_out_fast_ones(
    runtime_dir: Path, clock: FakeClock
) -> None:
    slow = sampled_steps(3, runtime_dir, clock, 1.5)
    assert slow == [0, 1, 2]
    fast = sampled_steps(400, runtime_dir, clock, 0.001)
    # Spaced by time: at most 20 a second (0.4 s of steps), fewer where 1% of the job is the limit.
    assert fast[0] == 0 and len(fast) <= 0.4 / agent_cadence.MIN_INTERVAL_S + 1, fast


def test_first_step_call_after_optimizer_steps_does_not_count_twice(runtime_dir: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = icsmon_agent.watch(model, every=3, runtime_dir=runtime_dir)
    for i in range(4):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()  # closes the step by itself (automatic mode)
        if i == 3:
            mon.step(loss=1.0)  # the user starts marking steps: the same step, not a new one
    assert mon.steps == 4
    model(torch.randn(2, 4)).sum().backward()
    opt.step()  # the optimizer hook has stood down
    mon.step()
    assert mon.steps == 5
    mon.close()


def test_malformed_rank_in_the_environment_does_not_stop_training(
    runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "zero")
    model = nn.Sequential(nn.Linear(4, 4))
    mon = icsmon_agent.watch(model, runtime_dir=runtime_dir)
    assert mon.rank == 0
    mon.close()


def test_pause_stops_sampling_and_unhooks_until_resume(runtime_dir: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    mon = icsmon_agent.watch(model, every=1, runtime_dir=runtime_dir, endpoint="tcp")
    store = Store()
    got: list[int] = []
    events: list[str] = []

    def take(wait: float) -> None:
        for m in sub.poll(wait):
            if store.add(m):
                if isinstance(m, Sample):
                    got.append(m.step)
                elif isinstance(m, Event):
                    events.append(m.event)

    def drain_until(pred: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 10
        while not pred() and time.monotonic() < deadline:
            take(0.05)

    with Subscriber(mon.endpoint or "") as sub:
        drain_until(lambda: mon.watching)
        for _ in range(3):
            step_once(model, mon)
        drain_until(lambda: got[-1:] == [2])
        mon.pause()
        assert mon.paused
        for _ in range(3):
            step_once(model, mon)
            assert not global_forward_hooks  # paused steps run PyTorch's fast path
        drain_until(lambda: "paused" in events)
        run = store.newest()
        assert run is not None and run.state() == "paused"
        # A viewer that joins during the pause is told of it by the history it is sent.
        late_store = Store()
        with Subscriber(mon.endpoint or "") as late:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not (
                (late_run := late_store.newest()) is not None and late_run.state() == "paused"
            ):
                for m in late.poll(0.05):
                    late_store.add(m)
        assert late_run is not None and late_run.state() == "paused"
        mon.resume()
        for _ in range(2):
            step_once(model, mon)
        drain_until(lambda: got[-1:] == [7])
        assert run.state() == "live"
        mon.close()
    assert got == [0, 1, 2, 6, 7]  # steps 3-5 were paused
    assert [e for e in events if e in ("paused", "resumed")] == ["paused", "resumed"]


def test_the_adaptive_cadence_clock_stands_still_while_paused(runtime_dir: Path, clock: FakeClock) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    mon = icsmon_agent.watch(model, runtime_dir=runtime_dir, endpoint="tcp")
    interval = agent_cadence.MIN_INTERVAL_S  # the first samples' (no cost known yet)
    store = Store()
    got: list[int] = []
    with Subscriber(mon.endpoint or "") as sub:
        wait_watching(mon, sub)
        step_once(model, mon)  # step 0: the first forward, always sampled
        mon.pause()
        clock.now += 30 * interval  # long, but paused
        mon.resume()
        step_once(model, mon)  # step 1: no unpaused time since step 0's sample
        clock.now += 1.2 * interval
        # Step 2 was decided at step 1's end, still inside the interval; step 3 at step 2's end.
        step_once(model, mon)
        step_once(model, mon)
        mon.close()
        end = time.monotonic() + 10
        while time.monotonic() < end and 3 not in got:
            got += [m.step for m in sub.poll(0.1) if store.add(m) and isinstance(m, Sample)]
    assert got == [0, 3]


def test_a_sample_after_the_paused_step_means_sampling_again_even_if_resumed_was_lost() -> None:
    """The "resumed" event can be lost (a full queue, a reconnect): a later step's sample says it."""
    layers = (LayerInfo(name="fc", type="Linear", shape=(2, 4), kind="linear"),)
    schema = Schema(run="r", rank=0, seq=1, t=0.0, layers=layers, schema_id=schema_id_for(layers))
    store = Store()
    store.add(schema)

    def sample(seq: int, step: int) -> Sample:
        figures = np.zeros((1, len(STATS)), dtype=np.float32)
        return Sample(run="r", rank=0, seq=seq, t=0.0, step=step, schema_id=schema.schema_id, figures=figures)

    store.add(sample(2, 4))
    store.add(Event("r", 0, 3, 0.0, "paused", {"step": 5}))
    store.add(sample(4, 5))  # the sample under way when the job paused: still paused
    run = store.get("r", 0)
    assert run is not None and run.state() == "paused"
    store.add(sample(6, 9))  # seq 5, the "resumed" event, never arrived
    assert run.state() == "live"
