"""Alert rules: pure functions of a layer's recent figures, with hysteresis (no Textual here)."""

from icsmon.alerts.model import Alert, AlertChange

__all__ = ["Alert", "AlertChange"]
