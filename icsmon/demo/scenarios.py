"""The demo scenarios: what each trains and what it should show. No torch here (see train.py).

Every network is the project's first test bench: a deep MLP on a synthetic classification task
(Gaussian inputs, labels from a fixed random teacher), batch 128. Only the initialisation, activation, biases, normalisation
and learning rate differ, so the difference on screen is the failure mode and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Net:
    """One training run of a scenario."""

    label: str  # the run's name in the viewer
    depth: int = 50
    width: int = 256
    activation: str = "relu"  # relu | tanh
    init: str = "he"  # he: N(0, 2/fan_in) | xavier: N(0, 1/fan_in) | normal: N(0, init_std^2)
    init_std: float = 1.0
    bias: float = 0.0  # every hidden Linear's bias
    batchnorm: bool = False  # Linear -> BatchNorm1d -> activation
    lr: float = 1e-3  # SGD with momentum 0.9
    lr_growth: float = 1.0  # per-step warm-up factor (1.04: +4% a step), up to lr_max
    lr_max: float = 1.0


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str  # one line for --list
    expect: str  # which alerts it should raise (empty: none)
    nets: tuple[Net, ...]
    steps: int = 400  # default length; `--steps` overrides


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "healthy",
            "50-layer width-256 ReLU MLP, He init N(0, 2/fan_in), SGD lr 1e-3: the stable reference",
            "no alert at all (about half of every ReLU output is 0: that is normal, not dead)",
            (Net("healthy"),),
        ),
        Scenario(
            "vanishing",
            "the same net with weights N(0, 0.01^2): each layer shrinks the signal about 9x",
            "vanishing from the first layers whose std collapses (exactly 0 in float32 by layer ~40)",
            (Net("vanishing", init="normal", init_std=0.01),),
        ),
        Scenario(
            "exploding",
            "10-layer He-init ReLU MLP whose learning-rate warm-up has no cap (0.01, +4% a step): "
            "healthy for ~110 steps, then the activations grow by orders of magnitude, then Inf and NaN",
            "exploding while the loss is still finite (a few steps before it is not), then nonfinite",
            (Net("exploding", depth=10, lr=0.01, lr_growth=1.04, lr_max=1e9),),
            steps=300,
        ),
        Scenario(
            "saturating",
            "6-layer width-256 tanh MLP with large weights N(0, 1): pre-activations of std ~16 pin tanh at +-1",
            "saturation on the tanh layers",
            (Net("saturating", depth=6, activation="tanh", init="normal", init_std=1.0, lr=1e-4),),
        ),
        Scenario(
            "dead",
            "50-layer He-init ReLU MLP whose hidden biases are -3: most units never fire",
            "dead_relu from the first ReLU on",
            (Net("dead", bias=-3.0),),
        ),
        Scenario(
            "warmup",
            "two 10-layer He-init ReLU MLPs, the same learning-rate warm-up (0.01, +4% a step): one "
            "capped at 0.1, one never capped",
            "the uncapped run is named exploding before its loss is NaN (~step 110), then nonfinite; "
            "the capped run trains on with no alert",
            (
                Net("uncapped", depth=10, lr=0.01, lr_growth=1.04, lr_max=1e9),
                Net("capped", depth=10, lr=0.01, lr_growth=1.04, lr_max=0.1),
            ),
            steps=250,
        ),
        Scenario(
            "normalization",
            "two 20-layer ReLU MLPs side by side, learning rate warmed up to a high 2.0 (0.01, +6% a "
            "step): without normalisation, and with BatchNorm before each ReLU",
            "the plain run gives way at ~step 100 (mostly it explodes; on some CPUs its ReLUs die first, "
            "at chance); the BatchNorm run trains on (at lr 2.0 its ReLUs start dying: dead_relu)",
            (
                Net("plain", depth=20, lr=0.01, lr_growth=1.06, lr_max=2.0),
                Net("batchnorm", depth=20, batchnorm=True, lr=0.01, lr_growth=1.06, lr_max=2.0),
            ),
            steps=250,
        ),
    )
}

#: `icsmon demo` with no scenario: two runs side by side, one exploding (alerts before its NaN), one
#: healthy: the most shown in the least time. Why this pair: an uncapped warm-up explodes on any
#: machine and thread count, sooner or later; a net on the edge (a cap just high enough to break
#: it) goes one way or the other with the CPU's rounding.
DEFAULT = "warmup"
