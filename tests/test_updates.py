"""The update-to-weight ratio's sketch: which elements, on any parameter layout and size."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from icsmon_agent.updates import SKETCH, UpdateRatio, sketch_indices
from truth import close, update_ratio


def test_the_sketch_stays_inside_parameters_of_any_size() -> None:
    """A float linspace rounds past the end above 2**24 elements (a GPT-2 embedding has 38.6 M)."""
    for n in (1, 2, 63, 64, 65, 2**24 + 1, 50257 * 768):
        idx = sketch_indices(n)
        assert idx.size == min(n, SKETCH) and idx[0] == 0 and idx[-1] == n - 1
        assert (np.diff(idx) > 0).all()


def test_channels_last_scalar_and_bf16_parameters_are_read_where_they_are() -> None:
    """A channels_last conv weight (not a view in NumPy), a 0-d parameter and a bf16 one: each
    layer's ratio equals the float64 truth over the same logical elements after a real update."""
    conv = nn.Conv2d(8, 16, 3).to(memory_format=torch.channels_last)
    scale = nn.Parameter(torch.tensor(2.0))
    half = nn.Linear(40, 40).to(torch.bfloat16)
    params = [(0, conv.weight), (0, conv.bias), (1, scale), (2, half.weight), (2, half.bias)]
    assert not conv.weight.is_contiguous()
    ratio = UpdateRatio(params, 3)
    before = [[p.detach().double().numpy().copy() for layer, p in params if layer == i] for i in range(3)]
    assert ratio.take(0) is None
    with torch.no_grad():
        for _, p in params:
            p.add_(torch.randn_like(p) * 0.01)
    after = [[p.detach().double().numpy().copy() for layer, p in params if layer == i] for i in range(3)]
    got = ratio.take(2)
    assert got is not None
    for i in range(3):
        want = update_ratio(before[i], after[i], 2)
        assert want is not None and want > 0 and close(float(got[i]), want), (i, float(got[i]), want)


def test_a_contiguous_cpu_model_read_through_numpy_sees_in_place_updates() -> None:
    model = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 1))
    params = [(i, p) for i, m in enumerate(model) for p in m.parameters()]
    ratio = UpdateRatio(params, 2)
    ratio.take(0)
    assert (ratio.take(1) == 0).all()  # nothing moved
    with torch.no_grad():
        model[1].weight.mul_(1.5)  # in place: the views see it
    got = ratio.take(2)
    assert got is not None and float(got[0]) == 0 and float(got[1]) > 0.1
