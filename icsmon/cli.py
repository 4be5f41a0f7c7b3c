"""``icsmon``: the command line. Each subcommand lives in :mod:`icsmon.commands` and registers itself.

Exit codes: 0 done, 1 the command ran but failed (no job, no data, a dead endpoint), 2 bad usage
(argparse's own), 130 interrupted before anything was done.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from icsmon import __version__
from icsmon.errors import IcsmonError

# Module names under icsmon.commands, in the order --help lists them.
COMMANDS = ("list_cmd", "tail", "attach", "record", "replay", "export", "relay", "rules", "demo")


def build_parser() -> argparse.ArgumentParser:
    return _build()[0]


def _build() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="icsmon",
        description="Watch every layer of a training network live: activation figures, internal covariate "
        "shift and alerts, next to the job or on a GPU box over SSH.",
        epilog="In the training script: `import icsmon_agent; mon = icsmon_agent.watch(model)`. "
        "Run `icsmon COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"icsmon {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"icsmon.commands.{name}").register(sub)
    return parser, dict(sub.choices)


def main(argv: Sequence[str] | None = None) -> int:
    parser, commands = _build()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # The command's own usage for a flag it does not know, not the top-level one.
        (commands.get(args.command) or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except IcsmonError as exc:
        print(f"icsmon: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `icsmon tail | head`: the reader left; that is not an error of ours.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
