"""The agent's publisher thread: owns the XPUB socket, encodes, never blocks training.

The training thread hands over work with :meth:`Publisher.submit` (a bounded deque append; the
oldest item is dropped and counted when the publisher falls behind) and reads the ``watching``
flag. Everything that touches the socket, waits on a CUDA event or encodes happens on this thread.

XPUB rather than PUB: the socket reports subscriptions, so the agent knows whether anyone
watches (and samples less when nobody does), and with XPUB_VERBOSE every new subscriber triggers
a re-send of the schema and a short history, which fills a late joiner's sparklines at once.
Viewers drop the history they already have by ``seq``. Sends are NOBLOCK into a small high-water
mark with linger 0: a slow, stuck or dead viewer costs the job nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from . import protocol
from .actions import Actions
from .alerts.judge import Judge
from .alerts.model import AlertChange
from .discovery import SHORT_SOCKET_DIR
from .protocol import Event, Schema
from .recording import Recorder

SNDHWM = 100
HISTORY = 64
#: The job's recent alert changes, re-sent with the active ones to each new viewer.
ALERT_HISTORY = 32
QUEUE = 16
SCHEMA_EVERY_S = 1.0  # re-sent so a viewer behind a relay (no subscription seen here) decodes within 2 s
POLL_MS = 20
READY_POLL_S = 0.0005  # a sampled step's copy lands within a step; polling costs the GIL ~nothing
READY_TIMEOUT_S = 30.0  # a wedged device: give up on that sample, never on the thread
IPC_PATH_MAX = 100  # sockaddr_un holds 107 bytes; keep a margin

#: Events that say what state the job is in (Monitor.pause/resume): re-sent with the history.
STATE_EVENTS = ("paused", "resumed")


@dataclass
class Work:
    """One sampled step, handed from the training thread."""

    step: int
    t_measured: float
    host: Any  # a CPU tensor (pinned for CUDA) holding figures then tensor scalars, flat
    ready: Any  # a CUDA event to wait on, or None
    n_layers: int
    n_stats: int
    tensor_scalars: list[str]  # names of the scalars carried at the end of ``host``
    host_scalars: dict[str, float | None] = field(default_factory=dict)


def short_socket_dir() -> Path:
    """A private directory with a short path for sockets whose runtime-dir path is too long:
    ``/tmp/icsmon-UID``, created 0700 and checked like the runtime directory. If someone else made
    that path first (another user squatting it), a fresh private one beside it (``mkdtemp``, 0700,
    ours alone), and the job says so once: it stays watchable."""
    from .discovery import UntrustedDirectory, ensure_private_dir

    try:
        return ensure_private_dir(SHORT_SOCKET_DIR)
    except UntrustedDirectory as exc:
        fallback = Path(tempfile.mkdtemp(prefix=f"{SHORT_SOCKET_DIR.name}-", dir=SHORT_SOCKET_DIR.parent))
        warnings.warn(
            f"icsmon: {exc}; the job's socket is in {fallback} instead", RuntimeWarning, stacklevel=5
        )
        return fallback


def default_endpoint(runtime: Path, run: str) -> str:
    """An ipc:// socket beside the discovery file; where that path would pass the unix-socket
    limit, one with a short name in a private directory under /tmp (never TCP by surprise: a
    loopback port is open to every local user)."""
    if not zmq.has("ipc"):
        warnings.warn(
            "icsmon: this ZeroMQ has no ipc://; publishing on tcp://127.0.0.1, which every local user "
            "can reach",
            RuntimeWarning,
            stacklevel=4,
        )
        return "tcp://127.0.0.1:*"
    path = runtime / f"{run}.sock"
    if len(str(path)) <= IPC_PATH_MAX:
        return f"ipc://{path}"
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:16]
    short = short_socket_dir() / f"{digest}.sock"
    if len(str(short)) > IPC_PATH_MAX:
        raise OSError(
            f"no socket path under {IPC_PATH_MAX} bytes: set ICSMON_RUNTIME_DIR to a short directory"
        )
    return f"ipc://{short}"


class Publisher:
    def __init__(
        self,
        endpoint: str,
        *,
        run: str,
        rank: int,
        on_error: Callable[[str, BaseException], None] | None = None,
        curve_secret: bytes | None = None,
        recorder: Recorder | None = None,
        judge: Judge | None = None,
        actions: Actions | None = None,
    ) -> None:
        self.run = run
        # The job's own alert rules, run on this thread for every sample (None: not judged here).
        self.judge = judge
        self.actions = actions
        self._recorder = recorder  # the job's own recording (watch(record=...)), on this thread only
        self._recorded_schema = ""
        self.rank = rank
        self._ctx = zmq.Context(io_threads=1)
        self._sock = self._ctx.socket(zmq.XPUB)
        try:
            if curve_secret is not None:  # encrypted, and only for viewers that know the job's key
                self._sock.setsockopt(zmq.CURVE_SERVER, 1)
                self._sock.setsockopt(zmq.CURVE_SECRETKEY, curve_secret)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.setsockopt(zmq.SNDHWM, SNDHWM)
            self._sock.setsockopt(zmq.XPUB_VERBOSE, 1)
            self._sock.bind(endpoint)
            self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except BaseException:
            self._sock.close(linger=0)
            self._ctx.term()
            raise
        self._on_error = on_error
        self._queue: deque[Work | Event] = deque()
        self._history: deque[tuple[int, list[bytes]]] = deque(maxlen=HISTORY)  # (seq, frames)
        self._alert_history: deque[tuple[int, list[bytes]]] = deque(maxlen=ALERT_HISTORY)
        self._active_alerts: dict[str, tuple[int, list[bytes]]] = {}  # rule -> its firing
        self._schema: Schema | None = None
        self._schema_frames: list[bytes] | None = None
        self._schema_id = ""
        self._topics: set[bytes] = set()
        self._seq = 0
        self._stop = threading.Event()
        self._resend = False
        self.dropped = 0  # samples dropped on this side (queue full)
        self.busy_s = 0.0  # seconds this thread spent judging samples: the job's CPU, in the budget
        self.nonfinite_step: int | None = None  # the first sampled step with NaN/Inf (loss or figures)
        self.sent = 0
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="icsmon-publisher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ training-thread side

    @property
    def watching(self) -> bool:
        """A viewer is subscribed."""
        return bool(self._topics)

    def set_schema(self, schema: Schema) -> None:
        self._schema = schema
        self._schema_frames = protocol.encode_schema(schema)
        self._schema_id = schema.schema_id
        self._resend = True

    def submit(self, item: Work | Event) -> None:
        if len(self._queue) >= QUEUE:
            with contextlib.suppress(IndexError):
                self._queue.popleft()
                self.dropped += 1
        self._queue.append(item)

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def close(self, timeout: float = 1.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ publisher thread

    def _error(self, where: str, exc: BaseException) -> None:
        self.errors += 1
        if self._on_error is not None:
            with contextlib.suppress(Exception):
                self._on_error(where, exc)

    def _send(self, frames: list[bytes]) -> None:
        try:
            self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            self.sent += 1
        except zmq.Again:
            pass  # XPUB drops at the HWM on its own; Again only if the socket is wedged
        except zmq.ZMQError as exc:
            self._error("send", exc)

    def _send_schema_and_history(self) -> None:
        if self._schema_frames is None:
            return
        self._send(self._schema_frames)
        # One run in seq order, as it was first sent (a viewer that already holds some of it drops
        # those by seq, so nothing may come out of order): what is active now, however old, and the
        # recent alert changes, among the recent samples and state events.
        active = {seq for seq, _ in self._active_alerts.values()}
        alerts = dict(self._alert_history) | dict(self._active_alerts.values())
        resend = [(seq, _replayed_alert(frames, active=seq in active)) for seq, frames in alerts.items()]
        resend += [(seq, protocol.replayed(frames)) for seq, frames in self._history]
        for _, frames in sorted(resend, key=lambda item: item[0]):
            self._send(frames)  # marked replayed: a viewer tells this step's news from history

    def _record(self, frames: list[bytes]) -> None:
        if self._recorder is None:
            return
        try:
            if self._schema_frames is not None and self._recorded_schema != self._schema_id:
                self._recorder.write(self._schema_frames)  # the table first, as for a viewer
                self._recorded_schema = self._schema_id
            self._recorder.write(frames)
        except Exception as exc:  # a full disk stops the recording, never the job
            self._error("record", exc)
            with contextlib.suppress(Exception):
                self._recorder.close()
            self._recorder = None

    def _read_subscriptions(self) -> None:
        while True:
            try:
                msg = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if not msg:
                continue
            topic = bytes(msg[1:])
            if msg[0] == 1:
                self._topics.add(topic)
                self._resend = True  # a new viewer (or a new subscription): schema + history
            elif msg[0] == 0:
                self._topics.discard(topic)

    def _encode(self, work: Work) -> protocol.Sample:
        if work.ready is not None:
            # Waits here, on the publisher thread, never in training. Polled rather than
            # ``synchronize()``d: the host's ``torch.cuda.set_sync_debug_mode`` is process-wide
            # and would flag (or raise at) this wait although it never touches the training thread.
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not work.ready.query():
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"the figures of step {work.step} were not ready in {READY_TIMEOUT_S} s"
                    )
                time.sleep(READY_POLL_S)
        flat = work.host.numpy()
        n = work.n_layers * work.n_stats
        figures = flat[:n].reshape(work.n_layers, work.n_stats)
        tail = flat[n:]
        scalars: dict[str, float | None] = dict(work.host_scalars)
        for name, value in zip(work.tensor_scalars, tail.tolist(), strict=True):
            scalars[name] = value
        loss = scalars.pop("loss", None)
        if self.nonfinite_step is None and (
            (loss is not None and not math.isfinite(loss))
            or bool(np.nan_to_num(figures[:, protocol.STAT_INDEX["nonfinite"]]).max(initial=0) > 0)
        ):
            self.nonfinite_step = work.step  # read by stop_on of the framework callbacks
        sample = protocol.Sample(
            run=self.run,
            rank=self.rank,
            seq=self.next_seq(),
            t=time.time(),
            step=work.step,
            schema_id=self._schema_id,
            figures=figures,
            loss=loss,
            scalars=scalars,
            t_measured=work.t_measured,
            dropped=self.dropped,
        )
        return sample

    def _drain(self) -> None:
        while True:
            try:
                item = self._queue.popleft()
            except IndexError:
                return
            try:
                if isinstance(item, Event):
                    # Stamp events from the same counter as samples: a viewer drops any seq it has
                    # already seen, so an event numbered by another counter would be taken for a repeat.
                    seq = self.next_seq()
                    frames = protocol.encode_event(replace(item, seq=seq))
                    if item.event == "optimizer" and self.judge is not None:
                        self.judge.optimizer = str(item.detail.get("type", ""))
                    self._record(frames)
                    if item.event in STATE_EVENTS:
                        # Kept with the samples, in order: a viewer that joins during a pause is
                        # told of it by the history it is sent, as one watching all along was.
                        self._history.append((seq, frames))
                    self._send(frames)
                    continue
                sample = self._encode(item)
                frames = protocol.encode_sample(sample)
            except Exception as exc:
                self._error("encode", exc)
                continue
            if self._resend and self._topics:
                # A schema set (or a viewer joined) since this loop last looked: the table goes
                # first, so no viewer ever holds a sample it cannot decode yet.
                self._send_schema_and_history()
                self._resend = False
            self._history.append((sample.seq, frames))
            self._record(frames)
            if self._topics:
                self._send(frames)
            self._judge(sample)

    def _judge(self, sample: protocol.Sample) -> None:
        """The rules on this sample; their changes go out after it, and to the job's actions."""
        if self.judge is None or self._schema is None:
            return
        started = time.perf_counter()
        try:
            self.judge.set_schema(self._schema)
            changes = self.judge.judge(sample)
        except Exception as exc:  # a rule's bug costs the job its alerts, never its training
            self._error("rules", exc)
            self.judge = None
            # Viewers judge the stream again from now on, and no alert stays active for ever.
            self._active_alerts.clear()
            self.set_schema(replace(self._schema, alerts=False))
            return
        finally:
            self.busy_s += time.perf_counter() - started
        for change in changes:
            self._alert(change)

    def _alert(self, change: AlertChange) -> None:
        seq = self.next_seq()
        detail = change.to_json()
        event = Event(self.run, self.rank, seq, time.time(), event=detail["type"], detail=detail)
        frames = protocol.encode_event(event)
        if change.cleared:
            self._active_alerts.pop(change.alert.rule, None)
        else:
            self._active_alerts[change.alert.rule] = (seq, frames)
        self._alert_history.append((seq, frames))
        self._record(frames)
        if self._topics:
            self._send(frames)
        if self.actions is not None:
            try:
                self.actions.alert(change)
            except Exception as exc:
                self._error("actions", exc)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        last_schema = 0.0
        try:
            while not self._stop.is_set():
                try:
                    if poller.poll(POLL_MS):
                        self._read_subscriptions()
                    now = time.monotonic()
                    if self._resend or (self._topics and now - last_schema > SCHEMA_EVERY_S):
                        if self._resend:
                            self._send_schema_and_history()
                        elif self._schema_frames is not None:
                            self._send(self._schema_frames)
                        self._resend = False
                        last_schema = now
                    self._drain()
                except zmq.ContextTerminated:
                    return
                except Exception as exc:  # never let the thread die silently and stop publishing
                    self._error("loop", exc)
                    time.sleep(POLL_MS / 1000)
            self._drain()  # the closing event and any last sample
        finally:
            if self._recorder is not None:
                with contextlib.suppress(Exception):
                    self._recorder.close()
            with contextlib.suppress(Exception):
                self._sock.close(linger=0)
            with contextlib.suppress(Exception):
                self._ctx.term()
            if self.endpoint.startswith("ipc://"):
                # libzmq leaves the socket file behind; it is ours (the run id is unique), so remove it.
                with contextlib.suppress(OSError):
                    os.unlink(self.endpoint[len("ipc://") :])


def _replayed_alert(frames: list[bytes], *, active: bool) -> list[bytes]:
    """An alert's frames again for a viewer that just subscribed: marked replayed, and, for one
    still active now, ``"active": true`` in its detail (a printer says those without --history)."""
    out = protocol.replayed(frames)
    if not active:
        return out
    header = json.loads(out[1])
    header["detail"]["active"] = True
    return [out[0], json.dumps(header, separators=(",", ":")).encode(), out[2]]
