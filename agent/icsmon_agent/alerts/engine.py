"""The alert engine: runs the rules on each new sample and adds persistence and hysteresis.

One engine may serve several runs (the store keys them by run and rank); each run has its own
state. Per rule and run:

* a warning-level condition fires after it held for ``fire_after`` consecutive samples, so one odd
  sample does not raise anything; a critical one, and the rules where waiting is too late
  (``nonfinite``, ``exploding``, ``shift``), fire on the sample where they first hold;
* an active alert clears after the condition was gone for ``clear_after`` consecutive samples
  (twice that for the rules that fire at once, so a run that keeps spiking does not flicker);
  samples with NaN/Inf do not count towards clearing (the evidence is gone, not the problem);
* an active warning that turns critical fires again, as critical.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from ..protocol import STAT_INDEX, Schema
from . import hints
from .config import Thresholds
from .model import Alert, AlertChange, fmt
from .rules import RULES, RUN_FIGURES, Finding, FloatArray, Window, finite_tail

HISTORY = 500  # alert changes kept for the history view
#: The run's early scale (see rules._jump) is the median of this many first samples.
EARLY_SAMPLES = 16
#: Where the run's loss began (rules.loss_level): the median of this many first losses (one lucky
#: batch of a heavy-tailed loss, as when fine-tuning, is no start).
EARLY_LOSSES = 5


@dataclass
class _RuleState:
    holding: int = 0  # consecutive samples the condition held
    gone: int = 0  # consecutive samples it did not
    active: Alert | None = None
    loss_before: float | None = None  # the loss's level just before it fired (exploding)


@dataclass
class _RunAlerts:
    rules: dict[str, _RuleState] = field(default_factory=lambda: {name: _RuleState() for name in RULES})
    count: int = 0  # RunState.count when last evaluated (an ingest with no new sample changes nothing)
    schema_id: str = ""
    early: np.ndarray | None = None  # the median of the run's first EARLY_SAMPLES samples held
    early_loss: float | None = None  # the median of its first EARLY_LOSSES losses held


class Recent(Protocol):
    """What the engine reads of a stream: the viewer's ring (``icsmon.store.RunState``) and the
    job's own (:class:`icsmon_agent.alerts.judge.Recent`) both answer it."""

    run: str
    rank: int
    optimizer: str  # the type of the optimizer that marks the steps ("" if not known)
    scalars: dict[str, float | None]  # the newest sample's scalars (lr, ...)

    @property
    def schema(self) -> Schema | None: ...

    @property
    def count(self) -> int: ...  # samples taken so far

    def recent_figures(self, n: int) -> FloatArray:
        """The last ``n`` samples held (fewer if fewer): (m, n_layers, n_stats), oldest first."""
        ...

    def recent_steps(self, n: int) -> npt.NDArray[np.int64]: ...

    def recent_losses(self, n: int) -> FloatArray: ...

    def oldest_figures(self, n: int) -> FloatArray | None:
        """The ``n`` oldest samples held, or None while fewer are held."""
        ...


def window_of(run: Recent, n: int, history: int = 0) -> Window | None:
    """The last ``n`` samples of ``run`` as a rule :class:`Window` (None before the first sample),
    with the last ``history`` losses."""
    if run.schema is None or run.count == 0:
        return None
    output = run.schema.layers[-1].shape if run.schema.layers else ()
    return Window(
        names=tuple(run.schema.layer_names),
        kinds=tuple(layer.kind for layer in run.schema.layers),
        figures=run.recent_figures(n),
        step=int(run.recent_steps(1)[-1]),
        types=tuple(layer.type for layer in run.schema.layers),
        losses=run.recent_losses(max(history, n)),
        output_width=int(output[-1]) if output else 0,
        scalars=run.scalars,
    )


def describe(
    rule: str, finding: Finding, names: tuple[str, ...], step: int, run: str = "", types: tuple[str, ...] = ()
) -> str:
    """The alert's one line: layer (and its type), figure, value, step (and how far it reaches)."""

    def label(i: int) -> str:  # "8 Linear": a bare name is often an index of a Sequential
        return f"{names[i]} {types[i]}" if i < len(types) and types[i] else names[i]

    where = "" if finding.figure in RUN_FIGURES else f"{label(finding.first)} "
    text = f"{rule}: {where}{finding.figure} {fmt(finding.value)}"
    if finding.detail:
        text += f" ({finding.detail})"
    text += f" at step {step}"
    if len(finding.layers) > 1:
        text += f"; {len(finding.layers)} layers, {label(finding.layers[0])} to {label(finding.layers[-1])}"
    if run:
        text += f" [{run}]"
    return text


def _level(losses: FloatArray | None, n: int, skip: int = 0) -> float | None:
    """The median of the finite values among the last ``n`` losses (before the last ``skip``),
    or None: the loss's level as :func:`rules.loss_level` reads it."""
    recent = finite_tail(losses, n, skip)
    return float(np.median(recent)) if recent.size else None


class AlertEngine:
    def __init__(self, thresholds: Thresholds | None = None) -> None:
        self.thresholds = thresholds or Thresholds()
        self._runs: dict[tuple[str, int], _RunAlerts] = {}
        self._history: deque[AlertChange] = deque(maxlen=HISTORY)

    def update(self, run: Recent) -> list[AlertChange]:
        """Call once after each new sample was stored in ``run``; returns alerts fired/cleared now."""
        key = (run.run, run.rank)
        state = self._runs.get(key)
        schema_id = run.schema.schema_id if run.schema is not None else ""
        if state is None or state.schema_id != schema_id:
            state = self._runs[key] = _RunAlerts(schema_id=schema_id)
        if run.count == state.count:
            return []
        state.count = run.count
        t = self.thresholds
        window = window_of(run, max(t.window, t.shift_window) + 1, history=t.spike_window + 1)
        if window is None:
            return []
        if state.early is None:
            # The oldest samples held: the run's start, or as near it as a viewer that joined late
            # was sent (its history arrives in one batch, so rows are taken as held, not one per
            # update).
            oldest = run.oldest_figures(EARLY_SAMPLES)
            if oldest is not None:
                with np.errstate(all="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column stays NaN
                    state.early = np.nanmedian(oldest, axis=0)
        if state.early_loss is None and window.losses is not None:
            # As for the early scale: the oldest losses held.
            first = window.losses[np.isfinite(window.losses)][:EARLY_LOSSES]
            if first.size == EARLY_LOSSES:
                state.early_loss = float(np.median(first))
        window = dataclasses.replace(window, early=state.early, early_loss=state.early_loss)
        latest = window.figures[-1]
        has_nonfinite = bool(
            np.nan_to_num(latest[:, STAT_INDEX["nonfinite"]]).max(initial=0) > 0
            or np.isinf(latest[:, STAT_INDEX["std"]]).any()
        )
        changes: list[AlertChange] = []
        for name, (rule, at_once, hint) in RULES.items():
            rs = state.rules[name]
            finding = rule(window, t)
            if finding is None:
                rs.holding = 0
                if rs.active is not None and not has_nonfinite and not self._unrecovered(name, window, rs):
                    rs.gone += 1
                    if rs.gone >= t.clear_after * (2 if at_once else 1):
                        changes.append(AlertChange(rs.active, cleared=True, step=window.step))
                        rs.active = None
                continue
            rs.holding += 1
            rs.gone = 0
            due = at_once or finding.severity == "critical" or rs.holding >= t.fire_after
            escalates = (
                rs.active is not None and rs.active.severity == "warning" and finding.severity == "critical"
            )
            if (rs.active is None and due) or escalates:
                if rs.active is None:
                    rs.loss_before = _level(window.losses, t.loss_window, skip=1)
                rs.active = self._alert(name, finding, window, run, hint)
                changes.append(AlertChange(rs.active))
        self._history.extend(changes)
        return changes

    def _unrecovered(self, rule: str, window: Window, rs: _RuleState) -> bool:
        """An explosion is over when the loss is back where it was before it, or below where the
        run began, not when the figures stop jumping: a run stuck on a bad plateau after a blow-up
        (at chance, or above its start) stays flagged. (A resumed run, whose start is its plateau,
        recovers by the first test.)"""
        t = self.thresholds
        start, before = window.early_loss, rs.loss_before
        level = _level(window.losses, t.loss_window)
        if rule != "exploding" or level is None or start is None or not start > 0:
            return False
        back = t.loss_recovered * start
        if before is not None and before > 0:
            back = max(back, before / t.loss_recovered)
        return level > back

    def _alert(self, rule: str, finding: Finding, window: Window, run: Recent, hint: str) -> Alert:
        names = window.names
        run_level = finding.figure in RUN_FIGURES  # the loss belongs to no layer
        return Alert(
            rule=rule,
            layer="" if run_level else names[finding.first],
            layer_index=-1 if run_level else finding.first,
            step=window.step,
            severity=finding.severity,
            value=finding.value,
            message=describe(rule, finding, names, window.step, types=window.types),
            hint=hints.hint(
                rule,
                window,
                hint,
                finding.figure,
                optimizer=run.optimizer,
                lr=run.scalars.get("lr"),
                first=-1 if run_level else finding.first,
            ),
            run=run.run,
            rank=run.rank,
            figure=finding.figure,
            layers=() if run_level else tuple(names[i] for i in finding.layers),
        )

    def take(self, change: AlertChange) -> bool:
        """An alert the job fired or cleared itself (its own engine judged it), held as if fired
        here. False for what changes nothing: an alert already active, a clear of none."""
        alert = change.alert
        state = self._runs.setdefault((alert.run, alert.rank), _RunAlerts())
        rs = state.rules.setdefault(alert.rule, _RuleState())
        if change.cleared:
            if rs.active is None:
                return False
            rs.active = None
        else:
            if rs.active == alert:
                return False
            rs.active = alert
        self._history.append(change)
        return True

    def forget(self, run: str, rank: int = 0) -> None:
        """Drop a run's state (it ended or was replaced); its alerts leave ``active``."""
        self._runs.pop((run, rank), None)

    @property
    def active(self) -> list[Alert]:
        """Currently firing alerts, in depth order (then by run)."""
        out = [rs.active for st in self._runs.values() for rs in st.rules.values() if rs.active is not None]
        order = {name: i for i, name in enumerate(RULES)}  # a newer job's rule goes last
        return sorted(out, key=lambda a: (a.layer_index, a.run, a.rank, order.get(a.rule, len(order))))

    @property
    def history(self) -> list[AlertChange]:
        """Every fire and clear, bounded, newest last."""
        return list(self._history)
