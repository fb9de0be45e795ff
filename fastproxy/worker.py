"""One worker process: a uvloop event loop serving every listener with callbacks.

[I/O] Imports everything below it (errors, config, exchange, http1, wsrelay, upstream, deadlines,
metrics, log, admin, tls). Runs only in a child forked by the master.

Theory of operation
-------------------
``ClientProtocol`` is one client connection: the asyncio adapter of an ``exchange.Exchange``,
the pure state machine of its request cycles (head, admission, forward with pipelining, local
replies, timeouts' decisions, the stale-pool retry, the 101 check). No task is created per
request; everything runs in transport callbacks:

1. Transport callbacks become the exchange's events, with the clock (``time.monotonic``) read
   here and passed in; upstream callbacks (``upstream.UpstreamOwner``) likewise.
2. The exchange's effects come back as ``ExchangeIO`` calls: transport writes, pause and resume
   reading, ``open_upstream`` on the cycle's pool, the one timeout (``Deadlines``: one loop timer
   for all connections), ``finished`` (metrics and the access record), ``switched``.
3. ``TUNNEL``: after a checked 101 the adapter relays WebSocket frames both ways (``wsrelay``),
   with its own timeouts (pings, idle, the close handshake).

Faults: every error path ends the exchange with an answer or a close and frees its state.
A connection over a limit at accept (``max_connections``, ``max_connections_per_client``, or
the worker's descriptors, ``runtime.Snapshot.client_capacity``) gets a 503 ``overloaded`` and
a close (a lingering one while descriptors allow: FIN, the client's bytes read and dropped for
``SHED_LINGER_S``). An exception escaping a callback is logged as JSON by the loop's exception
handler (``_on_loop_exception``) and the connection it belongs to is ended (``crashed``: a 500
``internal_error`` when no response has begun, a reset otherwise). Upstream failures and shed
connections are counted and logged at WARNING, at most one line per key per
``LOG_INTERVAL_S`` (``log.Throttle``).

TLS listeners: the server accepts a ``TlsHandshake`` instead of a ``ClientProtocol``. It counts
the client against the listener's limits at once and runs the handshake (the event loop's
``SSLProtocol``, with the listener's handshake timeout) on the context of the generation current
at accept; when it completes, a ``TlsClientProtocol`` (a ``ClientProtocol`` that takes the count
over) starts on the TLS transport. A plain listener's path is unchanged.

Invariants: the pure modules never read a clock; a connection has one deadline armed at a time
(the exchange's or the tunnel's); a cycle pins its ``ListenerPlan`` (in the exchange) and its
upstream pool (``ClientProtocol.pool``), so a reload never changes a request under way.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import errno
import fcntl
import functools
import logging
import os
import resource
import signal
import socket
import ssl
import struct
import sys
import termios
import time
import tomllib
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol, cast

import orjson

from fastproxy import admin, control, log, tls
from fastproxy.config import Config, HttpParser, Limits, UpstreamConfig, parse_config
from fastproxy.deadlines import Deadlines
from fastproxy.errors import INTERNAL_ERROR, OVERLOADED, ConfigError
from fastproxy.exchange import (
    VERDICT_LABEL,
    Cycle,
    Exchange,
    State,
    UpstreamConn,
    Verdict,
    error_response,
)
from fastproxy.http1 import ClientLeg, ServerLeg
from fastproxy.metrics import WorkerMetrics
from fastproxy.policy import Decision
from fastproxy.runtime import ListenerPlan, Snapshot, diff
from fastproxy.upstream import UpstreamPool, UpstreamProtocol
from fastproxy.wsframe import CLOSE_GOING_AWAY, FrameTracker, close_frame
from fastproxy.wsrelay import RelayOutput, WebSocketRelay

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 1.0
WRITE_HIGH_WATER_BYTES = 256 * 1024
_LINGER_RESET = struct.pack("ii", 1, 0)
#: how long a relayed WebSocket Close may wait for the other side's Close
WS_CLOSE_TIMEOUT_S = 10.0
#: on SIGTERM, WebSockets get their Close 1001 this long before ``graceful_timeout_s`` (at most
#: half of it), which leaves the close handshake and the last answers time to go out
WS_DRAIN_MARGIN_S = 5.0
#: a tunnel's timeouts (pings, idle, the close handshake) fall on multiples of this (or of an
#: eighth of a shorter timeout), so that the idle WebSockets of a worker share a few
#: ``Deadlines`` buckets instead of one per 25 ms tick
WS_TICK_S = 0.5
# past the multiple, so that the rounding up in ``Deadlines.arm`` gives every tunnel armed for
# the same multiple the same tick
_WS_TICK_MARGIN_S = 0.001
#: how often the drain looks at the connections
DRAIN_STEP_S = 0.05
#: on SIGTERM, an idle keep-alive connection is closed once it has been quiet this long
DRAIN_QUIET_S = 0.5
_INT_ZERO = bytes(4)
#: a connection shed at accept: how long its request is read and dropped after the 503 and a
#: FIN, so that closing it does not reset the answer away (nginx's lingering close)
SHED_LINGER_S = 1.0
#: at most one WARNING line per key (an upstream and a kind, a listener and a reason) this often
LOG_INTERVAL_S = 10.0
# members read on every request, as module constants (on CPython 3.11 a member read off its
# class goes through ``EnumType.__getattr__``'s slot wrapper: four times a global)
_STATE_TUNNEL: Final = State.TUNNEL
_VERDICT_WOULD_DENY: Final = Verdict.WOULD_DENY


class Listener:
    """One listener in this worker: its current plan, its server, connections and counters.

    ``plan`` is replaced by a reload; a request pins the plan it started with (``Cycle.plan``).
    """

    __slots__ = (
        "conn_gauge",
        "connections",
        "handshakes",
        "name",
        "per_client",
        "plan",
        "received",
        "retired",
        "sent",
        "server",
        "tls",
        "ws_gauge",
    )

    def __init__(self, plan: ListenerPlan, metrics: WorkerMetrics) -> None:
        self.plan = plan
        self.name = plan.name
        self.server: asyncio.Server | None = None
        #: removed by a reload: no longer accepting; its connections end after their request
        self.retired = False
        self.connections: set[ClientProtocol] = set()
        #: TLS: the current generation's contexts (None: a plain listener); set by the worker
        self.tls: tls.ServerTls | None = None
        #: TLS connections whose handshake is under way (counted in ``per_client`` too)
        self.handshakes: set[TlsHandshake] = set()
        self.per_client: dict[bytes, int] = {}
        #: bytes from and to clients since the metrics were last published
        self.received = 0
        self.sent = 0
        self.conn_gauge = metrics.connection_gauge(plan.name)
        self.ws_gauge = metrics.websocket_gauge(plan.name)
        metrics.prepare_listener(plan.name)


def leg_class_for(parser: HttpParser) -> Callable[[int], ClientLeg]:
    if parser is HttpParser.HTTPTOOLS:
        from fastproxy.http1_httptools import HttptoolsLeg  # an optional extra

        return HttptoolsLeg
    return ServerLeg


class _SslProtocolFactory(Protocol):
    def __call__(
        self,
        loop: asyncio.AbstractEventLoop,
        app_protocol: asyncio.BaseProtocol,
        sslcontext: ssl.SSLContext,
        waiter: asyncio.Future[None],
        server_side: bool = False,
        server_hostname: str | None = None,
        call_connection_made: bool = True,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
    ) -> asyncio.BufferedProtocol: ...


def ssl_protocol_for(loop: asyncio.AbstractEventLoop) -> _SslProtocolFactory:
    """The TLS protocol of ``loop``'s implementation: uvloop's own on a uvloop loop."""
    import uvloop
    import uvloop.loop

    if isinstance(loop, uvloop.Loop):
        return cast(_SslProtocolFactory, uvloop.loop.SSLProtocol)  # type: ignore[attr-defined]
    return cast(_SslProtocolFactory, asyncio.sslproto.SSLProtocol)


class WorkerState:
    """Shared by every connection of the worker: the current snapshot and what it runs on."""

    def __init__(
        self,
        snapshot: Snapshot,
        loop: asyncio.AbstractEventLoop,
        contexts: tls.Contexts | None = None,
    ) -> None:
        self.snapshot = snapshot
        self.loop = loop
        if contexts is None:
            contexts = tls.build(snapshot.config)
        tls.install_upstream_contexts(contexts)
        self.ssl_protocol = ssl_protocol_for(loop)
        self.metrics = WorkerMetrics()
        for name in snapshot.upstreams:
            self.metrics.prepare_upstream(name)
        #: the master's health table, ``{upstream: {server: up}}`` (``control.Health``)
        self.health: dict[str, dict[str, bool]] = {}
        #: the control channel, once ``_serve`` has it: passive failures are reported on it
        self.channel: socket.socket | None = None
        #: the current pool of each upstream; a reload that changes a spec retires its pool
        self.pools = {name: self.new_pool(u) for name, u in snapshot.upstreams.items()}
        #: client connections open on every listener, and how many the descriptors allow
        self.clients = 0
        self.nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.client_capacity = snapshot.client_capacity(self.nofile)
        self.throttle = log.Throttle(LOG_INTERVAL_S)
        self.listeners = {
            name: Listener(plan, self.metrics) for name, plan in snapshot.listeners.items()
        }
        for name, listener in self.listeners.items():
            listener.tls = contexts.listeners.get(name)
        #: listeners a reload removed, kept while their connections finish
        self.retired_listeners: list[Listener] = []
        self.draining = False
        self.deadlines = Deadlines(loop)
        self.leg_class = leg_class_for(snapshot.http_parser)
        #: the Host sent to each upstream for an HTTP/1.0 request without one
        self.default_hosts = snapshot.default_hosts
        self._rid_prefix = os.urandom(6).hex().encode()
        self._rid_counter = 0

    @property
    def config(self) -> Config:
        return self.snapshot.config

    # -- upstream health (the master decides, ``health.py``; the pools follow)

    def new_pool(self, spec: UpstreamConfig) -> UpstreamPool:
        return UpstreamPool(spec, self.loop, self.health.get(spec.name), self.report_down)

    def apply_health(self, message: control.Health) -> None:
        """The master's table: every current pool follows it."""
        self.health = message.servers
        now = time.monotonic()
        for name, pool in self.pools.items():
            pool.set_health(message.servers.get(name, {}), now)

    def report_down(self, upstream: str, server: str, reason: str) -> None:
        """A pool took ``server`` out of its rotation: the master tells every worker."""
        channel = self.channel
        if channel is None:
            return
        down = control.ServerDown(self.snapshot.generation, upstream, server, reason)
        try:
            control.send_down(channel, down)
        except OSError as err:  # full or gone: the master's own checks catch the server too
            logger.debug("cannot report %s of upstream %s down: %s", server, upstream, err)

    def upstream_states(self) -> list[tuple[str, str, bool]]:
        """``(upstream, server, up)`` for every server of the current pools (admin /metrics)."""
        return [
            (name, server.label, server.up)
            for name, pool in self.pools.items()
            for server in pool.servers
        ]

    def readiness(self) -> dict[str, object] | None:
        """Why admin ``/readyz`` says 503 (None: ready): draining, or a listener's default
        upstream has no server up."""
        if self.draining:
            return {"ready": False, "reason": "draining"}
        down = sorted(
            {
                plan.upstream
                for plan in self.snapshot.listeners.values()
                if plan.upstream in self.pools and not self.pools[plan.upstream].up
            }
        )
        if down:
            return {"ready": False, "reason": "no_healthy_upstream", "upstreams": down}
        return None

    def routes_json(self) -> bytes:
        """Admin ``/routes``: this worker's current generation, compiled."""
        return orjson.dumps(self.snapshot.routes(), option=orjson.OPT_INDENT_2)

    def publish_metrics(self) -> None:
        """Add the per-request counts since the last call to the scraped files (every
        heartbeat, before a scrape, at the end of the drain)."""
        traffic = []
        for listener in self.every_listener():
            traffic.append((listener.name, listener.received, listener.sent))
            listener.received = listener.sent = 0
        self.metrics.publish(traffic)

    def parser_name(self) -> str:
        return self.snapshot.http_parser.value

    def certificate_expiry(self) -> list[tuple[str, str, float]]:
        """``(listener, cert, not_after)`` of every certificate of the current listeners."""
        return [
            (name, cert, not_after)
            for name, listener in self.listeners.items()
            if listener.tls is not None
            for cert, not_after in listener.tls.not_after
        ]

    def every_listener(self) -> list[Listener]:
        """Current listeners and those a reload removed that still have connections."""
        self.retired_listeners = [lis for lis in self.retired_listeners if lis.connections]
        return [*self.listeners.values(), *self.retired_listeners]

    def next_request_id(self) -> bytes:
        self._rid_counter += 1
        return b"%s%08x" % (self._rid_prefix, self._rid_counter)

    def warn(self, key: object, msg: str, *args: object, extra: Mapping[str, object]) -> None:
        """A WARNING, at most one per ``key`` per ``LOG_INTERVAL_S``, with the count left out."""
        if not logger.isEnabledFor(logging.WARNING):
            return
        left_out = self.throttle.check(key, time.monotonic())
        if left_out is None:
            return
        if left_out:
            msg += " (%d more since the last such line)"
            args = (*args, left_out)
        logger.warning(msg, *args, extra=extra)


class TunnelUpstream(Protocol):
    """The upstream side of a WebSocket tunnel: an ``upstream.TunnelSocket``, or the
    ``UpstreamConn`` itself where it cannot be detached (TLS)."""

    def write(self, data: bytes) -> None: ...
    def writelines(self, data: list[bytes]) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def discard(self) -> None: ...
    def close(self) -> None: ...


class ClientProtocol(asyncio.Protocol):
    """One client connection on one listener: the asyncio adapter of an ``exchange.Exchange``.

    It turns transport callbacks into the exchange's events (with the clock read here) and
    carries out its effects (``ExchangeIO``): transport writes, pause and resume, the pool,
    the ``Deadlines`` timer, metrics and the access log. The WebSocket tunnel after a checked
    101 is relayed here, with its own timers (pings, the close handshake).
    """

    __slots__ = (
        "arm",
        "bytes_in",
        "bytes_out",
        "cancel_timer",
        "deadline_tick",
        "drain_idle",
        "exchange",
        "last_ws_activity",
        "listener",
        "peer",
        "pool",
        "relay",
        "transport",
        "tunnel_limits",
        "tunnel_trackers",
        "tunnel_upstream",
        "worker",
        "ws_active",
        "ws_closing",
        "ws_start",
        "ws_timer",
    )

    def __init__(self, worker: WorkerState, listener: Listener) -> None:
        self.worker = worker
        self.listener = listener
        self.exchange = Exchange(self, worker, listener)
        self.transport: asyncio.Transport | None = None
        #: the client's address, as bytes (its str is ``client_ip``)
        self.peer = b""
        #: bytes read from and written to the client since the last access record
        self.bytes_in = 0
        self.bytes_out = 0
        self.deadline_tick = 0  # owned by ``worker.deadlines``
        # ExchangeIO.arm and .cancel_timer: the worker's Deadlines with this connection as the
        # owner, bound once; a partial adds no Python frame to the twice-per-request calls
        deadlines = worker.deadlines
        self.arm: Callable[[float], None] = functools.partial(deadlines.arm, self)
        self.cancel_timer: Callable[[], None] = functools.partial(deadlines.cancel, self)
        #: the pool of the cycle under way: a retry on a fresh connection uses it again, even
        #: if a reload retired it meanwhile
        self.pool: UpstreamPool | None = None
        #: the tunnel's timeout callback (None: the exchange's timer, if any); kept unbound,
        #: so arming creates no bound-method object
        self.ws_timer: Callable[[ClientProtocol], None] | None = None
        #: the limits of the plan a WebSocket tunnel opened with
        self.tunnel_limits: Limits | None = None
        #: draining: ``(served, loop time)`` when the connection was first seen idle
        self.drain_idle: tuple[int, float] | None = None
        #: ``tunnel`` mode: frame boundaries towards the client and towards the upstream
        self.tunnel_trackers: tuple[FrameTracker, FrameTracker] | None = None
        #: when the tunnel was last seen active, as of the last keep-alive tick
        self.last_ws_activity = 0.0
        #: a frame went through since the last keep-alive tick (cheaper than a clock read each)
        self.ws_active = False
        self.relay: WebSocketRelay | None = None
        #: the upstream side of a tunnel: a ``TunnelSocket`` (a plain TCP upstream), else the
        #: upstream connection as it was
        self.tunnel_upstream: TunnelUpstream | None = None
        self.ws_closing = False
        #: when the tunnel opened (``fastproxy_websocket_duration_seconds``)
        self.ws_start = 0.0

    @property
    def client_ip(self) -> str:
        return self.peer.decode()

    @property
    def state(self) -> State:
        return self.exchange.state

    # ---------------------------------------------------------------- transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport = transport
        listener = self.listener
        limits = listener.plan.limits
        peer = transport.get_extra_info("peername")
        self.peer = peer[0].encode() if peer else b""
        count = listener.per_client.get(self.peer, 0) + 1
        listener.per_client[self.peer] = count
        listener.connections.add(self)
        listener.conn_gauge.inc()
        worker = self.worker
        worker.clients += 1
        if worker.clients > worker.client_capacity:
            self._shed("descriptors", linger=False)
            return
        if len(listener.connections) > limits.max_connections:
            self._shed("max_connections", linger=True)
            return
        if limits.max_connections_per_client and count > limits.max_connections_per_client:
            self._shed("max_connections_per_client", linger=True)
            return
        # (uvloop sets TCP_NODELAY on every TCP transport itself)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER_BYTES)
        self.exchange.wind_down = self.worker.draining or listener.retired
        self.exchange.open(self.peer)

    def data_received(self, data: bytes) -> None:
        n = len(data)
        self.bytes_in += n
        self.listener.received += n
        exchange = self.exchange
        if exchange.state is not _STATE_TUNNEL:
            exchange.client_data(data, time.monotonic())
        else:
            self._tunnel_from_client(data)

    def eof_received(self) -> bool | None:
        if self.exchange.state is State.TUNNEL:
            if self.relay is None and self.tunnel_upstream is not None:
                self.tunnel_upstream.close()
            return None
        return True if self.exchange.client_eof() else None  # None: close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        listener = self.listener
        if self in listener.connections:
            listener.connections.discard(self)
            listener.conn_gauge.dec()
            self.worker.clients -= 1
        ip = self.peer
        left = listener.per_client.get(ip, 1) - 1
        if left:
            listener.per_client[ip] = left
        else:
            listener.per_client.pop(ip, None)
        self._cancel_ws_timer()
        previous = self.exchange.state
        self.exchange.client_lost()
        if previous is State.TUNNEL:
            self._end_tunnel()
        self.transport = None

    def pause_writing(self) -> None:
        self.exchange.client_blocked(time.monotonic())
        if self.tunnel_upstream is not None:
            self.tunnel_upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.tunnel_upstream is not None:
            self.tunnel_upstream.resume_reading()
        self.exchange.client_unblocked()

    # ---------------------------------------------------------------- upstream callbacks

    def on_upstream_ready(self, conn: UpstreamProtocol) -> None:
        # called from the connect task's done callback: an exception there would reach the
        # loop's handler with no connection to end, so it is caught here (as for every
        # callback this class is entered through outside its transport's)
        try:
            now = time.monotonic()
            self.exchange.upstream_ready(conn, now)
            if conn.transport is None:
                # lost before it was handed over, e.g. a TLS 1.3 upstream refusing the client
                # certificate right after the handshake: what a loss after it would be
                self.exchange.upstream_lost(now)
        except Exception as exc:
            self.crashed(exc)

    def on_upstream_failed(self, code: str, config: UpstreamConfig) -> None:
        try:
            self.exchange.upstream_failed(code, config, time.monotonic())
        except Exception as exc:
            self.crashed(exc)

    def on_upstream_data(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange.state is not _STATE_TUNNEL:
            exchange.upstream_data(data, time.monotonic())
            return
        try:
            self._tunnel_from_upstream(data)
        except Exception as exc:
            # a ``TunnelSocket`` calls this from the loop's reader callback, where the loop's
            # handler would find no connection to end
            self.crashed(exc)

    def on_upstream_lost(self) -> None:
        if self.exchange.state is State.TUNNEL:
            try:
                self._end_tunnel()
                self._close()
            except Exception as exc:  # called on a later loop pass by a ``TunnelSocket``
                self.crashed(exc)
            return
        self.exchange.upstream_lost(time.monotonic())

    def on_upstream_pause_writing(self) -> None:
        self.exchange.upstream_blocked()

    def on_upstream_resume_writing(self) -> None:
        self.exchange.upstream_unblocked()

    # ---------------------------------------------------------------- ExchangeIO

    def write_client(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None:
            n = len(data)
            self.bytes_out += n
            self.listener.sent += n
            transport.write(data)

    def writelines_client(self, data: list[bytes]) -> None:
        transport = self.transport
        if transport is not None:
            n = sum(map(len, data))
            self.bytes_out += n
            self.listener.sent += n
            transport.writelines(data)

    def close_client(self, abort: bool) -> None:
        transport = self.transport
        if transport is not None:
            if abort:
                # RST instead of FIN: the kernel drops what the client has not read, instead of
                # keeping it for a peer that may never read (nginx's reset_timedout_connection)
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                transport.abort()
            else:
                transport.close()

    def set_reading(self, reading: bool) -> None:
        transport = self.transport
        if transport is None:
            return
        if reading:
            transport.resume_reading()
        else:
            transport.pause_reading()

    def open_upstream(self, upstream: str, fresh: bool) -> UpstreamConn | None:
        pool = self.pool
        if not fresh or pool is None:
            # a cycle pins the pool it started with (a reload may retire it meanwhile)
            pool = self.pool = self.worker.pools[upstream]
        return pool.acquire(self, fresh=fresh)

    def soon(self, callback: Callable[[float], None]) -> None:
        self.worker.loop.call_soon(self._call_now, callback)

    def _call_now(self, callback: Callable[[float], None]) -> None:
        try:
            callback(time.monotonic())
        except Exception as exc:
            self.crashed(exc)

    def finished(self, cycle: Cycle | None, status: int, code: str) -> None:
        listener = self.listener
        if cycle is None:
            self.worker.metrics.request_done(listener.name, "-", "reject", status, 0.0, "", -1.0)
            if log.access is not None:
                self._access_log(log.access, None, status, code)
            return
        decision = cycle.decision
        verdict = cycle.verdict
        rule = decision.rule.name if decision is not None else "-"
        self.worker.metrics.request_done(
            listener.name,
            rule,
            VERDICT_LABEL[verdict],
            status,
            time.monotonic() - cycle.start,
            cycle.upstream_name,
            cycle.upstream_s,
        )
        access = log.access
        if access is not None:
            self._access_log(access, cycle, status, code)
        if verdict is _VERDICT_WOULD_DENY and decision is not None:
            self._log_would_deny(decision)

    def upstream_error(self, upstream: str, code: str, detail: str) -> None:
        worker = self.worker
        worker.metrics.upstream_error(upstream, code).inc()
        worker.warn(
            ("upstream", upstream, code),
            "upstream %s: %s (%s, listener %s)",
            upstream,
            detail or _UPSTREAM_ERROR_TEXT.get(code, code),
            code,
            self.listener.name,
            extra={"upstream": upstream, "listener": self.listener.name},
        )

    def switched(
        self, cycle: Cycle, conn: UpstreamConn, client_rest: bytes, upstream_rest: bytes
    ) -> None:
        # An idle tunnel holds only what it needs: the exchange arms no timer of its own from
        # now on (the tunnel's go to ``worker.deadlines`` directly), so its two bound callables
        # go, and the upstream connection drops its HTTP reader (the exchange its scanner).
        self.arm = _no_exchange_timer
        self.cancel_timer = _no_exchange_cancel
        upstream: TunnelUpstream = conn
        if isinstance(conn, UpstreamProtocol):
            conn.tunnel()
            # a plain TCP upstream goes on as a bare descriptor, without its uvloop transport
            upstream = conn.detach() or conn
        self.tunnel_upstream = upstream
        self.listener.ws_gauge.inc()
        # one float for both (an idle tunnel keeps it until its first active tick)
        self.ws_start = self.last_ws_activity = time.monotonic()
        plan = cycle.plan
        limits = plan.limits
        self.tunnel_limits = limits
        if plan.validate_frames:
            self.relay = WebSocketRelay(limits.ws_max_message_bytes)
        else:
            self.tunnel_trackers = (FrameTracker(), FrameTracker())
        self._update_reading_tunnel()
        self._arm_tunnel(limits.ws_ping_interval_s, ClientProtocol._on_ws_tick)
        if upstream_rest:
            self._tunnel_from_upstream(upstream_rest)
        if client_rest and self.exchange.state is State.TUNNEL:
            self._tunnel_from_client(client_rest)

    # ---------------------------------------------------------------- timers

    def on_deadline(self) -> None:
        try:
            callback = self.ws_timer
            if callback is not None:
                self.ws_timer = None
                callback(self)
                return
            self.exchange.timer_fired(time.monotonic())
        except Exception as exc:
            self.crashed(exc)

    def _arm_ws(self, delay: float, callback: Callable[[ClientProtocol], None]) -> None:
        """Run ``callback(self)`` in ``delay`` seconds (the shed connection's linger)."""
        self.ws_timer = callback
        self.worker.deadlines.arm(self, delay)

    def _arm_tunnel(self, delay: float, callback: Callable[[ClientProtocol], None]) -> None:
        """Run ``callback(self)`` in ``delay`` seconds rounded up to a multiple of ``WS_TICK_S``
        (at most an eighth of ``delay``; tunnel timeouts): the tunnels of a worker share a
        ``Deadlines`` bucket per multiple instead of holding one per 25 ms tick."""
        self.ws_timer = callback
        worker = self.worker
        step = min(WS_TICK_S, delay / 8)
        due = worker.loop.time() + delay
        worker.deadlines.arm(self, delay + (-due % step) + _WS_TICK_MARGIN_S)

    def _cancel_ws_timer(self) -> None:
        if self.ws_timer is not None:
            self.ws_timer = None
            self.worker.deadlines.cancel(self)

    # ---------------------------------------------------------------- records

    def _access_log(
        self, access: log.AccessLog, cycle: Cycle | None, status: int, code: str
    ) -> None:
        """One record per request; cookies and credentials are never logged, the query only
        as ``[access_log] query`` says (values redacted by default).

        ``reason`` is the error code of a local answer or a failed exchange (``code``), else
        the policy's refusal, else ``client_closed`` for a 499, else null. ``cycle`` is None
        for a request refused before it parsed (no request line to show). Errors (status 400
        and up, a reason, a would-deny) are always logged; the rest as ``sample`` says.
        """
        decision = cycle.decision if cycle is not None else None
        reason = code or (decision.refusal.value if decision and decision.refusal else None)
        if (
            access.sample < 1.0
            and status < 400
            and reason is None
            and (cycle is None or cycle.verdict is not Verdict.WOULD_DENY)
            and not access.sampled()
        ):
            self.bytes_in = self.bytes_out = 0
            return
        if status == 499 and reason is None:
            reason = "client_closed"
        listener = self.listener
        bytes_in, bytes_out = self.bytes_in, self.bytes_out
        self.bytes_in = self.bytes_out = 0
        if cycle is None:
            access.write(
                {
                    "request_id": None,
                    "client_ip": self.client_ip,
                    "method": None,
                    "host": "",
                    "path": "",
                    "query": None,
                    "listener": listener.name,
                    "tls": listener.plan.config.tls is not None,
                    "rule": "-",
                    "decision": Verdict.REJECT.value,
                    "status": status,
                    "reason": reason,
                    "duration_s": None,
                    "upstream": "",
                    "server": None,
                    "upstream_response_s": None,
                    "bytes_in": bytes_in,
                    "bytes_out": bytes_out,
                    "user_agent": None,
                    "generation": self.worker.snapshot.generation,
                }
            )
            return
        info = cycle.info
        head = cycle.head
        target = head.target
        query = None
        mark = target.find(b"?")
        if mark >= 0 and access.query != "drop":
            raw = target[mark + 1 :]
            if access.query == "redact":
                raw = log.redact_query(raw)
            query = raw.decode("ascii", "backslashreplace")[:2048]
        served_by = cast("UpstreamProtocol | None", cycle.served_by)
        agent = None
        for name, value in head.headers:
            if len(name) == 10 and name.lower() == b"user-agent":
                agent = value[:200].decode("ascii", "backslashreplace")
                break
        access.write(
            {
                "request_id": cycle.request_id.decode("ascii", "replace"),
                "client_ip": self.client_ip,
                "method": head.method.decode("ascii", "replace"),
                "host": (info.host or b"").decode("ascii", "replace")[:200] if info else "",
                "path": (decision.path if decision else b"").decode("ascii", "replace")[:2048],
                "query": query,
                "listener": listener.name,
                "tls": cycle.plan.config.tls is not None,
                "rule": decision.rule.name if decision else "-",
                "decision": cycle.verdict.value,
                "status": status,
                "reason": reason,
                "duration_s": round(time.monotonic() - cycle.start, 6),
                "upstream": cycle.upstream_name,
                "server": served_by.server.label if served_by is not None else None,
                "upstream_response_s": (
                    round(cycle.upstream_s, 6) if cycle.upstream_s >= 0.0 else None
                ),
                "bytes_in": bytes_in,
                "bytes_out": bytes_out,
                "user_agent": agent,
                "generation": self.worker.snapshot.generation,
            }
        )

    def _log_would_deny(self, decision: Decision) -> None:
        if logger.isEnabledFor(logging.INFO):
            name = self.listener.name
            logger.info(
                "would deny %s on listener %s (report mode)",
                decision.path[:200].decode("ascii", "backslashreplace"),
                name,
                extra={"listener": name, "decision": "would_deny"},
            )

    def _close(self, *, abort: bool = False) -> None:
        self._cancel_ws_timer()
        self.exchange.close(abort=abort)

    # ---------------------------------------------------------------- faults

    def _shed(self, reason: str, *, linger: bool) -> None:
        """Over a limit at accept: a 503 ``overloaded`` (nginx ``limit_conn``'s status), then
        a close; never a reset the worker can afford to avoid."""
        worker = self.worker
        listener = self.listener
        transport = self.transport
        assert transport is not None
        self.exchange.state = State.CLOSED
        worker.metrics.shed(listener.name, reason).inc()
        extra = {"listener": listener.name, "status": 503}
        if reason == "descriptors":
            worker.warn(
                ("shed", listener.name, reason),
                "listener %s: out of descriptors (%d client connections, open-files limit %d):"
                " shedding new connections with 503",
                listener.name,
                worker.clients - 1,
                worker.nofile,
                extra=extra,
            )
        else:
            worker.warn(
                ("shed", listener.name, reason),
                "listener %s: connection from %s over %s, answered 503",
                listener.name,
                self.client_ip,
                reason,
                extra=extra,
            )
        request_id = worker.next_request_id()
        transport.write(error_response(503, OVERLOADED, request_id, close=True))
        if not linger:
            transport.close()
            return
        # FIN after the answer; what the client sends meanwhile is read and dropped (the
        # exchange is CLOSED), so the close after it does not reset the answer away
        with contextlib.suppress(OSError, RuntimeError):
            transport.write_eof()
        self._arm_ws(SHED_LINGER_S, ClientProtocol._on_shed_timeout)

    def _on_shed_timeout(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def crashed(self, exc: BaseException | None) -> None:
        """An exception escaped a callback of this connection: log it (unless the loop's
        handler has), then end the exchange: a 500 ``internal_error`` when no response has
        begun, else a reset; the upstream side is dropped. Never raises."""
        if exc is not None:
            _log_exception(
                self.worker,
                f"unexpected error on a connection of listener {self.listener.name}",
                exc,
            )
        transport = self.transport
        exchange = self.exchange
        if transport is None or exchange.state is State.CLOSED:
            return
        try:
            self._cancel_ws_timer()
            exchange._cancel_timer()
            cycle = exchange.cycle
            answer = exchange.state is not State.TUNNEL and (
                cycle is None or not cycle.leg.response_started
            )
            if exchange.state is State.TUNNEL:
                self._end_tunnel()
            elif cycle is not None and cycle.upstream is not None:
                conn, cycle.upstream = cycle.upstream, None
                conn.discard()
            exchange.state = State.CLOSED
            if answer:
                request_id = (cycle.request_id if cycle else b"") or self.worker.next_request_id()
                transport.write(error_response(500, INTERNAL_ERROR, request_id, close=True))
                transport.close()
            else:
                self.close_client(abort=True)
        except Exception as again:
            _log_exception(self.worker, "cannot end a failed connection", again)
            transport.abort()

    # ---------------------------------------------------------------- WebSocket tunnel

    def _update_reading_tunnel(self) -> None:
        exchange = self.exchange
        transport = self.transport
        if transport is not None and exchange.read_paused:
            exchange.read_paused = False
            transport.resume_reading()
        conn = self.tunnel_upstream
        if conn is not None:
            conn.resume_reading()

    def _tunnel_from_client(self, data: bytes) -> None:
        conn = self.tunnel_upstream
        if conn is None:
            return
        self.ws_active = True
        relay = self.relay
        if relay is None:
            if self.tunnel_trackers is not None:
                self.tunnel_trackers[1].feed(data)
            conn.write(data)
            return
        if relay.client_passes(data):
            conn.write(data)
            return
        self._apply(relay.from_client(data))

    def _tunnel_from_upstream(self, data: bytes) -> None:
        if not data:
            return
        self.ws_active = True
        relay = self.relay
        if relay is None:
            if self.tunnel_trackers is not None:
                self.tunnel_trackers[0].feed(data)
            if self.transport is not None:
                self.listener.sent += len(data)
                self.transport.write(data)
            return
        if relay.upstream_passes(data):
            if self.transport is not None:
                self.listener.sent += len(data)
                self.transport.write(data)
            return
        self._apply(relay.from_upstream(data))

    def _apply(self, out: RelayOutput) -> None:
        conn = self.tunnel_upstream
        to_upstream = out.to_upstream
        if to_upstream and conn is not None:
            if len(to_upstream) == 1:
                conn.write(to_upstream[0])
            else:
                conn.writelines(to_upstream)
        to_client = out.to_client
        if to_client and self.transport is not None:
            self.listener.sent += sum(map(len, to_client))
            if len(to_client) == 1:
                self.transport.write(to_client[0])
            else:
                self.transport.writelines(to_client)
        if out.client_close_code is not None:
            self.worker.metrics.websocket_close(self.listener.name, out.client_close_code).inc()
        if out.done:
            self._end_tunnel()
            self._close()
        elif not self.ws_closing and self.relay is not None and self.relay.closing:
            # bound the wait for the other side's Close (RFC 6455 7.1.1 leaves it to us)
            self.ws_closing = True
            self._arm_tunnel(WS_CLOSE_TIMEOUT_S, ClientProtocol._on_ws_close_timeout)

    def _on_ws_close_timeout(self) -> None:
        self._end_tunnel()
        self._close(abort=True)

    def _on_ws_tick(self) -> None:
        limits = self.tunnel_limits
        if self.exchange.state is not State.TUNNEL or limits is None:
            return
        now = time.monotonic()
        if self.ws_active:
            self.ws_active = False
            self.last_ws_activity = now
        idle = now - self.last_ws_activity
        if idle >= limits.ws_idle_timeout_s:
            if self.relay is not None:
                self._apply(self.relay.going_away())
            else:
                self._end_tunnel()
                self._close()
            return
        if self.relay is not None and idle >= limits.ws_ping_interval_s * 0.9:
            ping = self.relay.ping_client()
            if ping and self.transport is not None:
                self.transport.write(ping)
        self._arm_tunnel(limits.ws_ping_interval_s, ClientProtocol._on_ws_tick)

    def _end_tunnel(self) -> None:
        conn = self.tunnel_upstream
        if conn is None:
            return
        self.tunnel_upstream = None
        self.listener.ws_gauge.dec()
        self.worker.metrics.websocket_ended(self.listener.name, time.monotonic() - self.ws_start)
        conn.discard()

    def go_idle_away(self, *, quiet_s: float = 0.0) -> None:
        """The listener was removed, or the worker drains: close if idle, that is, nothing of
        a request is buffered here or in the kernel, for ``quiet_s`` with no request started;
        otherwise the connection ends after its next answer (sent with Connection: close)."""
        exchange = self.exchange
        exchange.wind_down = True
        if not exchange.idle or self.transport is None:
            return
        if quiet_s:
            # A client between two requests of a busy keep-alive connection looks idle too;
            # closing it then loses the request it is writing. It gets Connection: close on
            # its next answer instead; only a connection quiet for quiet_s is closed here.
            now = self.worker.loop.time()
            seen = self.drain_idle
            if seen is None or seen[0] != exchange.served:
                self.drain_idle = (exchange.served, now)
                return
            if now - seen[1] < quiet_s:
                return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                pending = fcntl.ioctl(sock.fileno(), termios.FIONREAD, _INT_ZERO)
            except OSError:
                pending = _INT_ZERO
            if pending != _INT_ZERO:
                return  # a request is arriving: it is read, answered, then the connection ends
        self._close()

    def close_websocket(self) -> None:
        """Shutdown, at the drain deadline: Close 1001 to both sides of a tunnel, in either mode.

        A Close goes only where no frame is half written; the connections close after it.
        """
        if self.exchange.state is not State.TUNNEL:
            return
        if self.relay is not None:
            self._apply(self.relay.going_away())
            return
        to_client, to_upstream = self.tunnel_trackers or (None, None)
        if self.transport is not None and to_client is not None and not to_client.mid_frame:
            self.transport.write(close_frame(CLOSE_GOING_AWAY, masked=False))
        conn = self.tunnel_upstream
        if conn is not None and to_upstream is not None and not to_upstream.mid_frame:
            conn.write(close_frame(CLOSE_GOING_AWAY, masked=True))
        self.worker.metrics.websocket_close(self.listener.name, CLOSE_GOING_AWAY).inc()
        self._end_tunnel()
        self._close()

    def abandon(self) -> None:
        """Shutdown, at the deadline: answer a request that has no response yet (503), and
        reset what is still busy, so nothing is left to the master's SIGKILL."""
        if self.exchange.state is State.TUNNEL:
            self.close_websocket()
        else:
            self.exchange.abandon()


def _no_exchange_timer(delay: float) -> None:
    """``ClientProtocol.arm`` once the connection is a tunnel: the exchange arms nothing then."""
    raise RuntimeError("an exchange armed a timer in a WebSocket tunnel")


def _no_exchange_cancel() -> None:
    """``ClientProtocol.cancel_timer`` once the connection is a tunnel: nothing to cancel."""


_UPSTREAM_ERROR_TEXT = {
    "upstream_failed": "connect failed",
    "upstream_timeout": "timed out",
    "upstream_truncated": "response cut off",
}


def _log_exception(worker: WorkerState, message: str, exc: BaseException | None) -> None:
    """An ERROR with its traceback (JSON, ``exc``), at most one per message and exception type
    per ``LOG_INTERVAL_S``: a bug hit by every request must not flood the log."""
    key = ("exception", message, type(exc).__name__)
    left_out = worker.throttle.check(key, time.monotonic())
    if left_out is None:
        return
    if left_out:
        message += f" ({left_out} more since the last such line)"
    logger.error("%s", message, exc_info=exc)


def _on_loop_exception(worker: WorkerState, loop: Any, context: dict[str, Any]) -> None:
    """The event loop's exception handler: an exception that escaped a callback is logged as
    JSON, and the client connection it belongs to, if any, is ended (``crashed``)."""
    exc = context.get("exception")
    message = str(context.get("message") or "unhandled error in the event loop")
    error = exc if isinstance(exc, BaseException) else None
    protocol = context.get("protocol")
    if isinstance(error, OSError) and error.errno in (errno.EMFILE, errno.ENFILE):
        message = "out of descriptors: " + message
    _log_exception(worker, message, error)
    if isinstance(protocol, UpstreamProtocol):
        protocol = protocol.owner
    if isinstance(protocol, ClientProtocol):
        protocol.crashed(None)


class TlsClientProtocol(ClientProtocol):
    """A ``ClientProtocol`` on a TLS transport: it takes over its handshake's count."""

    __slots__ = ("handshake",)

    def __init__(self, worker: WorkerState, listener: Listener, handshake: TlsHandshake) -> None:
        super().__init__(worker, listener)
        self.handshake = handshake

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.handshake.done()  # the client is counted again, as a connection, at once
        super().connection_made(transport)


class TlsHandshake(asyncio.Protocol):
    """A connection on a TLS listener until its handshake ends.

    Counted against the listener's ``max_connections`` and ``max_connections_per_client``
    from accept; the event loop's ``SSLProtocol`` replaces it on the transport at once and
    closes the connection when the handshake fails or takes longer than the listener's
    ``handshake_timeout_s``. No task: the handshake's end is a future's callback.
    """

    __slots__ = ("counted", "listener", "peer", "server_tls", "transport", "worker")

    def __init__(self, worker: WorkerState, listener: Listener, server_tls: tls.ServerTls) -> None:
        self.worker = worker
        self.listener = listener
        #: the generation's contexts at accept: a reload does not change a handshake under way
        self.server_tls = server_tls
        self.peer = b""
        self.counted = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        listener = self.listener
        limits = listener.plan.limits
        peer = transport.get_extra_info("peername")
        self.peer = peer[0].encode() if peer else b""
        count = listener.per_client.get(self.peer, 0) + 1
        listener.per_client[self.peer] = count
        listener.handshakes.add(self)
        self.counted = True
        if len(listener.connections) + len(listener.handshakes) > limits.max_connections or (
            limits.max_connections_per_client and count > limits.max_connections_per_client
        ):
            self.done()
            transport.abort()
            return
        self.transport = transport
        worker = self.worker
        loop = worker.loop
        waiter: asyncio.Future[None] = loop.create_future()
        waiter.add_done_callback(self._ended)
        server_tls = self.server_tls
        protocol = worker.ssl_protocol(
            loop,
            TlsClientProtocol(worker, listener, self),
            server_tls.context,
            waiter,
            server_side=True,
            call_connection_made=True,
            ssl_handshake_timeout=server_tls.handshake_timeout_s,
            # a close waits this long at most for the client's close_notify (default 30 s)
            ssl_shutdown_timeout=server_tls.handshake_timeout_s,
        )
        transport.set_protocol(protocol)
        protocol.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        # not reached: the TLS protocol replaced this one in connection_made
        self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.done()

    def _ended(self, waiter: asyncio.Future[None]) -> None:
        """The handshake completed (the client protocol took over) or failed (closed)."""
        if not waiter.cancelled():
            waiter.exception()  # retrieved: a failed handshake is the client's business
        self.done()
        self.transport = None

    def done(self) -> None:
        """Stop counting this handshake (once)."""
        if not self.counted:
            return
        self.counted = False
        listener = self.listener
        listener.handshakes.discard(self)
        left = listener.per_client.get(self.peer, 1) - 1
        if left:
            listener.per_client[self.peer] = left
        else:
            listener.per_client.pop(self.peer, None)

    def abort(self) -> None:
        """Shutdown: give up a handshake under way."""
        transport = self.transport
        if transport is not None:
            transport.abort()
        self.done()


def _quiet_server_names(
    previous: Callable[[sys.UnraisableHookArgs], object],
) -> Callable[[sys.UnraisableHookArgs], None]:
    """``sys.unraisablehook`` without the SNI names Python cannot decode.

    The ssl module decodes the name a client sends before calling ``sni_callback``; a name
    that is not ASCII fails the handshake (as it should: RFC 6066 names are A-labels) and is
    reported as an "Exception ignored" traceback on stderr, one per handshake, which any client
    could repeat at will. Those are dropped; every other unraisable error goes on as before.
    """

    def hook(unraisable: sys.UnraisableHookArgs) -> None:
        if isinstance(unraisable.exc_value, UnicodeError) and isinstance(unraisable.object, bytes):
            return
        previous(unraisable)

    return hook


# -------------------------------------------------------------------- worker entry point


def run(
    config: Config,
    sockets: Mapping[str, socket.socket],
    admin_socket: socket.socket | None,
    channel_fd: int,
    generation: int = 1,
) -> None:
    """Serve ``sockets`` (listener name -> bound, listening socket) until SIGTERM has drained.

    ``channel_fd`` is the worker's end of the control channel (``control``): one heartbeat
    about every second from the event loop, the first meaning "accepting"; reload messages
    come the other way. ``config`` is configuration ``generation``. Raises if the worker cannot
    start.
    """
    import uvloop

    sys.unraisablehook = _quiet_server_names(sys.unraisablehook)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    snapshot = Snapshot.build(config, generation)
    contexts = tls.build(config)  # the files as they are now; the master checked them
    _configure_access_log(config)
    try:
        loop.run_until_complete(_serve(snapshot, sockets, admin_socket, channel_fd, loop, contexts))
    finally:
        _flush_access_log()  # a clean stop (or a failure) loses no access record
        loop.close()


def _configure_access_log(config: Config) -> None:
    """Follow ``config``'s ``[access_log]`` (``run --access-log`` wins over its path). A file
    that cannot be opened is an ERROR, and the records go on as before: a log file never stops
    a worker or a reload."""
    settings = config.access_log
    try:
        log.configure_access(settings.path, sample=settings.sample, query=settings.query.value)
    except OSError as err:
        logger.error(
            "%s: access_log.path: cannot open %r, the access log stays as it was: %s",
            config.source,
            settings.path,
            err,
        )


def _flush_access_log() -> None:
    access = log.access
    if access is not None:
        access.flush()


def _reopen_logs() -> None:
    """SIGUSR1, forwarded by the master after logrotate: reopen this worker's log files."""
    count = log.reopen()
    logger.info("SIGUSR1 received: reopened %d log files in worker %d", count, os.getpid())


async def _serve(
    snapshot: Snapshot,
    sockets: Mapping[str, socket.socket],
    admin_socket: socket.socket | None,
    channel_fd: int,
    loop: asyncio.AbstractEventLoop,
    contexts: tls.Contexts | None = None,
) -> None:
    worker = WorkerState(snapshot, loop, contexts)
    loop.set_exception_handler(functools.partial(_on_loop_exception, worker))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, lambda: None)  # the master decides; Ctrl-C reaches it
    loop.add_signal_handler(signal.SIGUSR1, _reopen_logs)
    channel = socket.socket(fileno=channel_fd)
    channel.setblocking(False)
    heartbeat_fd = channel.fileno()
    worker.channel = channel
    _take_initial_health(worker, channel)
    for name, sock in sockets.items():
        await _start_listener(worker, worker.listeners[name], sock)
    admin_server: asyncio.Server | None = None
    if admin_socket is not None:
        admin_server = await loop.create_server(
            lambda: admin.AdminProtocol(worker), sock=admin_socket
        )
    reloads: list[asyncio.Task[None]] = []

    def on_control() -> None:
        while True:
            try:
                message = control.receive(channel)
            except BlockingIOError:
                return
            except control.ControlError as err:
                # one bad message (the master's bug): skipped; the master replaces a worker
                # that does not acknowledge a generation
                logger.error("control message refused: %s", err)
                continue
            except OSError as err:
                logger.error("control channel failed: %s", err)
                message = None
            if message is None:  # the master is gone; PR_SET_PDEATHSIG sends SIGTERM
                loop.remove_reader(heartbeat_fd)
                return
            if isinstance(message, control.Reload):
                task = loop.create_task(_reload(worker, message, channel))
                reloads.append(task)
                task.add_done_callback(reloads.remove)
            elif isinstance(message, control.Health):
                worker.apply_health(message)

    loop.add_reader(heartbeat_fd, on_control)

    def heartbeat() -> None:
        with contextlib.suppress(BlockingIOError):  # the master is behind; it sees the next byte
            os.write(heartbeat_fd, b".")
        _flush_access_log()  # nginx's flush=1s: a record is at most about a second late
        worker.publish_metrics()  # likewise a counter
        now = time.monotonic()
        for pool in worker.pools.values():
            pool.expire_idle(now)
            pool.expire_marks(now)
        if not stop.is_set():
            loop.call_later(HEARTBEAT_INTERVAL_S, heartbeat)

    heartbeat()
    await stop.wait()
    loop.remove_reader(heartbeat_fd)
    await _drain(worker, heartbeat_fd)
    if admin_server is not None:
        admin_server.close()


def _take_initial_health(worker: WorkerState, channel: socket.socket) -> None:
    """Apply the health table the master queued in the channel before the fork, before the
    first accept. (It is the first message; the master always sends it.)"""
    try:
        message = control.receive(channel)
    except (BlockingIOError, control.ControlError):
        return
    if isinstance(message, control.Health):
        worker.apply_health(message)
    elif message is not None:  # not expected: the master sends the table first
        logger.error("first control message is not the health table: %r", type(message).__name__)


async def _drain(worker: WorkerState, heartbeat_fd: int) -> None:
    """SIGTERM: stop accepting; finish the requests in flight (answered with Connection:
    close); close idle keep-alives once nothing of a request is pending for them; let
    WebSockets run until the WebSocket deadline, then Close 1001 in both modes; at
    ``graceful_timeout_s`` answer or reset what is left, before the master's SIGKILL.

    The admin listener keeps answering meanwhile: /readyz says 503, so a load balancer sees
    the drain.
    """
    loop = worker.loop
    worker.draining = True
    for listener in worker.every_listener():
        if listener.server is not None:
            listener.server.close()
    graceful = worker.config.graceful_timeout_s
    start = loop.time()
    deadline = start + graceful
    websocket_deadline = start + graceful - min(WS_DRAIN_MARGIN_S, graceful / 2)
    while loop.time() < deadline:
        busy = False
        websockets_due = loop.time() >= websocket_deadline
        for listener in worker.every_listener():
            for conn in list(listener.connections):
                if conn.state is State.TUNNEL:
                    if websockets_due:
                        conn.close_websocket()
                else:
                    conn.go_idle_away(quiet_s=DRAIN_QUIET_S)
                busy = busy or conn.state is not State.CLOSED
        if not busy:
            break
        await asyncio.sleep(DRAIN_STEP_S)
        with contextlib.suppress(BlockingIOError):
            os.write(heartbeat_fd, b".")
        _flush_access_log()
    for listener in worker.every_listener():
        for conn in list(listener.connections):
            conn.abandon()
        for handshake in list(listener.handshakes):
            handshake.abort()
    for pool in worker.pools.values():
        pool.close_all()
    await asyncio.sleep(DRAIN_STEP_S)  # let the last answers go out
    for listener in worker.every_listener():
        for conn in list(listener.connections):
            transport = conn.transport
            # still flushing to a client that does not read: reset
            if transport is not None and transport.get_write_buffer_size():
                conn._close(abort=True)
    worker.publish_metrics()


def _close_all(sockets: dict[str, socket.socket]) -> None:
    for sock in sockets.values():
        sock.close()
    sockets.clear()


async def _start_listener(worker: WorkerState, listener: Listener, sock: socket.socket) -> None:
    def factory() -> asyncio.Protocol:
        server_tls = listener.tls
        if server_tls is None:
            return ClientProtocol(worker, listener)
        return TlsHandshake(worker, listener, server_tls)

    listener.server = await worker.loop.create_server(factory, sock=sock, backlog=2048)


async def _reload(worker: WorkerState, message: control.Reload, channel: socket.socket) -> None:
    """Apply configuration generation ``message.generation`` in place, then acknowledge it."""
    error = None
    try:
        await apply_reload(worker, message)
    except Exception as err:
        # Whatever went wrong, the master must hear of it: a generation never acknowledged
        # would hold every later reload back. It answers an error by replacing this worker.
        error = f"{type(err).__name__}: {err}"
        logger.exception("generation %d not applied", message.generation)
    else:
        logger.info("worker %d applied generation %d", os.getpid(), message.generation)
    try:
        control.send_ack(channel, control.Ack(message.generation, error))
    except OSError as err:  # the master is gone or stuck; its own checks take over
        logger.warning("cannot acknowledge generation %d: %s", message.generation, err)


async def apply_reload(worker: WorkerState, message: control.Reload) -> None:
    """Swap in the new snapshot between requests; no connection or WebSocket is closed.

    Requests under way keep the plan and the pool they started with. Listeners the generation
    removes stop accepting and their connections end after their current request (a WebSocket
    runs on until it closes); added listeners start on the sockets the master bound. An
    upstream whose spec changed gets a new pool; the old one retires as its connections come
    back.
    """
    sockets = dict(message.sockets)
    try:
        config = parse_config(tomllib.loads(message.config), message.source)
        snapshot = Snapshot.build(config, message.generation)
        contexts = tls.build(config)  # certificates re-read: new handshakes get the new ones
    except tomllib.TOMLDecodeError as err:
        _close_all(sockets)
        raise ConfigError(f"the configuration sent is not TOML: {err}", where="") from err
    except ConfigError:
        _close_all(sockets)
        raise
    changes = diff(worker.snapshot, snapshot)
    # Everything that can fail comes first, before anything changes: a reload is applied
    # whole or not at all, and no socket it brought is left open.
    added = [name for name in snapshot.listeners if name not in worker.listeners]
    missing = [name for name in added if name not in sockets]
    if missing:
        _close_all(sockets)
        raise ConfigError(f"no socket was sent for listeners {', '.join(missing)}", where="")
    servers: dict[str, Listener] = {}
    try:
        for name in added:
            listener = Listener(snapshot.listeners[name], worker.metrics)
            listener.tls = contexts.listeners.get(name)
            await _start_listener(worker, listener, sockets.pop(name))
            servers[name] = listener
    except OSError:
        for listener in servers.values():
            if listener.server is not None:
                listener.server.close()
        _close_all(sockets)
        raise
    _close_all(sockets)
    # From here on nothing fails.
    for name in changes.retire:
        pool = worker.pools.pop(name, None)
        if pool is not None:
            pool.retire()
    for name, spec in snapshot.upstreams.items():
        if name not in worker.pools:
            worker.metrics.prepare_upstream(name)
            worker.pools[name] = worker.new_pool(spec)
    for name in changes.close:
        closing = worker.listeners.pop(name, None)
        if closing is None:
            continue
        closing.retired = True
        worker.retired_listeners.append(closing)
        if closing.server is not None:
            closing.server.close()
        for conn in list(closing.connections):
            conn.go_idle_away()
    for name, plan in snapshot.listeners.items():
        current = worker.listeners.get(name)
        if current is not None:
            current.plan = plan
            current.tls = contexts.listeners.get(name)
    tls.install_upstream_contexts(contexts)
    worker.listeners.update(servers)
    worker.leg_class = leg_class_for(snapshot.http_parser)
    worker.default_hosts = snapshot.default_hosts
    worker.client_capacity = snapshot.client_capacity(worker.nofile)
    worker.snapshot = snapshot
    _configure_access_log(config)
