"""What the agent's own threads do first: step back behind the training threads for the CPU."""

from __future__ import annotations

import contextlib
import os
import sys
import threading

#: The niceness the agent's threads add to their own (Linux: niceness is per thread). At +10 a
#: thread gets ~10% of a core against one at the default when both want it (CFS weights 110 vs
#: 1024), and all of an idle core otherwise: the figures wait for spare CPU, training never does.
NICE = 10


def step_back() -> None:
    """Lower the calling thread's CPU priority by :data:`NICE`; quietly nothing where unsupported.

    Why: on a small box the agent's threads (reductions, encoding) and a viewer can outnumber the
    cores; without this the scheduler shares them out evenly and the training thread waits its
    turn. A starved offload thread only means fewer samples (the agent skips steps while its queue
    is long), never a slower step. Raising one's own niceness needs no privilege; it cannot be
    undone without one, which nothing here needs.
    """
    if not sys.platform.startswith("linux"):
        return  # elsewhere PRIO_PROCESS with a thread id would renice the whole process, or fail
    with contextlib.suppress(OSError, ValueError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + NICE)
