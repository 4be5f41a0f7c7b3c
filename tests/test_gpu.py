"""On a GPU the agent never synchronises the training thread with the device.

``torch.cuda.set_sync_debug_mode("error")`` turns every synchronising CUDA call (``.item()``,
``.cpu()``, a blocking copy, a boolean-mask index, ``nonzero``...) into an exception. The agent
catches its own exceptions and counts them as faults, so the proof is twofold: the training loop
runs clean under the mode, and the monitor's fault count stays 0 while it measures every step.
The figures must still arrive, and still match a float64 computation on the same tensors.
Skipped where there is no CUDA device.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import icsmon_agent
from helpers import wait_watching
from icsmon.subscriber import Subscriber
from icsmon_agent.protocol import STATS, Sample

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _models() -> dict[str, nn.Module]:
    return {
        "mlp": nn.Sequential(
            *[m for _ in range(8) for m in (nn.Linear(64, 64), nn.ReLU())], nn.Linear(64, 4)
        ),
        "cnn": nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * 8 * 8, 16),
            nn.Tanh(),
            nn.Linear(16, 4),
        ),
    }


def _batch(name: str, device: torch.device) -> torch.Tensor:
    if name == "cnn":
        return torch.randn(16, 3, 16, 16, device=device)
    return torch.randn(16, 64, device=device)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_host_sync_every_step(name: str, dtype: torch.dtype, runtime_dir: Path) -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = _models()[name].to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = _batch(name, device)
    target = torch.randn(x.shape[0], 4, device=device)
    mon = icsmon_agent.watch(model, every=1)
    assert mon.endpoint is not None
    sub = Subscriber(mon.endpoint)
    samples: list[Sample] = []
    try:
        # Step 0 builds the layer table (host work by design); then wait for the subscription.
        _train_step(model, opt, x, target, mon, dtype)
        assert wait_watching(mon, sub)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(20):
                _train_step(model, opt, x, target, mon, dtype)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        assert mon.errors == 0, "the agent synchronised (or failed) inside a training step"
        deadline = time.monotonic() + 10
        while len(samples) < 10 and time.monotonic() < deadline:
            samples += [m for m in sub.poll(0.1) if isinstance(m, Sample)]
    finally:
        mon.close()
        sub.close()
    assert len(samples) >= 10
    last = samples[-1].figures
    assert last.shape[1] == len(STATS)
    assert np.isfinite(last[:, STATS.index("mean")]).all()
    assert np.isfinite(last[:, STATS.index("grad_norm")][[0]]).all()


def _train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    target: torch.Tensor,
    mon: icsmon_agent.Monitor,
    dtype: torch.dtype,
) -> None:
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        loss = nn.functional.mse_loss(model(x).float(), target)
    loss.backward()  # type: ignore[no-untyped-call]
    opt.step()
    mon.step(loss=loss)


def test_figures_match_float64_on_gpu(runtime_dir: Path) -> None:
    """The masked GPU route gives the same figures as float64 on the host, NaN and Inf included."""
    from icsmon_agent.finish import Finalizer
    from icsmon_agent.reduce import reduce_output

    torch.manual_seed(0)
    y = torch.randn(64, 32, device="cuda") * 3 + 1
    y[0, 0] = float("nan")
    y[1, 1] = float("inf")
    torch.cuda.set_sync_debug_mode("error")
    try:
        fin = Finalizer(1)
        out = fin.figures([reduce_output(y, -1, 0)], None, y.device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    got = dict(zip(STATS, out.cpu().double().numpy()[0].tolist(), strict=True))
    ref = y.double().cpu().numpy()
    fin_mask = np.isfinite(ref)
    assert got["nonfinite"] == 2
    assert got["min"] == pytest.approx(ref[fin_mask].min(), rel=1e-6)
    assert got["max"] == pytest.approx(ref[fin_mask].max(), rel=1e-6)
    assert got["zero_frac"] == pytest.approx(float((ref == 0).mean()), abs=1e-9)
    assert np.isnan(got["mean"])
