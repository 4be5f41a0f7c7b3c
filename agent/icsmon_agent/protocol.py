"""The icsmon wire protocol: what the agent publishes and the viewer decodes.

Every message is a ZeroMQ multipart ``[topic, header, body]``:

* ``topic``  -- ``icsmon.v1.schema`` | ``icsmon.v1.sample`` | ``icsmon.v1.event`` (SUB filters on it).
* ``header`` -- a UTF-8 JSON object. Always carries ``v`` (protocol version), ``run``, ``rank``,
  ``seq`` (monotonic per publisher, so a viewer counts drops) and ``t`` (wall time, seconds).
* ``body``   -- raw little-endian float32. Empty for schema and event; for a sample, the figures
  as an ``n_layers x n_stats`` matrix in layer-table order (names are never repeated per sample).

JSON for the small header and raw float32 for the bulk keeps decoding cheap in the viewer and
encoding cheap on the agent's publisher thread (which shares the GIL with training), and never
unpickles anything that arrived from a socket. The decoder, with its limits, is the viewer's
(``icsmon.wire``): the agent only encodes.

This module imports only the standard library and numpy: the viewer imports it too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

PROTOCOL_VERSION = 1
TOPIC_PREFIX = b"icsmon.v1."
TOPIC_SCHEMA = b"icsmon.v1.schema"
TOPIC_SAMPLE = b"icsmon.v1.sample"
TOPIC_EVENT = b"icsmon.v1.event"

#: Figure columns of a sample, in order. Product API: README.md "The figures".
STATS: tuple[str, ...] = (
    "mean",
    "std",
    "min",
    "max",
    "zero_frac",
    "dead_frac",
    "sat_frac",
    "nonfinite",
    "shift",
    "grad_norm",
    "update_ratio",
    "peak_ratio",
)
STAT_INDEX: dict[str, int] = {name: i for i, name in enumerate(STATS)}

#: Activation kinds a layer can have; ``sat_frac`` applies to tanh- and sigmoid-like layers only.
KINDS = ("relu", "tanh", "sigmoid", "norm", "linear", "conv", "other")

Figures = npt.NDArray[np.float32]


@dataclass(frozen=True)
class LayerInfo:
    name: str
    type: str
    shape: tuple[int, ...]
    kind: str = "other"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "shape": list(self.shape), "kind": self.kind}


@dataclass(frozen=True)
class Schema:
    """Run information and the layer table. Re-sent to every new subscriber and every few seconds."""

    run: str
    rank: int
    seq: int
    t: float
    layers: tuple[LayerInfo, ...]
    name: str = ""
    host: str = ""
    pid: int = 0
    world_size: int = 1
    every: int = 1
    started: float = 0.0
    stats: tuple[str, ...] = STATS
    schema_id: str = ""
    # The job runs the alert rules on its own samples and sends their events ("alert",
    # "alert_cleared"): a viewer shows those and does not judge the stream again.
    alerts: bool = False
    # The parameters are sharded (FSDP2): grad_norm and update_ratio are this rank's shard's.
    sharded: bool = False

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]


@dataclass(frozen=True)
class Sample:
    """One sampled step's figures for every layer of one run and rank."""

    run: str
    rank: int
    seq: int
    t: float
    step: int
    schema_id: str
    figures: Figures  # shape (n_layers, n_stats), float32, NaN where a figure does not apply
    loss: float | None = None
    scalars: dict[str, float | None] = field(default_factory=dict)
    t_measured: float = 0.0  # when the training thread took the figures (hook-to-screen latency)
    dropped: int = 0  # samples the agent itself dropped before sending (queue full)
    replayed: bool = False  # re-sent history (to a viewer that just subscribed), not news


@dataclass(frozen=True)
class Event:
    """A life-cycle event (``started``, ``closing``, ``paused``, ...) with what it says in ``detail``;
    ``alert`` and ``alert_cleared`` carry the job's own alert changes (``AlertChange.to_json``)."""

    run: str
    rank: int
    seq: int
    t: float
    event: str
    detail: dict[str, Any] = field(default_factory=dict)
    replayed: bool = False  # re-sent to a viewer that just subscribed (an alert it missed), not news


Message = Schema | Sample | Event


# ----------------------------------------------------------------------------------------- encode


def _finite_or_none(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _dumps(obj: dict[str, Any]) -> bytes:
    # allow_nan=False: JSON has no NaN; the encoder maps non-finite values to null before this.
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def _base(msg: Schema | Sample | Event) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "run": msg.run, "rank": msg.rank, "seq": msg.seq, "t": msg.t}


def encode_schema(schema: Schema) -> list[bytes]:
    header = _base(schema) | {
        "name": schema.name,
        "host": schema.host,
        "pid": schema.pid,
        "world_size": schema.world_size,
        "every": schema.every,
        "started": schema.started,
        "stats": list(schema.stats),
        "schema_id": schema.schema_id,
        "alerts": schema.alerts,
        "sharded": schema.sharded,
        "layers": [layer.to_json() for layer in schema.layers],
    }
    return [TOPIC_SCHEMA, _dumps(header), b""]


def encode_sample(sample: Sample) -> list[bytes]:
    figures = np.ascontiguousarray(sample.figures, dtype="<f4")
    if figures.ndim != 2:
        raise ValueError(f"figures must be 2-D (layers x stats), got shape {figures.shape}")
    header = _base(sample) | {
        "step": sample.step,
        "schema_id": sample.schema_id,
        "shape": list(figures.shape),
        "loss": _finite_or_none(sample.loss),
        "scalars": {k: _finite_or_none(v) for k, v in sample.scalars.items()},
        "t_measured": sample.t_measured,
        "dropped": sample.dropped,
    }
    return [TOPIC_SAMPLE, _dumps(header), figures.tobytes()]


def encode_event(event: Event) -> list[bytes]:
    header = _base(event) | {"event": event.event, "detail": event.detail}
    return [TOPIC_EVENT, _dumps(header), b""]


def replayed(frames: list[bytes]) -> list[bytes]:
    """A message's frames again, its header marked ``"replayed": true`` (history sent to a new viewer)."""
    header = json.loads(frames[1])
    header["replayed"] = True
    return [frames[0], _dumps(header), frames[2]]


def encode(msg: Message) -> list[bytes]:
    if isinstance(msg, Schema):
        return encode_schema(msg)
    if isinstance(msg, Sample):
        return encode_sample(msg)
    return encode_event(msg)


def schema_id_for(layers: tuple[LayerInfo, ...], stats: tuple[str, ...] = STATS) -> str:
    """A short stable id of a layer table, carried by each sample so stale tables are never mixed up."""
    import hashlib

    text = json.dumps([[layer.to_json() for layer in layers], list(stats)], separators=(",", ":"))
    return hashlib.sha1(text.encode()).hexdigest()[:12]
