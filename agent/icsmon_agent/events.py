"""What the hooks and the optimizer tell the monitor, and the step boundary they lead to.

:class:`HookEvents` is the half of :class:`~icsmon_agent.monitor.Monitor` that training calls
without knowing it: the root forward's start and end (:mod:`.capture`), the backward's end
(:mod:`.sample`), the optimizer step hook, and the boundary where a sampled step becomes a sample.
Every entry point catches everything and counts it (:meth:`HookEvents.fault`). The monitor's public
half (``step``, ``pause``, ``close``, the lifecycle) is in :mod:`.monitor`.
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .actions import Actions
from .cadence import Cadence
from .capture import Capture
from .guard import LossGuard
from .outlet import Outlet
from .sample import Early, Grads, Pending, Sampler, when_backward_ends
from .scaler import ScalerWatch, fp16_autocast
from .steps import StepMarks
from .updates import local

MAX_FAULTS = 50
#: With this many offload jobs still queued (the thread starved of CPU), a step goes unsampled.
#: A sample queues three (its reductions, its activation figures, its finish): about 8 samples.
MAX_QUEUED_JOBS = 24
#: A rising or non-finite loss has this many next steps sampled, at most once per ``HURRY_COOLDOWN``
#: steps (a healthy run's heavy-tailed losses cost a burst of samples now and then, no more).
HURRY_STEPS = 16
HURRY_COOLDOWN = 256


class HookEvents:
    """The monitor's state for the step under way, and what the hooks do with it (set up by
    :class:`~icsmon_agent.monitor.Monitor`, which is one of these)."""

    model: nn.Module
    every: int | None
    errors: int
    skipped: int
    _closed: bool
    _paused: bool
    _step: int
    _samples: int
    _eval_forward: bool
    _in_batch: bool
    _spent: float
    _forward_t0: float | None
    _cadence: Cadence
    _sampler: Sampler | None
    _pending: Pending | None
    _early: Early | None
    _grads: Grads | None
    _marks: StepMarks
    _warned: set[str]
    _skipped_step: int
    _outlet: Outlet | None
    _actions: Actions
    _guard: LossGuard
    _scaler: ScalerWatch
    _scale_version: int | None
    _applied: torch.Tensor | None
    _step_loss: bool
    _hurry_until: int
    _calm_from: int
    _model_loss: torch.Tensor | None
    _model_loss_src: Any
    _capture: Capture

    def close(self) -> None:
        raise NotImplementedError  # the monitor's: detach, send the last sample, say goodbye

    # ------------------------------------------------------------------ events from the hooks

    def begin_batch(self) -> None:
        """A framework's training step begins (Lightning's ``on_train_batch_start``): it stands for
        the model's forward, which a ``training_step`` may never call. Until :meth:`end_batch`, the
        model's own forward hooks stand down: one forward a micro-batch, whichever calls it."""
        if self._closed:
            return
        self._in_batch = False
        self.forward_started()
        self._in_batch = True

    def end_batch(self, loss: Any) -> None:
        """The training step's forward is over; ``loss`` goes backward next (``on_before_backward``)."""
        if self._in_batch:
            self._in_batch = False
            self.forward_ended(loss)

    def forward_started(self) -> None:
        """The model's own forward begins (its eager pre-hook, also under ``torch.compile``)."""
        if self._in_batch:
            return
        if not (torch.is_grad_enabled() and self.model.training):
            self._eval_forward = True  # an evaluation pass: never sampled, never a step
            return
        self._eval_forward = False
        if self._capture.building:
            if fp16_autocast(self.model):
                self._scaler.search_heap()
            self._scaler.look(sys._getframe(1))
        if self._scaler_skipped():
            self._boundary({}, defer=False)
        ends, announce = self._marks.forward_begins(self._step)
        if announce:
            self._warn(
                "forward-steps",
                "icsmon: no optimizer.step() or mon.step() seen (a compiled optimizer step is not "
                "seen: call mon.step() after it); each training forward counts as a step",
            )
            if self._outlet is not None:
                self._outlet.event("forward_steps", self._step, self.errors)
        if ends:
            self._boundary({}, defer=False)
        self._marks.counted()
        capture = self._capture
        capture.new_forward()
        if not capture.captured:
            # Decided again here, not only at the step boundary: a viewer may have joined since,
            # or the job paused.
            capture.set_armed(self._should_sample())
        if self._forward_t0 is None:
            self._forward_t0 = self._cadence.clock()
        if self._pending is not None:
            self._flush_pending()
            self._update_hooks()

    def _scaler_skipped(self) -> bool:
        """Whether the step just ended without an optimizer step because the loss scaler skipped
        it: its update() ran (once a step) since the last forward, and no step was marked since."""
        version, self._scale_version = self._scale_version, self._scaler.version()
        marks = self._marks
        return (
            marks.source in ("optimizer", "unknown")
            and bool(marks.forwards)
            and marks.backward_seen
            and version is not None
            and version != self._scale_version
        )

    def forward_ended(self, output: Any) -> None:
        """The model's own forward returned ``output`` (eagerly, also under ``torch.compile``)."""
        if self._eval_forward or self._in_batch:
            return
        started = time.perf_counter()
        if not self._step_loss and isinstance(output, Mapping):
            # A model that returns its loss (Hugging Face's ModelOutput): the step's own loss
            # tensor, checked each step when the script hands none to step().
            loss = output.get("loss")
            if isinstance(loss, torch.Tensor) and loss.numel() == 1:
                self._check_loss(loss, self._step)
                if self._model_loss is None:  # the step's first micro-batch, as its figures are
                    self._model_loss = loss.detach()
                self._model_loss_src = loss
        capture = self._capture
        sampled = capture.armed
        capture.end_forward(output)
        if capture.building:
            if capture.layers:
                self._finish_table()
            elif capture.layer_calls == 0:
                # The forward ran, none of its layers' hooks did: a graph compiled before watch().
                self._warn(
                    "compiled-before",
                    "icsmon: the model's forward ran without calling any layer hook: it was compiled "
                    "before watch(), and that graph has no hooks. Call icsmon_agent.watch() before the "
                    "first compiled call, or torch._dynamo.reset() right after watch(); nothing is sampled",
                )
            elif capture.hits == 0 and capture.step_hits == 0 and self._marks.forwards:
                self._warn(
                    "nofloat", "icsmon: no watched layer returned a floating-point tensor; nothing to show"
                )
        elif capture.captured and self._early is None and self._sampler is not None and capture.offload:
            self._early = Early(capture.records)
            self._sampler.finish_early(self._early)
        # A forward ends a step only once a backward followed it (steps from forwards), and a
        # sample's gradients are taken when its backward ends: one callback for both.
        if self._marks.by_forwards or (sampled and self._sampler is not None):
            when_backward_ends(output, self._backward_ended, self.fault)
        self._spent += time.perf_counter() - started

    def fault(self, where: str, exc: BaseException) -> None:
        self.errors += 1
        self._warn(
            f"fault:{where}", f"icsmon: {where} failed ({type(exc).__name__}: {exc}); training continues"
        )
        if self.errors >= MAX_FAULTS and not self._closed:
            self._warn("detach", f"icsmon: {self.errors} faults; detaching from the model")
            with contextlib.suppress(Exception):
                self.close()

    def offload_fault(self, exc: BaseException) -> None:
        """A fault on the offload thread: counted and warned once; detaching is the training side's."""
        self.errors += 1
        self._warn(
            "fault:offload", f"icsmon: offload failed ({type(exc).__name__}: {exc}); training continues"
        )

    def spend(self, seconds: float) -> None:
        self._spent += seconds

    # ------------------------------------------------------------------ the backward's end

    def _backward_ended(self) -> None:
        """Before the user's clipping, after every micro-batch (the last before the optimizer wins)."""
        self._marks.backward_ended()
        if self._closed or self._sampler is None or not self._capture.armed:
            return
        started = time.perf_counter()
        try:
            self._grads = self._sampler.take_grads()
        except Exception as exc:
            self.fault("backward", exc)
        self._spent += time.perf_counter() - started

    # ------------------------------------------------------------------ step boundaries

    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # Inside a compiled train step this hook is traced: nothing of ours joins the graph there,
        # and mon.step() after the compiled call marks the step (capture.py).
        if torch.compiler.is_compiling() or self._closed:
            return
        try:
            self._scaler.look(sys._getframe(1))
            if self._grads is not None and self._grads.scale is None:  # the scale before update()
                self._grads.scale = self._scaler.scale()
            owns = self._marks.owns(optimizer)
            if owns and self._capture.armed and self._sampler is not None and self._applied is None:
                self._applied = self._sampler.applied_norm()
            if not self._marks.optimizer_step(optimizer):
                self._scaler.other_optimizer_stepped()
                return
            # Steps the scaler skipped while nothing of ours was hooked: counted, unsampled.
            self._step += self._scaler.steps_unseen(self._step)
            if self._marks.new_leader and self._outlet is not None:  # viewers' hints name it
                self._outlet.event("optimizer", self._step, self.errors, type=self._marks.new_leader)
                self._marks.new_leader = ""
            self._boundary({}, defer=True)
        except Exception as exc:
            self.fault("optimizer", exc)

    def _should_sample(self) -> bool:
        capture = self._capture
        if capture.building:
            return True
        if self._outlet is None or self._paused:
            return False
        offload = capture.offload
        if offload is not None and offload.pending > MAX_QUEUED_JOBS:
            if self._skipped_step != self._step:
                self._skipped_step = self._step
                self.skipped += 1
            return False
        return self._step < self._hurry_until or self._cadence.due(self._step)

    def _update_hooks(self) -> None:
        """The hooks are needed while sampling, to flush a held sample, or to find the steps."""
        capture = self._capture
        capture.set_hooks(
            not self._closed
            and (capture.building or capture.armed or self._pending is not None or self._marks.by_forwards)
        )

    def _boundary(self, scalars: dict[str, Any], *, defer: bool) -> None:
        capture = self._capture
        if self._pending is not None:  # no eager forward flushed it (a forward compiled within a step)
            self._flush_pending()
        pending: Pending | None = None
        first = False
        if capture.has_held:  # outputs of a forward whose end was not seen
            capture.drain_sink()
            capture.dispatch(None)
        if capture.building and capture.layers:  # layers called outside the model's forward
            self._finish_table()
        if capture.armed and self._sampler is not None and capture.step_hits:
            first = self._samples == 0
            started = time.perf_counter()
            lr = self._marks.learning_rate()
            if lr is not None and "lr" not in scalars:  # the user's own "lr" wins
                scalars = {**scalars, "lr": lr}
            if self._model_loss is not None and "loss" not in scalars:  # the user's own loss wins
                scalars = {**scalars, "loss": self._model_loss}
            if self._applied is not None:
                scalars = {**scalars, "grad_norm_applied": self._applied}
            pending = self._sampler.take(self._step, scalars, self._early, self._grads)
            self._spent += time.perf_counter() - started
            offload = capture.offload
            # The other threads' work is the job's CPU too: the offload's reductions, the rules.
            busy = (offload.busy_s if offload is not None else 0.0) + self._outlet_busy()
            self._cadence.sampled(self._forward_t0 or self._cadence.clock(), self._spent, busy, first)
            self._samples += 1
            self._spent = 0.0
        self._forward_t0 = None
        self._step += 1
        self._step_loss = False
        self._model_loss = self._model_loss_src = None
        self._applied = None
        self._marks.boundary()
        self._early = None
        self._grads = None
        capture.new_step()
        capture.set_armed(self._should_sample())
        if pending is not None:
            self._pending = pending
            if not defer:
                self._flush_pending()
        self._update_hooks()
        if first:
            self._spent = 0.0

    def _outlet_busy(self) -> float:
        return self._outlet.publisher.busy_s if self._outlet is not None else 0.0

    def _flush_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None or self._sampler is None:
            return
        started = time.perf_counter()
        try:
            self._sampler.flush(pending)
        finally:
            self._spent += time.perf_counter() - started  # counted toward the next sample's cost

    def _finish_table(self) -> None:
        capture = self._capture
        if self._outlet is None:
            return
        capture.finish_table()
        self._sampler = Sampler(capture, self._outlet, self._warn, self._scaler)
        sharded = any(local(p) is not p for p in self.model.parameters())
        self._outlet.schema(capture.table(), self.every, sharded=sharded)

    def _check_loss(self, loss: Any, step: int, *, is_loss: bool = True) -> None:
        """Every step's loss, sampled or not (:mod:`.guard`): a NaN/Inf raises ``stop_on`` at once;
        a NaN/Inf or a sharply rising loss has the next steps sampled, so the rules see it grow."""
        for verdict in self._guard.check(step, loss, is_loss=is_loss):
            if verdict.nonfinite:
                self._actions.stop_for_loss(verdict.step)
            if self._step >= self._calm_from:
                self._hurry_until = self._step + 1 + HURRY_STEPS
                self._calm_from = self._step + HURRY_COOLDOWN

    # ------------------------------------------------------------------ plumbing

    def _warn(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        with contextlib.suppress(Exception):
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _on_publisher_error(self, where: str, exc: BaseException) -> None:
        self._warn(f"publisher:{where}", f"icsmon: publisher {where} failed ({type(exc).__name__}: {exc})")
