"""Which modules are layers, what they are called, and how their outputs are read."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .kernel import SAT_NONE, SAT_SIGMOID, SAT_TANH

# Prefixes that wrappers add to qualified names: torch.compile, DataParallel/DDP, FSDP, checkpointing.
_WRAPPER_PARTS = {"_orig_mod", "module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}
_INNER_WRAPPER_PARTS = {"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"}

_KIND_BY_TYPE = {
    "ReLU": "relu",
    "ReLU6": "relu",
    "RReLU": "relu",
    "Tanh": "tanh",
    "Hardtanh": "tanh",
    "Softsign": "tanh",
    "Sigmoid": "sigmoid",
    "Hardsigmoid": "sigmoid",
}
_SAT_BY_KIND = {"tanh": SAT_TANH, "sigmoid": SAT_SIGMOID}

# Modules whose output's unit axis is dim 1 (channels), whatever the rank.
_CHANNEL_FIRST = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
)
# Element-wise modules keep the unit axis of whatever fed them.
_ELEMENTWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.Softplus,
    nn.Softsign,
    nn.Dropout,
    nn.AlphaDropout,
    nn.Identity,
)


def clean_name(name: str) -> str:
    """Qualified name without the parts wrappers add (``_orig_mod.``, ``module.``, FSDP's, ...)."""
    parts = name.split(".")
    while parts and parts[0] in _WRAPPER_PARTS:
        parts.pop(0)
    parts = [p for p in parts if p not in _INNER_WRAPPER_PARTS]
    return ".".join(parts)


def layer_kind(module: nn.Module) -> str:
    type_name = type(module).__name__
    if type_name in _KIND_BY_TYPE:
        return _KIND_BY_TYPE[type_name]
    if isinstance(module, nn.LeakyReLU) and module.negative_slope == 0:
        return "relu"
    if isinstance(module, nn.modules.batchnorm._BatchNorm | nn.LayerNorm | nn.GroupNorm):
        return "norm"
    if "Norm" in type_name:
        return "norm"
    if isinstance(module, nn.Linear | nn.Bilinear):
        return "linear"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    return "other"


def saturation_mode(kind: str) -> int:
    return _SAT_BY_KIND.get(kind, SAT_NONE)


def unit_dim(
    module: nn.Module, ndim: int, previous: tuple[int, tuple[int, ...]] | None, shape: tuple[int, ...]
) -> int:
    """The unit (feature/channel) axis of this output: dim 1 for conv-like, else the last dim.

    ``previous`` is (unit_dim, shape) of the layer that ran just before; element-wise modules of the
    same shape inherit it, so a ReLU after a Conv1d counts channels, not positions.
    """
    if isinstance(module, _CHANNEL_FIRST) and ndim >= 2:
        return 1
    if isinstance(module, _ELEMENTWISE) and previous is not None and previous[1] == shape:
        return previous[0]
    if ndim >= 4:
        return 1
    return -1


def tensors_in(output: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Every tensor in a module's output (tuple, list, dict or nested, to a bounded depth), in order."""
    if isinstance(output, torch.Tensor):
        yield output
        return
    if depth > 4:
        return
    items: Iterable[Any]
    if isinstance(output, Mapping):
        items = output.values()
    elif isinstance(output, list | tuple):
        items = output
    else:
        return
    for item in items:
        yield from tensors_in(item, depth + 1)


def first_float_tensor(output: Any) -> torch.Tensor | None:
    """The first floating-point tensor in a module's output (tuple, list, dict or nested)."""
    if isinstance(output, torch.Tensor):  # the common case, on the hot path: no generator
        return output if output.is_floating_point() else None
    return next((t for t in tensors_in(output) if t.is_floating_point()), None)


def tensor_storages(output: Any) -> set[int]:
    """Addresses of the storages of every tensor in a (nested) module output."""
    return {t.untyped_storage().data_ptr() for t in tensors_in(output)}


Selector = str | type[nn.Module]


def _matches(name: str, module: nn.Module, selectors: Iterable[Selector]) -> bool:
    for sel in selectors:
        if isinstance(sel, str):
            if fnmatch.fnmatchcase(name, sel):
                return True
        elif isinstance(module, sel):
            return True
    return False


def _as_selectors(value: Selector | Iterable[Selector] | None) -> list[Selector]:
    if value is None:
        return []
    if isinstance(value, str | type):
        return [value]
    return list(value)


def _not_a_layer(name: str, module: nn.Module) -> bool:
    """Modules that are no step of the signal: a placeholder or a dropout of p=0 (its output is its
    input, already a row of its own), a position table (rotary cos/sin, T5's relative bias), which
    is the same for every batch."""
    if type(module) is nn.Identity:
        return True
    if isinstance(module, nn.modules.dropout._DropoutNd) and module.p == 0:
        return True
    return "Rotary" in type(module).__name__ or name.endswith("relative_attention_bias")


def candidate_modules(
    model: nn.Module,
    include: Selector | Iterable[Selector] | None = None,
    exclude: Selector | Iterable[Selector] | None = None,
) -> list[tuple[str, nn.Module]]:
    """Leaf modules to hook, with cleaned names, in registration order.

    ``include``/``exclude`` take name globs (``"blocks.*.attn"``) or module types (``nn.Dropout``).
    A model that is itself a leaf (``watch(nn.Linear(3, 4))``) is its own single layer.
    """
    inc, exc = _as_selectors(include), _as_selectors(exclude)
    found: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    for raw_name, module in model.named_modules():
        if next(module.children(), None) is not None:
            continue  # not a leaf
        if isinstance(module, nn.ModuleList | nn.ModuleDict | nn.ParameterList | nn.ParameterDict):
            continue  # containers are never called
        if _not_a_layer(raw_name, module):
            continue
        if id(module) in seen:
            continue
        seen.add(id(module))
        name = clean_name(raw_name) or type(module).__name__
        if inc and not _matches(name, module, inc):
            continue
        if exc and _matches(name, module, exc):
            continue
        found.append((name, module))
    return found
