"""Can the viewer keep up? A synthetic job publishes N layers at R samples/s; the viewer reads them.

The job is the agent's real :class:`~icsmon_agent.publisher.Publisher` (real protocol, real XPUB
socket, real ipc:// endpoint) in its own process, submitting sample ``k`` at ``t0 + k/R``. The
viewers under test:

* ``tail``: ``icsmon tail --json`` in its own process; this script reads its stdout.
* ``app``: the Textual app, headless, in this process (its feed worker, its redraw timer).

Printed per case: samples decoded per second, samples dropped (sent but never shown), the viewer's
CPU, hook-to-screen latency p50/p99 (from the moment the job took the figures, ``t0 + k/R``, to the
moment the line was read from ``tail`` or the first redraw that had the step in its store), and for
the app the redraw rate and the time one redraw takes. Targets are printed beside them.

    python benchmarks/viewer.py                      # 100 and 1,000 layers at 20 Hz, tail and app
    python benchmarks/viewer.py --layers 1000 --rate 20 --seconds 20 --viewer app
    python benchmarks/viewer.py --ranks 8 --layers 1000 --idle 10   # a DDP job's 8 ranks, then idle
    python benchmarks/viewer.py --quick              # a few seconds, for the smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TARGET_P99_MS = 250.0
TARGET_FPS = 10.0
TARGET_IDLE_PCT = 1.0


# --------------------------------------------------------------------------------- the synthetic job


class _Host:
    """What :class:`Work` expects of its host buffer (``.numpy()``), without importing torch."""

    def __init__(self, array: np.ndarray[Any, Any]) -> None:
        self.array = array

    def numpy(self) -> np.ndarray[Any, Any]:
        return self.array


def serve(n_layers: int, rate: float, seconds: float, rank: int = 0, world: int = 1, run: str = "") -> int:
    """Child process: publish ``rate`` samples/s of ``n_layers`` layers for ``seconds`` as ``rank``."""
    from icsmon_agent import protocol
    from icsmon_agent.publisher import Publisher, Work, default_endpoint

    runtime = Path(tempfile.mkdtemp(prefix="icsmon-vb-"))
    run = run or f"viewer-bench-{os.getpid()}"
    pub = Publisher(default_endpoint(runtime, f"{run}.r{rank}"), run=run, rank=rank)
    layers = tuple(
        protocol.LayerInfo(
            name=f"blocks.{i // 2}.{'fc' if i % 2 == 0 else 'act'}", type="Linear", shape=(128, 256)
        )
        for i in range(n_layers)
    )
    schema = protocol.Schema(
        run=run,
        rank=rank,
        world_size=world,
        seq=pub.next_seq(),
        t=time.time(),
        layers=layers,
        name="viewer-bench",
        pid=os.getpid(),
        started=time.time(),
        schema_id=protocol.schema_id_for(layers),
    )
    pub.set_schema(schema)
    print(json.dumps({"endpoint": pub.endpoint}), flush=True)
    deadline = time.monotonic() + 60
    while not pub.watching and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)  # let the viewer take the schema before the clock starts
    rng = np.random.default_rng(0)
    base = rng.standard_normal((n_layers, len(protocol.STATS))).astype(np.float32)
    t0 = time.time()
    print(json.dumps({"t0": t0}), flush=True)
    n = int(seconds * rate)
    for k in range(n):
        wait = t0 + k / rate - time.time()
        if wait > 0:
            time.sleep(wait)
        figures = base + np.float32(k * 1e-3)
        pub.submit(
            Work(k, t0 + k / rate, _Host(figures.reshape(-1)), None, n_layers, len(protocol.STATS), [])
        )
    time.sleep(0.5)  # the last samples leave before the closing event
    pub.submit(protocol.Event(run, rank, pub.next_seq(), time.time(), "closing", {"step": n}))
    time.sleep(0.3)
    print(json.dumps({"sent": n, "dropped_at_job": pub.dropped}), flush=True)
    pub.close()
    return 0


# ------------------------------------------------------------------------------------- measurement


@dataclass
class Result:
    viewer: str
    layers: int
    rate: float
    seconds: float
    sent: int = 0
    shown: int = 0
    cpu_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    frames: int = 0
    frame_ms: list[float] = field(default_factory=list)
    wall: float = 0.0
    ranks: int = 1
    idle_cpu: float | None = None  # share of a core with the job over and nothing arriving


def _start_jobs(
    n_layers: int, rate: float, seconds: float, ranks: int
) -> list[tuple[subprocess.Popen[str], str]]:
    """One process per rank (as a DDP job has), sharing a run id."""
    run = f"viewer-bench-{os.getpid()}-{n_layers}"
    out = []
    for rank in range(ranks):
        cmd = [sys.executable, __file__, "--serve", "--layers", str(n_layers), "--rate", str(rate)]
        cmd += ["--seconds", str(seconds), "--rank", str(rank), "--ranks", str(ranks), "--run", run]
        job = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert job.stdout is not None
        out.append((job, str(json.loads(job.stdout.readline())["endpoint"])))
    return out


def _clock(jobs: list[tuple[subprocess.Popen[str], str]]) -> float:
    """The earliest rank's t0 (each rank starts its clock once a viewer subscribed)."""
    return min(float(_read_json(job)["t0"]) for job, _ in jobs)


def _finished(jobs: list[tuple[subprocess.Popen[str], str]]) -> int:
    """Samples sent by all ranks, once each has finished."""
    return sum(int(_read_json(job)["sent"]) for job, _ in jobs)


def _read_json(job: subprocess.Popen[str]) -> dict[str, Any]:
    assert job.stdout is not None
    line = job.stdout.readline()
    if not line:
        raise RuntimeError("the synthetic job ended early")
    out: dict[str, Any] = json.loads(line)
    return out


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux); 0 where that is not readable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def bench_tail(n_layers: int, rate: float, seconds: float, ranks: int = 1) -> Result:
    res = Result("tail --json", n_layers, rate, seconds, ranks=ranks)
    jobs = _start_jobs(n_layers, rate, seconds, ranks)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    tail = subprocess.Popen(
        [sys.executable, "-m", "icsmon", "tail", "--json", *(endpoint for _, endpoint in jobs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    arrivals: list[tuple[float, int, int]] = []

    def read() -> None:
        assert tail.stdout is not None
        for line in tail.stdout:
            now = time.time()
            # The rank and step are near the front; a full json.loads of a 1,000-layer line would
            # make this reader, not the viewer, the thing measured.
            head = line[:200].decode(errors="replace")
            i, r = head.find('"step":'), head.find('"rank":')
            if i >= 0 and r >= 0:
                step = int(head[i + 7 :].split(",", 1)[0])
                arrivals.append((now, int(head[r + 7 :].split(",", 1)[0]), step))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    t0 = _clock(jobs)
    cpu0 = _cpu_seconds(tail.pid)
    res.sent = _finished(jobs)
    cpu1 = _cpu_seconds(tail.pid)
    res.wall = time.time() - t0
    for job, _ in jobs:
        job.wait(10)
    try:
        tail.wait(10)
    except subprocess.TimeoutExpired:
        tail.terminate()
        tail.wait(5)
    reader.join(5)
    res.shown = len({(r, s) for _, r, s in arrivals})
    res.cpu_s = cpu1 - cpu0
    res.latencies = [at - (t0 + s / rate) for at, _, s in arrivals]
    return res


def bench_app(n_layers: int, rate: float, seconds: float, ranks: int = 1, idle: float = 0.0) -> Result:
    from icsmon.alerts.config import default_engine_factory
    from icsmon.feed import Feed
    from icsmon.tui.app import IcsmonApp

    res = Result("app (headless)", n_layers, rate, seconds, ranks=ranks)
    jobs = _start_jobs(n_layers, rate, seconds, ranks)
    endpoints = [endpoint for _, endpoint in jobs]
    feed = Feed(lambda: endpoints, engine_factory=default_engine_factory(None))
    app = IcsmonApp(feed)
    shown: dict[tuple[int, int], float] = {}  # (rank, step) -> first frame that had it
    newest: dict[int, int] = {}
    started: list[float] = []
    tick = app._tick  # the redraw timer's callback: time it, and see which steps it had

    def timed_tick(force: bool = False) -> None:
        before = app.frames
        t = time.perf_counter()
        tick(force)
        if app.frames == before:
            return  # nothing new: no redraw (an idle viewer draws nothing)
        res.frame_ms.append((time.perf_counter() - t) * 1e3)
        now = time.time()
        if not started:
            return
        for run in feed.store.runs.values():
            latest = run.latest_step
            if latest is None:
                continue
            # Every step up to the newest is in the store from this frame on.
            for s in range(newest.get(run.rank, -1) + 1, latest + 1):
                shown[(run.rank, s)] = now
            newest[run.rank] = max(newest.get(run.rank, -1), latest)

    app._tick = timed_tick  # type: ignore[method-assign]

    async def drive() -> float:
        async with app.run_test(headless=True, size=(200, 60)) as pilot:
            t0 = await asyncio.to_thread(_clock, jobs)
            started.append(t0)
            shown.clear()  # frames before the clock started do not count
            newest.clear()
            frames0, cpu0 = len(res.frame_ms), time.process_time()
            res.sent = await asyncio.to_thread(_finished, jobs)
            # The clock stops here: the app's shutdown below is no time it had to redraw in.
            res.wall = time.time() - t0
            res.cpu_s = time.process_time() - cpu0
            res.frames = len(res.frame_ms) - frames0
            res.frame_ms = res.frame_ms[frames0:]
            if idle > 0:
                await pilot.pause(3.0)  # the closing events arrive and are drawn
                cpu_idle, wall_idle = time.process_time(), time.monotonic()
                await asyncio.sleep(idle)
                res.idle_cpu = (time.process_time() - cpu_idle) / (time.monotonic() - wall_idle)
            return t0

    t0 = asyncio.run(drive())
    for job, _ in jobs:
        job.wait(10)
    per_rank = res.sent // max(ranks, 1)
    kept = {k: at for k, at in shown.items() if 0 <= k[1] < per_rank}
    res.shown = len(kept)
    res.latencies = [at - (t0 + s / rate) for (_, s), at in kept.items()]
    return res


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values), q))


def report(results: list[Result]) -> None:
    print(
        f"{'viewer':<16}{'ranks':>6}{'layers':>7}{'Hz':>5}{'sent':>6}{'decoded/s':>11}{'dropped':>9}{'CPU':>7}"
        f"{'fps':>6}{'frame ms':>10}{'p50 ms':>8}{'p99 ms':>8}{'idle CPU':>10}"
    )
    for r in results:
        dropped = r.sent - r.shown
        fps = f"{r.frames / r.wall:.1f}" if r.frames else "-"
        frame = f"{statistics.median(r.frame_ms):.1f}" if r.frame_ms else "-"
        idle = f"{100 * r.idle_cpu:.2f}%" if r.idle_cpu is not None else "-"
        decoded = r.shown * r.rate / max(r.sent, 1) * r.ranks
        print(
            f"{r.viewer:<16}{r.ranks:>6}{r.layers:>7}{r.rate:>5g}{r.sent:>6}{decoded:>11.1f}{dropped:>9}"
            f"{100 * r.cpu_s / r.wall:>6.0f}%{fps:>6}{frame:>10}"
            f"{_pct(r.latencies, 50) * 1e3:>8.1f}{_pct(r.latencies, 99) * 1e3:>8.1f}{idle:>10}"
        )
    print(
        f"targets: 8 ranks x 1,000 layers x 20 Hz, dropped 0, fps >= {TARGET_FPS:g}, p99 < {TARGET_P99_MS:g} ms; "
        f"idle CPU < {TARGET_IDLE_PCT:g}%"
    )
    print("(frame ms: one redraw of the app's widgets from the store; Textual composes the screen after it)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, action="append", help="layers (repeatable; default 100 and 1000)")
    p.add_argument("--rate", type=float, default=20.0, help="samples per second (default 20)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--viewer", choices=["tail", "app", "both"], default="both")
    p.add_argument("--ranks", type=int, default=1, help="ranks of the job, one process each (default 1)")
    p.add_argument(
        "--idle", type=float, default=0.0, metavar="S", help="app: then S seconds with nothing arriving"
    )
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--run", default="", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="a few seconds: for the smoke test")
    args = p.parse_args(argv)
    if args.serve:
        return serve(args.layers[0], args.rate, args.seconds, args.rank, args.ranks, args.run)
    layers = args.layers or ([50] if args.quick else [100, 1000])
    seconds = 1.5 if args.quick else args.seconds
    os.environ.setdefault("ICSMON_RUNTIME_DIR", tempfile.mkdtemp(prefix="icsmon-vb-"))
    results = []
    for n in layers:
        if args.viewer in ("tail", "both"):
            results.append(bench_tail(n, args.rate, seconds, args.ranks))
        if args.viewer in ("app", "both"):
            try:
                results.append(bench_app(n, args.rate, seconds, args.ranks, args.idle))
            except ImportError as exc:  # the app is optional to this benchmark
                print(f"(no app to measure: {exc})")
    report(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
