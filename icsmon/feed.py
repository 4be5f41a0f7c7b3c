"""The one viewer loop: subscribe, store, run the rules, tell who ended; every viewer sits on it.

:class:`Feed` subscribes to one or many endpoints at once (every rank of a DDP job, two runs side by
side, a relay), pours what arrives into a :class:`~icsmon.store.Store` keyed by (run, rank), runs
the alert rules (per rank, and across the ranks of one job) and decides when a stream has *ended*
(it said goodbye), *died* (its pid on this host is gone) or is *lost* (silent for long). ``tail``
prints what a :class:`FeedEvents` listener hears; the terminal app reads the store on its own clock.
With ``reconnect`` the feed calls ``connect()`` again once everything it followed is gone: that is
how the app re-attaches to a restarted job and re-opens an SSH forward.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence

from icsmon.alerts.config import EngineFactory
from icsmon.alerts.ranks import RankCheck
from icsmon.errors import TargetError
from icsmon.render import run_label
from icsmon.store import RunKey, RunState, Store
from icsmon.subscriber import AsyncSubscriber
from icsmon_agent.alerts.engine import AlertEngine
from icsmon_agent.alerts.model import ALERT_TYPES, Alert, AlertChange, change_from_json
from icsmon_agent.discovery import pid_alive
from icsmon_agent.protocol import Event, Message, Sample, Schema

#: Nothing at all (not even the schema the agent re-sends every few seconds) for this long: lost.
LOST_AFTER_S = 30.0
#: How often the pids of local jobs are checked (a remote pid means nothing here).
PID_CHECK_S = 1.0
POLL_S = 0.2
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 2.0  # "attaches as soon as one starts": looking costs a directory read
CHANGES_KEPT = 1000

#: What ``connect()`` returns: one endpoint, or several that one SUB socket follows at once.
Sources = str | Sequence[str]


class FeedEvents:
    """What a printer hears from the feed, in arrival order; every method may be left as it is."""

    def message(self, msg: Message, new: bool) -> None:
        """Every decoded message, before it is stored (``new``: not a repeat by seq)."""

    def sample(self, sample: Sample, run: RunState) -> None:
        """A new sample was stored (its run's schema is known)."""

    def alert(self, key: RunKey, change: AlertChange) -> None:
        """An alert fired or cleared (``key`` is the stream it is about)."""

    def event(self, event: Event, run: RunState) -> None:
        """A new event (paused, resumed, forward_steps, closing, ...)."""

    def gone(self, run: RunState, how: str) -> None:
        """A stream ended (``closed``), its process died (``died``) or fell silent (``lost``)."""

    def tick(self) -> None:
        """Once per loop turn, data or not (for time-outs and "still waiting" notes)."""


def as_endpoints(sources: Sources) -> list[str]:
    return [sources] if isinstance(sources, str) else list(sources)


class Feed:
    """Connects, ingests, runs the alert rules and tracks the state of each (run, rank)."""

    def __init__(
        self,
        connect: Callable[[], Sources],
        *,
        store: Store | None = None,
        engine_factory: EngineFactory | None = None,
        lost_after: float = LOST_AFTER_S,
        check_pids: bool = True,
        reconnect: bool = True,
        rules_per_sample: bool = False,
        listener: FeedEvents | None = None,
        pids: Sequence[int] = (),
    ) -> None:
        self.connect = connect
        self.store = store if store is not None else Store()
        self.engine_factory = engine_factory
        self.engines: dict[RunKey, AlertEngine] = {}
        self.rank_checks: dict[str, RankCheck] = {}
        self.lost_after = lost_after
        self.check_pids = check_pids
        # The local processes behind the endpoints, known before any of them spoke: when every one
        # is gone and none spoke, the feed stops (a job killed before its first sample).
        self.pids = list(pids)
        self.died_silent = False
        self.reconnect = reconnect
        # A printer wants each sample's alerts right after it; the app runs the rules once a batch
        # (with a thousand layers they cost more than the ingest, and a viewer behind must catch up).
        self.rules_per_sample = rules_per_sample
        self.listener = listener or FeedEvents()
        self.lost: set[RunKey] = set()
        self.died: set[RunKey] = set()
        self.endpoints: list[str] = []
        self.error = ""  # why there is nothing to attach to yet (TargetError text)
        self.attempts = 0
        self.rejected = 0
        self.last_reject = ""
        # Every alert change, numbered, so the UI can take the new ones on its own clock.
        self.changes: deque[tuple[int, RunKey, AlertChange]] = deque(maxlen=CHANGES_KEPT)
        self.change_count = 0
        self.samples = 0
        self.version = 0  # bumped by anything a screen would show differently
        self._host = socket.gethostname()
        self._due: set[RunKey] = set()
        self.stopped = False  # stop() was called: run() returns at its next turn

    def reset(self) -> None:
        """Forget every stream heard and its rules' state: the one way to start over (a new choice
        of jobs, a replay seeking back)."""
        self.store.runs.clear()
        self.engines.clear()
        self.rank_checks.clear()
        self.lost.clear()
        self.died.clear()
        self.changes.clear()
        self.version += 1

    @property
    def banner(self) -> str:
        """A word for the header about where the data comes from (a replay says where it is)."""
        return ""

    @property
    def endpoint(self) -> str:
        """Where the feed listens, for display."""
        return " ".join(self.endpoints)

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
            self.died.discard(key)
            before = None
        count_before = before.count if before is not None else 0
        was_ended = before is not None and before.ended
        new = self.store.add(msg)
        self.listener.message(msg, new)
        if self.store.evicted:
            self._forget(self.store.evicted)
            self.store.evicted = []
        run = self.store.get(*key)
        assert run is not None
        self.lost.discard(key)
        if new:
            self.version += 1
        if isinstance(msg, Event):
            if msg.event in ALERT_TYPES:
                if new:
                    self._take_alert(key, run, msg)
                return new
            if msg.event == "closing" and not run.ended:
                # Events are never part of the re-sent history, so a closing event is always news,
                # even when an agent numbered it from another counter than its samples.
                run.ended = True
                run.last_event = "closing"
                new = True
            if new:
                self.listener.event(msg, run)
            if run.ended and not was_ended and key not in self.died:
                self.listener.gone(run, "closed")
        if run.count > count_before:
            self.samples += run.count - count_before
            if isinstance(msg, Sample):
                self.listener.sample(msg, run)
            if rules:
                self._run_rules(key, run)
                self._run_rank_rules({key[0]})
            else:
                self._due.add(key)
        return new

    def _forget(self, keys: list[RunKey]) -> None:
        """Streams the store dropped to make room: their rule state goes too."""
        for key in keys:
            self.engines.pop(key, None)
            self.lost.discard(key)
            self.died.discard(key)
            self._due.discard(key)
            if not any(k[0] == key[0] for k in self.store.runs):
                self.rank_checks.pop(key[0], None)
        self.version += 1

    def run_rules(self) -> None:
        """Run the alert rules once for every stream that stored samples since the last call."""
        due, self._due = self._due, set()
        for key in due:
            run = self.store.get(*key)
            if run is not None:
                self._run_rules(key, run)
        self._run_rank_rules({key[0] for key in due})

    def _take_alert(self, key: RunKey, run: RunState, event: Event) -> None:
        """An alert the job judged itself (the decoder checked it): held as the stream's own (it
        speaks for itself only)."""
        change = change_from_json(event.detail, replayed=event.replayed)
        names = run.layer_names
        # A run-level alert (the loss) names no layer: it badges none.
        at = names.index(change.alert.layer) if change.alert.layer in names else -1
        alert = dataclasses.replace(change.alert, run=key[0], rank=key[1], layer_index=at)
        change = dataclasses.replace(change, alert=alert)
        if self._engine(key).take(change):
            self._publish(key, [change])

    def _engine(self, key: RunKey) -> AlertEngine:
        """The stream's alert engine (one holds a job's own alerts even where no rules run here)."""
        engine = self.engines.get(key)
        if engine is None:
            engine = self.engines[key] = self.engine_factory() if self.engine_factory else AlertEngine()
        return engine

    def _run_rules(self, key: RunKey, run: RunState) -> None:
        if self.engine_factory is None or (run.schema is not None and run.schema.alerts):
            return  # a job that judges itself sends its alerts: never judged twice
        engine = self._engine(key)
        try:
            changes: list[AlertChange] = engine.update(run)
        except Exception as exc:  # a rule bug must not take the viewer down; say it once, keep drawing
            self.error = f"alert rules failed: {exc}"
            self.engine_factory = None
            return
        self._publish(key, changes)

    def _run_rank_rules(self, run_ids: set[str]) -> None:
        """The rules across the ranks of one job, for the jobs that have several ranks."""
        if self.engine_factory is None:
            return
        for run_id in run_ids:
            ranks = self.ranks_of(run_id)
            if len(ranks) < 2:
                continue
            check = self.rank_checks.get(run_id)
            if check is None:
                check = self.rank_checks[run_id] = RankCheck()
            changes = check.update(ranks)
            for change in changes:
                self._publish((run_id, change.alert.rank), [change])

    def _publish(self, key: RunKey, changes: list[AlertChange]) -> None:
        for change in changes:
            self.change_count += 1
            self.version += 1
            self.changes.append((self.change_count, key, change))
            self.listener.alert(key, change)

    def new_changes(self, since: int) -> list[tuple[int, RunKey, AlertChange]]:
        return [item for item in self.changes if item[0] > since]

    # ------------------------------------------------------------------ queries

    def label(self, stream: RunState) -> str:
        """A stream's run as the viewer names it: its name, with its run id's suffix when another
        run in view has the same name (:func:`icsmon.render.run_label`)."""
        names = list({s.run: s.schema.name for s in self.streams() if s.schema is not None}.values())
        return run_label(stream.schema.name if stream.schema is not None else "", stream.run, names)

    def streams(self) -> list[RunState]:
        """Every stream heard with a schema, grouped by job (oldest job first), ranks in order."""
        runs = [r for r in self.store.runs.values() if r.schema is not None]
        first_heard: dict[str, float] = {}
        for r in runs:
            started = r.schema.started if r.schema is not None else 0.0
            first_heard[r.run] = min(first_heard.get(r.run, started), started)
        return sorted(runs, key=lambda r: (first_heard[r.run], r.run, r.rank))

    def ranks_of(self, run_id: str) -> list[RunState]:
        """The ranks of one job that have data, in rank order."""
        return sorted(
            (r for (rid, _), r in self.store.runs.items() if rid == run_id and r.count),
            key=lambda r: r.rank,
        )

    def active_alerts(self, run: RunState) -> list[Alert]:
        engine = self.engines.get((run.run, run.rank))
        mine = list(engine.active) if engine is not None else []
        check = self.rank_checks.get(run.run)
        return mine + (check.active if check is not None else [])

    def alert_history(self, run: RunState) -> list[AlertChange]:
        engine = self.engines.get((run.run, run.rank))
        return list(engine.history) if engine is not None else []

    def state(self, run: RunState | None, now: float | None = None) -> str:
        """waiting / live / paused / stale / ended / lost."""
        if run is None:
            return "waiting"
        if run.ended:
            return "ended"
        key = (run.run, run.rank)
        if key in self.lost or key in self.died:
            return "lost"
        return run.state(now)

    def _pids_gone(self) -> bool:
        """The local processes resolved before they spoke (``pids``) are all gone."""
        return self.check_pids and bool(self.pids) and not any(pid_alive(p) for p in self.pids)

    def _gone_now(self, run: RunState, now: float) -> str:
        """``died``, ``lost`` or '' for a stream that has not said goodbye."""
        schema = run.schema
        if self.check_pids and schema is not None and schema.pid:
            if schema.host == self._host and not pid_alive(schema.pid):
                return "died"
        elif self._pids_gone():  # no table yet to say whose it is: the processes resolved are gone
            return "died"
        if run.last_recv > 0 and now - run.last_recv > self.lost_after:
            return "lost"
        return ""

    # ------------------------------------------------------------------ life cycle

    def stop(self) -> None:
        """End :meth:`run` at its next turn (from the listener or the UI; same thread)."""
        self.stopped = True

    async def run(self) -> None:
        """Connect and follow; with ``reconnect``, connect again once everything followed is gone.
        Until :meth:`stop` or cancellation. A ``connect()`` that fails is retried with backoff
        (``reconnect``) or raised (a printer resolves its target before it starts)."""
        backoff = BACKOFF_MIN_S
        while not self.stopped:
            self.attempts += 1
            try:
                # In a thread: over SSH, connecting runs ssh subprocesses that can take seconds,
                # and the app must keep drawing meanwhile.
                endpoints = as_endpoints(await asyncio.to_thread(self.connect))
                subscriber = AsyncSubscriber(endpoints)
            except TargetError as exc:
                if not self.reconnect:
                    raise
                if self.error != str(exc):
                    self.error = str(exc)
                    self.version += 1
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            self.endpoints = endpoints
            self.error = ""
            self.version += 1
            backoff = BACKOFF_MIN_S
            everything_closed = await self._follow(subscriber)
            if not self.reconnect:
                return
            if everything_closed:
                # The job said goodbye; a restarted job may come back on another endpoint.
                await asyncio.sleep(BACKOFF_MAX_S)

    async def _follow(self, sub: AsyncSubscriber) -> bool:
        """Read the endpoints until every stream on them is gone; True if all said goodbye."""
        try:
            heard: set[RunKey] = set()
            started = time.monotonic()
            next_check = 0.0
            while not self.stopped:
                for msg in await sub.poll(POLL_S):
                    self.ingest(msg, rules=self.rules_per_sample)
                    heard.add((msg.run, msg.rank))
                    if self.stopped:
                        return False
                self.run_rules()
                refusal = sub.refusal
                if refusal and self.error != refusal:  # a job this viewer cannot read: say why
                    self.error = refusal
                    self.version += 1
                if (sub.rejected, sub.last_error) != (self.rejected, self.last_reject):
                    self.rejected, self.last_reject = sub.rejected, sub.last_error
                    self.version += 1
                self.listener.tick()
                await asyncio.sleep(0)  # let the screen draw between batches
                now = time.monotonic()
                if now < next_check:
                    continue
                next_check = now + PID_CHECK_S
                runs = [r for k in heard if (r := self.store.get(*k)) is not None]
                if not runs:
                    if self._pids_gone():
                        self.died_silent = True
                        self.version += 1
                        return False
                    if now - started > self.lost_after:
                        return False  # endpoints that never spoke: ask connect() again
                    continue
                for run in runs:
                    key = (run.run, run.rank)
                    if run.ended or key in self.died or key in self.lost:
                        continue
                    how = self._gone_now(run, now)
                    if how:
                        (self.died if how == "died" else self.lost).add(key)
                        self.version += 1
                        self.listener.gone(run, how)
                # One endpoint a process: wait until each has spoken before calling the job over
                # (a relay's one endpoint carries many).
                if len(runs) < len(sub.endpoints):
                    continue
                if all(r.ended or (r.run, r.rank) in self.died | self.lost for r in runs):
                    return all(r.ended for r in runs)
            return False
        finally:
            sub.close()
