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

# Module names under icsmon.commands, in the order --help lists them.
COMMANDS = ("list_cmd", "tail", "rules", "demo", "attach", "relay")


def build_parser() -> argparse.ArgumentParser:
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `icsmon tail | head`: the reader left; that is not an error of ours.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
