"""A compiled train step, as torchtitan-style trainers write it: one JSON line of what happened.

``--fn forward``: ``@torch.compile(fullgraph=True)`` over the forward and the loss (backward and the
optimizer eager). ``--fn step``: one compiled function holding forward, backward, ``opt.step()``
and ``zero_grad`` (dynamo breaks its graph at the backward, as for any such function; ``fullgraph``
would refuse it bare as well). ``--watch`` adds the agent and ``mon.step(loss=loss)`` after each
call, with a viewer in-process; the test compares with the bare run under
``TORCH_LOGS=recompiles,graph_breaks``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from torch import nn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fn", choices=["forward", "step"], required=True)
    parser.add_argument("--watch", action="store_true")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon: Any = None
    sub: Any = None
    if args.watch:
        import icsmon_agent
        from icsmon.subscriber import Subscriber

        mon = icsmon_agent.watch(model, every=2, endpoint="tcp", quiet=True)
        sub = Subscriber(mon.endpoint)
        sub.__enter__()
        deadline = time.monotonic() + 10
        while not mon.watching and time.monotonic() < deadline:
            sub.poll(0.05)

    @torch.compile(fullgraph=True)
    def forward_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(model(x), y)

    @torch.compile
    def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    data = torch.Generator().manual_seed(1)
    losses: list[str] = []
    samples: list[Any] = []
    for _ in range(args.steps):
        x, y = torch.randn(16, 32, generator=data), torch.randn(16, 4, generator=data)
        if args.fn == "forward":
            loss = forward_loss(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            loss = train_step(x, y)
        if mon is not None:
            mon.step(loss=loss)
            samples += [m for m in sub.poll(0) if type(m).__name__ == "Sample"]
        losses.append(float(loss).hex())
    summary: dict[str, Any] = {"losses": losses}
    if mon is not None:
        mon.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(samples) < args.steps // 2:
            samples += [m for m in sub.poll(0.05) if type(m).__name__ == "Sample"]
        sub.__exit__(None, None, None)
        summary |= {
            "errors": mon.errors,
            "layers": mon.layer_names,
            "sampled": [s.step for s in samples],
            "unsent": mon.skipped + mon.dropped,
            "losses_sent": [s.loss for s in samples],
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
