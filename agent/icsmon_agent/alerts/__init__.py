"""The alert rules, one definition for the job and the viewer: pure functions of a stream's recent
figures (:mod:`.rules`), persistence and hysteresis on top (:mod:`.engine`), thresholds
(:mod:`.config`) and hints written from the network's shape (:mod:`.hints`). numpy only: the agent
runs them on its own thread for every sample it takes (:mod:`.judge`)."""

from .config import ConfigError, Thresholds
from .model import Alert, AlertChange

__all__ = ["Alert", "AlertChange", "ConfigError", "Thresholds"]
