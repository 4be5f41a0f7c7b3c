"""No frame crashes or bloats a viewer: the decoder is total, the store and the feed are bounded.

Property-based (Hypothesis): random bytes, and valid messages with one field replaced by a hostile
value (huge integers, deep nesting, booleans, NaN, long names), go through the decoder and then the
feed; nothing may raise. The example counts are fixed so the run stays within a few seconds in CI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from icsmon.feed import Feed
from icsmon.store import MAX_RUNS, MAX_TOTAL_LAYERS, PENDING_MAX_BYTES, Store
from icsmon.subscriber import Decoding
from icsmon.wire import MAX_LAYERS
from icsmon_agent.protocol import (
    STATS,
    TOPIC_EVENT,
    TOPIC_SAMPLE,
    Event,
    LayerInfo,
    Sample,
    Schema,
    encode,
    schema_id_for,
)

LAYERS = (LayerInfo("0", "Linear", (4, 8), "linear"), LayerInfo("1", "ReLU", (4, 8), "relu"))
SCHEMA = Schema(
    run="r", rank=0, seq=1, t=1.0, layers=LAYERS, name="job", pid=1, schema_id=schema_id_for(LAYERS)
)
SAMPLE = Sample(
    run="r", rank=0, seq=2, t=2.0, step=0, schema_id=SCHEMA.schema_id,
    figures=np.ones((2, len(STATS)), dtype=np.float32), loss=1.0,
)  # fmt: skip
EVENT = Event(run="r", rank=0, seq=3, t=3.0, event="closing", detail={"step": 1})

SETTINGS = settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])

hostile_values = st.one_of(
    st.integers(min_value=-(10**400), max_value=10**400),
    st.sampled_from([2**64, -(2**63) - 1, 10**300, True, False, None, "", "x" * 5000]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.lists(st.integers(), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    st.integers(min_value=1, max_value=3000).map(lambda depth: "DEEP" * 0 + "[" * depth + "]" * depth),
)


def hostile_header(base: list[bytes], key: str, value: Any) -> list[bytes]:
    header = json.loads(base[1])
    header[key] = value
    try:
        text = json.dumps(header)
    except ValueError:
        text = json.dumps({k: v for k, v in header.items() if k != key})
    if isinstance(value, str) and value.startswith("["):
        text = text.replace(json.dumps(value), value)  # the nesting itself, not a string of it
    return [base[0], text.encode(), base[2]]


def ingest_everywhere(frames: list[bytes], feed: Feed, decoding: Decoding) -> None:
    msg = decoding._decode(frames)  # counts a rejection; raising here fails the test
    if msg is not None:
        feed.ingest(msg)
        feed.run_rules()


@SETTINGS
@given(st.lists(st.binary(max_size=200), min_size=0, max_size=4))
def test_any_bytes_decode_to_a_message_or_a_counted_rejection(frames: list[bytes]) -> None:
    decoding = Decoding()
    feed = Feed(lambda: [])
    ingest_everywhere(frames, feed, decoding)
    assert decoding.received == 1
    ingest_everywhere([TOPIC_SAMPLE, *frames[:2]], feed, decoding)


@SETTINGS
@given(
    st.sampled_from([SCHEMA, SAMPLE, EVENT]),
    st.sampled_from(
        [
            "v",
            "run",
            "rank",
            "seq",
            "t",
            "step",
            "shape",
            "schema_id",
            "layers",
            "pid",
            "world_size",
            "every",
            "started",
            "loss",
            "scalars",
            "dropped",
            "t_measured",
            "event",
            "detail",
            "name",
        ]
    ),
    hostile_values,
)
def test_one_hostile_field_never_crashes_the_decoder_the_store_or_the_rules(
    message: Any, key: str, value: Any
) -> None:
    from icsmon.alerts.config import default_engine_factory

    decoding = Decoding()
    feed = Feed(lambda: [], engine_factory=default_engine_factory())
    for base in (SCHEMA, SAMPLE, EVENT):
        frames = encode(base) if base is not message else hostile_header(encode(base), key, value)
        ingest_everywhere(frames, feed, decoding)
    for run in feed.store.runs.values():
        assert run.figures.shape[1] <= MAX_LAYERS


def test_the_named_killers_are_rejections() -> None:
    """The frames that crashed ``tail`` before: each a counted rejection now."""
    decoding = Decoding()
    killers = [
        hostile_header(encode(SAMPLE), "seq", 10**300),  # OverflowError in float()/int64
        hostile_header(encode(SAMPLE), "step", 2**64),  # OverflowError in the store
        hostile_header(encode(SAMPLE), "t", 10**400),
        hostile_header(encode(SAMPLE), "t", float("inf")),  # JSON's Infinity: tail printed invalid JSON
        [TOPIC_EVENT, b'{"v":1,"run":"r","rank":0,"seq":1,"t":1,"event":"x","detail":' + b"[" * 5000 + b"]" * 5000 + b"}", b""],
        hostile_header(encode(SAMPLE), "v", True),  # True == 1, but not a version
        hostile_header(encode(SCHEMA), "layers", [{"name": "x", "type": "y", "shape": []}] * (MAX_LAYERS + 1)),
    ]  # fmt: skip
    for frames in killers:
        assert decoding._decode(frames) is None
    assert decoding.rejected == len(killers)


def big_schema(run: str, n_layers: int) -> list[bytes]:
    layers = tuple(LayerInfo(str(i), "Linear", (1,)) for i in range(n_layers))
    schema = Schema(run=run, rank=0, seq=1, t=1.0, layers=layers, schema_id=schema_id_for(layers))
    return encode(schema)


WORST = """
import resource, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from test_fuzz import big_schema, ingest_everywhere
from icsmon.feed import Feed
from icsmon.store import MAX_RUNS
from icsmon.subscriber import Decoding
from icsmon.wire import MAX_LAYERS
from icsmon_agent.protocol import STATS, Sample, encode

def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

base = rss()
decoding, feed = Decoding(), Feed(lambda: [])
# Schemas announcing the most layers (more than the store takes in all), then hundreds of run ids.
for i in range(MAX_RUNS + 50):
    ingest_everywhere(big_schema(f"run-{i}", MAX_LAYERS if i < 6 else 10), feed, decoding)
# Samples for a table that never comes, each as big as allowed: held within a byte budget.
for k in range(40):
    orphan = Sample(run=f"run-{MAX_RUNS + 49}", rank=0, seq=5 + k, t=2.0, step=k, schema_id="nope",
                    figures=np.ones((MAX_LAYERS, len(STATS)), dtype=np.float32))
    ingest_everywhere(encode(orphan), feed, decoding)
runs = feed.store.runs.values()
print(len(feed.store.runs), sum(len(r.layer_names) for r in runs), sum(r.pending_bytes for r in runs),
      base, rss())
"""


def test_a_viewer_stays_small_under_the_worst_frames(tmp_path: Path) -> None:
    """Memory follows what arrived, within caps on streams, layers and held samples (a fresh
    process, so its peak resident memory is this test's)."""
    out = subprocess.run(
        [sys.executable, "-c", WORST, str(Path(__file__).parent)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    runs, layers, pending, base, peak = (int(x) for x in out.stdout.split())
    assert runs <= MAX_RUNS and layers <= MAX_TOTAL_LAYERS and pending <= PENDING_MAX_BYTES
    # Before the caps one 100,000-layer schema took 2 GB; now the worst frames cost a few hundred MB.
    assert peak - base < 700 * 1024 * 1024, f"peak {(peak - base) / 2**20:.0f} MiB over the start"
    print(f"viewer peak under the worst frames: {(peak - base) / 2**20:.0f} MiB over {base / 2**20:.0f} MiB")


def test_the_store_evicts_the_stream_heard_from_least_recently() -> None:
    store = Store(max_runs=3)
    for name in ("a", "b", "c", "d"):
        store.add(Schema(run=name, rank=0, seq=1, t=1.0, layers=LAYERS, schema_id=SCHEMA.schema_id))
    assert set(k[0] for k in store.runs) == {"b", "c", "d"} and store.evicted == [("a", 0)]
