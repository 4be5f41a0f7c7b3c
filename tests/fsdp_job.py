"""A small FSDP2 job, as `torchrun --standalone --nproc_per_node=2 fsdp_job.py [--watch]` runs it.

``fully_shard`` on each Linear and on the root (gloo on CPU), AdamW: each parameter and gradient
is a DTensor holding this rank's shard. Each rank writes ``OUT.r<rank>.json`` (the ranks share one
stdout, where their lines could run into each other): its losses (hex, for bit-for-bit comparison
with the bare run), each step's gradient norms of each Linear (its own shard's, and the whole
parameter's from ``full_tensor()``) and, watched, the agent's fault count.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import icsmon_agent


def reference_norms(model: nn.Module, shard: list[dict[str, float]], whole: list[dict[str, float]]) -> None:
    """Each Linear's gradient norm (weight and bias) now: this rank's shard's, and the whole
    parameter's (``full_tensor()``, a collective every rank makes here, in the same order)."""
    grads = {name: [p.grad for p in model[int(name)].parameters()] for name in ("0", "2", "4")}
    shard.append({n: float(torch.stack([g.to_local().norm() for g in gs]).norm()) for n, gs in grads.items()})
    whole.append(
        {n: float(torch.stack([g.full_tensor().norm() for g in gs]).norm()) for n, gs in grads.items()}
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--watch", action="store_true")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", required=True)
    parser.add_argument("--every", type=int, default=1, help="0: the adaptive default cadence")
    parser.add_argument("--norms", type=int, default=1, help="0: no reference norms (timing runs)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    every = args.every or None
    mon = icsmon_agent.watch(model, every=every, name="fsdp-job", quiet=True) if args.watch else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(1 + rank)
    losses = []
    # Each step's gradient norm of each Linear (weight and bias): this rank's shard, and whole.
    shard_norms: list[dict[str, float]] = []
    whole_norms: list[dict[str, float]] = []
    started = time.perf_counter()
    for _ in range(args.steps):
        x = torch.randn(8, 16, generator=data)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if args.norms:
            reference_norms(model, shard_norms, whole_norms)
        if mon is not None:
            mon.step(loss=loss)
        losses.append(float(loss).hex())
    seconds = time.perf_counter() - started
    errors = mon.errors if mon is not None else 0
    if mon is not None:
        mon.close()
    with open(f"{args.out}.r{rank}.json", "w") as fh:
        json.dump(
            {
                "rank": rank,
                "losses": losses,
                "errors": errors,
                "seconds": seconds,
                "shard": shard_norms,
                "whole": whole_norms,
            },
            fh,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
