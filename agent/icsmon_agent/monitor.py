"""``watch(model)`` and the :class:`Monitor` that lives inside the training process.

Rule one of an embedded agent: it never hurts the host. Every entry point from training (hooks,
``step``, the optimizer hook, the backward callback) catches everything, counts it and warns once;
after too many faults the monitor detaches itself. Nothing here waits on the network: figures go to
the publisher thread through a bounded queue.

Where a step ends: :mod:`.steps`. Which calls are read: :mod:`.capture`. A sample's way from the
forward's end to the wire: :mod:`.sample`. In the optimizer mode a sample is held until the next
forward (or ``step()``/``close()``), so a ``step(loss=...)`` right after ``optimizer.step()``
attaches its loss to the same sample.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import os
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .actions import Actions
from .alerts import config as alert_config
from .alerts.judge import Judge
from .alerts.model import Alert
from .cadence import Cadence
from .capture import Capture
from .events import HookEvents
from .guard import LossGuard
from .layers import Selector, candidate_modules
from .outlet import Identity, Outlet, Record
from .sample import Early, Grads, Pending, Sampler
from .scaler import ScalerWatch
from .steps import StepMarks
from .updates import local

#: How long ``close()`` waits for the offload thread to finish the last samples.
CLOSE_WAIT_S = 2.0


def _unwrap(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped: its calls are where the hooks fire."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


class Monitor(HookEvents):
    """Hooks a model's layers and streams their figures. Create with :func:`watch`."""

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str | None = None,
        every: int | None = None,
        endpoint: str | None = None,
        include: Selector | Iterable[Selector] | None = None,
        exclude: Selector | Iterable[Selector] | None = None,
        runtime_dir: str | os.PathLike[str] | None = None,
        record: Record = None,
        thresholds: alert_config.Thresholds | None = None,
        stop_on: Iterable[str] = (),
        on_alert: Callable[[Alert], object] | None = None,
        quiet: bool | None = None,
    ) -> None:
        model = _unwrap(model)
        self.model = model
        self.who = Identity.from_environment(name)
        self.every = every
        self.errors = 0
        self.skipped = 0  # steps left unsampled because the offload thread was far behind
        self._closed = False
        self._paused = False
        self._step = 0
        self._samples = 0
        self._eval_forward = False  # the forward under way is not training (no_grad, eval)
        self._in_batch = False  # a framework's training step stands for the forward (begin_batch)
        self._spent = 0.0  # seconds of our own work on the current sampled step
        self._forward_t0: float | None = None  # when this step's (first) forward began
        self._cadence = Cadence(every)
        self._sampler: Sampler | None = None
        self._pending: Pending | None = None
        self._early: Early | None = None  # this step's activation figures, being finished early
        self._grads: Grads | None = None  # this step's gradients, taken when its backward ended
        self._marks = StepMarks(model)
        self._warned: set[str] = set()
        self._optimizer_handle: Any = None
        self._skipped_step = -1
        self._outlet: Outlet | None = None
        self._atexit: Any = None
        self._actions = Actions.from_environment(quiet=quiet, on_alert=on_alert, stop_on=stop_on)
        self._guard = LossGuard()
        self._scaler = ScalerWatch()  # the job's loss scaler, once seen
        self._scale_version: int | None = None  # its update() count at the last training forward
        self._applied: torch.Tensor | None = None  # the gradient the optimizer got (rules: clipped to 0)
        self._step_loss = False  # this step's loss was given to step() (a model's own is the fallback)
        self._hurry_until = -1  # every step before this one is sampled, whatever the cadence says
        self._calm_from = 0  # a rising loss hurries the sampling again from this step on
        self._model_loss: torch.Tensor | None = None  # the loss the model itself returned this step
        self._model_loss_src: Any = None  # ... as it returned it (a step(loss=) of it is not checked again)

        modules = candidate_modules(model, include, exclude)
        self._capture = Capture(model, modules, self)
        if not modules:
            self._warn(
                "empty",
                f"icsmon: {type(model).__name__} has no layer to watch; training continues unmonitored",
            )
            return
        try:
            self._outlet = Outlet(
                self.who,
                endpoint,
                runtime_dir,
                self._on_publisher_error,
                record,
                judge=Judge(thresholds or self._thresholds()),
                actions=self._actions,
            )
        except Exception as exc:
            self._warn("setup", f"icsmon: cannot publish ({exc}); training continues unmonitored")
            return

        try:
            self._capture.set_hooks(True)  # the first training forward builds the layer table
            self._optimizer_handle = register_optimizer_step_post_hook(self._on_optimizer_step)
            self._outlet.event("started", self._step, self.errors)
            self._atexit = functools.partial(_close_at_exit, weakref.ref(self))
            atexit.register(self._atexit)
            self._say_hello(len(modules))
        except Exception as exc:
            self._warn("setup", f"icsmon: cannot hook the model ({exc}); training continues unmonitored")
            self.close()

    # ------------------------------------------------------------------ public API

    def step(self, loss: Any = None, **scalars: Any) -> None:
        """Mark the end of a training step; ``loss`` and any scalars travel with the sample.

        Tensors are passed as they are (no ``.item()``: no host sync). Call it once a step, after
        ``optimizer.step()``; from the first call on it alone marks the steps.
        """
        if self._closed:
            return
        try:
            # The optimizer hook may have closed this step already: the loss is still this step's.
            closed = self._outlet is not None and self._marks.user_step()
            if loss is not None:
                if loss is not self._model_loss_src:  # the model's own, checked when it returned
                    self._check_loss(loss, self._step - 1 if closed else self._step)
                self._step_loss = True
            if self._outlet is None:
                return  # unpublished, the loss is still looked at: stop_on holds
            values = dict(scalars)
            if loss is not None:
                values["loss"] = loss
            if closed:  # this step is already closed: do not count it twice
                if self._pending is not None:
                    self._pending.scalars.update(values)
                    self._flush_pending()
                self._capture.set_armed(self._should_sample())  # decided again: now is the end
                self._update_hooks()
                return
            self._boundary(values, defer=False)
        except Exception as exc:
            self.fault("step", exc)

    def check_parameters(self) -> None:
        """Look at the model's parameters for NaN/Inf now (one pass over them, no host sync on a
        GPU): one found raises ``should_stop`` for ``stop_on=("nonfinite",)`` like a NaN loss. For
        a loop whose loss the agent never sees; the Hugging Face callback calls it after each
        optimizer step when asked to stop on ``nonfinite``."""
        if self._closed:
            return
        try:
            with torch.no_grad():
                # A sharded parameter's own shard: what this rank holds says whether it went NaN.
                params = [q for q in (local(p.detach()) for p in self.model.parameters()) if q.numel()]
                if not params:
                    return
                total = torch.stack([n.float() for n in torch._foreach_norm(params)]).sum()
            self._check_loss(total, self._step, is_loss=False)
        except Exception as exc:
            self.fault("check_parameters", exc)

    def pause(self) -> None:
        """Stop sampling from the next step on, until :meth:`resume`; viewers are told.

        The layer hooks come off at the step's end, so a paused step costs what an unsampled one
        does. A step already being sampled is finished and sent, and the first training forward
        after ``watch()`` builds the layer table (and is sent) whatever the state.
        ``benchmarks/overhead.py`` pauses a watched model to time it bare on the same copy.
        """
        if self._closed or self._paused:
            return
        try:
            self._paused = True
            self._cadence.pause()
            if self._outlet is not None:
                self._outlet.event("paused", self._step, self.errors)
        except Exception as exc:
            self.fault("pause", exc)

    def resume(self) -> None:
        """Sample again after :meth:`pause` (see :meth:`Cadence.resume` for when)."""
        if self._closed or not self._paused:
            return
        try:
            self._paused = False
            self._cadence.resume()
            if not self._capture.captured:  # the next step need not wait for a boundary to be sampled
                self._capture.set_armed(self._should_sample())
                self._update_hooks()
            if self._outlet is not None:
                self._outlet.event("resumed", self._step, self.errors)
        except Exception as exc:
            self.fault("resume", exc)

    @property
    def paused(self) -> bool:
        return self._paused

    def close(self) -> None:
        """Detach every hook, send the last sample and a closing event, remove the discovery file."""
        if self._closed:
            return
        last_step = self._marks.by_forwards and self._marks.forwards
        skipped = False
        with contextlib.suppress(Exception):
            skipped = self._scaler_skipped()
            if self._marks.source == "optimizer":  # the last steps skipped by the scaler, unhooked
                self._step += max(0, self._scaler.steps_unseen(self._step) - skipped)
        if (last_step or skipped) and not self._paused:
            with contextlib.suppress(Exception):
                self._boundary({}, defer=False)  # the last forward was a step: it is sent too
        if self._capture.has_held and not self._samples:
            self._warn(
                "compiled-step",
                "icsmon: the model's forward ran only inside a compiled function that also steps the "
                "optimizer, and mon.step() was never called: nothing was sampled. Call mon.step() "
                "after the compiled train step",
            )
        self._closed = True
        with contextlib.suppress(Exception):
            self._capture.remove_hooks()
        if self._optimizer_handle is not None:
            with contextlib.suppress(Exception):
                self._optimizer_handle.remove()
            self._optimizer_handle = None
        with contextlib.suppress(Exception):
            self._flush_pending()
        offload = self._capture.offload
        if offload is not None:
            # The last samples are still being finished there; they go out before the closing event.
            with contextlib.suppress(Exception):
                offload.close(CLOSE_WAIT_S)
        if self._outlet is not None:
            with contextlib.suppress(Exception):
                self._outlet.event("closing", self._step, self.errors)
            self._outlet.close()
        self._actions.close()
        if self._atexit is not None:
            atexit.unregister(self._atexit)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> Any:
        # A script that pickles its whole training state must not drag our threads along.
        raise TypeError("an icsmon Monitor lives in its process and is not pickled; pickle the model alone")

    @property
    def run(self) -> str:
        return self.who.run

    @property
    def name(self) -> str:
        return self.who.name

    @property
    def rank(self) -> int:
        return self.who.rank

    @property
    def endpoint(self) -> str | None:
        return self._outlet.endpoint if self._outlet is not None else None

    @property
    def dropped(self) -> int:
        """Samples dropped on this side because the publisher thread fell behind (counted, sent)."""
        return self._outlet.publisher.dropped if self._outlet is not None else 0

    @property
    def nonfinite_step(self) -> int | None:
        """The first step whose loss was NaN/Inf (every step's is checked), or the first sampled
        step whose layer figures held NaN/Inf, once it was encoded."""
        seen = [self._guard.first_nonfinite]
        if self._outlet is not None:
            seen.append(self._outlet.publisher.nonfinite_step)
        return min((s for s in seen if s is not None), default=None)

    @property
    def should_stop(self) -> bool:
        """True once an alert of a rule named in ``stop_on`` fired in the job (``"nonfinite"``: also
        a NaN/Inf loss given to :meth:`step` or returned by the model); read it once a step and
        stop the loop. The job's own judgement: no viewer needed."""
        return self._actions.stop is not None

    @property
    def stop_reason(self) -> Alert | None:
        """The alert that raised :attr:`should_stop` (None while it is False)."""
        return self._actions.stop

    @property
    def history(self) -> str | None:
        """The file where the job keeps its history (``icsmon replay PID`` plays it), if any."""
        kept = self._outlet.kept if self._outlet is not None else None
        return str(kept.recording) if kept is not None else None

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self._capture.layers]

    @property
    def steps(self) -> int:
        return self._step

    @property
    def watching(self) -> bool:
        return self._outlet is not None and self._outlet.watching

    @property
    def compiled(self) -> bool:
        """Whether a compiled forward of the model was seen (see :mod:`icsmon_agent.capture`)."""
        return self._capture.compiled

    # ------------------------------------------------------------------ the job's own judgement

    def _thresholds(self) -> alert_config.Thresholds:
        """The thresholds in force where the job runs (``icsmon.toml``); a bad file costs a warning."""
        try:
            return alert_config.load()
        except alert_config.ConfigError as exc:
            self._warn("config", f"icsmon: {exc}; judging with the default thresholds")
            return alert_config.Thresholds()

    def _say_hello(self, modules: int) -> None:
        where = f"icsmon attach {self.who.pid}"
        kept = f"; its history: icsmon replay {self.who.pid}" if self.history else ""
        self._actions.say(
            f"watching {modules} modules of {type(self.model).__name__} (run {self.who.run}); "
            f"to look: {where}{kept}"
        )


def _close_at_exit(ref: weakref.ref[Monitor]) -> None:
    monitor = ref()
    if monitor is not None:
        monitor.close()


def watch(
    model: Any,
    *,
    name: str | None = None,
    every: int | None = None,
    endpoint: str | None = None,
    include: Selector | Iterable[Selector] | None = None,
    exclude: Selector | Iterable[Selector] | None = None,
    runtime_dir: str | os.PathLike[str] | None = None,
    record: Record = None,
    thresholds: alert_config.Thresholds | Mapping[str, float] | None = None,
    stop_on: Iterable[str] = (),
    on_alert: Callable[[Alert], object] | None = None,
    quiet: bool | None = None,
) -> Monitor:
    """Watch every layer of ``model`` and publish its figures; see the package docstring.

    ``model`` may be the module ``torch.compile`` returned, or the one it was given, or one that
    will be compiled later: the same layers are watched either way.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"icsmon_agent.watch() needs a torch.nn.Module, got {type(model).__module__}.{type(model).__name__}"
        )
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"every must be a positive integer or None (adaptive), got {every!r}")
    if on_alert is not None and not callable(on_alert):
        raise TypeError(f"on_alert must be callable, got {type(on_alert).__name__}")
    if isinstance(thresholds, Mapping):  # {"explode_jump": 5}: over the defaults and icsmon.toml
        unknown = set(thresholds) - {f.name for f in dataclasses.fields(alert_config.Thresholds)}
        if unknown:
            raise ValueError(f"thresholds: unknown {sorted(unknown)} (`icsmon rules` lists them)")
        thresholds = alert_config.load(overrides=dict(thresholds))
    return Monitor(
        model,
        name=name,
        every=every,
        endpoint=endpoint,
        include=include,
        exclude=exclude,
        runtime_dir=runtime_dir,
        record=record,
        thresholds=thresholds,
        stop_on=stop_on,
        on_alert=on_alert,
        quiet=quiet,
    )
