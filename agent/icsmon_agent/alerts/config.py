"""Alert thresholds: defaults and ``icsmon.toml`` files (./icsmon.toml > the user's file > defaults).

The job judges its own samples with these (``watch(thresholds=...)`` overrides them); the viewer adds
its flags on top for what it judges itself (``icsmon.alerts.config``).

Each default is calibrated on the demo scenarios (see the README, "Alerts and the demo"): a healthy
50-layer He-init MLP over hundreds of steps, a BatchNorm CNN and a small transformer stay silent,
and each sick net trips its rule. ``icsmon rules`` prints the values in force.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIG_NAME = "icsmon.toml"
SECTION = "alerts"


class ConfigError(ValueError):
    """A config file or flag value that cannot be used; ``str()`` says which and why."""


@dataclass(frozen=True)
class Thresholds:
    """When each rule fires. Field docs (the text after each field) are printed by ``icsmon rules``."""

    fire_after: int = 3
    "samples a warning-level condition must hold before it fires (nonfinite and exploding fire at once)"
    clear_after: int = 5
    "samples a condition must be gone before its alert clears"
    vanish_std: float = 1e-5
    "vanishing: a layer's activation std below this"
    vanish_std_critical: float = 1e-12
    "vanishing (critical): std below this (float32 underflows to exactly 0)"
    vanish_ratio: float = 1e-3
    "vanishing: std below this fraction of the largest std on its input path (since the last norm layer), or of its own recent peak"
    vanish_grad: float = 1e-8
    "vanishing: a layer's parameter-gradient norm below this"
    explode_std: float = 1e3
    "exploding: a layer's activation std above this"
    explode_std_critical: float = 1e6
    "exploding (critical): std above this"
    explode_jump: float = 10.0
    "exploding: std or grad_norm this many times its own median over the last `window` samples"
    explode_jump_critical: float = 100.0
    "exploding (critical): a jump this many times the median"
    explode_jump_floor: float = 2.0
    "exploding: a jump counts only if the new std or grad_norm is at least this (not 1e-6 -> 1e-4)"
    window: int = 8
    "samples of a layer's own history that jumps are measured against"
    dead_frac: float = 0.7
    "dead_relu: fraction of a ReLU layer's units never positive over the batch (about 0.0-0.45 is normal)"
    dead_frac_critical: float = 0.95
    "dead_relu (critical): fraction of dead units"
    saturation: float = 0.3
    "saturation: fraction of a tanh/sigmoid layer's outputs pinned at its limits"
    saturation_critical: float = 0.7
    "saturation (critical): fraction pinned"
    shift_factor: float = 20.0
    "shift: KL shift this many times the layer's own median over the last `shift_window` samples"
    shift_min: float = 0.5
    "shift: and at least this many nats (batch noise alone gives about 0.01-0.05)"
    shift_window: int = 20
    "samples of shift history the running level is taken over"
    shift_min_history: int = 15
    "shift: samples of history needed first, at most `shift_window` (shift is noisy while training starts)"
    spike_sigma: float = 6.0
    "spike: the loss above its recent median + this many robust deviations (1.4826 x MAD)"
    spike_ratio: float = 1.25
    "spike: and at least this many times that median (a very steady loss has a tiny deviation)"
    spike_window: int = 128
    "spike: samples the median and deviation are taken over"
    spike_min_history: int = 32
    "spike: samples of history needed first"
    loss_window: int = 8
    "loss: samples whose median is the loss's level now"
    loss_chance: float = 1.5
    "loss: the level this many times chance (ln of the output layer's width, 10 wide or more)"
    loss_chance_classes: int = 10
    "loss: an output layer at least this wide is taken for a classifier (chance = ln of its width)"
    loss_rise: float = 3.0
    "loss: the level this many times the run's start (the median of its first 5 losses)"
    loss_recovered: float = 0.9
    "exploding stays active until the loss level is below this fraction of the run's start"
    clipped_ratio: float = 1e-6
    "vanishing: gradients applied by the optimizer below this fraction of the backward's: clipped away"

    def validate(self) -> Thresholds:
        for f in fields(self):
            value = getattr(self, f.name)
            if not value > 0:
                raise ConfigError(f"threshold {f.name} must be positive, got {value}")
        for need, have in (
            ("shift_min_history", "shift_window"),
            ("spike_min_history", "spike_window"),
            ("loss_window", "spike_window"),  # the losses held are the spike window's
        ):
            if getattr(self, need) > getattr(self, have):
                raise ConfigError(
                    f"{need} ({getattr(self, need)}) cannot exceed {have} ({getattr(self, have)})"
                )
        return self


def descriptions() -> dict[str, str]:
    """Field name -> the documentation string written after it above."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(Thresholds))
    body = tree.body[0].body if isinstance(tree.body[0], ast.ClassDef) else []
    out: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            out[node.target.id] = nxt.value.value
    return out


def user_config_path() -> Path:
    """``$XDG_CONFIG_HOME/icsmon/icsmon.toml`` (``~/.config/icsmon/icsmon.toml``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "icsmon" / CONFIG_NAME


def config_paths() -> list[Path]:
    """Files read, lowest precedence first: the user's, then the current directory's."""
    return [user_config_path(), Path.cwd() / CONFIG_NAME]


def _coerce(name: str, value: Any, where: str) -> int | float:
    kind = {f.name: f.type for f in fields(Thresholds)}[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: {name} must be a number, got {value!r}")
    if kind in ("int", int):
        if float(value) != int(value):
            raise ConfigError(f"{where}: {name} must be a whole number, got {value!r}")
        return int(value)
    return float(value)


def load_file(path: Path) -> dict[str, int | float]:
    """The ``[alerts]`` table of one file (top-level keys are accepted too); {} if it does not exist."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    table = data.get(SECTION, data)
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [{SECTION}] is not a table")
    known = {f.name for f in fields(Thresholds)}
    out: dict[str, int | float] = {}
    for key, value in table.items():
        if key == SECTION or isinstance(value, dict):
            continue
        if key not in known:
            raise ConfigError(f"{path}: unknown threshold {key!r} (see `icsmon rules`)")
        out[key] = _coerce(key, value, str(path))
    return out


def load(paths: list[Path] | None = None, overrides: dict[str, int | float] | None = None) -> Thresholds:
    """Defaults, then each file in ``paths`` (later wins), then ``overrides``."""
    values: dict[str, int | float] = {}
    for path in config_paths() if paths is None else paths:
        values.update(load_file(path))
    values.update(overrides or {})
    return dataclasses.replace(Thresholds(), **values).validate()  # type: ignore[arg-type]
