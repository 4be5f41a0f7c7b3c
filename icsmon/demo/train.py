"""Train one demo scenario with the agent watching: ``python -m icsmon.demo.train SCENARIO``.

``icsmon demo`` starts one of these per run of the scenario. It is also a plain example of the two
lines a training script needs. The last line on stdout is a JSON summary (steps run, the first step
whose loss was not finite), which the tests read.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
from torch import nn

import icsmon_agent
from icsmon.demo.scenarios import SCENARIOS, Net

IN_FEATURES = 256
CLASSES = 10
BATCH = 128
#: After the loss goes non-finite, train this many more steps (the viewer shows the NaN spread), then stop.
STEPS_AFTER_NONFINITE = 5


def build(net: Net) -> nn.Sequential:
    layers: list[nn.Module] = []
    fan_in = IN_FEATURES
    for _ in range(net.depth):
        layers.append(nn.Linear(fan_in, net.width))
        if net.batchnorm:
            layers.append(nn.BatchNorm1d(net.width))
        layers.append(nn.Tanh() if net.activation == "tanh" else nn.ReLU())
        fan_in = net.width
    layers.append(nn.Linear(fan_in, CLASSES))
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, nn.Linear):
                continue
            fan = m.in_features
            hidden = m.out_features == net.width and m is not layers[-1]
            init = net.init if hidden else "xavier"  # the read-out layer is the same in every scenario
            std = {"he": math.sqrt(2 / fan), "xavier": math.sqrt(1 / fan)}.get(init, net.init_std)
            m.weight.normal_(0.0, std)
            m.bias.fill_(net.bias if hidden else 0.0)
    return model


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m icsmon.demo.train", description=__doc__)
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--net", help="which run of a multi-run scenario (its label); default: the first")
    p.add_argument("--steps", type=int, help="training steps (default: the scenario's)")
    p.add_argument(
        "--every",
        type=int,
        default=1,
        help="sample every N steps (default 1: lively; 0: the agent's own cadence)",
    )
    p.add_argument("--seed", type=int, default=0)
    # One thread: these nets are small, and on a shared machine more threads make them much slower.
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--wait-viewer", type=float, default=0.0, metavar="S", help="wait up to S s for a viewer")
    p.add_argument("--delay", type=float, default=0.0, metavar="S", help="sleep S s per step (slow motion)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    scenario = SCENARIOS[args.scenario]
    nets = {n.label: n for n in scenario.nets}
    net = nets.get(args.net or scenario.nets[0].label)
    if net is None:
        print(
            f"icsmon: scenario {scenario.name} has no run {args.net!r} ({', '.join(nets)})", file=sys.stderr
        )
        return 2
    steps = args.steps if args.steps is not None else scenario.steps
    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)
    model = build(net)
    teacher = torch.randn(IN_FEATURES, CLASSES)
    opt = torch.optim.SGD(model.parameters(), lr=net.lr, momentum=0.9)
    mon = icsmon_agent.watch(model, name=net.label, every=args.every or None)
    deadline = time.monotonic() + args.wait_viewer
    while not mon.watching and time.monotonic() < deadline:
        time.sleep(0.02)

    first_nonfinite: int | None = None
    step = 0
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = min(net.lr * net.lr_growth**step, net.lr_max)
        x = torch.randn(BATCH, IN_FEATURES)
        y = (x @ teacher).argmax(dim=1)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        mon.step(loss=loss)
        if first_nonfinite is None and not math.isfinite(loss.item()):
            first_nonfinite = step
        if first_nonfinite is not None and step >= first_nonfinite + STEPS_AFTER_NONFINITE:
            break
        if args.delay:
            time.sleep(args.delay)
    mon.close()
    summary = {
        "scenario": scenario.name,
        "net": net.label,
        "steps": step + 1,
        "first_nonfinite_loss_step": first_nonfinite,
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
