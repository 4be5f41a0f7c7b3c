"""Plain-text and JSON renderings of samples (``tail`` and its ``--json`` lines)."""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any

import numpy as np

from icsmon_agent.alerts.model import fmt as fmt  # one definition, the alert lines' own
from icsmon_agent.protocol import STATS, Sample, Schema

#: C0 and C1 control characters and DEL; tab and newline too, since a name is one line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def clean(name: str) -> str:
    """``name`` with every control character shown as a visible escape (``\\x1b``), nothing obeyed:
    ``nn.Module.add_module`` accepts any string, and a terminal would obey an escape sequence."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", name)


def age(started: float, now: float | None = None) -> str:
    """How long ago ``started`` (a wall-clock time) was: 42s, 17m, 3h05m."""
    secs = max(0, int((time.time() if now is None else now) - started))
    if secs < 120:
        return f"{secs}s"
    if secs < 7200:
        return f"{secs // 60}m"
    return f"{secs // 3600}h{(secs % 3600) // 60:02d}m"


def finite(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def sample_json(sample: Sample, schema: Schema) -> dict[str, Any]:
    """The ``tail --json`` object of one sample (product API: see the README)."""
    fig = sample.figures[:, : len(STATS)]
    # Vectorised: a 1,000-layer sample is 10,000 numbers, and a Python call per number was most of
    # tail's time. Non-finite figures become None (JSON null) in one masked assignment.
    cells = fig.astype(np.float64).astype(object)
    cells[~np.isfinite(fig)] = None
    nonfinite = STATS.index("nonfinite")
    counts = fig[:, nonfinite]
    cells[:, nonfinite] = [int(c) if math.isfinite(c) else None for c in counts.tolist()]
    layers = {
        layer.name: dict(zip(STATS, row, strict=False))
        for layer, row in zip(schema.layers, cells.tolist(), strict=False)
    }
    return sample_json_head(sample, schema) | {"layers": layers}


#: Per layer table: the JSON text of ``layers`` with a ``%s`` where each figure goes (see below).
_TEMPLATES: dict[tuple[str, int, int], str | None] = {}
_TEMPLATES_KEPT = 64


def _layers_template(schema: Schema, n_layers: int, width: int) -> str | None:
    """The ``layers`` object of one layer table as a %-template, so a sample's JSON is one string
    formatting, not 10,000 Python objects for json.dumps; None if names repeat (a dict keeps one)."""
    names = [layer.name for layer in schema.layers[:n_layers]]
    if len(set(names)) != len(names):
        return None
    stats = ", ".join(f"{json.dumps(stat)}: %s" for stat in STATS[:width])
    rows = (json.dumps(name).replace("%", "%%") + ": {" + stats + "}" for name in names)
    return "{" + ", ".join(rows) + "}"


def sample_json_line(sample: Sample, schema: Schema) -> str:
    """``json.dumps(sample_json(sample, schema))``, the same text, several times faster: with eight
    ranks of a thousand layers, tail's JSON was most of its time (``benchmarks/viewer.py``)."""
    fig = sample.figures[:, : len(STATS)]
    n_layers, width = min(fig.shape[0], len(schema.layers)), fig.shape[1]
    key = (schema.schema_id, n_layers, width)
    if key not in _TEMPLATES:
        if len(_TEMPLATES) >= _TEMPLATES_KEPT:
            _TEMPLATES.clear()
        _TEMPLATES[key] = _layers_template(schema, n_layers, width)
    template = _TEMPLATES[key]
    if template is None:
        return json.dumps(sample_json(sample, schema))
    values = fig[:n_layers].astype(np.float64)
    # float.__repr__ is what json.dumps writes for a float; non-finite figures are null, and the
    # NaN/Inf count is an integer.
    text = list(map(float.__repr__, values.ravel().tolist()))
    for i in np.flatnonzero(~np.isfinite(values.ravel())).tolist():
        text[i] = "null"
    if "nonfinite" in STATS[:width]:
        col = STATS.index("nonfinite")
        for i, count in zip(range(col, len(text), width), values[:, col].tolist(), strict=True):
            text[i] = str(int(count)) if math.isfinite(count) else "null"
    head = sample_json_head(sample, schema)
    return json.dumps(head)[:-1] + ', "layers": ' + template % tuple(text) + "}"


def sample_json_head(sample: Sample, schema: Schema | None = None) -> dict[str, Any]:
    head = {
        "type": "sample",
        "run": sample.run,
        "rank": sample.rank,
        "step": sample.step,
        "t": finite(sample.t),
        "loss": finite(sample.loss),
        "scalars": {k: finite(v) for k, v in sample.scalars.items()},
    }
    if schema is not None and schema.sharded:
        head["grad_scope"] = "shard"  # FSDP2: grad_norm and update_ratio are this rank's shard's
    if sample.replayed:
        head["replayed"] = True  # history the job re-sent on connect, not a step that just ran
    return head


def sample_line(sample: Sample, schema: Schema) -> str:
    """One readable line: step, loss, and the layers most worth a look."""
    fig = sample.figures
    names = schema.layer_names
    std = fig[:, STATS.index("std")].astype(np.float64)
    parts = [f"step {sample.step:>7}", f"loss {fmt(sample.loss, 4):>9}", f"{len(names)} layers"]
    if sample.scalars.get("scaler_skipped") == 1:  # fp16: the loss scaler skipped this step on purpose
        parts.append("skipped by the loss scaler")
    nonfinite = fig[:, STATS.index("nonfinite")]
    bad = [
        i
        for i in range(len(names))
        if nonfinite[i] > 0 or (not math.isnan(std[i]) and not math.isfinite(std[i]))
    ]
    if bad:
        parts.append(f"NaN/Inf from {clean(names[bad[0]])} ({len(bad)} layers)")
    with np.errstate(all="ignore"):
        finite_std = np.where(np.isfinite(std), std, np.nan)
    if np.isfinite(finite_std).any():
        lo, hi = int(np.nanargmin(finite_std)), int(np.nanargmax(finite_std))
        parts.append(
            f"std min {fmt(float(std[lo]))} @{clean(names[lo])}  max {fmt(float(std[hi]))} @{clean(names[hi])}"
        )
    dead = fig[:, STATS.index("dead_frac")]
    if np.isfinite(dead).any() and np.nanmax(dead) > 0:
        d = int(np.nanargmax(dead))
        parts.append(f"dead {dead[d] * 100:.0f}% @{clean(names[d])}")
    return "  ".join(parts)


def run_label(name: str, run: str, names: list[str]) -> str:
    """A run's name as the viewer shows it: its name, and when another run in view has the same
    name (two runs of one script), the run id's short suffix too: ``train_cnn·1a2b3c``."""
    if not name:
        return run
    if names.count(name) < 2:
        return name
    return f"{name}·{run.rsplit('-', 1)[-1]}" if run.startswith(f"{name}-") else f"{name}·{run}"
