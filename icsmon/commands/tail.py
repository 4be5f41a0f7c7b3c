"""``icsmon tail``: print a job's figures (and alerts) as they arrive, readable or as JSON lines."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, TextIO

from icsmon.commands.common import error, note
from icsmon.render import sample_json, sample_line
from icsmon.store import Store
from icsmon.subscriber import Subscriber
from icsmon.targets import TargetError
from icsmon_agent.protocol import Event, Sample, Schema

WAIT_NOTE_S = 5.0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "tail",
        help="print a job's figures as they arrive",
        description="Print one line per sample (step, loss, the layers worth a look), or JSON lines with --json.",
        epilog="TARGET: nothing (the job on this machine; the most recent if several), a PID, an endpoint "
        "(ipc://PATH, tcp://HOST:PORT), or an SSH host (alias or user@host).",
    )
    p.add_argument(
        "target", nargs="?", metavar="TARGET", help="PID, endpoint or SSH host; default: the local job"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line, flushed as written")
    p.add_argument("--count", "-n", type=int, metavar="N", help="exit after N samples")
    p.add_argument("--timeout", type=float, metavar="S", help="exit after S seconds (1 if no sample arrived)")
    p.add_argument("--pid", type=int, help="with an SSH host: the job's pid there")
    p.add_argument("--run", help="the job's run id or name (when several run)")
    p.set_defaults(func=run)


class Printer:
    """Writes samples (and alerts, when rules are wired) to ``out``."""

    def __init__(self, out: TextIO, as_json: bool, engine: Any = None) -> None:
        self.out = out
        self.as_json = as_json
        self.engine = engine
        self.samples = 0

    def sample(self, sample: Sample, schema: Schema) -> None:
        if self.as_json:
            self.out.write(json.dumps(sample_json(sample, schema)) + "\n")
        else:
            self.out.write(sample_line(sample, schema) + "\n")
        self.samples += 1
        self.out.flush()


def tail_endpoint(
    endpoint: str,
    *,
    as_json: bool = False,
    count: int | None = None,
    timeout: float | None = None,
    out: TextIO | None = None,
    make_printer: Any = None,
) -> int:
    out = out or sys.stdout
    printer = make_printer(out, as_json) if make_printer else Printer(out, as_json)
    store = Store()
    start = time.monotonic()
    until = None if timeout is None else start + timeout
    warned = False
    with Subscriber(endpoint) as sub:
        for batch in sub.messages(until):
            for msg in batch:
                run = store.get(msg.run, msg.rank)
                before = run.count if run is not None else 0
                store.add(msg)
                state = store.get(msg.run, msg.rank)
                assert state is not None
                if isinstance(msg, Sample) and state.count > before and state.schema is not None:
                    printer.sample(msg, state.schema)
                    if count is not None and printer.samples >= count:
                        return 0
                if isinstance(msg, Event) and msg.event == "closing" and state.ended:
                    if printer.samples:
                        note(f"the job ended (run {msg.run}, step {msg.detail.get('step', '?')})")
                        return 0
                    return error("the job ended before any sample arrived")
            if (
                not warned
                and printer.samples == 0
                and time.monotonic() - start > WAIT_NOTE_S
                and until is None
            ):
                note(f"no sample from {endpoint} yet; waiting (Ctrl-C to stop)")
                warned = True
    if printer.samples:
        return 0
    extra = f" ({sub.rejected} malformed frames: {sub.last_error})" if sub.rejected else ""
    return error(f"no sample from {endpoint} in {timeout:g} s: is the job running?{extra}")


def run(args: argparse.Namespace) -> int:
    if args.count is not None and args.count < 1:
        return error("--count must be at least 1")
    target = args.target
    try:
        from icsmon.targets import is_endpoint, resolve_local

        if target and not target.isdigit() and not is_endpoint(target):
            from icsmon.commands.remote import tail_remote

            return tail_remote(target, args)
        resolved = resolve_local(target, run=args.run)
    except TargetError as exc:
        return error(str(exc))
    if resolved.note:
        note(resolved.note)
    try:
        return tail_endpoint(resolved.endpoint, as_json=args.json, count=args.count, timeout=args.timeout)
    except KeyboardInterrupt:
        return 0
