"""The wire: round trips, and every kind of malformed frame rejected with a reason."""

from __future__ import annotations

import contextlib
import json
import math

import numpy as np
import pytest

from icsmon.wire import ProtocolError, decode
from icsmon_agent import protocol
from icsmon_agent.protocol import STATS, Event, LayerInfo, Sample, Schema, encode

LAYERS = (LayerInfo("fc1", "Linear", (32, 64), "linear"), LayerInfo("act", "ReLU", (32, 64), "relu"))


def schema() -> Schema:
    return Schema(
        run="r1",
        rank=3,
        seq=1,
        t=1.5,
        layers=LAYERS,
        name="job",
        host="h",
        pid=42,
        world_size=8,
        every=10,
        started=1.0,
        schema_id=protocol.schema_id_for(LAYERS),
    )


def sample(**kw: object) -> Sample:
    fig = np.arange(len(LAYERS) * len(STATS), dtype=np.float32).reshape(len(LAYERS), len(STATS))
    fig[1, STATS.index("sat_frac")] = np.nan
    base = dict(
        run="r1",
        rank=3,
        seq=7,
        t=2.0,
        step=120,
        schema_id="abc",
        figures=fig,
        loss=0.25,
        scalars={"lr": 0.1, "bad": float("inf")},
        t_measured=1.9,
        dropped=2,
    )
    base.update(kw)
    return Sample(**base)  # type: ignore[arg-type]


def test_schema_round_trip() -> None:
    got = decode(encode(schema()))
    assert got == schema()


def test_sample_round_trip_keeps_figures_and_maps_nonfinite_scalars_to_none() -> None:
    s = sample(loss=float("nan"))
    got = decode(encode(s))
    assert isinstance(got, Sample)
    assert (got.run, got.rank, got.seq, got.step, got.schema_id, got.dropped) == ("r1", 3, 7, 120, "abc", 2)
    np.testing.assert_array_equal(got.figures, s.figures)  # NaN where a figure is absent survives
    assert got.loss is None
    assert got.scalars == {"lr": 0.1, "bad": None}


def test_event_round_trip() -> None:
    e = Event("r1", 0, 9, 3.0, "closing", {"step": 5})
    assert decode(encode(e)) == e


def test_every_frame_carries_version_run_rank_seq_time() -> None:
    for msg in (schema(), sample(), Event("r1", 3, 1, 1.0, "started")):
        header = json.loads(encode(msg)[1])
        assert {"v", "run", "rank", "seq", "t"} <= header.keys()
        assert header["v"] == protocol.PROTOCOL_VERSION


def good_sample_frames() -> list[bytes]:
    return encode(sample())


def with_header(frames: list[bytes], **changes: object) -> list[bytes]:
    header = json.loads(frames[1])
    for key, value in changes.items():
        if value is ...:
            header.pop(key)
        else:
            header[key] = value
    return [frames[0], json.dumps(header).encode(), frames[2]]


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([b"icsmon.v1.sample", b"{}"], "expected 3 frames"),
        ([b"other.topic", b"{}", b""], "unknown topic"),
        ([b"icsmon.v9.sample", b"{}", b""], "another protocol version"),
        ([b"icsmon.v1.sample", b"\xff\xfe", b""], "not UTF-8 JSON"),
        ([b"icsmon.v1.sample", b"[1, 2]", b""], "not an object"),
        ([b"icsmon.v1.sample", b"{not json", b""], "not UTF-8 JSON"),
        (with_header(good_sample_frames(), v=2), "protocol version 2"),
        (with_header(good_sample_frames(), run=...), "lacks 'run'"),
        (with_header(good_sample_frames(), rank="0"), "'rank' has type str"),
        (with_header(good_sample_frames(), seq=True), "type bool"),
        (with_header(good_sample_frames(), shape=[2]), "shape"),
        (with_header(good_sample_frames(), shape=[3, len(STATS)]), f"needs {3 * len(STATS) * 4}"),
        (with_header(good_sample_frames(), shape=[2, 3]), "3 figures per layer"),
        (with_header(good_sample_frames(), loss="x"), "not a number"),
        (with_header(good_sample_frames(), scalars=[1]), "'scalars' is not an object"),
        (
            [
                b"icsmon.v1.schema",
                json.dumps({"v": 1, "run": "r", "rank": 0, "seq": 1, "t": 0, "layers": 5}).encode(),
                b"",
            ],
            "'layers' is not a list",
        ),
        (
            [
                b"icsmon.v1.schema",
                json.dumps(
                    {
                        "v": 1,
                        "run": "r",
                        "rank": 0,
                        "seq": 1,
                        "t": 0,
                        "layers": [{"name": "a", "type": "T", "shape": ["x"]}],
                    }
                ).encode(),
                b"",
            ],
            "shape is not a list of integers",
        ),
        (
            [b"icsmon.v1.event", json.dumps({"v": 1, "run": "r", "rank": 0, "seq": 1, "t": 0}).encode(), b""],
            "lacks 'event'",
        ),
        (
            [
                b"icsmon.v1.event",
                json.dumps({"v": 1, "run": "r", "rank": 0, "seq": 1, "t": 0, "event": "x"}).encode(),
                b"junk",
            ],
            "unexpected body",
        ),
    ],
)
def test_malformed_frames_are_rejected_with_a_reason(frames: list[bytes], reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason.replace("[", r"\[")):
        decode(frames)


def test_decoder_raises_only_protocol_errors_on_random_garbage() -> None:
    rng = np.random.default_rng(0)
    topics = [protocol.TOPIC_SAMPLE, protocol.TOPIC_SCHEMA, protocol.TOPIC_EVENT, b"junk"]
    good = good_sample_frames()
    for i in range(2000):
        header = bytearray(good[1])
        for _ in range(rng.integers(1, 6)):
            header[rng.integers(0, len(header))] = rng.integers(0, 256)
        frames = [
            topics[i % 4],
            bytes(header),
            bytes(rng.integers(0, 256, rng.integers(0, 100), dtype=np.uint8)),
        ]
        with contextlib.suppress(ProtocolError):
            decode(frames)


def test_encoded_json_never_contains_nan() -> None:
    frames = encode(sample(loss=math.inf, scalars={"x": math.nan}))
    text = frames[1].decode()
    assert "NaN" not in text and "Infinity" not in text


def test_an_alert_event_that_holds_no_alert_is_a_rejected_frame() -> None:
    """The job's alerts are checked where every frame is: a good one decodes, a bad one is refused."""
    good = {"type": "alert", "rule": "exploding", "layer": "fc", "step": 7, "severity": "critical",
            "value": 1e4, "message": "exploding: fc", "hint": "lower the lr", "layers": ["fc"]}  # fmt: skip
    assert isinstance(decode(encode(Event("r", 0, 1, 1.0, "alert", good))), Event)
    for bad, reason in (
        ({**good, "severity": "fatal"}, "alert severity"),
        ({**good, "step": "7"}, "'step' is not a whole number"),
        ({**good, "layers": "fc"}, "layers is not a list"),
        ({**good, "type": "sample"}, "not an alert"),
    ):
        with pytest.raises(ProtocolError, match=f"alert event: .*{reason}"):
            decode(encode(Event("r", 0, 1, 1.0, "alert", bad)))
