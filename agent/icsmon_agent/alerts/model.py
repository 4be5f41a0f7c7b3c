"""What an alert is; shared by the job's rule engine, the wire, ``tail``, the terminal app and replay."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

Severity = Literal["warning", "critical"]
SEVERITIES: tuple[Severity, ...] = ("warning", "critical")
#: The ``type`` of an alert change's JSON, which is also the name of the wire event carrying it.
ALERT_TYPES = ("alert", "alert_cleared")
#: The longest text an alert carries on the wire (a message, a hint, a layer name).
MAX_TEXT = 1_000


def fmt(value: float | None, digits: int = 3) -> str:
    """A figure as a line of text shows it: ``-`` for none, ``inf``, 3 significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
        return f"{value:.{max(digits - 1, 1)}e}"
    return f"{value:.{digits}g}"


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
    """An alert firing (``cleared`` False) or clearing (``cleared`` True, ``step`` = when it cleared).

    ``replayed``: re-sent by the job to a viewer that just subscribed (``active``: and still in
    force), not news.
    """

    alert: Alert
    cleared: bool = False
    step: int = 0
    replayed: bool = False
    active: bool = False

    def to_json(self) -> dict[str, Any]:
        out = (
            self.alert.to_json()
            if not self.cleared
            else {
                "type": "alert_cleared",
                "rule": self.alert.rule,
                "layer": self.alert.layer,
                "step": self.step,
                "run": self.alert.run,
                "rank": self.alert.rank,
            }
        )
        if self.replayed:
            out["replayed"] = True
        return out


def _text(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"alert {key!r} is not a string")
    return value[:MAX_TEXT]


def _whole(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > 2**62:
        raise ValueError(f"alert {key!r} is not a whole number")
    return value


def change_from_json(obj: dict[str, Any], layer_index: int = 0, replayed: bool = False) -> AlertChange:
    """The inverse of :meth:`AlertChange.to_json`, for what came over the wire: every field is
    checked, texts are cut to :data:`MAX_TEXT`; raises ValueError for what is not an alert."""
    kind = obj.get("type")
    if kind not in ALERT_TYPES:
        raise ValueError(f"not an alert: type {kind!r}")
    rule, layer, step = _text(obj, "rule"), _text(obj, "layer"), _whole(obj, "step")
    if not rule:
        raise ValueError("alert without a rule")
    if kind == "alert_cleared":
        gone = Alert(
            rule,
            layer,
            layer_index,
            step,
            "warning",
            math.nan,
            "",
            "",
            _text(obj, "run"),
            _whole(obj, "rank"),
        )
        return AlertChange(gone, cleared=True, step=step, replayed=replayed)
    severity = obj.get("severity")
    if severity not in SEVERITIES:
        raise ValueError(f"alert severity {severity!r}")
    value = obj.get("value")
    if value is None:
        value = math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("alert value is not a number")
    layers = obj.get("layers", [])
    if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
        raise ValueError("alert layers is not a list of names")
    alert = Alert(
        rule=rule,
        layer=layer,
        layer_index=layer_index,
        step=step,
        severity=severity,
        value=float(value),
        message=_text(obj, "message"),
        hint=_text(obj, "hint"),
        run=_text(obj, "run"),
        rank=_whole(obj, "rank"),
        figure=_text(obj, "figure"),
        layers=tuple(x[:MAX_TEXT] for x in layers),
    )
    return AlertChange(alert, replayed=replayed, active=replayed and obj.get("active") is True)
