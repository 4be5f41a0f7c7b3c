"""Every step's loss looked at, sampled or not, without a host sync: the job's cheapest sentinel.

The sampling cadence keeps the agent's cost near 1%, which on a fast job means a sample every few
steps; a divergence can go from calm to NaN between two samples. So each step's loss is read (a
CPU loss at once; a CUDA loss copied without blocking into pinned memory and read at a later step,
once its event has passed) and the monitor is told when it is NaN/Inf, or when it rose well above
its own recent level: then every step is sampled for a while, and the rules see the explosion
step by step before the loss is lost.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

#: CUDA losses in flight at once (one a step); past it a step's loss is not looked at.
IN_FLIGHT = 4
#: A loss this many times the median of the recent ones (and ``RISE_HISTORY`` of them known) is rising.
RISE_FACTOR = 3.0
RISE_HISTORY = 8
RECENT = 32


@dataclass(frozen=True)
class Verdict:
    step: int
    nonfinite: bool  # NaN/Inf
    rising: bool  # well above its recent level


class LossGuard:
    def __init__(self) -> None:
        self._flights: deque[tuple[int, torch.Tensor, Any, bool]] = deque()  # (step, host, event, a loss?)
        self._recent: deque[float] = deque(maxlen=RECENT)
        self.first_nonfinite: int | None = None  # the first step whose loss was NaN/Inf

    def check(self, step: int, loss: Any, *, is_loss: bool = True) -> list[Verdict]:
        """Look at ``step``'s loss (or, ``is_loss=False``, any one number that is NaN/Inf when
        something is: only its finiteness is judged); what is known now of this step's and
        earlier steps' (only the noteworthy: NaN/Inf or rising)."""
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                return self._land()
            if loss.device.type == "cuda":
                self._launch(step, loss, is_loss)
                return self._land()
            if loss.device.type != "cpu":
                return self._land()  # reading it would wait on the device (MPS, XLA): not looked at
            value = float(loss.detach())
        elif isinstance(loss, (int, float)):
            value = float(loss)
        else:
            return self._land()
        return [*self._land(), *self._judge(step, value, is_loss)]

    def _judge(self, step: int, value: float, is_loss: bool) -> list[Verdict]:
        if not math.isfinite(value):
            if self.first_nonfinite is None or step < self.first_nonfinite:
                self.first_nonfinite = step
            return [Verdict(step, nonfinite=True, rising=False)]
        if not is_loss:
            return []
        rising = len(self._recent) >= RISE_HISTORY and value > RISE_FACTOR * abs(
            statistics.median(self._recent)
        )
        self._recent.append(value)
        return [Verdict(step, nonfinite=False, rising=True)] if rising else []

    def _launch(self, step: int, loss: torch.Tensor, is_loss: bool) -> None:
        if len(self._flights) >= IN_FLIGHT:
            return
        with torch.no_grad():
            host = torch.empty((), dtype=torch.float32, pin_memory=True)
            host.copy_(loss.detach().reshape(()), non_blocking=True)
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record()
        self._flights.append((step, host, done, is_loss))

    def _land(self) -> list[Verdict]:
        out: list[Verdict] = []
        while self._flights and self._flights[0][2].query():
            step, host, _, is_loss = self._flights.popleft()
            out += self._judge(step, float(host), is_loss)
        return out
