"""The agent's figures against an independent float64 computation on the same tensors.

Real training loops in this process, a real ZeroMQ subscriber on the agent's real socket.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import icsmon_agent
from helpers import wait_watching
from icsmon.store import Store
from icsmon.subscriber import Subscriber
from icsmon_agent.protocol import STATS, Sample
from truth import close, figures, grad_norm, per_unit, published, update_ratio

CONV_TYPES = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d)


def first_floating(out: Any) -> torch.Tensor | None:
    """The first floating-point tensor of a nested output, found the obvious way."""
    if isinstance(out, torch.Tensor):
        return out if out.is_floating_point() else None
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else []
    for item in items:
        found = first_floating(item)
        if found is not None:
            return found
    return None


class Capture:
    """Records every hooked module's output (and param grads) per step, independently of the agent."""

    def __init__(self, model: nn.Module) -> None:
        self.outputs: dict[int, list[tuple[nn.Module, np.ndarray]]] = {}
        self.grads: dict[int, list[list[np.ndarray]]] = {}
        self.params: dict[int, list[list[np.ndarray]]] = {}  # each layer's weights after the step
        self.step = 0
        for module in model.modules():
            if next(module.children(), None) is None:
                module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        t = first_floating(output)
        assert t is not None
        self.outputs.setdefault(self.step, []).append((module, t.detach().double().numpy().copy()))

    def end_step(self) -> None:
        self.params[self.step] = [
            [p.detach().double().numpy().copy() for p in m.parameters() if p.requires_grad]
            for m, _ in self.outputs.get(self.step, [])
        ]
        self.grads[self.step] = [
            [p.grad.double().numpy().copy() for p in m.parameters() if p.grad is not None]
            for m, _ in self.outputs.get(self.step, [])
        ]
        self.step += 1


def collect(sub: Subscriber, store: Store, want: int, timeout: float = 20) -> list[Sample]:
    got: list[Sample] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        for msg in sub.poll(0.1):
            if store.add(msg) and isinstance(msg, Sample):
                got.append(msg)
    return got


def check_against_truth(samples: list[Sample], cap: Capture, kinds: list[str], conv_flags: list[bool]) -> int:
    checked = 0
    prev_units: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    last: int | None = None  # the step of the previous sample
    for s in samples:
        outs = cap.outputs[s.step]
        grads = cap.grads[s.step]
        assert s.figures.shape == (len(outs), len(STATS))
        for i, (_, y) in enumerate(outs):
            module = cap.outputs[s.step][i][0]
            relu = isinstance(module, nn.ReLU)
            want = published(
                figures(y, kinds[i], conv_flags[i], prev_units.get(i)), "relu" if relu else kinds[i]
            )
            want["grad_norm"] = grad_norm(grads[i])
            if last is not None:
                want["update_ratio"] = update_ratio(cap.params[last][i], cap.params[s.step][i], s.step - last)
            for j, stat in enumerate(STATS):
                got = float(s.figures[i, j])
                got_v = None if np.isnan(got) else got
                assert close(got_v, want[stat]), (
                    f"step {s.step} layer {i} {stat}: got {got_v}, want {want[stat]}"
                )
                checked += 1
            mu, var, _ = per_unit(y, conv_flags[i])
            prev_units[i] = (mu, var)
        last = s.step
    return checked


def run_training(
    model: nn.Module,
    make_batch: Any,
    steps: int,
    runtime_dir: Path,
    manual: bool,
    *,
    set_to_none: bool = True,
    watched: Callable[[icsmon_agent.Monitor], None] | None = None,
) -> tuple[list[Sample], Capture]:
    torch.manual_seed(1)
    mon = icsmon_agent.watch(model, every=1, runtime_dir=runtime_dir)
    if watched is not None:
        watched(mon)
    cap = Capture(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    store = Store()
    with Subscriber(mon.endpoint or "") as sub:
        assert wait_watching(mon, sub), "the agent never saw the subscription"
        for _ in range(steps):
            x, y = make_batch()
            out = model(x)
            loss = nn.functional.mse_loss(out, y)
            opt.zero_grad(set_to_none=set_to_none)
            loss.backward()
            opt.step()
            cap.end_step()
            if manual:
                mon.step(loss=loss)
        mon.close()
        samples = collect(sub, store, steps)
    assert mon.errors == 0
    return samples, cap


def test_mlp_figures_equal_float64_truth(runtime_dir: Path) -> None:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(6):
        layers += [nn.Linear(24, 24), nn.Tanh() if i == 2 else nn.Sigmoid() if i == 3 else nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(24, 3))
    samples, cap = run_training(
        model, lambda: (torch.randn(16, 24) * 3, torch.randn(16, 3)), 5, runtime_dir, True
    )
    assert [s.step for s in samples] == [0, 1, 2, 3, 4]
    assert all(s.loss is not None and s.loss > 0 for s in samples)
    kinds = [
        "tanh" if isinstance(m, nn.Tanh) else "sigmoid" if isinstance(m, nn.Sigmoid) else "x"
        for m, _ in cap.outputs[0]
    ]
    assert check_against_truth(samples, cap, kinds, [False] * len(kinds)) == 5 * 13 * len(STATS)


@pytest.mark.parametrize("set_to_none", [True, False], ids=["grads-replaced", "grads-zeroed-in-place"])
def test_outputs_changed_in_place_and_reused_gradients_keep_figures_exact(
    runtime_dir: Path, set_to_none: bool
) -> None:
    """The CPU route reduces outputs on a thread of its own after the forward: an output that a
    later module changes in place (Linear -> ReLU(inplace=True), a residual ``+=``) must still be
    measured as it was when its layer returned it, and gradients that the job zeroes in place
    must be measured before the next step touches them."""

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            h += self.b(x)  # changes a's output in place after its hook ran
            return h

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 16), nn.ReLU(inplace=True), Residual(), nn.ReLU(inplace=True), nn.Linear(16, 4)
    )
    steps = 6
    samples, cap = run_training(
        model,
        lambda: (torch.randn(32, 16), torch.randn(32, 4)),
        steps,
        runtime_dir,
        True,
        set_to_none=set_to_none,
    )
    assert [s.step for s in samples] == list(range(steps))
    n = len(cap.outputs[0])
    assert check_against_truth(samples, cap, ["x"] * n, [False] * n) == steps * n * len(STATS)


def test_cnn_figures_equal_float64_truth_with_only_the_two_lines(runtime_dir: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
        nn.Sigmoid(),
    )
    batch = lambda: (torch.randn(6, 3, 8, 8), torch.rand(6, 10))  # noqa: E731
    # manual=False: steps come from optimizer.step() alone
    samples, cap = run_training(model, batch, 4, runtime_dir, False)
    assert [s.step for s in samples] == [0, 1, 2, 3]
    conv = [isinstance(m, CONV_TYPES) or y.ndim == 4 for m, y in cap.outputs[0]]
    kinds = ["sigmoid" if isinstance(m, nn.Sigmoid) else "x" for m, _ in cap.outputs[0]]
    check_against_truth(samples, cap, kinds, conv)


class TupleBlock(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return x * 2, {"aux": x}


class DictOut(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        return {"idx": torch.tensor([1]), "value": x + 1}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.tup = TupleBlock()
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.dict = DictOut()
        self.act = nn.ReLU()  # reused twice: two layers, act and act#1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc(x))
        h, _ = self.tup(h)
        seq, _ = self.lstm(h.unsqueeze(1))
        return self.act(self.dict(seq.squeeze(1))["value"])


def test_tuple_dict_lstm_outputs_and_reused_modules(runtime_dir: Path) -> None:
    model = Net()
    samples, cap = run_training(model, lambda: (torch.randn(4, 8), torch.randn(4, 8)), 3, runtime_dir, True)
    assert [s.step for s in samples] == [0, 1, 2]
    # the figures of the first floating tensor of each output (the dict's "value", not its ints)
    assert check_against_truth(samples, cap, ["x"] * 6, [False] * 6) == 3 * 6 * len(STATS)
    # names: from named_modules, reused module calls numbered
    mon = icsmon_agent.watch(Net(), every=1, endpoint="tcp", runtime_dir=runtime_dir)
    mon.model(torch.randn(2, 8)).sum().backward()
    mon.step()
    assert mon.layer_names == ["fc", "act", "tup", "lstm", "dict", "act#1"]
    mon.close()


def test_nonfinite_values_are_counted_and_min_max_stay_finite(runtime_dir: Path) -> None:
    class Poison(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x.clone()
            y[0, 0] = float("nan")
            y[1, 1] = float("inf")
            return y

    model = nn.Sequential(nn.Linear(4, 4), Poison())
    samples, cap = run_training(model, lambda: (torch.randn(3, 4), torch.randn(3, 4)), 2, runtime_dir, True)
    fig = samples[0].figures
    assert fig[1, STATS.index("nonfinite")] == 2
    y = cap.outputs[0][1][1]
    finite = y[np.isfinite(y)]
    assert fig[1, STATS.index("min")] == pytest.approx(finite.min(), rel=1e-5)
    assert fig[1, STATS.index("max")] == pytest.approx(finite.max(), rel=1e-5)
    assert np.isnan(fig[1, STATS.index("mean")])


def test_sampling_every_n_steps(runtime_dir: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    mon = icsmon_agent.watch(model, every=3, endpoint="tcp", runtime_dir=runtime_dir)
    store = Store()
    with Subscriber(mon.endpoint or "") as sub:
        wait_watching(mon, sub)
        for _ in range(10):
            model(torch.randn(2, 4)).sum().backward()
            mon.step()
        mon.close()
        samples = collect(sub, store, 4)
    assert [s.step for s in samples] == [0, 3, 6, 9]


def test_bad_arguments_and_empty_models() -> None:
    with pytest.raises(TypeError, match=r"needs a torch\.nn\.Module, got builtins\.str"):
        icsmon_agent.watch("model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="every"):
        icsmon_agent.watch(nn.Linear(2, 2), every=0)


def test_empty_model_warns_and_training_continues(runtime_dir: Path) -> None:
    with pytest.warns(RuntimeWarning, match="no layer to watch"):
        mon = icsmon_agent.watch(nn.ModuleList(), runtime_dir=runtime_dir)
    mon.step(loss=1.0)
    mon.close()
    assert not list(runtime_dir.glob("*.json"))


def test_integer_only_outputs_warn_once(runtime_dir: Path) -> None:
    class ArgMax(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.argmax(-1)

    only_ints = nn.Sequential(ArgMax())
    mon = icsmon_agent.watch(only_ints, runtime_dir=runtime_dir)
    with pytest.warns(RuntimeWarning, match="floating-point"):
        for _ in range(3):
            only_ints(torch.randn(2, 3))
            mon.step()
    assert mon.errors == 0
    mon.close()


def test_unwritable_runtime_dir_warns_and_training_continues(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.warns(RuntimeWarning, match="cannot publish"):
        mon = icsmon_agent.watch(model, runtime_dir=blocker / "rt")
    model(torch.randn(1, 2)).sum().backward()
    mon.step(loss=torch.tensor(1.0))
    mon.close()


def test_failed_bind_warns_and_training_continues(runtime_dir: Path) -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.warns(RuntimeWarning, match="cannot publish"):
        mon = icsmon_agent.watch(model, endpoint="tcp://256.1.1.1:1", runtime_dir=runtime_dir)
    model(torch.randn(1, 2)).sum().backward()
    mon.step()
    mon.close()


class LossInside(nn.Module):
    """A model that holds its loss module: a 0-d output, and a 1-D one from the head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 1)
        self.flat = nn.Flatten(0)
        self.loss = nn.MSELoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.loss(self.flat(self.fc(x)), torch.zeros(x.shape[0]))


def test_scalar_and_vector_outputs_are_one_unit_each(runtime_dir: Path) -> None:
    model = LossInside()
    mon = icsmon_agent.watch(model, every=1, endpoint="tcp", runtime_dir=runtime_dir)
    cap = Capture(model)
    store = Store()
    with Subscriber(mon.endpoint or "") as sub:
        wait_watching(mon, sub)
        for _ in range(3):
            model(torch.randn(5, 4)).backward()
            cap.end_step()
            mon.step()
        mon.close()
        samples = collect(sub, store, 3)
    assert mon.errors == 0 and mon.layer_names == ["fc", "flat", "loss"]
    assert [s.step for s in samples] == [0, 1, 2]
    check_against_truth(samples, cap, ["x"] * 3, [False] * 3)


class Routed(nn.Module):
    """A mixture-of-experts in miniature: the expert sees only the rows routed to it, often none."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.expert = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return h.sum() + self.expert(x[x[:, 0] > 0]).sum()


def test_an_empty_output_is_absent_from_its_sample_not_a_fault(runtime_dir: Path) -> None:
    """An expert given no tokens (or a batch of none) has no figures: reducing it raised, counted a
    fault a step (the agent detaches after 50) and made torch warn inside the job."""
    steps = iter(range(1_000))

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(6, 4).abs() * (1 if next(steps) % 2 else -1)  # odd steps route every row
        return x, torch.zeros(())

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning reaches the job (run_training checks faults)
        samples, cap = run_training(Routed(), batch, 6, runtime_dir, True)
    assert [s.step for s in samples] == list(range(6))
    mean, shift = STATS.index("mean"), STATS.index("shift")
    for s in samples:
        assert np.isfinite(s.figures[0, mean])  # fc: always there
        assert np.isfinite(s.figures[1, mean]) == (s.step % 2 == 1), s.step  # expert: when routed to
        # The expert coming and going leaves fc's shift alone (it used to take every layer's with
        # it); the expert has none, its previous sample never had it.
        assert np.isnan(s.figures[1, shift])
        if s.step:
            prev = per_unit(cap.outputs[s.step - 1][0][1], False)
            want = figures(cap.outputs[s.step][0][1], "x", False, prev[:2])["shift"]
            assert close(float(s.figures[0, shift]), want), (s.step, s.figures[0, shift], want)


def test_a_relu_is_read_from_the_output_before_it_only_when_that_is_its_input(runtime_dir: Path) -> None:
    """Linear -> ReLU: the ReLU's figures come from the Linear's held output (its own output is
    never handed over, no bytes of its own held); an in-place ReLU, or a ReLU of anything but the
    output held just before it, is held as its own output. The figures are the truth either way."""

    class Beside(nn.Module):  # a ReLU of the block's input, called after a Linear of it
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act = nn.Linear(8, 8), nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            return self.act(x) + h

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(inplace=True), Beside(), nn.Linear(8, 2)
    )
    held: list[dict[str, bool]] = []
    bytes_held: list[tuple[int, int]] = []  # what the agent counts, what its own outputs take
    monitors: list[icsmon_agent.Monitor] = []

    def peek(module: nn.Module, args: Any) -> None:  # before the head: what this forward holds
        if monitors and monitors[0]._capture._held:
            mon = monitors[0]
            held.append({mon.layer_names[h.slot]: h.source is not None for h in mon._capture._held})
            own = sum(h.tensor.nbytes for h in mon._capture._held if h.source is None)
            bytes_held.append((mon._capture._held_bytes, own))

    model[5].register_forward_pre_hook(peek)
    samples, cap = run_training(
        model, lambda: (torch.randn(16, 8), torch.randn(16, 2)), 4, runtime_dir, True, watched=monitors.append
    )
    assert held and held[-1] == {"0": False, "1": True, "2": False, "3": False, "4.fc": False, "4.act": False}
    assert bytes_held[-1][0] == bytes_held[-1][1] == 5 * 16 * 8 * 4  # five outputs of 16 x 8: not "1"
    n = len(cap.outputs[0])
    assert check_against_truth(samples, cap, ["x"] * n, [False] * n) == 4 * n * len(STATS)
