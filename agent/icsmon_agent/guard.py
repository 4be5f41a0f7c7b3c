"""Every step's loss checked for NaN/Inf, sampled or not, without a host sync.

A CPU loss (or a number) is read at once. A CUDA loss is reduced to one flag on its device and
copied without blocking into pinned memory; the flag is read at a later step once its event has
passed, so a non-finite loss is known within a step or two and the training thread never waits.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch

#: Flags in flight at once (one a step); past it the oldest is read when ready, the newest waits.
IN_FLIGHT = 4


class LossGuard:
    def __init__(self) -> None:
        self._flights: deque[tuple[int, torch.Tensor, Any]] = deque()
        self.first_nonfinite: int | None = None  # the first step whose loss was NaN/Inf

    def check(self, step: int, loss: Any) -> int | None:
        """Look at ``step``'s loss; the step of a non-finite loss newly known now, else None."""
        if self.first_nonfinite is not None:
            return None
        if isinstance(loss, torch.Tensor):
            if loss.device.type == "cuda":
                self._launch(step, loss)
            elif loss.numel() and not bool(torch.isfinite(loss.detach()).all()):
                return self._found(step)
        elif isinstance(loss, (int, float)) and not math.isfinite(loss):
            return self._found(step)
        return self._land()

    def _launch(self, step: int, loss: torch.Tensor) -> None:
        if len(self._flights) >= IN_FLIGHT:
            return
        with torch.no_grad():
            bad = torch.logical_not(torch.isfinite(loss.detach()).all())
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(bad, non_blocking=True)
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record()
        self._flights.append((step, host, done))

    def _land(self) -> int | None:
        while self._flights and self._flights[0][2].query():
            step, host, _ = self._flights.popleft()
            if bool(host):
                return self._found(step)
        return None

    def _found(self, step: int) -> int:
        self.first_nonfinite = step
        self._flights.clear()
        return step
