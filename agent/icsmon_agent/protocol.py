"""The icsmon wire protocol: what the agent publishes and the viewer decodes.

Every message is a ZeroMQ multipart ``[topic, header, body]``:

* ``topic``  -- ``icsmon.v1.schema`` | ``icsmon.v1.sample`` | ``icsmon.v1.event`` (SUB filters on it).
* ``header`` -- a UTF-8 JSON object. Always carries ``v`` (protocol version), ``run``, ``rank``,
  ``seq`` (monotonic per publisher, so a viewer counts drops) and ``t`` (wall time, seconds).
* ``body``   -- raw little-endian float32. Empty for schema and event; for a sample, the figures
  as an ``n_layers x n_stats`` matrix in layer-table order (names are never repeated per sample).

JSON for the small header and raw float32 for the bulk keeps decoding cheap in the viewer and
encoding cheap on the agent's publisher thread (which shares the GIL with training), and never
unpickles anything that arrived from a socket. ``decode`` rejects any malformed frame with a
:class:`ProtocolError` that says why; it never raises anything else.

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

# A frame larger than this is refused before parsing: 1,000,000 layers x 10 figures is already absurd.
#: Bounds a viewer holds every message to, so that no frame can make it allocate without end. The
#: largest real layer tables are a few thousand rows (an MoE with every expert hooked: ~20,000).
MAX_LAYERS = 50_000
MAX_NAME = 1_000  # characters of a layer, type, job or run name
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_BODY_BYTES = MAX_LAYERS * len(STATS) * 4
#: The largest message a viewer socket accepts (ZMQ_MAXMSGSIZE: a bigger one drops the peer).
MAX_MESSAGE_BYTES = MAX_HEADER_BYTES + MAX_BODY_BYTES
MAX_INT = 2**62  # steps, seqs, pids: integers the store keeps in int64
MAX_TIME = 1e11  # seconds since the epoch (year 5138): a time beyond is malformed

Figures = npt.NDArray[np.float32]


class ProtocolError(ValueError):
    """A frame that is not a valid icsmon message; ``str()`` says why."""


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
    """A life-cycle event: ``started``, ``closing`` or ``error`` with counters in ``detail``."""

    run: str
    rank: int
    seq: int
    t: float
    event: str
    detail: dict[str, Any] = field(default_factory=dict)


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
    """A sample's frames again, its header marked ``"replayed": true`` (history sent to a new viewer)."""
    header = json.loads(frames[1])
    header["replayed"] = True
    return [frames[0], _dumps(header), frames[2]]


def encode(msg: Message) -> list[bytes]:
    if isinstance(msg, Schema):
        return encode_schema(msg)
    if isinstance(msg, Sample):
        return encode_sample(msg)
    return encode_event(msg)


# ----------------------------------------------------------------------------------------- decode


def _get(header: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if key not in header:
        raise ProtocolError(f"{what} header lacks {key!r}")
    value = header[key]
    # bool is an int in Python; a bool where a number belongs is still malformed.
    if isinstance(value, bool) and kind is not bool:
        raise ProtocolError(f"{what} header field {key!r} has type bool")
    if not isinstance(value, kind):
        raise ProtocolError(f"{what} header field {key!r} has type {type(value).__name__}")
    return value


def _int(
    header: dict[str, Any], key: str, what: str, low: int = 0, high: int = MAX_INT, default: int | None = None
) -> int:
    """An integer field within [low, high] (missing: ``default`` if given, else malformed)."""
    if key not in header and default is not None:
        return default
    value = _get(header, key, int, what)
    if not low <= value <= high:
        raise ProtocolError(f"{what} header field {key!r} is out of range")
    return int(value)


def _text(value: Any, what: str) -> str:
    """A name: a string of at most :data:`MAX_NAME` characters."""
    if not isinstance(value, str):
        raise ProtocolError(f"{what} is not a string")
    if len(value) > MAX_NAME:
        raise ProtocolError(f"{what} is {len(value)} characters, over the {MAX_NAME} limit")
    return value


def _opt_float(header: dict[str, Any], key: str, what: str) -> float | None:
    """A number or null; a number too large for a float is malformed, NaN and Inf are kept."""
    value = header.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"{what} header field {key!r} is not a number")
    try:
        return float(value)
    except OverflowError:
        raise ProtocolError(f"{what} header field {key!r} is too large") from None


def _time(header: dict[str, Any], key: str, what: str) -> float:
    value = _opt_float(header, key, what)
    if value is None or not math.isfinite(value) or abs(value) > MAX_TIME:
        raise ProtocolError(f"{what} header field {key!r} is not a time")
    return value


def _parse_header(raw: bytes, what: str) -> dict[str, Any]:
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"{what} header is {len(raw)} bytes, over the {MAX_HEADER_BYTES} limit")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise ProtocolError(f"{what} header is not UTF-8 JSON: {str(exc)[:100]}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"{what} header is a JSON {type(header).__name__}, not an object")
    version = header.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:  # True == 1 in Python: not a version
        raise ProtocolError(
            f"{what} has protocol version {str(version)[:20]}; this viewer speaks {PROTOCOL_VERSION}"
        )
    _text(_get(header, "run", str, what), f"{what} run")
    _int(header, "rank", what, high=2**24)
    _int(header, "seq", what)
    header["t"] = _time(header, "t", what)
    return header


def _decode_layers(raw: Any) -> tuple[LayerInfo, ...]:
    if not isinstance(raw, list):
        raise ProtocolError("schema 'layers' is not a list")
    if len(raw) > MAX_LAYERS:
        raise ProtocolError(f"schema has {len(raw)} layers, over the {MAX_LAYERS} limit")
    layers = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ProtocolError(f"schema layer {i} is not an object")
        name = _text(item.get("name"), f"schema layer {i} name")
        type_ = _text(item.get("type"), f"schema layer {i} type")
        shape = _get(item, "shape", list, f"schema layer {i}")
        if len(shape) > 16 or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_INT for d in shape
        ):
            raise ProtocolError(f"schema layer {i} shape is not a list of integers (at most 16 sizes)")
        kind = _text(item.get("kind", "other"), f"schema layer {i} kind")
        layers.append(LayerInfo(name=name, type=type_, shape=tuple(shape), kind=kind))
    return tuple(layers)


def _decode_schema(header: dict[str, Any], body: bytes) -> Schema:
    if body:
        raise ProtocolError("schema frame carries an unexpected body")
    stats = header.get("stats", list(STATS))
    if not isinstance(stats, list) or not all(isinstance(s, str) for s in stats):
        raise ProtocolError("schema 'stats' is not a list of strings")
    if len(stats) > 256:
        raise ProtocolError("schema 'stats' is too long")
    started = _opt_float(header, "started", "schema") or 0.0
    if not math.isfinite(started) or abs(started) > MAX_TIME:
        raise ProtocolError("schema header field 'started' is not a time")
    return Schema(
        run=header["run"],
        rank=header["rank"],
        seq=header["seq"],
        t=header["t"],
        layers=_decode_layers(header.get("layers")),
        name=_text(header.get("name", ""), "schema name"),
        host=_text(header.get("host", ""), "schema host"),
        pid=_int(header, "pid", "schema", high=2**32, default=0),
        world_size=_int(header, "world_size", "schema", low=1, high=2**24, default=1),
        every=_int(header, "every", "schema", high=2**32, default=1),
        started=started,
        stats=tuple(stats),
        schema_id=_text(header.get("schema_id", ""), "schema id"),
    )


def _decode_sample(header: dict[str, Any], body: bytes) -> Sample:
    step = _int(header, "step", "sample", low=-MAX_INT)
    schema_id = _text(header.get("schema_id"), "sample schema_id")
    shape = _get(header, "shape", list, "sample")
    if len(shape) != 2 or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_LAYERS for d in shape
    ):
        raise ProtocolError(f"sample shape {str(shape)[:40]} is not two integers within the limits")
    n_layers, n_stats = shape
    if n_stats != len(STATS):
        raise ProtocolError(f"sample has {n_stats} figures per layer; protocol v1 has {len(STATS)}")
    expected = n_layers * n_stats * 4
    if len(body) > MAX_BODY_BYTES:
        raise ProtocolError(f"sample body is {len(body)} bytes, over the {MAX_BODY_BYTES} limit")
    if len(body) != expected:
        raise ProtocolError(f"sample body is {len(body)} bytes; shape {n_layers}x{n_stats} needs {expected}")
    figures = np.frombuffer(body, dtype="<f4").reshape(n_layers, n_stats)
    raw_scalars = header.get("scalars", {})
    if not isinstance(raw_scalars, dict) or len(raw_scalars) > 256:
        raise ProtocolError("sample 'scalars' is not an object of at most 256 numbers")
    scalars = {
        _text(k, "sample scalar name"): _opt_float(raw_scalars, k, "sample scalar") for k in raw_scalars
    }
    dropped = _int(header, "dropped", "sample", default=0)
    t_measured = _opt_float(header, "t_measured", "sample") or 0.0
    if not math.isfinite(t_measured) or abs(t_measured) > MAX_TIME:
        t_measured = 0.0  # only used for the latency figure: unknown rather than malformed
    return Sample(
        run=header["run"],
        rank=header["rank"],
        seq=header["seq"],
        t=header["t"],
        step=step,
        schema_id=schema_id,
        figures=figures,
        loss=_opt_float(header, "loss", "sample"),
        scalars=scalars,
        t_measured=t_measured,
        dropped=dropped,
        replayed=header.get("replayed") is True,
    )


def _decode_event(header: dict[str, Any], body: bytes) -> Event:
    if body:
        raise ProtocolError("event frame carries an unexpected body")
    name = _text(_get(header, "event", str, "event"), "event name")
    detail = header.get("detail", {})
    if not isinstance(detail, dict):
        raise ProtocolError("event 'detail' is not an object")
    return Event(
        run=header["run"],
        rank=header["rank"],
        seq=header["seq"],
        t=header["t"],
        event=name,
        detail=detail,
    )


def decode(frames: list[bytes]) -> Message:
    """Decode one multipart message; raise :class:`ProtocolError` (only) if it is malformed.

    Total: whatever the bytes, a message or a ProtocolError (``tests/test_fuzz.py`` holds it to
    that); numbers are bounded where they are read, so what is returned fits the viewer's arrays.
    """
    try:
        return _decode(frames)
    except ProtocolError:
        raise
    except Exception as exc:  # a case the checks above missed must still be a rejection, not a crash
        raise ProtocolError(f"malformed message ({type(exc).__name__})") from None


def _decode(frames: list[bytes]) -> Message:
    if not isinstance(frames, (list, tuple)) or len(frames) != 3:
        count = len(frames) if isinstance(frames, (list, tuple)) else "?"
        raise ProtocolError(f"expected 3 frames [topic, header, body], got {count}")
    topic, raw_header, body = (bytes(f) for f in frames)
    if topic == TOPIC_SAMPLE:
        return _decode_sample(_parse_header(raw_header, "sample"), body)
    if topic == TOPIC_SCHEMA:
        return _decode_schema(_parse_header(raw_header, "schema"), body)
    if topic == TOPIC_EVENT:
        return _decode_event(_parse_header(raw_header, "event"), body)
    if topic.startswith(b"icsmon.") and not topic.startswith(TOPIC_PREFIX):
        raise ProtocolError(f"topic {topic[:40]!r} is from another protocol version")
    raise ProtocolError(f"unknown topic {topic[:40]!r}")


def schema_id_for(layers: tuple[LayerInfo, ...], stats: tuple[str, ...] = STATS) -> str:
    """A short stable id of a layer table, carried by each sample so stale tables are never mixed up."""
    import hashlib

    text = json.dumps([[layer.to_json() for layer in layers], list(stats)], separators=(",", ":"))
    return hashlib.sha1(text.encode()).hexdigest()[:12]
