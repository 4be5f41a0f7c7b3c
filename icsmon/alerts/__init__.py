"""The viewer's side of the alerts: threshold flags (:mod:`.config`) and the rule across the ranks
of one job (:mod:`.ranks`). The rules themselves are the job's: ``icsmon_agent.alerts``."""

from icsmon_agent.alerts.model import Alert, AlertChange

__all__ = ["Alert", "AlertChange"]
