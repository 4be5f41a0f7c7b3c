"""The update-to-weight ratio of each layer, ‖Δw‖ / ‖w‖, from a fixed sketch of its parameters.

Why a sketch: the exact ratio needs a copy of every weight from the last sample (the model's size
again). A fixed, evenly spaced set of ``SKETCH`` elements of each parameter, read at each sample,
estimates it at the cost of one small gather a parameter, on the parameter's device (no host
sync). Parameters of at most ``SKETCH`` elements (biases of small layers) are read whole: exact.

The figure is per step: the change since the last sample divided by the steps between them. About
1e-3 is the classic healthy scale; exactly 0 means the optimizer moved nothing (a learning rate of 0,
gradients clipped to 0, frozen weights).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

#: Elements read from each parameter.
SKETCH = 64
_NUMPY = (torch.float32, torch.float64, torch.float16)


def sketch_indices(n: int) -> np.ndarray:
    """The flat (logical-order) positions read from a parameter of ``n`` elements: ``SKETCH``
    evenly spaced, ends included, in integers (a float linspace rounds past the end above 2**24)."""
    k = min(n, SKETCH)
    if k <= 1:
        return np.zeros(k, dtype=np.int64)
    return np.arange(k, dtype=np.int64) * (n - 1) // (k - 1)


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's own shard (FSDP2's sharded parameters and their gradients); any other tensor
    itself. What this rank holds is read without a collective: the ranks sample different steps."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


class UpdateRatio:
    """Reads the sketch at each sample and gives each layer's ratio since the previous one."""

    def __init__(self, params: list[tuple[int, nn.Parameter]], n_layers: int) -> None:
        self._n_layers = n_layers
        # Each parameter's sketch, as one index tensor per dimension (logical order, so a
        # non-contiguous weight is gathered without a copy of it).
        self._reads: list[tuple[nn.Parameter, tuple[torch.Tensor, ...]]] = []
        owners: list[int] = []
        for layer, p in params:
            if not p.requires_grad or p.layout is not torch.strided:
                continue
            shard = local(p.detach())
            if shard.numel() == 0:
                continue
            flat = sketch_indices(shard.numel())
            at = np.unravel_index(flat, tuple(shard.shape)) if shard.dim() else (flat,)
            self._reads.append((p, tuple(torch.from_numpy(np.asarray(i)).to(shard.device) for i in at)))
            owners += [layer] * flat.size
        # One device for the sums: the first parameter's (a model spread over devices is gathered there).
        self._device = local(self._reads[0][0].detach()).device if self._reads else torch.device("cpu")
        self._owners = torch.tensor(owners, dtype=torch.long, device=self._device) if owners else None
        self._has = torch.zeros(n_layers, dtype=torch.bool, device=self._device)
        if self._owners is not None:
            self._has[self._owners] = True
        self._last: tuple[int, torch.Tensor] | None = None  # (step, values) of the last sample
        # Contiguous CPU float parameters are read through NumPy views of their memory: one fancy
        # index a parameter instead of torch calls (the sketch's cost: benchmarks/README.md).
        self._views: list[tuple[np.ndarray, np.ndarray, int]] | None = None
        shards = [local(p.detach()) for p, _ in self._reads]
        if shards and all(q.device.type == "cpu" and q.dtype in _NUMPY and q.is_contiguous() for q in shards):
            self._views = [(q.numpy().reshape(-1), sketch_indices(q.numel()), q.data_ptr()) for q in shards]

    def take(self, step: int) -> torch.Tensor | None:
        """Each layer's ratio per step since the last sample ([n_layers] float64, NaN for a layer
        without trainable parameters), or None at the first sample."""
        if self._owners is None:
            return None
        with torch.no_grad():
            views = self._views
            if views is not None and all(
                local(p.detach()).data_ptr() == at
                for (p, _), (_, _, at) in zip(self._reads, views, strict=True)
            ):
                values = torch.from_numpy(np.concatenate([v[i] for v, i, _ in views]).astype(np.float64))
                return self._ratio(step, values)
            self._views = None  # a parameter's memory was replaced (p.data = ...): torch from now on
            device = self._device
            values = torch.cat(
                [
                    (q if q.dim() else q.reshape(1))[at].to(device, torch.float64)
                    for q, at in ((local(p.detach()), at) for p, at in self._reads)
                ]
            )
            return self._ratio(step, values)

    def _ratio(self, step: int, values: torch.Tensor) -> torch.Tensor | None:
        assert self._owners is not None
        with torch.no_grad():
            last, self._last = self._last, (step, values)
            if last is None or last[0] >= step:
                return None
            steps, before = step - last[0], last[1]
            zeros = torch.zeros(self._n_layers, dtype=torch.float64, device=values.device)
            moved = zeros.index_add(0, self._owners, (values - before).square())
            size = zeros.index_add(0, self._owners, before.square())
            ratio = moved.sqrt() / size.sqrt() / steps
            return torch.where(self._has & (size > 0), ratio, torch.nan)
