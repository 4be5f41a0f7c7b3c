"""``watch(model)`` and the :class:`Monitor` that lives inside the training process.

Rule one of an embedded agent: it never hurts the host. Every entry point from training (hooks,
``step``, the optimizer hook, the backward callback) catches everything, counts it and warns once;
after too many faults the monitor detaches itself. Nothing here waits on the network: figures go to
the publisher thread through a bounded queue.

Step boundaries, in the order they are trusted: ``Monitor.step()`` once the user calls it;
otherwise PyTorch's global optimizer step hook (only for optimizers that hold this model's
parameters), so the two lines alone work; with neither (a hand-written update), each training
forward is a step, and the agent says so once. In the optimizer mode the sample is held until the
next forward (or ``step()``/``close()``), so a ``step(loss=...)`` right after ``optimizer.step()``
attaches its loss to the same sample.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import os
import secrets
import socket
import sys
import time
import warnings
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import discovery, protocol
from .cadence import Cadence
from .capture import Capture
from .layers import Selector, candidate_modules, tensors_in
from .publisher import Publisher, default_endpoint
from .sample import Early, Grads, Pending, Sampler

MAX_FAULTS = 50
#: With this many offload jobs still queued (the thread starved of CPU), a step goes unsampled.
#: A sample queues three (its reductions, its activation figures, its finish): about 8 samples.
MAX_QUEUED_JOBS = 24
#: How long ``close()`` waits for the offload thread to finish the last samples.
CLOSE_WAIT_S = 2.0

#: Training forwards counted as steps, with no optimizer step or ``step()`` seen, before the agent
#: says that it counts them so (an accumulating job's first optimizer step may still come).
FORWARD_STEPS_AFTER = 16
#: How the steps are marked: not yet known, ``optimizer.step()``, ``Monitor.step()``, each forward.
StepSource = Literal["unknown", "optimizer", "user", "forward"]


def _default_name() -> str:
    arg0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    if arg0 in ("", "-", "-c", "-m"):
        return "python"
    return Path(arg0).stem or "python"


def _env_int(name: str, default: int) -> int:
    """An integer from the launcher's environment; a malformed one must not stop training."""
    try:
        return int(os.environ.get(name, "") or default)
    except ValueError:
        return default


def _resolve_endpoint(endpoint: str | None, runtime: Path, key: str) -> str:
    if endpoint is None or endpoint == "ipc":
        return default_endpoint(runtime, key)
    if endpoint == "tcp":
        return "tcp://127.0.0.1:*"
    if endpoint.startswith("tcp://") and not endpoint.startswith(
        ("tcp://127.", "tcp://localhost", "tcp://[::1]")
    ):
        warnings.warn(
            f"icsmon: publishing on {endpoint}, beyond loopback: anyone who can reach it can read the figures",
            RuntimeWarning,
            stacklevel=4,
        )
    return endpoint


def _unwrap(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped: its calls are where the hooks fire."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


class Monitor:
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
    ) -> None:
        model = _unwrap(model)
        self.model = model
        self.name = name or _default_name()
        self.every = every
        self.rank = _env_int("RANK", 0)
        self.world_size = _env_int("WORLD_SIZE", 1)
        self.run = os.environ.get("ICSMON_RUN") or os.environ.get("TORCHELASTIC_RUN_ID") or ""
        if not self.run or self.run == "none":
            self.run = f"{self.name}-{secrets.token_hex(3)}"
        self.started = time.time()
        self.errors = 0
        self.skipped = 0  # steps left unsampled because the offload thread was far behind
        self.step_source: StepSource = "unknown"
        self._pid = os.getpid()
        self._closed = False
        self._paused = False
        self._step = 0
        self._samples = 0
        self._forwards = 0  # training forwards since the last step boundary
        self._eval_forward = False  # the forward under way is not training (no_grad, eval)
        self._spent = 0.0  # seconds of our own work on the current sampled step
        self._busy_seen: float | None = None  # the offload thread's busy seconds already counted
        self._forward_t0: float | None = None  # when this step's (first) forward began
        self._closed_by_optimizer = False  # the optimizer hook closed the step and no forward followed
        self._cadence = Cadence(every)
        self._sampler: Sampler | None = None
        self._pending: Pending | None = None
        self._early: Early | None = None  # this step's activation figures, being finished early
        self._grads: Grads | None = None  # this step's gradients, taken when its backward ended
        # Weak keys: an optimizer that is dropped and re-created must not inherit a verdict by id.
        self._owned_optimizers: weakref.WeakKeyDictionary[torch.optim.Optimizer, bool] = (
            weakref.WeakKeyDictionary()
        )
        self._model_params = {id(p) for p in model.parameters()}
        self._grad_probe_param = next((p for p in model.parameters() if p.requires_grad), None)
        self._warned: set[str] = set()
        self._optimizer_handle: Any = None
        self._skipped_step = -1
        self._publisher: Publisher | None = None
        self._discovery_path: Path | None = None
        self.endpoint: str | None = None
        self._seq = itertools.count(1)
        self._atexit: Any = None

        modules = candidate_modules(model, include, exclude)
        self._capture = Capture(model, modules, self)
        if not modules:
            self._warn(
                "empty",
                f"icsmon: {type(model).__name__} has no layer to watch; training continues unmonitored",
            )
            return
        key = f"{self.run}.r{self.rank}"
        try:
            runtime = Path(runtime_dir) if runtime_dir is not None else discovery.runtime_dir()
            discovery.ensure_private_dir(runtime)
            self._publisher = Publisher(
                _resolve_endpoint(endpoint, runtime, key),
                run=self.run,
                rank=self.rank,
                on_error=self._on_publisher_error,
            )
            self.endpoint = self._publisher.endpoint
            info = discovery.JobInfo(
                pid=self._pid,
                host=socket.gethostname(),
                run=self.run,
                name=self.name,
                rank=self.rank,
                world_size=self.world_size,
                endpoint=self.endpoint,
                started=self.started,
                cmd=list(sys.argv),
            )
            self._discovery_path = discovery.write(info, runtime, stem=key)
        except Exception as exc:
            self._warn("setup", f"icsmon: cannot publish ({exc}); training continues unmonitored")
            self._shutdown_publisher()
            return

        try:
            self._capture.set_hooks(True)  # the first training forward builds the layer table
            self._optimizer_handle = register_optimizer_step_post_hook(self._on_optimizer_step)
            self._publisher.submit(self._event("started"))
            self._atexit = functools.partial(_close_at_exit, weakref.ref(self))
            atexit.register(self._atexit)
        except Exception as exc:
            self._warn("setup", f"icsmon: cannot hook the model ({exc}); training continues unmonitored")
            self.close()

    # ------------------------------------------------------------------ public API

    def step(self, loss: Any = None, **scalars: Any) -> None:
        """Mark the end of a training step; ``loss`` and any scalars travel with the sample.

        Tensors are passed as they are (no ``.item()``: no host sync). Call it once a step, after
        ``optimizer.step()``; from the first call on it alone marks the steps.
        """
        if self._closed or self._publisher is None:
            return
        try:
            values = dict(scalars)
            if loss is not None:
                values["loss"] = loss
            if self.step_source != "user":
                self.step_source = "user"  # from now on the user marks steps; the hooks stand down
                if self._closed_by_optimizer:  # this step is already closed: do not count it twice
                    if self._pending is not None:
                        self._pending.scalars.update(values)
                        self._flush_pending()
                    self._capture.set_armed(self._should_sample())  # decided again: now is the end
                    self._update_hooks()
                    return
            self._boundary(values, defer=False)
        except Exception as exc:
            self.fault("step", exc)

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
            if self._publisher is not None:
                self._publisher.submit(self._event("paused"))
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
            if self._publisher is not None:
                self._publisher.submit(self._event("resumed"))
        except Exception as exc:
            self.fault("resume", exc)

    @property
    def paused(self) -> bool:
        return self._paused

    def close(self) -> None:
        """Detach every hook, send the last sample and a closing event, remove the discovery file."""
        if self._closed:
            return
        if self.step_source in ("unknown", "forward") and self._forwards and not self._paused:
            with contextlib.suppress(Exception):
                self._boundary({}, defer=False)  # the last forward was a step: it is sent too
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
        if self._publisher is not None:
            with contextlib.suppress(Exception):
                self._publisher.submit(self._event("closing"))
        self._shutdown_publisher()
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
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self._capture.layers]

    @property
    def steps(self) -> int:
        return self._step

    @property
    def watching(self) -> bool:
        return self._publisher is not None and self._publisher.watching

    @property
    def compiled(self) -> bool:
        """Whether a compiled forward of the model was seen (see :mod:`icsmon_agent.capture`)."""
        return self._capture.compiled

    # ------------------------------------------------------------------ events from the hooks

    def forward_started(self) -> None:
        """The model's own forward begins (its eager pre-hook, also under ``torch.compile``)."""
        if not (torch.is_grad_enabled() and self.model.training):
            self._eval_forward = True  # an evaluation pass: never sampled, never a step
            return
        self._eval_forward = False
        self._closed_by_optimizer = False
        if self._forwards and self.step_source in ("unknown", "forward") and self._new_step_by_forward():
            # No step marked since the last training forward, and its gradients are gone: that
            # forward was a step.
            if self.step_source == "unknown" and self._step >= FORWARD_STEPS_AFTER:
                self.step_source = "forward"
                self._warn(
                    "forward-steps",
                    "icsmon: no optimizer.step() or mon.step() seen; each training forward counts as a step",
                )
                if self._publisher is not None:
                    self._publisher.submit(self._event("forward_steps"))
            self._boundary({}, defer=False)
        self._forwards += 1
        capture = self._capture
        capture.new_forward()
        if not capture.captured:
            # Decided again here, not only at the step boundary: a viewer may have joined since,
            # or the job paused.
            capture.set_armed(self._should_sample())
        if self._forward_t0 is None:
            self._forward_t0 = time.monotonic()
        if self._pending is not None:
            self._flush_pending()
            self._update_hooks()

    def _new_step_by_forward(self) -> bool:
        """With no step marked, whether this training forward begins a new step: yes unless the
        gradients of the last backward are still there (a micro-batch of gradient accumulation,
        before its first optimizer step), or after too many forwards in one step."""
        probe = self._grad_probe_param
        return probe is None or probe.grad is None or self._forwards >= FORWARD_STEPS_AFTER

    def forward_ended(self, output: Any) -> None:
        """The model's own forward returned ``output`` (eagerly, also under ``torch.compile``)."""
        if self._eval_forward:
            return
        started = time.perf_counter()
        capture = self._capture
        sampled = capture.armed
        capture.end_forward(output)
        if capture.building:
            if capture.layers:
                self._finish_table()
            elif capture.hits == 0 and capture.step_hits == 0 and self._forwards:
                self._warn(
                    "nofloat", "icsmon: no watched layer returned a floating-point tensor; nothing to show"
                )
        elif capture.captured and self._early is None and self._sampler is not None and capture.offload:
            self._early = Early(capture.records)
            self._sampler.finish_early(self._early)
        if sampled and self._sampler is not None:
            self._watch_backward(output)
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

    def _watch_backward(self, output: Any) -> None:
        """Take the gradients when this forward's backward ends: before the user's clipping, and
        after every micro-batch of the step (the last one before the optimizer wins)."""
        tensor = next((t for t in tensors_in(output) if t.grad_fn is not None), None)
        if tensor is not None and tensor.grad_fn is not None:
            tensor.grad_fn.register_prehook(self._backward_began)

    def _backward_began(self, grad_outputs: Any) -> None:
        try:
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_ending)
        except Exception as exc:
            self.fault("backward", exc)

    def _backward_ending(self) -> None:
        # Queued once more, so it runs after callbacks queued during the backward (DDP's, which
        # writes the averaged gradients).
        try:
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_ended)
        except Exception:
            self._backward_ended()

    def _backward_ended(self) -> None:
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
        if self.step_source == "user" or self._closed:
            return
        try:
            owned = self._owned_optimizers.get(optimizer)
            if owned is None:
                owned = any(id(p) in self._model_params for g in optimizer.param_groups for p in g["params"])
                self._owned_optimizers[optimizer] = owned
            if owned:
                self.step_source = "optimizer"
                self._boundary({}, defer=True)
                self._closed_by_optimizer = True
        except Exception as exc:
            self.fault("optimizer", exc)

    def _should_sample(self) -> bool:
        capture = self._capture
        if capture.building:
            return True
        if self._publisher is None or self._paused:
            return False
        offload = capture.offload
        if offload is not None and offload.pending > MAX_QUEUED_JOBS:
            if self._skipped_step != self._step:
                self._skipped_step = self._step
                self.skipped += 1
            return False
        return self._cadence.due(self._step, self._publisher.watching)

    def _update_hooks(self) -> None:
        """The hooks are needed while sampling, to flush a held sample, or to find the steps."""
        capture = self._capture
        capture.set_hooks(
            not self._closed
            and (
                capture.building
                or capture.armed
                or self._pending is not None
                or self.step_source in ("unknown", "forward")
            )
        )

    def _boundary(self, scalars: dict[str, Any], *, defer: bool) -> None:
        capture = self._capture
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
            pending = self._sampler.take(self._step, scalars, self._early, self._grads)
            self._spent += time.perf_counter() - started
            # The offload thread's work counts too (the CPU is the job's): what it did since the
            # last sample, mostly that sample's reductions and finish. The first sample pays for
            # the table and the thread's start: set-up, left out.
            spent = self._spent
            offload = capture.offload
            if offload is not None:
                busy = offload.busy_s
                if self._busy_seen is not None:
                    spent += busy - self._busy_seen
                if not first:
                    self._busy_seen = busy
            self._cadence.sampled(self._forward_t0 or time.monotonic(), None if first else spent)
            self._samples += 1
            self._spent = 0.0
        self._forward_t0 = None
        self._step += 1
        self._forwards = 0
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
        if self._publisher is None:
            return
        capture.finish_table()
        self._sampler = Sampler(capture, self._publisher, self._warn)
        layers = capture.table()
        schema = protocol.Schema(
            run=self.run,
            rank=self.rank,
            seq=next(self._seq),
            t=time.time(),
            layers=layers,
            name=self.name,
            host=socket.gethostname(),
            pid=self._pid,
            world_size=self.world_size,
            every=self.every or 0,  # 0: adaptive
            started=self.started,
            schema_id=protocol.schema_id_for(layers),
        )
        self._publisher.set_schema(schema)

    # ------------------------------------------------------------------ plumbing

    def _event(self, name: str) -> protocol.Event:
        detail: dict[str, Any] = {"step": self._step, "errors": self.errors}
        if self._publisher is not None:
            detail["dropped"] = self._publisher.dropped
        return protocol.Event(self.run, self.rank, next(self._seq), time.time(), name, detail)

    def _shutdown_publisher(self) -> None:
        if self._publisher is not None:
            with contextlib.suppress(Exception):
                self._publisher.close()
        if self._discovery_path is not None and os.getpid() == self._pid:
            discovery.remove(self._discovery_path)
            self._discovery_path = None

    def _warn(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        with contextlib.suppress(Exception):
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _on_publisher_error(self, where: str, exc: BaseException) -> None:
        self._warn(f"publisher:{where}", f"icsmon: publisher {where} failed ({type(exc).__name__}: {exc})")


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
    return Monitor(
        model,
        name=name,
        every=every,
        endpoint=endpoint,
        include=include,
        exclude=exclude,
        runtime_dir=runtime_dir,
    )
