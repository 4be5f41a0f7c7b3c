"""Every rank of a data-parallel job: one job in `list`, one `tail` for all ranks, and the
``rank_divergence`` rule, on a real 2-rank DDP job (torchrun, gloo on CPU) and on stored samples."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from helpers import icsmon, json_lines, wait_for_jobs
from icsmon.alerts.ranks import RankCheck, find
from icsmon.feed import Feed
from icsmon.store import Store
from icsmon.tui.state import ViewState
from icsmon_agent.protocol import STAT_INDEX, STATS, LayerInfo, Sample, Schema, schema_id_for

pytestmark = pytest.mark.slow  # real processes: `make check` leaves it out

JOB = Path(__file__).with_name("ddp_job.py")
FSDP_JOB = Path(__file__).with_name("fsdp_job.py")
NAN_FROM, NAN_STEPS = 250, 20


def torchrun(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(JOB)]
    return subprocess.Popen([*cmd, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.timeout(240)
def test_an_fsdp2_job_streams_from_every_rank_and_loses_what_the_bare_job_loses(
    env: dict[str, str], tmp_path: Path
) -> None:
    """fully_shard on CPU ranks: parameters and gradients are DTensor shards. Watched, both ranks'
    figures flow (the gradient norm and update ratio of each rank's own shard), no agent fault,
    and every loss is bit-identical to the bare job's."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(FSDP_JOB)]

    def run(name: str, *extra: str) -> dict[int, dict[str, Any]]:
        out = tmp_path / name
        done = subprocess.run(
            [*cmd, "--out", str(out), *extra], env=env, capture_output=True, text=True, timeout=180
        )
        results = [Path(f"{out}.r{rank}.json") for rank in (0, 1)]
        # On a loaded machine gloo's teardown in destroy_process_group() can abort a rank (a C++
        # thread left joinable), the bare job's too: after each rank wrote its results, that
        # abort is torch's, and the results are whole.
        torn_down = (
            all(r.exists() for r in results) and "terminate called without an active exception" in done.stderr
        )
        assert done.returncode == 0 or torn_down, done.stderr[-3000:]
        return {rank: json.loads(r.read_text()) for rank, r in zip((0, 1), results, strict=True)}

    bare, watched = run("bare"), run("watched", "--watch")
    assert sorted(watched) == [0, 1] and all(w["errors"] == 0 for w in watched.values())
    assert {r: w["losses"] for r, w in watched.items()} == {r: b["losses"] for r, b in bare.items()}
    replayed = json_lines(icsmon("replay", "fsdp-job", "--json", env=env, check=True).stdout)
    samples = [r for r in replayed if r["type"] == "sample"]
    assert {s["rank"] for s in samples} == {0, 1} and len(samples) >= 20
    assert all(s["grad_scope"] == "shard" for s in samples)  # said on every line
    by_step: dict[int, dict[int, dict[str, Any]]] = {}
    for s in samples:
        by_step.setdefault(s["step"], {})[s["rank"]] = s["layers"]
        for name in ("0", "2", "4"):  # the Linears: each rank's own shard's gradient norm
            want = watched[s["rank"]]["shard"][s["step"]][name]
            assert math.isclose(s["layers"][name]["grad_norm"], want, rel_tol=1e-3), (s["step"], name)
            assert s["step"] == 0 or s["layers"][name]["update_ratio"] > 0  # a ratio from step 1 on
    # Where both ranks sampled a step, their shards' norms make the whole parameter's, as README says.
    both = [step for step, ranks in by_step.items() if len(ranks) == 2]
    assert both
    for step in both:
        for name in ("0", "2", "4"):
            whole = math.hypot(*(by_step[step][r][name]["grad_norm"] for r in (0, 1)))
            assert math.isclose(whole, watched[0]["whole"][step][name], rel_tol=1e-3), (step, name)


@pytest.mark.timeout(180)
def test_stop_on_stops_every_rank_of_a_ddp_job_within_a_step_of_one_ranks_nan(env: dict[str, str]) -> None:
    """No viewer, the agent's own cadence: rank 1's NaN loss at step 30 stops both ranks there."""
    job = torchrun(
        env, "--steps", "200", "--delay", "0.01", "--nan-rank", "1", "--nan-from", "30", "--stop-on"
    )
    out, err = job.communicate(timeout=150)
    assert job.returncode == 0, err[-3000:]
    # The ranks share one stdout: their lines may run into each other.
    stopped = sorted(re.findall(r"rank (\d) stopped at step (\d+)", out))
    assert stopped == [("0", "30"), ("1", "30")], out + err[-2000:]


@pytest.mark.timeout(180)
def test_a_ddp_job_is_one_job_and_one_tail_follows_every_rank(env: dict[str, str]) -> None:
    job = torchrun(
        env, "--steps", "500", "--delay", "0.03", "--nan-rank", "1", "--nan-from", str(NAN_FROM),
        "--nan-steps", str(NAN_STEPS),
    )  # fmt: skip
    try:
        (listed,) = wait_for_jobs(env, ranks=2, timeout=90)
        # One job: the ranks share the launcher's run id.
        assert listed["world_size"] == 2 and sorted(r["rank"] for r in listed["ranks"]) == [0, 1]
        table = icsmon("list", env=env, check=True).stdout.splitlines()
        assert len(table) == 2 and "2/2" in table[1] and "ddp-job" in table[1], table

        one = icsmon("tail", "--rank", "1", "--count", "3", "--json", env=env, check=True)
        samples = [json.loads(line) for line in one.stdout.splitlines()]
        assert len(samples) == 3 and {s["rank"] for s in samples} == {1}

        every = icsmon("tail", "--json", env=env, timeout=120, check=True)  # no target: every rank
        lines = [json.loads(line) for line in every.stdout.splitlines()]
    finally:
        _, err = job.communicate(timeout=60)
    assert job.returncode == 0, err[-3000:]
    ranks = {line["rank"] for line in lines if line["type"] == "sample"}
    assert ranks == {0, 1}
    divergence = [line for line in lines if line["type"] == "alert" and line["rule"] == "rank_divergence"]
    assert divergence, [line for line in lines if line["type"] == "alert"]
    first = divergence[0]
    assert first["rank"] == 1 and first["severity"] == "critical" and "rank 1 only" in first["message"]
    assert NAN_FROM <= first["step"] < NAN_FROM + NAN_STEPS
    assert "ended" in every.stderr  # each rank's goodbye, and then tail stops by itself


# ---------------------------------------------------------------------- on stored samples

LAYERS = tuple(LayerInfo(f"{i}", "Linear", (8, 8), "linear") for i in range(4))


def schema(rank: int) -> Schema:
    return Schema(
        run="job-1", rank=rank, seq=1, t=0.0, layers=LAYERS, name="job", host="h", pid=0,
        world_size=3, every=1, started=1.0, schema_id=schema_id_for(LAYERS),
    )  # fmt: skip


def sample(rank: int, step: int, std: float = 1.0, nan_layer: int | None = None) -> Sample:
    figures = np.zeros((len(LAYERS), len(STATS)), dtype=np.float32)
    figures[:, STAT_INDEX["std"]] = std
    figures[:, STAT_INDEX["grad_norm"]] = 0.1
    if nan_layer is not None:
        figures[nan_layer:, STAT_INDEX["std"]] = np.nan
        figures[nan_layer:, STAT_INDEX["nonfinite"]] = 64
    return Sample(
        run="job-1", rank=rank, seq=step + 2, t=float(step), step=step, schema_id=schema_id_for(LAYERS),
        figures=figures, loss=1.0,
    )  # fmt: skip


def test_rank_check_names_the_one_rank_with_nan_and_the_one_an_order_of_magnitude_off() -> None:
    store = Store()
    for rank in range(3):
        store.add(schema(rank))
    check = RankCheck()
    ranks = lambda: [store.get("job-1", r) for r in range(3)]  # noqa: E731
    for step in range(3):
        for rank in range(3):
            store.add(sample(rank, step))
        assert check.update(ranks()) == []  # type: ignore[arg-type]
    # Rank 2 is a step ahead with NaN; ranks 0 and 1 have not sent that step: nothing to compare yet.
    store.add(sample(2, 3, nan_layer=2))
    assert check.update(ranks()) == []  # type: ignore[arg-type]
    store.add(sample(0, 3))
    store.add(sample(1, 3))
    (fired,) = check.update(ranks())  # type: ignore[arg-type]
    assert fired.alert.rule == "rank_divergence" and fired.alert.rank == 2
    assert fired.alert.layer == "2" and fired.alert.severity == "critical" and fired.alert.step == 3
    assert "rank 2 only" in fired.alert.message
    # The same step again (nothing new from the ranks): not judged twice.
    assert check.update(ranks()) == []  # type: ignore[arg-type]
    # Recovered for long enough: it clears.
    cleared = []
    for step in range(4, 8):
        for rank in range(3):
            store.add(sample(rank, step))
        cleared += check.update(ranks())  # type: ignore[arg-type]
    assert [c.cleared for c in cleared] == [True]
    # A 30x larger std on rank 1 (a shard on another scale) is a warning once confirmed.
    fired_std = []
    for step in range(8, 11):
        for rank in range(3):
            store.add(sample(rank, step, std=30.0 if rank == 1 else 1.0))
        fired_std += check.update(ranks())  # type: ignore[arg-type]
    (warning,) = fired_std
    assert warning.alert.rank == 1 and warning.alert.severity == "warning" and warning.alert.figure == "std"
    # Healthy ranks a little apart are not divergent.
    for rank, std in enumerate((1.0, 1.5, 0.7)):
        store.add(sample(rank, 20, std=std))
    assert find(ranks()) is None  # type: ignore[arg-type]


def test_the_feed_runs_the_rank_rule_and_keeps_the_ranks_apart() -> None:
    feed = Feed(lambda: [], engine_factory=lambda: _NoRules())
    for rank in range(3):
        feed.ingest(schema(rank))
    for step in range(3):
        for rank in range(3):
            feed.ingest(sample(rank, step, nan_layer=1 if (rank == 0 and step == 2) else None))
    assert [r.rank for r in feed.ranks_of("job-1")] == [0, 1, 2]
    alerts = [change.alert for _, _, change in feed.changes]
    assert [(a.rule, a.rank) for a in alerts] == [("rank_divergence", 0)]
    # Every rank's view lists the job's divergence alert.
    assert all(feed.active_alerts(r) for r in feed.ranks_of("job-1"))
    # The app's choice of stream moves over the ranks.
    view = ViewState()
    assert view.select(feed, 1) is not None and view.current(feed) is not None


class _NoRules:
    """Per-rank rules that never fire, so the test sees the cross-rank rule alone."""

    def __init__(self) -> None:
        self.active: list[Any] = []

    def update(self, run: Any) -> list[Any]:
        return []


@pytest.mark.timeout(180)
async def test_the_app_on_a_real_ddp_job_shows_both_ranks_and_their_spread(env: dict[str, str]) -> None:
    from icsmon.targets import resolve_local
    from icsmon.tui.app import IcsmonApp
    from tui.screen_text import screen_text, until

    job = torchrun(env, "--steps", "400", "--delay", "0.03")
    try:
        wait_for_jobs(env, ranks=2, timeout=90)
        feed = Feed(lambda: resolve_local(None).endpoints)  # what `icsmon attach` does, no target
        app = IcsmonApp(feed)
        async with app.run_test(size=(160, 30)) as pilot:
            await until(
                pilot, lambda: len(feed.ranks_of(next(iter(feed.store.runs), ("", 0))[0])) >= 2, "both ranks"
            )
            await pilot.press("c")
            await until(pilot, lambda: "2 of 2 ranks" in screen_text(app), "the ranks side by side")
            assert "every rank of one job" in screen_text(app)
            await pilot.press("c", "n")
            await pilot.pause()
            assert {r.rank for r in feed.ranks_of(feed.streams()[0].run)} == {0, 1}
            await pilot.press("q")
    finally:
        job.kill()
        job.communicate(timeout=30)


def test_ranks_sampled_at_different_steps_are_compared_only_at_a_step_both_hold() -> None:
    """The adaptive cadence samples each rank at its own moments: rank 0 at steps 0, 7, 14, 21 (NaN
    at 21), rank 1 at 0, 8, 16, 24 (NaN at 24). They share step 0 only: no divergence to name."""
    store = Store()
    for rank in range(2):
        store.add(dataclasses.replace(schema(rank), world_size=2))
    for rank, steps in ((0, (0, 7, 14, 21)), (1, (0, 8, 16, 24))):
        for step in steps:
            store.add(sample(rank, step, nan_layer=1 if step in (21, 24) else None))
    ranks = [store.get("job-1", r) for r in range(2)]
    assert find(ranks) is None  # type: ignore[arg-type]
    store.add(sample(1, 21, nan_layer=1))  # now both hold step 21, NaN on both: not one rank's
    assert find(ranks) is None  # type: ignore[arg-type]


def test_single_process_jobs_under_one_launcher_id_keep_their_own_run_and_files(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from icsmon_agent.outlet import Identity

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    for var in ("ICSMON_RUN", "TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    one, two = Identity.from_environment("train"), Identity.from_environment("train")
    assert one.run != two.run  # two runs in one sbatch script are two jobs
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ranked = Identity.from_environment("train")
    assert ranked.run == "train-4242" and ranked.rank == 1 and ranked.world_size == 2
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "sweep-lr-0.001-and-a-long-tail")
    a = Identity.from_environment("train").run
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "sweep-lr-0.003-and-a-long-tail")
    b = Identity.from_environment("train").run
    assert a != b and len(a) <= len("train-") + 12  # whole ids, hashed short
