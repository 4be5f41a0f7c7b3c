"""Record, replay, export: a job that records itself (no viewer) and `icsmon record` leave files
that replay as the live stream was printed, survive a kill mid-write, and export to CSV."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from helpers import icsmon, json_lines, start_script, wait_for_jobs
from icsmon_agent.protocol import STATS

pytestmark = pytest.mark.slow  # real processes: `make check` leaves it out

JOB = textwrap.dedent(
    """
    import sys, time, torch
    from torch import nn
    import icsmon_agent
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    record = sys.argv[1] if sys.argv[1] != "-" else None
    mon = icsmon_agent.watch(model, every=1, name="recorded", record=record)
    time.sleep(float(sys.argv[3]))  # room for a live viewer to subscribe before step 0
    for step in range(int(sys.argv[2])):
        x = torch.randn(4, 8) * (float("nan") if step >= 40 else 1.0)
        loss = model(x).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step(); mon.step(loss=loss)
        time.sleep(0.05)
    mon.close()
    """
)
STEPS = 50
N_LAYERS = 3


def lines_of(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.timeout(180)
def test_a_job_records_itself_and_the_replay_prints_what_tail_printed_live(
    tmp_path: Path, env: dict[str, str]
) -> None:
    script = tmp_path / "job.py"
    script.write_text(JOB)
    recording = tmp_path / "run.icsrec"
    job = start_script(script, env, str(recording), str(STEPS), "3")
    try:
        wait_for_jobs(env)
        live = icsmon("tail", "--json", env=env, timeout=120)
    finally:
        _, err = job.communicate(timeout=60)
    assert job.returncode == 0, err
    assert live.returncode == 0, live.stderr
    replayed = icsmon("replay", str(recording), "--json", env=env, check=True)
    assert replayed.stdout == live.stdout  # samples and alerts, line for line
    lines = lines_of(replayed.stdout)
    samples = [s for s in lines if s["type"] == "sample"]
    assert [s["step"] for s in samples] == list(range(STEPS))
    assert any(a["type"] == "alert" and a["rule"] == "nonfinite" for a in lines)
    assert icsmon("replay", str(recording), "--json", env=env, check=True).stdout == replayed.stdout

    # Export: one row per (step, rank, layer), readable by any CSV reader.
    table = tmp_path / "run.csv"
    icsmon("export", str(recording), "--csv", "-o", str(table), env=env, check=True)
    with table.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == STEPS * N_LAYERS
    assert rows[0]["layer"] == "0" and rows[0]["type"] == "Linear" and float(rows[0]["std"]) > 0
    assert rows[-1]["step"] == str(STEPS - 1) and rows[-1]["std"] == ""  # NaN: an empty cell
    # The same table as Parquet: same rows, NaN a null.
    pq = pytest.importorskip("pyarrow.parquet")
    parquet = tmp_path / "run.parquet"
    icsmon("export", str(recording), "--parquet", "-o", str(parquet), env=env, check=True)
    columns = pq.read_table(parquet).to_pydict()
    assert [str(v) for v in columns["step"]] == [r["step"] for r in rows]
    assert columns["layer"] == [r["layer"] for r in rows] and columns["std"][-1] is None
    assert math.isclose(columns["std"][0], float(rows[0]["std"]), rel_tol=1e-6)

    # A kill mid-write: the file is readable up to its last whole record.
    data = recording.read_bytes()
    cut = tmp_path / "cut.icsrec"
    cut.write_bytes(data[: len(data) - 200])
    partial = icsmon("replay", str(cut), "--json", env=env, check=True)
    got = [s for s in lines_of(partial.stdout) if s["type"] == "sample"]
    assert 0 < len(got) < STEPS and [s["step"] for s in got] == list(range(len(got)))

    not_one = icsmon("replay", str(script), "--json", env=env)
    assert not_one.returncode == 1 and "is not an icsmon recording" in not_one.stderr


@pytest.mark.timeout(180)
def test_icsmon_record_writes_what_it_received(tmp_path: Path, env: dict[str, str]) -> None:
    script = tmp_path / "job.py"
    script.write_text(JOB)
    job = start_script(script, env, "-", "100000", "0")
    recording = tmp_path / "viewer.icsrec"
    try:
        wait_for_jobs(env)
        done = icsmon("record", "-o", str(recording), "--count", "20", env=env, timeout=60)
        assert done.returncode == 0 and "recorded 20 samples" in done.stderr, done.stderr
        # It said so while it recorded, from the first sample (not only when it ended).
        assert f"to {recording}: 1 sample so far" in done.stderr, done.stderr
    finally:
        job.kill()
        job.wait()
    out = icsmon("replay", str(recording), "--json", "--history", env=env, check=True)
    samples = [s for s in lines_of(out.stdout) if s["type"] == "sample"]
    steps = [s["step"] for s in samples]
    assert len(samples) == 20 and steps == sorted(steps) and len(set(steps)) == 20


def test_replay_opens_the_app_on_a_recording(tmp_path: Path, env: dict[str, str]) -> None:
    """The app on a recording: it plays, pauses, seeks; checked with Textual's pilot."""
    import asyncio

    from icsmon.alerts.config import default_engine_factory
    from icsmon.replay import ReplayFeed, load
    from icsmon.tui.app import IcsmonApp
    from tui.screen_text import until

    script = tmp_path / "job.py"
    script.write_text(JOB)
    recording = tmp_path / "run.icsrec"
    subprocess.run([sys.executable, str(script), str(recording), "45", "0"], env=env, check=True, timeout=120)
    feed = ReplayFeed(load([str(recording)]), engine_factory=default_engine_factory())
    feed.speed = 64.0

    async def drive() -> None:
        app = IcsmonApp(feed)
        async with app.run_test(size=(140, 30)) as pilot:
            await until(pilot, lambda: feed.position == len(feed.recorded), "the whole recording played")
            run = app.view_state.current(feed)
            assert run is not None and run.latest_step == 44 and run.ended
            await pilot.press("space", "0")  # pause, back to the start
            await pilot.pause()
            assert feed.position == 0 and not feed.store.runs and not feed.playing  # paused: nothing moves
            assert "REPLAY" in str(app.screen.query_one("#header").render())
            await pilot.press(">")  # a tenth of the recording on, at once
            await pilot.pause()
            assert feed.position == len(feed.recorded) // 10 and app.view_state.current(feed) is not None

    asyncio.run(drive())


def test_a_recorder_rotates_on_new_data_only_and_keeps_each_file_whole(tmp_path: Path) -> None:
    from icsmon.replay import records
    from icsmon_agent.protocol import LayerInfo, Schema, encode, schema_id_for
    from icsmon_agent.recording import Recorder

    layers = tuple(LayerInfo(f"layer.{i}", "Linear", (4, 4)) for i in range(2000))  # a big table
    schema = encode(Schema(run="r", rank=0, seq=1, t=1.0, layers=layers, schema_id=schema_id_for(layers)))
    small = [b"icsmon.v1.event", b"{}", b""]
    path = tmp_path / "rot.icsrec"
    rec = Recorder(path, max_bytes=2000, keep=2)  # the table alone is far past the limit
    rec.write(schema)
    for _ in range(300):
        rec.write(small)
    rec.close()
    files = [path, path.with_name("rot.icsrec.1"), path.with_name("rot.icsrec.2")]
    assert all(f.exists() for f in files) and not path.with_name("rot.icsrec.3").exists()
    for f in files:
        assert next(iter(records(f)))[1][0].endswith(b".schema")  # each file replays alone
    # Rotation counts new data only: a file is not one table and one record (a loop).
    assert len(list(records(path.with_name("rot.icsrec.1")))) > 20
    with pytest.raises(ValueError):
        Recorder(tmp_path / "x", keep=0)


def test_no_exported_csv_cell_is_a_formula_or_a_raw_escape() -> None:
    """Layer names are data: a name a spreadsheet would run (=HYPERLINK, +cmd, @SUM, a leading tab)
    is written with a leading ', control characters are shown escaped; numbers stay numbers."""
    import csv
    import io

    from icsmon.commands.export import FORMULA_STARTS, write_csv

    names = [
        '=HYPERLINK("http://x","y")',
        "+cmd|' /C calc'!A0",
        "-2+3",
        "@SUM(A1)",
        "\tx",
        "\rx",
        "a\x1b[31mb",
        "fc",
    ]
    out = io.StringIO()
    write_csv(out, iter([["run", 0, 1, 0.0, -1.5, name, "Linear"] for name in names]))
    rows = list(csv.reader(io.StringIO(out.getvalue())))[1:]
    cells = [row[5] for row in rows]
    assert not any(cell.startswith(FORMULA_STARTS) for cell in cells), cells
    assert cells[0] == "'" + names[0] and cells[-1] == "fc" and "\x1b" not in cells[6] and "\\x1b" in cells[6]
    assert all(row[4] == "-1.5" for row in rows)  # a negative number is a number, not a formula


def test_parquet_export_streams_one_row_group_at_a_time(tmp_path: Path) -> None:
    """A recording's rows reach the file group by group as they are read: the exporter never holds
    the whole table (a rotation's 229 MB once passed 1.3 GiB held in Python)."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from icsmon.commands.export import write_parquet

    out = tmp_path / "t.parquet"
    written_when: list[int] = []

    def rows() -> Iterator[list[object]]:
        for i in range(10_000):
            if i % 1000 == 0:
                written_when.append(out.stat().st_size if out.exists() else 0)
            yield ["run", 0, i, float(i), None, f"layer{i % 7}", "Linear", *([0.5] * len(STATS))]

    assert write_parquet(str(out), rows(), pa, pq, group=1000) == 10_000
    meta = pq.ParquetFile(out).metadata
    assert meta.num_rows == 10_000 and meta.num_row_groups == 10
    # The file grew while the rows were still being read: earlier groups were already out.
    assert written_when[-1] > written_when[1] > 0, written_when


def test_two_writers_given_one_recording_never_share_the_file(tmp_path: Path) -> None:
    """Two jobs given the same ICSMON_RECORD: the second writes a file of its own (PATH.PID), so
    each file replays whole."""
    import os

    from icsmon_agent.recording import MAGIC, Recorder

    path = tmp_path / "shared.icsrec"
    first, second = Recorder(path), Recorder(path)
    try:
        assert first.path == path and second.path == path.with_name(f"shared.icsrec.{os.getpid()}")
        first.write([b"a.event", b"{}", b""])
        second.write([b"b.event", b"{}", b""])
    finally:
        first.close()
        second.close()
    for p in (path, second.path):
        data = p.read_bytes()
        assert data.startswith(MAGIC) and data.count(MAGIC) == 1
    # Closed, the file is free again: the next writer appends to it.
    third = Recorder(path)
    assert third.path == path
    third.close()


def test_replay_goes_past_a_damaged_record_and_says_so_and_an_empty_one_is_an_error(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """A record whose length field reads 4 GB (a bad disk, a bad copy): the replay goes on from the
    next record and says how many it skipped. A file holding only its header: exit 1, one line."""
    import struct

    from icsmon_agent.protocol import LayerInfo, Sample, Schema, encode_sample, encode_schema, schema_id_for
    from icsmon_agent.recording import FRAME_HEAD, RECORD_HEAD, Recorder

    layers = (LayerInfo("fc", "Linear", (4,), "linear"),)
    sid = schema_id_for(layers)
    path = tmp_path / "damaged.icsrec"
    rec = Recorder(path)
    rec.write(encode_schema(Schema("run-1", 0, 1, 1.0, layers, name="job", schema_id=sid)))
    offsets = []
    for step in range(8):
        offsets.append(path.stat().st_size)
        figures = np.full((1, len(STATS)), 0.5, dtype=np.float32)
        rec.write(encode_sample(Sample("run-1", 0, step + 2, 1.0 + step, step, sid, figures, 1.0)))
    rec.close()
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, offsets[3] + RECORD_HEAD.size, 0xFFFFFFFF)  # record 4's first frame
    assert FRAME_HEAD.size == 4
    path.write_bytes(bytes(data))
    done = icsmon("replay", str(path), "--json", env=env)
    steps = [line["step"] for line in json_lines(done.stdout) if line["type"] == "sample"]
    assert done.returncode == 0 and steps == [0, 1, 2, 4, 5, 6, 7], (steps, done.stderr)
    assert "1 damaged records skipped" in done.stderr and "damaged; resumed at byte" in done.stderr
    empty = tmp_path / "empty.icsrec"
    Recorder(empty).close()
    nothing = icsmon("replay", str(empty), "--json", env=env)
    assert nothing.returncode == 1 and "no message in" in nothing.stderr and nothing.stdout == ""
