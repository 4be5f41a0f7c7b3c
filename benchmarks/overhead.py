"""What the agent costs a training step: bare vs default cadence vs every step, interleaved in one run.

Every variant trains its own copy of the same model (same weights, same batch) in this process;
rounds run A B C ... A B C ... (the order rotates each round) so drift in clock speed, cache
state or a neighbour's load hits every variant alike. A round is ``--steps`` training steps (a
multiple of the sampling period, so each round of a cadence variant holds its sampled steps).

Printed per variant: median step time; the wall ratio, its total time over the bare total across
the same rounds (the figure the targets apply to: every sampled step counts); the median of the
per-round ratios (robust to a stray slow round); the CPU ratio, the process's CPU time (all its
threads, the publisher's included) over bare's, which a busy machine disturbs least; and the
training thread's own CPU time over bare's ("train thread"): what the agent costs that thread, its
hooks and the stalls that contention adds, without the time the scheduler gave to others. Targets
are printed beside the ratios they apply to.

Each agent variant also runs paused rounds (``Monitor.pause()``: no sampling, no layer hooks) on
its own copy, each next to one of its rounds, and "vs paused" is its total over those: the
agent's cost with the copy's own speed divided out. Why: on a small shared machine two copies of one model
train at speeds a few percent apart (where their memory landed), which is more than the 1% the
default cadence is allowed; "paused vs bare" prints that spread for each copy. A paused step still
runs the agent's two per-step calls (microseconds), so "vs paused" leaves those out and the wall
ratio keeps them in.

"viewer" variants have a real ``icsmon tail --json`` subscribed to their own agent, in its own
process; "no viewer" variants publish to nobody, as a job runs unattended: the same cadence, the
job's own rules judging every sample, its history kept (in a temporary state directory).
The anchor column (``tensorboard``: ``SummaryWriter.add_histogram`` of every layer's output every
step) appears when the ``tensorboard`` package is installed.

    python benchmarks/overhead.py                    # seed MLP, CPU, one thread
    python benchmarks/overhead.py --model all        # + small CNN, small transformer
    python benchmarks/overhead.py --device cuda      # on a GPU
    python benchmarks/overhead.py --quick            # a second or two, for the smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# Imported after torch so a missing package shows as an ImportError here, not deep in a variant.
import icsmon_agent
from icsmon_agent import kernel

TARGETS = {"default+viewer": 1.01, "default, no viewer": 1.01, "every+viewer": 1.10}
ROUND_GAP_S = 0.05
#: A step's phases as train() times them: zero_grad + forward + loss; backward; optimizer + the
#: agent's step() (+ the anchor's logging).
PHASES = ("forward", "backward", "optimizer+step")


# ------------------------------------------------------------------------------------------ models


def seed_mlp() -> nn.Module:
    """The seed's 50-layer width-256 ReLU MLP (He init: the healthy scenario, so figures stay finite)."""
    layers: list[nn.Module] = []
    for _ in range(50):
        lin = nn.Linear(256, 256)
        nn.init.normal_(lin.weight, 0.0, (2 / 256) ** 0.5)
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers)


def small_cnn() -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, 32),
        *block(32, 32),
        nn.MaxPool2d(2),
        *block(32, 64),
        *block(64, 64),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


class SmallTransformer(nn.Module):
    def __init__(self, vocab: int = 512, d: int = 128, depth: int = 4, seq: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=4 * d, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(tokens) + self.pos)
        out: torch.Tensor = self.head(self.norm(h))
        return out


@dataclass
class Spec:
    title: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.device], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


MODELS: dict[str, Spec] = {
    "mlp": Spec(
        "seed MLP: 50 x Linear(256)+ReLU, batch 128",
        seed_mlp,
        lambda d: (torch.randn(128, 256, device=d), torch.randn(128, 256, device=d)),
        nn.functional.mse_loss,
    ),
    # Not a benchmark: what --quick trains, so the smoke test checks the script in a second or two.
    "tiny": Spec(
        "tiny MLP: 4 x Linear(32)+ReLU, batch 16 (--quick)",
        lambda: nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(32, 32), nn.ReLU())]),
        lambda d: (torch.randn(16, 32, device=d), torch.randn(16, 32, device=d)),
        nn.functional.mse_loss,
    ),
    "cnn": Spec(
        "small CNN: 4 x Conv3x3+BN+ReLU, 32x32x3, batch 32",
        small_cnn,
        lambda d: (torch.randn(32, 3, 32, 32, device=d), torch.randint(0, 10, (32,), device=d)),
        _ce,
    ),
    "transformer": Spec(
        "small transformer: 4 encoder layers, d=128, seq 64, batch 8",
        SmallTransformer,
        lambda d: (torch.randint(0, 512, (8, 64), device=d), torch.randint(0, 512, (8, 64), device=d)),
        _ce,
    ),
}


# ---------------------------------------------------------------------------------------- variants


@dataclass
class Variant:
    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    mon: icsmon_agent.Monitor | None = None
    after_forward: Callable[[int], None] | None = None
    times: list[float] = field(default_factory=list)  # wall seconds per step, one entry per round
    cpu: list[float] = field(default_factory=list)  # process CPU seconds per step (all threads)
    # The training thread's own CPU seconds per step: what the agent costs it (its hooks, and the
    # stalls contention adds), without the time the scheduler gave to anything else on the box.
    thread_cpu: list[float] = field(default_factory=list)
    # Wall seconds of each step's phases, measured rounds only (see PHASES); CPU runs only, where
    # no device queue hides the time.
    phases: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PHASES})
    # Agent variants: wall seconds per step of the rounds run paused on the same copy.
    paused: list[float] = field(default_factory=list)
    step: int = 0


def _viewer(endpoint: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A real viewer in its own process: ``icsmon tail --json`` with its output thrown away."""
    return subprocess.Popen(
        [sys.executable, "-m", "icsmon", "tail", "--json", endpoint],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _tensorboard_hooks(model: nn.Module, logdir: str) -> tuple[Callable[[int], None], Callable[[], None]]:
    """The anchor: a naive but common pattern, every layer's output histogram every step."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(logdir)
    outputs: list[tuple[str, torch.Tensor]] = []

    def make(name: str) -> Callable[[nn.Module, Any, torch.Tensor], None]:
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            outputs.append((name, out.detach()))

        return hook

    for name, module in model.named_modules():
        if next(module.children(), None) is None:
            module.register_forward_hook(make(name))

    def flush(step: int) -> None:
        for name, out in outputs:
            writer.add_histogram(name, out, step)
        outputs.clear()

    return flush, writer.close


@contextlib.contextmanager
def variants(
    spec: Spec, device: torch.device, every: int | None, viewer: str, tensorboard: bool, only_every: bool
) -> Iterator[list[Variant]]:
    torch.manual_seed(0)
    base = spec.build().to(device)
    procs: list[subprocess.Popen[bytes]] = []
    closers: list[Callable[[], None]] = []
    out: list[Variant] = []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    def add(name: str) -> Variant:
        model = copy.deepcopy(base)
        v = Variant(name, model, torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9))
        out.append(v)
        return v

    try:
        add("bare")
        configs: list[tuple[str, int | None, bool]] = []
        label = cadence_label(every)
        if viewer in ("yes", "both"):
            configs += [(f"{label}+viewer", every, True), ("every=1+viewer", 1, True)]
        if viewer in ("no", "both"):
            configs += [(f"{label}, no viewer", every, False), ("every=1, no viewer", 1, False)]
        if only_every:
            configs = [c for c in configs if c[1] == 1]
        for name, period, watched in configs:
            v = add(name)
            v.mon = icsmon_agent.watch(v.model, every=period, name=f"bench-{name}")
            closers.append(v.mon.close)
            if watched:
                assert v.mon.endpoint is not None
                procs.append(_viewer(v.mon.endpoint, env))
        if tensorboard:
            v = add("tensorboard")
            logdir = tempfile.mkdtemp(prefix="icsmon-bench-tb-")
            v.after_forward, close = _tensorboard_hooks(v.model, logdir)
            closers.append(close)
        # The agent's first step builds its layer table; viewers need a moment to subscribe.
        deadline = time.monotonic() + 30
        for v in out:
            if v.mon is not None and "viewer" in v.name and "no viewer" not in v.name:
                while not v.mon.watching and time.monotonic() < deadline:
                    time.sleep(0.05)
                if not v.mon.watching:
                    raise RuntimeError(f"no viewer subscribed to {v.name} within 30 s")
        yield out
    finally:
        for close in closers:
            with contextlib.suppress(Exception):
                close()
        for proc in procs:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)


def train(v: Variant, spec: Spec, x: torch.Tensor, y: torch.Tensor, steps: int, phases: bool = False) -> None:
    clock = time.perf_counter
    for _ in range(steps):
        t0 = clock()
        v.opt.zero_grad(set_to_none=True)
        loss = spec.loss(v.model(x), y)
        t1 = clock()
        loss.backward()  # type: ignore[no-untyped-call]
        t2 = clock()
        v.opt.step()
        if v.mon is not None:
            v.mon.step(loss=loss)  # a tensor: the agent never calls .item() on it
        if v.after_forward is not None:
            v.after_forward(v.step)
        v.step += 1
        if phases:
            for name, seconds in zip(PHASES, (t1 - t0, t2 - t1, clock() - t2), strict=True):
                v.phases[name].append(seconds)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cadence_label(every: int | None) -> str:
    return "default" if every is None else f"every={every}"


def run_model(key: str, args: argparse.Namespace, device: torch.device, tensorboard: bool) -> None:
    spec = MODELS[key]
    every: int | None = args.every
    # A fixed cadence: a round holds whole sampling periods. The adaptive default samples by time,
    # so rounds only need to be long enough to hold several samples (see --steps).
    steps = args.steps if every is None else max(args.steps, every) // every * every
    print(f"\n{key}: {spec.title}; device {device}, {torch.get_num_threads()} thread(s)")
    print(
        f"rounds {args.rounds} x {steps} steps, warm-up {args.warmup} rounds, cadence {cadence_label(every)}"
    )
    if device.type == "cpu":
        # The agent's figures cost three times as much without its C kernel: say which one ran.
        kernel_built = kernel.available()
        print(
            "CPU reductions: "
            + ("one-pass C kernel" if kernel_built else "torch ops (the C kernel is not built)")
        )
    x, y = spec.batch(device)
    with variants(spec, device, every, args.viewer, tensorboard, args.only_every) as vs:
        for r in range(args.warmup + args.rounds):
            order = vs[r % len(vs) :] + vs[: r % len(vs)]  # rotate: no variant always follows another
            for k, v in enumerate(order):
                # An agent variant's round is a pair, its paused round next to it (the pair's order
                # alternating), so the two see the same moment of the box and "vs paused" is tight.
                pair = [False] if v.mon is None else [False, True] if (r + k) % 2 else [True, False]
                for paused in pair:
                    if v.mon is not None:
                        v.mon.pause() if paused else v.mon.resume()
                    _sync(device)
                    t0, c0, tc0 = time.perf_counter(), time.process_time(), time.thread_time()
                    measured = r >= args.warmup
                    train(v, spec, x, y, steps, phases=measured and not paused and device.type == "cpu")
                    _sync(device)
                    t1, c1, tc1 = time.perf_counter(), time.process_time(), time.thread_time()
                    # Untimed: the round's last sample is finished off the training thread (~2 ms)
                    # before the next round's clock starts, so no round pays for another's (one
                    # sample's finishing a round goes uncounted: ~0.1% of a 40-step round).
                    time.sleep(ROUND_GAP_S)
                    if not measured:
                        continue
                    if paused:
                        v.paused.append((t1 - t0) / steps)
                        continue
                    v.times.append((t1 - t0) / steps)
                    v.cpu.append((c1 - c0) / steps)
                    v.thread_cpu.append((tc1 - tc0) / steps)
        # The training thread's CPU time says what the agent costs it only where that thread does
        # all of the work: not with intra-op threads (their time is not its), not on a GPU (it
        # would count the synchronising spin).
        report(vs, every, thread_column=device.type == "cpu" and torch.get_num_threads() == 1)
        if device.type == "cpu":
            report_phases(vs)


def report(vs: list[Variant], every: int | None, thread_column: bool) -> None:
    bare, bare_cpu, bare_thread = vs[0].times, vs[0].cpu, vs[0].thread_cpu
    print(
        f"{'variant':<22}{'ms/step':>9}{'wall ratio':>12}{'(median)':>10}{'CPU ratio':>11}"
        f"{'train thread':>14}{'vs paused':>11}   target (wall; vs paused)"
    )
    for v in vs:
        ratio_total = sum(v.times) / sum(bare)
        ratio_med = statistics.median(t / b for t, b in zip(v.times, bare, strict=True))
        ratio_cpu = sum(v.cpu) / sum(bare_cpu)
        ratio_thread = f"{sum(v.thread_cpu) / sum(bare_thread):.3f}x" if thread_column else "-"
        target = None
        if v.name == f"{cadence_label(every)}+viewer" and every is None:
            target = TARGETS["default+viewer"]
        elif v.name == f"{cadence_label(every)}, no viewer" and every is None:
            target = TARGETS["default, no viewer"]
        elif v.name == "every=1+viewer":
            target = TARGETS["every+viewer"]
        ratio_own = sum(v.times) / sum(v.paused) if v.paused else None
        own = f"{ratio_own:.3f}x" if ratio_own is not None else "-"
        mark = ""
        if target is not None:
            mark = f"<= {target:.2f}" + (" ok" if ratio_total <= target else " MISS")
            if ratio_own is not None:
                mark += "; " + ("ok" if ratio_own <= target else "MISS")
        print(
            f"{v.name:<22}{statistics.median(v.times) * 1e3:>9.2f}{ratio_total:>11.3f}x"
            f"{ratio_med:>9.3f}x{ratio_cpu:>10.3f}x{ratio_thread:>14}{own:>11}   {mark}"
        )
    mons = [v for v in vs if v.mon is not None]
    copies = [f"{v.name} {sum(v.paused) / sum(bare):.3f}x" for v in mons if v.paused]
    if copies:
        # Paused, a copy runs the same steps as bare: any difference is the copy's own speed.
        print(
            "paused vs bare (each copy's own speed, the noise floor of the wall ratio): " + ", ".join(copies)
        )
    if mons:
        errors = sum(v.mon.errors for v in mons if v.mon is not None)
        print(f"agent faults: {errors}")
        # On a CPU with no core to spare the offload thread falls behind, and the agent then leaves
        # steps unsampled rather than slow them: a ratio is only comparable with the count beside it.
        behind = [
            f"{v.name} {v.mon.skipped} of {v.step}" for v in mons if v.mon is not None and v.mon.skipped
        ]
        if behind:
            print("steps left unsampled while the offload thread was behind: " + ", ".join(behind))


def report_phases(vs: list[Variant]) -> None:
    """Where the time goes: each phase's median step, and its difference from bare's."""
    bare = {name: statistics.median(times) for name, times in vs[0].phases.items()}
    print("median ms per phase (difference from bare):")
    print(f"{'variant':<22}" + "".join(f"{name:>22}" for name in PHASES))
    for v in vs:
        cells = []
        for name in PHASES:
            ms = statistics.median(v.phases[name]) * 1e3
            cells.append(f"{ms:9.2f} ({ms - bare[name] * 1e3:+6.2f})")
        print(f"{v.name:<22}" + "".join(f"{c:>22}" for c in cells))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=[*MODELS, "all"], default="mlp", help="default: the seed MLP")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    p.add_argument(
        "--every",
        type=int,
        default=None,
        help="a fixed cadence to test (default: the agent's adaptive default)",
    )
    p.add_argument("--steps", type=int, default=40, help="steps per round")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--viewer", choices=["yes", "no", "both"], default="both")
    p.add_argument(
        "--only-every",
        action="store_true",
        help="leave out the default-cadence variants: fewer agents and viewers share the CPU",
    )
    p.add_argument("--no-tensorboard", action="store_true", help="leave out the anchor column")
    p.add_argument("--quick", action="store_true", help="a second or two: for the smoke test")
    args = p.parse_args(argv)
    if args.quick:
        # One warm-up round: without it the first variant pays every first call and the ratios
        # mean nothing (0.007x once), which a smoke run need not prove but must not print.
        args.steps, args.rounds, args.warmup = args.every or 5, 2, 1
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here", file=sys.stderr)
        return 2
    tensorboard = not args.no_tensorboard and importlib.util.find_spec("tensorboard") is not None
    if not tensorboard and not args.no_tensorboard:
        print("(tensorboard is not installed: no anchor column)")
    os.environ.setdefault("ICSMON_RUNTIME_DIR", tempfile.mkdtemp(prefix="icsmon-bench-"))
    os.environ.setdefault("ICSMON_STATE_DIR", tempfile.mkdtemp(prefix="icsmon-bench-state-"))
    keys = [k for k in MODELS if k != "tiny"] if args.model == "all" else [args.model]
    if args.quick and args.model == "mlp":
        keys = ["tiny"]
    for key in keys:
        run_model(key, args, device, tensorboard)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
