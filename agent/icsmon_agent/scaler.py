"""The job's loss scaler (``torch.amp.GradScaler``, also under Hugging Face's and Lightning's fp16).

Why: with a scaler the backward produces gradients multiplied by its scale (2**16 and up), so their
norms read thousands of times too large, move 2x at each scale change, and hide a vanishing
gradient. The scaler's current scale, on its device, divides the norms without a host sync. A step
whose scaled gradients overflowed is one the scaler skips on purpose: its norms are marked absent
and the sample says ``scaler_skipped``, so no rule takes the scaler's working for a fault.

The scaler is found without touching it, on the stack: the ``self`` of ``GradScaler.step`` when its
``optimizer.step()`` reaches our optimizer hook (and on Python 3.13+, a local variable of the loop
that runs the first training forward). Until a first unskipped step has shown it, the norms are raw.
"""

from __future__ import annotations

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


class ScalerWatch:
    """The job's loss scaler once seen, and its scale as a device tensor."""

    def __init__(self) -> None:
        self._scaler: weakref.ref[Any] | None = None
        self._searches = 0
        self._class = _scaler_class()

    @property
    def found(self) -> bool:
        return self._scaler is not None and self._scaler() is not None

    def look(self, frame: FrameType | None = None) -> None:
        """Find a scaler among the locals of ``frame`` and the frames above it."""
        if self.found or self._class is None or self._searches >= SEARCH_STEPS:
            return
        self._searches += 1
        frame = frame or sys._getframe(1)
        for _ in range(FRAMES):
            if frame is None:
                return
            found = self._in(frame)
            if found is not None:
                self._scaler = weakref.ref(found)
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
        scaler = self._scaler() if self._scaler is not None else None
        if scaler is None or not getattr(scaler, "_enabled", False):
            return None
        scale = getattr(scaler, "_scale", None)
        if not isinstance(scale, torch.Tensor):
            return None
        return scale.detach().reshape(-1)[:1].clone()

    def version(self) -> int | None:
        """A counter that moves each time the scaler's ``update()`` runs (once a step, skipped or not)."""
        scaler = self._scaler() if self._scaler is not None else None
        scale = getattr(scaler, "_scale", None) if scaler is not None else None
        return scale._version if isinstance(scale, torch.Tensor) else None


def unscaled(norms: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The norms divided by the scale, and whether the scaler skips this step (a scaled gradient
    overflowed): then the norms are NaN, absent. Device ops only: no host sync."""
    scale = scale.to(norms.device, norms.dtype)
    skipped = ~torch.isfinite(norms).all()
    return torch.where(skipped, torch.nan, norms / scale), skipped.to(torch.float32)
