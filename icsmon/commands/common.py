"""Small helpers shared by the subcommands."""

from __future__ import annotations

import sys


def error(message: str) -> int:
    """Print ``icsmon: message`` on stderr and return exit code 1."""
    print(f"icsmon: {message}", file=sys.stderr, flush=True)
    return 1


def note(message: str) -> None:
    print(f"icsmon: {message}", file=sys.stderr, flush=True)
