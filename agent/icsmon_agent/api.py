"""``watch(model)`` and the :class:`Monitor` that lives inside the training process.

Rule one of an embedded agent: it never hurts the host. Every entry point from training (hooks,
``step``, the optimizer hook) catches everything, counts it and warns once; after too many faults
the monitor detaches itself. Nothing here waits on the network: figures go to the publisher
thread through a bounded queue.

Step boundaries: ``Monitor.step()`` when the user calls it; otherwise PyTorch's global optimizer
step hook (only for optimizers that hold this model's parameters), so the two lines alone work.
In that automatic mode the sample is held until the next forward (or ``step()``/``close()``), so a
``step(loss=...)`` that follows ``optimizer.step()`` attaches its loss to the same sample.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import os
import secrets
import socket
import statistics
import sys
import time
import warnings
import weakref
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import discovery, protocol
from .figures import Finalizer, GradNorms, Record, grad_norms, reduce_output, reduce_outputs
from .layers import (
    Selector,
    candidate_modules,
    first_float_tensor,
    layer_kind,
    saturation_mode,
    tensor_storages,
    unit_dim,
)
from .offload import Offload
from .publisher import Publisher, Work, default_endpoint

#: The default cadence (``every=None``) is adaptive: the agent times its own work on each sampled
#: step (hooks, the batched finish, the hand-off) and waits ``cost / BUDGET`` seconds before the
#: next sample, but never less than ``MIN_INTERVAL_S``. Why not a fixed N: a sampled step's cost
#: is roughly fixed per layer while step times span 1 ms to 10 s, so any fixed N is either too
#: dear for fast jobs or too sparse for slow ones. Measured (benchmarks/overhead.py, seed 50-layer
#: MLP, batch 128, one CPU thread): a sampled step's work, in both threads, is ~7 ms, a fifth of a
#: bare step (hooks on 101 outputs, a one-pass reduction of each, the batched finish, gradient
#: norms), so the adaptive default samples about every 35th step there and every step of a job
#: whose steps take a second.
#: Half a percent measured: the other half is for what the timing cannot see (the hooks' calls on
#: unsampled steps, the publisher thread's encoding, cache effects), so the total stays near 1%.
BUDGET = 0.005
#: At most 20 samples a second: what a viewer can draw, and what the wire is sized for.
MIN_INTERVAL_S = 0.05
#: With nobody subscribed, sample this many times less often: enough history for a late viewer.
IDLE_FACTOR = 10
MAX_FAULTS = 50
#: The cadence follows the low median of this many samples' costs (the first ones go at the floor).
COST_WINDOW = 5
#: CPU layer outputs handed to the offload thread are held at most this many bytes at once (this
#: forward's plus those still queued); past it, a layer is reduced inline. Bounded memory whatever
#: the model, and a thread that falls behind slows nothing: the inline route is the old cost.
HOLD_LIMIT = 256 * 2**20
#: With this many jobs still queued (the offload thread starved of CPU), a step goes unsampled.
#: A sample queues three (its reductions, its activation figures, its finish): about 8 samples.
MAX_QUEUED_JOBS = 24
#: How long ``close()`` waits for the offload thread to finish the last samples.
CLOSE_WAIT_S = 2.0


@dataclass
class _Layer:
    name: str
    module: nn.Module
    call: int
    info: protocol.LayerInfo
    unit_dim: int
    sat: int
    copy: bool = False  # its output is changed in place after its hook: copy it, never hold it


@dataclass
class _Early:
    """A sample's activation figures, finished on the offload thread right after its reductions.

    Why early: finished at the step's end instead, that work (~1.5 ms of short ops and Python on
    the seed MLP) ran beside the next forward, the training thread's most Python-heavy phase, and
    both slowed each other over the GIL (measured: 4.5 ms of wall for it, +1 ms on the forward).
    Beside the backward, which holds the GIL least, it costs the training thread almost nothing.
    """

    records: list[Record | None]
    figures: torch.Tensor | None = None  # float64, from Finalizer.activations; None until done


@dataclass
class _Pending:
    step: int
    t_measured: float
    scalars: dict[str, Any]
    records: list[Record | None]  # filled in by the offload thread until its finishing job runs
    grads: GradNorms | None
    figures: torch.Tensor | None = None  # None: finished on the offload thread
    # Gradients whose norms the offload thread takes, and their versions when the step ended.
    held_grads: tuple[list[tuple[int, torch.Tensor]], list[int]] | None = None
    early: _Early | None = None  # its activation figures, if the offload thread finished them early


@dataclass
class _Held:
    """A layer output kept for the offload thread, with its version when the hook saw it."""

    slot: int
    tensor: torch.Tensor
    version: int
    reduced: bool  # already reduced inline (the layer-table step): kept to learn in-place changes
    # A ReLU whose input was the output held just before it: its figures are of relu(tensor),
    # ``tensor`` and ``version`` being that input's (see Monitor._relu_of_held).
    source: _Held | None = None


def _records_device(records: list[Record | None]) -> torch.device:
    """Where a sample's figures are finished: the device of its first layer's reductions."""
    return next((r.device for r in records if r is not None), torch.device("cpu"))


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
        self._pid = os.getpid()
        self._closed = False
        self._paused = False  # pause(): no sampling until resume()
        self._paused_at = 0.0  # monotonic time of the last pause(): the cadence's clock stops there
        self._step = 0
        self._armed = True  # the first forward builds the layer table
        self._spent = 0.0  # seconds of our own work on the current sampled step
        self._cost = 0.0  # typical seconds of our own work per sampled step (adaptive cadence)
        self._costs: deque[float] = deque(maxlen=COST_WINDOW)  # the last samples' own costs
        self._last_sample = 0.0  # monotonic time the last sampled step began
        self._forward_t0: float | None = None  # when this step's (first) forward began
        self._building = True
        self._auto = True
        self._closed_by_optimizer = False  # the optimizer hook closed the step and no forward followed
        self._layers: list[_Layer] = []
        self._slot: dict[tuple[int, int], int] = {}
        self._records: list[Record | None] = []
        self._calls: dict[int, int] = {}
        self._params: list[tuple[int, nn.Parameter]] = []
        self._finalizer: Finalizer | None = None
        self._pending: _Pending | None = None
        # Weak keys: an optimizer that is dropped and re-created must not inherit a verdict by id.
        self._owned_optimizers: weakref.WeakKeyDictionary[torch.optim.Optimizer, bool] = (
            weakref.WeakKeyDictionary()
        )
        self._model_params = {id(p) for p in model.parameters()}
        self._warned: set[str] = set()
        self._handles: list[Any] = []
        self._hooked: list[nn.Module] = []
        self._layer_handles: list[Any] = []
        self._offload: Offload | None = None  # CPU models only: reductions off the training thread
        self._held: list[_Held] = []
        self._held_bytes = 0
        self._early: _Early | None = None  # this step's activation figures, being finished early
        self._hits = 0  # layers captured in the current forward
        self._step_hits = 0  # and in the current step
        self._captured = False  # this step's sample is taken: later forwards (micro-batches) are skipped
        # The offload thread's busy seconds already counted toward the cadence; None until the
        # second sample: the first one's work there (the thread's first calls into torch and
        # NumPy, ~3 ms) is one-time set-up, not a sample's cost.
        self._busy_seen: float | None = None
        # Whether the offload thread may read the gradients after the step ("hold"), or their
        # norms are taken at the boundary ("inline"); "learn" until a later sample has shown
        # that the job replaces its gradients (zero_grad(set_to_none=True)) rather than
        # zeroing or accumulating them in place, which would change them under the reader.
        self._grad_mode = "learn"
        self._grad_probe: list[tuple[nn.Parameter, torch.Tensor, int]] | None = None
        self.skipped = 0  # steps left unsampled because the offload thread was far behind
        self._skipped_step = -1
        self._side_stream: Any = None
        self._publisher: Publisher | None = None
        self._discovery_path: Path | None = None
        self.endpoint: str | None = None
        self._seq = itertools.count(1)
        self._atexit: Any = None

        modules = candidate_modules(model, include, exclude)
        self._names = {id(m): n for n, m in modules}
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
            self._handles.append(model.register_forward_pre_hook(self._on_root_forward))
            self._hooked = [module for _, module in modules]
            self._set_layer_hooks(True)  # the first forward builds the layer table
            self._handles.append(register_optimizer_step_post_hook(self._on_optimizer_step))
            self._publisher.submit(self._event("started"))
            self._atexit = functools.partial(_close_at_exit, weakref.ref(self))
            atexit.register(self._atexit)
        except Exception as exc:
            self._warn("setup", f"icsmon: cannot hook the model ({exc}); training continues unmonitored")
            self.close()

    # ------------------------------------------------------------------ public API

    def step(self, loss: Any = None, **scalars: Any) -> None:
        """Mark the end of a training step; ``loss`` and any scalars travel with the sample.

        Tensors are passed as they are (no ``.item()``: no host sync); call it after
        ``optimizer.step()`` and before ``zero_grad()`` so gradient norms are seen.
        """
        if self._closed or self._publisher is None:
            return
        try:
            values = dict(scalars)
            if loss is not None:
                values["loss"] = loss
            if self._auto:
                self._auto = False  # from now on the user marks steps; the optimizer hook stands down
                if self._closed_by_optimizer:  # this step is already closed: do not count it twice
                    if self._pending is not None:
                        self._pending.scalars.update(values)
                        self._flush_pending()
                    return
            self._boundary(values, defer=False)
        except Exception as exc:
            self._fault("step", exc)

    def pause(self) -> None:
        """Stop sampling from the next forward on, until :meth:`resume`; viewers are told.

        The layer hooks come off at the step's end, so a paused step costs what an unsampled one
        does (the model's pre-forward hook and the step boundary, microseconds). A step already
        being sampled is finished and sent, and the first forward after ``watch()`` builds the
        layer table (and is sent) whatever the state. ``benchmarks/overhead.py`` pauses a watched
        model to time it bare on the same copy.
        """
        if self._closed or self._paused:
            return
        try:
            self._paused = True
            self._paused_at = time.monotonic()
            if self._publisher is not None:
                self._publisher.submit(self._event("paused"))
        except Exception as exc:
            self._fault("pause", exc)

    def resume(self) -> None:
        """Sample again after :meth:`pause`.

        The adaptive cadence's clock stood still while paused: the next sample comes when as much
        unpaused time has passed since the last one as the cadence wants. Why: a pause is no time
        the agent ran in, and a sample at every resume would make a job that pauses often (or a
        benchmark's short rounds) sample more often than the budget allows.
        """
        if self._closed or not self._paused:
            return
        try:
            self._paused = False
            # A sample taken while paused (the layer table's, or one under way at the pause) is
            # the clock's start instead: the pause only counts from whichever came later.
            now = time.monotonic()
            self._last_sample += now - max(self._paused_at, self._last_sample)
            if self._publisher is not None:
                self._publisher.submit(self._event("resumed"))
        except Exception as exc:
            self._fault("resume", exc)

    @property
    def paused(self) -> bool:
        return self._paused

    def close(self) -> None:
        """Detach every hook, send the last sample and a closing event, remove the discovery file."""
        if self._closed:
            return
        self._closed = True
        self._set_layer_hooks(False)
        for handle in self._handles:
            with contextlib.suppress(Exception):
                handle.remove()
        self._handles.clear()
        with contextlib.suppress(Exception):
            self._flush_pending()
        if self._offload is not None:
            # The last samples are still being finished there; they go out before the closing event.
            with contextlib.suppress(Exception):
                self._offload.close(CLOSE_WAIT_S)
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

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self._layers]

    @property
    def steps(self) -> int:
        return self._step

    @property
    def watching(self) -> bool:
        return self._publisher is not None and self._publisher.watching

    # ------------------------------------------------------------------ hooks (hot path)

    def _on_root_forward(self, module: nn.Module, args: Any) -> None:
        try:
            self._calls.clear()
            self._closed_by_optimizer = False
            if self._held:  # the last forward raised before its end: its outputs go now
                self._dispatch(None)
            self._hits = 0
            if not self._captured:
                # Decided again here, not only at the step boundary: a viewer may have joined in between.
                self._armed = self._should_sample(self._step)
                self._set_layer_hooks(self._armed)
            if self._forward_t0 is None:
                self._forward_t0 = time.monotonic()
            if self._pending is not None:
                self._flush_pending()
        except Exception as exc:
            self._fault("forward", exc)

    def _on_output(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._armed or self._captured:
            return
        started = time.perf_counter()
        try:
            if not self.model.training:
                return  # evaluation passes are not training steps
            mid = id(module)
            call = self._calls.get(mid, 0)
            self._calls[mid] = call + 1
            slot = self._slot.get((mid, call))
            tensor = first_float_tensor(output)
            if tensor is None:
                return
            if slot is None:
                if not self._building:
                    return
                slot = self._add_layer(module, call, tensor)
            layer = self._layers[slot]
            self._hits += 1
            self._step_hits += 1
            source = self._relu_of_held(module, args) if self._offload is not None else None
            if source is not None:
                # Its figures come from its input, which the offload thread reads anyway: the
                # ReLU's own output is never read, and holds no bytes of its own.
                self._held.append(_Held(slot, source.tensor, source.version, False, source))
            elif self._offload is not None and tensor.is_cpu and self._may_hold(tensor):
                # Hand it to the offload thread at the end of the forward (see offload.py); an
                # output that is changed in place later in the forward is copied first.
                held = tensor.detach().clone() if layer.copy else tensor.detach()
                self._held.append(_Held(slot, held, held._version, False))
                self._held_bytes += held.nbytes
            else:
                self._records[slot] = reduce_output(tensor, layer.unit_dim, layer.sat)
                if self._building and tensor.is_cpu and not tensor.is_inference():
                    # Kept until the forward ends only to learn which outputs change in place.
                    self._held.append(_Held(slot, tensor.detach(), tensor._version, True))
        except Exception as exc:
            self._fault("hook", exc)
        self._spent += time.perf_counter() - started

    def _relu_of_held(self, module: nn.Module, args: Any) -> _Held | None:
        """The held output this ReLU was given, unchanged since its hook; None for any other call.

        Why: on a Linear -> ReLU stack half the outputs are ReLUs of the other half. Reduced from
        the input, a ReLU's figures cost the offload thread no read of their own and its output is
        never held for it (measured on the seed MLP: the bytes held halved, the offload thread's
        time 5.1 -> 4.5 ms a sample; the step's wall time within noise, see README).
        The proof asked is strict, so only the plain case takes it: a non-inplace ``nn.ReLU``
        whose first forward hook is ours (one before it, or a global one, could have replaced the
        output we are given, which is what we would have measured), whose one argument is the
        very memory (same pointer, shape, strides, dtype, version, no lazy negation) of the output
        held just before it. Anything else (an in-place ReLU, a residual in between, a functional
        relu) is held as its own output, as before.
        """
        if (
            type(module) is not nn.ReLU
            or module.inplace
            or not self._held
            or len(args) != 1
            or nn.modules.module._global_forward_hooks
            or next(iter(module._forward_hooks.values()), None) != self._on_output
        ):
            return None
        source = self._held[-1]
        x = args[0]
        if (
            source.reduced
            or source.source is not None
            or not isinstance(x, torch.Tensor)
            or x.layout is not torch.strided  # data_ptr() raises on sparse tensors
        ):
            return None
        held = source.tensor
        if (
            x.is_neg() != held.is_neg()
            or x.data_ptr() != held.data_ptr()
            or x.dtype != held.dtype
            or x.shape != held.shape
            or x.stride() != held.stride()
            or x._version != source.version
        ):
            return None
        return source

    def _on_root_output(self, module: nn.Module, args: Any, output: Any) -> None:
        """The end of a forward on a sampled step: hand its outputs over, and stop hooking."""
        started = time.perf_counter()
        try:
            if self._held:
                self._dispatch(output)
            if self._hits and not self._building:
                # One forward per sample: later forwards of the step (gradient accumulation's
                # micro-batches) are skipped, and the sample is the step's first batch. The hooks
                # stay: removing and adding 100 of them costs more than a step's worth of returns.
                self._captured = True
                if self._offload is not None and self._early is None:
                    self._early = _Early(self._records)
                    self._offload.submit(functools.partial(self._finish_activations, self._early))
        except Exception as exc:
            self._fault("forward", exc)
        self._spent += time.perf_counter() - started

    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._auto or self._closed:
            return
        try:
            owned = self._owned_optimizers.get(optimizer)
            if owned is None:
                owned = any(id(p) in self._model_params for g in optimizer.param_groups for p in g["params"])
                self._owned_optimizers[optimizer] = owned
            if owned:
                self._boundary({}, defer=True)
                self._closed_by_optimizer = True
        except Exception as exc:
            self._fault("optimizer", exc)

    # ------------------------------------------------------------------ internals

    def _add_layer(self, module: nn.Module, call: int, tensor: torch.Tensor) -> int:
        base = self._names.get(id(module), type(module).__name__)
        name = base if call == 0 else f"{base}#{call}"
        shape = tuple(int(d) for d in tensor.shape)
        previous = (self._layers[-1].unit_dim, tuple(self._layers[-1].info.shape)) if self._layers else None
        kind = layer_kind(module)
        info = protocol.LayerInfo(name=name, type=type(module).__name__, shape=shape, kind=kind)
        layer = _Layer(
            name, module, call, info, unit_dim(module, tensor.ndim, previous, shape), saturation_mode(kind)
        )
        self._layers.append(layer)
        self._records.append(None)
        self._slot[(id(module), call)] = len(self._layers) - 1
        return len(self._layers) - 1

    def _may_hold(self, tensor: torch.Tensor) -> bool:
        if tensor.is_inference():  # no version counter: nothing would tell us it changed
            return False
        assert self._offload is not None
        return self._offload.outstanding + self._held_bytes + tensor.nbytes <= HOLD_LIMIT

    def _dispatch(self, output: Any) -> None:
        """Send the held outputs of a finished forward to the offload thread (some inline)."""
        held, self._held, self._held_bytes = self._held, [], 0
        # The model's own output goes back to user code, which may change it in place at any time.
        escaping = tensor_storages(output)
        jobs: list[_Held] = []
        placed: dict[int, _Held] = {}  # id of a held output -> the job that reads it
        for h in held:
            layer = self._layers[h.slot]
            if h.source is not None:
                # A ReLU of the output before it: read with that output's job, or not at all (the
                # input changed in place; the ReLU's own output did not, so no copy is learnt).
                job = placed.get(id(h.source))
                if job is not None:
                    jobs.append(_Held(h.slot, job.tensor, job.version, False, job))
                continue
            if h.tensor._version != h.version:
                # Changed in place after its hook (a Linear feeding an in-place ReLU, a residual
                # add): from now on this layer is copied in its hook. This sample goes without it.
                layer.copy = True
            elif h.reduced:
                continue
            elif self._offload is None:
                self._records[h.slot] = reduce_output(h.tensor, layer.unit_dim, layer.sat)
            elif h.tensor.untyped_storage().data_ptr() in escaping:
                # A copy goes instead: one pass here, where reducing it would take eight.
                copy = h.tensor.detach().clone()
                placed[id(h)] = _Held(h.slot, copy, copy._version, False)
                jobs.append(placed[id(h)])
            else:
                placed[id(h)] = h
                jobs.append(h)
        if jobs and self._offload is not None:
            nbytes = sum(h.tensor.nbytes for h in jobs if h.source is None)  # a ReLU's is its input's
            self._offload.submit(functools.partial(self._reduce_held, self._records, jobs), nbytes)

    def _reduce_held(self, records: list[Record | None], jobs: list[_Held]) -> None:
        """On the offload thread: reduce the held outputs, keeping each only if nothing changed it."""
        layers = [self._layers[h.slot] for h in jobs]
        with torch.no_grad():  # grad mode is per thread: this one's is on
            try:
                reduced = reduce_outputs(
                    [
                        (h.tensor, la.unit_dim, la.sat, h.source is not None)
                        for h, la in zip(jobs, layers, strict=True)
                    ]
                )
            except Exception:
                # One output no route can take (a sparse or distributed tensor) costs that layer
                # alone: the rest go one by one. One fault a sample, however many layers failed.
                failures: list[Exception] = []
                reduced = [
                    self._reduce_alone(h, layer, failures) for h, layer in zip(jobs, layers, strict=True)
                ]
                if failures:
                    self._offload_fault(failures[0])
        for h, layer, record in zip(jobs, layers, reduced, strict=True):
            if h.tensor._version == h.version:
                records[h.slot] = record
            elif h.source is None:  # a ReLU read from its input: that input's layer learns the copy
                layer.copy = True

    @staticmethod
    def _reduce_alone(h: _Held, layer: _Layer, failures: list[Exception]) -> Record | None:
        try:
            return reduce_output(
                torch.relu(h.tensor) if h.source is not None else h.tensor, layer.unit_dim, layer.sat
            )
        except Exception as exc:
            failures.append(exc)
            return None

    def _finish_table(self) -> None:
        if not self._layers or self._publisher is None:
            return
        self._building = False
        self._finalizer = Finalizer(len(self._layers))
        if all(r is None or r.device.type == "cpu" for r in self._records):
            self._offload = Offload(self._offload_fault)
        self._params = [
            (i, p)
            for i, layer in enumerate(self._layers)
            if layer.call == 0
            for p in layer.module.parameters()
        ]
        layers = tuple(layer.info for layer in self._layers)
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

    def _set_layer_hooks(self, on: bool) -> None:
        """Install the per-layer hooks for a sampled step only, and remove them after it.

        Why not leave them installed and return early: any forward hook sends a module's call down
        PyTorch's slow path (``_call_impl`` with hook handling), which measured ~4% of a step on
        the 101-layer seed MLP even when the hook did nothing. Registering 100 hooks costs well
        under a millisecond, paid only on sampled steps. (A compiled model will want hooks that
        stay and a sampling flag on the device instead: re-registering would recompile.)
        """
        if on and not self._layer_handles and not self._closed:
            self._layer_handles = [m.register_forward_hook(self._on_output) for m in self._hooked]
            # Registered last, so it runs after the layer hook when the model is itself a layer.
            self._layer_handles.append(self.model.register_forward_hook(self._on_root_output))
        elif not on and self._layer_handles:
            for handle in self._layer_handles:
                with contextlib.suppress(Exception):
                    handle.remove()
            self._layer_handles = []

    def _should_sample(self, step: int) -> bool:
        if self._building:
            return True
        if self._publisher is None or self._paused:
            return False
        if self._offload is not None and self._offload.pending > MAX_QUEUED_JOBS:
            if self._skipped_step != step:
                self._skipped_step = step
                self.skipped += 1
            return False
        watching = self._publisher.watching
        if self.every is not None:
            period = self.every if watching else self.every * IDLE_FACTOR
            return step % period == 0
        interval = max(MIN_INTERVAL_S, self._cost / BUDGET) * (1 if watching else IDLE_FACTOR)
        return time.monotonic() - self._last_sample >= interval

    def _boundary(self, scalars: dict[str, Any], *, defer: bool) -> None:
        pending: _Pending | None = None
        first = self._building
        if self._held:  # layers called outside the model's own forward: no forward end was seen
            self._dispatch(None)
        if self._armed:
            if self._building:
                if self._calls and not self._layers:
                    self._warn(
                        "nofloat",
                        "icsmon: no watched layer returned a floating-point tensor; nothing to show",
                    )
                self._finish_table()
            if not self._building and self._finalizer is not None and self._step_hits:
                started = time.perf_counter()
                pending = self._take_sample(scalars)
                self._spent += time.perf_counter() - started
                # The offload thread's work counts too (the CPU is the job's): what it did since
                # the last sample, mostly that sample's reductions and finish.
                spent = self._spent
                if self._offload is not None:
                    busy = self._offload.busy_s
                    if self._busy_seen is not None:
                        spent += busy - self._busy_seen
                    if not first:  # the first sample's work there is still running, or just done
                        self._busy_seen = busy
                # The low median of the last few, so one slow sample does not stall the cadence: a
                # page fault, a busy core, or a first call into some torch or NumPy op on either
                # thread (measured up to 35 ms, 30x a sample of a small model, on the first samples
                # after the table). Until the window is full the samples go at the floor interval.
                # The first sample pays the layer table and is left out.
                if not first:
                    self._costs.append(spent)
                    if len(self._costs) == COST_WINDOW:
                        self._cost = statistics.median_low(self._costs)
                self._spent = 0.0
                # Measured from when the sampled step began, so a step that is slow inside its
                # forward (a big model) is followed by another sample right away.
                self._last_sample = self._forward_t0 or time.monotonic()
        self._forward_t0 = None
        self._step += 1
        self._calls.clear()
        self._hits = self._step_hits = 0
        self._captured = False
        self._early = None
        self._records = [None] * len(self._layers)
        self._armed = self._should_sample(self._step)
        self._set_layer_hooks(self._armed)
        if pending is not None:
            self._pending = pending
            if not defer:
                self._flush_pending()
        if first:
            # The first sample's hand-off starts the offload thread: one-time set-up, like the
            # table itself, not part of the next sample's cost.
            self._spent = 0.0

    def _take_sample(self, scalars: dict[str, Any]) -> _Pending:
        """The step's sample: gradient norms now (the next step overwrites them), figures now on
        a device (launches only), or later on the offload thread (its reductions may still run)."""
        assert self._finalizer is not None
        records = self._records
        device = _records_device(records)
        grads = [(i, p.grad) for i, p in self._params if p.grad is not None]
        pending = _Pending(self._step, time.time(), scalars, records, None, early=self._early)
        if self._offload is not None and self._grad_mode == "learn":
            self._learn_grad_mode()
        nbytes = sum(g.nbytes for _, g in grads)
        if (
            self._offload is not None
            and self._grad_mode == "hold"
            and self._offload.outstanding + nbytes <= HOLD_LIMIT
            and not any(g.is_inference() for _, g in grads)
        ):
            pending.held_grads = (grads, [g._version for _, g in grads])
        else:
            pending.grads = grad_norms(grads, device)
        if self._offload is None:
            pending.figures = self._finalizer.figures(records, pending.grads, device)
        return pending

    def _learn_grad_mode(self) -> None:
        """Probe at one sample, judge at the next: were the probed gradients replaced, untouched?"""
        probe, self._grad_probe = self._grad_probe, None
        if probe is None:
            self._grad_probe = [
                (p, p.grad, p.grad._version)
                for _, p in self._params
                if p.grad is not None and not p.grad.is_inference()
            ]
            if not self._grad_probe:
                self._grad_probe = None
            return
        replaced = all(p.grad is not g and g._version == v for p, g, v in probe)
        self._grad_mode = "hold" if replaced else "inline"

    def _flush_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None or self._publisher is None:
            return
        started = time.perf_counter()
        try:
            if pending.figures is None and self._offload is not None:
                self._offload.submit(functools.partial(self._finish_offloaded, pending, self._publisher))
            else:
                self._hand_off(pending, self._publisher)
        finally:
            self._spent += time.perf_counter() - started  # counted toward the next sample's cost

    def _finish_offloaded(self, pending: _Pending, publisher: Publisher) -> None:
        """On the offload thread, after the step's reductions: the batched figures, then publish."""
        with torch.no_grad():  # gradients made with create_graph require grad: build no graph here
            self._finish_figures(pending, publisher)

    def _finish_activations(self, early: _Early) -> None:
        """On the offload thread, after a forward's reductions: its activation figures (see _Early)."""
        assert self._finalizer is not None
        with torch.no_grad():
            early.figures = self._finalizer.activations(early.records, _records_device(early.records))

    def _finish_figures(self, pending: _Pending, publisher: Publisher) -> None:
        assert self._finalizer is not None
        records = pending.records
        if pending.held_grads:
            held, versions = pending.held_grads
            grads = grad_norms(held, torch.device("cpu"))
            if all(g._version == v for (_, g), v in zip(held, versions, strict=True)):
                pending.grads = grads
            else:  # changed in place after all: take them at the boundary from now on
                self._grad_mode = "inline"
        if not any(r is not None for r in records) and pending.grads is None:
            return  # every layer of the step changed in place under us: nothing to show
        early = pending.early.figures if pending.early is not None else None
        if early is None:  # no forward end was seen, or its early job failed
            early = self._finalizer.activations(records, _records_device(records))
        pending.figures = self._finalizer.with_grads(early, pending.grads)
        self._hand_off(pending, publisher)

    def _hand_off(self, pending: _Pending, publisher: Publisher) -> None:
        figures = pending.figures
        assert figures is not None
        device = figures.device
        names: list[str] = []
        tensors: list[torch.Tensor] = []
        host_scalars: dict[str, float | None] = {}
        for key, value in pending.scalars.items():
            if isinstance(value, torch.Tensor):
                if value.numel() == 0:
                    continue
                names.append(key)
                tensors.append(value.detach().reshape(-1)[:1].to(device=device, dtype=torch.float32))
            else:
                try:
                    host_scalars[key] = float(value)
                except (TypeError, ValueError):
                    self._warn(f"scalar:{key}", f"icsmon: scalar {key!r} is not a number; it is left out")
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
        publisher.submit(
            Work(pending.step, pending.t_measured, host, ready, n_layers, n_stats, names, host_scalars)
        )

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

    def _fault(self, where: str, exc: BaseException) -> None:
        self.errors += 1
        self._warn(
            f"fault:{where}", f"icsmon: {where} failed ({type(exc).__name__}: {exc}); training continues"
        )
        if self.errors >= MAX_FAULTS and not self._closed:
            self._warn("detach", f"icsmon: {self.errors} faults; detaching from the model")
            with contextlib.suppress(Exception):
                self.close()

    def _offload_fault(self, exc: BaseException) -> None:
        """A fault on the offload thread: counted and warned once; detaching is the training side's."""
        self.errors += 1
        self._warn(
            "fault:offload", f"icsmon: offload failed ({type(exc).__name__}: {exc}); training continues"
        )

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
    """Watch every layer of ``model`` and publish its figures; see the package docstring."""
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
