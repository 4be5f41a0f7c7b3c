"""``rank_divergence``: one rank of a data-parallel job departs from the others.

The ranks of a DDP job run the same model on different shards, so their activations agree in
scale. A NaN on one rank only, or a layer whose output spread is an order of magnitude away from
the other ranks', is the sign of a bad shard or a broken node, not of the model. The check compares
each rank's newest sample, layer by layer, and names the outlier rank.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from icsmon.render import fmt
from icsmon.store import RunState
from icsmon_agent.alerts.model import Alert, AlertChange
from icsmon_agent.protocol import STAT_INDEX

RULE = "rank_divergence"
#: An outlier's std is this many times the others' median (or a tenth of it).
STD_RATIO = 10.0
#: Below this std a layer's output is a constant (a mask, a padding row): no scale to compare.
STD_FLOOR = 1e-12
#: A warning must hold this many consecutive checks; a NaN on one rank fires at once.
CONFIRM = 2
#: Checks without the condition before an active alert clears.
CLEAR_AFTER = 3
HINT = (
    "one rank only: look at that rank's data shard (a corrupt or mis-normalised file) and at its "
    "node (GPU errors in dmesg or nvidia-smi); `icsmon tail --rank N` follows it alone"
)


@dataclass(frozen=True)
class Divergence:
    rank: int
    layer: int
    critical: bool
    figure: str
    value: float
    detail: str
    step: int  # the step whose samples were compared


def aligned(ranks: list[RunState]) -> tuple[np.ndarray, int] | None:
    """Every rank's sample of one step, (ranks, layers, stats), and that step: the newest step that
    every rank holds a sample of. Ranks sample at their own moments (the adaptive cadence) and a NaN
    batch on one rank reaches the others within a step (DDP averages the gradients), so only
    samples of the very same step can be compared; None when the ranks share no step."""
    if not ranks or any(r.count == 0 for r in ranks):
        return None
    held = [r.step_series() for r in ranks]
    common = held[0]
    for steps in held[1:]:
        common = np.intersect1d(common, steps)
    if common.size == 0:
        return None
    step = int(common.max())
    rows = []
    for run, steps in zip(ranks, held, strict=True):
        order = np.arange(run.count - run.size, run.count) % run.capacity
        rows.append(run.figures[order[np.flatnonzero(steps == step)[-1]]])
    return np.stack(rows).astype(np.float64), step


def newest(ranks: list[RunState]) -> np.ndarray:
    """Each rank's newest sample, (ranks, layers, stats): what to show where they share no step."""
    return np.stack([_latest(r) for r in ranks]).astype(np.float64)


def spread(
    ranks: list[RunState], stat: str, samples: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per layer, across ``samples`` (:func:`aligned`'s, else :func:`newest`): (min, median, max, rank farthest
    from the median in log scale). NaN where no rank has a finite value."""
    values = samples[:, :, STAT_INDEX[stat]]  # (ranks, layers)
    finite = np.where(np.isfinite(values), values, np.nan)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
        low, mid, high = np.nanmin(finite, 0), np.nanmedian(finite, 0), np.nanmax(finite, 0)
        distance = np.abs(np.log10(np.abs(finite) + STD_FLOOR) - np.log10(np.abs(mid) + STD_FLOOR))
        distance = np.where(np.isnan(distance), -1.0, distance)
    outlier = np.array([ranks[i].rank for i in distance.argmax(axis=0)])
    return low, mid, high, outlier


def _latest(run: RunState) -> np.ndarray:
    latest = run.latest()
    assert latest is not None
    return latest


def find(ranks: list[RunState], both: tuple[np.ndarray, int] | None = None) -> Divergence | None:
    """The first divergence in depth order (a one-rank NaN before a scale gap), or None.
    ``both``: what :func:`aligned` gave for these ranks, if the caller has it already."""
    if len(ranks) < 2 or any(r.schema is None or r.count == 0 for r in ranks):
        return None
    if len({r.schema.schema_id for r in ranks if r.schema is not None}) != 1:
        return None  # different layer tables: different models, nothing to compare
    both = both if both is not None else aligned(ranks)
    if both is None:
        return None
    latest, step = both  # (ranks, layers, stats)
    nonfinite = (np.nan_to_num(latest[:, :, STAT_INDEX["nonfinite"]]) > 0) | np.isinf(
        latest[:, :, STAT_INDEX["std"]]
    )
    bad = nonfinite.any(axis=0) & ~nonfinite.all(axis=0)
    if bad.any():
        layer = int(np.argmax(bad))
        which = [ranks[i].rank for i in np.flatnonzero(nonfinite[:, layer])]
        names = ", ".join(str(r) for r in which)
        return Divergence(
            which[0], layer, True, "nonfinite", float(len(which)), f"on rank {names} only", step
        )
    std = latest[:, :, STAT_INDEX["std"]]
    usable = np.isfinite(std).all(axis=0) & (std > STD_FLOOR).all(axis=0)
    if not usable.any():
        return None
    logs = np.log10(np.where(usable, std, 1.0))
    if len(ranks) == 2:
        gap = np.abs(logs[0] - logs[1])
        outlier_row = np.where(logs[1] > logs[0], 1, 0)
    else:
        median = np.median(logs, axis=0)
        deviation = np.abs(logs - median)
        outlier_row = deviation.argmax(axis=0)
        gap = deviation.max(axis=0)
    gap = np.where(usable, gap, 0.0)
    over = gap >= np.log10(STD_RATIO)
    if not over.any():
        return None
    layer = int(np.argmax(over))
    row = int(outlier_row[layer])
    others = np.delete(std[:, layer], row)
    ratio = float(std[row, layer] / np.median(others))
    return Divergence(
        ranks[row].rank, layer, False, "std", ratio, f"{fmt(ratio)}x the other ranks' std", step
    )


class RankCheck:
    """Runs :func:`find` on each update of one job's ranks, with confirmation and clearing."""

    def __init__(self) -> None:
        self.active_alert: Alert | None = None
        self.history: list[AlertChange] = []
        self._holding = 0
        self._gone = 0
        self._last_step: int | None = None

    @property
    def active(self) -> list[Alert]:
        return [self.active_alert] if self.active_alert is not None else []

    def update(self, ranks: list[RunState]) -> list[AlertChange]:
        both = aligned(ranks) if len(ranks) > 1 else None
        if both is None or both[1] == self._last_step:
            return []  # each step is judged once, when every rank has sent it
        step = self._last_step = both[1]
        found = find(ranks, both)
        changes: list[AlertChange] = []
        if found is None:
            self._holding = 0
            if self.active_alert is not None:
                self._gone += 1
                if self._gone >= CLEAR_AFTER:
                    changes.append(AlertChange(self.active_alert, cleared=True, step=step))
                    self.active_alert = None
            self.history.extend(changes)
            return changes
        self._gone = 0
        self._holding += 1
        due = found.critical or self._holding >= CONFIRM
        active = self.active_alert
        escalates = active is not None and active.severity == "warning" and found.critical
        if (active is None and due) or escalates:
            self.active_alert = self._alert(found, ranks, found.step)
            changes.append(AlertChange(self.active_alert))
        self.history.extend(changes)
        return changes

    def _alert(self, found: Divergence, ranks: list[RunState], step: int) -> Alert:
        run = ranks[0]
        assert run.schema is not None
        layer = run.schema.layers[found.layer]
        label = f"{layer.name} {layer.type}".strip()
        if found.critical:
            what = f"NaN/Inf {found.detail} (of {len(ranks)})"
        else:
            what = f"rank {found.rank}'s std is {found.detail}"
        return Alert(
            rule=RULE,
            layer=layer.name,
            layer_index=found.layer,
            step=step,
            severity="critical" if found.critical else "warning",
            value=found.value,
            message=f"{RULE}: {label} {what} at step {step} [{run.run}]",
            hint=HINT,
            run=run.run,
            rank=found.rank,
            figure=found.figure,
            layers=(layer.name,),
        )
