"""Recordings: the wire's messages in a file, to replay, print or export after the job is gone.

Format, version 1 (``docs/design.md`` has it too). Append-only; a file cut off by a kill stays
readable up to its last whole record:

* the magic line ``ICSMON-RECORDING 1\\n``;
* then records, each: ``<f8 time received> <u4 frames> (<u4 length> bytes) * frames``, little
  endian; the frames are the wire's ``[topic, JSON header, float32 body]``.

The agent writes its own with ``watch(model, record=PATH)`` or ``ICSMON_RECORD=PATH``, no viewer
needed; ``icsmon record`` writes what a viewer receives. Bounded: past ``max_bytes`` the file is
rotated (``PATH`` → ``PATH.1`` → … ``PATH.<keep>``, the oldest dropped) and the new file starts
with the current layer table, so each file replays alone.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

MAGIC = b"ICSMON-RECORDING 1\n"
RECORD_HEAD = struct.Struct("<dI")
FRAME_HEAD = struct.Struct("<I")
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_KEEP = 4


def _lock(fh: BinaryIO) -> bool:
    """Take the file for this writer alone (an advisory lock, released when it closes); False if
    another writer holds it. Where locks are not to be had, every writer takes it."""
    try:
        import fcntl

        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except (ImportError, OSError):
        pass
    return True


class Recorder:
    """Appends wire messages to ``path``, rotating past ``max_bytes`` (keeping ``keep`` old files)."""

    def __init__(
        self, path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES, keep: int = DEFAULT_KEEP
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self._preamble = 0  # bytes at the top of the file (magic, the tables again) before new data
        self.schemas: dict[tuple[str, int], list[bytes]] = {}  # per stream, again at the top of a new file
        self._file = self._open()

    def _open(self) -> BinaryIO:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # 0600 like every file of ours, and never through a link: a recording appends to a file
        # only it made, not to whatever a link there points at.
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
        fh = os.fdopen(os.open(self.path, flags, 0o600), "ab")
        if not _lock(fh):
            # Another writer has it (two jobs given one ICSMON_RECORD): two writers interleaving
            # in one file would make it unreadable past the first, so this one writes its own.
            fh.close()
            self.path = self.path.with_name(f"{self.path.name}.{os.getpid()}")
            fh = os.fdopen(os.open(self.path, flags, 0o600), "ab")
            _lock(fh)
        if fh.tell() == 0:
            fh.write(MAGIC)
        return fh

    def write(self, frames: Sequence[bytes], received: float | None = None) -> None:
        data = [bytes(f) for f in frames]
        if len(data) == 3 and data[0].endswith(b".schema"):
            try:
                header = json.loads(data[1])
                self.schemas[(str(header["run"]), int(header["rank"]))] = data
            except (ValueError, KeyError, TypeError):
                pass
            while len(self.schemas) > 256:
                self.schemas.pop(next(iter(self.schemas)))
        record = RECORD_HEAD.pack(time.time() if received is None else received, len(data))
        record += b"".join(FRAME_HEAD.pack(len(f)) + f for f in data)
        self._file.write(record)
        self._file.flush()
        if self._file.tell() - self._preamble > self.max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        self._file.close()
        for i in range(self.keep, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            newer = self.path.with_name(f"{self.path.name}.{i - 1}") if i > 1 else self.path
            if newer.exists():
                os.replace(newer, older)
        self._file = self._open()
        for frames in list(self.schemas.values()):
            record = RECORD_HEAD.pack(time.time(), len(frames))
            self._file.write(record + b"".join(FRAME_HEAD.pack(len(f)) + f for f in frames))
        self._file.flush()
        self._preamble = self._file.tell()  # a new file rotates on new data only, never on its tables

    def close(self) -> None:
        self._file.close()
