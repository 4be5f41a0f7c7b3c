"""Decoding the wire for display: any bytes in, a message or a :class:`ProtocolError` out.

The message types and the encoder are the agent's (:mod:`icsmon_agent.protocol`); the decoder is
the viewer's alone. It is total (``tests/test_fuzz.py`` holds it to that) and bounds every number
where it is read, so what it returns fits the viewer's arrays.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from icsmon_agent.alerts.model import ALERT_TYPES, change_from_json
from icsmon_agent.protocol import (
    PROTOCOL_VERSION,
    STATS,
    TOPIC_EVENT,
    TOPIC_PREFIX,
    TOPIC_SAMPLE,
    TOPIC_SCHEMA,
    Event,
    LayerInfo,
    Message,
    Sample,
    Schema,
)

if TYPE_CHECKING:
    import zmq

#: A message's frames as received: bytes, or zmq.Frame (received without a copy).
Frames = Sequence["bytes | zmq.Frame"]

#: Bounds a viewer holds every message to, so that no frame can make it allocate without end. The
#: largest real layer tables are a few thousand rows (an MoE with every expert hooked: ~20,000).
MAX_LAYERS = 50_000
MAX_NAME = 1_000  # characters of a layer, type, job or run name
MAX_HEADER_BYTES = 16 * 1024 * 1024  # a schema's: its layer table
#: A sample's header: a few hundred bytes, 256 named scalars at most.
MAX_SMALL_HEADER_BYTES = 1024 * 1024
#: An event's: an alert names every layer where its condition holds (tens of thousands, in a large
#: mixture of experts).
MAX_EVENT_HEADER_BYTES = 8 * 1024 * 1024
MAX_BODY_BYTES = MAX_LAYERS * len(STATS) * 4
#: The largest message a viewer socket accepts (ZMQ_MAXMSGSIZE: a bigger one drops the peer).
MAX_MESSAGE_BYTES = MAX_HEADER_BYTES + MAX_BODY_BYTES
MAX_INT = 2**62  # steps, seqs, pids: integers the store keeps in int64
MAX_TIME = 1e11  # seconds since the epoch (year 5138): a time beyond is malformed


class ProtocolError(ValueError):
    """A frame that is not a valid icsmon message; ``str()`` says why."""


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


_HEADER_LIMITS = {"schema": MAX_HEADER_BYTES, "event": MAX_EVENT_HEADER_BYTES}


def _parse_header(raw: bytes, what: str) -> dict[str, Any]:
    """The header's JSON, its size already checked against its topic's limit (:func:`_decode`)."""
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
        alerts=header.get("alerts") is True,
        sharded=header.get("sharded") is True,
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
    if name in ALERT_TYPES:  # the job's alert: a frame that holds none is rejected like any other
        try:
            change_from_json(detail)
        except ValueError as exc:
            raise ProtocolError(f"{name} event: {exc}") from None
    return Event(
        run=header["run"],
        rank=header["rank"],
        seq=header["seq"],
        t=header["t"],
        event=name,
        detail=detail,
        replayed=header.get("replayed") is True,
    )


def decode(frames: Frames) -> Message:
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


def _copy(frame: bytes | zmq.Frame) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)


def _decode(frames: Frames) -> Message:
    if not isinstance(frames, (list, tuple)) or len(frames) != 3:
        count = len(frames) if isinstance(frames, (list, tuple)) else "?"
        raise ProtocolError(f"expected 3 frames [topic, header, body], got {count}")
    topic = _copy(frames[0])
    # Sizes before copies: a frame received without a copy (zmq.Frame) is copied only if it fits.
    what = topic.rsplit(b".", 1)[-1].decode(errors="replace")[:20]
    known = topic.startswith(TOPIC_PREFIX)
    limit = _HEADER_LIMITS.get(what, MAX_SMALL_HEADER_BYTES) if known else MAX_SMALL_HEADER_BYTES
    if len(frames[1]) > limit:
        raise ProtocolError(f"{what} header is {len(frames[1])} bytes, over the {limit} limit")
    if len(frames[2]) > MAX_BODY_BYTES:
        raise ProtocolError(f"{what} body is {len(frames[2])} bytes, over the {MAX_BODY_BYTES} limit")
    raw_header, body = _copy(frames[1]), _copy(frames[2])
    if topic == TOPIC_SAMPLE:
        return _decode_sample(_parse_header(raw_header, "sample"), body)
    if topic == TOPIC_SCHEMA:
        return _decode_schema(_parse_header(raw_header, "schema"), body)
    if topic == TOPIC_EVENT:
        return _decode_event(_parse_header(raw_header, "event"), body)
    if topic.startswith(b"icsmon.") and not topic.startswith(TOPIC_PREFIX):
        raise ProtocolError(f"topic {topic[:40]!r} is from another protocol version")
    raise ProtocolError(f"unknown topic {topic[:40]!r}")
