"""Callbacks for training frameworks; each module imports its framework, the agent itself never does.

* :mod:`icsmon_agent.integrations.lightning`: ``IcsmonCallback`` for ``lightning.pytorch.Trainer``
  (or ``pytorch_lightning``).
* :mod:`icsmon_agent.integrations.transformers`: ``IcsmonCallback`` for Hugging Face ``Trainer``.

``stop_on`` is the job's own: it goes to ``watch()``, whose rules judge every sample and whose loss
check sees every step's loss, with or without a viewer; the callback reads ``Monitor.should_stop``
at each step's end and stops through the framework's own flag, agreed across ranks.
"""

from __future__ import annotations

from typing import Any

from ..actions import check_stop_on

__all__ = ["any_rank", "check_stop_on"]


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
