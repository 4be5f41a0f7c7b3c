"""What an alert is; shared by the rule engine, ``tail``, the terminal app and replay."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

Severity = Literal["warning", "critical"]


@dataclass(frozen=True)
class Alert:
    rule: str  # vanishing | exploding | saturation | dead_relu | nonfinite | shift
    layer: str
    layer_index: int  # depth order in the layer table
    step: int  # the step at which it fired
    severity: Severity
    value: float  # the figure that tripped the rule
    message: str  # one line: layer, figure, value, step
    hint: str  # what to try
    # Added by the rule engine (defaults keep older constructors working):
    run: str = ""
    rank: int = 0
    figure: str = ""  # the figure that tripped the rule: std, grad_norm, dead_frac, ...
    layers: tuple[str, ...] = ()  # every layer where the condition held when it fired, depth order

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "alert",
            "rule": self.rule,
            "layer": self.layer,
            "step": self.step,
            "severity": self.severity,
            "value": self.value if math.isfinite(self.value) else None,
            "message": self.message,
            "hint": self.hint,
            "run": self.run,
            "rank": self.rank,
            "figure": self.figure,
            "layers": list(self.layers) or [self.layer],
        }


@dataclass(frozen=True)
class AlertChange:
    """An alert firing (``cleared`` False) or clearing (``cleared`` True, ``step`` = when it cleared)."""

    alert: Alert
    cleared: bool = False
    step: int = 0

    def to_json(self) -> dict[str, Any]:
        if not self.cleared:
            return self.alert.to_json()
        return {
            "type": "alert_cleared",
            "rule": self.alert.rule,
            "layer": self.alert.layer,
            "step": self.step,
            "run": self.alert.run,
            "rank": self.alert.rank,
        }
