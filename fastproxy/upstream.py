"""Upstream connections of one worker: connect, keep-alive reuse, balancing, passive health.

[I/O] Imports ``errors``, ``config`` and ``http1``; runs on the worker's event loop. It never
parses or decides anything about a request: it hands a connected ``UpstreamProtocol`` to an
``UpstreamOwner`` (the client connection) and relays transport callbacks to it.

Theory of operation
-------------------
Each named upstream is an ``UpstreamPool`` of ``Server`` objects. A server keeps a LIFO stack of
idle keep-alive connections (the most recently used one is the least likely to have been closed
by the backend). ``acquire`` returns an idle connection at once, or starts a connect and calls
``on_upstream_ready`` / ``on_upstream_failed`` later; the only task created per request is the
one behind ``loop.create_connection``, and only when no idle connection exists.

Passive health: a failed connect marks the server down for ``DOWN_FOR_S``; balancing skips down
servers while any server is up, so a single-server upstream keeps being retried.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol, cast

from fastproxy.config import Balance, UpstreamConfig
from fastproxy.http1 import UpstreamLeg
from fastproxy.tls import for_upstream

logger = logging.getLogger(__name__)

DOWN_FOR_S = 10.0


class UpstreamOwner(Protocol):
    """What a client connection implements to drive an upstream connection."""

    def on_upstream_ready(self, conn: UpstreamProtocol) -> None: ...
    def on_upstream_failed(self, code: str) -> None: ...
    def on_upstream_data(self, data: bytes) -> None: ...
    def on_upstream_lost(self) -> None: ...
    def on_upstream_pause_writing(self) -> None: ...
    def on_upstream_resume_writing(self) -> None: ...


class UpstreamProtocol(asyncio.Protocol):
    """One TCP connection to an upstream server; the ``exchange.UpstreamConn`` an exchange
    writes to, pauses, and gives back (``release``, ``discard``)."""

    __slots__ = ("config", "idle_since", "leg", "owner", "reused", "server", "transport")

    def __init__(self, server: Server) -> None:
        self.server = server
        #: the spec of the pool it belongs to (its timeouts), pinned with the connection
        self.config = server.pool.config
        self.leg = UpstreamLeg()
        self.owner: UpstreamOwner | None = None
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        #: this connection carried a request before (a failure may be a stale keep-alive)
        self.reused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport = transport
        # (uvloop sets TCP_NODELAY on every TCP transport itself)
        transport.set_write_buffer_limits(high=256 * 1024)

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is not None:
            owner.on_upstream_data(data)
        else:
            # bytes on an idle connection: the backend is confused, never reuse it
            self.close()

    def eof_received(self) -> bool | None:
        owner = self.owner
        if owner is not None:
            self.leg.feed_eof()
            owner.on_upstream_data(b"")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.forget(self)
        self.transport = None
        owner = self.owner
        self.owner = None
        if owner is not None:
            owner.on_upstream_lost()

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.on_upstream_pause_writing()

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.on_upstream_resume_writing()

    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def writelines(self, data: list[bytes]) -> None:
        if self.transport is not None:
            self.transport.writelines(data)

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def release(self) -> None:
        """Back to its pool after a complete exchange (``UpstreamPool.release``)."""
        self.server.pool.release(self)

    def discard(self) -> None:
        """Drop it, failed or abandoned mid-exchange (``UpstreamPool.discard``)."""
        self.server.pool.discard(self)

    def close(self) -> None:
        """Close and drop the connection, whoever owns it."""
        self.owner = None
        self.server.forget(self)
        if self.transport is not None:
            self.transport.close()


class Server:
    """One ``host:port`` of an upstream, with its idle connections."""

    __slots__ = ("active", "down_until", "host", "idle", "label", "pool", "port")

    def __init__(self, pool: UpstreamPool, host: str, port: int) -> None:
        self.pool = pool
        self.host = host
        self.port = port
        self.label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.idle: list[UpstreamProtocol] = []
        self.active = 0
        self.down_until = 0.0

    def forget(self, conn: UpstreamProtocol) -> None:
        if conn in self.idle:
            self.idle.remove(conn)

    def take_idle(self) -> UpstreamProtocol | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.is_open:
                return conn
        return None


class UpstreamPool:
    """The servers of one named upstream, as seen by one worker."""

    def __init__(self, config: UpstreamConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.name = config.name
        self.config = config
        self.loop = loop
        self.servers = [Server(self, a.host, a.port) for a in config.servers]
        self._next = 0
        #: replaced by a reload: connections in use finish their exchange, then close
        self.retired = False

    def pick(self) -> Server:
        """Choose a server by the balancing method, skipping servers marked down."""
        servers = self.servers
        if len(servers) == 1:
            return servers[0]  # down or not, it is the only one
        now = time.monotonic()
        up = [s for s in servers if s.down_until <= now] or servers
        if self.config.balance is Balance.LEAST_CONN:
            return min(up, key=lambda s: s.active)
        self._next = (self._next + 1) % len(up)
        return up[self._next]

    def acquire(self, owner: UpstreamOwner, *, fresh: bool = False) -> UpstreamProtocol | None:
        """An idle connection now, or None and ``owner`` is called back when connected."""
        server = self.pick()
        if not fresh:
            conn = server.take_idle()
            if conn is not None:
                conn.owner = owner
                server.active += 1
                return conn
        server.active += 1
        self._connect(server, owner)
        return None

    def _connect(self, server: Server, owner: UpstreamOwner) -> None:
        loop = self.loop
        context, server_name = for_upstream(self.config, server.host)
        coro = loop.create_connection(
            lambda: UpstreamProtocol(server),
            server.host,
            server.port,
            ssl=context,
            server_hostname=server_name,
        )
        task = loop.create_task(asyncio.wait_for(coro, self.config.connect_timeout_s))

        def done(task: asyncio.Task[tuple[asyncio.BaseTransport, UpstreamProtocol]]) -> None:
            if task.cancelled():
                server.active -= 1
                return
            exc = task.exception()
            if exc is None:
                _transport, conn = task.result()
                conn.owner = owner
                owner.on_upstream_ready(conn)
                return
            server.active -= 1
            server.down_until = time.monotonic() + DOWN_FOR_S
            if isinstance(exc, TimeoutError):
                code = "upstream_timeout"
            elif isinstance(exc, OSError):
                code = "upstream_failed"
            else:
                raise exc
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("connect to %s failed: %r", server.label, exc)
            owner.on_upstream_failed(code)

        task.add_done_callback(done)

    def release(self, conn: UpstreamProtocol) -> None:
        """Return a connection after a complete exchange; keep it if it can carry another."""
        server = conn.server
        server.active -= 1
        conn.owner = None
        leg = conn.leg
        transport = conn.transport
        if (
            transport is not None
            and not transport.is_closing()
            and (leg.reusable or leg.idle)
            # bytes after the response would be read as the next client's response
            and not leg.trailing
            # a request still being flushed would interleave with the next one
            and not transport.get_write_buffer_size()
            and len(server.idle) < self.config.keepalive
            and not self.retired
        ):
            if leg.reusable:
                leg.start_next_cycle()
                conn.reused = True
            transport.resume_reading()  # it may have been paused for a slow client
            conn.idle_since = time.monotonic()
            server.idle.append(conn)
        else:
            conn.close()

    def discard(self, conn: UpstreamProtocol) -> None:
        """Drop a connection that failed or was abandoned mid-exchange."""
        conn.server.active -= 1
        conn.close()

    def expire_idle(self, now: float) -> None:
        """Close idle connections older than ``keepalive_timeout_s``; called once a second."""
        limit = now - self.config.keepalive_timeout_s
        for server in self.servers:
            while server.idle and server.idle[0].idle_since < limit:
                server.idle[0].close()

    def retire(self) -> None:
        """A reload replaced this pool: close the idle connections, and the others on release."""
        self.retired = True
        self.close_all()

    def close_all(self) -> None:
        for server in self.servers:
            for conn in list(server.idle):
                conn.close()
