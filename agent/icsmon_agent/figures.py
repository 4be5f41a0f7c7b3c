"""The figures of DESIGN.md's table, computed on the tensor's device without a host sync.

Work is split in two so the per-hook cost stays a handful of kernel launches:

* :func:`reduce_output` runs inside the forward hook and reduces one output to per-unit vectors
  (mean, spread, finite min, finite max) plus 0-d counts (non-zero, non-finite, saturated).
  Nothing leaves the device; divisions and comparisons wait for the batched step below.
* :class:`Finalizer` runs once per sampled step and turns every layer's vectors into the
  ``n_layers x n_stats`` matrix with a fixed number of batched ops (segment reductions over the
  concatenated unit vectors), whatever the number of layers. It also keeps the previous sample's
  per-unit Gaussians for the ``shift`` figure, and adds gradient norms with one ``_foreach_norm``.

Finalisation runs in float64: the vectors are small, and it keeps ``std`` exact when a layer's
mean dwarfs its spread, and ``var = std**2`` finite for activations near float32's limit.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from .protocol import STAT_INDEX, STATS

SAT_NONE, SAT_TANH, SAT_SIGMOID = 0, 1, 2
# Unit variances in the shift's KL are floored at this fraction of the layer's mean unit variance
# (the larger of the two moments'). Why: a unit that dies (variance 0) or revives makes the KL
# of a point mass, infinite in theory and ~1e10 with a tiny absolute epsilon, so one flipping
# ReLU unit would drown the layer's real shift. Healthy units sit far above the floor: exact.
SHIFT_VAR_FLOOR = 0.01
_VAR_EPS = 1e-12  # and an absolute floor for a layer whose every unit is constant


@dataclass
class Reduced:
    """Per-unit reductions of one layer output (all on the output's device).

    Counts stay counts (divided once per step for all layers in :class:`Finalizer`), and the spread
    is carried as a sum of squared deviations or, where that could overflow float32, as a std.
    """

    umean: torch.Tensor  # [U]
    usq: torch.Tensor | None  # [U] sum of squared deviations from the unit mean; or None, then:
    ustd: torch.Tensor | None  # [U] population std
    umin: torch.Tensor  # [U] over finite elements (+inf if none)
    umax: torch.Tensor  # [U] over finite elements (-inf if none)
    nonzero: torch.Tensor  # 0-d count of non-zero elements (any dtype)
    nonfinite: torch.Tensor | None  # 0-d count of NaN/Inf elements; None: known to be 0
    sat: torch.Tensor | None  # 0-d count of saturated elements, tanh/sigmoid layers only
    numel: int


def reduction_dims(ndim: int, unit_dim: int) -> tuple[int, ...]:
    """All dims but the unit dim (every dim for a 0-/1-D output, which is then one unit)."""
    if ndim <= 1:
        return tuple(range(ndim))
    unit = unit_dim % ndim
    return tuple(d for d in range(ndim) if d != unit)


def _sat_count(x: torch.Tensor, sat: int) -> torch.Tensor | None:
    if sat == SAT_TANH:
        return torch.count_nonzero(x.abs() > 0.99)
    if sat == SAT_SIGMOID:
        return torch.count_nonzero((x < 0.01) | (x > 0.99))
    return None


def reduce_output(t: torch.Tensor, unit_dim: int, sat: int) -> Reduced:
    """Reduce one layer output inside its forward hook: a handful of kernels, no host sync on GPU.

    CPU and GPU take different routes because their costs differ. On CPU, in the middle of a
    training step, every op costs ~10 us of dispatch with cold caches whatever its size, so the op
    count is the budget; ``torch.var``/``std_mean`` also reduce across rows with a scalar Welford
    loop (~40x a plain sum on a 128x256 output, more than the Linear layer itself), and reading a
    value back costs nothing. So the CPU route sums squared deviations from the unit mean (two
    passes, vectorised, stable) into a reused scratch buffer, takes plain min/max, counts
    non-zeros, and reads one number to learn whether anything was non-finite or overflowed; only
    then does it redo the layer the exact, masked way. On GPU a read-back is a sync, so the masked
    route is the only route.
    """
    x = t.detach()
    if x.dtype is not torch.float32 and x.dtype is not torch.float64:
        x = x.float()  # half/bfloat16 reductions lose too much; the copy is one kernel
    if x.ndim <= 1:
        # A scalar or a vector (a loss module, an unbatched head) is one unit: as a column, every
        # route below yields [1]-shaped per-unit results like any other layer's.
        x = x.reshape(-1, 1)
        unit_dim = -1
    if x.device.type == "cpu" and x.numel() > 0:
        last = x.ndim <= 1 or unit_dim % x.ndim == x.ndim - 1
        if last:
            # Units on the last axis (Linear-like): the [U] results need no reshape, and the
            # unit means broadcast against the output as they are.
            dims: tuple[int, ...] = tuple(range(x.ndim - 1)) if x.ndim > 1 else (0,)
            m = x.mean(dims)
        else:
            dims = reduction_dims(x.ndim, unit_dim)
            m = x.mean(dims, keepdim=True)
        usq = torch.sub(x, m, out=_scratch(x)).square_().sum(dims)
        # usq is non-finite iff an element is NaN/Inf (it poisons its unit's mean) or a square
        # overflowed float32: either way the exact route below answers. A CPU read is no sync.
        if math.isfinite(usq.sum().item()):
            return Reduced(
                m if last else m.reshape(-1),
                usq,
                None,
                x.amin(dims),
                x.amax(dims),
                # |sign(x)| is 1 unless x == 0 (x is finite here): 3x faster than count_nonzero.
                torch.sign(x, out=_scratch(x)).abs_().sum(),
                None,
                _sat_count(x, sat),
                x.numel(),
            )
    return _reduce_masked(x, reduction_dims(x.ndim, unit_dim), sat, x.numel())


_local = threading.local()


def _scratch(x: torch.Tensor) -> torch.Tensor:
    """A reused CPU buffer shaped like ``x``: no 100-KB allocation per hook, and it stays in cache.

    One per thread (hooks of data-parallel replicas run in threads), grown to the largest output
    seen; so bounded by one activation.
    """
    buf: torch.Tensor | None = getattr(_local, "buf", None)
    n = x.numel()
    if buf is None or buf.numel() < n or buf.dtype != x.dtype:
        buf = _local.buf = torch.empty(n, dtype=x.dtype)
    return buf[:n].view(x.shape)


def _reduce_masked(x: torch.Tensor, dims: tuple[int, ...], sat: int, numel: int) -> Reduced:
    """The general route: any device, non-finite elements, values near float32's limit."""
    finite = torch.isfinite(x)
    if x.device.type == "cpu":
        x64 = x.double()  # CPU reaches here only on the rare non-finite/overflow step: be exact
        var, umean = torch.var_mean(x64, dim=dims, correction=0)
        usq: torch.Tensor | None = var * (numel / max(umean.numel(), 1))
        ustd = None
    else:
        # float32 std never overflows where var would; the finalizer squares it in float64.
        ustd, umean = torch.std_mean(x, dim=dims, correction=0)
        usq = None
    # min/max are over finite elements (product API): masking costs two passes, a sync would cost more.
    umin = torch.where(finite, x, torch.inf).amin(dim=dims)
    umax = torch.where(finite, x, -torch.inf).amax(dim=dims)
    return Reduced(
        umean.reshape(-1),
        None if usq is None else usq.reshape(-1),
        None if ustd is None else ustd.reshape(-1),
        umin.reshape(-1),
        umax.reshape(-1),
        torch.count_nonzero(x),
        numel - torch.count_nonzero(finite),
        _sat_count(x, sat),
        numel,
    )


def _host_to(values: list[int] | list[float], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small tensor on ``device`` without a blocking host-to-device copy."""
    cpu = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return cpu.pin_memory().to(device, non_blocking=True)
    return cpu.to(device)


class Finalizer:
    """Turns one step's :class:`Reduced` records into the figures matrix, batched across layers.

    The op count is fixed whatever the number of layers: each per-unit field is concatenated once
    (one ``cat`` over all layers, then one cast to float64), and every per-layer figure is a
    segment reduction over the concatenation.
    """

    def __init__(self, n_layers: int) -> None:
        self.n_layers = n_layers
        self._layout_key: tuple[object, ...] | None = None
        self._seg: torch.Tensor | None = None  # [sum U] layer index of each unit
        self._counts: torch.Tensor | None = None  # [L] units per layer (float64)
        self._rows: torch.Tensor | None = None  # [P] indices of the layers present
        # per-unit mean and var, and per-layer mean unit var, of the last sample
        self._prev: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._indices: dict[tuple[object, ...], torch.Tensor] = {}

    def _index(
        self, values: list[int] | list[float], device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """Cached device copy of a small list (layouts and batch sizes repeat every step)."""
        key = (tuple(values), device, dtype)
        found = self._indices.get(key)
        if found is None:
            if len(self._indices) > 64:  # bounded: a model whose layout keeps changing
                self._indices.clear()
            found = self._indices[key] = _host_to(values, device, dtype)
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
            self._seg = _host_to(seg, device, torch.int64)
            self._counts = _host_to(counts, device, torch.float64)
            self._rows = _host_to(present, device, torch.int64)
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
            try:
                return torch.cat(vectors).to(device=device, dtype=f64, non_blocking=True)
            except RuntimeError:  # layers on several devices (model parallel): move each first
                return torch.cat([v.to(device=device, dtype=f64, non_blocking=True) for v in vectors])

        def stack(scalars: list[torch.Tensor]) -> torch.Tensor:
            try:
                return torch.stack(scalars).to(device=device, dtype=f64, non_blocking=True)
            except RuntimeError:
                return torch.stack([s.to(device=device, dtype=f64, non_blocking=True) for s in scalars])

        def seg_sum(values: torch.Tensor) -> torch.Tensor:
            return torch.zeros(L, dtype=f64, device=device).index_add_(0, seg, values)

        numel = self._index([float(r.numel) for r in recs], device, f64)  # [P]
        safe = counts.clamp(min=1.0)
        umean = cat([r.umean for r in recs])
        if all(r.usq is not None for r in recs):
            # Elements per unit, per layer: numel / units (the batch size may change between steps).
            per_unit = torch.ones(L, dtype=f64, device=device).index_copy_(0, rows, numel) / safe
            uvar = cat([r.usq for r in recs if r.usq is not None]) / per_unit[seg]
        else:  # GPU records carry std; CPU records that took the exact route carry float64 sums
            uvar = cat([self._unit_var(r) for r in recs])
        mean = seg_sum(umean) / safe
        # Total variance = mean within-unit variance + variance of the unit means (two-pass, stable).
        layer_var = seg_sum(uvar) / safe  # mean within-unit variance; the shift's floor uses it too
        var = layer_var + seg_sum((umean - mean[seg]).square()) / safe
        mn = torch.full((L,), torch.inf, dtype=f64, device=device)
        mn.scatter_reduce_(0, seg, cat([r.umin for r in recs]), reduce="amin")
        umax = cat([r.umax for r in recs])
        mx = torch.full((L,), -torch.inf, dtype=f64, device=device)
        mx.scatter_reduce_(0, seg, umax, reduce="amax")
        # A dead unit is never positive over the batch; umax is over finite elements, as the rule wants.
        dead = seg_sum((umax <= 0).to(f64)) / safe

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
        out[rows, STAT_INDEX["zero_frac"]] = 1.0 - stack([r.nonzero for r in recs]) / numel
        nonfinite = [r.nonfinite for r in recs]
        if all(n is None for n in nonfinite):
            out[rows, STAT_INDEX["nonfinite"]] = 0.0
        else:
            zero = torch.zeros((), device=device)
            out[rows, STAT_INDEX["nonfinite"]] = stack([zero if n is None else n for n in nonfinite])
        sat_rows = [(i, r.sat / r.numel) for i, r in zip(present, recs, strict=True) if r.sat is not None]
        if sat_rows:
            out[self._index([i for i, _ in sat_rows], device, torch.int64), STAT_INDEX["sat_frac"]] = stack(
                [s for _, s in sat_rows]
            )

        # Internal covariate shift: mean over units of KL(N(mu_prev, var_prev) || N(mu_now, var_now)).
        if self._prev is not None:
            m1, v1, layer_var1 = self._prev
            floor = (SHIFT_VAR_FLOOR * torch.maximum(layer_var, layer_var1) + _VAR_EPS)[seg]
            v1e, v2e = torch.maximum(v1, floor), torch.maximum(uvar, floor)
            kl = 0.5 * (torch.log(v2e / v1e) + (v1e + (m1 - umean).square()) / v2e - 1.0)
            shift = seg_sum(kl) / safe
            out[:, STAT_INDEX["shift"]] = torch.where(has_units, shift, out[:, STAT_INDEX["shift"]])
        self._prev = (umean, uvar, layer_var)

    @staticmethod
    def _unit_var(r: Reduced) -> torch.Tensor:
        if r.usq is not None:
            return r.usq.double() / max(r.numel / max(r.umean.numel(), 1), 1.0)
        assert r.ustd is not None
        return r.ustd.double().square()

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
        try:
            sq = torch.stack(list(norms)).to(device=device, dtype=f64, non_blocking=True).square()
        except RuntimeError:  # norms on several devices
            sq = torch.stack([n.to(device=device, dtype=f64, non_blocking=True) for n in norms]).square()
        index = self._index([layer for layer, _ in grads], device, torch.int64)
        total = torch.zeros(self.n_layers, dtype=f64, device=device).index_add_(0, index, sq)
        has = torch.zeros(self.n_layers, dtype=torch.bool, device=device)
        has[index] = True
        col = STAT_INDEX["grad_norm"]
        out[:, col] = torch.where(has, total.sqrt(), out[:, col])
