"""``icsmon export``: a recording as a table, one row per (step, rank, layer), for pandas."""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from icsmon.commands.common import error, note
from icsmon.render import clean
from icsmon.replay import messages
from icsmon.subscriber import Decoding
from icsmon_agent.protocol import STATS, Sample, Schema

COLUMNS = ["run", "rank", "step", "t", "loss", "layer", "type", *STATS]


def register(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="write a recording as CSV (or Parquet) for pandas",
        description="One row per (step, rank, layer): run, rank, step, t, loss, layer, type and every "
        "figure (empty where it does not apply). `pandas.read_csv(FILE)` reads it.",
        epilog="Exit status: 0, 1 if a file is not a recording, pyarrow is missing for --parquet, or "
        "the output cannot be written.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="recordings (a rotated set: oldest first)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="CSV (the default)")
    fmt.add_argument("--parquet", action="store_true", help="Parquet (needs pyarrow)")
    p.add_argument("-o", "--output", metavar="OUT", help="where to write (default: stdout for CSV)")
    p.set_defaults(func=run)


def rows(files: list[str], decoding: Decoding) -> Iterator[list[Any]]:
    tables: dict[tuple[str, int], Schema] = {}
    seen: set[tuple[str, int, int]] = set()
    for _, msg in messages(files, decoding):
        if isinstance(msg, Schema):
            before = tables.get((msg.run, msg.rank))
            if before is not None and before.started != msg.started:
                # The same run id from a restarted process: its seq starts again at 1.
                seen = {k for k in seen if k[:2] != (msg.run, msg.rank)}
            tables[(msg.run, msg.rank)] = msg
            continue
        if not isinstance(msg, Sample) or (msg.run, msg.rank, msg.seq) in seen:
            continue
        seen.add((msg.run, msg.rank, msg.seq))
        schema = tables.get((msg.run, msg.rank))
        if schema is None or schema.schema_id != msg.schema_id:
            continue  # a sample whose table the recording does not hold
        loss = msg.loss if msg.loss is not None and math.isfinite(msg.loss) else None
        for layer, figures in zip(schema.layers, msg.figures.tolist(), strict=False):
            cells = [v if math.isfinite(v) else None for v in figures]
            yield [msg.run, msg.rank, msg.step, msg.t, loss, layer.name, layer.type, *cells]


#: A text cell starting with one of these is a formula to a spreadsheet (OWASP's CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> Any:
    """A text cell as data, never a formula: control characters shown escaped (``\\x1b``), and a
    leading ``=``, ``+``, ``-``, ``@``, tab or CR neutralised with a ``'`` as spreadsheets advise.
    Numbers pass as they are."""
    if not isinstance(value, str):
        return "" if value is None else value
    text = clean(value)
    return "'" + text if value.startswith(FORMULA_STARTS) else text


def write_csv(out: TextIO, table: Iterator[list[Any]]) -> int:
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    n = 0
    for row in table:
        writer.writerow([spreadsheet_safe(v) for v in row])
        n += 1
    return n


#: Rows held in memory before they are written out as one Parquet row group.
ROW_GROUP = 65_536


def write_parquet(path: str, table: Iterator[list[Any]], pa: Any, pq: Any, group: int = ROW_GROUP) -> int:
    """Stream the rows into ``path`` one row group at a time: memory holds one group, not the file."""
    types = [pa.string(), pa.int64(), pa.int64(), pa.float64(), pa.float64(), pa.string(), pa.string()]
    schema = pa.schema([*zip(COLUMNS, types + [pa.float32()] * len(STATS), strict=True)])
    n = 0
    with pq.ParquetWriter(path, schema) as writer:
        while True:
            batch = list(itertools.islice(table, group))
            if not batch:
                break
            columns = [
                pa.array([r[i] for r in batch], type=schema.field(i).type) for i in range(len(COLUMNS))
            ]
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))
            n += len(batch)
    return n


def run(args: argparse.Namespace) -> int:
    decoding = Decoding()
    table = rows(args.files, decoding)
    if args.parquet:
        try:
            import pyarrow as pa  # type: ignore[import-not-found,import-untyped,unused-ignore]
            import pyarrow.parquet as pq  # type: ignore[import-not-found,import-untyped,unused-ignore]
        except ImportError:
            return error("--parquet needs pyarrow (`pip install pyarrow`); --csv needs nothing")
        if not args.output:
            return error("--parquet writes a file: give it with -o OUT")
        try:
            n = write_parquet(args.output, table, pa, pq)
        except OSError as exc:
            return error(f"cannot write {args.output}: {exc.strerror or exc}")
    elif args.output:
        try:
            with open(args.output, "w", newline="") as out:
                n = write_csv(out, table)
        except OSError as exc:
            return error(f"cannot write {args.output}: {exc.strerror or exc}")
    else:
        n = write_csv(sys.stdout, table)
    if decoding.rejected:
        note(f"{decoding.rejected} damaged records skipped ({decoding.last_error})")
    if args.output:
        note(f"{n} rows written to {args.output}")
    return 0
