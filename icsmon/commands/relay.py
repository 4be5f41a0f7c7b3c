"""``icsmon relay``: one endpoint for many jobs, ZeroMQ's own proxy between the agents and the viewers.

The relay's XSUB socket connects to the agents (every job on this machine, followed as they come
and go; or the endpoints and SSH hosts named), and its XPUB socket is bound where viewers connect:
a viewer then needs one connection for a whole cluster's jobs. The XPUB is verbose, so every new
viewer's subscription reaches the agents, which answer with their schema and short history, as they
do for a viewer connected to them directly. Nothing is decoded or stored on the way.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from icsmon.commands.common import error, note
from icsmon.endpoint import Endpoint, key_of
from icsmon.subscriber import RCVHWM, monitor_events
from icsmon.targets import TargetError, as_endpoint, is_ssh_host, resolve_targets
from icsmon.wire import MAX_MESSAGE_BYTES
from icsmon_agent import discovery

#: Private like a job's own socket; a TCP bind is asked for, and warned about.
DEFAULT_BIND = "ipc://{runtime}/relay.sock"
#: How often the jobs on this machine are listed again (a new job joins the relay within this).
RELIST_S = 2.0
CONTROL = "inproc://icsmon-relay-control"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "relay",
        help="forward many jobs to one endpoint for viewers (ZeroMQ proxy)",
        description="Subscribe to many jobs and publish them all on one endpoint: run it on a login or "
        "head node, point viewers at it (`icsmon attach tcp://HEAD:PORT`). Nothing is stored or "
        "decoded on the way.",
        epilog="TARGET: nothing (every job on this machine, followed as jobs start and end), PIDs, run "
        "ids or names, endpoints (ipc://PATH, tcp://HOST:PORT), or SSH hosts (their newest job, every "
        "rank, through the SSH connection). Exit status: 0 on Ctrl-C or SIGTERM, 1 if the endpoint "
        "cannot be bound or a host cannot be reached, 2 for bad usage.",
    )
    p.add_argument("target", nargs="*", metavar="TARGET", help="what to relay; default: every local job")
    p.add_argument(
        "--bind",
        metavar="ENDPOINT",
        help="where viewers connect (default: ipc://RUNTIME_DIR/relay.sock, private to you; a tcp:// "
        "endpoint is reachable by every local user on loopback, by anyone who can route to it beyond)",
    )
    p.set_defaults(func=run)


def local_sources(targets: list[str]) -> Callable[[], set[str]]:
    """The endpoints of the named local targets, or of every local job, as of now."""

    def endpoints() -> set[str]:
        if not targets:
            # With its key: an encrypted one is known (and skipped).
            return {Endpoint(job.endpoint, job.key) for job in discovery.read_jobs()}
        try:
            return set(resolve_targets(targets).endpoints)
        except TargetError:
            return set()  # the named jobs are not (or no longer) running: relay nothing for now

    return endpoints


class Relay:
    """An XSUB/XPUB proxy whose upstream set is re-read every :data:`RELIST_S` seconds."""

    def __init__(self, bind: str, sources: Callable[[], set[str]], static: set[str]) -> None:
        self.ctx = zmq.Context()
        self.front = self.ctx.socket(zmq.XSUB)
        self.back = self.ctx.socket(zmq.XPUB)
        self.back.setsockopt(zmq.XPUB_VERBOSE, 1)  # each new viewer's subscription reaches the agents
        self.back.setsockopt(zmq.LINGER, 0)
        self.front.setsockopt(zmq.LINGER, 0)
        # As a viewer's: nothing over the limit is passed on, and what waits is bounded in bytes.
        self.front.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self.front.setsockopt(zmq.RCVHWM, RCVHWM)
        self.back.bind(bind)
        self.endpoint = self.back.getsockopt_string(zmq.LAST_ENDPOINT)
        self.sources = sources
        self.static = static
        self.connected: set[str] = set()
        self.skipped: set[str] = set()  # jobs speaking CURVE: one XSUB cannot mix them with plain ones
        self._control = self.ctx.socket(zmq.PAIR)
        self._control.bind(CONTROL)
        self._steer = self.ctx.socket(zmq.PAIR)
        self._steer.connect(CONTROL)
        self._stop = threading.Event()
        self._wanted: set[str] = set()
        self._dropped: set[str] = set()  # upstreams libzmq dropped (an oversize frame): connect again
        self._lock = threading.Lock()
        # libzmq drops a peer that sends a frame over MAXMSGSIZE and never connects to it again:
        # one such upstream would go silent for good (see subscriber.Rejoin).
        self.front.monitor("inproc://icsmon-relay-monitor", zmq.EVENT_DISCONNECTED)
        self._monitor = self.ctx.socket(zmq.PAIR)
        self._monitor.setsockopt(zmq.LINGER, 0)
        self._monitor.connect("inproc://icsmon-relay-monitor")

    def _disconnected(self) -> set[str]:
        return {endpoint for _, endpoint in monitor_events(self._monitor, most=10_000)}

    def _watch(self) -> None:
        """Thread: list the sources again; when they changed, or libzmq dropped one, stop the proxy
        so that it reconnects."""
        while not self._stop.wait(RELIST_S):
            wanted = self.sources() | self.static
            dropped = self._disconnected()
            with self._lock:
                changed = wanted != self.connected or bool(dropped & wanted)
                self._wanted = wanted
                self._dropped |= dropped & wanted
            if changed:
                self._steer.send(b"TERMINATE")

    def _rejoin(self, dropped: set[str]) -> None:
        for endpoint in sorted(dropped & self.connected):
            with contextlib.suppress(zmq.ZMQError):
                self.front.disconnect(endpoint)
            with contextlib.suppress(zmq.ZMQError):
                self.front.connect(endpoint)

    def _reconnect(self, wanted: set[str]) -> None:
        keyed = {e for e in wanted - self.connected if key_of(e)}
        for endpoint in sorted(keyed - self.skipped):
            note(f"not relaying {endpoint}: it is encrypted (CURVE); connect a viewer to it directly")
        self.skipped |= keyed
        wanted = wanted - self.skipped
        for endpoint in sorted(wanted - self.connected):
            with contextlib.suppress(zmq.ZMQError):
                self.front.connect(endpoint)
        for endpoint in sorted(self.connected - wanted):
            with contextlib.suppress(zmq.ZMQError):
                self.front.disconnect(endpoint)
        if wanted != self.connected:
            note(f"relaying {len(wanted)} endpoint(s) on {self.endpoint}")
        self.connected = set(wanted)

    def serve(self) -> None:
        """Until interrupted: proxy, and reconnect whenever the watcher says the sources changed."""
        self._reconnect(self.sources() | self.static)
        watcher = threading.Thread(target=self._watch, name="icsmon-relay-watch", daemon=True)
        watcher.start()
        try:
            while True:
                zmq.proxy_steerable(self.front, self.back, None, self._control)
                with self._lock:
                    wanted, dropped, self._dropped = set(self._wanted), self._dropped, set()
                self._reconnect(wanted)
                self._rejoin(dropped)
        finally:
            self._stop.set()
            watcher.join(timeout=RELIST_S + 1)
            with contextlib.suppress(zmq.ZMQError):
                self.front.disable_monitor()
            for sock in (self.front, self.back, self._control, self._steer, self._monitor):
                sock.close(linger=0)
            self.ctx.term()


def run(args: argparse.Namespace) -> int:
    from icsmon.targets.remote import RemoteTarget
    from icsmon.targets.session import exits_cleanly

    targets = [as_endpoint(t) for t in args.target]
    remote = [t for t in targets if is_ssh_host(t)]
    local = [t for t in targets if t not in remote]
    bind = args.bind or DEFAULT_BIND.format(runtime=discovery.runtime_dir())
    if bind.startswith("tcp://"):
        if bind.startswith(("tcp://127.", "tcp://localhost", "tcp://[::1]")):
            note(f"relaying on {bind}: every local user can connect to a loopback port")
        else:
            note(f"relaying on {bind}, beyond loopback: anyone who can reach it can read the figures")
    elif bind.startswith("ipc://"):
        try:
            discovery.ensure_private_dir(discovery.runtime_dir())
        except OSError as exc:
            return error(str(exc))
        running = _listener(bind)
        if running is not None:  # zmq would bind over it: the running relay would go on, unreachable
            return error(f"a relay already serves {bind} ({running}); stop it first, or give --bind")
    hosts: list[RemoteTarget] = []
    bound = False
    try:
        with exits_cleanly():
            static: set[str] = set()
            for host in remote:
                target = RemoteTarget(host)
                hosts.append(target)
                target.open()
                static |= set(target.connect())
                note(f"{host}: {len(target.ranks)} rank(s) of {target.job.run if target.job else '?'}")
            sources = local_sources(local) if local or not remote else (lambda: set())
            try:
                relay = Relay(bind, sources, static)
            except zmq.ZMQError as exc:
                return error(f"cannot bind {bind}: {exc}")
            bound = True
            note(f"viewers: icsmon attach {relay.endpoint}   (Ctrl-C stops the relay; the jobs go on)")
            started = time.monotonic()
            try:
                relay.serve()
            except KeyboardInterrupt:
                note(f"relay stopped after {time.monotonic() - started:.0f} s")
                return 0
    except SystemExit as exc:  # SIGTERM or SIGHUP, turned into an exit by exits_cleanly
        return 0 if exc.code in (143, 129) else int(exc.code or 0)
    finally:
        for target in hosts:
            target.close()
        if bound and bind.startswith("ipc://"):
            with contextlib.suppress(OSError):  # ours: zmq leaves an ipc socket's file behind
                os.unlink(bind[len("ipc://") :])
    return 0


def _listener(endpoint: str) -> str | None:
    """Who listens at this ipc:// endpoint now ("pid N" where the kernel says), or None: no file,
    or a stale one nobody answers on."""
    path = endpoint[len("ipc://") :]
    if not os.path.exists(path):
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return None
        with contextlib.suppress(OSError, AttributeError):
            creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            return f"pid {struct.unpack('3i', creds)[0]}"
    return "a running process"
