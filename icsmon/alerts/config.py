"""Alert thresholds in the viewer: the job's (``icsmon_agent.alerts.config``: defaults and
``icsmon.toml``) with the command's flags on top (flags > ./icsmon.toml > user file > defaults).

A job judges its own samples with the thresholds in force where it runs; a viewer's apply to what
the viewer judges itself: the ranks of a job against each other, and streams of agents that do not
judge themselves (README, "When nobody is watching").
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from icsmon.errors import IcsmonError
from icsmon_agent.alerts import config as job_config
from icsmon_agent.alerts.config import CONFIG_NAME, Thresholds, config_paths, descriptions, user_config_path
from icsmon_agent.alerts.engine import AlertEngine

__all__ = [
    "CONFIG_NAME",
    "ConfigError",
    "Thresholds",
    "add_threshold_flags",
    "config_paths",
    "descriptions",
    "load",
    "thresholds_from_args",
    "user_config_path",
]


class ConfigError(IcsmonError, ValueError):
    """A config file or flag value that cannot be used; ``str()`` says which and why."""


def load(paths: list[Path] | None = None, overrides: dict[str, int | float] | None = None) -> Thresholds:
    """Defaults, then each file in ``paths`` (later wins), then ``overrides``."""
    try:
        return job_config.load(paths, overrides)
    except job_config.ConfigError as exc:
        raise ConfigError(str(exc)) from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_threshold_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--NAME VALUE`` flag per threshold (``--dead-frac 0.8``), in their own help group."""
    group = parser.add_argument_group(
        "alert thresholds", f"override {CONFIG_NAME} and the defaults (`icsmon rules` lists them)"
    )
    docs = descriptions()
    for f in fields(Thresholds):
        kind = int if f.type in ("int", int) else float
        group.add_argument(
            _flag(f.name),
            dest=f"threshold_{f.name}",
            type=kind,
            metavar="N" if kind is int else "X",
            help=f"{docs.get(f.name, '')} (default {f.default})",
        )


def thresholds_from_args(args: argparse.Namespace) -> Thresholds:
    """Flags > ./icsmon.toml > the user's config file > defaults. Raises :class:`ConfigError`."""
    overrides: dict[str, int | float] = {}
    for f in fields(Thresholds):
        value = getattr(args, f"threshold_{f.name}", None)
        if value is not None:
            overrides[f.name] = value
    return load(overrides=overrides)


#: What makes a stream's alert engine (None in a feed: the job judges itself, or nobody does).
EngineFactory = Callable[[], AlertEngine]


def default_engine_factory(thresholds: Thresholds | None = None) -> EngineFactory:
    """A factory of the alert engine with these thresholds (the defaults and config files: None)."""

    def make() -> AlertEngine:
        return AlertEngine(thresholds)

    return make
