"""Where a training step ends, and what marks it.

In the order they are trusted: ``Monitor.step()`` once the user calls it; otherwise PyTorch's
global optimizer step hook, for optimizers that hold the model's parameters (so the two lines alone
work); with neither (a hand-written update), each training forward is a step, and the agent says so
once. Before the first optimizer step a second forward cannot be told from a micro-batch of gradient
accumulation except by the gradients: still there, it is a micro-batch.
"""

from __future__ import annotations

import weakref
from typing import Literal

import torch
from torch import nn

#: Training forwards counted as steps, with no optimizer step or ``step()`` seen, before the agent
#: says that it counts them so (an accumulating job's first optimizer step may still come).
FORWARD_STEPS_AFTER = 16

#: How the steps are marked: not yet known, ``optimizer.step()``, ``Monitor.step()``, each forward.
StepSource = Literal["unknown", "optimizer", "user", "forward"]


class StepMarks:
    """Follows the job's step marks; the monitor asks it whether a step just ended."""

    def __init__(self, model: nn.Module) -> None:
        self.source: StepSource = "unknown"
        self.forwards = 0  # training forwards since the last step boundary
        self.closed_by_optimizer = False  # the optimizer hook closed the step and no forward followed
        # Weak keys: an optimizer that is dropped and re-created must not inherit a verdict by id.
        self._owned: weakref.WeakKeyDictionary[torch.optim.Optimizer, bool] = weakref.WeakKeyDictionary()
        self._params = {id(p) for p in model.parameters()}
        self._probe = next((p for p in model.parameters() if p.requires_grad), None)

    @property
    def by_forwards(self) -> bool:
        """Whether forwards may end steps (so the forward hooks must stay to see them)."""
        return self.source in ("unknown", "forward")

    def forward_begins(self, step: int) -> tuple[bool, bool]:
        """A training forward begins: (whether the last one was a step, whether to say so now).
        The caller counts this forward (:meth:`counted`) after the boundary that may follow."""
        self.closed_by_optimizer = False
        ends = bool(self.forwards) and self.by_forwards and self._new_step_by_forward()
        announce = ends and self.source == "unknown" and step >= FORWARD_STEPS_AFTER
        if announce:
            self.source = "forward"
        return ends, announce

    def counted(self) -> None:
        self.forwards += 1

    def _new_step_by_forward(self) -> bool:
        probe = self._probe
        return probe is None or probe.grad is None or self.forwards >= FORWARD_STEPS_AFTER

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """An optimizer stepped: whether that ends a step of this model."""
        if self.source == "user":
            return False
        owned = self._owned.get(optimizer)
        if owned is None:
            owned = any(id(p) in self._params for g in optimizer.param_groups for p in g["params"])
            self._owned[optimizer] = owned
        if owned:
            self.source = "optimizer"
            self.closed_by_optimizer = True
        return owned

    def user_step(self) -> bool:
        """``Monitor.step()`` was called: whether the step it closes was closed already (by the
        optimizer hook just before, the first time), so that it must not be counted twice."""
        if self.source == "user":
            return False
        self.source = "user"  # from now on the user marks steps; the hooks stand down
        return self.closed_by_optimizer

    def boundary(self) -> None:
        self.forwards = 0
