"""``icsmon rules``: the alert rules and the thresholds in force (defaults, config files, flags)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, fields
from typing import Any

from icsmon.alerts.config import (
    Thresholds,
    add_threshold_flags,
    config_paths,
    descriptions,
    thresholds_from_args,
)
from icsmon_agent.alerts.rules import RULES


def register(sub: Any) -> None:
    p = sub.add_parser(
        "rules",
        help="list the alert rules and their thresholds",
        description="Print the alert rules and the thresholds in force: the defaults, overridden by "
        "icsmon.toml in the user's config dir, then by ./icsmon.toml, then by the flags below.",
        epilog="Config file: an [alerts] table of the threshold names, e.g.\n  [alerts]\n  dead_frac = 0.8\n"
        "  explode_std = 1e4",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print one JSON object: rules and thresholds")
    add_threshold_flags(p)
    p.set_defaults(func=run)


def rule_summaries() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, (rule, at_once, hint) in RULES.items():
        doc = " ".join((rule.__doc__ or "").split()).split(". ")[0].rstrip(".") + "."
        out[name] = {
            "checks": doc,
            "fires": "at once" if at_once else "after fire_after samples",
            "hint": hint,
        }
    return out


def run(args: argparse.Namespace) -> int:
    thresholds = thresholds_from_args(args)
    defaults = Thresholds()
    files = [str(p) for p in config_paths() if p.is_file()]
    if args.json:
        print(
            json.dumps(
                {"rules": rule_summaries(), "thresholds": asdict(thresholds), "config_files": files}, indent=1
            )
        )
        return 0
    print("Rules (a warning fires after it held `fire_after` samples; critical ones at once):")
    for name, info in rule_summaries().items():
        print(f"  {name:<11} {info['checks']}")
        print(f"  {'':<11} fires {info['fires']}; hint: {info['hint']}")
    print()
    print(
        "Thresholds"
        + (f" (from {', '.join(files)} and flags)" if files else " (defaults unless flagged)")
        + ":"
    )
    docs = descriptions()
    for f in fields(Thresholds):
        value = getattr(thresholds, f.name)
        mark = "" if value == getattr(defaults, f.name) else "  *"
        print(f"  {f.name:<21} {value!s:<9} {docs.get(f.name, '')}{mark}")
    print()
    print("* differs from the default. Change them with flags (--dead-frac 0.8) or an [alerts] table in")
    print("  icsmon.toml, here or in the user's config dir.")
    return 0
