"""What the agent costs a ``torch.compile``d model: bare vs default cadence vs every step.

Each variant is its own copy of the same model (same weights), compiled on its own, trained on the
same batches; rounds run A B C ... interleaved (the order rotates) so the machine's drift hits every
variant alike. Printed per variant: median step time, the wall ratio (its total over bare's across
the same rounds), the recompilations and graph breaks Dynamo counted while compiling it, and the
samples its viewer received. Every agent variant has an in-process subscriber, so it samples at its
watched cadence. Compile time is left out: each variant trains ``--warmup`` steps first, long
enough for both of its graphs (sampled and unsampled) to exist.

    python benchmarks/compiled.py                 # the nanoGPT-style GPT, CPU, one thread
    python benchmarks/compiled.py --model all     # + ResNet-18, MLP
    python benchmarks/compiled.py --device cuda   # on a GPU
    python benchmarks/compiled.py --quick         # a short run, for the smoke test
    python benchmarks/compiled.py --train-step    # compile forward + loss as one fullgraph function,
                                                  # mon.step(loss=loss) after it (torchtitan-style)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import icsmon_agent
from icsmon.store import Store
from icsmon.subscriber import Subscriber
from icsmon_agent.protocol import Sample

# The public-style models the tests train (no downloads): nanoGPT's GPT, torchvision's ResNet-18.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from public_models import GPT, copy_task, mlp, quadrant_task, resnet18

Batch = tuple[torch.Tensor, torch.Tensor]


def gpt_job(device: torch.device) -> tuple[nn.Module, Callable[[nn.Module, Batch], torch.Tensor], Batch]:
    x, y = copy_task(torch.Generator().manual_seed(0), batch=16, block=64)
    return GPT(block_size=64, n_layer=4, n_embd=64), lambda m, b: m(*b)[1], (x.to(device), y.to(device))


def resnet_job(device: torch.device) -> tuple[nn.Module, Callable[[nn.Module, Batch], torch.Tensor], Batch]:
    x, y = quadrant_task(torch.Generator().manual_seed(0), batch=32)
    return resnet18(), lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x.to(device), y.to(device))


def mlp_job(device: torch.device) -> tuple[nn.Module, Callable[[nn.Module, Batch], torch.Tensor], Batch]:
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    return mlp(), lambda m, b: F.mse_loss(m(b[0]), b[1]), (x.to(device), x[:, :4].to(device))


JOBS = {"gpt": gpt_job, "resnet": resnet_job, "mlp": mlp_job}


@dataclass
class Variant:
    label: str
    every: int | None  # None: the adaptive default; 0: bare
    model: nn.Module
    compiled: Any
    opt: torch.optim.Optimizer
    mon: Any = None
    sub: Any = None
    store: Store = field(default_factory=Store)
    samples: int = 0
    times: list[float] = field(default_factory=list)
    graphs: int = 0  # graphs Dynamo compiled for this variant: 1 + its recompilations
    breaks: int = 0
    train_step: bool = False  # the compiled function is forward + loss (fullgraph), not the module

    def poll(self) -> None:
        if self.sub is not None:
            self.samples += sum(1 for m in self.sub.poll(0) if self.store.add(m) and isinstance(m, Sample))


def train(
    v: Variant,
    loss_of: Callable[[nn.Module, Batch], torch.Tensor],
    batch: Batch,
    steps: int,
    sync: Callable[[], None],
) -> float:
    """Seconds for ``steps`` steps; what Dynamo compiled meanwhile is counted to this variant."""
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = v.compiled(batch)
        loss.backward()
        v.opt.step()
        v.opt.zero_grad(set_to_none=True)
        if v.mon is not None and v.train_step:
            v.mon.step(loss=loss)
    sync()
    elapsed = time.perf_counter() - t0
    v.graphs += counters["stats"]["unique_graphs"] - graphs
    v.breaks += sum(counters["graph_break"].values()) - breaks
    return elapsed


def run(name: str, args: argparse.Namespace, device: torch.device) -> None:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    base, loss_of, batch = JOBS[name](device)
    variants: list[Variant] = []
    for label, every in (("bare", 0), ("default+viewer", None), ("every=1+viewer", 1)):
        model = copy.deepcopy(base).to(device)
        v = Variant(label, every, model, None, torch.optim.AdamW(model.parameters(), lr=1e-4))
        v.train_step = args.train_step
        if every != 0:
            v.mon = icsmon_agent.watch(model, every=every, endpoint="tcp")
            v.sub = Subscriber(v.mon.endpoint).__enter__()
            deadline = time.monotonic() + 10
            while not v.mon.watching and time.monotonic() < deadline:
                v.sub.poll(0.05)
        variants.append(v)
    # Compiled only once every agent is watching: Dynamo shares a graph between copies of one model,
    # and one traced before the hooks existed would never call them (the agent warns of that).
    for v in variants:
        if args.train_step:
            v.compiled = torch.compile(_forward_loss(v.model, loss_of), fullgraph=True)
        else:
            compiled = torch.compile(v.model)
            v.compiled = lambda b, compiled=compiled: loss_of(compiled, b)
        train(v, loss_of, batch, args.warmup, sync)
        v.poll()
    for r in range(args.rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            v.times.append(train(v, loss_of, batch, args.steps, sync) / args.steps)
            v.poll()
    bare = sum(variants[0].times)
    what = "forward + loss compiled (fullgraph)" if args.train_step else "compiled"
    print(
        f"\n{name}: {what}, device {device}, {torch.get_num_threads()} thread(s); {args.rounds} rounds x {args.steps} steps"
    )
    print(
        f"{'variant':<16} {'ms/step':>8} {'wall ratio':>11} {'recompiles':>11} {'graph breaks':>13} {'samples':>8}"
    )
    for v in variants:
        print(
            f"{v.label:<16} {statistics.median(v.times) * 1e3:>8.2f} {sum(v.times) / bare:>10.3f}x "
            f"{v.graphs - 1:>11} {v.breaks:>13} {v.samples if v.mon else '-':>8}"
        )
    for v in variants:
        if v.mon is not None:
            v.mon.close()
            v.sub.__exit__(None, None, None)


def _forward_loss(
    model: nn.Module, loss_of: Callable[[nn.Module, Batch], torch.Tensor]
) -> Callable[[Batch], torch.Tensor]:
    """A train step's forward and loss as one function, closed over this variant's model."""

    def forward_loss(batch: Batch) -> torch.Tensor:
        return loss_of(model, batch)

    return forward_loss


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=[*JOBS, "all"], default="gpt")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--quick", action="store_true", help="2 rounds of 3 steps, MLP only")
    p.add_argument(
        "--train-step", action="store_true", help="compile forward + loss as one fullgraph function"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.rounds, args.steps, args.warmup = "mlp", 2, 3, 4
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for name in JOBS if args.model == "all" else [args.model]:
        run(name, args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
