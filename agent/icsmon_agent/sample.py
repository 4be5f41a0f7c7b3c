"""A sampled step's journey after its forward: gradient norms, the finish, the hand-off.

The flow, in one place (see also ``docs/design.md``):

1. The layer hooks (:mod:`.capture`) reduce each output on its device (GPU) or hold it for the
   offload thread (CPU), which reduces a forward's outputs in one call and then finishes their
   activation figures early (:class:`Early`), beside the backward.
2. When the backward finishes (or at the step boundary if no backward was seen), the gradients are
   taken (:meth:`Sampler.take_grads`): their norms now, or, when the job is known to replace its
   gradients rather than change them in place, a reference the offload thread reads later.
3. At the step boundary :meth:`Sampler.take` makes a :class:`Pending` sample; :meth:`Sampler.flush`
   finishes it (the offload thread for CPU models) and hands it to the outlet, for the publisher
   thread: one non-blocking copy to pinned memory on a side stream for CUDA, whose event the
   publisher waits on.
"""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .capture import HOLD_LIMIT, Capture, Layer
from .finish import Finalizer
from .grads import GradNorms, grad_norms
from .layers import tensors_in
from .outlet import Outlet
from .protocol import STAT_INDEX
from .publisher import Work
from .reduce import Record
from .scaler import ScalerWatch, unscaled
from .updates import UpdateRatio, local


def when_backward_ends(
    output: Any, callback: Callable[[], None], fault: Callable[[str, BaseException], None]
) -> None:
    """Call ``callback`` when the backward through ``output`` has finished, after the callbacks
    queued during it (DDP's, which writes the averaged gradients). Nothing is kept on the model:
    the hook lives on this forward's autograd graph and goes with it."""
    tensor = next((t for t in tensors_in(output) if t.grad_fn is not None), None)
    if tensor is None or tensor.grad_fn is None:
        return
    engine = torch.autograd.Variable._execution_engine

    def requeue() -> None:
        try:
            engine.queue_callback(callback)
        except Exception:
            callback()

    def began(grad_outputs: Any) -> None:
        try:
            engine.queue_callback(requeue)
        except Exception as exc:
            fault("backward", exc)

    tensor.grad_fn.register_prehook(began)


def records_device(records: list[Record | None]) -> torch.device:
    """Where a sample's figures are finished: the device of its first layer's reductions."""
    return next((r.device for r in records if r is not None), torch.device("cpu"))


def layer_parameters(model: nn.Module, layers: list[Layer]) -> list[tuple[int, nn.Parameter]]:
    """Each layer's parameters, by layer index; and those no layer holds (a block's layer-scale
    gamma, fused expert weights, a bare ``nn.Parameter``, a module that is no layer: T5's relative
    position bias), counted in the last layer called below their owner, or below the owner's
    nearest ancestor that has one: its gradient norm and update ratio cover them."""
    slot = {id(layer.module): i for i, layer in enumerate(layers) if layer.call == 0}
    out = [(i, p) for i, layer in enumerate(layers) if layer.call == 0 for p in layer.module.parameters()]
    seen = {id(p) for _, p in out}
    modules = dict(model.named_modules(remove_duplicate=True))
    for name, module in modules.items():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        if not own:
            continue
        parts = name.split(".") if name else []
        for depth in range(len(parts), -1, -1):  # the owner, then its ancestors up to the model
            owner = modules.get(".".join(parts[:depth]))
            below = [slot[id(m)] for m in owner.modules() if id(m) in slot] if owner is not None else []
            if below:
                out += [(max(below), p) for p in own]
                seen.update(id(p) for p in own)
                break
    return out


@dataclass
class Early:
    """A sample's activation figures, finished on the offload thread right after its reductions.

    Why early: finished at the step's end instead, that work ran beside the next forward, the
    training thread's most Python-heavy phase, and both slowed each other over the GIL. Beside the
    backward, which holds the GIL least, it costs the training thread almost nothing.
    """

    records: list[Record | None]
    figures: torch.Tensor | None = None  # float64, from Finalizer.activations; None until done


@dataclass
class Grads:
    """A sample's gradients: their norms, or references (and versions) for the offload thread."""

    norms: GradNorms | None = None
    held: tuple[list[tuple[int, torch.Tensor]], list[int]] | None = None
    scale: torch.Tensor | None = None  # the loss scaler's scale they carry (scaler.py)


@dataclass
class Pending:
    step: int
    t_measured: float
    scalars: dict[str, Any]
    records: list[Record | None]  # filled in by the offload thread until its finishing job runs
    grads: Grads = field(default_factory=Grads)
    figures: torch.Tensor | None = None  # None: finished on the offload thread
    early: Early | None = None
    update: torch.Tensor | None = None  # each layer's update-to-weight ratio (updates.py)


class Sampler:
    """Takes, finishes and hands off the samples of one layer table."""

    def __init__(
        self,
        capture: Capture,
        outlet: Outlet,
        warn: Callable[[str, str], None],
        scaler: ScalerWatch,
    ) -> None:
        self._capture = capture
        self._outlet = outlet
        self._warn = warn
        self._scaler = scaler
        self.finalizer = Finalizer(len(capture.layers))
        self._params = layer_parameters(capture.model, capture.layers)
        # Whether the offload thread may read the gradients after the step ("hold"), or their
        # norms are taken at once ("inline"); "learn" until a later sample has shown that the job
        # replaces its gradients (zero_grad(set_to_none=True)) rather than changing them in place
        # (clipping, accumulation, zeroing), which would change them under the reader.
        self.grad_mode = "learn"
        # The probed gradients: held until the step's end (were they changed in place before the
        # optimizer stepped?), then weakly: one sample's must not be kept alive until the next.
        self._grad_probe: list[tuple[nn.Parameter, weakref.ref[torch.Tensor], int]] | None = None
        self._probe_held: list[torch.Tensor] = []
        self._side_stream: Any = None
        self._relu_rows: dict[torch.device, torch.Tensor] = {}  # which rows are ReLU-family, per device
        self._updates = UpdateRatio(self._params, len(capture.layers))

    def take_grads(self, *, scaled: bool = True) -> Grads:
        """This step's gradients, now: at the end of the backward, before the user's clipping.
        ``scaled``: whether a loss scaler's scale is still in them (not once its ``step`` ran)."""
        offload = self._capture.offload
        # Under FSDP2 each rank's own shard: a collective here would hang, the ranks sample
        # different steps (README, "Works with").
        grads = [(i, local(p.grad)) for i, p in self._params if p.grad is not None]
        if offload is not None and self.grad_mode == "learn":
            self._learn_grad_mode()
        nbytes = sum(g.nbytes for _, g in grads)
        scale = self._scaler.scale() if scaled else None
        if (
            offload is not None
            and self.grad_mode == "hold"
            and offload.outstanding + nbytes <= HOLD_LIMIT
            and not any(g.is_inference() for _, g in grads)
        ):
            return Grads(held=(grads, [g._version for _, g in grads]), scale=scale)
        return Grads(norms=grad_norms(grads, records_device(self._capture.records)), scale=scale)

    def _learn_grad_mode(self) -> None:
        """Probe at one sample, judge at the next: were the probed gradients replaced, untouched?"""
        probe, self._grad_probe = self._grad_probe, None
        if probe is None:
            probed = [
                (p, p.grad) for _, p in self._params if p.grad is not None and not p.grad.is_inference()
            ]
            self._grad_probe = [(p, weakref.ref(g), g._version) for p, g in probed] or None
            # Held through the step: a clip or a scaler's unscale_ before the optimizer changes them
            # in place, and a zero_grad(set_to_none=True) after it would hide that.
            self._probe_held = [g for _, g in probed]
            return
        # Replaced, and untouched since: a gradient freed since was replaced and is untouched.
        replaced = all(p.grad is not (g := ref()) and (g is None or g._version == v) for p, ref, v in probe)
        self.grad_mode = "hold" if replaced else "inline"

    def _probe_step_ended(self) -> None:
        """The probed step ended: gradients changed in place during it rule the holding out."""
        held, self._probe_held = self._probe_held, []
        probe = self._grad_probe
        if (
            held
            and probe is not None
            and any(g._version != v for (_, _, v), g in zip(probe, held, strict=True))
        ):
            self.grad_mode = "inline"
            self._grad_probe = None

    def applied_norm(self) -> torch.Tensor | None:
        """At ``optimizer.step()``: the first layer's gradient norm as the optimizer got it (after
        clipping and unscaling), a device scalar; the rules compare it with the backward's."""
        first = next((i for i, p in self._params if p.grad is not None), None)
        if first is None:
            return None
        grads = [(i, local(p.grad)) for i, p in self._params if i == first and p.grad is not None]
        norms = grad_norms(grads, records_device(self._capture.records))
        return None if norms is None else norms[1].float().norm()

    def take(self, step: int, scalars: dict[str, Any], early: Early | None, grads: Grads | None) -> Pending:
        """The step's sample: figures now on a device (launches only), or later on the offload
        thread (its reductions may still run)."""
        records = self._capture.records
        self._probe_step_ended()
        # Read at the step's end (no backward end was seen: a forward compiled within a bigger
        # function), after a scaler's step has unscaled them in place.
        grads = grads or self.take_grads(scaled=False)
        pending = Pending(step, time.time(), dict(scalars), records, grads, early=early)
        if grads.norms is not None:
            self._unscale(pending)
        pending.update = self._updates.take(step)
        if self._capture.offload is None:
            pending.figures = self.finalizer.figures(records, pending.grads.norms, records_device(records))
        return pending

    def flush(self, pending: Pending) -> None:
        offload = self._capture.offload
        if pending.figures is None and offload is not None:
            offload.submit(functools.partial(self._finish_offloaded, pending))
        else:
            self._hand_off(pending)

    @staticmethod
    def _unscale(pending: Pending) -> None:
        """A loss scaler's gradients: their norms unscaled, and its scale and skip on the sample."""
        grads = pending.grads
        if grads.norms is None or grads.scale is None:
            return
        layers, norms = grads.norms
        norms, skipped = unscaled(norms, grads.scale)
        grads.norms = (layers, norms)
        pending.scalars.setdefault("loss_scale", grads.scale)
        pending.scalars.setdefault("scaler_skipped", skipped)

    def finish_early(self, early: Early) -> None:
        """Queue a forward's activation figures on the offload thread, after its reductions."""
        if self._capture.offload is not None:
            self._capture.offload.submit(functools.partial(self._finish_activations, early))

    def _finish_activations(self, early: Early) -> None:
        with torch.no_grad():  # grad mode is per thread: this one's is on
            early.figures = self.finalizer.activations(early.records, records_device(early.records))

    def _finish_offloaded(self, pending: Pending) -> None:
        """On the offload thread, after the step's reductions: the batched figures, then publish."""
        with torch.no_grad():  # gradients made with create_graph require grad: build no graph here
            grads = pending.grads
            if grads.held:
                held, versions = grads.held
                norms = grad_norms(held, torch.device("cpu"))
                if all(g._version == v for (_, g), v in zip(held, versions, strict=True)):
                    grads.norms = norms
                    self._unscale(pending)
                else:  # changed in place after all: take them at once from now on
                    self.grad_mode = "inline"
            records = pending.records
            if not any(r is not None for r in records) and grads.norms is None:
                return  # every layer of the step changed in place under us: nothing to show
            early = pending.early.figures if pending.early is not None else None
            if early is None:  # no forward end was seen, or its early job failed
                early = self.finalizer.activations(records, records_device(records))
            pending.figures = self.finalizer.with_grads(early, grads.norms)
            self._hand_off(pending)

    def _only_where_meant(self, figures: torch.Tensor) -> torch.Tensor:
        """``dead_frac`` means dead ReLU units: absent (NaN) for other layers, and for a layer with
        NaN/Inf in its output, whose units then never read as positive. ``peak_ratio`` is derived
        here from min, max and std."""
        dead, nonfinite = STAT_INDEX["dead_frac"], STAT_INDEX["nonfinite"]
        relu = self._relu_rows.get(figures.device)
        if relu is None:
            kinds = [layer.info.kind == "relu" for layer in self._capture.layers]
            relu = self._relu_rows[figures.device] = torch.tensor(kinds, device=figures.device)
        keep = relu & (figures[:, nonfinite] == 0)
        figures[:, dead] = torch.where(keep, figures[:, dead], torch.nan)
        # max |activation| over the std: outliers ("massive activations"); NaN for a constant output.
        peak = torch.maximum(figures[:, STAT_INDEX["min"]].abs(), figures[:, STAT_INDEX["max"]].abs())
        std = figures[:, STAT_INDEX["std"]]
        figures[:, STAT_INDEX["peak_ratio"]] = torch.where(std > 0, peak / std, torch.nan)
        return figures

    def _hand_off(self, pending: Pending) -> None:
        figures = pending.figures
        assert figures is not None
        device = figures.device
        names: list[str] = []
        tensors: list[torch.Tensor] = []
        host_scalars: dict[str, float | None] = {}
        for key, value in pending.scalars.items():
            if isinstance(value, torch.Tensor):
                if value.numel() == 0 or value.is_complex():
                    continue
                names.append(key)
                tensors.append(value.detach().reshape(-1)[:1].to(device=device, dtype=torch.float32))
            else:
                try:
                    host_scalars[key] = float(value)
                except (TypeError, ValueError, OverflowError):
                    # One scalar we cannot take (10**400, a string) is left out, not the sample.
                    self._warn(f"scalar:{key}", f"icsmon: scalar {key!r} is not a float; it is left out")
        figures = self._only_where_meant(figures)
        if pending.update is not None:
            figures[:, STAT_INDEX["update_ratio"]] = pending.update.to(figures.device, figures.dtype)
        flat = torch.cat([figures.reshape(-1), *tensors])
        ready = None
        if device.type == "cuda":
            # One non-blocking copy into pinned memory on a side stream; the publisher waits on the event.
            host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            if self._side_stream is None:
                self._side_stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
            stream = self._side_stream
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                host.copy_(flat, non_blocking=True)
                ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
                ready.record(stream)
            flat.record_stream(stream)
        else:
            host = flat if flat.device.type == "cpu" else flat.to("cpu")
        n_layers, n_stats = figures.shape
        self._outlet.send(
            Work(pending.step, pending.t_measured, host, ready, n_layers, n_stats, names, host_scalars)
        )
