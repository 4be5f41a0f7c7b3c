"""``icsmon record``: write a job's stream to a file as it arrives, for ``replay`` and ``export``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from typing import Any

from icsmon.commands.common import error, note, positive_int
from icsmon.feed import Feed, FeedEvents
from icsmon.render import clean
from icsmon.store import RunState
from icsmon.targets import resolve_targets, typed_targets
from icsmon_agent.protocol import Event, Message, Sample, Schema, encode
from icsmon_agent.recording import DEFAULT_KEEP, DEFAULT_MAX_BYTES, Recorder


def register(sub: Any) -> None:
    p = sub.add_parser(
        "record",
        help="write a job's figures to a file (replay or export it later)",
        description="Write what a job publishes to FILE as it arrives (every rank, several runs), until "
        "the job ends, N samples or S seconds. A job can also record itself with no viewer: "
        "watch(model, record=PATH) or ICSMON_RECORD=PATH.",
        epilog="TARGET as for `icsmon tail` on this machine (SSH: record with `ssh -t HOST icsmon record`). "
        "Exit status: 0 when done, 1 if nothing arrived or the file cannot be written.",
    )
    p.add_argument("target", nargs="*", metavar="TARGET", help="PID, run, endpoint; default: the local job")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the recording to write (appended)")
    p.add_argument("--count", "-n", type=positive_int, metavar="N", help="stop after N samples")
    p.add_argument("--timeout", type=float, metavar="S", help="stop after S seconds")
    p.add_argument("--run", help="the job's run id or name")
    p.add_argument("--rank", type=int, metavar="N", help="rank N only")
    p.add_argument("--key", metavar="KEY", help="the job's CURVE key, for a tcp:// endpoint beyond loopback")
    p.add_argument(
        "--max-mb", type=positive_int, default=DEFAULT_MAX_BYTES >> 20, help="rotate past this size"
    )
    p.set_defaults(func=run)


#: How often `record` says how many samples it has written.
PROGRESS_EVERY_S = 30.0


class Writer(FeedEvents):
    """Writes each new message; a stream's layer table once per table."""

    def __init__(self, recorder: Recorder, feed: Feed, count: int | None) -> None:
        self.recorder = recorder
        self.feed = feed
        self.count = count
        self.samples = 0
        self.tables: dict[tuple[str, int], tuple[str, float]] = {}
        self.failed = ""  # why writing stopped (a full disk), if it did
        self._said_at = 0.0  # when the progress line was last written (monotonic)

    def message(self, msg: Message, new: bool) -> None:
        if self.failed:
            return
        if isinstance(msg, Schema):
            table = (msg.schema_id, msg.started)  # a restarted process sends its table again
            if self.tables.get((msg.run, msg.rank)) == table:
                return  # the periodic re-send of a table already written
            self.tables[(msg.run, msg.rank)] = table
        elif not new:
            return
        try:
            self.recorder.write(encode(msg))
        except OSError as exc:
            self.failed = f"writing {self.recorder.path} failed: {exc.strerror or exc}"
            self.feed.stop()
            return
        if isinstance(msg, Sample):
            self.samples += 1
            now = time.monotonic()
            if self.samples == 1 or now - self._said_at >= PROGRESS_EVERY_S:
                # Silent until Ctrl-C looked hung: say it records, and how much so far.
                self._said_at = now
                count = f"{self.samples} sample{'s' if self.samples > 1 else ''}"
                note(clean(f"recording {msg.run} to {self.recorder.path}: {count} so far"))
            if self.count is not None and self.samples >= self.count:
                self.feed.stop()

    def event(self, event: Event, run: RunState) -> None:
        if event.event == "closing":
            note(clean(f"the job ended (run {event.run}, rank {event.rank})"))


async def _record(feed: Feed, timeout: float | None) -> None:
    with contextlib.suppress(asyncio.TimeoutError):  # --timeout: the recording so far is the result
        await asyncio.wait_for(feed.run(), timeout)


def run(args: argparse.Namespace) -> int:
    targets = typed_targets(args.target, args.key)
    resolved = resolve_targets(targets, run=args.run, rank=args.rank)
    try:
        recorder = Recorder(args.output, max_bytes=args.max_mb << 20, keep=DEFAULT_KEEP)
    except OSError as exc:
        return error(f"cannot write {args.output}: {exc.strerror or exc}")
    endpoints = resolved.endpoints
    feed = Feed(lambda: endpoints, lost_after=float("inf"), reconnect=False)
    writer = feed.listener = Writer(recorder, feed, args.count)
    try:
        asyncio.run(_record(feed, args.timeout))
    except KeyboardInterrupt:
        pass
    finally:
        with contextlib.suppress(OSError):
            recorder.close()
    if writer.failed:
        return error(f"{writer.failed} (after {writer.samples} samples; the file holds them)")
    if not writer.samples:
        return error(f"no sample arrived from {' '.join(endpoints)}; {args.output} holds none")
    note(f"recorded {writer.samples} samples to {args.output}")
    return 0
