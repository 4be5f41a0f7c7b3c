"""One step's records turned into the ``n_layers x n_stats`` figures matrix, batched across layers.

:class:`Finalizer` runs once per sampled step with a fixed number of batched ops (segment
reductions over the concatenated unit vectors), whatever the number of layers. It keeps the previous
sample's per-unit Gaussians for the ``shift`` figure and adds the gradient norms
(:mod:`icsmon_agent.grads`). It runs in float64: the vectors are small, and it keeps ``std`` exact
when a layer's mean dwarfs its spread, and ``var = std**2`` finite near float32's limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import kernel
from .grads import GradNorms
from .kernel import FINISH_STATS, SHIFT_VAR_FLOOR, VAR_EPS, Batch
from .protocol import STAT_INDEX, STATS
from .reduce import Batched, Record, Reduced


def _host_to(
    values: list[int] | list[float] | np.ndarray, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """A small tensor on ``device`` without a blocking host-to-device copy."""
    cpu = (
        torch.from_numpy(values).to(dtype)
        if isinstance(values, np.ndarray)
        else torch.tensor(values, dtype=dtype)
    )
    if device.type == "cuda":
        return cpu.pin_memory().to(device, non_blocking=True)
    return cpu.to(device)


class _Segments:
    """Per-layer reductions over the concatenation of the present layers' unit vectors.

    On CPU, NumPy's ``reduceat`` (a zero-copy view of the tensor): ~10 us for 25,000 units where
    ``index_add_`` takes ~90 us, and exact (no cumulative-sum cancellation between layers whose
    scales differ by 1e60). On other devices, ``index_add_``/``scatter_reduce_``: launches only.
    """

    def __init__(self, units: list[int], device: torch.device) -> None:
        self.n = len(units)
        self.cpu = device.type == "cpu"
        starts = [0]
        for u in units[:-1]:
            starts.append(starts[-1] + u)
        self._starts = np.asarray(starts, dtype=np.intp)
        self.seg = _host_to([i for i, u in enumerate(units) for _ in range(u)], device, torch.int64)
        self.counts = _host_to([float(u) for u in units], device, torch.float64)  # units per layer

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.cpu:
            return torch.from_numpy(np.add.reduceat(values.numpy(), self._starts))
        return torch.zeros(self.n, dtype=values.dtype, device=values.device).index_add_(0, self.seg, values)

    def max(self, values: torch.Tensor) -> torch.Tensor:
        if self.cpu:
            return torch.from_numpy(np.maximum.reduceat(values.numpy(), self._starts))
        out = torch.full((self.n,), -torch.inf, dtype=values.dtype, device=values.device)
        return out.scatter_reduce_(0, self.seg, values, reduce="amax")

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        return self.sum(values) / self.counts

    def expand(self, per_layer: torch.Tensor) -> torch.Tensor:
        """A per-layer vector repeated over each layer's units."""
        return torch.index_select(per_layer, 0, self.seg)


@dataclass
class _Columns:
    """A sample's reductions, concatenated over its present layers (float64, on its device)."""

    umean: torch.Tensor  # [U] unit means
    uvar: torch.Tensor  # [U] unit (population) variances
    umax: torch.Tensor  # [U] unit maxima over finite elements
    vmin: torch.Tensor  # [P] minima over finite elements
    nonzero: torch.Tensor  # [P] non-zero counts
    nonfinite: torch.Tensor | None  # [P] NaN/Inf counts; None: none anywhere
    numel: torch.Tensor  # [P] elements
    sat_at: list[int]  # positions (in the present layers) of the tanh/sigmoid layers
    saturated: torch.Tensor | None  # [len(sat_at)] their saturated counts


#: The columns of the matrix the kernel's finish writes.
_FINISH_COLUMNS = [STAT_INDEX[name] for name in FINISH_STATS]


def _whole_batch(recs: list[Record]) -> Batch | None:
    """The batch a sample's records are, in order and all of it; None if they are anything else."""
    first = recs[0]
    if not kernel.available() or not isinstance(first, Batched) or first.batch.size != len(recs):
        return None
    b = first.batch
    if all(isinstance(r, Batched) and r.batch is b and r.at == k for k, r in enumerate(recs)):
        return b
    return None


#: A sample's layout: the slots of the layers present, their unit counts, the figures' device.
_LayoutKey = tuple[tuple[int, ...], tuple[int, ...], torch.device]


class Finalizer:
    """Turns one step's records into the figures matrix, batched across layers.

    The op count is fixed whatever the number of layers: each per-unit field is concatenated once
    (one ``cat`` over all layers, then one cast to float64), every per-layer figure is a segment
    reduction over the concatenation (:class:`_Segments`), and every 0-d count one ``stack``. A
    sample that is exactly one :class:`Batch` (the CPU offload's usual case) skips all of that:
    ``kernel.finish_batch`` computes the same figures from the batch in one pass of C.
    """

    def __init__(self, n_layers: int) -> None:
        self.n_layers = n_layers
        self._layout_key: _LayoutKey | None = None
        self._segments: _Segments | None = None
        self._rows: torch.Tensor | None = None  # [P] indices of the layers present
        # per-unit mean and var, and per-layer mean unit var, of the last sample, and its layout
        self._prev: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._prev_key: _LayoutKey | None = None
        self._carry: dict[tuple[_LayoutKey, _LayoutKey], tuple[torch.Tensor, torch.Tensor]] = {}
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

    def _layout(self, key: _LayoutKey) -> tuple[_Segments, torch.Tensor]:
        if key != self._layout_key or self._segments is None or self._rows is None:
            present, units, device = key
            self._segments = _Segments(list(units), device)
            self._rows = _host_to(list(present), device, torch.int64)
            self._layout_key = key
        return self._segments, self._rows

    def figures(
        self,
        records: Sequence[Record | None],
        grads: GradNorms | None,
        device: torch.device,
    ) -> torch.Tensor:
        """The ``n_layers x n_stats`` float32 matrix on ``device``; NaN where a figure is absent."""
        return self.with_grads(self.activations(records, device), grads)

    def activations(self, records: Sequence[Record | None], device: torch.device) -> torch.Tensor:
        """The activation figures alone, as a float64 matrix for :meth:`with_grads`.

        A step's activation figures are known once its forward is reduced, its gradient norms only
        after the backward: the offload thread finishes the first during the backward, when the
        training thread holds the GIL least, and leaves little for the step's end.
        """
        out = torch.full((self.n_layers, len(STATS)), float("nan"), dtype=torch.float64, device=device)
        present = [i for i, r in enumerate(records) if r is not None]
        recs = [r for r in records if r is not None]
        if recs:
            self._activation_figures(out, present, recs, device)
        return out

    def with_grads(self, activations: torch.Tensor, grads: GradNorms | None) -> torch.Tensor:
        """The float32 figures: :meth:`activations`' matrix with the gradient norms filled in."""
        if grads is not None:
            self._grad_figures(activations, grads, activations.device)
        return activations.to(torch.float32)

    def _activation_figures(
        self, out: torch.Tensor, present: list[int], recs: list[Record], device: torch.device
    ) -> None:
        f64 = torch.float64
        key: _LayoutKey = (tuple(present), tuple(r.units for r in recs), device)
        seg, rows = self._layout(key)
        batch = _whole_batch(recs)
        if batch is not None:
            self._batch_figures(out, rows, key, batch)
            return
        c = self._columns([r.reduced() if isinstance(r, Batched) else r for r in recs], seg, device)
        umean, uvar, umax, numel = c.umean, c.uvar, c.umax, c.numel
        mean = seg.mean(umean)
        # Total variance = mean within-unit variance + variance of the unit means (two-pass, stable).
        spread = umean - seg.expand(mean)
        var = seg.mean(uvar) + seg.mean(spread * spread)  # within units + across them
        layer_var = var  # the shift's floor uses the total
        mx = seg.max(umax)
        # A dead unit is never positive over the batch; umax is over finite elements, as the rule wants.
        cols = {
            "mean": mean,
            "std": var.clamp(min=0).sqrt(),
            # No finite element at all: min/max are absent, not +-inf.
            "min": torch.where(torch.isfinite(c.vmin), c.vmin, torch.nan),
            "max": torch.where(torch.isfinite(mx), mx, torch.nan),
            "dead_frac": seg.mean((umax <= 0).to(f64)),
            "zero_frac": 1.0 - c.nonzero / numel,
        }
        if c.nonfinite is None:
            out[rows, STAT_INDEX["nonfinite"]] = 0.0
        else:
            cols["nonfinite"] = c.nonfinite

        # Internal covariate shift: mean over units of KL(N(mu_prev, var_prev) || N(mu_now, var_now)).
        previous = self._previous(key)
        if previous is not None:
            m1, v1, layer_var1 = previous
            floor = seg.expand(SHIFT_VAR_FLOOR * torch.maximum(layer_var, layer_var1) + VAR_EPS)
            v1e, v2e = torch.maximum(v1, floor), torch.maximum(uvar, floor)
            kl = 0.5 * (torch.log(v2e / v1e) + (v1e + (m1 - umean) * (m1 - umean)) / v2e - 1.0)
            cols["shift"] = seg.mean(kl)
        self._prev, self._prev_key = (umean, uvar, layer_var), key
        for name, col in cols.items():
            out[rows, STAT_INDEX[name]] = col
        if c.sat_at and c.saturated is not None:
            at = self._index([present[k] for k in c.sat_at], device, torch.int64)
            out[at, STAT_INDEX["sat_frac"]] = c.saturated / numel[self._index(c.sat_at, device, torch.int64)]

    def _batch_figures(self, out: torch.Tensor, rows: torch.Tensor, key: _LayoutKey, batch: Batch) -> None:
        """A sample that is one :class:`Batch`: the same figures in one pass of C (``finish_batch``)."""
        previous = self._previous(key)
        cols = np.empty((batch.size, len(FINISH_STATS)))
        units = np.empty((2, batch.moments.shape[1]))
        layer_var = np.empty(batch.size)
        prev = None
        if previous is not None:
            m1, v1, layer_var1 = previous
            prev = (m1.contiguous().numpy(), v1.contiguous().numpy(), layer_var1.contiguous().numpy())
        kernel.finish_batch(batch, prev, cols, units, layer_var)
        umean, uvar = torch.from_numpy(units).unbind(0)
        self._prev, self._prev_key = (umean, uvar, torch.from_numpy(layer_var)), key
        out[rows.unsqueeze(1), self._index(_FINISH_COLUMNS, out.device, torch.int64)] = torch.from_numpy(cols)
        out[rows, STAT_INDEX["nonfinite"]] = 0.0  # a batch's outputs are finite: non-finite ones left it

    def _columns(self, recs: list[Reduced], seg: _Segments, device: torch.device) -> _Columns:
        """Any sample's columns: each per-unit field concatenated once, each 0-d figure stacked once."""
        f64 = torch.float64

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

        numel = self._index([float(r.numel) for r in recs], device, f64)  # [P]
        # Elements per unit, per unit (the batch size may change between steps).
        per_unit = seg.expand(numel / seg.counts)
        ref = cat([r.ref for r in recs])
        dsums = [r.dsum for r in recs if r.dsum is not None]
        dsqs = [r.dsq for r in recs if r.dsq is not None]
        if len(dsums) == len(recs) and len(dsqs) == len(recs):  # the CPU route, every layer
            shift = cat(dsums) / per_unit
            umean = ref + shift
            uvar = (cat(dsqs) / per_unit - shift * shift).clamp(min=0)
        else:  # GPU records, or CPU records of which some took the exact route
            umean = ref + cat([self._unit_shift(r) for r in recs]) / per_unit
            uvar = cat([self._unit_var(r) for r in recs])
        nonfinite = [r.nonfinite for r in recs]
        zero = torch.zeros((), device=device)
        sat_at = [k for k, r in enumerate(recs) if r.sat is not None]
        return _Columns(
            umean,
            uvar,
            cat([r.umax for r in recs]),
            stack([r.vmin for r in recs]),
            stack([r.nonzero for r in recs]),
            None
            if all(n is None for n in nonfinite)
            else stack([zero if n is None else n for n in nonfinite]),
            numel,
            sat_at,
            stack([s for r in recs if (s := r.sat) is not None]) if sat_at else None,
        )

    def _previous(self, key: _LayoutKey) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The last sample's moments laid out as this sample's layers, NaN for those it lacked.

        Why not drop them whenever the set of layers changes: an output that is sometimes empty (an
        expert routed no tokens) changes it every few steps, and would take every layer's shift
        with it. A layer that was absent, or whose unit count changed, gets no shift this sample.
        """
        if self._prev is None or self._prev_key is None or key == self._prev_key:
            return self._prev
        (present, units, device), (old_present, old_units, old_device) = key, self._prev_key
        if device != old_device:
            return None
        pair = (self._prev_key, key)
        carry = self._carry.get(pair)
        if carry is None:
            where: dict[int, tuple[int, int, int]] = {}  # slot -> (first unit, units, position)
            start = 0
            for i, (slot, u) in enumerate(zip(old_present, old_units, strict=True)):
                where[slot] = (start, u, i)
                start += u
            # Index len(...) picks the NaN appended below: no previous value.
            unit_index: list[np.ndarray] = []
            layer_index: list[int] = []
            for slot, u in zip(present, units, strict=True):
                first, old_u, i = where.get(slot, (0, -1, -1))
                if old_u == u:
                    unit_index.append(np.arange(first, first + u))
                    layer_index.append(i)
                else:
                    unit_index.append(np.full(u, start))
                    layer_index.append(len(old_present))
            if len(self._carry) >= 8:  # bounded (8 x units x 8 bytes): a layout that never repeats
                self._carry.clear()
            carry = self._carry[pair] = (
                _host_to(np.concatenate(unit_index), device, torch.int64),
                _host_to(layer_index, device, torch.int64),
            )
        units_at, layers_at = carry
        m1, v1, layer_var1 = self._prev
        nan = torch.full((1,), float("nan"), dtype=m1.dtype, device=m1.device)
        return (
            torch.cat([m1, nan])[units_at],
            torch.cat([v1, nan])[units_at],
            torch.cat([layer_var1, nan])[layers_at],
        )

    @staticmethod
    def _unit_shift(r: Reduced) -> torch.Tensor:
        """Sum of deviations from the reference (zero where the reference is the exact mean)."""
        return torch.zeros_like(r.ref, dtype=torch.float64) if r.dsum is None else r.dsum.double()

    @staticmethod
    def _unit_var(r: Reduced) -> torch.Tensor:
        if r.dsq is None:
            assert r.ustd is not None
            return r.ustd.double().square()
        n = max(r.numel / max(r.units, 1), 1.0)
        dsq = r.dsq.double() / n
        if r.dsum is None:
            return dsq
        return (dsq - (r.dsum.double() / n).square()).clamp(min=0)

    def _grad_figures(self, out: torch.Tensor, grads: GradNorms, device: torch.device) -> None:
        layers, norms = grads
        sq = norms.to(device=device, dtype=torch.float64, non_blocking=True).square()
        index = self._index(layers, device, torch.int64)
        total = torch.zeros(self.n_layers, dtype=torch.float64, device=device).index_add_(0, index, sq)
        has = torch.zeros(self.n_layers, dtype=torch.bool, device=device)
        has[index] = True
        col = STAT_INDEX["grad_norm"]
        out[:, col] = torch.where(has, total.sqrt(), out[:, col])
