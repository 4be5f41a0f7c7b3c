"""The figures of DESIGN.md's table, computed on the tensor's device without a host sync.

Work is split in two so the per-hook cost stays a handful of kernel launches:

* :func:`reduce_output` runs inside the forward hook and reduces one output to per-unit vectors
  (mean, std, finite min, finite max) plus three 0-d counts. Nothing leaves the device.
* :class:`Finalizer` runs once per sampled step and turns every layer's vectors into the
  ``n_layers x n_stats`` matrix with a fixed number of batched ops (segment reductions over the
  concatenated unit vectors), whatever the number of layers. It also keeps the previous sample's
  per-unit Gaussians for the ``shift`` figure, and adds gradient norms with one ``_foreach_norm``.

Finalisation runs in float64: the vectors are small, and it keeps ``std`` exact when a layer's
mean dwarfs its spread, and ``var = std**2`` finite for activations near float32's limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .protocol import STAT_INDEX, STATS

SAT_NONE, SAT_TANH, SAT_SIGMOID = 0, 1, 2
_VAR_EPS = 1e-12  # keeps the KL finite for units with zero variance (dead units, constant inputs)


@dataclass
class Reduced:
    """Per-unit reductions of one layer output (all on the output's device)."""

    umean: torch.Tensor  # [U]
    ustd: torch.Tensor  # [U] population std
    umin: torch.Tensor  # [U] over finite elements (+inf if none)
    umax: torch.Tensor  # [U] over finite elements (-inf if none)
    upos: torch.Tensor  # [U] bool: unit positive somewhere in the batch
    zero_frac: torch.Tensor  # 0-d
    nonfinite: torch.Tensor  # 0-d count
    sat_frac: torch.Tensor | None  # 0-d, tanh/sigmoid layers only


def reduction_dims(ndim: int, unit_dim: int) -> tuple[int, ...]:
    """All dims but the unit dim (every dim for a 0-/1-D output, which is then one unit)."""
    if ndim <= 1:
        return tuple(range(ndim))
    unit = unit_dim % ndim
    return tuple(d for d in range(ndim) if d != unit)


def reduce_output(t: torch.Tensor, unit_dim: int, sat: int) -> Reduced:
    x = t.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()  # half/bfloat16 reductions lose too much; the copy is one kernel
    dims = reduction_dims(x.ndim, unit_dim)
    if x.ndim == 0:
        x = x.reshape(1)
        dims = (0,)
    numel = max(x.numel(), 1)
    finite = torch.isfinite(x)
    ustd, umean = torch.std_mean(x, dim=dims, correction=0)
    # min/max are over finite elements (product API); masking costs two passes, a sync would cost more.
    umin = torch.where(finite, x, torch.inf).amin(dim=dims)
    umax = torch.where(finite, x, -torch.inf).amax(dim=dims)
    upos = umax > 0
    zero_frac = 1.0 - torch.count_nonzero(x) / numel
    nonfinite = numel - torch.count_nonzero(finite)
    sat_frac: torch.Tensor | None = None
    if sat == SAT_TANH:
        sat_frac = torch.count_nonzero(x.abs() > 0.99) / numel
    elif sat == SAT_SIGMOID:
        sat_frac = torch.count_nonzero((x < 0.01) | (x > 0.99)) / numel
    return Reduced(
        umean.reshape(-1),
        ustd.reshape(-1),
        umin.reshape(-1),
        umax.reshape(-1),
        upos.reshape(-1),
        zero_frac,
        nonfinite,
        sat_frac,
    )


def _host_to(values: list[int], device: torch.device) -> torch.Tensor:
    """A small int64 tensor on ``device`` without a blocking host-to-device copy."""
    cpu = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return cpu.pin_memory().to(device, non_blocking=True)
    return cpu.to(device)


class Finalizer:
    """Turns one step's :class:`Reduced` records into the figures matrix, batched across layers."""

    def __init__(self, n_layers: int) -> None:
        self.n_layers = n_layers
        self._layout_key: tuple[object, ...] | None = None
        self._seg: torch.Tensor | None = None  # [sum U] layer index of each unit
        self._counts: torch.Tensor | None = None  # [L] units per layer (float64)
        self._rows: torch.Tensor | None = None  # [P] indices of the layers present
        self._prev: tuple[torch.Tensor, torch.Tensor] | None = None  # per-unit mean, var of last sample
        self._indices: dict[tuple[object, ...], torch.Tensor] = {}

    def _index(self, values: list[int], device: torch.device) -> torch.Tensor:
        """Cached device copy of a small index list (layouts repeat every step)."""
        key = (tuple(values), device)
        found = self._indices.get(key)
        if found is None:
            if len(self._indices) > 64:  # bounded: a model whose layout keeps changing
                self._indices.clear()
            found = self._indices[key] = _host_to(values, device)
        return found

    def _layout(
        self, present: list[int], units: list[int], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (tuple(present), tuple(units), device)
        if key != self._layout_key or self._seg is None or self._counts is None or self._rows is None:
            seg = [layer for layer, u in zip(present, units, strict=True) for _ in range(u)]
            counts = [0] * self.n_layers
            for layer, u in zip(present, units, strict=True):
                counts[layer] = u
            self._seg = _host_to(seg, device)
            self._counts = _host_to(counts, device).to(torch.float64)
            self._rows = _host_to(present, device)
            self._layout_key = key
            self._prev = None  # unit layout changed: no comparable previous sample
        return self._seg, self._counts, self._rows

    def figures(
        self,
        records: list[Reduced | None],
        grads: list[tuple[int, torch.Tensor]],
        device: torch.device,
    ) -> torch.Tensor:
        """The ``n_layers x n_stats`` float32 matrix on ``device``; NaN where a figure is absent."""
        L = self.n_layers
        out = torch.full((L, len(STATS)), float("nan"), dtype=torch.float64, device=device)
        present = [i for i, r in enumerate(records) if r is not None]
        recs = [r for r in records if r is not None]
        if recs:
            self._activation_figures(out, present, recs, device)
        if grads:
            self._grad_figures(out, grads, device)
        return out.to(torch.float32)

    def _activation_figures(
        self, out: torch.Tensor, present: list[int], recs: list[Reduced], device: torch.device
    ) -> None:
        f64 = torch.float64
        units = [r.umean.numel() for r in recs]
        seg, counts, rows = self._layout(present, units, device)
        L = self.n_layers

        def cat(vectors: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat([v.to(device=device, dtype=f64, non_blocking=True) for v in vectors])

        def seg_sum(values: torch.Tensor) -> torch.Tensor:
            return torch.zeros(L, dtype=f64, device=device).index_add_(0, seg, values)

        umean = cat([r.umean for r in recs])
        uvar = cat([r.ustd for r in recs]).square()
        safe = counts.clamp(min=1.0)
        mean = seg_sum(umean) / safe
        # Total variance = mean within-unit variance + variance of the unit means (two-pass, stable).
        var = (seg_sum(uvar) + seg_sum((umean - mean[seg]).square())) / safe
        mn = torch.full((L,), torch.inf, dtype=f64, device=device)
        mn.scatter_reduce_(0, seg, cat([r.umin for r in recs]), reduce="amin")
        mx = torch.full((L,), -torch.inf, dtype=f64, device=device)
        mx.scatter_reduce_(0, seg, cat([r.umax for r in recs]), reduce="amax")
        dead = seg_sum((~cat([r.upos for r in recs]).bool()).to(f64)) / safe

        scalars = torch.stack([r.zero_frac.to(device=device, dtype=f64) for r in recs])
        nonfinite = torch.stack([r.nonfinite.to(device=device, dtype=f64) for r in recs])
        cols = {
            "mean": mean,
            "std": var.clamp(min=0).sqrt(),
            # No finite element at all: min/max are absent, not +-inf.
            "min": torch.where(torch.isfinite(mn), mn, torch.nan),
            "max": torch.where(torch.isfinite(mx), mx, torch.nan),
            "dead_frac": dead,
        }
        has_units = counts > 0
        for name, col in cols.items():
            out[:, STAT_INDEX[name]] = torch.where(has_units, col, out[:, STAT_INDEX[name]])
        out[rows, STAT_INDEX["zero_frac"]] = scalars
        out[rows, STAT_INDEX["nonfinite"]] = nonfinite
        sat_rows = [(i, r.sat_frac) for i, r in zip(present, recs, strict=True) if r.sat_frac is not None]
        if sat_rows:
            out[self._index([i for i, _ in sat_rows], device), STAT_INDEX["sat_frac"]] = torch.stack(
                [s.to(device=device, dtype=f64) for _, s in sat_rows]
            )

        # Internal covariate shift: mean over units of KL(N(mu_prev, var_prev) || N(mu_now, var_now)).
        if self._prev is not None:
            m1, v1 = self._prev
            v1e, v2e = v1 + _VAR_EPS, uvar + _VAR_EPS
            kl = 0.5 * (torch.log(v2e / v1e) + (v1e + (m1 - umean).square()) / v2e - 1.0)
            shift = seg_sum(kl) / safe
            out[:, STAT_INDEX["shift"]] = torch.where(has_units, shift, out[:, STAT_INDEX["shift"]])
        self._prev = (umean, uvar)

    def _grad_figures(
        self, out: torch.Tensor, grads: list[tuple[int, torch.Tensor]], device: torch.device
    ) -> None:
        f64 = torch.float64
        tensors = [g for _, g in grads]
        norms: list[torch.Tensor] | tuple[torch.Tensor, ...]
        try:
            norms = torch._foreach_norm(tensors)
        except (RuntimeError, TypeError):  # mixed devices/dtypes/sparse: per-tensor fallback
            norms = [torch.linalg.vector_norm(g) for g in tensors]
        sq = torch.stack([n.to(device=device, dtype=f64, non_blocking=True) for n in norms]).square()
        index = self._index([layer for layer, _ in grads], device)
        total = torch.zeros(self.n_layers, dtype=f64, device=device).index_add_(0, index, sq)
        has = torch.zeros(self.n_layers, dtype=torch.bool, device=device)
        has[index] = True
        col = STAT_INDEX["grad_norm"]
        out[:, col] = torch.where(has, total.sqrt(), out[:, col])
