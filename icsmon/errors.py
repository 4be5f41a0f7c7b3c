"""The viewer's one base error: whatever a command cannot do, said in one line with an exit status.

``cli.main`` catches :class:`IcsmonError` once and prints ``icsmon: <message>``; a command may
still catch a subclass itself where it has something to add.
"""

from __future__ import annotations


class IcsmonError(Exception):
    """A failure the person can act on; the message says what to do."""

    exit_code = 1


class TargetError(IcsmonError):
    """The target cannot be resolved or reached; the message says what to do."""
