"""Upstream connections of one worker: connect, keep-alive reuse, balancing, passive health.

[I/O] Imports ``errors``, ``config``, ``health`` (its passive-mark rule) and ``http1``; runs on
the worker's event loop. It never parses or decides anything about a request: it hands a
connected ``UpstreamProtocol`` to an ``UpstreamOwner`` (the client connection) and relays
transport callbacks to it.

Theory of operation
-------------------
Each named upstream is an ``UpstreamPool`` of ``Server`` objects. A server keeps a LIFO stack of
idle keep-alive connections (the most recently used one is the least likely to have been closed
by the backend). ``acquire`` returns an idle connection at once, or starts a connect and calls
``on_upstream_ready`` / ``on_upstream_failed`` later; the only task created per request is the
one behind ``loop.create_connection``, and only when no idle connection exists.

Health: the master decides which servers are up (``health.py``: active checks, passive reports)
and every worker's pools follow the table it sends (``set_health``). A failed connect, a connect
timeout, or a reset before any response byte (``server_failed``) takes the server out of this
worker's rotation at once and is reported to the master (``report``), which tells every worker;
the local mark holds until the master's table says the server is down (or for ``down_for_s``),
so a table sent before the report arrived cannot put the server back early. Balancing picks among
the servers that are up; with none, ``pick`` raises ``NoHealthyUpstream`` (503 at once, no
connect attempt). ``least_conn`` breaks ties round robin.

WebSocket tunnels: after a checked 101 a plain TCP connection leaves its transport
(``UpstreamProtocol.detach``) and goes on as a ``TunnelSocket``, a bare descriptor read with
``loop.add_reader``, which holds far less memory than a second uvloop transport and protocol
per idle WebSocket; it counts as active on its server until the tunnel ends (``discard``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Protocol, cast

from fastproxy.config import Balance, UpstreamConfig
from fastproxy.errors import NoHealthyUpstream
from fastproxy.health import passive_applies
from fastproxy.http1 import UpstreamLeg
from fastproxy.tls import for_upstream

logger = logging.getLogger(__name__)

#: ``report(upstream, server label, reason)``: tell the master a server failed
Reporter = Callable[[str, str, str], None]


class UpstreamOwner(Protocol):
    """What a client connection implements to drive an upstream connection."""

    def on_upstream_ready(self, conn: UpstreamProtocol) -> None: ...
    def on_upstream_failed(self, code: str, config: UpstreamConfig) -> None: ...
    def on_upstream_data(self, data: bytes) -> None: ...
    def on_upstream_lost(self) -> None: ...
    def on_upstream_pause_writing(self) -> None: ...
    def on_upstream_resume_writing(self) -> None: ...


def _spent_leg() -> UpstreamLeg:
    leg = UpstreamLeg()
    leg.request(b"GET", b"/", [])  # mid-exchange: never idle
    leg.feed_eof()  # closed: never reusable, and a later ``feed_eof`` changes nothing
    return leg


#: the leg of every connection that carries a WebSocket (``UpstreamProtocol.tunnel``): it is
#: never read as HTTP again nor given back to a pool, so one shared leg, in a state that no
#: pool keeps, stands in for each connection's own
_TUNNEL_LEG = _spent_leg()


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

    def tunnel(self) -> None:
        """The connection carries a WebSocket from now on (after a checked 101, whose trailing
        bytes were taken): its HTTP reader and writer state goes, and a pool never keeps it."""
        self.leg = _TUNNEL_LEG

    def detach(self) -> TunnelSocket | None:
        """The connection as a ``TunnelSocket`` (its descriptor, duplicated, read with
        ``add_reader``), and this transport closed; None when it must stay a transport (TLS,
        bytes still to write, already closing). Called after ``tunnel``, before any tunnel byte
        is read, while the owner has not paused it."""
        transport = self.transport
        owner = self.owner
        if (
            transport is None
            or owner is None
            or transport.is_closing()
            or transport.get_write_buffer_size()
            or transport.get_extra_info("sslcontext") is not None
        ):
            return None
        sock = transport.get_extra_info("socket")
        if sock is None:
            return None
        try:
            fd = os.dup(sock.fileno())
        except OSError:
            return None
        # closing the transport closes its own descriptor only: the connection lives on in
        # ``fd`` (no FIN, no reset), and ``connection_lost`` finds no owner to tell
        self.owner = None
        self.server.forget(self)
        transport.abort()
        tunnel = TunnelSocket(fd, self.server, owner)
        tunnel.resume_reading()
        return tunnel

    def release(self) -> None:
        """Back to its pool after a complete exchange (``UpstreamPool.release``)."""
        self.server.pool.release(self)

    def discard(self) -> None:
        """Drop it, failed or abandoned mid-exchange (``UpstreamPool.discard``)."""
        self.server.pool.discard(self)

    def mark_failed(self) -> None:
        """The server reset this fresh connection before any response byte (passive health)."""
        self.server.pool.server_failed(self.server, "reset before any response byte")

    def close(self) -> None:
        """Close and drop the connection, whoever owns it."""
        self.owner = None
        self.server.forget(self)
        if self.transport is not None:
            self.transport.close()


#: a ``TunnelSocket`` stops its owner's reading above this many unsent bytes, and resumes it
#: at a quarter of it (as uvloop's transports do with ``set_write_buffer_limits(high=...)``)
TUNNEL_HIGH_WATER_BYTES = 256 * 1024
#: the most one read takes (``os.read`` allocates this much and shrinks it to what came: larger
#: sizes cross glibc's mmap threshold and cost a map and an unmap per read)
_TUNNEL_READ_BYTES = 64 * 1024


class TunnelSocket:
    """The upstream side of a WebSocket tunnel as a bare non-blocking descriptor.

    An idle WebSocket otherwise holds a second uvloop transport and protocol (about 1.5 KB);
    this holds the descriptor, the loop's reader registration and the unsent bytes. It does
    for the tunnel what the transport did: reads go to ``owner.on_upstream_data``; an end of
    stream, a reset or a failed write end it (``owner.on_upstream_lost``, on the next loop
    pass, as a transport's ``connection_lost``); writes that the kernel does not take at once
    are queued and flushed when the socket is writable, and past ``TUNNEL_HIGH_WATER_BYTES``
    the owner is told to stop reading its side (``on_upstream_pause_writing``) until the queue
    drains to a quarter (``on_upstream_resume_writing``); ``close`` flushes the queue, then
    closes (a FIN); ``discard`` does that and gives the server's active count back.
    """

    __slots__ = ("_closing", "_fd", "_out", "_paused", "_queued", "_reading", "owner", "server")

    def __init__(self, fd: int, server: Server, owner: UpstreamOwner) -> None:
        self._fd = fd
        self.server = server
        self.owner: UpstreamOwner | None = owner
        #: bytes the kernel did not take yet, in order; None while there are none
        self._out: list[bytes] | None = None
        self._queued = 0
        self._reading = False
        #: the owner was told to stop reading (``on_upstream_pause_writing``)
        self._paused = False
        #: ``close`` was called: the descriptor closes once the queue is flushed
        self._closing = False

    @property
    def is_open(self) -> bool:
        return self._fd >= 0 and not self._closing

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, _TUNNEL_READ_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._lost()
            return
        if not data:
            self._lost()  # the upstream closed: so does the tunnel, as with a transport
            return
        owner = self.owner
        if owner is not None:
            owner.on_upstream_data(data)

    def write(self, data: bytes) -> None:
        if self._fd < 0 or self._closing or not data:
            return
        if self._out is None:
            try:
                sent = os.write(self._fd, data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._fail()
                return
            if sent == len(data):
                return
            self._out = [data[sent:]]
            self._queued = len(data) - sent
            server = self.server
            server.pool.loop.add_writer(self._fd, self._on_writable)
        else:
            self._out.append(data)
            self._queued += len(data)
        if not self._paused and self._queued > TUNNEL_HIGH_WATER_BYTES:
            self._paused = True
            owner = self.owner
            if owner is not None:
                owner.on_upstream_pause_writing()

    def writelines(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def _on_writable(self) -> None:
        out = self._out
        fd = self._fd
        while out:
            data = out[0]
            try:
                sent = os.write(fd, data)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._fail()
                return
            self._queued -= sent
            if sent < len(data):
                out[0] = data[sent:]
                break
            out.pop(0)
        if out:
            if self._paused and self._queued <= TUNNEL_HIGH_WATER_BYTES // 4:
                self._resumed()
            return
        self._out = None
        self._queued = 0
        self.server.pool.loop.remove_writer(fd)
        if self._closing:
            self._close_now()
        elif self._paused:
            self._resumed()

    def _resumed(self) -> None:
        self._paused = False
        owner = self.owner
        if owner is not None:
            owner.on_upstream_resume_writing()

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self.server.pool.loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._reading and self._fd >= 0 and not self._closing:
            self._reading = True
            self.server.pool.loop.add_reader(self._fd, self._on_readable)

    def discard(self) -> None:
        """The tunnel ended: flush, close, and give the server's active count back."""
        self.server.active -= 1
        self.close()

    def close(self) -> None:
        """Close once what was written is flushed; the owner is not called again."""
        self.owner = None
        if self._fd < 0 or self._closing:
            return
        self._closing = True
        self.pause_reading()
        if self._out is None:
            self._close_now()

    def _close_now(self) -> None:
        fd = self._fd
        if fd < 0:
            return
        self._fd = -1
        self._reading = False
        loop = self.server.pool.loop
        loop.remove_reader(fd)
        if self._out is not None:
            self._out = None
            self._queued = 0
            loop.remove_writer(fd)
        os.close(fd)

    def _fail(self) -> None:
        # a reset or a failed write: nothing more can be sent; the owner hears of it on the
        # next loop pass (never from inside its own ``write``), as from a transport
        self._out = None
        self._queued = 0
        self._closing = False
        self.server.pool.loop.remove_writer(self._fd)
        self._lost()

    def _lost(self) -> None:
        self._close_now()
        owner = self.owner
        self.owner = None
        if owner is not None:
            self.server.pool.loop.call_soon(owner.on_upstream_lost)


class Server:
    """One ``host:port`` of an upstream, with its idle connections."""

    __slots__ = ("active", "host", "idle", "label", "marked_at", "pool", "port", "up")

    def __init__(self, pool: UpstreamPool, host: str, port: int) -> None:
        self.pool = pool
        self.host = host
        self.port = port
        self.label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.idle: list[UpstreamProtocol] = []
        self.active = 0
        #: in the rotation: the master's table, unless this worker marked it down meanwhile
        self.up = True
        #: when this worker marked it down and reported it (0: no local mark)
        self.marked_at = 0.0

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

    def __init__(
        self,
        config: UpstreamConfig,
        loop: asyncio.AbstractEventLoop,
        health: Mapping[str, bool] | None = None,
        report: Reporter | None = None,
    ) -> None:
        self.name = config.name
        self.config = config
        self.loop = loop
        self.servers = [Server(self, a.host, a.port) for a in config.servers]
        #: the servers in the rotation, in configuration order
        self.up: list[Server] = list(self.servers)
        self._least_conn = config.balance is Balance.LEAST_CONN
        self._next = 0
        #: a passive mark applies (the master's rule: never the only server of an upstream
        #: without active checks)
        self._passive = passive_applies(config)
        self._report = report
        #: replaced by a reload: connections in use finish their exchange, then close
        self.retired = False
        if health:
            self.set_health(health, time.monotonic())

    def pick(self) -> Server:
        """Choose a server among those up by the balancing method; ``NoHealthyUpstream`` when
        none is."""
        up = self.up
        count = len(up)
        if count == 1:
            return up[0]
        if not count:
            raise NoHealthyUpstream(self.name)
        if self._least_conn:
            # the fewest active connections; ties go round robin from the one after the last pick
            start = self._next
            best = up[start % count]
            best_index = start
            for index in range(start + 1, start + count):
                server = up[index % count]
                if server.active < best.active:
                    best = server
                    best_index = index
            self._next = (best_index + 1) % count
            return best
        self._next = (self._next + 1) % count
        return up[self._next]

    def set_health(self, states: Mapping[str, bool], now: float) -> None:
        """Follow the master's table ``{server label: up}`` (servers it does not list: up)."""
        for server in self.servers:
            up = states.get(server.label, True)
            if server.marked_at:
                if up and now - server.marked_at < self.config.down_for_s:
                    continue  # a table sent before the master read this worker's report
                server.marked_at = 0.0
            server.up = up
        self._rebuild()

    def server_failed(self, server: Server, reason: str) -> None:
        """Passive health: out of this worker's rotation now, and reported to the master."""
        if not self._passive or not server.up:
            return
        server.up = False
        server.marked_at = time.monotonic()
        self._rebuild()
        if self._report is not None:
            self._report(self.name, server.label, reason)

    def _rebuild(self) -> None:
        self.up = [s for s in self.servers if s.up]
        if self.up:
            self._next %= len(self.up)

    def expire_marks(self, now: float) -> None:
        """Local marks the master never confirmed end after ``down_for_s``; once a second."""
        expired = False
        for server in self.servers:
            if server.marked_at and now - server.marked_at >= self.config.down_for_s:
                server.marked_at = 0.0
                server.up = True
                expired = True
        if expired:
            self._rebuild()

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
            if isinstance(exc, TimeoutError):
                code = "upstream_timeout"
                reason = "connect timed out"
            elif isinstance(exc, OSError):
                code = "upstream_failed"
                reason = f"connect failed: {exc.strerror or exc}"
            else:
                raise exc
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("connect to %s failed: %r", server.label, exc)
            self.server_failed(server, reason)
            owner.on_upstream_failed(code, self.config)

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
