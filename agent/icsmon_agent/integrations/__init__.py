"""Callbacks for training frameworks; each module imports its framework, the agent itself never does.

* :mod:`icsmon_agent.integrations.lightning`: ``IcsmonCallback`` for ``lightning.pytorch.Trainer``
  (or ``pytorch_lightning``).
* :mod:`icsmon_agent.integrations.transformers`: ``IcsmonCallback`` for Hugging Face ``Trainer``.
"""

from __future__ import annotations

import math
from typing import Any

#: What ``stop_on`` may name: ``"nonfinite"`` (NaN/Inf in the loss or in any layer's figures).
STOP_REASONS = frozenset({"nonfinite"})


def check_stop_on(stop_on: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    unknown = set(stop_on) - STOP_REASONS
    if unknown:
        raise ValueError(f"stop_on: unknown {sorted(unknown)}; choose from {sorted(STOP_REASONS)}")
    return tuple(stop_on)


def loss_value(loss: Any) -> float | None:
    """A float of a loss (tensor, number or None), for the stop check only: the loss itself goes
    to the agent as it is (a tensor is never synchronised here except by this one .item())."""
    if loss is None:
        return None
    try:
        return float(loss.detach().item()) if hasattr(loss, "detach") else float(loss)
    except (TypeError, ValueError, RuntimeError):
        return None


def any_rank(flag: bool, model: Any = None) -> bool:
    """``flag`` on any rank of an initialised process group (every rank must call this at the same
    step, as a framework's step-end hook does); ``flag`` itself without one."""
    import torch

    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = next(model.parameters()).device if model is not None else torch.device("cpu")
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def nonfinite(loss: float | None, monitor: Any) -> bool:
    """NaN/Inf in this step's loss, or in a sampled step's figures (the agent saw it)."""
    if loss is not None and not math.isfinite(loss):
        return True
    return monitor is not None and monitor.nonfinite_step is not None
