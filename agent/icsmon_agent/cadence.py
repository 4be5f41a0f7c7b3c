"""When to sample: every N steps, or adaptively so the agent's own work stays within a budget.

The default (``every=None``) is adaptive: the agent times its own work on each sampled step (hooks,
the batched finish, the hand-off, and the offload thread's busy time) and waits ``cost / BUDGET``
seconds before the next sample, but never less than ``MIN_INTERVAL_S``. Why not a fixed N: a sampled
step's cost is roughly fixed per layer while step times span 1 ms to 10 s, so any fixed N is either
too dear for fast jobs or too sparse for slow ones (figures: ``benchmarks/README.md``).
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable

#: Half a percent measured: the other half is for what the timing cannot see (the hooks' calls on
#: unsampled steps, the publisher thread's encoding, cache effects), so the total stays near 1%.
BUDGET = 0.005
#: At most 20 samples a second: what a viewer can draw, and what the wire is sized for.
MIN_INTERVAL_S = 0.05
#: The cadence follows the low median of this many samples' costs (the first ones go at the floor).
COST_WINDOW = 5


class Cadence:
    """Decides, at each step boundary, whether the next step is sampled."""

    def __init__(self, every: int | None, clock: Callable[[], float] = time.monotonic) -> None:
        """``clock``: seconds, monotonic; a test's own makes the cadence independent of load."""
        self.every = every
        self.clock = clock
        self.cost = 0.0  # typical seconds of our own work per sampled step
        self._costs: deque[float] = deque(maxlen=COST_WINDOW)
        self._last_sample = 0.0  # monotonic time the last sampled step began
        self._paused_at = 0.0
        self._busy_seen: float | None = None  # the other threads' busy seconds already counted

    def due(self, step: int) -> bool:
        """Whether ``step`` is sampled. Watched or not: the job judges every sample itself, so a
        job nobody watches is sampled as often as a watched one."""
        if self.every is not None:
            return step % self.every == 0
        interval = max(MIN_INTERVAL_S, self.cost / BUDGET)
        return self.clock() - self._last_sample >= interval

    def sampled(self, began: float, spent: float, other_busy: float | None, first: bool) -> None:
        """A sample was taken of a step that began at ``began`` (:attr:`clock`) and cost ``spent``
        seconds of the training thread's work, plus what the agent's other threads did since the
        last sample (their running ``other_busy`` seconds: the offload's reductions, the job's
        rules; the CPU is the job's). The first sample pays
        for the table and the thread's start: set-up, not counted.

        The low median of the last few, so one slow sample (a page fault, a busy core, a first call
        into some op) does not stall the cadence; until the window is full the floor applies.
        Measured from when the step began, so a step slow inside its forward is followed by a sample.
        """
        if other_busy is not None:
            if self._busy_seen is not None:
                spent += other_busy - self._busy_seen
            if not first:
                self._busy_seen = other_busy
        if not first:
            self._costs.append(spent)
            if len(self._costs) == COST_WINDOW:
                self.cost = statistics.median_low(self._costs)
        self._last_sample = began

    def pause(self) -> None:
        self._paused_at = self.clock()

    def resume(self) -> None:
        """The clock stood still while paused: a pause is no time the agent ran in, and a sample at
        every resume would make a job that pauses often sample above the budget. A sample taken
        while paused restarts the clock instead, so the pause counts from whichever came later."""
        now = self.clock()
        self._last_sample += now - max(self._paused_at, self._last_sample)
