"""Where a training step ends, and what marks it.

In the order they are trusted: ``Monitor.step()`` once the user calls it; otherwise PyTorch's
global optimizer step hook, for the first optimizer holding the model's parameters that steps (a
second one, or a wrapper's inner optimizer, steps within the same training step); with neither (a
hand-written update), each training forward that follows a backward is a step, and the agent says
so once. Before the first optimizer step, a forward after a backward could also be a micro-batch of
gradient accumulation: while the gradients of that backward are still there and the parameters
unchanged, it is taken for one.
"""

from __future__ import annotations

import weakref
from typing import Literal

import torch
from torch import nn

#: With no optimizer step or ``step()`` seen, after this many steps counted from forwards (or this
#: many forwards in one step), the agent says that it counts each training forward as a step.
FORWARD_STEPS_AFTER = 16

#: How the steps are marked: not yet known, ``optimizer.step()``, ``Monitor.step()``, each forward.
StepSource = Literal["unknown", "optimizer", "user", "forward"]


class StepMarks:
    """Follows the job's step marks; the monitor asks it whether a step just ended."""

    def __init__(self, model: nn.Module) -> None:
        self.source: StepSource = "unknown"
        self.forwards = 0  # training forwards since the last step boundary
        self.closed_by_optimizer = False  # the optimizer hook closed the step and no forward followed
        self.backward_seen = False  # a backward ran since the last training forward
        # Weak keys: an optimizer that is dropped and re-created must not inherit a verdict by id.
        self._owned: weakref.WeakKeyDictionary[torch.optim.Optimizer, bool] = weakref.WeakKeyDictionary()
        self._leader: weakref.ref[torch.optim.Optimizer] | None = None
        self.new_leader = ""  # the type of an optimizer that just became the one marking steps
        self._params = {id(p) for p in model.parameters()}
        self._probe = next((p for p in model.parameters() if p.requires_grad), None)
        self._probe_version = self._probe._version if self._probe is not None else 0

    @property
    def by_forwards(self) -> bool:
        """Whether forwards may end steps (so the forward hooks must stay to see them)."""
        return self.source in ("unknown", "forward")

    def forward_begins(self, step: int) -> tuple[bool, bool]:
        """A training forward begins: (whether the last one was a step, whether to say so now).
        The caller counts this forward (:meth:`counted`) after the boundary that may follow."""
        self.closed_by_optimizer = False
        ends = bool(self.forwards) and self.by_forwards and self.backward_seen and self._new_step()
        self.backward_seen = False
        many = step >= FORWARD_STEPS_AFTER or self.forwards >= FORWARD_STEPS_AFTER
        announce = ends and self.source == "unknown" and many
        if announce:
            self.source = "forward"
        return ends, announce

    def counted(self) -> None:
        self.forwards += 1

    def backward_ended(self) -> None:
        self.backward_seen = True

    def _new_step(self) -> bool:
        if self.source == "forward":
            return True
        probe = self._probe
        if probe is None or probe.grad is None:
            return True  # the gradients were cleared: a new step
        updated = probe._version != self._probe_version  # an update in place under no_grad
        self._probe_version = probe._version
        return updated or self.forwards >= FORWARD_STEPS_AFTER

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """An optimizer stepped: whether that ends a step of this model (the leader's steps do)."""
        if self.source == "user":
            return False
        if not self.owns(optimizer):
            return False
        leader = self._leader() if self._leader is not None else None
        if leader is None:
            self._leader = weakref.ref(optimizer)
            self.new_leader = type(optimizer).__name__
        elif leader is not optimizer:
            return False
        self.source = "optimizer"
        self.closed_by_optimizer = True
        return True

    def owns(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether the optimizer holds any of the model's parameters (a GAN's other optimizer does not)."""
        owned = self._owned.get(optimizer)
        if owned is None:
            owned = any(id(p) in self._params for g in optimizer.param_groups for p in g["params"])
            self._owned[optimizer] = owned
        return owned

    def learning_rate(self) -> float | None:
        """The stepping optimizer's first learning rate, when it is a plain number (a tensor one
        would cost a host sync to read)."""
        leader = self._leader() if self._leader is not None else None
        if leader is None or not leader.param_groups:
            return None
        lr = leader.param_groups[0].get("lr")
        return float(lr) if isinstance(lr, float | int) and not isinstance(lr, bool) else None

    def user_step(self) -> bool:
        """``Monitor.step()`` was called: whether the step it closes was closed already (by the
        optimizer hook just before, the first time), so that it must not be counted twice."""
        if self.source == "user":
            return False
        self.source = "user"  # from now on the user marks steps; the hooks stand down
        return self.closed_by_optimizer

    def boundary(self) -> None:
        self.forwards = 0
        if self._probe is not None:
            self._probe_version = self._probe._version
