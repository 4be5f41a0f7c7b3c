"""The job's loss scaler (``torch.amp.GradScaler``, also under Hugging Face's and Lightning's fp16).

Why: with a scaler the backward produces gradients multiplied by its scale (2**16 and up), so their
norms read thousands of times too large, move 2x at each scale change, and hide a vanishing
gradient. The scaler's current scale, on its device, divides the norms without a host sync. A step
whose scaled gradients overflowed is one the scaler skips on purpose: its norms are marked absent
and the sample says ``scaler_skipped``, so no rule takes the scaler's working for a fault.

The scaler is found without touching it. Under fp16 autocast, at the first training forward, among
the live ``GradScaler`` objects (one walk of the garbage collector's objects, once a run): the one
enabled, or the one of several whose scale the step then creates or updates. Otherwise on the stack:
the ``self`` of ``GradScaler.step`` when its ``optimizer.step()`` reaches our optimizer hook (and on
Python 3.13+, a local variable of the loop). Why the heap first: a scaler whose first steps all
overflow never calls ``optimizer.step()``, and those steps would go unseen.
"""

from __future__ import annotations

import gc
import sys
import weakref
from types import FrameType
from typing import Any

import torch

#: How many frames above the optimizer hook are looked at for the scaler's ``step``.
FRAMES = 8
#: A job whose first optimizer steps showed no scaler is not searched again (the walk's cost).
SEARCH_STEPS = 64


def _scaler_class() -> type | None:
    try:
        from torch.amp import GradScaler

        return GradScaler
    except Exception:  # an older torch without torch.amp.GradScaler
        return None


def _subclasses(cls: type) -> list[type]:
    found, subs = [cls], list[type](type.__subclasses__(cls))
    for sub in subs:
        found += _subclasses(sub)
    return found


def fp16_autocast(model: torch.nn.Module) -> bool:
    """Whether an fp16 autocast region is open now for the model's device (a loss scaler's need)."""
    first = next(model.parameters(), None)
    for kind in dict.fromkeys((first.device.type if first is not None else "cpu", "cuda", "cpu")):
        try:
            if torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.float16:
                return True
        except Exception:  # a device type this torch does not know
            continue
    return False


def _state(scaler: Any) -> int | None:
    """A scaler's scale tensor's version counter; None before its first ``scale()`` creates it."""
    scale = getattr(scaler, "_scale", None)
    return scale._version if isinstance(scale, torch.Tensor) else None


class ScalerWatch:
    """The job's loss scaler once seen, and its scale as a device tensor."""

    def __init__(self) -> None:
        self._scaler: weakref.ref[Any] | None = None
        self._searches = 0
        self._class = _scaler_class()
        self._heap_searched = False
        self._from_heap = False  # taken from the heap: the stack (GradScaler.step's self) may correct it
        # Live enabled scalers when several were: each with its state then (which one the job uses
        # shows when its state moves).
        self._candidates: list[tuple[weakref.ref[Any], int | None]] = []
        # (version, step) at the last optimizer step that marks steps. Each step ends with one
        # update() while one optimizer steps; with several, a loop may update after each, and the
        # count of updates says nothing certain: then no step is counted from them.
        self._mark: tuple[int, int] | None = None
        self._one_optimizer = True

    def search_heap(self) -> None:
        """Once a run, under fp16 autocast at the first training forward (step 0): the enabled
        ``GradScaler`` objects alive now."""
        if self.found or self._class is None or self._heap_searched:
            return
        self._heap_searched = True
        classes = _subclasses(self._class)
        scalers = [
            o
            for o in gc.get_referrers(*classes)  # instances refer to their class
            if type(o) in classes and getattr(o, "_enabled", False)
        ]
        if len(scalers) == 1:
            self._scaler, self._from_heap = weakref.ref(scalers[0]), True
        else:
            self._candidates = [(weakref.ref(o), _state(o)) for o in scalers]

    def resolve(self) -> None:
        """Choose among several candidates the one whose scale was created or updated since."""
        if self.found or not self._candidates:
            return
        moved = [ref for ref, state in self._candidates if (o := ref()) is not None and _state(o) != state]
        if len(moved) == 1:
            self._scaler, self._candidates = moved[0], []
        elif moved:  # several moved at once: watch those only
            self._candidates = [(ref, _state(ref())) for ref in moved]

    @property
    def found(self) -> bool:
        return self._scaler is not None and self._scaler() is not None

    def look(self, frame: FrameType | None = None) -> None:
        """Find a scaler among the locals of ``frame`` and the frames above it."""
        self.resolve()
        if (self.found and not self._from_heap) or self._class is None or self._searches >= SEARCH_STEPS:
            return
        self._searches += 1
        frame = frame or sys._getframe(1)
        for _ in range(FRAMES):
            if frame is None:
                return
            found = self._in(frame)
            if found is not None:
                if self._scaler is None or self._scaler() is not found:
                    self._mark = None  # another scaler's counter: marked afresh
                self._scaler, self._candidates, self._from_heap = weakref.ref(found), [], False
                return
            frame = frame.f_back

    def _in(self, frame: FrameType) -> Any:
        """The scaler a frame holds: the ``self`` of its own ``step``, or (Python 3.13 on) a local
        variable of the loop. Why not the loop's locals before 3.13: reading ``f_locals`` there
        stores a snapshot of them in the frame, which would keep that step's tensors alive for the
        rest of the run; the scaler's own frames end at once, and their snapshot with them."""
        assert self._class is not None
        own = frame.f_code.co_name in ("step", "_maybe_opt_step", "unscale_")
        if not own and sys.version_info < (3, 13):
            return None
        values = [frame.f_locals.get("self")] if own else list(frame.f_locals.values())
        # type(), not isinstance(): no user object's __class__ (a lazy proxy's) is asked.
        return next((v for v in values if issubclass(type(v), self._class)), None)

    def scale(self) -> torch.Tensor | None:
        """The scale the current gradients carry (a copy: ``update()`` changes it in place), or None
        when no scaler is known or it is disabled (bf16, fp32: a scale of one)."""
        self.resolve()
        scaler = self._scaler() if self._scaler is not None else None
        if scaler is None or not getattr(scaler, "_enabled", False):
            return None
        scale = getattr(scaler, "_scale", None)
        if not isinstance(scale, torch.Tensor):
            return None
        return scale.detach().reshape(-1)[:1].clone()

    def version(self) -> int | None:
        """A counter that moves each time the scaler's ``update()`` runs (once a step, skipped or
        not); 0 before its first ``scale()`` (which creates the scale at 0), None with no scaler."""
        self.resolve()
        scaler = self._scaler() if self._scaler is not None else None
        if scaler is None:  # several candidates: the one chosen will read as moved from 0
            return 0 if self._candidates else None
        return _state(scaler) or 0

    def other_optimizer_stepped(self) -> None:
        """An optimizer other than the one that marks the steps stepped."""
        self._one_optimizer = False

    def steps_unseen(self, step: int) -> int:
        """At the optimizer step that ends ``step`` (before its ``update()``), or at ``close()``
        (after the last): how many steps ended since the last one seen without our hooks seeing
        them (skipped by the scaler while unsampled), counted from the scaler's ``update()``s.
        The first optimizer step only sets the mark: before it each training forward was a step."""
        version = self.version()
        if version is None or not self.found or not self._one_optimizer:
            return 0  # (not found: several candidates, none chosen yet, and no counter to read)
        unseen = 0
        if self._mark is not None:
            updates, counted = version - self._mark[0], step - self._mark[1]
            unseen = max(0, updates - counted)
        self._mark = (version, step + unseen)
        return unseen


def unscaled(norms: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The norms divided by the scale, and whether the scaler skips this step (a scaled gradient
    overflowed): then the norms are NaN, absent. Device ops only: no host sync."""
    scale = scale.to(norms.device, norms.dtype)
    skipped = ~torch.isfinite(norms).all()
    return torch.where(skipped, torch.nan, norms / scale), skipped.to(torch.float32)
