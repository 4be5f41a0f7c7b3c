"""The viewer's memory: per run and rank, fixed-size numpy rings of every layer's figures.

The store never touches a socket or a widget. It takes decoded messages (:meth:`Store.add`), drops
duplicates by ``seq`` (the agent re-sends its history to every new subscriber), counts gaps as
drops, holds samples that arrive before their schema, and answers queries for the latest values
and recent series. Memory is bounded: ``capacity`` samples per run, whatever the message rate.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from icsmon_agent.alerts.model import ALERT_TYPES
from icsmon_agent.protocol import STAT_INDEX, STATS, Event, Message, Sample, Schema

DEFAULT_CAPACITY = 512
PENDING_MAX = 64
#: Samples held before their schema, in bytes of figures per stream.
PENDING_MAX_BYTES = 8 * 1024 * 1024
#: The ring starts this many rows deep and doubles up to its capacity: memory follows what arrived,
#: not what a schema announced.
FIRST_ROWS = 8
STALE_AFTER_S = 10.0
#: Streams kept at once; past it the one heard from least recently goes (ended ones first).
MAX_RUNS = 256
#: Layers over all streams' tables (each a row of every sample held): past it, streams go as above.
MAX_TOTAL_LAYERS = 200_000
#: Bytes of figures over all rings: past it a ring stops growing and wraps at the rows it has.
MAX_FIGURE_BYTES = 1024 * 1024 * 1024

RunKey = tuple[str, int]


@dataclass
class RunState:
    """Everything known about one (run, rank)."""

    run: str
    rank: int
    capacity: int
    schema: Schema | None = None
    count: int = 0  # samples stored so far (the ring holds the last ``capacity``)
    last_seq: int = 0
    first_sample_seq: int = 0
    dropped: int = 0  # gaps in seq since the first sample seen
    agent_dropped: int = 0  # what the agent reports it dropped before sending
    ended: bool = False
    last_event: str = ""
    paused_step: int | None = None  # the step a "paused" event named (Monitor.pause)
    forward_steps: bool = False  # the job marks no step: the agent counts each training forward
    optimizer: str = ""  # the type of the optimizer that marks the steps, as the agent reported it
    last_recv: float = 0.0  # monotonic time of the last message
    last_sample_wall: float = 0.0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=256))
    steps: npt.NDArray[np.int64] = field(init=False)
    times: npt.NDArray[np.float64] = field(init=False)
    losses: npt.NDArray[np.float64] = field(init=False)
    lrs: npt.NDArray[np.float64] = field(init=False)  # the learning rate the job sent ("lr"), NaN if none
    figures: npt.NDArray[np.float32] = field(init=False)  # (capacity, n_layers, n_stats)
    scalars: dict[str, float | None] = field(default_factory=dict)
    pending: deque[Sample] = field(default_factory=deque)
    pending_bytes: int = 0

    def __post_init__(self) -> None:
        self.may_grow: Callable[[int], bool] = lambda extra: True  # the store's memory budget
        self._alloc(0)

    def _alloc(self, n_layers: int) -> None:
        rows = min(FIRST_ROWS, self.capacity)
        self.steps = np.zeros(rows, dtype=np.int64)
        self.times = np.zeros(rows, dtype=np.float64)
        self.losses = np.full(rows, np.nan, dtype=np.float64)
        self.lrs = np.full(rows, np.nan, dtype=np.float64)
        self.figures = np.full((rows, n_layers, len(STATS)), np.nan, dtype=np.float32)
        self.count = 0
        self.pending_bytes = 0

    def _grow(self) -> None:
        """Double the rows (up to the capacity); only before the ring first wraps, so rows stay in
        order. Past the store's budget the ring keeps the rows it has and wraps there."""
        rows = min(len(self.steps) * 2, self.capacity)
        extra = rows - len(self.steps)
        if not self.may_grow(extra * self.figures[0].nbytes):
            self.capacity = len(self.steps)
            return
        self.steps = np.concatenate([self.steps, np.zeros(extra, dtype=np.int64)])
        self.times = np.concatenate([self.times, np.zeros(extra, dtype=np.float64)])
        self.losses = np.concatenate([self.losses, np.full(extra, np.nan)])
        self.lrs = np.concatenate([self.lrs, np.full(extra, np.nan)])
        pad = np.full((extra, *self.figures.shape[1:]), np.nan, dtype=np.float32)
        self.figures = np.concatenate([self.figures, pad])

    # ---------------------------------------------------------------- ingest

    def set_schema(self, schema: Schema) -> None:
        if self.schema is not None and self.schema.schema_id == schema.schema_id:
            self.schema = schema  # a periodic re-send: nothing changes
            return
        self.schema = schema
        self._alloc(len(schema.layers))
        waiting = [s for s in self.pending if s.schema_id == schema.schema_id]
        self.pending.clear()
        self.pending_bytes = 0
        for sample in waiting:
            self._store(sample)

    def add_sample(self, sample: Sample) -> bool:
        if self.schema is None or sample.schema_id != self.schema.schema_id:
            # Held for a schema still on its way, bounded by count and by bytes.
            size = sample.figures.nbytes
            while self.pending and (
                len(self.pending) >= PENDING_MAX or self.pending_bytes + size > PENDING_MAX_BYTES
            ):
                self.pending_bytes -= self.pending.popleft().figures.nbytes
            if size <= PENDING_MAX_BYTES:
                self.pending.append(sample)
                self.pending_bytes += size
            return False
        return self._store(sample)

    def _store(self, sample: Sample) -> bool:
        assert self.schema is not None
        n_layers = len(self.schema.layers)
        fig = sample.figures
        if fig.shape[0] != n_layers:
            return False  # does not fit the table it claims; the decoder let it through, the store does not
        if self.count >= len(self.steps) and len(self.steps) < self.capacity:
            self._grow()
        i = self.count % self.capacity
        self.steps[i] = sample.step
        self.times[i] = sample.t
        self.losses[i] = np.nan if sample.loss is None else sample.loss
        lr = sample.scalars.get("lr")
        self.lrs[i] = np.nan if lr is None else lr
        width = min(fig.shape[1], len(STATS))
        self.figures[i, :, :width] = fig[:, :width]
        self.count += 1
        self.scalars = dict(sample.scalars)
        self.agent_dropped = sample.dropped
        self.last_sample_wall = sample.t
        if sample.t_measured:
            self.latencies.append(time.time() - sample.t_measured)
        return True

    # ---------------------------------------------------------------- queries

    @property
    def layer_names(self) -> list[str]:
        return self.schema.layer_names if self.schema is not None else []

    @property
    def size(self) -> int:
        return min(self.count, self.capacity)

    def _order(self, n: int | None = None) -> npt.NDArray[np.int64]:
        size = self.size
        take = size if n is None else min(n, size)
        end = self.count
        return np.arange(end - take, end, dtype=np.int64) % self.capacity

    def latest(self) -> npt.NDArray[np.float32] | None:
        """The newest sample's ``n_layers x n_stats`` figures, or None."""
        if self.count == 0:
            return None
        latest: npt.NDArray[np.float32] = self.figures[(self.count - 1) % self.capacity]
        return latest

    @property
    def latest_step(self) -> int | None:
        return int(self.steps[(self.count - 1) % self.capacity]) if self.count else None

    @property
    def latest_loss(self) -> float | None:
        if not self.count:
            return None
        value = float(self.losses[(self.count - 1) % self.capacity])
        return None if np.isnan(value) else value

    # The alert engine's view (``icsmon_agent.alerts.engine.Recent``).

    def recent_figures(self, n: int) -> npt.NDArray[np.float64]:
        return self.figures[self._order(n)].astype(np.float64)

    def recent_steps(self, n: int) -> npt.NDArray[np.int64]:
        return self.steps[self._order(n)]

    def recent_losses(self, n: int) -> npt.NDArray[np.float64]:
        return self.losses[self._order(n)]

    def oldest_figures(self, n: int) -> npt.NDArray[np.float64] | None:
        if self.size < n:
            return None
        first = self.count - self.size
        return self.figures[np.arange(first, first + n) % self.capacity].astype(np.float64)

    def series(self, stat: str, layer: int | None = None, n: int | None = None) -> npt.NDArray[np.float32]:
        """Oldest-to-newest values of ``stat``: shape (n,) for one layer, (n, n_layers) for all."""
        idx = self._order(n)
        col = STAT_INDEX[stat]
        out: npt.NDArray[np.float32] = (
            self.figures[idx, :, col] if layer is None else self.figures[idx, layer, col]
        )
        return out

    def step_series(self, n: int | None = None) -> npt.NDArray[np.int64]:
        return self.steps[self._order(n)]

    def loss_series(self, n: int | None = None) -> npt.NDArray[np.float64]:
        return self.losses[self._order(n)]

    def lr_series(self, n: int | None = None) -> npt.NDArray[np.float64]:
        return self.lrs[self._order(n)]

    def steps_per_second(self, window: int = 20) -> float | None:
        idx = self._order(window)
        if len(idx) < 2:
            return None
        dt = self.times[idx[-1]] - self.times[idx[0]]
        ds = self.steps[idx[-1]] - self.steps[idx[0]]
        return float(ds / dt) if dt > 0 else None

    def state(self, now: float | None = None, stale_after: float = STALE_AFTER_S) -> str:
        """``waiting`` (nothing yet), ``live``, ``paused`` (the job said so: ``Monitor.pause()``),
        ``stale`` (quiet a while) or ``ended`` (closed)."""
        if self.ended:
            return "ended"
        if self.count == 0:
            return "waiting"
        if self.last_event == "paused":
            return "paused"
        now = time.monotonic() if now is None else now
        return "stale" if now - self.last_recv > stale_after else "live"


class Store:
    """All runs the viewer has heard of, keyed by (run, rank)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, max_runs: int = MAX_RUNS) -> None:
        self.capacity = capacity
        self.max_runs = max_runs
        self.runs: dict[RunKey, RunState] = {}
        self.messages = 0
        self.evicted: list[RunKey] = []  # streams dropped to make room, for the feed to forget too

    def _run(self, run: str, rank: int) -> RunState:
        key = (run, rank)
        state = self.runs.get(key)
        if state is None:
            if len(self.runs) >= self.max_runs:
                self._evict()
            state = self.runs[key] = RunState(run=run, rank=rank, capacity=self.capacity)
            state.may_grow = self._may_grow
        return state

    def _may_grow(self, extra: int) -> bool:
        return sum(r.figures.nbytes for r in self.runs.values()) + extra <= MAX_FIGURE_BYTES

    def _evict(self, keep: RunKey | None = None) -> None:
        """Make room: the stream heard from least recently goes, an ended one before a live one."""
        others = [k for k in self.runs if k != keep]
        if not others:
            return
        key = min(others, key=lambda k: (not self.runs[k].ended, self.runs[k].last_recv))
        del self.runs[key]
        self.evicted.append(key)
        del self.evicted[: -self.max_runs]

    def _room_for(self, key: RunKey, schema: Schema) -> None:
        """Evict other streams until the layer tables, this one's included, fit the total."""

        def others() -> int:
            return sum(
                len(r.schema.layers) for k, r in self.runs.items() if r.schema is not None and k != key
            )

        while len(self.runs) > 1 and others() + len(schema.layers) > MAX_TOTAL_LAYERS:
            self._evict(keep=key)

    def add(self, msg: Message) -> bool:
        """Take one message; True if it was new (a sample stored, a schema or event recorded)."""
        self.messages += 1
        state = self._run(msg.run, msg.rank)
        state.last_recv = time.monotonic()
        if isinstance(msg, Schema):
            if state.schema is None or state.schema.schema_id != msg.schema_id:
                self._room_for((msg.run, msg.rank), msg)
            state.set_schema(msg)
            return True
        if msg.seq <= state.last_seq:
            return False  # history re-sent for another subscriber, or a duplicate
        if isinstance(msg, Sample):
            if state.first_sample_seq and msg.seq > state.last_seq + 1:
                state.dropped += msg.seq - state.last_seq - 1
            if not state.first_sample_seq:
                state.first_sample_seq = msg.seq
            state.last_seq = msg.seq
            if (
                state.last_event == "paused"
                and state.paused_step is not None
                and msg.step > state.paused_step
            ):
                state.last_event = ""  # sampling again: its "resumed" event was lost on the way
            return state.add_sample(msg)
        if isinstance(msg, Event):
            if state.first_sample_seq:
                state.last_seq = msg.seq
            if msg.event in ALERT_TYPES:  # the job's judgement: the feed holds it
                return True
            if msg.event == "forward_steps":  # notes about the job, not changes of its state
                state.forward_steps = True
                return True
            if msg.event == "optimizer":
                kind = msg.detail.get("type")
                state.optimizer = kind[:40] if isinstance(kind, str) else ""
                return True
            state.last_event = msg.event
            if msg.event == "paused":
                step = msg.detail.get("step")
                state.paused_step = step if isinstance(step, int) else None
            if msg.event == "closing":
                state.ended = True
            elif msg.event == "started":
                state.ended = False
            return True
        return False

    def get(self, run: str, rank: int = 0) -> RunState | None:
        return self.runs.get((run, rank))

    def newest(self) -> RunState | None:
        """The run heard from most recently (the one a single-job view shows)."""
        if not self.runs:
            return None
        return max(self.runs.values(), key=lambda s: s.last_recv)
