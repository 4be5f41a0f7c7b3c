"""icsmon's in-process agent: ``mon = icsmon_agent.watch(model)`` streams every layer's figures.

Importing this package is cheap and side-effect free: torch is imported by :func:`watch` (the host
process brings it), and neither Textual nor Rich is ever imported. The wire protocol
(:mod:`icsmon_agent.protocol`) and discovery (:mod:`icsmon_agent.discovery`) live here, defined
once, and the viewer imports them from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Monitor", "__version__", "watch"]

if TYPE_CHECKING:
    from .monitor import Monitor, watch
else:

    def watch(model: Any, **kwargs: Any) -> Any:
        """Watch every layer of ``model``; see :func:`icsmon_agent.monitor.watch`."""
        from .monitor import watch as _watch

        return _watch(model, **kwargs)

    def __getattr__(name: str) -> Any:
        if name == "Monitor":
            from .monitor import Monitor

            return Monitor
        raise AttributeError(f"module 'icsmon_agent' has no attribute {name!r}")
