"""The layer hooks: which module calls are read, and how their outputs reach the reductions.

Every hook is one of PyTorch's global module hooks, filtered by module identity. Why global: a
hook stored on the model (its ``_forward_hooks``) would be pickled, deep-copied and checkpointed
with it, dragging the monitor (threads, locks, sockets) along. Nothing of the agent is reachable
from the model, so ``torch.save``, ``deepcopy``, ``AveragedModel`` and EMA copies behave as without
us, and a copy's modules, being other objects, are not watched.

Eager models: the hooks are registered for a sampled step only, because any hook sends every module
call down PyTorch's slow path. Compiled models: dynamo inlines the hooks into the graph, and there a
hook does one thing, append ``(module id, output)`` to :attr:`Capture._sink`, a list mutation that
dynamo replays after the graph. The root module's own hooks run eagerly (our hook code is never a
compiled frame, see :func:`keep_out_of_dynamo`) and read the list through the same path as an eager
output. Once a compiled forward is seen the hooks stay registered, and a Python flag that dynamo
guards says whether to sample: two graphs, sampled and unsampled, the unsampled one the bare model's.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.modules import module as module_hooks

from . import protocol
from .layers import first_float_tensor, layer_kind, saturation_mode, tensor_storages, unit_dim
from .offload import Offload
from .reduce import Record, readable, reduce_output, reduce_outputs

log = logging.getLogger("icsmon_agent")

#: CPU layer outputs handed to the offload thread are held at most this many bytes at once (this
#: forward's plus those still queued); past it, a layer is reduced inline. Bounded memory whatever
#: the model, and a thread that falls behind slows nothing: the inline route is the old cost.
HOLD_LIMIT = 256 * 2**20


class Owner(Protocol):
    """What the hooks report to (the :class:`~icsmon_agent.monitor.Monitor`)."""

    def forward_started(self) -> None: ...
    def forward_ended(self, output: Any) -> None: ...
    def fault(self, where: str, exc: BaseException) -> None: ...
    def offload_fault(self, exc: BaseException) -> None: ...
    def spend(self, seconds: float) -> None: ...


@dataclass
class Layer:
    name: str
    module: nn.Module
    call: int
    info: protocol.LayerInfo
    unit_dim: int
    sat: int
    copy: bool = False  # its output is changed in place after its hook: copy it, never hold it


@dataclass
class Held:
    """A layer output kept for the offload thread, with its version when the hook saw it."""

    slot: int
    tensor: torch.Tensor
    version: int
    reduced: bool  # already reduced inline (the layer-table forward): kept to learn in-place changes
    # A ReLU whose input was the output held just before it: its figures are of relu(tensor),
    # ``tensor`` and ``version`` being that input's (see Capture._relu_of_held).
    source: Held | None = None


@functools.cache
def keep_out_of_dynamo() -> None:
    """Our hooks, and all they call, are never compiled as frames of their own.

    Why: dynamo skips ``torch.nn``'s own frames, so a hook fired by the compiled module's
    ``_call_impl`` (the root's, and those of ``torch.compile``'s wrapper) is a top-level frame it
    would compile, running our eager bookkeeping through the compiler. Inlined into a traced
    forward (the layers' hooks) they are still traced: the frame strategy applies to frames only.
    """
    with contextlib.suppress(Exception):
        # Not re-exported by torch, though public in use (torch's own skip_code is built on it).
        from torch._dynamo.eval_frame import set_code_exec_strategy  # type: ignore[attr-defined]
        from torch._dynamo.types import FrameAction, FrameExecStrategy  # type: ignore[attr-defined]

        for fn in (Capture._on_input, Capture._on_output):
            set_code_exec_strategy(fn.__code__, FrameExecStrategy(FrameAction.SKIP, FrameAction.SKIP))
    # torch warns that global hooks fire once more for its compile wrapper: ours filter by identity.
    warnings.filterwarnings("ignore", message=r"Using `torch.compile\(module\)` when there are global hooks")


class Capture:
    """The hooks, the layer table they build, and the outputs they hold for the current sample."""

    def __init__(self, model: nn.Module, modules: list[tuple[str, nn.Module]], owner: Owner) -> None:
        self.model = model
        self._owner = owner
        self._names = {id(m): n for n, m in modules}
        self._modules = {id(m): m for _, m in modules}
        self._layer_ids = frozenset(self._modules)
        self.layers: list[Layer] = []
        self._slot: dict[tuple[int, int], int] = {}
        self._calls: dict[int, int] = {}
        self.records: list[Record | None] = []
        self.offload: Offload | None = None  # CPU models only: reductions off the training thread
        self._held: list[Held] = []
        self._held_bytes = 0
        self.building = True  # the first training forward builds the layer table
        self.hits = 0  # layers captured in the current forward
        self.step_hits = 0  # and in the current step
        self.armed = True  # this step is sampled
        self.captured = False  # this step's sample is taken: later forwards (micro-batches) skipped
        self.compiled = False  # a compiled forward was seen: the hooks stay, the flag decides
        # What a compiled graph reads (dynamo guards it): armed and not yet captured.
        self._trace_armed = True
        # (module id, output) appended by traced hooks; mutated in place only, as dynamo guards it.
        self._sink: list[tuple[int, Any]] = []
        self._handles: list[Any] = []
        self._outer: nn.Module | None = None  # the module whose forward is under way, if any
        # Whether that forward is training (grad on, train mode): its layers are read even where
        # the forward itself turns gradients off, as reentrant activation checkpointing does.
        self._outer_training = False
        self.layer_calls = 0  # watched layers' training calls seen, ever
        self._noted: set[int] = set()
        # Bound once: dynamo guards the hooks' identity, a new bound method each time would recompile.
        self._pre_hook = self._on_input
        self._post_hook = self._on_output

    # ------------------------------------------------------------------ state

    def set_armed(self, armed: bool) -> None:
        self.armed = armed
        self._sync_trace_flag()

    def _sync_trace_flag(self) -> None:
        flag = self.armed and not self.captured
        if self._trace_armed != flag:  # a write only on change: nothing for dynamo to see otherwise
            self._trace_armed = flag

    def set_hooks(self, on: bool) -> None:
        """Register or remove the global hooks (a compiled model keeps them: see the module doc)."""
        if on and not self._handles:
            keep_out_of_dynamo()
            self._handles = [
                module_hooks.register_module_forward_pre_hook(self._pre_hook),
                module_hooks.register_module_forward_hook(self._post_hook),
            ]
        elif not on and self._handles and not self.compiled:
            self.remove_hooks()

    def remove_hooks(self) -> None:
        for handle in self._handles:
            with contextlib.suppress(Exception):
                handle.remove()
        self._handles = []

    def new_step(self) -> None:
        self._outer = None
        self._calls.clear()
        self.hits = self.step_hits = 0
        self.captured = False
        self.records = [None] * len(self.layers)

    def new_forward(self) -> None:
        self._calls.clear()
        if self._held:  # the last forward raised before its end: its outputs go now
            self.dispatch(None)
        self.hits = 0

    @property
    def has_held(self) -> bool:
        return bool(self._held) or bool(self._sink)

    # ------------------------------------------------------------------ hooks (hot path)

    def _is_root(self, module: nn.Module) -> bool:
        """The model, or the module ``torch.compile`` wrapped it in (whose hooks run eagerly)."""
        return module is self.model or (
            type(module).__name__ == "OptimizedModule" and getattr(module, "_orig_mod", None) is self.model
        )

    def _on_input(self, module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling() or not self._is_root(module):
            return
        # The outermost of the model and its wrapper marks the forward; the other is nested in it.
        # (A forward that raised left its module here: the same module starting again is new.)
        if self._outer is not None and module is not self._outer:
            return
        try:
            self._owner.forward_started()
        except Exception as exc:
            self._owner.fault("forward", exc)
        self._outer = module  # after: a step boundary in forward_started starts afresh
        self._outer_training = self.model.training and torch.is_grad_enabled()

    def _on_output(self, module: nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling():
            # Our modules first: a graph of another model in the process never reads (nor guards
            # on) the flag, so it is not recompiled when the flag changes.
            # The flag last: an evaluation graph (no_grad, eval) never reads it, nor recompiles on it.
            if (
                id(module) in self._layer_ids
                and torch.is_grad_enabled()
                and self.model.training
                and self._trace_armed
            ):
                self._sink.append((id(module), output))
            elif (
                module is self.model and torch.is_grad_enabled() and self.model.training and self._trace_armed
            ):
                # The whole forward ran in a graph (a compiled train step): the graph itself
                # marks the sample taken, so its next forwards (micro-batches) add nothing until
                # a step boundary of ours re-arms it (mon.step(), or an eager optimizer step).
                self._trace_armed = False
            return
        if self.armed and not self.captured and id(module) in self._layer_ids:
            self._capture(module, args, output)
        if module is self._outer:
            self._outer = None
            try:
                self._owner.forward_ended(output)
            except Exception as exc:
                self._owner.fault("forward", exc)

    def _capture(self, module: nn.Module, args: Any, output: Any, *, traced: bool = False) -> None:
        started = time.perf_counter()
        try:
            # A traced hook judged it when the graph ran; drained later, grad mode is another's
            # (the optimizer's no_grad step).
            training = traced or (
                self._outer_training
                if self._outer is not None
                else self.model.training and torch.is_grad_enabled()
            )
            if not training:
                return  # evaluation passes are not training steps, whatever model.training says
            mid = id(module)
            call = self._calls.get(mid, 0)
            self._calls[mid] = call + 1
            self.layer_calls += 1
            slot = self._slot.get((mid, call))
            tensor = first_float_tensor(output)
            if tensor is None:
                return
            if not readable(tensor):
                # Sparse, meta or nested: that layer alone goes without figures; never a fault.
                if mid not in self._noted:
                    self._noted.add(mid)
                    log.debug(
                        "icsmon: %s returns a %s tensor; left out", type(module).__name__, tensor.layout
                    )
                return
            if slot is None:
                if not self.building:
                    return
                slot = self._add_layer(module, call, tensor)
            layer = self.layers[slot]
            self.hits += 1
            self.step_hits += 1
            source = self._relu_of_held(module, args) if self.offload is not None else None
            if source is not None:
                # Its figures come from its input, which the offload thread reads anyway: the
                # ReLU's own output is never read, and holds no bytes of its own.
                self._held.append(Held(slot, source.tensor, source.version, False, source))
            elif self.offload is not None and tensor.is_cpu and self._may_hold(tensor):
                # Handed to the offload thread at the end of the forward (see offload.py); an
                # output that is changed in place later in the forward is copied first.
                held = tensor.detach().clone() if layer.copy else tensor.detach()
                self._held.append(Held(slot, held, held._version, False))
                self._held_bytes += held.nbytes
            else:
                self.records[slot] = reduce_output(tensor, layer.unit_dim, layer.sat)
                if self.building and tensor.is_cpu and not tensor.is_inference():
                    # Kept until the forward ends only to learn which outputs change in place.
                    self._held.append(Held(slot, tensor.detach(), tensor._version, True))
        except Exception as exc:
            self._owner.fault("hook", exc)
        self._owner.spend(time.perf_counter() - started)

    def _relu_of_held(self, module: nn.Module, args: Any) -> Held | None:
        """The held output this ReLU was given, unchanged since its hook; None for any other call.

        Why: on a Linear -> ReLU stack half the outputs are ReLUs of the other half. Reduced from
        the input, a ReLU's figures cost the offload thread no read of their own and its output is
        never held for it (``benchmarks/README.md``). The proof asked is strict, so only the plain
        case takes it: a non-inplace ``nn.ReLU`` with no hooks of its own and none global but ours
        (another hook could have replaced the output we are given), whose one argument is the very
        memory (pointer, shape, strides, dtype, version, no lazy negation) of the output held just
        before it. Anything else is held as its own output.
        """
        if (
            type(module) is not nn.ReLU
            or module.inplace
            or not self._held
            or not isinstance(args, tuple)
            or len(args) != 1
            or len(module_hooks._global_forward_hooks) != 1  # global hooks run first: ours alone
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

    # ------------------------------------------------------------------ the end of a forward

    def end_forward(self, output: Any) -> None:
        """Read what a compiled graph left, hand the held outputs over, and mark the sample taken."""
        self.drain_sink()
        if self._held:
            self.dispatch(output)
        if self.hits and self.armed:
            # One forward per sample: later forwards of the step (gradient accumulation's
            # micro-batches) are skipped, and the sample is the step's first.
            self.captured = True
            self._sync_trace_flag()

    def drain_sink(self) -> None:
        if not self._sink:
            return
        self.compiled = True
        items = list(self._sink)
        self._sink.clear()
        for mid, output in items:
            module = self._modules.get(mid)
            if module is not None:
                self._capture(module, None, output, traced=True)

    def _add_layer(self, module: nn.Module, call: int, tensor: torch.Tensor) -> int:
        base = self._names.get(id(module), type(module).__name__)
        name = base if call == 0 else f"{base}#{call}"
        shape = tuple(int(d) for d in tensor.shape)
        previous = (self.layers[-1].unit_dim, tuple(self.layers[-1].info.shape)) if self.layers else None
        kind = layer_kind(module)
        info = protocol.LayerInfo(name=name, type=type(module).__name__, shape=shape, kind=kind)
        layer = Layer(
            name, module, call, info, unit_dim(module, tensor.ndim, previous, shape), saturation_mode(kind)
        )
        self.layers.append(layer)
        self.records.append(None)
        self._slot[(id(module), call)] = len(self.layers) - 1
        return len(self.layers) - 1

    def _may_hold(self, tensor: torch.Tensor) -> bool:
        if tensor.is_inference():  # no version counter: nothing would tell us it changed
            return False
        assert self.offload is not None
        return self.offload.outstanding + self._held_bytes + tensor.nbytes <= HOLD_LIMIT

    def dispatch(self, output: Any) -> None:
        """Send the held outputs of a finished forward to the offload thread (some inline)."""
        held, self._held, self._held_bytes = self._held, [], 0
        # The model's own output goes back to user code, which may change it in place at any time.
        escaping = tensor_storages(output)
        jobs: list[Held] = []
        placed: dict[int, Held] = {}  # id of a held output -> the job that reads it
        for h in held:
            layer = self.layers[h.slot]
            if h.source is not None:
                # A ReLU of the output before it: read with that output's job, or not at all (the
                # input changed in place; the ReLU's own output did not, so no copy is learnt).
                job = placed.get(id(h.source))
                if job is not None:
                    jobs.append(Held(h.slot, job.tensor, job.version, False, job))
                continue
            if h.tensor._version != h.version:
                # Changed in place after its hook (a Linear feeding an in-place ReLU, a residual
                # add): from now on this layer is copied in its hook. This sample goes without it.
                layer.copy = True
            elif h.reduced:
                continue
            elif self.offload is None:
                self.records[h.slot] = reduce_output(h.tensor, layer.unit_dim, layer.sat)
            elif h.tensor.untyped_storage().data_ptr() in escaping:
                # A copy goes instead: one pass here, where reducing it would take eight.
                copy = h.tensor.detach().clone()
                placed[id(h)] = Held(h.slot, copy, copy._version, False)
                jobs.append(placed[id(h)])
            else:
                placed[id(h)] = h
                jobs.append(h)
        if jobs and self.offload is not None:
            nbytes = sum(h.tensor.nbytes for h in jobs if h.source is None)  # a ReLU's is its input's
            self.offload.submit(functools.partial(self._reduce_held, self.records, jobs), nbytes)

    def _reduce_held(self, records: list[Record | None], jobs: list[Held]) -> None:
        """On the offload thread: reduce the held outputs, keeping each only if nothing changed it."""
        layers = [self.layers[h.slot] for h in jobs]
        with torch.no_grad():  # grad mode is per thread: this one's is on
            try:
                reduced = reduce_outputs(
                    [
                        (h.tensor, la.unit_dim, la.sat, h.source is not None)
                        for h, la in zip(jobs, layers, strict=True)
                    ]
                )
            except Exception:
                # One output no route can take costs that layer alone: the rest go one by one.
                # One fault a sample, however many layers failed.
                failures: list[Exception] = []
                reduced = [_reduce_alone(h, layer, failures) for h, layer in zip(jobs, layers, strict=True)]
                if failures:
                    self._owner.offload_fault(failures[0])
        for h, layer, record in zip(jobs, layers, reduced, strict=True):
            if h.tensor._version == h.version:
                records[h.slot] = record
            elif h.source is None:  # a ReLU read from its input: that input's layer learns the copy
                layer.copy = True

    def table(self) -> tuple[protocol.LayerInfo, ...]:
        return tuple(layer.info for layer in self.layers)

    def finish_table(self) -> None:
        """The layer table is complete: from now on only its layers are read."""
        self.building = False
        if all(r is None or r.device.type == "cpu" for r in self.records):
            self.offload = Offload(self._owner.offload_fault)


def _reduce_alone(h: Held, layer: Layer, failures: list[Exception]) -> Record | None:
    try:
        return reduce_output(
            torch.relu(h.tensor) if h.source is not None else h.tensor, layer.unit_dim, layer.sat
        )
    except Exception as exc:
        failures.append(exc)
        return None
