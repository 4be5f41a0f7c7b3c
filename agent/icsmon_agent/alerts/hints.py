"""What to try, written from what the layer table says of the network: its depth, whether it has
normalisation layers and which activations. Never a fixed sentence about another network."""

from __future__ import annotations

from dataclasses import dataclass

from .rules import Window


@dataclass(frozen=True)
class Shape:
    depth: int  # weight layers (Linear, Conv)
    normalised: bool  # BatchNorm, LayerNorm, GroupNorm, RMSNorm, ...
    relu: bool
    squashing: bool  # tanh or sigmoid
    recurrent: bool  # an LSTM, GRU or RNN layer: its own advice, never BatchNorm

    @classmethod
    def of(cls, w: Window) -> Shape:
        kinds = set(w.kinds)
        return cls(
            depth=sum(k in ("linear", "conv") for k in w.kinds),
            normalised="norm" in kinds,
            relu="relu" in kinds,
            squashing=bool(kinds & {"tanh", "sigmoid"}),
            recurrent=bool(set(w.types) & RECURRENT),
        )


RECURRENT = frozenset({"LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"})


def _init(s: Shape) -> str:
    if s.relu and not s.squashing:
        return "He init N(0, 2/fan_in)"
    if s.squashing and not s.relu:
        return "Xavier init N(0, 1/fan_in)"
    return "He init for ReLU layers, Xavier for tanh/sigmoid"


def _normalise(s: Shape) -> str:
    return "normalise before each nonlinearity (BatchNorm for CNNs, LayerNorm for transformers)"


def hint(
    rule: str,
    w: Window,
    default: str,
    figure: str = "",
    *,
    optimizer: str = "",
    lr: float | None = None,
    first: int = -1,
) -> str:
    """``first``: the layer the alert names (its depth index), -1 for a run-level alert."""
    s = Shape.of(w)
    net = "this recurrent net" if s.recurrent else f"a {s.depth}-layer net" if s.depth else "this net"
    now = ", ".join(part for part in (optimizer, f"lr {lr:.3g}" if lr is not None else "") if part)
    rate = f"the learning rate ({now} now)" if now else "the learning rate"
    if figure == "update_ratio":
        return (
            "the optimizer moved no weight: a learning rate of 0 (a schedule at its end?), gradients "
            "clipped to 0 (clip_grad_norm_'s max_norm), or every parameter frozen"
        )
    if figure == "grad_norm_applied":
        return (
            "the backward made gradients, the optimizer got none: clipped to 0 (clip_grad_norm_'s "
            "max_norm), or zeroed between backward and step; only weight decay moves the weights"
        )
    if rule == "nonfinite" and first == 0:
        return (
            "NaN/Inf already in the first layer's output: look at the input batch first (a NaN/Inf "
            "in the data or its preprocessing, a division by 0 in normalisation); if the weights "
            "are NaN too, an earlier step blew up"
        )
    if s.recurrent and rule in ("exploding", "vanishing", "saturation"):
        return (
            f"recurrent nets: lower {rate}, clip gradients (clip_grad_norm_, 0.25-1 as in the "
            "word-language-model example), init the recurrent weights orthogonally, shorten the "
            "backpropagation through time; set an LSTM's forget-gate bias to 1 if the signal fades"
        )
    if rule == "exploding":
        text = f"lower {rate} or lengthen its warm-up, and clip gradients (clip_grad_norm_)"
        if not s.normalised:
            text += f"; without normalisation {net} wants a smaller rate the deeper it is: {_normalise(s)}"
            text += f"; check the init scale ({_init(s)})"
        return text
    if rule == "vanishing" and figure == "grad_norm":
        return (
            "the gradient fades before it reaches this layer: look for a layer after it whose output "
            "is cut off from the loss (detached, a saturated gate, dead ReLUs), then the init scale "
            f"({_init(s)}) and {rate}"
        )
    if rule == "vanishing":
        if s.normalised:
            return (
                "the signal collapses despite normalisation: look for a scale that stays ~0 (a gain or "
                "residual branch that never grew, a mask) or dead ReLUs before this layer"
            )
        return f"weights too small for {net}: {_init(s)}, or {_normalise(s)}"
    if rule == "dead_relu":
        text = (
            "these units' pre-activations are <= 0 for every input, so they get no gradient and never "
            f"recover: look for large negative biases, lower {rate}, or use LeakyReLU/GELU"
        )
        return text if s.normalised else text + "; normalise before the ReLU"
    if rule == "saturation":
        text = f"pre-activations too large: smaller init ({_init(s)}) or lower {rate}"
        return text if s.normalised else text + f"; {_normalise(s)}"
    if rule == "shift":
        text = f"this layer's input distribution jumped (upstream layers moved fast): lower {rate}"
        return text if s.normalised else text + f", or normalise its input ({_normalise(s)})"
    return default
