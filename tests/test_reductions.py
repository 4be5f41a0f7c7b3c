"""The per-hook reductions and the batched finish against float64, on the inputs that pick a route.

The CPU route takes a fast path (centred sums, plain min/max, a single read) and falls back to the
exact masked path on non-finite values or float32 overflow; both must give the product's figures.
The fast path is the C kernel where it is built, else torch ops: every test here runs on both.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from icsmon_agent import kernel
from icsmon_agent import reduce as reduce_module
from icsmon_agent.finish import Finalizer
from icsmon_agent.kernel import SAT_NONE, SAT_SIGMOID, SAT_TANH
from icsmon_agent.protocol import STATS
from icsmon_agent.reduce import Output, Record, reduce_output
from truth import close, figures, per_unit


@pytest.fixture(autouse=True, params=["batch", "kernel", "torch"])
def cpu_route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test through the C kernel, the outputs together (one call, as the offload thread
    reduces them) and one by one (as a hook does), and through the torch ops that stand in for it."""
    if request.param == "torch":
        monkeypatch.setattr(kernel, "_fused", None)
    if request.param != "batch":
        monkeypatch.setattr(reduce_module, "reduce_outputs", _one_by_one)
    return str(request.param)


def _one_by_one(outputs: list[Output]) -> list[Record | None]:
    return [reduce_output(t.relu() if relu else t, unit_dim, sat) for t, unit_dim, sat, relu in outputs]


def test_the_kernel_is_built_here() -> None:
    """The install compiles the kernel wherever a C compiler is (CI's machines have one); without
    this the kernel tests below would quietly test the torch route twice."""
    import icsmon_agent._fused  # noqa: F401


def test_the_kernels_constants_and_columns_are_pythons() -> None:
    """The C kernel and the torch route agree on the saturation kinds, the ReLU flag, the shift's
    floors and the finish's column order by this test, not by comments on both sides."""
    from icsmon_agent import _fused

    assert _fused.constants() == {
        "SAT_NONE": kernel.SAT_NONE,
        "SAT_TANH": kernel.SAT_TANH,
        "SAT_SIGMOID": kernel.SAT_SIGMOID,
        "RELU_OF_INPUT": kernel.RELU_OF_INPUT,
        "SHIFT_VAR_FLOOR": kernel.SHIFT_VAR_FLOOR,
        "VAR_EPS": kernel.VAR_EPS,
        "FINISH_STATS": kernel.FINISH_STATS,
    }


def _finish(
    outputs: list[tuple[torch.Tensor, int, int]], fin: Finalizer | None = None, relu: list[bool] | None = None
) -> np.ndarray:
    """The figures of ``outputs``; ``relu[k]``: output k is the ReLU of the tensor given."""
    fin = fin or Finalizer(len(outputs))
    flags = relu or [False] * len(outputs)
    recs = reduce_module.reduce_outputs([(t, u, s, r) for (t, u, s), r in zip(outputs, flags, strict=True)])
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
        # More rows than the kernel's float32 block (64), a mean far from zero, a ragged last block.
        lambda: torch.randn(1000, 3) * 0.5 + 7.0,
        lambda: torch.randn(2, 3, 4, 5).transpose(1, 3),  # not contiguous: copied first
        lambda: torch.randn(300, 1) + 2.0,  # one unit (a regression head): one long run
        lambda: torch.randn(70, 5000),  # wider than one column chunk, more rows than one block
        lambda: torch._neg_view(torch.randn(16, 8)),  # a lazily negated view (NumPy refuses one)
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


@pytest.mark.parametrize(
    "shape",
    [
        (3, 5, 7, 7),  # a short run (49): reduced as rows of columns
        (3, 5, 9, 11),  # a run (99) of six full lanes and a tail
        (2, 3, 40, 41),  # a run (1,640) longer than the kernel's float32 block (1,024)
        (5, 4, 3),  # a run shorter than one lane
        (40, 3, 70),  # a run (70) long enough for lanes, but many rows: reduced as rows
        (70, 300, 20),  # 6,000 columns: a unit split across the kernel's column chunks (4,096)
    ],
)
def test_conv_like_runs_of_any_length(shape: tuple[int, ...]) -> None:
    torch.manual_seed(1)
    y = torch.randn(*shape) * 2.0 + torch.arange(float(shape[1])).reshape(1, -1, *([1] * (len(shape) - 2)))
    _check(_finish([(y.relu(), 1, SAT_NONE)])[0], y.relu(), "x", conv=True)


@pytest.mark.parametrize("conv", [False, True])
def test_saturation_counts(conv: bool) -> None:
    torch.manual_seed(2)
    raw = torch.randn(16, 8, 6, 6) * 4 if conv else torch.randn(200, 24) * 4
    unit_dim = 1 if conv else -1
    for act, sat, kind in ((torch.tanh, SAT_TANH, "tanh"), (torch.sigmoid, SAT_SIGMOID, "sigmoid")):
        y = act(raw)
        got = _finish([(y, unit_dim, sat)])[0]
        assert 0.1 < got[STATS.index("sat_frac")] < 0.9  # a test that can tell a miscount
        _check(got, y, kind, conv=conv)


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


@pytest.mark.parametrize("where", [(0, 0), (70, 1), (199, 2)])  # the reference, a later block, the end
def test_a_single_nan_anywhere_is_found(where: tuple[int, int]) -> None:
    y = torch.rand(200, 3)
    y[where] = float("nan")
    got = _finish([(y, -1, SAT_NONE)])[0]
    assert got[STATS.index("nonfinite")] == 1
    finite = y[torch.isfinite(y)]
    assert got[STATS.index("min")] == pytest.approx(float(finite.min()))
    assert got[STATS.index("max")] == pytest.approx(float(finite.max()))


def test_the_kernel_rejects_buffers_that_do_not_fit(cpu_route: str) -> None:
    """A caller's slip is a Python error, never a read or write past a buffer."""
    if cpu_route != "kernel":
        pytest.skip("the kernel's own argument checks")
    from icsmon_agent import _fused

    def shapes(*rows: tuple[int, int, int, int]) -> np.ndarray:
        return np.array(rows, dtype=np.int64)

    x = np.zeros((4, 3), dtype=np.float32)
    moments, scalars, ok = np.zeros((4, 3)), np.zeros((3, 1)), np.zeros(1, dtype=np.bool_)
    fits = shapes((4, 3, 1, SAT_NONE))
    assert _fused.reduce_batch([x], fits, moments, scalars, ok) is None
    assert ok.tolist() == [True]
    bad: list[tuple[object, ...]] = [
        ([x], shapes((5, 3, 1, SAT_NONE)), moments, scalars, ok),  # more elements than x holds
        ([x], fits, np.zeros(11), scalars, ok),  # moments too short
        ([x], fits, moments, np.zeros(2), ok),  # scalars too short
        ([x], fits, moments, scalars, np.zeros(1, dtype=np.uint8)),  # ok not bool
        ([x.astype(np.float64)], fits, moments, scalars, ok),  # wrong dtype
        ([np.zeros((3, 4), dtype=np.float32).T], fits, moments, scalars, ok),  # not C-contiguous
        ([x], shapes((4, 3, 1, 7)), moments, scalars, ok),  # no such saturation kind (3), ReLU'd
        ([x], shapes((4, 3, 1, 3)), moments, scalars, ok),  # no such saturation kind
        ([x], shapes((4, 3, 1, 8)), moments, scalars, ok),  # no such flag
        ([x], shapes((4, 3, 1, -4)), moments, scalars, ok),  # negative
        ([bytes(48)], fits, moments, scalars, ok),  # bytes, not float32
        ([x], fits.astype(np.int32), moments, scalars, ok),  # shapes not int64
        ([x, x], fits, moments, scalars, ok),  # more outputs than shapes
        ([], shapes(), np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.bool_)),  # no outputs
    ]
    for args in bad:
        with pytest.raises(ValueError):
            _fused.reduce_batch(*args)
    with pytest.raises(BufferError):
        _fused.reduce_batch([x], fits, bytes(96), scalars, ok)  # moments read-only
    with pytest.raises(TypeError):
        _fused.reduce_batch([x], fits, moments, scalars)  # an argument short
    with pytest.raises(TypeError):
        _fused.reduce_batch(x[0, 0], fits, moments, scalars, ok)  # xs not a sequence
    # Sizes whose byte counts overflow must not wrap round to a size that fits (found by review),
    # nor may the units of several outputs add up past what the moments can index.
    one, four = np.zeros(1, dtype=np.float32), np.zeros(4)
    for outer, units, inner in (
        (1, 1, 2**62 + 1),
        (2**62 + 1, 1, 1),
        (1, 2**59 + 1, 8),
        (2**40, 2**40, 2**40),
    ):
        with pytest.raises(ValueError):
            _fused.reduce_batch([one], shapes((outer, units, inner, SAT_NONE)), four, scalars, ok)
    two = np.zeros((3, 2))
    with pytest.raises(ValueError):
        _fused.reduce_batch(
            [one, one], shapes((1, 2**57, 1, SAT_NONE), (1, 2**57, 1, SAT_NONE)), four, two, np.zeros(2, bool)
        )
    # Shapes that share memory with an output buffer are read once, before the kernel writes
    # (found by review: output 0's max overwrote output 1's unit count, and the kernel then wrote
    # past the moments).
    u = 8
    shared = np.zeros(4 * u)
    aliased = shared.view(np.int64)[3 * u - 5 : 3 * u + 3]
    aliased[:] = [1, 3, 1, SAT_NONE, 1, 5, 1, SAT_NONE]
    outputs = [np.ones(3, dtype=np.float32), np.ones(5, dtype=np.float32)]
    _fused.reduce_batch(outputs, aliased, shared.reshape(4, u), np.empty((3, 2)), np.empty(2, dtype=np.bool_))
    # And the finish over a batch: every buffer's size is checked against the shapes.
    cols, units, layer_var = np.zeros((1, 8)), np.zeros((2, 3)), np.zeros(1)
    assert _fused.finish_batch(moments, scalars, fits, None, cols, units, layer_var) is None
    prev = (np.zeros(3), np.ones(3), np.ones(1))
    assert _fused.finish_batch(moments, scalars, fits, prev, cols, units, layer_var) is None
    bad = [
        (moments, scalars, shapes((4, 4, 1, SAT_NONE)), None, cols, units, layer_var),  # more units
        (moments, scalars, fits, None, np.zeros((1, 7)), units, layer_var),  # cols too short
        (moments, scalars, fits, None, cols, np.zeros(5), layer_var),  # units_out too short
        (moments, scalars, fits, (np.zeros(2), np.ones(3), np.ones(1)), cols, units, layer_var),
        (moments, np.zeros(0), fits, None, cols, units, layer_var),  # no outputs
    ]
    for args in bad:
        with pytest.raises(ValueError):
            _fused.finish_batch(*args)
    with pytest.raises(TypeError):
        _fused.finish_batch(
            moments, scalars, fits, [np.zeros(3)], cols, units, layer_var
        )  # prev not a 3-tuple
    with pytest.raises(BufferError):
        _fused.finish_batch(moments, scalars, fits, None, bytes(64), units, layer_var)  # cols read-only


@pytest.mark.parametrize("mixed", [False, True])
def test_many_outputs_of_every_kind_in_one_call(mixed: bool) -> None:
    """One kernel call over outputs of both layouts, one unit, tanh and sigmoid; ``mixed`` adds a
    NaN (the exact route, inside the batch), a float64 output (not the kernel's) and an empty one,
    which send the sample down the general finish, not the batch's. Each layer's figures, and its
    shift over three samples, are its own wherever it sits; a layer empty in the middle sample has
    no shift then nor in the sample after (consecutive samples only), and the others keep theirs."""
    torch.manual_seed(3)

    def sample(step: int) -> list[tuple[torch.Tensor, int, int, str, bool]]:
        nan = torch.randn(8, 6)
        nan[2, 3] = float("nan")
        runs = torch.randn(4, 8, 9, 9).relu() if step != 1 else torch.empty(0, 8, 9, 9)
        outputs = [
            (torch.randn(32, 17) * 2 + 1, -1, SAT_NONE, "x", False),
            (runs, 1, SAT_NONE, "x", True),  # long runs: the runs layout; empty in the middle sample
            (torch.randn(64, 1) - 3, -1, SAT_NONE, "x", False),  # one unit
            ((torch.randn(16, 5) * 3).tanh(), -1, SAT_TANH, "tanh", False),
            ((torch.randn(8, 3, 5) * 4).sigmoid(), 1, SAT_SIGMOID, "sigmoid", True),  # short runs: rows
            # Units far apart, each narrow, the spread growing: the shift's floor is the total variance.
            (torch.arange(7.0) * (10 + 5 * step) + torch.randn(16, 7) * 0.05, -1, SAT_NONE, "x", False),
            # Constant over the batch, not across units (token-type embeddings): a finite shift.
            ((torch.arange(6.0) * (1 + 0.01 * step)).expand(8, 6).clone(), -1, SAT_NONE, "x", False),
        ]
        if mixed:
            outputs += [
                (nan, -1, SAT_NONE, "x", False),
                (torch.randn(8, 6, dtype=torch.float64) * 5, -1, SAT_NONE, "x", False),
                (torch.empty(0, 6), -1, SAT_NONE, "x", False),  # absent from every sample
            ]
        return outputs

    layers = 10 if mixed else 7
    nan_at = 7  # the mixed sample's NaN output
    fin = Finalizer(layers)
    prev: list[tuple[np.ndarray, np.ndarray] | None] = [None] * layers
    for step in range(3):
        outputs = sample(step)
        got = _finish([(t, unit_dim, sat) for t, unit_dim, sat, _, _ in outputs], fin)
        for k, (t, _, _, kind, conv) in enumerate(outputs):
            if t.numel() == 0:
                assert np.isnan(got[k]).all()
                prev[k] = None
                continue
            y = t.double().numpy()
            want = figures(y, kind, conv, prev[k] if k != nan_at else None)
            for j, stat in enumerate(STATS):
                if stat == "grad_norm" or (k == nan_at and stat in ("dead_frac", "shift")):
                    continue  # the NaN layer: see test_nonfinite_values_take_the_masked_route
                value = None if np.isnan(got[k, j]) else float(got[k, j])
                assert close(value, want[stat]), (
                    f"step {step}, output {k}, {stat}: got {value}, want {want[stat]}"
                )
            mu, var, _ = per_unit(y, conv)
            prev[k] = (mu, var)
        if step == 2:
            assert np.isnan(got[1, STATS.index("shift")])  # absent last sample: no shift
            assert np.isfinite(got[0, STATS.index("shift")])  # the others kept theirs


def _with(x: torch.Tensor, at: tuple[int, ...], value: float) -> torch.Tensor:
    x[at] = value
    return x


@pytest.mark.parametrize(
    ("make", "unit_dim"),
    [
        (lambda: torch.randn(64, 48), -1),  # Linear-like: the rows layout
        (lambda: torch.randn(4, 8, 9, 9) + 0.3, 1),  # conv-like long runs: the runs layout
        (lambda: torch.randn(4, 8, 9, 9) - 1.0, 1),  # runs whose first elements are mostly negative
        (lambda: _with(torch.randn(64, 48), (0, 0), -2.0), -1),  # rows: a negative first element
        (lambda: torch.randn(8, 3, 5), 1),  # short runs: rows
        (lambda: torch.randn(300, 1) - 0.2, -1),  # one unit: one long run
        (lambda: -torch.rand(16, 8) - 0.1, -1),  # all negative: the ReLU is dead and all zeros
        (lambda: torch.randn(64, 48) * 3e19, -1),  # squares overflow float32: the exact route
        (lambda: _with(torch.randn(16, 8), (3, 2), float("nan")), -1),  # NaN stays NaN under ReLU
        (lambda: _with(torch.randn(16, 8), (5, 1), float("-inf")), -1),  # -inf: the ReLU's is finite
        (lambda: _with(torch.randn(4, 8, 9, 9), (1, 2, 3, 4), float("inf")), 1),
        (lambda: torch.randn(16, 8).half(), -1),  # not the kernel's dtype: converted, then the same
    ],
)
def test_a_relu_reduced_from_its_input_has_the_relu_outputs_figures(
    make: Callable[[], torch.Tensor], unit_dim: int
) -> None:
    """A ReLU's figures taken from its input (the offload thread reads one tensor for a Linear
    and the ReLU after it) are those of the ReLU's output, on every route, NaN and Inf included;
    the input's own figures, from the same buffer in the same call, are untouched."""
    torch.manual_seed(0)
    x = make()
    conv = unit_dim == 1
    got = _finish([(x, unit_dim, SAT_NONE), (x, unit_dim, SAT_NONE)], relu=[False, True])
    # dead_frac of a unit holding NaN/Inf: see test_nonfinite_values_take_the_masked_route.
    skip = ("dead_frac",) if not torch.isfinite(x).all() else ()
    _check(got[0], x.float(), "x", conv, skip)
    _check(got[1], x.float().relu(), "x", conv, skip)
    if torch.isnan(x).any():  # the ReLU of a NaN is a NaN: counted, not hidden
        assert got[1][STATS.index("nonfinite")] == got[0][STATS.index("nonfinite")] > 0
