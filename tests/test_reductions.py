"""The per-hook reductions and the batched finish against float64, on the inputs that pick a route.

The CPU route takes a fast path (centred sums, plain min/max, a single read) and falls back to the
exact masked path on non-finite values or float32 overflow; both must give the product's figures.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from icsmon_agent.figures import SAT_NONE, SAT_TANH, Finalizer, reduce_output
from icsmon_agent.protocol import STATS
from truth import close, figures


def _finish(outputs: list[tuple[torch.Tensor, int, int]], fin: Finalizer | None = None) -> np.ndarray:
    fin = fin or Finalizer(len(outputs))
    recs = [reduce_output(t, unit_dim, sat) for t, unit_dim, sat in outputs]
    return fin.figures(list(recs), None, torch.device("cpu")).double().numpy()


def _check(got: np.ndarray, y: torch.Tensor, kind: str, conv: bool, skip: tuple[str, ...] = ()) -> None:
    want = figures(y.double().numpy(), kind, conv, None)
    for j, stat in enumerate(STATS):
        if stat in ("shift", "grad_norm", *skip):
            continue
        value = None if np.isnan(got[j]) else float(got[j])
        assert close(value, want[stat]), f"{stat}: got {value}, want {want[stat]}"


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(64, 48) * 1e-3 + 1e3,  # the mean dwarfs the spread: no cancellation
        lambda: torch.randn(64, 48).relu(),  # half zeros, exactly
        lambda: torch.randn(64, 48) * 3e19,  # squares overflow float32: the exact route
        lambda: torch.randn(8, 16, 32),  # sequence output, units last
        lambda: torch.zeros(16, 8),  # dead and constant
    ],
)
def test_linear_like_outputs(make: Callable[[], torch.Tensor]) -> None:
    torch.manual_seed(0)
    y = make()
    got = _finish([(y, -1, SAT_NONE)])[0]
    _check(got, y, "x", conv=False)


def test_conv_output_units_on_dim_1() -> None:
    torch.manual_seed(0)
    y = torch.randn(4, 6, 5, 5) + torch.arange(6.0).reshape(1, 6, 1, 1)
    _check(_finish([(y, 1, SAT_NONE)])[0], y, "x", conv=True)


def test_nonfinite_values_take_the_masked_route() -> None:
    torch.manual_seed(0)
    y = torch.tanh(torch.randn(32, 16) * 3)
    y[0, 0], y[3, 2], y[5, 5] = float("nan"), float("inf"), float("-inf")
    got = _finish([(y, -1, SAT_TANH)])[0]
    assert got[STATS.index("nonfinite")] == 3
    # dead_frac of a unit holding NaN/Inf is left out: the agent judges units on their finite
    # values, the float64 reference on the raw max; the definitions differ only there.
    _check(got, y, "tanh", conv=False, skip=("dead_frac",))


def test_float64_and_half_outputs_and_a_changing_batch() -> None:
    torch.manual_seed(0)
    fin = Finalizer(2)
    for batch in (32, 7, 32):  # the last batch of an epoch is smaller: no stale per-unit counts
        a = torch.randn(batch, 10, dtype=torch.float64) * 2 + 1
        b = torch.randn(batch, 12).half()
        got = _finish([(a, -1, SAT_NONE), (b, -1, SAT_NONE)], fin)
        _check(got[0], a, "x", conv=False)
        _check(got[1], b.float(), "x", conv=False)
