"""A background thread that reduces CPU layer outputs off the training thread.

Why: on CPU the reductions are real work, not kernel launches: a few passes over each output inside
the step, which no reordering or batching of the same passes hides, because every pass over the data
has to happen somewhere (``benchmarks/README.md`` has the figures). Handing a reference to the
output over to this thread costs the training thread little, and the reductions then run beside
the backward pass, which releases the GIL for its whole length (torch and numpy release it inside
every op, so this thread's own Python is all that contends).

What is handed over must not change under the reader: the agent hands over only outputs whose
autograd version counter did not move during the forward pass (those that did, such as a Linear
feeding an in-place ReLU, are copied in the hook instead), and the job re-checks the counter after
reading. Memory is bounded: :attr:`Offload.outstanding` bytes are held at most ``limit`` at once,
and the agent reduces inline past that.

Jobs run in submission order, so a sample's activation figures always follow its reductions, and
its finishing job (gradient norms, hand-off to the publisher) follows both. A job's exception goes to ``on_error`` and the thread
lives on; nothing here ever raises into the caller.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable

Job = Callable[[], None]


class Offload:
    def __init__(self, on_error: Callable[[BaseException], None]) -> None:
        self._on_error = on_error
        self._queue: queue.SimpleQueue[tuple[Job, int] | None] = queue.SimpleQueue()  # None: stop
        self._pid = os.getpid()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # Each counter has one writer (submitter or worker), so no lock is needed to read them.
        self._submitted_bytes = 0
        self._done_bytes = 0
        self._submitted = 0
        self._done = 0
        # Wall seconds spent running jobs, all told (written by the worker only). Wall, not CPU:
        # what stretches them (the GIL, the memory bus, a busy core) costs the training thread too.
        self.busy_s = 0.0
        self._closed = False

    @property
    def outstanding(self) -> int:
        """Bytes of tensors handed over and not yet read."""
        return self._submitted_bytes - self._done_bytes

    @property
    def pending(self) -> int:
        """Jobs submitted and not yet finished."""
        return self._submitted - self._done

    @property
    def usable(self) -> bool:
        """False after :meth:`close`, and in a forked child (the thread did not fork with us)."""
        return not self._closed and os.getpid() == self._pid

    def submit(self, job: Job, nbytes: int = 0) -> None:
        """Queue ``job``; runs it at once, on the calling thread, if the thread is not usable."""
        if not self.usable:
            self._run(job)
            return
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name="icsmon-offload", daemon=True)
                    self._thread.start()
        self._submitted_bytes += nbytes
        self._submitted += 1
        self._queue.put((job, nbytes))

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every queued job to finish; True if they did."""
        deadline = time.monotonic() + timeout
        while self.pending > 0 and self._thread is not None and self._thread.is_alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return self.pending <= 0

    def close(self, timeout: float) -> bool:
        """Finish the queued jobs (up to ``timeout`` s) and stop the thread; True if all ran."""
        if self._closed:
            return True
        finished = self.drain(timeout)
        self._closed = True
        if self._thread is not None and os.getpid() == self._pid:
            self._queue.put(None)
            if threading.current_thread() is not self._thread:
                self._thread.join(max(0.0, min(timeout, 0.5)))
        return finished

    def _run(self, job: Job) -> None:
        try:
            job()
        except Exception as exc:
            with contextlib.suppress(Exception):
                self._on_error(exc)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            job, nbytes = item
            started = time.perf_counter()
            self._run(job)
            del job, item  # the job holds layer outputs: release them now, not at the next get()
            self.busy_s += time.perf_counter() - started
            self._done_bytes += nbytes
            self._done += 1
