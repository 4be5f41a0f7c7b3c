"""Each layer output reduced to per-unit vectors and 0-d counts, on its device, without a host sync.

:func:`reduce_output` reduces one output (moments, finite max, then the finite min and the
non-zero, non-finite and saturated counts): inside the forward hook on GPU, on the agent's offload
thread on CPU, where :func:`reduce_outputs` takes a forward's outputs together into one
:class:`~icsmon_agent.kernel.Batch`. Nothing leaves the device; divisions and comparisons wait for
the batched finish (:mod:`icsmon_agent.finish`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from . import kernel
from .kernel import RELU_OF_INPUT, SAT_NONE, SAT_SIGMOID, SAT_TANH, Batch


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


def readable(t: torch.Tensor) -> bool:
    """Whether the reductions can take this output: dense, with data (not meta), not nested."""
    return t.layout is torch.strided and t.device.type != "meta" and not t.is_nested


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


def _reduce_cpu(x: torch.Tensor, unit_dim: int, sat: int) -> Reduced | None:
    """Shifted moments, max, min and the counts; None if anything is non-finite or overflowed."""
    if kernel.takes(x):
        batch = Batch.reduce([kernel.array_of(x)], [*kernel.shape_of(x, unit_dim), sat])
        return Batched(batch, 0).reduced() if batch.ok[0] else None
    return _reduce_torch(x, unit_dim, sat)


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
            if not kernel.takes(x):
                found[i] = reduce_output(torch.relu(x) if relu else x, unit_dim, sat)
                continue
            array = kernel.array_of(x)
        last = (t, x, array)
        arrays.append(array)
        shapes += (*kernel.shape_of(x, unit_dim), sat + RELU_OF_INPUT if relu else sat)
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
