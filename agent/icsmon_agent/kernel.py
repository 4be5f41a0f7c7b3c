"""The one-pass C kernel's Python face (``_fused.c``, built at install where a compiler is): the
only importer of ``_fused``. Its constants are Python's too, held equal to the C ones by a test
(``tests/test_reductions.py``), and :class:`Batch` is the layout both sides read.
"""

from __future__ import annotations

import math

import numpy as np
import torch

try:  # optional: without a compiler the torch route serves alone
    from . import _fused
except ImportError:  # pragma: no cover - exercised where the extension could not be built
    _fused = None  # type: ignore[assignment]

SAT_NONE, SAT_TANH, SAT_SIGMOID = 0, 1, 2
#: Added to a kernel shape's saturation kind: the output to reduce is ``relu`` of the tensor given
#: (a ReLU's output, read from its input: see :func:`~icsmon_agent.reduce.reduce_outputs`).
RELU_OF_INPUT = 4
# Unit variances in the shift's KL are floored at this fraction of the layer's total variance
# (within and across units; the larger moment's). Why: a unit that dies (variance 0) or revives
# makes the KL of a point mass, infinite in theory and ~1e10 with a tiny absolute epsilon, so one
# flipping ReLU unit would drown the layer's real shift; and an output constant over the batch but
# not across units (token-type embeddings, a zero-init BatchNorm's beta) has no within-unit variance
# at all, so only its spread across units gives the scale its moves are judged at.
SHIFT_VAR_FLOOR = 0.01
VAR_EPS = 1e-12  # and an absolute floor for a layer whose every unit is constant
#: The figures :func:`finish_batch` writes, in its column order.
FINISH_STATS = ("mean", "std", "min", "max", "dead_frac", "zero_frac", "sat_frac", "shift")


def available() -> bool:
    """Whether CPU outputs go through the kernel (built at install where a compiler was)."""
    return _fused is not None


def takes(x: torch.Tensor) -> bool:
    return (
        _fused is not None
        and x.device.type == "cpu"
        and x.dtype is torch.float32
        and x.layout is torch.strided
    )


def shape_of(x: torch.Tensor, unit_dim: int) -> tuple[int, int, int]:
    """``x`` as the kernel sees it: [outer, units, inner], units on the middle axis."""
    unit = unit_dim % x.ndim
    shape = x.shape
    return math.prod(shape[:unit]), shape[unit], math.prod(shape[unit + 1 :])


def array_of(x: torch.Tensor) -> np.ndarray:
    # numpy() is a zero-copy view that hands the kernel a buffer it checks (format, size, layout).
    # resolve_neg: numpy() refuses a lazily negated view (free when there is none).
    return x.resolve_neg().contiguous().numpy()


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


def finish_batch(
    batch: Batch,
    prev: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    cols: np.ndarray,
    units: np.ndarray,
    layer_var: np.ndarray,
) -> None:
    """Each output's :data:`FINISH_STATS` into ``cols``, its unit means and variances into
    ``units`` and its variance into ``layer_var``, against the previous sample's (``prev``)."""
    assert _fused is not None
    _fused.finish_batch(batch.moments, batch.scalars, batch.shape_array, prev, cols, units, layer_var)
