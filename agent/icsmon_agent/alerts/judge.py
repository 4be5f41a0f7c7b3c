"""The job judges itself: the alert engine run on every sample the agent takes, on its publisher
thread (never the training thread), whether or not anyone watches.

:class:`Recent` is the job's own short memory of its samples, what the rules look back on: the
figures of the last few samples and a longer run of losses (the spike rule's window), bounded
whatever the job's length.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ..protocol import STATS, Sample, Schema
from .config import Thresholds
from .engine import EARLY_SAMPLES, AlertEngine
from .model import AlertChange
from .rules import FloatArray


class Recent:
    """The last ``figure_rows`` samples' figures and the last ``loss_rows`` losses of one stream
    (answers :class:`~icsmon_agent.alerts.engine.Recent`)."""

    def __init__(self, schema: Schema, figure_rows: int, loss_rows: int) -> None:
        self.run = schema.run
        self.rank = schema.rank
        self.schema: Schema | None = schema
        self.optimizer = ""
        self.scalars: dict[str, float | None] = {}
        self.count = 0
        self.schema_id = schema.schema_id
        self.n_layers = len(schema.layers)
        self._rows = figure_rows
        self._figures = np.full((figure_rows, len(schema.layers), len(STATS)), np.nan)
        self._steps = np.zeros(figure_rows, dtype=np.int64)
        self._losses = np.full(loss_rows, np.nan)
        # The run's first samples, kept apart: the ring forgets them, the early scale must not.
        self._first: list[FloatArray] = []

    def add(self, sample: Sample) -> None:
        fig = sample.figures
        width = min(fig.shape[1], len(STATS))
        row = self.count % self._rows
        self._figures[row] = np.nan
        self._figures[row, :, :width] = fig[:, :width]
        self._steps[row] = sample.step
        self._losses[self.count % len(self._losses)] = np.nan if sample.loss is None else sample.loss
        if len(self._first) < EARLY_SAMPLES:
            self._first.append(self._figures[row].copy())
        self.scalars = dict(sample.scalars)
        self.count += 1

    def _order(self, n: int, rows: int) -> npt.NDArray[np.int64]:
        take = min(n, self.count, rows)
        return np.arange(self.count - take, self.count, dtype=np.int64) % rows

    def recent_figures(self, n: int) -> FloatArray:
        out: FloatArray = self._figures[self._order(n, self._rows)]
        return out

    def recent_steps(self, n: int) -> npt.NDArray[np.int64]:
        return self._steps[self._order(n, self._rows)]

    def recent_losses(self, n: int) -> FloatArray:
        out: FloatArray = self._losses[self._order(n, len(self._losses))]
        return out

    def oldest_figures(self, n: int) -> FloatArray | None:
        return np.stack(self._first[:n]) if len(self._first) >= n else None


class Judge:
    """Runs the rules on each sample of one stream; returns the alerts fired or cleared by it."""

    def __init__(self, thresholds: Thresholds | None = None) -> None:
        self.engine = AlertEngine(thresholds)
        t = self.engine.thresholds
        self._figure_rows = max(t.window, t.shift_window) + 2
        self._loss_rows = t.spike_window + 2
        self._recent: Recent | None = None
        self.optimizer = ""

    def set_schema(self, schema: Schema) -> None:
        if self._recent is None or self._recent.schema_id != schema.schema_id:
            if self._recent is not None:
                self.engine.forget(self._recent.run, self._recent.rank)
            self._recent = Recent(schema, self._figure_rows, self._loss_rows)

    def judge(self, sample: Sample) -> list[AlertChange]:
        recent = self._recent
        if recent is None or sample.figures.shape[0] != recent.n_layers:
            return []
        recent.optimizer = self.optimizer
        recent.add(sample)
        return self.engine.update(recent)
