"""What the side-by-side screen shows, from the feed alone (no widgets: cheap to test).

Two shapes of "several streams":

* the ranks of one data-parallel job: per layer, the spread across ranks (min / median / max of
  std and of the gradient norm) and the rank farthest from the others;
* several runs (the demo's plain and BatchNorm nets, ``icsmon attach RUN1 RUN2``): one column
  group per run, layers matched by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from icsmon.alerts.ranks import aligned, newest, spread
from icsmon.feed import Feed
from icsmon.store import RunState
from icsmon.tui import view
from icsmon.tui.safe import clean
from icsmon_agent.protocol import STAT_INDEX

#: The farthest rank is named when its std is this many times away from the median (log scale 0.3).
OUTLIER_RATIO = 2.0

Cell = tuple[str, str]  # text, style ("" for none)
SPARK = 10


@dataclass
class Column:
    label: str
    width: int
    numeric: bool = True


@dataclass
class Table:
    groups: list[tuple[str, int]]  # (title, columns it spans) over the column labels
    columns: list[Column]
    rows: list[list[Cell]]
    mode: str  # "ranks" | "runs" | "one"


def streams_by_run(feed: Feed) -> dict[str, list[RunState]]:
    out: dict[str, list[RunState]] = {}
    for stream in feed.streams():
        if stream.count:
            out.setdefault(stream.run, []).append(stream)
    return out


def title(stream: RunState, feed: Feed) -> str:
    name = clean(feed.label(stream))
    step = stream.latest_step
    loss = stream.latest_loss
    parts = [name, f"step {step if step is not None else '-'}"]
    if loss is not None:
        parts.append(f"loss {view.num(loss)}")
    parts.append(feed.state(stream))
    return "  ".join(parts)


def build(feed: Feed, width: int = 200) -> Table:
    """The side-by-side table for a terminal ``width`` wide."""
    runs = streams_by_run(feed)
    if len(runs) == 1:
        ranks = next(iter(runs.values()))
        if len(ranks) > 1:
            return rank_table(feed, ranks)
    return run_table(feed, [streams[0] for streams in runs.values()], width)


#: What each run's column group shows, widest first: the first whose groups all fit the terminal
#: next to the layer column is used, so an 80-column terminal still shows every run's status.
GROUP_VARIANTS: tuple[tuple[str, ...], ...] = (
    ("spark", "std", "grad", "status"),
    ("spark", "std", "status"),
    ("std", "status"),
)
GROUP_WIDTH = {"spark": SPARK, "std": 9, "grad": 9, "status": 11}
LAYER_WIDTH = 24


def group_variant(n_runs: int, width: int) -> tuple[str, ...]:
    for variant in GROUP_VARIANTS:
        needed = LAYER_WIDTH + 2 + n_runs * sum(GROUP_WIDTH[c] + 1 for c in variant)
        if needed <= width:
            return variant
    return GROUP_VARIANTS[-1]


def _name_cells(stream: RunState) -> list[Cell]:
    assert stream.schema is not None
    return [(clean(f"{layer.name} {layer.type}"), "") for layer in stream.schema.layers]


def rank_table(feed: Feed, ranks: list[RunState]) -> Table:
    """The spread across the ranks of one job, per layer, and the outlier rank."""
    first = ranks[0]
    same = [
        r
        for r in ranks
        if r.schema is not None and first.schema is not None and r.schema.schema_id == first.schema.schema_id
    ]
    both = aligned(same)  # one step that every rank holds, read once for every column
    samples = both[0] if both is not None else newest(same)
    std_lo, std_mid, std_hi, outlier = spread(same, "std", samples)
    grad_lo, grad_mid, grad_hi, _ = spread(same, "grad_norm", samples)
    badges = view.badges(first, feed.active_alerts(first))
    nonfinite = (
        np.nan_to_num(samples[:, :, STAT_INDEX["nonfinite"]]) > 0
        if both is not None
        else np.zeros((len(same), len(std_mid)), dtype=bool)
    )
    rows: list[list[Cell]] = []
    names = _name_cells(first)
    for i in range(len(names)):
        with np.errstate(all="ignore"):
            far = bool(std_hi[i] / std_mid[i] >= OUTLIER_RATIO or std_mid[i] / std_lo[i] >= OUTLIER_RATIO)
        bad = [r.rank for r, flag in zip(same, nonfinite[:, i], strict=True) if flag]
        if bad and len(bad) < len(same):
            outlier_cell = ("NaN r" + ",".join(map(str, bad)), "bold white on red")
        elif far:
            outlier_cell = (f"r{outlier[i]}", "bold red")
        else:
            outlier_cell = ("-", "dim")
        rows.append(
            [
                names[i],
                (view.num(std_lo[i]), ""),
                (view.num(std_mid[i]), ""),
                (view.num(std_hi[i]), ""),
                (view.num(grad_lo[i]), ""),
                (view.num(grad_mid[i]), ""),
                (view.num(grad_hi[i]), ""),
                outlier_cell,
                (badges[i].text, _badge_style(badges[i].level)),
            ]
        )
    columns = [Column("layer", 28, numeric=False)] + [
        Column(label, 9) for label in ("min", "median", "max", "min", "median", "max")
    ]
    columns += [Column("outlier", 8), Column("status", 15, numeric=False)]
    world = first.schema.world_size if first.schema is not None else len(ranks)
    head = f"{clean(first.schema.name if first.schema else first.run)}: {len(same)} of {world} ranks"
    groups = [(head, 1), ("std across ranks", 3), ("grad norm across ranks", 3), ("", 2)]
    return Table(groups, columns, rows, "ranks")


def row_keys(stream: RunState, by_name: bool) -> list[tuple[str, ...]]:
    """How a layer is matched across runs: by name when the runs share one layer table, else as the
    k-th layer of its type (the third Linear of a plain net against the third of a BatchNorm net)."""
    assert stream.schema is not None
    if by_name:
        return [(layer.name,) for layer in stream.schema.layers]
    seen: dict[str, int] = {}
    keys: list[tuple[str, ...]] = []
    for layer in stream.schema.layers:
        seen[layer.type] = seen.get(layer.type, 0) + 1
        keys.append((layer.type, str(seen[layer.type])))
    return keys


def run_table(feed: Feed, streams: list[RunState], width: int = 200) -> Table:
    """One column group per run; rows in depth order, layers matched by :func:`row_keys`."""
    shown = group_variant(len(streams), width)
    by_name = len({s.schema.schema_id for s in streams if s.schema is not None}) <= 1
    depth: dict[tuple[str, ...], float] = {}
    labels: dict[tuple[str, ...], str] = {}
    index: list[dict[tuple[str, ...], int]] = []
    for stream in streams:
        assert stream.schema is not None
        keys = row_keys(stream, by_name)
        index.append({key: i for i, key in enumerate(keys)})
        n = max(len(keys), 1)
        for i, (key, layer) in enumerate(zip(keys, stream.schema.layers, strict=True)):
            depth[key] = min(depth.get(key, 1.0), i / n)
            labels.setdefault(key, clean(f"{layer.name} {layer.type}"))
    order = sorted(depth, key=lambda k: depth[k])
    rows: list[list[Cell]] = [[(labels[key], "")] for key in order]
    columns = [Column("layer", LAYER_WIDTH, numeric=False)]
    groups: list[tuple[str, int]] = [("" if by_name else "by type, depth", 1)]
    heads = {
        "spark": Column("std trend", SPARK, numeric=False),
        "std": Column("std", GROUP_WIDTH["std"]),
        "grad": Column("grad", GROUP_WIDTH["grad"]),
        "status": Column("status", GROUP_WIDTH["status"], numeric=False),
    }
    for stream, where in zip(streams, index, strict=True):
        latest = stream.latest()
        badges = view.badges(stream, feed.active_alerts(stream))
        spark = view.sparklines(stream.series("std", n=SPARK), SPARK)
        for row, key in zip(rows, order, strict=True):
            at = where.get(key)
            if at is None or latest is None:
                row += [("", "")] * len(shown)
                continue
            cells = {
                "spark": (spark[at], "cyan"),
                "std": (view.num(latest[at, STAT_INDEX["std"]]), ""),
                "grad": (view.num(latest[at, STAT_INDEX["grad_norm"]]), ""),
                "status": (badges[at].text, _badge_style(badges[at].level)),
            }
            row += [cells[c] for c in shown]
        columns += [heads[c] for c in shown]
        groups.append((title(stream, feed), len(shown)))
    return Table(groups, columns, rows, "runs" if len(streams) > 1 else "one")


def _badge_style(level: str) -> str:
    return {
        "ok": "green",
        "warning": "bold yellow",
        "critical": "bold red",
        "nonfinite": "bold white on red",
    }.get(level, "dim")
