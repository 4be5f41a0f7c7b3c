"""The agent's resident memory over a long run with nobody watching: it must stay flat.

A tiny model trains ``--steps`` steps (100,000 by default) with the agent attached and no viewer;
the process's resident set size is printed at checkpoints, beside a bare run of the same length in
the same process before it (so the growth the allocator and torch show on their own is visible).
The agent keeps a bounded queue, a bounded history of encoded samples and fixed-size device
buffers; anything that grows per step shows here as a slope.

    python benchmarks/memory.py                  # 100,000 steps, bare then with the agent
    python benchmarks/memory.py --every 1        # sample as often as the agent ever does
    python benchmarks/memory.py --quick          # a few thousand steps, for the smoke test
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time

import torch
from torch import nn

import icsmon_agent

TARGET_GROWTH_MIB = 1.0  # over the agent's run after warm-up: bounded means no slope


def rss_mib() -> float:
    """Resident set size of this process (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def run(steps: int, agent: bool, every: int | None, checkpoints: list[int]) -> list[tuple[int, float]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 16), torch.randn(8, 4)
    mon = icsmon_agent.watch(model, every=every, name="memory-bench") if agent else None
    marks: list[tuple[int, float]] = []
    try:
        for step in range(1, steps + 1):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            if mon is not None:
                mon.step(loss=loss)
            if step in checkpoints:
                gc.collect()
                marks.append((step, rss_mib()))
        if mon is not None:
            print(f"  agent: {mon.steps} steps, faults {mon.errors}, watched: {mon.watching}")
    finally:
        if mon is not None:
            mon.close()
    return marks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--every", type=int, default=None, help="a fixed cadence (default: the adaptive one)")
    p.add_argument("--quick", action="store_true", help="a few thousand steps: for the smoke test")
    args = p.parse_args(argv)
    steps = 1_000 if args.quick else args.steps
    torch.set_num_threads(1)
    os.environ.setdefault("ICSMON_RUNTIME_DIR", tempfile.mkdtemp(prefix="icsmon-mem-"))
    os.environ.setdefault("ICSMON_STATE_DIR", tempfile.mkdtemp(prefix="icsmon-mem-state-"))
    warm = min(1_000, steps // 10)
    checkpoints = sorted({warm, steps // 10, steps // 4, steps // 2, steps} - {0})
    print(
        f"tiny MLP, {steps:,} steps, no viewer; agent every={args.every or 'adaptive'}, judging every "
        "sample and keeping its history"
    )
    rows = []
    for label, agent in (("bare", False), ("agent", True)):
        t = time.perf_counter()
        marks = run(steps, agent, args.every, checkpoints)
        elapsed = time.perf_counter() - t
        base = marks[0][1]
        growth = marks[-1][1] - base
        rows.append((label, marks, growth, elapsed))
    print(f"{'run':<8}" + "".join(f"{f'step {s:,}':>14}" for s in checkpoints) + f"{'growth':>12}")
    for label, marks, growth, elapsed in rows:
        cells = "".join(f"{m:>10.1f} MiB" for _, m in marks)
        print(f"{label:<8}{cells}{growth:>+8.2f} MiB   ({elapsed:.1f} s)")
    agent_growth = rows[1][2]
    verdict = "ok" if agent_growth <= TARGET_GROWTH_MIB else "MISS"
    print(
        f"agent growth after step {warm:,}: {agent_growth:+.2f} MiB "
        f"(target <= {TARGET_GROWTH_MIB:g} MiB: bounded) {verdict}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
