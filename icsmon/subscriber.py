"""A SUB socket that turns frames into decoded messages and never raises on bad input.

Malformed frames are counted (``rejected``) with the last reason kept for display; they never
reach the store and never crash the viewer.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from icsmon.endpoint import key_of
from icsmon.errors import TargetError
from icsmon.wire import MAX_MESSAGE_BYTES, Frames, ProtocolError, decode
from icsmon_agent.protocol import TOPIC_PREFIX, Message

#: What a viewer may hold of one peer's unread messages. libzmq bounds its queue in messages, not
#: bytes: past it, libzmq stops reading from that peer and the sender's own queue drops. A viewer
#: that keeps reading holds little whatever the frames' size (tests/test_viewer_robustness.py);
#: this many lets one that falls behind for a while (a loaded machine, a slow terminal) still get
#: a job's last samples and its goodbye, which a smaller count lost.
RCVHWM = 1000
#: What one poll takes off the socket before it hands over what it decoded.
DRAIN_BYTES = 64 * 2**20
#: Messages the app handles before yielding to its event loop, so a flood never freezes the screen.
BATCH = 256


class Decoding:
    """Decodes frames, counting what it rejects (and keeping the last reason) instead of raising."""

    def __init__(self) -> None:
        self.received = 0
        self.rejected = 0
        self.last_error = ""
        self.drained = 0  # bytes taken by the current poll

    def take(self, sock: zmq.Socket[bytes], limit: int) -> list[Message]:
        """What is queued on ``sock`` now, decoded: at most ``limit`` messages and about
        :data:`DRAIN_BYTES` (the rest waits for the next call), without a copy until a frame fits."""
        out: list[Message] = []
        self.drained = 0
        for _ in range(limit):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            msg = self._decode(frames)
            if msg is not None:
                out.append(msg)
            if self.drained >= DRAIN_BYTES:
                break
        return out

    def _decode(self, frames: Frames) -> Message | None:
        """Frames as received (without a copy: a frame too large is rejected before it is copied)."""
        self.received += 1
        self.drained += sum(len(f) for f in frames)
        try:
            return decode(frames)
        except ProtocolError as exc:
            self.rejected += 1
            self.last_error = str(exc)
            return None


def sub_socket(ctx: zmq.Context[Any], endpoints: Sequence[str]) -> Any:
    """A SUB socket on ``ctx`` (sync or asyncio), subscribed to icsmon's topics, connected; to a job
    with a key, over CURVE (plain endpoints first: a socket's mechanism is set per connect)."""
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, RCVHWM)
    # A peer that sends a bigger message is dropped before the message is allocated.
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    sock.setsockopt(zmq.SUBSCRIBE, TOPIC_PREFIX)
    secure = [ep for ep in endpoints if key_of(ep)]
    try:
        for ep in endpoints:
            if not key_of(ep):
                _connect(sock, ep)
        if secure:
            public, secret = zmq.curve_keypair()  # this viewer's own, for this socket only
            sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
            for ep in secure:
                sock.setsockopt(zmq.CURVE_SERVERKEY, key_of(ep).encode())
                _connect(sock, ep)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


def monitor_events(monitor: Any, most: int = 64) -> Iterator[tuple[int, str]]:
    """The events waiting on a socket monitor, without waiting: (event, the peer's endpoint)."""
    for _ in range(most):
        try:
            event = recv_monitor_message(monitor, zmq.NOBLOCK)
        except zmq.ZMQError:  # Again: no event
            return
        raw = event.get("endpoint", b"")
        yield event["event"], raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)


class Rejoin:
    """Connects again to a peer that libzmq dropped. A frame over ``MAXMSGSIZE`` is a protocol
    error to libzmq: it drops that peer and, unlike after an ordinary disconnect, never reconnects,
    so one oversize frame (a bug, or a hostile relay upstream) would deafen the viewer for good. Here
    it costs that frame: every disconnect is followed by a fresh connect (after an ordinary one,
    libzmq's own retry and ours meet the same endpoint; nothing is received twice).

    The monitor is read through a plain (not asyncio) socket on the same context, without waiting.
    """

    def __init__(self, sock: Any, endpoints: Sequence[str]) -> None:
        self._sock = sock
        self._keys = {str(ep): key_of(ep) for ep in endpoints}  # the key each peer was connected with
        address = f"inproc://icsmon-rejoin-{id(self)}"
        sock.monitor(address, zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILED)
        ctx: zmq.Context[Any] = zmq.Context.shadow(sock.context.underlying)
        self._monitor = ctx.socket(zmq.PAIR)
        self._monitor.setsockopt(zmq.LINGER, 0)
        self._monitor.connect(address)
        self.rejoined = 0
        self._dropped: set[str] = set()  # peers to connect again, once what they sent is read
        self.encrypted: set[str] = set()  # peers that speak CURVE to a viewer without their key

    @property
    def refusal(self) -> str:
        """Why a peer will never be heard as things are ("" when none refused)."""
        if not self.encrypted:
            return ""
        where = ", ".join(sorted(self.encrypted))
        return (
            f"{where} is encrypted (CURVE) and this viewer has no key for it: give the job's public "
            "key with --key, or name the job (pid, name or run id) so that its discovery file gives it"
        )

    def check(self) -> None:
        for event, endpoint in monitor_events(self._monitor):
            if event & HANDSHAKE_FAILED:
                # Which side sees the mismatch first varies (a mechanism mismatch here, or the job
                # closing first): a peer connected without a key that fails the handshake is one
                # that speaks CURVE.
                if not self._keys.get(endpoint):
                    self.encrypted.add(endpoint)
                continue
            if endpoint not in self.encrypted:  # connecting again would only be refused again
                self._dropped.add(endpoint)
        # Not while messages wait: disconnect() would discard what the peer sent before it went
        # (a job's last sample and its goodbye).
        if not self._dropped or self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            return
        dropped, self._dropped = self._dropped, set()
        for endpoint in dropped:
            # The socket's mechanism is set per connect: this peer's own goes with it again (CURVE
            # with its key, or plain: a CURVE peer connected last must not make a plain one CURVE).
            with contextlib.suppress(zmq.ZMQError):
                if self._keys.get(endpoint):
                    self._sock.setsockopt(zmq.CURVE_SERVERKEY, self._keys[endpoint].encode())
                else:
                    self._sock.setsockopt(zmq.PLAIN_SERVER, 0)
            with contextlib.suppress(zmq.ZMQError):
                self._sock.disconnect(endpoint)
            with contextlib.suppress(zmq.ZMQError):
                self._sock.connect(endpoint)
                self.rejoined += 1

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._sock.disable_monitor()
        with contextlib.suppress(Exception):
            self._monitor.close(linger=0)


def _connect(sock: Any, endpoint: str) -> None:
    try:
        sock.connect(endpoint)
    except zmq.ZMQError as exc:  # a malformed endpoint (tcp://host with no port): say so, in one line
        raise TargetError(f"cannot connect to {endpoint}: {exc}") from None


class Subscriber(Decoding):
    """Subscribes to one endpoint, or several at once (one SUB socket fair-queues them all: a
    side-by-side view of two runs needs no second socket). Messages carry their run and rank."""

    def __init__(
        self, endpoint: str | Sequence[str], ctx: zmq.Context[zmq.Socket[bytes]] | None = None
    ) -> None:
        super().__init__()
        self.endpoints = [endpoint] if isinstance(endpoint, str) else list(endpoint)
        self.endpoint = " ".join(self.endpoints)
        self._own_ctx = ctx is None
        self._ctx = ctx or zmq.Context()
        try:
            self._sock: zmq.Socket[bytes] = sub_socket(self._ctx, self.endpoints)
        except BaseException:
            if self._own_ctx:
                self._ctx.term()
            raise
        self._rejoin = Rejoin(self._sock, self.endpoints)

    def poll(self, timeout_s: float, limit: int = 10_000) -> list[Message]:
        """Wait up to ``timeout_s`` for a message, then drain what is queued (at most ``limit``)."""
        out: list[Message] = []
        self._rejoin.check()  # a peer dropped for an oversize frame is connected again
        if not self._sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            return out
        return self.take(self._sock, limit)

    def messages(self, until: float | None = None, tick_s: float = 0.2) -> Iterator[list[Message]]:
        """Batches of messages (possibly empty, every ``tick_s``) until the monotonic deadline ``until``."""
        while until is None or time.monotonic() < until:
            wait = tick_s if until is None else max(0.0, min(tick_s, until - time.monotonic()))
            yield self.poll(wait)

    def close(self) -> None:
        self._rejoin.close()
        with contextlib.suppress(Exception):
            self._sock.close(linger=0)
        if self._own_ctx:
            with contextlib.suppress(Exception):
                self._ctx.term()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncSubscriber(Decoding):
    """A SUB socket on the running event loop, on one or several endpoints; never raises on bad input."""

    def __init__(self, endpoints: Sequence[str]) -> None:
        super().__init__()
        self.endpoints = list(endpoints)
        self._ctx = zmq.asyncio.Context()
        try:
            self._sock: zmq.asyncio.Socket = sub_socket(self._ctx, self.endpoints)
        except BaseException:
            self._ctx.term()
            raise
        self._rejoin = Rejoin(self._sock, self.endpoints)
        # What is queued is taken without asyncio futures: a future's result lives in a reference
        # cycle until the garbage collector runs, and a flood of large frames piled up meanwhile.
        self._reader: zmq.Socket[bytes] = zmq.Socket.shadow(self._sock.underlying)

    async def poll(self, timeout_s: float, limit: int = BATCH) -> list[Message]:
        """Wait up to ``timeout_s`` for a message, then take what is queued (at most ``limit``)."""
        out: list[Message] = []
        self._rejoin.check()  # a peer dropped for an oversize frame is connected again
        if not await self._sock.poll(int(timeout_s * 1000)):
            return out
        return self.take(self._reader, limit)

    @property
    def refusal(self) -> str:
        return self._rejoin.refusal

    def close(self) -> None:
        self._rejoin.close()
        with contextlib.suppress(Exception):
            self._sock.close(linger=0)
        with contextlib.suppress(Exception):
            self._ctx.term()
