"""The viewer is untouched by malformed frames: it rejects them, counts them, and loses nothing else."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from helpers import json_lines
from icsmon.store import Store
from icsmon_agent import protocol
from icsmon_agent.protocol import STATS, Event, LayerInfo, Sample, Schema

pytestmark = pytest.mark.slow  # real processes: `make check` leaves it out

LAYERS = (LayerInfo("a", "Linear", (2, 3), "linear"), LayerInfo("b", "ReLU", (2, 3), "relu"))
SID = protocol.schema_id_for(LAYERS)


def schema(seq: int = 1) -> Schema:
    return Schema(run="r", rank=0, seq=seq, t=time.time(), layers=LAYERS, name="synthetic", schema_id=SID)


def sample(seq: int, step: int) -> Sample:
    fig = np.full((len(LAYERS), len(STATS)), 0.5, dtype=np.float32)
    return Sample(run="r", rank=0, seq=seq, t=time.time(), step=step, schema_id=SID, figures=fig, loss=1.0)


GARBAGE = [
    [b"icsmon.v1.sample", b"{", b""],
    [b"icsmon.v1.sample"],
    [
        b"icsmon.v1.sample",
        b'{"v":1,"run":"r","rank":0,"seq":99,"t":0,"step":1,"schema_id":"x","shape":[5,5]}',
        b"x",
    ],
    [b"icsmon.v1.schema", b'{"v":1,"run":"r","rank":0,"seq":1,"t":0,"layers":"no"}', b""],
    [b"icsmon.v2.sample", b"{}", b""],
    [b"icsmon.v1.event", b"\x00\xff", b""],
]


def test_tail_skips_garbage_and_prints_the_good_samples() -> None:
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    tail = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "icsmon",
            "tail",
            f"tcp://127.0.0.1:{port}",
            "--json",
            "--count",
            "2",
            "--timeout",
            "30",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seq = 1
        deadline = time.monotonic() + 30
        while tail.poll() is None and time.monotonic() < deadline:
            for frames in GARBAGE:
                pub.send_multipart(frames)
            pub.send_multipart(protocol.encode(schema()))
            seq += 1
            pub.send_multipart(protocol.encode(sample(seq, seq * 10)))
            time.sleep(0.1)
        out, err = tail.communicate(timeout=10)
    finally:
        if tail.poll() is None:
            tail.kill()
        ctx.destroy(linger=0)
    assert tail.returncode == 0, err
    lines = [line for line in json_lines(out) if line["type"] == "sample"]  # alerts may come between
    assert len(lines) == 2
    assert lines[0]["layers"]["b"]["mean"] == 0.5
    assert "Traceback" not in err


def test_store_dedups_history_counts_gaps_and_holds_samples_until_their_schema() -> None:
    store = Store(capacity=4)
    assert store.add(sample(2, 20)) is False  # before its schema: held, not lost
    store.add(schema())
    run = store.get("r")
    assert run is not None and run.count == 1 and run.latest_step == 20
    store.add(sample(3, 30))
    assert store.add(sample(2, 20)) is False  # history re-sent for another viewer
    store.add(sample(6, 60))  # seq 4 and 5 never arrived
    assert run.dropped == 2
    for i in range(7, 20):
        store.add(sample(i, i * 10))
    assert run.size == 4 and list(run.step_series()) == [160, 170, 180, 190]  # bounded ring
    store.add(Event("r", 0, 20, time.time(), "closing"))
    assert run.state() == "ended"


def test_sample_whose_shape_disagrees_with_the_schema_is_not_stored() -> None:
    store = Store()
    store.add(schema())
    bad = Sample(
        run="r", rank=0, seq=5, t=0.0, step=1, schema_id=SID, figures=np.zeros((7, len(STATS)), np.float32)
    )
    assert store.add(bad) is False
    run = store.get("r")
    assert run is not None and run.count == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def viewer_endpoint(upstream: str, how: str, env: dict[str, str]) -> Iterator[str]:
    """Where a viewer connects to hear ``upstream``: itself, or a relay in front of it."""
    if how == "direct":
        yield upstream
        return
    relayed = f"tcp://127.0.0.1:{free_port()}"
    relay = subprocess.Popen(
        [sys.executable, "-m", "icsmon", "relay", "--bind", relayed, upstream],
        env=env, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield relayed
    finally:
        relay.kill()
        relay.wait()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["direct", "relay"])
def test_one_frame_over_the_limit_costs_that_frame_not_the_connection(how: str, env: dict[str, str]) -> None:
    """libzmq drops a peer that sends a frame over MAXMSGSIZE and never reconnects: before, one
    such frame deafened `tail` to a job that went on publishing, and through a relay every viewer
    to every job. Now the viewer (or the relay) connects again and the samples after it arrive."""
    from icsmon.wire import MAX_MESSAGE_BYTES

    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    oversize = [b"icsmon.v1.sample", b"{}", b"x" * (MAX_MESSAGE_BYTES + 1)]
    before: list[str] = []
    after: list[str] = []
    with viewer_endpoint(f"tcp://127.0.0.1:{port}", how, env) as endpoint:
        tail = subprocess.Popen(
            [sys.executable, "-m", "icsmon", "tail", endpoint, "--json", "--timeout", "90"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        assert tail.stdout is not None
        try:
            seq = 1
            deadline = time.monotonic() + 90
            while len(after) < 3 and time.monotonic() < deadline:
                pub.send_multipart(protocol.encode(schema()))
                seq += 1
                pub.send_multipart(protocol.encode(sample(seq, seq * 10)))
                while select.select([tail.stdout], [], [], 0.1)[0]:
                    line = tail.stdout.readline()
                    if '"type": "sample"' not in line:
                        continue
                    if not before:
                        before.append(line)
                        pub.send_multipart(oversize)  # it is connected and reading: this frame reaches it
                    else:
                        after.append(line)
        finally:
            tail.kill()
            tail.communicate(timeout=10)
            ctx.destroy(linger=0)
    assert before and len(after) == 3, "nothing arrived after the oversize frame"


#: How long the flood lasts: at full speed, gigabytes before viewers were bounded in bytes.
FLOOD_S = 5.0


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("topic", [b"icsmon.v1.event", b"icsmon.v1.schema"])
def test_a_stream_of_large_frames_keeps_a_viewer_bounded_and_it_hears_the_job_after(
    topic: bytes, env: dict[str, str]
) -> None:
    """Frames of 16 MB, each under the size limit, sent as fast as the socket takes them: the
    viewer's memory stays under a fixed ceiling (its queue is bounded in bytes, a sample's or an
    event's header is small) and once the flood stops the real stream is read again."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    header = {"v": 1, "run": "flood", "rank": 0, "seq": 1, "t": time.time(), "event": "x", "schema_id": "f"}
    if topic.endswith(b"event"):
        header["detail"] = {"pad": "x" * (16 * 2**20 - 300)}
    else:  # a valid table of 50,000 long names: slow to decode, the queue fills meanwhile
        header["layers"] = [
            {"name": f"{i:06d}{'n' * 270}", "type": "Linear", "shape": [1, 2], "kind": "linear"}
            for i in range(50_000)
        ]
    # One buffer sent again and again without a copy: the flood's own memory stays small.
    flood_frames = [topic, zmq.Frame(json.dumps(header).encode()), b""]
    tail = subprocess.Popen(
        [sys.executable, "-m", "icsmon", "tail", f"tcp://127.0.0.1:{port}", "--json", "--timeout", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert tail.stdout is not None
    sent = 0
    try:
        seq = 1
        while not select.select([tail.stdout], [], [], 0.05)[0]:  # it hears the job first
            seq += 1
            pub.send_multipart(protocol.encode(schema()))
            pub.send_multipart(protocol.encode(sample(seq, seq)))
        flood = time.monotonic() + FLOOD_S
        while time.monotonic() < flood:
            pub.send_multipart(flood_frames, copy=False)  # beyond its queue, the PUB drops
            sent += 1
            if sent % 64 == 0:
                while select.select([tail.stdout], [], [], 0)[0]:
                    tail.stdout.readline()
        peak = peak_rss_mib(tail.pid)
        heard = 0
        deadline = time.monotonic() + 60
        while heard < 3 and time.monotonic() < deadline:
            seq += 1
            pub.send_multipart(protocol.encode(schema()))
            pub.send_multipart(protocol.encode(sample(seq, seq)))
            while select.select([tail.stdout], [], [], 0.1)[0]:
                heard += '"type": "sample"' in tail.stdout.readline()
    finally:
        tail.kill()
        tail.communicate(timeout=10)
        ctx.destroy(linger=0)
    assert sent >= 1000, sent  # a flood it was: far more than the viewer's queue holds
    print(f"peak {peak:.0f} MiB after {sent} frames")
    assert peak < 600, f"the viewer peaked at {peak:.0f} MiB after {sent} frames of 16 MB"
    assert heard >= 3
