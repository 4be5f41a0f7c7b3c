"""Gradient norms of the layers' parameters, taken at the step boundary on their device."""

from __future__ import annotations

import torch

#: Gradient norms taken at the step boundary: the layer of each parameter, and its norm ([G]).
GradNorms = tuple[list[int], torch.Tensor]


def grad_norms(grads: list[tuple[int, torch.Tensor]], device: torch.device) -> GradNorms | None:
    """Each gradient's norm, on ``device``: one ``_foreach_norm``, taken while the gradients hold.

    At the step boundary on the training thread when the next ``zero_grad`` or backward may
    overwrite the gradients in place; on the offload thread when the job replaces them instead.
    """
    if not grads:
        return None
    tensors = [g for _, g in grads]
    norms: list[torch.Tensor] | tuple[torch.Tensor, ...]
    try:
        norms = torch._foreach_norm(tensors)
    except (RuntimeError, TypeError):  # mixed devices/dtypes/sparse: per-tensor fallback
        norms = [torch.linalg.vector_norm(g) for g in tensors]
    try:
        stacked = torch.stack(list(norms)).to(device=device, non_blocking=True)
    except RuntimeError:  # norms on several devices
        stacked = torch.stack([n.to(device=device, non_blocking=True) for n in norms])
    return [layer for layer, _ in grads], stacked
