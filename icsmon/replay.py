"""Reading recordings (format: :mod:`icsmon_agent.recording`) and playing them through a feed.

:func:`records` yields what a file holds up to its last whole record (a file cut off by a kill is
read up to there). :class:`ReplayFeed` is a :class:`~icsmon.feed.Feed` whose messages come from
a recording at the pace they were received (times ``speed``), with play/pause and seek, so the
terminal app, ``tail``'s printer and the rules take a recording exactly as a live stream.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from icsmon.errors import IcsmonError
from icsmon.feed import Feed
from icsmon.subscriber import Decoding
from icsmon_agent.protocol import TOPIC_PREFIX, Message
from icsmon_agent.recording import FRAME_HEAD, MAGIC, RECORD_HEAD

#: A record larger than this is taken as damage, not data (the largest valid message is far below).
MAX_RECORD_BYTES = 1 << 30
SPEEDS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0)


class RecordingError(IcsmonError):
    """Not a recording, or not readable."""


def records(path: str | Path, decoding: Decoding | None = None) -> Iterator[tuple[float, list[bytes]]]:
    """(time received, frames) of each whole record of the file, in order. A damaged record (a
    length that cannot be) is skipped to the next record that parses, and counted in ``decoding``;
    a record cut off at the end (a job killed mid-write) ends the file quietly."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise RecordingError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not data.startswith(MAGIC):
        raise RecordingError(f"{path} is not an icsmon recording (it does not start with {MAGIC.strip()!r})")
    at = len(MAGIC)
    while at + RECORD_HEAD.size <= len(data):
        parsed = _record_at(data, at)
        if parsed is None:
            resumed = _next_record(data, at)
            if resumed is None:
                return  # cut off inside the last record: the records before it are whole
            if decoding is not None:
                decoding.rejected += 1
                decoding.last_error = f"{path}: the record at byte {at} is damaged; resumed at byte {resumed}"
            at = resumed
            continue
        received, frames, at = parsed
        yield received, frames


#: A record holds at most this many frames (the wire's messages have three).
MAX_FRAMES = 16


def _record_at(data: bytes, at: int) -> tuple[float, list[bytes], int] | None:
    """The record starting at ``at`` and where the next begins, or None if none parses there."""
    if at + RECORD_HEAD.size > len(data):
        return None
    received, count = RECORD_HEAD.unpack_from(data, at)
    if not 1 <= count <= MAX_FRAMES:
        return None
    pos = at + RECORD_HEAD.size
    frames: list[bytes] = []
    for _ in range(count):
        if pos + FRAME_HEAD.size > len(data):
            return None
        (size,) = FRAME_HEAD.unpack_from(data, pos)
        pos += FRAME_HEAD.size
        if size > MAX_RECORD_BYTES or pos + size > len(data):
            return None
        frames.append(data[pos : pos + size])
        pos += size
    return received, frames, pos


def _next_record(data: bytes, damaged: int) -> int | None:
    """Where the next whole record after a damaged one begins: a record's first frame is a topic,
    so each place the topic prefix occurs is tried as the start of one."""
    found = data.find(TOPIC_PREFIX, damaged + 1)
    while found != -1:
        start = found - FRAME_HEAD.size - RECORD_HEAD.size
        if start > damaged and _record_at(data, start) is not None:
            return start
        found = data.find(TOPIC_PREFIX, found + 1)
    return None


def messages(paths: list[str], decoding: Decoding) -> Iterator[tuple[float, Message]]:
    """Each record of the files, decoded; a damaged one is counted by ``decoding`` and skipped."""
    for path in paths:
        for received, frames in records(path, decoding):
            msg = decoding._decode(frames)
            if msg is not None:
                yield received, msg


def merged(groups: list[list[str]], decoding: Decoding) -> Iterator[tuple[float, Message]]:
    """The messages of several groups of files (each played in order: a rotated set, or the files
    given), interleaved by the time they were received: the ranks of one job, each its own group."""
    if len(groups) == 1:
        return messages(groups[0], decoding)
    return heapq.merge(*(messages(g, decoding) for g in groups), key=lambda item: item[0])


def load(*groups: list[str]) -> list[tuple[float, Message]]:
    out = list(merged(list(groups), Decoding()))
    if not out:
        raise RecordingError(f"no message in {', '.join(p for g in groups for p in g)}")
    return out


class ReplayFeed(Feed):
    """A feed fed by a recording: ``playing``, ``speed`` and :meth:`seek` steer it."""

    def __init__(self, recorded: list[tuple[float, Message]], **kwargs: Any) -> None:
        super().__init__(lambda: [], reconnect=False, lost_after=float("inf"), check_pids=False, **kwargs)
        self.recorded = recorded
        self.position = 0  # the next record to play
        self.playing = True
        self.speed = 1.0

    @property
    def banner(self) -> str:
        done = self.position / len(self.recorded)
        state = "▶" if self.playing and self.position < len(self.recorded) else "❚❚"
        if self.position >= len(self.recorded):
            state = "■ end"
        return f"REPLAY {state} {done:.0%} ×{self.speed:g}"

    def seek(self, position: int) -> None:
        """Jump to record ``position``: forward by playing the records between at once, back by
        playing the recording again from its start (stores and rules are rebuilt)."""
        position = max(0, min(position, len(self.recorded)))
        if position < self.position:
            self.reset()
            self.position = 0
        while self.position < position:
            self.ingest(self.recorded[self.position][1], rules=False)
            self.position += 1
        self.run_rules()
        self.version += 1

    async def run(self) -> None:
        while not self.stopped:
            if not self.playing or self.position >= len(self.recorded):
                await asyncio.sleep(0.1)
                continue
            received, msg = self.recorded[self.position]
            self.ingest(msg, rules=False)
            self.position += 1
            self.run_rules()
            if self.position < len(self.recorded):
                gap = (self.recorded[self.position][0] - received) / self.speed
                await asyncio.sleep(min(max(gap, 0.0), 1.0))  # a long silence plays as one second
