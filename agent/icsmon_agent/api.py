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
import sys
import time
import warnings
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import discovery, protocol
from .figures import Finalizer, Reduced, reduce_output
from .layers import Selector, candidate_modules, first_float_tensor, layer_kind, saturation_mode, unit_dim
from .publisher import Publisher, Work, default_endpoint

#: The default cadence (``every=None``) is adaptive: the agent times its own work on each sampled
#: step (hooks, the batched finish, the hand-off) and waits ``cost / BUDGET`` seconds before the
#: next sample, but never less than ``MIN_INTERVAL_S``. Why not a fixed N: a sampled step's cost
#: is roughly fixed per layer while step times span 1 ms to 10 s, so any fixed N is either too
#: dear for fast jobs or too sparse for slow ones. Measured (benchmarks/overhead.py, seed 50-layer
#: MLP, batch 128, one CPU thread): a sampled step costs about a third to half of a bare step more
#: (~100 layers x ~10 small ops at ~10 us of dispatch each), so the adaptive default samples about
#: every 50-100th step there and every step of a job whose steps take a second.
#: Half a percent measured: the other half is for what the timing cannot see (the hooks' calls on
#: unsampled steps, the publisher thread's encoding, cache effects), so the total stays near 1%.
BUDGET = 0.005
#: At most 20 samples a second: what a viewer can draw, and what the wire is sized for.
MIN_INTERVAL_S = 0.05
#: With nobody subscribed, sample this many times less often: enough history for a late viewer.
IDLE_FACTOR = 10
MAX_FAULTS = 50


@dataclass
class _Layer:
    name: str
    module: nn.Module
    call: int
    info: protocol.LayerInfo
    unit_dim: int
    sat: int


@dataclass
class _Pending:
    step: int
    figures: torch.Tensor
    t_measured: float
    scalars: dict[str, Any] = field(default_factory=dict)


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
        self._step = 0
        self._armed = True  # the first forward builds the layer table
        self._spent = 0.0  # seconds of our own work on the current sampled step
        self._cost = 0.0  # smoothed seconds of our own work per sampled step (adaptive cadence)
        self._last_sample = 0.0  # monotonic time the last sampled step began
        self._forward_t0: float | None = None  # when this step's (first) forward began
        self._building = True
        self._auto = True
        self._closed_by_optimizer = False  # the optimizer hook closed the step and no forward followed
        self._layers: list[_Layer] = []
        self._slot: dict[tuple[int, int], int] = {}
        self._records: list[Reduced | None] = []
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
        if not self._armed:
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
            self._records[slot] = reduce_output(tensor, layer.unit_dim, layer.sat)
        except Exception as exc:
            self._fault("hook", exc)
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

    def _finish_table(self) -> None:
        if not self._layers or self._publisher is None:
            return
        self._building = False
        self._finalizer = Finalizer(len(self._layers))
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
        elif not on and self._layer_handles:
            for handle in self._layer_handles:
                with contextlib.suppress(Exception):
                    handle.remove()
            self._layer_handles = []

    def _should_sample(self, step: int) -> bool:
        if self._building:
            return True
        if self._publisher is None:
            return False
        watching = self._publisher.watching
        if self.every is not None:
            period = self.every if watching else self.every * IDLE_FACTOR
            return step % period == 0
        interval = max(MIN_INTERVAL_S, self._cost / BUDGET) * (1 if watching else IDLE_FACTOR)
        return time.monotonic() - self._last_sample >= interval

    def _boundary(self, scalars: dict[str, Any], *, defer: bool) -> None:
        pending: _Pending | None = None
        if self._armed:
            first = self._building
            if self._building:
                if self._calls and not self._layers:
                    self._warn(
                        "nofloat",
                        "icsmon: no watched layer returned a floating-point tensor; nothing to show",
                    )
                self._finish_table()
            if (
                not self._building
                and self._finalizer is not None
                and any(r is not None for r in self._records)
            ):
                started = time.perf_counter()
                pending = _Pending(self._step, self._compute(), time.time(), scalars)
                self._spent += time.perf_counter() - started
                # Smoothed, so one slow sample (a page fault, a busy core) does not stall the cadence;
                # the first sample also pays one-time set-up (the layer table, first kernel calls).
                if not first:
                    self._cost = self._spent if self._cost == 0.0 else 0.7 * self._cost + 0.3 * self._spent
                self._spent = 0.0
                # Measured from when the sampled step began, so a step that is slow inside its
                # forward (a big model) is followed by another sample right away.
                self._last_sample = self._forward_t0 or time.monotonic()
        self._forward_t0 = None
        self._step += 1
        self._calls.clear()
        self._records = [None] * len(self._layers)
        self._armed = self._should_sample(self._step)
        self._set_layer_hooks(self._armed)
        if pending is not None:
            self._pending = pending
            if not defer:
                self._flush_pending()

    def _compute(self) -> torch.Tensor:
        assert self._finalizer is not None
        device = next((r.umean.device for r in self._records if r is not None), torch.device("cpu"))
        grads = [(i, p.grad) for i, p in self._params if p.grad is not None]
        return self._finalizer.figures(self._records, grads, device)

    def _flush_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None or self._publisher is None:
            return
        started = time.perf_counter()
        try:
            self._hand_off(pending, self._publisher)
        finally:
            self._spent += time.perf_counter() - started  # counted toward the next sample's cost

    def _hand_off(self, pending: _Pending, publisher: Publisher) -> None:
        figures = pending.figures
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
