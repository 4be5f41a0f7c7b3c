"""Small helpers shared by the subcommands."""

from __future__ import annotations

import argparse

from icsmon.printing import note

__all__ = ["error", "note", "positive_int"]


def positive_int(text: str) -> int:
    """An argparse type: a usage error (exit 2) rather than a late runtime one for 0 or less."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def error(message: str) -> int:
    """Print ``icsmon: message`` on stderr and return exit code 1."""
    note(message)
    return 1
