"""icsmon: the viewer side (CLI, subscriber, store, alert rules, SSH, demo, and the terminal app).

Only :mod:`icsmon.tui` imports Textual. The wire protocol and discovery are imported from
:mod:`icsmon_agent`, where they are defined once.
"""

__version__ = "0.1.0"
