"""``icsmon replay``: a recording in the terminal app (play, pause, speed, seek), or printed as
``icsmon tail`` would have printed it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from icsmon.alerts.config import add_threshold_flags, default_engine_factory, thresholds_from_args
from icsmon.commands.common import error, note
from icsmon.errors import TargetError
from icsmon.feed import Feed
from icsmon.kept import recordings_of
from icsmon.printing import Printer, TailListener
from icsmon.replay import ReplayFeed, load, merged
from icsmon.subscriber import Decoding


def register(sub: Any) -> None:
    p = sub.add_parser(
        "replay",
        help="replay a recording in the app, or print it as tail would",
        description="Open the terminal app on a recording (space play/pause, + and - speed, < and > "
        "seek, 0 restart), or with --json (or no terminal) print exactly what `icsmon tail --json` "
        "printed live, alerts included.",
        epilog="FILE: written by `icsmon record` or by a job's watch(model, record=PATH). Several files "
        "play one after the other (a rotated set: oldest first). PID, RUN or NAME: the history an ended "
        "(or running) job kept (`icsmon list --ended`), every rank of it. Exit status: 0, 1 if a file is "
        "not a recording or holds nothing.",
    )
    p.add_argument("files", nargs="+", metavar="FILE|PID|RUN|NAME")
    p.add_argument("--json", action="store_true", help="print JSON lines, as `icsmon tail --json`")
    p.add_argument("--speed", type=float, default=1.0, help="the app's starting speed (default 1)")
    p.add_argument("--history", action="store_true", help="print re-sent history too, as `tail --history`")
    add_threshold_flags(p)
    p.set_defaults(func=run)


def resolve(targets: list[str]) -> list[list[str]]:
    """Groups of files, each played in order, the groups interleaved by time: the files named by
    path are one group (in the order given); a kept job's ranks are one group each."""
    files: list[str] = []
    kept: list[list[str]] = []
    for target in targets:
        if Path(target).exists():
            files.append(target)
            continue
        try:
            kept.extend(recordings_of(target))
        except TargetError:
            if "/" in target or Path(target).suffix:
                files.append(target)  # a file that is not there: said as such when it is read
                continue
            raise
    return ([files] if files else []) + kept


def print_recording(groups: list[list[str]], as_json: bool, thresholds: Any, history: bool) -> int:
    """Every message through the feed and tail's printer, alerts after the sample that tripped them."""
    printer = Printer(sys.stdout, as_json)
    feed = Feed(lambda: [], engine_factory=default_engine_factory(thresholds), rules_per_sample=True)
    feed.listener = TailListener(printer, feed, None, groups[0][0], history)
    decoding = Decoding()
    read = 0
    for _, msg in merged(groups, decoding):
        feed.ingest(msg, rules=True)
        read += 1
    if decoding.rejected:
        note(f"{decoding.rejected} damaged records skipped ({decoding.last_error})")
    if not read:
        return error(f"no message in {', '.join(p for g in groups for p in g)}: nothing to replay")
    return 0


def run(args: argparse.Namespace) -> int:
    thresholds = thresholds_from_args(args)
    groups = resolve(args.files)
    if args.json or not sys.stdout.isatty():
        return print_recording(groups, args.json, thresholds, args.history)
    from icsmon import tui

    feed = ReplayFeed(load(*groups), engine_factory=default_engine_factory(thresholds))
    feed.speed = args.speed
    return tui.run_feed(feed, title=f"icsmon replay {args.files[0]}")
