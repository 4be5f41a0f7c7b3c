"""The app's terminal going away: a Textual driver that survives it, and how to tell it happened.

Closing the window (or a dropped SSH session) hangs the terminal up. The app must then leave the
ordinary way, so that whoever started it (the demo, with its training jobs) cleans up. Textual
alone does not: its output thread dies on the first EIO, the next screen update blocks the event
loop on that thread's full queue, and its input thread reads end-of-file in a loop (~60% of a
core, measured) with nobody told.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

from textual.driver import Driver

if sys.platform != "win32":
    import termios

#: The exit status when the terminal went away: what a shell reports for a death by SIGHUP (1).
#: A literal: Windows has no signal.SIGHUP.
HANGUP_EXIT = 129
#: The errors of a terminal that is gone for good; any other (EAGAIN on a terminal somebody set
#: non-blocking, a full disk under a redirected stderr) loses only the text of that write.
_GONE = {errno.EIO, errno.ENXIO, errno.EPIPE, errno.EBADF}


class TerminalOut:
    """The file Textual's output thread writes to: once the terminal is gone, text is dropped
    (instead of the EIO ending the thread), so the event loop stays free to notice and leave."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self.gone = False

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                self._file.write(text)
            except OSError as exc:
                self.gone = exc.errno in _GONE
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self._file.flush()
            except OSError as exc:
                self.gone = exc.errno in _GONE

    def fileno(self) -> int:
        return int(self._file.fileno())

    def isatty(self) -> bool:
        return not self.gone and bool(self._file.isatty())


def hangup_safe(driver: type[Driver]) -> type[Driver]:
    """``driver`` (Textual's LinuxDriver) writing through :class:`TerminalOut`."""

    class HangupSafeDriver(driver):  # type: ignore[valid-type,misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # What LinuxDriver writes to: stderr, so that stdout may be redirected.
            self._file = TerminalOut(sys.__stderr__)

    return HangupSafeDriver


def input_tty() -> int | None:
    """The descriptor of the terminal the driver reads (stdin), or None if it is not one."""
    if sys.platform == "win32" or sys.__stdin__ is None:
        return None
    try:
        fd = sys.__stdin__.fileno()
        return fd if os.isatty(fd) else None
    except (OSError, ValueError):
        return None


def hung_up(fd: int) -> bool:
    """True once the terminal is gone: a hung-up terminal answers every query with EIO."""
    if sys.platform == "win32":
        return False
    try:
        termios.tcgetattr(fd)
    except (OSError, termios.error):
        return True
    return False
