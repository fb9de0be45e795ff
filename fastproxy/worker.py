"""One worker process: a uvloop event loop serving every listener with callbacks.

[I/O] Imports everything below it (errors, config, policy, headers, http1, wsrelay, upstream,
metrics, admin). Runs only in a child forked by the master.

Theory of operation
-------------------
``ClientProtocol`` is one client connection. Its life is a loop of cycles (one request and its
response); no task is created per request, everything runs in transport callbacks:

1. ``HEAD``: bytes accumulate in a ``HeadScanner`` until a whole, well-formed head is there.
2. The head goes to a fresh client leg (h11 or httptools), the headers to
   ``headers.inspect_request`` and the target to the listener's ``PrefixTable``. A local
   answer (403, 400, 405...) is written at once; a forward takes an upstream connection from
   the pool (``UPSTREAM`` state).
3. ``FORWARD``: request body events are written to the upstream as they are parsed, response
   events to the client as they arrive. Each side's ``pause_writing`` pauses reading on the
   other, so a slow peer holds back the fast one instead of filling memory.
4. When both messages are complete the upstream connection returns to the pool and the unread
   client bytes go back to the scanner: pipelined requests are answered in order.
5. ``TUNNEL``: after a checked 101, ``wsrelay`` carries WebSocket frames both ways.

Every timeout is owned here, one per connection at a time, kept by the worker's ``Deadlines``
(one loop timer for all connections); the pure modules never read a clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import ipaddress
import logging
import os
import signal
import socket
import struct
import termios
import time
import tomllib
from collections.abc import Callable, Mapping
from typing import cast

import orjson

from fastproxy import admin, control, log
from fastproxy.config import Config, HttpParser, Limits, parse_config
from fastproxy.deadlines import Deadlines
from fastproxy.errors import ConfigError, FastproxyError
from fastproxy.exchange import Verdict, admit
from fastproxy.headers import RequestInfo, RequestRefused, response_headers
from fastproxy.http1 import (
    ClientLeg,
    Ev,
    HeadScanner,
    RequestHead,
    ResponseHead,
    ServerLeg,
    UpstreamBroken,
    local_response,
)
from fastproxy.metrics import WorkerMetrics
from fastproxy.policy import Decision
from fastproxy.runtime import ListenerPlan, Snapshot, diff
from fastproxy.upstream import UpstreamPool, UpstreamProtocol
from fastproxy.wsframe import CLOSE_GOING_AWAY, FrameTracker, close_frame
from fastproxy.wsrelay import RelayOutput, WebSocketRelay, upgrade_accepted

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 1.0
WRITE_HIGH_WATER_BYTES = 256 * 1024
_LINGER_RESET = struct.pack("ii", 1, 0)
#: how long a relayed WebSocket Close may wait for the other side's Close
WS_CLOSE_TIMEOUT_S = 10.0
#: on SIGTERM, WebSockets get their Close 1001 this long before ``graceful_timeout_s`` (at most
#: half of it), which leaves the close handshake and the last answers time to go out
WS_DRAIN_MARGIN_S = 5.0
#: how often the drain looks at the connections
DRAIN_STEP_S = 0.05
#: on SIGTERM, an idle keep-alive connection is closed once it has been quiet this long
DRAIN_QUIET_S = 0.5
_INT_ZERO = bytes(4)
#: a forwarded request that fastproxy ends up answering itself (502, 504...) is an error
_FAILED_IF_ANSWERED_HERE = frozenset({Verdict.FORWARD, Verdict.REWRITE, Verdict.WEBSOCKET})
#: requests that may be sent again when a pooled connection turns out to be closed
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"})


class State(enum.Enum):
    #: waiting for (or scanning) the next request head
    HEAD = "head"
    #: a forward is waiting for an upstream connection
    UPSTREAM = "upstream"
    #: request and response are streaming
    FORWARD = "forward"
    #: WebSocket frames are relayed
    TUNNEL = "tunnel"
    #: the connection is closing; input is ignored
    CLOSED = "closed"


class Listener:
    """One listener in this worker: its current plan, its server, connections and counters.

    ``plan`` is replaced by a reload; a request pins the plan it started with (``Cycle.plan``).
    """

    __slots__ = (
        "conn_gauge",
        "connections",
        "name",
        "per_client",
        "plan",
        "retired",
        "server",
        "ws_gauge",
    )

    def __init__(self, plan: ListenerPlan, metrics: WorkerMetrics) -> None:
        self.plan = plan
        self.name = plan.name
        self.server: asyncio.Server | None = None
        #: removed by a reload: no longer accepting; its connections end after their request
        self.retired = False
        self.connections: set[ClientProtocol] = set()
        self.per_client: dict[bytes, int] = {}
        self.conn_gauge = metrics.connection_gauge(plan.name)
        self.ws_gauge = metrics.websocket_gauge(plan.name)


def leg_class_for(parser: HttpParser) -> Callable[[int], ClientLeg]:
    if parser is HttpParser.HTTPTOOLS:
        from fastproxy.http1_httptools import HttptoolsLeg  # an optional extra

        return HttptoolsLeg
    return ServerLeg


class WorkerState:
    """Shared by every connection of the worker: the current snapshot and what it runs on."""

    def __init__(self, snapshot: Snapshot, loop: asyncio.AbstractEventLoop) -> None:
        self.snapshot = snapshot
        self.loop = loop
        self.metrics = WorkerMetrics()
        #: the current pool of each upstream; a reload that changes a spec retires its pool
        self.pools = {name: UpstreamPool(u, loop) for name, u in snapshot.upstreams.items()}
        self.listeners = {
            name: Listener(plan, self.metrics) for name, plan in snapshot.listeners.items()
        }
        #: listeners a reload removed, kept while their connections finish
        self.retired_listeners: list[Listener] = []
        self.draining = False
        self.deadlines = Deadlines(loop)
        self.leg_class = leg_class_for(snapshot.http_parser)
        self._rid_prefix = os.urandom(6).hex().encode()
        self._rid_counter = 0

    @property
    def config(self) -> Config:
        return self.snapshot.config

    def routes_json(self) -> bytes:
        """Admin ``/routes``: this worker's current generation, compiled."""
        return orjson.dumps(self.snapshot.routes(), option=orjson.OPT_INDENT_2)

    def every_listener(self) -> list[Listener]:
        """Current listeners and those a reload removed that still have connections."""
        self.retired_listeners = [lis for lis in self.retired_listeners if lis.connections]
        return [*self.listeners.values(), *self.retired_listeners]

    def next_request_id(self) -> bytes:
        self._rid_counter += 1
        return b"%s%08x" % (self._rid_prefix, self._rid_counter)


def error_body(code: str, request_id: bytes) -> bytes:
    return orjson.dumps({"error": code, "request_id": request_id.decode("ascii")})


class Cycle:
    """One request/response exchange on a client connection."""

    __slots__ = (
        "body_bytes",
        "decision",
        "head",
        "info",
        "last_body",
        "last_read",
        "leg",
        "plan",
        "pool",
        "request_done",
        "request_id",
        "response_done",
        "response_started",
        "retried",
        "sent_head",
        "start",
        "status",
        "upstream",
        "upstream_name",
        "verdict",
        "websocket",
    )

    def __init__(self, leg: ClientLeg, head: RequestHead, start: float, plan: ListenerPlan) -> None:
        self.leg = leg
        self.head = head
        self.start = start
        #: the listener's plan when the request began: the whole exchange follows it
        self.plan = plan
        #: the upstream pool chosen at the start (a reload may retire it meanwhile)
        self.pool: UpstreamPool | None = None
        self.info: RequestInfo | None = None
        self.decision: Decision | None = None
        self.request_id = b""
        self.verdict = Verdict.REJECT
        self.status = 0
        self.upstream: UpstreamProtocol | None = None
        self.upstream_name = ""
        self.sent_head: tuple[bytes, bytes, list[tuple[bytes, bytes]]] | None = None
        self.body_bytes = 0
        self.last_read = 0.0
        self.last_body = 0.0
        self.request_done = False
        self.response_started = False
        self.response_done = False
        self.websocket = False
        self.retried = False


class ClientProtocol(asyncio.Protocol):
    """One client connection on one listener."""

    __slots__ = (
        "blocked_since",
        "client_eof",
        "client_write_blocked",
        "cycle",
        "deadline_tick",
        "drain_idle",
        "last_ws_activity",
        "listener",
        "peer",
        "pump_yielded",
        "read_paused",
        "relay",
        "scanner",
        "served",
        "state",
        "timer",
        "transport",
        "trust_plan",
        "trusted",
        "tunnel_limits",
        "tunnel_trackers",
        "tunnel_upstream",
        "upstream_write_blocked",
        "worker",
        "ws_active",
        "ws_closing",
    )

    def __init__(self, worker: WorkerState, listener: Listener) -> None:
        limits = listener.plan.limits
        self.worker = worker
        self.listener = listener
        self.scanner = HeadScanner(limits.max_head_bytes, limits.max_headers, limits.max_uri_bytes)
        self.state = State.HEAD
        self.cycle: Cycle | None = None
        self.transport: asyncio.Transport | None = None
        #: the client's address, as bytes (its str is ``client_ip``)
        self.peer = b""
        #: the method to call when the armed timeout expires (None: no timeout armed); kept
        #: unbound, so arming creates no bound-method object
        self.timer: Callable[[ClientProtocol], None] | None = None
        self.deadline_tick = 0  # owned by ``worker.deadlines``
        self.read_paused = False
        #: a read full of tiny chunks is being worked through a slice per loop pass
        self.pump_yielded = False
        self.upstream_write_blocked = False
        self.client_write_blocked = False
        self.blocked_since = 0.0
        self.trusted = False
        #: the plan ``trusted`` was decided with (a reload may change ``trusted_proxies``)
        self.trust_plan: ListenerPlan | None = None
        #: the limits of the plan a WebSocket tunnel opened with
        self.tunnel_limits: Limits | None = None
        #: requests started on this connection
        self.served = 0
        #: draining: ``(served, loop time)`` when the connection was first seen idle
        self.drain_idle: tuple[int, float] | None = None
        #: ``tunnel`` mode: frame boundaries towards the client and towards the upstream
        self.tunnel_trackers: tuple[FrameTracker, FrameTracker] | None = None
        #: the client half-closed after a complete request: answer what it sent, then close
        self.client_eof = False
        #: when the tunnel was last seen active, as of the last keep-alive tick
        self.last_ws_activity = 0.0
        #: a frame went through since the last keep-alive tick (cheaper than a clock read each)
        self.ws_active = False
        self.relay: WebSocketRelay | None = None
        self.tunnel_upstream: UpstreamProtocol | None = None
        self.ws_closing = False

    @property
    def client_ip(self) -> str:
        return self.peer.decode()

    # ---------------------------------------------------------------- transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport = transport
        listener = self.listener
        plan = listener.plan
        limits = plan.limits
        peer = transport.get_extra_info("peername")
        self.peer = peer[0].encode() if peer else b""
        self.trusted = self._is_trusted(plan)
        self.trust_plan = plan
        count = listener.per_client.get(self.peer, 0) + 1
        listener.per_client[self.peer] = count
        listener.connections.add(self)
        listener.conn_gauge.inc()
        if len(listener.connections) > limits.max_connections or (
            limits.max_connections_per_client and count > limits.max_connections_per_client
        ):
            self.state = State.CLOSED
            transport.abort()
            return
        # (uvloop sets TCP_NODELAY on every TCP transport itself)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER_BYTES)
        self._arm(limits.header_timeout_s, ClientProtocol._on_head_timeout)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state is State.HEAD:
            first = len(self.scanner) == 0 and self.cycle is None
            self.scanner.feed(data)
            self._process()
            if first and self.state is State.HEAD and self.cycle is None and len(self.scanner):
                # the first bytes of a head, not yet all of it: the header timeout replaces the
                # keep-alive one (a head that arrived whole needs no timer of its own)
                self._arm(
                    self.listener.plan.limits.header_timeout_s, ClientProtocol._on_head_timeout
                )
        elif state is State.FORWARD or state is State.UPSTREAM:
            cycle = self.cycle
            assert cycle is not None
            cycle.leg.feed(data)
            if state is State.FORWARD:
                self._pump_request()
            self._update_reading()
        elif state is State.TUNNEL:
            self._tunnel_from_client(data)

    def eof_received(self) -> bool | None:
        state = self.state
        if state is State.TUNNEL and self.relay is None and self.tunnel_upstream is not None:
            self.tunnel_upstream.close()
        cycle = self.cycle
        if (
            (state is State.FORWARD or state is State.UPSTREAM)
            and cycle is not None
            and cycle.request_done
        ):
            # A half-close after a whole request: the answer still goes out (and any complete
            # requests pipelined before the FIN), then the connection closes.
            self.client_eof = True
            return True
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        listener = self.listener
        listener.connections.discard(self)
        listener.conn_gauge.dec()
        ip = self.peer
        left = listener.per_client.get(ip, 1) - 1
        if left:
            listener.per_client[ip] = left
        else:
            listener.per_client.pop(ip, None)
        self._cancel_timer()
        previous = self.state
        self.state = State.CLOSED
        cycle = self.cycle
        if cycle is not None and cycle.upstream is not None:
            self._drop_upstream(cycle)
            if not cycle.response_done:
                self._finish_metrics(cycle, 499 if not cycle.status else cycle.status)
        if previous is State.TUNNEL:
            self._end_tunnel()
        self.transport = None

    def pause_writing(self) -> None:
        self.client_write_blocked = True
        self.blocked_since = self.worker.loop.time()
        cycle = self.cycle
        if cycle is not None and cycle.upstream is not None and cycle.upstream.transport:
            cycle.upstream.transport.pause_reading()
        elif self.tunnel_upstream is not None and self.tunnel_upstream.transport:
            self.tunnel_upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client_write_blocked = False
        cycle = self.cycle
        if cycle is not None and cycle.upstream is not None and cycle.upstream.transport:
            cycle.upstream.transport.resume_reading()
        elif self.tunnel_upstream is not None and self.tunnel_upstream.transport:
            self.tunnel_upstream.transport.resume_reading()
        if self.state is State.HEAD:
            # local replies were held back while the client did not read them
            self._update_reading()
            self.worker.loop.call_soon(self._process)

    # ---------------------------------------------------------------- timers

    def _arm(self, delay: float, callback: Callable[[ClientProtocol], None]) -> None:
        """Run ``callback(self)`` in ``delay`` seconds, replacing the timeout armed before."""
        self.timer = callback
        self.worker.deadlines.arm(self, delay)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer = None
            self.worker.deadlines.cancel(self)

    def on_deadline(self) -> None:
        callback = self.timer
        if callback is not None:
            self.timer = None
            callback(self)

    def _on_head_timeout(self) -> None:
        """Header timeout (bytes of a head pending) or keep-alive timeout (nothing pending)."""
        if self.state is not State.HEAD:
            return
        if self.client_write_blocked:
            self._close(abort=True)  # it does not even read our replies
            return
        if len(self.scanner) == 0:
            self._close()  # an idle connection: close quietly, as nginx does
            return
        self._local_reply_raw(408, "header_timeout")

    def _on_upstream_read_timeout(self) -> None:
        """No upstream byte for ``read_timeout_s`` in the middle of a response body."""
        cycle = self.cycle
        if cycle is None or self.state is not State.FORWARD or cycle.response_done:
            return
        assert cycle.pool is not None
        timeout = cycle.pool.config.read_timeout_s
        now = self.worker.loop.time()
        if self.client_write_blocked:
            # the client is the slow side: its own send timeout applies, not the upstream's
            send_timeout = cycle.plan.limits.send_timeout_s
            if now - self.blocked_since >= send_timeout:
                self._drop_upstream(cycle)
                self._finish_metrics(cycle, cycle.status)
                self._close(abort=True)
                return
            self._arm(min(timeout, send_timeout), ClientProtocol._on_upstream_read_timeout)
            return
        quiet = now - cycle.last_read
        if quiet < timeout:
            self._arm(timeout - quiet, ClientProtocol._on_upstream_read_timeout)
            return
        self._upstream_failed(cycle, "upstream_timeout", 504)

    def _on_body_timeout(self) -> None:
        """The request body stalled: the client stopped sending, or the upstream reading."""
        cycle = self.cycle
        if cycle is None or self.state is not State.FORWARD or cycle.request_done:
            return
        timeout = cycle.plan.limits.body_timeout_s
        quiet = self.worker.loop.time() - cycle.last_body
        if quiet < timeout:
            self._arm(timeout - quiet, ClientProtocol._on_body_timeout)
            return
        if self.upstream_write_blocked:
            self._upstream_failed(cycle, "upstream_timeout", 504)
            return
        self._drop_upstream(cycle)
        if cycle.response_started:
            self._finish_metrics(cycle, cycle.status)
            self._close(abort=True)
        else:
            self._local_reply(cycle, 408, "body_timeout", close=True)

    def _on_upstream_timeout(self) -> None:
        cycle = self.cycle
        if cycle is None or self.state is not State.FORWARD or cycle.response_started:
            return
        self._upstream_failed(cycle, "upstream_timeout", 504)

    # ---------------------------------------------------------------- reading control

    def _update_reading(self) -> None:
        """Read from the client only while its bytes can go somewhere.

        Paused while the upstream cannot take more, while waiting for an upstream connection,
        and once bytes arrive after the complete request (pipelined requests: they wait in the
        kernel until this cycle ends, so buffering stays bounded by one read). Reading is not
        paused merely because the request is complete: on a keep-alive connection that would
        cost two reading-state changes per request.
        """
        transport = self.transport
        if transport is None:
            return
        cycle = self.cycle
        want_pause = (
            self.pump_yielded
            or self.upstream_write_blocked
            or (self.client_write_blocked and self.state is State.HEAD)
            or (
                cycle is not None
                and (
                    self.state is State.UPSTREAM
                    or (cycle.request_done and len(cycle.leg.trailing) > 0)
                )
            )
        )
        if want_pause and not self.read_paused:
            self.read_paused = True
            transport.pause_reading()
        elif not want_pause and self.read_paused:
            self.read_paused = False
            transport.resume_reading()

    def on_upstream_pause_writing(self) -> None:
        self.upstream_write_blocked = True
        self._update_reading()

    def on_upstream_resume_writing(self) -> None:
        self.upstream_write_blocked = False
        self._update_reading()

    # ---------------------------------------------------------------- request cycle

    def _process(self) -> None:
        """Start as many cycles as the buffered bytes allow (pipelining, answered in order)."""
        while self.state is State.HEAD:
            if self.client_write_blocked:
                # answers pile up unread: stop here, resume_writing() starts again
                self._update_reading()
                return
            try:
                taken = self.scanner.maybe_take_head()
            except RequestRefused as refused:
                self._local_reply_raw(refused.status, refused.code)
                return
            if taken is None:
                if self.client_eof:
                    self._close()  # the client half-closed: nothing more can arrive
                return
            head_bytes, rest = taken
            plan = self.listener.plan
            leg = self.worker.leg_class(plan.limits.max_head_bytes)
            try:
                leg.feed_head(head_bytes)
                if rest:
                    leg.feed(rest)
                event = leg.next_event()
            except RequestRefused as refused:
                self._local_reply_raw(refused.status, refused.code)
                return
            assert isinstance(event, RequestHead)
            self._cancel_timer()
            cycle = Cycle(leg, event, time.monotonic(), plan)
            self.served += 1
            self.cycle = cycle
            self._start(cycle)

    def _start(self, cycle: Cycle) -> None:
        plan = cycle.plan
        if plan is not self.trust_plan:  # a reload: trusted_proxies may have changed
            self.trusted = self._is_trusted(plan)
            self.trust_plan = plan
        worker = self.worker
        admission = admit(
            cycle.head,
            plan,
            trusted=self.trusted,
            peer=self.peer,
            new_request_id=worker.next_request_id,
            default_hosts=worker.snapshot.default_hosts,
        )
        cycle.info = admission.info
        cycle.request_id = admission.request_id
        cycle.decision = decision = admission.decision
        verdict = cycle.verdict = admission.verdict
        if admission.status:
            self._local_reply(
                cycle,
                admission.status,
                admission.code,
                close=admission.close,
                allow=admission.allow,
            )
            return
        assert decision is not None
        if verdict is Verdict.WOULD_DENY and logger.isEnabledFor(logging.INFO):
            name = self.listener.name
            logger.info(
                "would deny %s on listener %s (report mode)",
                decision.path[:200].decode("ascii", "backslashreplace"),
                name,
                extra={"listener": name, "decision": "would_deny"},
            )
        cycle.websocket = admission.websocket
        upstream_name = cycle.upstream_name = admission.upstream
        cycle.pool = worker.pools[upstream_name]
        cycle.sent_head = (cycle.head.method, decision.target, admission.headers)
        self._acquire(cycle, fresh=False)

    def _is_trusted(self, plan: ListenerPlan) -> bool:
        networks = plan.config.trusted_proxies
        if not networks:
            return False
        try:
            address = ipaddress.ip_address(self.client_ip)
        except ValueError:
            return False
        return any(address in net for net in networks)

    def _acquire(self, cycle: Cycle, *, fresh: bool) -> None:
        self.state = State.UPSTREAM
        pool = cycle.pool
        assert pool is not None
        conn = pool.acquire(self, fresh=fresh)
        if conn is not None:
            self.on_upstream_ready(conn)
        else:
            self._update_reading()

    # ---------------------------------------------------------------- upstream callbacks

    def on_upstream_ready(self, conn: UpstreamProtocol) -> None:
        cycle = self.cycle
        if self.state is not State.UPSTREAM or cycle is None or cycle.sent_head is None:
            # the client went away while we were connecting
            conn.server.pool.release(conn)
            return
        cycle.upstream = conn
        self.state = State.FORWARD
        if self.client_write_blocked and conn.transport is not None:
            conn.transport.pause_reading()
        method, target, headers = cycle.sent_head
        conn.write(conn.leg.request(method, target, headers))
        if cycle.request_done:
            # a retry: the body-less request was read completely on the first attempt
            conn.write(conn.leg.end())
            self._arm(
                conn.server.pool.config.first_byte_timeout_s, ClientProtocol._on_upstream_timeout
            )
            return
        self._pump_request()
        if self.state is State.FORWARD:
            if not cycle.request_done:
                cycle.last_body = self.worker.loop.time()
                self._arm(cycle.plan.limits.body_timeout_s, ClientProtocol._on_body_timeout)
            self._update_reading()

    def on_upstream_failed(self, code: str) -> None:
        cycle = self.cycle
        if self.state is not State.UPSTREAM or cycle is None:
            return
        self.worker.metrics.upstream_errors.labels(cycle.upstream_name, code).inc()
        self._local_reply(cycle, 504 if code == "upstream_timeout" else 502, code, close=True)

    def on_upstream_data(self, data: bytes) -> None:
        if self.state is State.TUNNEL:
            self._tunnel_from_upstream(data)
            return
        cycle = self.cycle
        if cycle is None or cycle.upstream is None:
            return
        if data:
            cycle.upstream.leg.feed(data)
            cycle.last_read = self.worker.loop.time()
        self._pump_response(cycle)

    def on_upstream_lost(self) -> None:
        if self.state is State.TUNNEL:
            self._end_tunnel()
            self._close()
            return
        cycle = self.cycle
        if cycle is None or cycle.upstream is None or self.state is not State.FORWARD:
            return
        cycle.upstream.leg.feed_eof()
        self._pump_response(cycle)
        if self.state is State.FORWARD and not cycle.response_done and cycle.upstream is not None:
            self._upstream_broke(cycle)

    def _upstream_broke(self, cycle: Cycle) -> None:
        """The upstream closed, or broke HTTP, before a complete response."""
        conn = cycle.upstream
        self._drop_upstream(cycle)
        info = cycle.info
        if (
            conn is not None
            and conn.reused
            and not conn.leg.received_any
            and not cycle.response_started
            and not cycle.retried
            and info is not None
            and not info.has_body
            and cycle.head.method in IDEMPOTENT_METHODS
        ):
            # A keep-alive connection the backend closed while it sat idle in the pool: the
            # request cannot have been processed, so it is sent once more on a new connection
            # (nginx's proxy_next_upstream for idempotent requests).
            cycle.retried = True
            self._acquire(cycle, fresh=True)
            return
        self._upstream_failed(cycle, "upstream_failed", 502)

    def _upstream_failed(self, cycle: Cycle, code: str, status: int) -> None:
        self.worker.metrics.upstream_errors.labels(cycle.upstream_name, code).inc()
        if cycle.upstream is not None:
            self._drop_upstream(cycle)
        if cycle.response_started:
            self._finish_metrics(cycle, cycle.status)
            self._close(abort=True)
        else:
            self._local_reply(cycle, status, code, close=True)

    def _drop_upstream(self, cycle: Cycle) -> None:
        conn = cycle.upstream
        cycle.upstream = None
        self.upstream_write_blocked = False
        if conn is not None:
            conn.server.pool.discard(conn)

    # ---------------------------------------------------------------- streaming

    def _pump_request(self) -> None:
        """Move parsed request body events from the client to the upstream."""
        cycle = self.cycle
        assert cycle is not None
        conn = cycle.upstream
        if conn is None or cycle.request_done:
            return
        leg = cycle.leg
        limit = cycle.decision.rule.max_body_bytes if cycle.decision else 0
        while True:
            try:
                event = leg.next_event()
            except RequestRefused as refused:
                self._drop_upstream(cycle)
                if cycle.response_started:
                    self._close(abort=True)
                else:
                    self._local_reply(cycle, refused.status, refused.code, close=True)
                return
            if type(event) is bytes:
                cycle.body_bytes += len(event)
                cycle.last_body = self.worker.loop.time()
                if cycle.body_bytes > limit:
                    self._drop_upstream(cycle)
                    if cycle.response_started:
                        self._close(abort=True)
                    else:
                        self._local_reply(cycle, 413, "body_too_large", close=True)
                    return
                conn.writelines(conn.leg.body(event))
                if leg.capped:
                    # a read of many tiny chunks: one slice per loop pass, so that other
                    # connections of this worker are served in between (SPEC 7)
                    self._yield_request_pump()
                    return
            elif event is Ev.END:
                conn.write(conn.leg.end())
                cycle.request_done = True
                if not cycle.response_started:
                    self._arm(
                        conn.server.pool.config.first_byte_timeout_s,
                        ClientProtocol._on_upstream_timeout,
                    )
                if cycle.response_done:
                    self._finish_cycle(cycle)
                return
            else:
                return  # NEED_DATA or PAUSED

    def _yield_request_pump(self) -> None:
        self.pump_yielded = True
        self._update_reading()
        self.worker.loop.call_soon(self._resume_request_pump)

    def _resume_request_pump(self) -> None:
        self.pump_yielded = False
        if self.state is State.FORWARD and self.cycle is not None:
            self._pump_request()
        if self.state is not State.CLOSED and not self.pump_yielded:
            self._update_reading()

    def _yield_response_pump(self, cycle: Cycle) -> None:
        conn = cycle.upstream
        if conn is not None and conn.transport is not None:
            conn.transport.pause_reading()
        self.worker.loop.call_soon(self._resume_response_pump, cycle)

    def _resume_response_pump(self, cycle: Cycle) -> None:
        conn = cycle.upstream
        if cycle is not self.cycle or conn is None or self.state is not State.FORWARD:
            return
        if conn.transport is not None and not self.client_write_blocked:
            conn.transport.resume_reading()
        self._pump_response(cycle)

    def _pump_response(self, cycle: Cycle) -> None:
        """Move parsed response events from the upstream to the client.

        What one call produces (typically head, body and end together) is written with one
        ``writelines``: one system call per response instead of one per event.
        """
        conn = cycle.upstream
        if conn is None:
            return
        leg = conn.leg
        client_leg = cycle.leg
        out: list[bytes] = []
        # the final head is in ``out``, not yet written: a failure now can still be a 502
        head_unsent = False
        while True:
            try:
                event = leg.next_event()
                if event is Ev.END and head_unsent and leg.overrun:
                    # the whole response and bytes after it came in one read: refused like
                    # the bytes after a response without a body (a second response appended)
                    raise UpstreamBroken("bytes after the complete response")
            except UpstreamBroken as broken:
                if logger.isEnabledFor(logging.DEBUG):
                    logger.debug("upstream %s broke: %s", cycle.upstream_name, broken)
                if head_unsent:
                    cycle.response_started = False
                    client_leg.discard_response_head()
                self._upstream_broke(cycle)
                return
            try:
                if type(event) is bytes:
                    out += client_leg.body(event)
                    if leg.capped:
                        # a read of many tiny chunks: one slice per loop pass (SPEC 7)
                        self._flush(out)
                        self._yield_response_pump(cycle)
                        return
                    continue
                if type(event) is ResponseHead:
                    if event.status == 101:
                        self._flush(out)
                        self._on_switch(cycle, event)
                        return
                    out.append(self._response_head(cycle, event))
                    head_unsent = cycle.response_started
                    continue
                if event is Ev.END:
                    out.append(client_leg.end())
            except UpstreamBroken:  # the body disagrees with the Content-Length relayed
                self._upstream_failed(cycle, "upstream_failed", 502)
                return
            self._flush(out)
            if event is not Ev.END:
                if cycle.response_started and self.timer is None and self.state is State.FORWARD:
                    self._arm(
                        conn.server.pool.config.read_timeout_s,
                        ClientProtocol._on_upstream_read_timeout,
                    )
                return  # NEED_DATA, PAUSED, SWITCHED
            cycle.response_done = True
            if cycle.request_done:
                self._finish_cycle(cycle)
            else:
                # the upstream answered before the request body ended: the rest of the
                # body cannot be resynchronised, so this connection ends here
                self._finish_metrics(cycle, cycle.status)
                self._drop_upstream(cycle)
                self._close()
            return

    def _flush(self, out: list[bytes]) -> None:
        if out and self.transport is not None:
            self.transport.writelines(out)

    def _response_head(self, cycle: Cycle, event: ResponseHead) -> bytes:
        """The bytes of a relayed response head (``b""`` for a 1xx that is not relayed)."""
        status = event.status
        if status < 200:
            if status == 100 and not cycle.request_done:
                headers = response_headers(event.headers, request_id=cycle.request_id)
                return cycle.leg.response_head(100, headers, event.reason)
            return b""
        cycle.status = status
        cycle.response_started = True
        upstream = cycle.upstream
        assert upstream is not None
        cycle.last_read = self.worker.loop.time()
        # the first-byte timer is done; the read timer is armed only if the body goes on
        # after this read (_pump_response), so a small response costs no timer at all
        self._cancel_timer()
        lines = event.relayed
        lines.append(b"X-Request-Id: " + cycle.request_id)
        return cycle.leg.response_head_lines(
            status,
            lines,
            event.reason,
            length=upstream.leg.declared_length,
            close=self.worker.draining or self.listener.retired,
        )

    def _on_switch(self, cycle: Cycle, event: ResponseHead) -> bool:
        conn = cycle.upstream
        info = cycle.info
        assert conn is not None and info is not None
        if (
            not cycle.websocket
            or info.ws_key is None
            or not upgrade_accepted(info.ws_key, event.headers)
        ):
            self._upstream_failed(cycle, "upstream_failed", 502)
            return True
        self._cancel_timer()
        cycle.status = 101
        cycle.response_started = True
        headers = response_headers(event.headers, request_id=cycle.request_id, keep_upgrade=True)
        transport = self.transport
        assert transport is not None
        transport.write(cycle.leg.response_head(101, headers, event.reason))
        client_rest = cycle.leg.trailing
        upstream_rest = conn.leg.trailing
        self._finish_metrics(cycle, 101)
        cycle.upstream = None
        self.cycle = None
        self.state = State.TUNNEL
        self.tunnel_upstream = conn
        self.listener.ws_gauge.inc()
        plan = cycle.plan
        limits = plan.limits
        self.tunnel_limits = limits
        if plan.validate_frames:
            self.relay = WebSocketRelay(limits.ws_max_message_bytes)
        else:
            self.tunnel_trackers = (FrameTracker(), FrameTracker())
        self._update_reading_tunnel()
        self._arm(limits.ws_ping_interval_s, ClientProtocol._on_ws_tick)
        self.last_ws_activity = time.monotonic()
        if upstream_rest:
            self._tunnel_from_upstream(upstream_rest)
        if client_rest and self.state is State.TUNNEL:
            self._tunnel_from_client(client_rest)
        return True

    def _finish_cycle(self, cycle: Cycle) -> None:
        """Both messages are complete: recycle the upstream, then read the next request."""
        self._cancel_timer()
        conn = cycle.upstream
        cycle.upstream = None
        self.upstream_write_blocked = False
        if conn is not None:
            if conn.leg.overrun:
                # Bytes after a complete response, found once it was relayed: the upstream is
                # out of step (a second response appended). The pool drops the connection, and
                # this client's connection ends with this response, so nothing read after it
                # can ever be taken for the answer to a later request.
                cycle.leg.close_after_response()
            conn.server.pool.release(conn)
        self._finish_metrics(cycle, cycle.status)
        self._next_cycle(cycle)

    def _next_cycle(self, cycle: Cycle) -> None:
        self.cycle = None
        if self.transport is None or self.state is State.CLOSED:
            return
        # Draining, a response sent without Connection: close (it started before the drain)
        # leaves the client free to send another request: that one is read and answered
        # with Connection: close; a quiet connection is closed by the drain itself.
        if not cycle.leg.keep_alive:
            self._close()
            return
        self._read_next(cycle)
        if self.state is State.HEAD and len(self.scanner):
            # pipelined bytes: parse them on the next loop pass (no recursion per request)
            self.worker.loop.call_soon(self._process)

    def _read_next(self, cycle: Cycle) -> None:
        """Hand the bytes after ``cycle`` back to the scanner and wait for the next head."""
        rest = cycle.leg.trailing
        self.state = State.HEAD
        plan = self.listener.plan
        limits = plan.limits
        if plan is not cycle.plan:  # a reload: the next head is read with the new limits
            scanner = self.scanner
            scanner.max_head_bytes = limits.max_head_bytes
            scanner.max_headers = limits.max_headers
            scanner.max_uri_bytes = limits.max_uri_bytes
        if rest:
            self.scanner.feed(rest)
        if len(self.scanner):
            self._arm(limits.header_timeout_s, ClientProtocol._on_head_timeout)
        elif self.client_eof:
            self._close()  # half-closed and everything it sent is answered
            return
        else:
            self._arm(limits.keepalive_timeout_s, ClientProtocol._on_head_timeout)
        self._update_reading()

    def _finish_metrics(self, cycle: Cycle, status: int) -> None:
        rule = cycle.decision.rule.name if cycle.decision is not None else "-"
        self.worker.metrics.count_request(self.listener.name, rule, cycle.verdict.value, status)
        access = log.access
        if access is not None:
            self._access_log(access, cycle, status)

    def _access_log(self, access: log.AccessLog, cycle: Cycle, status: int) -> None:
        """One record per request; the query string, cookies and credentials are never logged."""
        decision = cycle.decision
        info = cycle.info
        access.write(
            {
                "request_id": cycle.request_id.decode("ascii", "replace"),
                "client_ip": self.client_ip,
                "method": cycle.head.method.decode("ascii", "replace"),
                "host": (info.host or b"").decode("ascii", "replace")[:200] if info else "",
                "path": (decision.path if decision else b"").decode("ascii", "replace")[:2048],
                "listener": self.listener.name,
                "rule": decision.rule.name if decision else "-",
                "decision": cycle.verdict.value,
                "status": status,
                "duration_s": round(time.monotonic() - cycle.start, 6),
                "upstream": cycle.upstream_name,
                "reason": decision.refusal.value if decision and decision.refusal else None,
            }
        )

    # ---------------------------------------------------------------- local replies

    def _local_reply(
        self, cycle: Cycle, status: int, code: str, *, close: bool, allow: bytes = b""
    ) -> None:
        """Answer ``cycle`` ourselves with a small JSON body; never echoes client input."""
        if cycle.upstream is not None:
            self._drop_upstream(cycle)
        cycle.status = status
        if cycle.verdict in _FAILED_IF_ANSWERED_HERE:
            cycle.verdict = Verdict.ERROR
        info = cycle.info
        if (
            cycle.head.http_version != b"1.1"
            or info is None
            or b"close" in info.connection
            or self.worker.draining
            or self.listener.retired
        ):
            close = True
        if not close:
            # the request has no body; read its end so the next request can follow
            try:
                event = cycle.leg.next_event()
            except RequestRefused:
                close = True
            else:
                close = event is not Ev.END and event is not Ev.PAUSED
        if cycle.leg.response_started:
            self._finish_metrics(cycle, status)
            self._close(abort=True)
            return
        head_only = cycle.head.method == b"HEAD"
        self._write_reply(
            status, code, cycle.request_id, close=close, head_only=head_only, allow=allow
        )
        self._finish_metrics(cycle, status)
        self.cycle = None
        if close:
            self._close()
            return
        self._read_next(cycle)

    def _local_reply_raw(self, status: int, code: str) -> None:
        """Answer a request that never parsed, then close."""
        self._cancel_timer()
        request_id = self.worker.next_request_id()
        self._write_reply(status, code, request_id, close=True, head_only=False)
        self.worker.metrics.count_request(self.listener.name, "-", "reject", status)
        self._close()

    def _write_reply(
        self,
        status: int,
        code: str,
        request_id: bytes,
        *,
        close: bool,
        head_only: bool,
        allow: bytes = b"",
    ) -> None:
        transport = self.transport
        if transport is None:
            return
        transport.write(
            local_response(
                status,
                error_body(code, request_id) if code else b"",
                content_type=b"application/json",
                request_id=request_id,
                close=close,
                head_only=head_only,
                allow=allow,
            )
        )

    def _close(self, *, abort: bool = False) -> None:
        self._cancel_timer()
        self.state = State.CLOSED
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

    # ---------------------------------------------------------------- WebSocket tunnel

    def _update_reading_tunnel(self) -> None:
        transport = self.transport
        if transport is not None and self.read_paused:
            self.read_paused = False
            transport.resume_reading()
        conn = self.tunnel_upstream
        if conn is not None and conn.transport is not None:
            conn.transport.resume_reading()

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
                self.transport.write(data)
            return
        if relay.upstream_passes(data):
            if self.transport is not None:
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
            if len(to_client) == 1:
                self.transport.write(to_client[0])
            else:
                self.transport.writelines(to_client)
        if out.client_close_code is not None:
            self.worker.metrics.websocket_closes.labels(
                self.listener.name, str(out.client_close_code)
            ).inc()
        if out.done:
            self._end_tunnel()
            self._close()
        elif not self.ws_closing and self.relay is not None and self.relay.closing:
            # bound the wait for the other side's Close (RFC 6455 7.1.1 leaves it to us)
            self.ws_closing = True
            self._arm(WS_CLOSE_TIMEOUT_S, ClientProtocol._on_ws_close_timeout)

    def _on_ws_close_timeout(self) -> None:
        self._end_tunnel()
        self._close(abort=True)

    def _on_ws_tick(self) -> None:
        limits = self.tunnel_limits
        if self.state is not State.TUNNEL or limits is None:
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
        self._arm(limits.ws_ping_interval_s, ClientProtocol._on_ws_tick)

    def _end_tunnel(self) -> None:
        conn = self.tunnel_upstream
        if conn is None:
            return
        self.tunnel_upstream = None
        self.listener.ws_gauge.dec()
        conn.server.pool.discard(conn)

    def go_idle_away(self, *, quiet_s: float = 0.0) -> None:
        """The listener was removed, or the worker drains: close if idle, that is, nothing of
        a request is buffered here or in the kernel, for ``quiet_s`` with no request started;
        otherwise the connection ends after its next answer (sent with Connection: close)."""
        if self.state is not State.HEAD or len(self.scanner) or self.transport is None:
            return
        if quiet_s:
            # A client between two requests of a busy keep-alive connection looks idle too;
            # closing it then loses the request it is writing. It gets Connection: close on
            # its next answer instead; only a connection quiet for quiet_s is closed here.
            now = self.worker.loop.time()
            seen = self.drain_idle
            if seen is None or seen[0] != self.served:
                self.drain_idle = (self.served, now)
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
        if self.state is not State.TUNNEL:
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
        self.worker.metrics.websocket_closes.labels(self.listener.name, "1001").inc()
        self._end_tunnel()
        self._close()

    def abandon(self) -> None:
        """Shutdown, at the deadline: answer a request that has no response yet (503), and
        reset what is still busy, so nothing is left to the master's SIGKILL."""
        cycle = self.cycle
        if self.state is State.CLOSED:
            return
        if cycle is not None and not cycle.leg.response_started:
            self._local_reply(cycle, 503, "shutting_down", close=True)
        elif self.state is State.TUNNEL:
            self.close_websocket()
        else:
            self._close(abort=True)


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

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    snapshot = Snapshot.build(config, generation)
    try:
        loop.run_until_complete(_serve(snapshot, sockets, admin_socket, channel_fd, loop))
    finally:
        _flush_access_log()  # a clean stop (or a failure) loses no access record
        loop.close()


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
) -> None:
    worker = WorkerState(snapshot, loop)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, lambda: None)  # the master decides; Ctrl-C reaches it
    loop.add_signal_handler(signal.SIGUSR1, _reopen_logs)
    for name, sock in sockets.items():
        await _start_listener(worker, worker.listeners[name], sock)
    admin_server: asyncio.Server | None = None
    if admin_socket is not None:
        admin_server = await loop.create_server(
            lambda: admin.AdminProtocol(worker), sock=admin_socket
        )
    channel = socket.socket(fileno=channel_fd)
    channel.setblocking(False)
    heartbeat_fd = channel.fileno()
    reloads: list[asyncio.Task[None]] = []

    def on_control() -> None:
        while True:
            try:
                message = control.receive(channel)
            except BlockingIOError:
                return
            except (OSError, control.ControlError) as err:
                logger.error("control channel failed: %s", err)
                message = None
            if message is None:  # the master is gone; PR_SET_PDEATHSIG sends SIGTERM
                loop.remove_reader(heartbeat_fd)
                return
            if isinstance(message, control.Reload):
                task = loop.create_task(_reload(worker, message, channel))
                reloads.append(task)
                task.add_done_callback(reloads.remove)

    loop.add_reader(heartbeat_fd, on_control)

    def heartbeat() -> None:
        with contextlib.suppress(BlockingIOError):  # the master is behind; it sees the next byte
            os.write(heartbeat_fd, b".")
        _flush_access_log()  # nginx's flush=1s: a record is at most about a second late
        now = time.monotonic()
        for pool in worker.pools.values():
            pool.expire_idle(now)
        if not stop.is_set():
            loop.call_later(HEARTBEAT_INTERVAL_S, heartbeat)

    heartbeat()
    await stop.wait()
    loop.remove_reader(heartbeat_fd)
    await _drain(worker, heartbeat_fd)
    if admin_server is not None:
        admin_server.close()


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
    for pool in worker.pools.values():
        pool.close_all()
    await asyncio.sleep(DRAIN_STEP_S)  # let the last answers go out
    for listener in worker.every_listener():
        for conn in list(listener.connections):
            transport = conn.transport
            # still flushing to a client that does not read: reset
            if transport is not None and transport.get_write_buffer_size():
                conn._close(abort=True)


async def _start_listener(worker: WorkerState, listener: Listener, sock: socket.socket) -> None:
    def factory() -> ClientProtocol:
        return ClientProtocol(worker, listener)

    listener.server = await worker.loop.create_server(factory, sock=sock, backlog=2048)


async def _reload(worker: WorkerState, message: control.Reload, channel: socket.socket) -> None:
    """Apply configuration generation ``message.generation`` in place, then acknowledge it."""
    error = None
    try:
        await apply_reload(worker, message)
    except (FastproxyError, OSError, ValueError) as err:
        error = str(err)
        logger.error("generation %d not applied: %s", message.generation, err)
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
    except tomllib.TOMLDecodeError as err:
        for sock in sockets.values():
            sock.close()
        raise ConfigError(f"the configuration sent is not TOML: {err}", where="") from err
    except ConfigError:
        for sock in sockets.values():
            sock.close()
        raise
    changes = diff(worker.snapshot, snapshot)
    for name in changes.retire:
        worker.pools.pop(name).retire()
    for name, spec in snapshot.upstreams.items():
        if name not in worker.pools:
            worker.pools[name] = UpstreamPool(spec, worker.loop)
    for name in changes.close:
        listener = worker.listeners.pop(name)
        listener.retired = True
        worker.retired_listeners.append(listener)
        if listener.server is not None:
            listener.server.close()
        for conn in list(listener.connections):
            conn.go_idle_away()
    for name, plan in snapshot.listeners.items():
        current = worker.listeners.get(name)
        if current is not None:
            current.plan = plan
            continue
        if name not in sockets:
            raise ConfigError(f"no socket was sent for listener {name}", where="")
        added = worker.listeners[name] = Listener(plan, worker.metrics)
        await _start_listener(worker, added, sockets.pop(name))
    for sock in sockets.values():
        sock.close()
    worker.leg_class = leg_class_for(snapshot.http_parser)
    worker.snapshot = snapshot
