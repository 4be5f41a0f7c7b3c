"""The live side of a viewer, without any UI: an asyncio SUB socket and the connection life cycle.

:class:`AsyncSubscriber` is :class:`icsmon.subscriber.Subscriber` on ``zmq.asyncio``: it awaits
frames on the event loop (the terminal app runs it in a worker), decodes them with the same
never-raise rules and counts what it rejects.

:class:`Feed` owns the connection: it calls ``connect()`` (with backoff while there is nothing to
attach to), pours messages into a :class:`~icsmon.store.Store`, runs the alert engine once per
stored sample, and decides when a job is *lost* (its pid is gone, or nothing arrived for a long
while) so it can call ``connect()`` again: that is how a viewer re-attaches when the job comes back
and how an SSH forward is re-established. The UI only reads what the feed exposes, on its own clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from icsmon.alerts.engine import AlertEngine
from icsmon.alerts.model import Alert, AlertChange
from icsmon.store import RunKey, RunState, Store
from icsmon.subscriber import Decoding, sub_socket
from icsmon.targets import TargetError
from icsmon_agent.discovery import pid_alive
from icsmon_agent.protocol import Event, Message, Schema

#: Nothing at all (not even the schema the agent re-sends every few seconds) for this long: lost.
LOST_AFTER_S = 30.0
#: How often a lost job's pid is checked (local jobs only: a remote pid means nothing here).
PID_CHECK_S = 1.0
#: Messages handled before yielding to the event loop, so a flood never freezes the screen.
BATCH = 256
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 2.0  # "attaches as soon as one starts": looking costs a directory read
CHANGES_KEPT = 1000

EngineFactory = Callable[[], Any]


def default_engine_factory(thresholds: Any = None) -> EngineFactory | None:
    """A factory of the alert engine with these thresholds."""

    def make() -> Any:
        return AlertEngine(thresholds)

    return make


class AsyncSubscriber(Decoding):
    """A SUB socket on the running event loop; never raises on bad input."""

    def __init__(self, endpoint: str) -> None:
        super().__init__()
        self.endpoint = endpoint
        self._ctx = zmq.asyncio.Context()
        self._sock: zmq.asyncio.Socket = sub_socket(self._ctx, [endpoint])

    async def poll(self, timeout_s: float, limit: int = BATCH) -> list[Message]:
        """Wait up to ``timeout_s`` for a message, then take what is queued (at most ``limit``)."""
        out: list[Message] = []
        if not await self._sock.poll(int(timeout_s * 1000)):
            return out
        for _ in range(limit):
            try:
                frames = await self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            msg = self._decode(frames)
            if msg is not None:
                out.append(msg)
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._sock.close(linger=0)
        with contextlib.suppress(Exception):
            self._ctx.term()


class Feed:
    """Connects, ingests, runs the alert rules and tracks the connection state of each run."""

    def __init__(
        self,
        connect: Callable[[], str],
        *,
        store: Store | None = None,
        engine_factory: EngineFactory | None = None,
        lost_after: float = LOST_AFTER_S,
    ) -> None:
        self.connect = connect
        self.store = store if store is not None else Store()
        self.engine_factory = engine_factory
        self.engines: dict[RunKey, Any] = {}
        self.lost_after = lost_after
        self.lost: set[RunKey] = set()
        self.endpoint: str | None = None
        self.error = ""  # why there is nothing to attach to yet (TargetError text)
        self.attempts = 0
        self.rejected = 0
        self.last_reject = ""
        # Every alert change, numbered, so the UI can take the new ones on its own clock.
        self.changes: deque[tuple[int, RunKey, AlertChange]] = deque(maxlen=CHANGES_KEPT)
        self.change_count = 0
        self.samples = 0
        self._host = socket.gethostname()
        self._due: set[RunKey] = set()

    # ------------------------------------------------------------------ ingest

    def ingest(self, msg: Message, rules: bool = True) -> bool:
        """Take one decoded message; run the rules if it stored a sample. True if it was new.

        With ``rules=False`` the caller runs them (:meth:`run_rules`) once for a whole batch.
        """
        key = (msg.run, msg.rank)
        before = self.store.get(*key)
        if (
            isinstance(msg, Schema)
            and before is not None
            and before.schema is not None
            and before.schema.started != msg.started
        ):
            # The same run id from a restarted process (ICSMON_RUN set): its seq starts again at 1,
            # which the store would take for re-sent history. Start that run afresh.
            del self.store.runs[key]
            self.engines.pop(key, None)
            before = None
        count_before = before.count if before is not None else 0
        new = self.store.add(msg)
        run = self.store.get(*key)
        assert run is not None
        self.lost.discard(key)
        if isinstance(msg, Event) and msg.event == "closing" and not run.ended:
            # Events are never part of the re-sent history, so a closing event is always news, even
            # when an agent numbered it from another counter than its samples and the store took
            # it for a repeat.
            run.ended = True
            run.last_event = "closing"
        if run.count > count_before:
            self.samples += run.count - count_before
            if rules:
                self._run_rules(key, run)
            else:
                self._due.add(key)
        return new

    def run_rules(self) -> None:
        """Run the alert rules once for every run that stored samples since the last call."""
        due, self._due = self._due, set()
        for key in due:
            run = self.store.get(*key)
            if run is not None:
                self._run_rules(key, run)

    def _run_rules(self, key: RunKey, run: RunState) -> None:
        if self.engine_factory is None:
            return
        engine = self.engines.get(key)
        if engine is None:
            engine = self.engines[key] = self.engine_factory()
        try:
            changes: list[AlertChange] = engine.update(run)
        except Exception as exc:  # a rule bug must not take the viewer down; say it once, keep drawing
            self.error = f"alert rules failed: {exc}"
            self.engine_factory = None
            return
        for change in changes:
            self.change_count += 1
            self.changes.append((self.change_count, key, change))

    def new_changes(self, since: int) -> list[tuple[int, RunKey, AlertChange]]:
        return [item for item in self.changes if item[0] > since]

    # ------------------------------------------------------------------ queries

    def current(self) -> RunState | None:
        """The run on screen: the one heard from most recently."""
        return self.store.newest()

    def active_alerts(self, run: RunState) -> list[Alert]:
        engine = self.engines.get((run.run, run.rank))
        return list(engine.active) if engine is not None else []

    def alert_history(self, run: RunState) -> list[AlertChange]:
        engine = self.engines.get((run.run, run.rank))
        return list(engine.history) if engine is not None else []

    def state(self, run: RunState | None, now: float | None = None) -> str:
        """waiting / live / paused / stale / ended / lost."""
        if run is None:
            return "waiting"
        if run.ended:
            return "ended"
        if (run.run, run.rank) in self.lost:
            return "lost"
        return run.state(now)

    def _is_lost(self, run: RunState, now: float) -> bool:
        if run.ended:
            return False
        schema = run.schema
        if schema is not None and schema.pid and schema.host == self._host and not pid_alive(schema.pid):
            return True
        return run.last_recv > 0 and now - run.last_recv > self.lost_after

    # ------------------------------------------------------------------ life cycle

    async def run(self) -> None:
        """Connect, ingest, re-connect when the job is lost or ends; until cancelled."""
        backoff = BACKOFF_MIN_S
        while True:
            self.attempts += 1
            try:
                # In a thread: over SSH, connecting runs ssh subprocesses that can take seconds,
                # and the app must keep drawing meanwhile.
                endpoint = await asyncio.to_thread(self.connect)
            except TargetError as exc:
                self.error = str(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            self.endpoint = endpoint
            self.error = ""
            backoff = BACKOFF_MIN_S
            await self._follow(AsyncSubscriber(endpoint))

    async def _follow(self, sub: AsyncSubscriber) -> None:
        """Read one endpoint until the run on it is lost or has ended."""
        try:
            heard: set[RunKey] = set()
            started = time.monotonic()
            next_check = 0.0
            while True:
                for msg in await sub.poll(0.2):
                    self.ingest(msg, rules=False)
                    heard.add((msg.run, msg.rank))
                # Once per batch, not per sample: with a thousand layers the rules cost more than
                # the ingest, and a viewer that falls behind should catch up, not queue rule runs.
                self.run_rules()
                self.rejected, self.last_reject = sub.rejected, sub.last_error
                await asyncio.sleep(0)  # let the screen draw between batches
                now = time.monotonic()
                if now < next_check:
                    continue
                next_check = now + PID_CHECK_S
                runs = [r for k in heard if (r := self.store.get(*k)) is not None]
                if not runs:
                    if now - started > self.lost_after:
                        return  # an endpoint that never spoke: ask connect() again
                    continue
                if all(r.ended for r in runs):
                    # The job said goodbye; a restarted job may come back on another endpoint.
                    await asyncio.sleep(BACKOFF_MAX_S)
                    return
                lost = [r for r in runs if self._is_lost(r, now)]
                if lost and len(lost) == len([r for r in runs if not r.ended]):
                    self.lost.update((r.run, r.rank) for r in lost)
                    return
        finally:
            sub.close()
