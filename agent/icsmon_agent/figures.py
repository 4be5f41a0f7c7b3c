"""The figures of README.md's table, computed on the tensor's device without a host sync.

Work is split in two so the per-hook cost stays a handful of kernel launches:

* :func:`reduce_output` reduces one output to per-unit vectors (moments, finite max) plus 0-d
  figures (finite min, non-zero, non-finite and saturated counts): inside the forward hook on
  GPU, on the agent's offload thread on CPU (there :func:`reduce_outputs` takes a forward's
  outputs together, into one :class:`Batch`). Nothing leaves the device; divisions and
  comparisons wait for the batched step below.
* :class:`Finalizer` runs once per sampled step and turns every layer's vectors into the
  ``n_layers x n_stats`` matrix with a fixed number of batched ops (segment reductions over the
  concatenated unit vectors), whatever the number of layers. It also keeps the previous sample's
  per-unit Gaussians for the ``shift`` figure, and adds the gradient norms that
  :func:`grad_norms` took.

Finalisation runs in float64: the vectors are small, and it keeps ``std`` exact when a layer's
mean dwarfs its spread, and ``var = std**2`` finite for activations near float32's limit.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .protocol import STAT_INDEX, STATS

try:  # the one-pass kernel (setup.py); optional: without a compiler the torch route serves alone
    from . import _fused
except ImportError:  # pragma: no cover - exercised where the extension could not be built
    _fused = None  # type: ignore[assignment]

SAT_NONE, SAT_TANH, SAT_SIGMOID = 0, 1, 2
#: Added to a kernel shape's saturation kind: the output to reduce is ``relu`` of the tensor given
#: (a ReLU's output, read from its input: see :func:`reduce_outputs`). As ``RELU`` in _fused.c.
RELU_OF_INPUT = 4
# Unit variances in the shift's KL are floored at this fraction of the layer's total variance
# (within and across units; the larger moment's). Why: a unit that dies (variance 0) or revives
# makes the KL of a point mass, infinite in theory and ~1e10 with a tiny absolute epsilon, so one
# flipping ReLU unit would drown the layer's real shift; and an output constant over the batch but
# not across units (token-type embeddings, a zero-init BatchNorm's beta) has no within-unit variance
# at all, so only its spread across units gives the scale its moves are judged at.
SHIFT_VAR_FLOOR = 0.01
_VAR_EPS = 1e-12  # and an absolute floor for a layer whose every unit is constant


@dataclass
class Reduced:
    """Per-unit reductions of one layer output (all on the output's device).

    Each unit's moments are carried about a reference value of that unit: ``ref`` plus the sum of
    deviations from it (``dsum``) and of squared deviations (``dsq``). The CPU route takes each
    unit's first element as its reference, which spares a pass for the mean and stays stable: the
    deviations are of the order of the spread, so ``dsq / n - (dsum / n)**2`` cancels nothing
    large. The exact routes take the unit mean itself (``dsum`` None: zero), and on GPU carry the
    spread as a std (``dsq`` None) because a float32 variance overflows where the std does not.
    Counts stay counts, divided once per step for all layers in :class:`Finalizer`.
    """

    ref: torch.Tensor  # [U] reference value of each unit (its mean when dsum is None)
    dsum: torch.Tensor | None  # [U] sum of (x - ref); None: 0 (ref is the exact unit mean)
    dsq: torch.Tensor | None  # [U] sum of (x - ref)**2; or None, then:
    ustd: torch.Tensor | None  # [U] population std
    umax: torch.Tensor  # [U] over finite elements (-inf if none)
    vmin: torch.Tensor  # 0-d minimum over finite elements (+inf if none)
    nonzero: torch.Tensor  # 0-d count of non-zero elements (any dtype)
    nonfinite: torch.Tensor | None  # 0-d count of NaN/Inf elements; None: known to be 0
    sat: torch.Tensor | None  # 0-d count of saturated elements, tanh/sigmoid layers only
    numel: int

    @property
    def units(self) -> int:
        return self.ref.numel()

    @property
    def device(self) -> torch.device:
        return self.ref.device


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


#: Counts taken with a float32 dot product stay exact up to 2**24 elements.
_EXACT_DOT = 2**24


def reduce_output(t: torch.Tensor, unit_dim: int, sat: int) -> Reduced | None:
    """Reduce one layer output: a handful of kernels, no host sync on GPU; None if it is empty.

    CPU and GPU take different routes because their costs differ. On CPU each op is a pass over
    the output (~4 us for a 128x256 float32 one in cache, about its dispatch cost again in the
    middle of a step), so passes are the budget; ``torch.var``/``std_mean`` also reduce across rows
    with a scalar Welford loop (~40x a plain sum on a 128x256 output, more than the Linear layer
    itself), and reading a value back costs nothing. So the CPU route (:func:`_reduce_cpu`) takes
    shifted moments, in one pass of C where the extension is built (float32), else in three torch
    passes, and learns from their sums whether anything was non-finite or overflowed; only then
    does it redo the layer the exact, masked way. On GPU a read-back is a sync, so the masked
    route is the only route. :func:`reduce_outputs` does the same for many outputs at once.
    """
    prepared = _prepare(t, unit_dim)
    if prepared is None:
        return None
    x, unit_dim = prepared
    if x.device.type == "cpu":
        found = _reduce_cpu(x, unit_dim, sat)
        if found is not None:
            return found
    return _reduce_masked(x, reduction_dims(x.ndim, unit_dim), sat, x.numel())


def _prepare(t: torch.Tensor, unit_dim: int) -> tuple[torch.Tensor, int] | None:
    """The tensor every route reduces, and its unit dim; None for an empty output."""
    if t.numel() == 0:
        # No elements, no figures: a batch of none, an expert that was routed no tokens. The layer
        # is absent from this sample, as if unsampled (reducing it would raise, and torch warn).
        return None
    x = t.detach() if t.requires_grad else t  # held outputs come detached: spare the call
    if x.dtype is not torch.float32 and x.dtype is not torch.float64:
        x = x.float()  # half/bfloat16 reductions lose too much; the copy is one kernel
    if x.ndim <= 1:
        # A scalar or a vector (a loss module, an unbatched head) is one unit: as a column, every
        # route below yields [1]-shaped per-unit results like any other layer's.
        x = x.reshape(-1, 1)
        unit_dim = -1
    return x, unit_dim


def kernel_available() -> bool:
    """Whether CPU outputs go through the one-pass C kernel (built at install where a compiler was)."""
    return _fused is not None


def _reduce_cpu(x: torch.Tensor, unit_dim: int, sat: int) -> Reduced | None:
    """Shifted moments, max, min and the counts; None if anything is non-finite or overflowed."""
    if _for_kernel(x):
        batch = Batch.reduce([_kernel_array(x)], [*_kernel_shape(x, unit_dim), sat])
        return Batched(batch, 0).reduced() if batch.ok[0] else None
    return _reduce_torch(x, unit_dim, sat)


def _for_kernel(x: torch.Tensor) -> bool:
    return (
        _fused is not None
        and x.device.type == "cpu"
        and x.dtype is torch.float32
        and x.layout is torch.strided
    )


def _kernel_shape(x: torch.Tensor, unit_dim: int) -> tuple[int, int, int]:
    """``x`` as the kernel sees it: [outer, units, inner], units on the middle axis."""
    unit = unit_dim % x.ndim
    shape = x.shape
    return math.prod(shape[:unit]), shape[unit], math.prod(shape[unit + 1 :])


def _kernel_array(x: torch.Tensor) -> np.ndarray:
    # numpy() is a zero-copy view that hands the kernel a buffer it checks (format, size, layout).
    # resolve_neg: numpy() refuses a lazily negated view (free when there is none).
    return x.resolve_neg().contiguous().numpy()


#: One output for :func:`reduce_outputs`: tensor, unit dim, saturation kind, and whether the
#: output is ``relu`` of the tensor (a ReLU's output given as its input) rather than the tensor.
Output = tuple[torch.Tensor, int, int, bool]


def reduce_outputs(outputs: Sequence[Output]) -> list[Record | None]:
    """:func:`reduce_output` for many outputs (tensor, unit dim, saturation kind, ReLU-of) at once.

    Why: on the offload thread, one call of the kernel per output cost as much Python around it
    (buffers, result tensors, a record) as C inside, ~20 us an output, and that Python holds the
    GIL the training thread wants. Here every CPU float32 output goes through one kernel call,
    the GIL released for all of them, into one :class:`Batch` that the :class:`Finalizer` reads as
    it is; an output the kernel cannot take, or found non-finite, goes the one-output way.
    A ReLU's output may come as its input (the layer before it, which is in the batch already):
    the kernel then reduces ``max(x, 0)`` on the fly from the same buffer, so the offload thread
    reads one tensor for both layers and the ReLU's output is never handed over at all.
    The float32 copies of half-precision or non-contiguous outputs live until the call returns:
    for those, up to the outputs' own size again, on top of what the offload thread holds.
    """
    found: list[Record | None] = [None] * len(outputs)
    arrays: list[np.ndarray] = []
    shapes: list[int] = []
    places: list[tuple[int, torch.Tensor, int, int, bool]] = []
    # The last tensor given, its prepared float32 form and its array: a ReLU given its input
    # follows that input's layer, and takes the same ones (no second conversion of a half one).
    last: tuple[torch.Tensor, torch.Tensor, np.ndarray] | None = None
    for i, (t, unit_dim, sat, relu) in enumerate(outputs):
        if last is not None and last[0] is t:  # in the batch already: prepared as it was then
            x, array = last[1], last[2]
            unit_dim = -1 if t.ndim <= 1 else unit_dim
        else:
            prepared = _prepare(t, unit_dim)
            if prepared is None:
                continue
            x, unit_dim = prepared
            if not _for_kernel(x):
                found[i] = reduce_output(torch.relu(x) if relu else x, unit_dim, sat)
                continue
            array = _kernel_array(x)
        last = (t, x, array)
        arrays.append(array)
        shapes += (*_kernel_shape(x, unit_dim), sat + RELU_OF_INPUT if relu else sat)
        places.append((i, x, unit_dim, sat, relu))
    if arrays:
        batch = Batch.reduce(arrays, shapes)
        for k, (i, x, unit_dim, sat, relu) in enumerate(places):
            if batch.ok[k]:
                found[i] = Batched(batch, k)
            else:  # a NaN/Inf or a float32 overflow: the exact route, for this output alone
                y = torch.relu(x) if relu else x
                found[i] = _reduce_masked(y, reduction_dims(y.ndim, unit_dim), sat, y.numel())
    return found


class Batch:
    """CPU outputs reduced by one call of the kernel, laid out as the :class:`Finalizer` reads them.

    ``moments`` is [4, U] over the U units of all P outputs in order (each unit's reference, sum of
    deviations from it and of their squares, max: :class:`Reduced`'s ``ref``, ``dsum``, ``dsq``,
    ``umax``); ``scalars`` is [3, P] (min, non-zero and saturated counts); ``ok[k]`` False where
    output k was non-finite or overflowed (its columns are then not to be read).
    """

    def __init__(self, shapes: list[int]) -> None:
        self.shape_array = np.asarray(shapes, dtype=np.int64)  # outer, units, inner, kind of each
        self.units = shapes[1::4]
        self.sats = [kind & ~RELU_OF_INPUT for kind in shapes[3::4]]
        self.numel = [o * u * i for o, u, i in zip(shapes[0::4], self.units, shapes[2::4], strict=True)]
        self.starts = [0]
        for u in self.units[:-1]:
            self.starts.append(self.starts[-1] + u)
        self.size = len(self.units)
        self.moments = np.empty((4, sum(self.units)))
        self.scalars = np.empty((3, self.size))
        self.ok = np.empty(self.size, dtype=np.bool_)

    @classmethod
    def reduce(cls, arrays: list[np.ndarray], shapes: list[int]) -> Batch:
        assert _fused is not None
        batch = cls(shapes)
        _fused.reduce_batch(arrays, batch.shape_array, batch.moments, batch.scalars, batch.ok)
        return batch


class Batched(NamedTuple):
    """Output ``at`` of a :class:`Batch`: a record with no tensors of its own (a tuple: made
    a hundred times a sample, at a fifth of a dataclass's cost)."""

    batch: Batch
    at: int

    @property
    def units(self) -> int:
        return self.batch.units[self.at]

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def reduced(self) -> Reduced:
        """As a :class:`Reduced` of views into the batch (for a sample that mixes routes)."""
        b, k = self.batch, self.at
        first = b.starts[k]
        ref, dsum, dsq, umax = torch.from_numpy(b.moments[:, first : first + b.units[k]]).unbind(0)
        vmin, nonzero, saturated = torch.from_numpy(b.scalars[:, k]).unbind(0)
        return Reduced(
            ref,
            dsum,
            dsq,
            None,
            umax,
            vmin,
            nonzero,
            None,
            None if b.sats[k] == SAT_NONE else saturated,
            b.numel[k],
        )


#: What a layer's reduction is: its own tensors, or its place in a batch.
Record = Reduced | Batched


def _reduce_torch(x: torch.Tensor, unit_dim: int, sat: int) -> Reduced | None:
    """Shifted moments, max, min and a non-zero count in eight ops; None if anything is non-finite."""
    unit = unit_dim % x.ndim
    if unit == x.ndim - 1:
        # Units on the last axis (Linear-like): rows x units, a view when contiguous; the moments
        # about the first row are two BLAS-backed reductions over the deviations.
        rows = x.reshape(-1, x.shape[-1])
        # A copy, not a view: the output may be changed in place before the figures are finished.
        ref = rows[0].clone()
        d = torch.sub(rows, ref, out=_scratch(rows))
        dsum = d.sum(0)
        dsq = torch.linalg.vecdot(d, d, dim=0)
        umax = rows.amax(0)
    else:  # channels first (conv-like): reduce over every other axis
        dims = reduction_dims(x.ndim, unit_dim)
        first = x[tuple(slice(None) if i == unit else slice(0, 1) for i in range(x.ndim))].clone()
        d = torch.sub(x, first, out=_scratch(x))
        dsum = d.sum(dims)
        dsq = d.square_().sum(dims)
        umax = x.amax(dims)
        ref = first.reshape(-1)
    # dsq is non-finite iff an element is NaN/Inf (it poisons its unit's deviations) or a square
    # overflowed float32: either way the exact route answers. A CPU read is no sync.
    if not math.isfinite(dsq.sum().item()):
        return None
    # |sign(x)| is 1 unless x == 0 (x is finite here), and sign**2 summed is one BLAS dot.
    signs = torch.sign(x, out=_scratch(x)).view(-1)
    nonzero = torch.dot(signs, signs) if signs.numel() <= _EXACT_DOT else signs.abs_().sum()
    return Reduced(ref, dsum, dsq, None, umax, x.min(), nonzero, None, _sat_count(x, sat), x.numel())


_local = threading.local()


def _scratch(x: torch.Tensor) -> torch.Tensor:
    """A reused CPU buffer shaped like ``x``: no 100-KB allocation per hook, and it stays in cache.

    One per thread (hooks of data-parallel replicas run in threads, and the offload thread has
    its own), grown to the largest output seen; so bounded by one activation.
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
        dsq: torch.Tensor | None = var * (numel / max(umean.numel(), 1))
        ustd = None
    else:
        # float32 std never overflows where var would; the finalizer squares it in float64.
        ustd, umean = torch.std_mean(x, dim=dims, correction=0)
        dsq = None
    # min/max are over finite elements (product API): masking costs two passes, a sync would cost more.
    vmin = torch.where(finite, x, torch.inf).amin()
    umax = torch.where(finite, x, -torch.inf).amax(dim=dims)
    return Reduced(
        umean.reshape(-1),
        None,
        None if dsq is None else dsq.reshape(-1),
        None if ustd is None else ustd.reshape(-1),
        umax.reshape(-1),
        vmin,
        torch.count_nonzero(x),
        numel - torch.count_nonzero(finite),
        _sat_count(x, sat),
        numel,
    )


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


#: The figures ``_fused.finish_batch`` writes, in its column order, and their columns in the matrix.
_FINISH_STATS = ("mean", "std", "min", "max", "dead_frac", "zero_frac", "sat_frac", "shift")
_FINISH_COLUMNS = [STAT_INDEX[name] for name in _FINISH_STATS]


def _whole_batch(recs: list[Record]) -> Batch | None:
    """The batch a sample's records are, in order and all of it; None if they are anything else."""
    first = recs[0]
    if _fused is None or not isinstance(first, Batched) or first.batch.size != len(recs):
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
    ``_fused.finish_batch`` computes the same figures from the batch in one pass of C.
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
            floor = seg.expand(SHIFT_VAR_FLOOR * torch.maximum(layer_var, layer_var1) + _VAR_EPS)
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
        assert _fused is not None
        previous = self._previous(key)
        cols = np.empty((batch.size, len(_FINISH_STATS)))
        units = np.empty((2, batch.moments.shape[1]))
        layer_var = np.empty(batch.size)
        prev = None
        if previous is not None:
            m1, v1, layer_var1 = previous
            prev = (m1.contiguous().numpy(), v1.contiguous().numpy(), layer_var1.contiguous().numpy())
        _fused.finish_batch(batch.moments, batch.scalars, batch.shape_array, prev, cols, units, layer_var)
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
