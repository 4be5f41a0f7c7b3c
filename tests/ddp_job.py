"""A small data-parallel training job, as `torchrun --standalone --nproc_per_node=2 ddp_job.py` runs it.

Gloo on CPU, a real ``DistributedDataParallel`` MLP on a synthetic learnable task, AdamW, gradient
clipping, and the loss-scaler habit of skipping a step whose gradients are not finite. With
``--nan-rank R --nan-from S --nan-steps N`` rank R's batches are NaN for N steps from step S: a
bad shard on one node. DDP averages the NaN into every rank's gradients, the skip keeps the
weights finite, so the other ranks stay healthy while rank R's activations are NaN. With
``--stop-on`` the job samples at the agent's own cadence with ``stop_on=("nonfinite",)`` and every
rank stops at the first step any rank's ``should_stop`` says so, as the README's loop does.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import icsmon_agent
from icsmon_agent.integrations import any_rank


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--delay", type=float, default=0.02)
    parser.add_argument("--nan-rank", type=int, default=-1)
    parser.add_argument("--nan-from", type=int, default=100)
    parser.add_argument("--nan-steps", type=int, default=20)
    parser.add_argument("--stop-on", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))
    ddp = DistributedDataParallel(model)
    if args.stop_on:
        mon = icsmon_agent.watch(ddp, name="ddp-job", stop_on=("nonfinite",))
    else:
        mon = icsmon_agent.watch(ddp, every=1, name="ddp-job")
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(1 + rank)
    target_map = torch.randn(16, 4, generator=torch.Generator().manual_seed(99))
    for step in range(args.steps):
        x = torch.randn(32, 16, generator=data)
        y = x @ target_map
        if rank == args.nan_rank and args.nan_from <= step < args.nan_from + args.nan_steps:
            x = x * float("nan")
        loss = nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
        if torch.isfinite(norm):
            opt.step()
        mon.step(loss=loss)
        if args.stop_on and any_rank(mon.should_stop, ddp):
            print(f"rank {rank} stopped at step {step}", flush=True)
            break
        time.sleep(args.delay)
    mon.close()
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank} done (pid {os.getpid()})", flush=True)


if __name__ == "__main__":
    main()
