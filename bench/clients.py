"""The runner's load clients: asyncio protocols on uvloop, plus blocking bulk transfers.

The proxies are what is measured; these clients share a core with the origin, so they do as
little as they can per request or frame: one prebuilt request, a byte-counting response reader,
prebuilt masked frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar, cast

from bench import wsframes

T = TypeVar("T")
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def get_request(path: str, host: str = "bench") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: bench\r\n\r\n".encode()


class ResponseReader:
    """Counts complete HTTP/1.1 responses in a byte stream (Content-Length or chunked)."""

    __slots__ = ("_body_left", "_buf", "_chunked", "statuses")

    def __init__(self) -> None:
        self._buf = b""
        self._body_left = -1  # -1: reading a head
        self._chunked = False
        self.statuses: list[int] = []

    def feed(self, data: bytes) -> int:
        """Add bytes; return how many responses completed."""
        buf = self._buf + data if self._buf else data
        done = 0
        while True:
            if self._body_left < 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                head = buf[:end].lower()
                buf = buf[end + 4 :]
                self.statuses.append(int(head[9:12]))
                at = head.find(b"\ncontent-length:")
                if at >= 0:
                    stop = head.find(b"\r", at + 16)
                    self._body_left = int(head[at + 16 : stop if stop >= 0 else None])
                    self._chunked = False
                elif b"\ntransfer-encoding: chunked" in head:
                    self._body_left = 0
                    self._chunked = True
                else:
                    self._body_left = 0
                    self._chunked = False
            if self._chunked:
                line_end = buf.find(b"\r\n")
                if line_end < 0:
                    break
                size = int(buf[:line_end].split(b";", 1)[0], 16)
                need = line_end + 2 + size + 2
                if len(buf) < need:
                    break
                buf = buf[need:]
                if size == 0:
                    self._chunked = False
                    self._body_left = -1
                    done += 1
                continue
            if len(buf) < self._body_left:
                self._body_left -= len(buf)
                buf = b""
                break
            buf = buf[self._body_left :]
            self._body_left = -1
            done += 1
        self._buf = buf
        return done


class HttpConn(asyncio.Protocol):
    """A keep-alive connection sending one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = ResponseReader()
        self.waiter: asyncio.Future[int] | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self.on_response: Callable[[HttpConn], None] | None = None
        self.sent_ns = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def send(self, request: bytes) -> None:
        assert self.transport is not None
        self.sent_ns = time.perf_counter_ns()
        self.transport.write(request)

    async def request(self, request: bytes) -> int:
        """Send and wait for the response; returns its status."""
        self.waiter = asyncio.get_running_loop().create_future()
        self.send(request)
        return await self.waiter

    def data_received(self, data: bytes) -> None:
        n = self.reader.feed(data)
        if not n:
            return
        if self.on_response is not None:
            self.on_response(self)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(self.reader.statuses[-1])

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed"))
        if not self.closed.done():
            self.closed.set_result(None)


class WsConn(asyncio.Protocol):
    """A WebSocket client connection: handshake, then echo requests; answers pings."""

    def __init__(self, path: str, host: str = "bench") -> None:
        loop = asyncio.get_running_loop()
        self.handshake = wsframes.client_handshake(path, host, wsframes.new_key())
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[bool] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.frames = wsframes.FrameReader()
        self.head = b""
        self.is_open = False
        self.waiter: asyncio.Future[int] | None = None
        # round-trip mode: a prebuilt frame re-sent on every echo until ``rt_left`` reaches 0
        self.rt_frame = b""
        self.rt_left = 0
        self.rt_done: asyncio.Future[None] | None = None
        self.received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.handshake)

    def data_received(self, data: bytes) -> None:
        if not self.is_open:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            ok = self.head[9:12] == b"101"
            data, self.head = self.head[end + 4 :], b""
            self.is_open = ok
            if not self.opened.done():
                self.opened.set_result(ok)
            if not ok:
                assert self.transport is not None
                self.transport.close()
                return
            if not data:
                return
        for _fin, opcode, payload in self.frames.feed(data):
            if opcode == wsframes.PING:
                assert self.transport is not None
                self.transport.write(wsframes.frame(wsframes.PONG, payload, masked=True))
            elif opcode == wsframes.CLOSE:
                assert self.transport is not None
                self.transport.close()
            elif opcode != wsframes.PONG:
                self._message()

    def _message(self) -> None:
        self.received += 1
        if self.rt_left:
            self.rt_left -= 1
            if self.rt_left:
                assert self.transport is not None
                self.transport.write(self.rt_frame)
            elif self.rt_done is not None and not self.rt_done.done():
                self.rt_done.set_result(None)
        elif self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(time.perf_counter_ns())

    async def echo(self, payload: bytes, timeout: float) -> float:
        """One message and its echo; returns the round trip in seconds."""
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        start = time.perf_counter_ns()
        self.transport.write(wsframes.frame(wsframes.BINARY, payload, masked=True))
        end = await asyncio.wait_for(self.waiter, timeout)
        return (end - start) / 1e9

    async def round_trips(self, count: int, payload: bytes) -> None:
        assert self.transport is not None
        self.rt_frame = wsframes.frame(wsframes.BINARY, payload, masked=True)
        self.rt_left = count
        self.rt_done = asyncio.get_running_loop().create_future()
        self.transport.write(self.rt_frame)
        await self.rt_done

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(wsframes.frame(wsframes.CLOSE, b"\x03\xe8", masked=True))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.is_open = False
        if not self.opened.done():
            self.opened.set_result(False)
        for fut in (self.waiter, self.rt_done):
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionError("connection closed"))
        if not self.closed.done():
            self.closed.set_result(None)


async def _connect_from(
    factory: Callable[[], asyncio.Protocol], port: int, source: str | None, host: str = "127.0.0.1"
) -> asyncio.Protocol:
    loop = asyncio.get_running_loop()
    if source is None:
        _t, proto = await loop.create_connection(factory, host, port)
        return proto
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # the port is picked at connect(): ephemeral ports are then shared across source addresses
        sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    _t, proto = await loop.create_connection(factory, sock=sock)
    return proto


# ------------------------------------------------------------------------ tests


async def ws_round_trips(
    port: int, path: str, connections: int, total: int, payload: bytes = b"x" * 32
) -> tuple[int, float]:
    """``total`` echo round trips over ``connections`` WebSockets; (round trips, seconds)."""
    conns = [
        cast(WsConn, await _connect_from(lambda: WsConn(path), port, None))
        for _ in range(connections)
    ]
    try:
        if not all(await asyncio.gather(*(c.opened for c in conns))):
            raise RuntimeError(f"WebSocket handshake refused on port {port}")
        each = max(1, total // connections)
        start = time.perf_counter()
        await asyncio.gather(*(c.round_trips(each, payload) for c in conns))
        return each * connections, time.perf_counter() - start
    finally:
        for c in conns:
            c.close()
        await asyncio.sleep(0.05)


async def _open_many(
    factory: Callable[[], asyncio.Protocol],
    port: int,
    n: int,
    sources: Sequence[str | None],
    concurrency: int,
) -> tuple[list[asyncio.Protocol], int]:
    """Open ``n`` connections, at most ``concurrency`` at once; (protocols, failures)."""
    sem = asyncio.Semaphore(concurrency)
    failures = 0

    async def one(i: int) -> asyncio.Protocol | None:
        nonlocal failures
        async with sem:
            try:
                return await _connect_from(factory, port, sources[i % len(sources)])
            except OSError:
                failures += 1
                return None

    got = await asyncio.gather(*(one(i) for i in range(n)))
    return [p for p in got if p is not None], failures


async def idle_http(port: int, n: int, path: str, measure: Callable[[], T], settle: float) -> T:
    """Open ``n`` keep-alive connections, one request each, hold them idle, call ``measure``."""
    request = get_request(path)
    protos, failures = await _open_many(HttpConn, port, n, [None], 64)
    conns = [cast(HttpConn, p) for p in protos]
    try:
        sem = asyncio.Semaphore(32)

        async def one(c: HttpConn) -> int:
            async with sem:
                return await c.request(request)

        statuses = await asyncio.gather(*(one(c) for c in conns))
        bad = failures + sum(1 for s in statuses if s != 200)
        if bad:
            raise RuntimeError(f"{bad} of {n} idle HTTP connections failed on port {port}")
        await asyncio.sleep(settle)
        if sum(1 for c in conns if c.transport is not None) != n:
            raise RuntimeError(f"idle HTTP connections were closed by port {port}")
        return measure()
    finally:
        for c in conns:
            if c.transport is not None:
                c.transport.close()
        await asyncio.sleep(0.2)


async def idle_ws(port: int, n: int, path: str, measure: Callable[[], T], settle: float) -> T:
    """Open ``n`` WebSockets, one echo each, hold them idle, call ``measure``."""
    protos, failures = await _open_many(lambda: WsConn(path), port, n, [None], 64)
    conns = [cast(WsConn, p) for p in protos]
    try:
        opened = await asyncio.gather(*(c.opened for c in conns))
        sem = asyncio.Semaphore(32)

        async def one(c: WsConn) -> float:
            async with sem:
                return await c.echo(b"hello", 10)

        await asyncio.gather(*(one(c) for c in conns if c.is_open))
        bad = failures + sum(1 for ok in opened if not ok)
        if bad:
            raise RuntimeError(f"{bad} of {n} idle WebSockets failed on port {port}")
        await asyncio.sleep(settle)
        if sum(1 for c in conns if c.is_open) != n:
            raise RuntimeError(f"idle WebSockets were closed by port {port}")
        return measure()
    finally:
        for c in conns:
            c.close()
        await asyncio.sleep(0.2)


async def paced_latency(
    ports: Sequence[int], path: str, rate: float, seconds: float, connections: int = 4
) -> tuple[list[list[float]], int]:
    """``rate`` requests per second to each of ``ports``, interleaved, for ``seconds``.

    Returns one list of latencies (seconds) per port, and how many requests were skipped. The
    ports take turns tick by tick, so a proxy and the origin behind it are measured in the same
    window and a noisy moment hits both. Each request goes on an idle keep-alive connection of
    its port; when every one is still busy at a tick the request is skipped and counted (that does
    not happen at 500/s unless something stalls).
    """
    loop = asyncio.get_running_loop()
    request = get_request(path)
    latencies: list[list[float]] = [[] for _ in ports]
    idle: list[list[HttpConn]] = [[] for _ in ports]
    conns: list[HttpConn] = []

    def done_for(k: int) -> Callable[[HttpConn], None]:
        def done(c: HttpConn) -> None:
            latencies[k].append((time.perf_counter_ns() - c.sent_ns) / 1e9)
            idle[k].append(c)

        return done

    for k, port in enumerate(ports):
        for _ in range(connections):
            c = cast(HttpConn, await _connect_from(HttpConn, port, None))
            await c.request(request)  # warm: the proxy's upstream pool fills too
            c.on_response = done_for(k)
            idle[k].append(c)
            conns.append(c)
    skipped = 0
    step = 1 / (rate * len(ports))
    total = int(rate * seconds) * len(ports)
    start = loop.time() + 0.05
    finished = loop.create_future()

    def finish() -> None:
        if not finished.done():
            finished.set_result(None)

    def tick(i: int) -> None:
        nonlocal skipped
        free = idle[i % len(ports)]
        if free:
            free.pop().send(request)
        else:
            skipped += 1
        if i + 1 < total:
            loop.call_at(start + (i + 1) * step, tick, i + 1)
        else:
            loop.call_later(1.0, finish)

    loop.call_at(start, tick, 0)
    await finished
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    bad = sum(1 for c in conns for s in c.reader.statuses if s != 200)
    if bad:
        raise RuntimeError(f"{bad} non-200 answers from ports {list(ports)}")
    return latencies, skipped


@dataclass
class HoldResult:
    target: int
    opened: int = 0
    failed: int = 0
    open_seconds: float = 0.0
    held: int = 0
    echoed: int = 0
    echo_latencies: list[float] = field(default_factory=list)
    fresh_echo: bool = False
    measured: dict[str, float] = field(default_factory=dict)


async def hold_websockets(
    port: int,
    path: str,
    n: int,
    sources: Sequence[str],
    hold: float,
    measure: Callable[[], dict[str, float]],
) -> HoldResult:
    """Open ``n`` WebSockets from ``sources``, hold them ``hold`` seconds, echo on every one."""
    result = HoldResult(target=n)
    start = time.perf_counter()
    protos, failures = await _open_many(lambda: WsConn(path), port, n, list(sources), 256)
    conns = [cast(WsConn, p) for p in protos]
    opened = await asyncio.gather(*(c.opened for c in conns))
    result.open_seconds = time.perf_counter() - start
    result.opened = sum(1 for ok in opened if ok)
    result.failed = failures + len(conns) - result.opened
    try:
        # a few messages during the hold, on a rotating slice, as a live deployment would see
        steps = max(1, int(hold))
        for step in range(steps):
            await asyncio.sleep(hold / steps)
            live = [c for c in conns[step::steps] if c.is_open]
            with contextlib.suppress(Exception):
                await asyncio.gather(*(c.echo(b"tick", 10) for c in live[:100]))
        result.measured = measure()
        held = [c for c in conns if c.is_open]
        result.held = len(held)
        sem = asyncio.Semaphore(500)

        async def one(c: WsConn) -> float | None:
            async with sem:
                try:
                    return await c.echo(b"still there?", 15)
                except (TimeoutError, ConnectionError):
                    return None

        rtts = await asyncio.gather(*(one(c) for c in held))
        result.echo_latencies = [r for r in rtts if r is not None]
        result.echoed = len(result.echo_latencies)
        fresh = cast(WsConn, await _connect_from(lambda: WsConn(path), port, sources[0]))
        if await fresh.opened:
            with contextlib.suppress(TimeoutError, ConnectionError):
                await fresh.echo(b"new", 10)
                result.fresh_echo = True
        fresh.close()
    finally:
        for c in conns:
            c.close()
        await asyncio.sleep(1.0)
    return result


# ------------------------------------------------------------------------ bulk transfers


def _read_head(sock: socket.socket) -> tuple[int, int, bytes]:
    """(status, content length, body bytes already read) of one response."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a response head")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            length = int(line[15:])
    return status, length, rest


def download(port: int, path: str, count: int) -> int:
    """GET ``path`` ``count`` times on one keep-alive connection; total body bytes."""
    total = 0
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for _ in range(count):
            sock.sendall(get_request(path))
            status, length, rest = _read_head(sock)
            if status != 200:
                raise RuntimeError(f"download answered {status} on port {port}")
            left = length - len(rest)
            while left > 0:
                n = sock.recv_into(view, min(left, len(buf)))
                if not n:
                    raise ConnectionError("closed during a download")
                left -= n
            total += length
    return total


def upload(port: int, path: str, size: int) -> int:
    """POST ``size`` bytes to ``path`` in one request; the bytes the sink says it received."""
    chunk = memoryview(bytes(1 << 20))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {size}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head)
        left = size
        while left > 0:
            n = min(left, len(chunk))
            sock.sendall(chunk[:n])
            left -= n
        status, length, rest = _read_head(sock)
        while len(rest) < length:
            more = sock.recv(65536)
            if not more:
                break
            rest += more
    if status != 200:
        raise RuntimeError(f"upload answered {status} on port {port}")
    received = int(rest.split(b":", 1)[1].rstrip(b"}\n"))
    if received != size:
        raise RuntimeError(f"upload sink received {received} of {size} bytes via port {port}")
    return size
