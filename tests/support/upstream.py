"""The recording upstream: a real HTTP/1.1 + WebSocket server that remembers what reached it.

It runs on 127.0.0.1 on an ephemeral port, in a background thread with its own asyncio loop, and
parses with h11, so what it records is what a strict backend would have read: each request's
method, raw target, version, headers in original case and order (``Headers.raw_items()``) and
body, plus the raw bytes of every connection (for smuggling checks) and which connection carried
each request (for keep-alive checks).

Behaviour is chosen by the query string, which the proxy forwards byte for byte:

- ``delay=S``: wait S seconds before answering;
- ``status=NNN``: answer with that status;
- ``size=N``: a body of N bytes of ``pattern_body`` with a Content-Length;
- ``chunked=N``: the same N bytes sent as several chunks;
- ``echo=1``: the body is the request body;
- ``close=1``: ``Connection: close``;
- ``headers=1``: add hop-by-hop and custom response headers (see ``EXTRA_RESPONSE_HEADERS``);
- ``page=ws``: ``BROWSER_PAGE``, an HTML page whose script opens a WebSocket to
  ``/sockets/1/browser`` on its own origin (``ws:`` or ``wss:``), sends a message and reports
  the echo with a request to ``/api/1/devices/report?echo=...&scheme=...``;
- ``reset=1``: send the head and part of the body, then reset the TCP connection;
- ``stall=S``: send the head and part of the body, then stay silent for S seconds and close;
- on a WebSocket handshake, ``ws=echo`` (default: 101 and echo), ``ws=426``, ``ws=200`` (refuse
  and stay HTTP) or ``ws=badaccept`` (101 with a wrong ``Sec-WebSocket-Accept``).

Otherwise the answer is 200 with a JSON summary of the request. ``GET /up`` (the proxy's health
check) is answered and recorded but left out of ``requests()`` unless asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field

import h11
import orjson
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.utilities import generate_accept_token

HEALTH_TARGET = b"/up"
READ_SIZE = 65536
WRITE_SLICE = 65536
#: bytes sent before a ``reset=1`` connection is reset, and the length it announced
RESET_AFTER_BYTES = 65536
RESET_ANNOUNCED_BYTES = 1_000_000
#: headers added by ``headers=1``: hop-by-hop ones the proxy must remove, custom ones it must keep
EXTRA_RESPONSE_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"Connection", b"keep-alive, X-Up-Hop"),
    (b"X-Up-Hop", b"secret"),
    (b"Keep-Alive", b"timeout=5"),
    (b"Proxy-Connection", b"keep-alive"),
    (b"X-Resp_Under", b"1"),
    (b"X-Resp-Dup", b"a"),
    (b"X-Resp-Dup", b"b"),
    (b"Set-Cookie", b"a=1"),
    (b"Set-Cookie", b"b=2"),
)
_PATTERN = bytes(range(251))  # a prime period, so a shifted or repeated slice shows


def pattern_body(size: int) -> bytes:
    """The deterministic body ``size=N`` and ``chunked=N`` send."""
    return (_PATTERN * (size // len(_PATTERN) + 1))[:size]


#: what ``page=ws`` serves: a browser's round trip over a WebSocket on the page's own origin
BROWSER_PAGE = b"""<!doctype html>
<html><head><title>fastproxy</title></head><body><p id="state">loading</p><script>
const scheme = location.protocol === "https:" ? "wss:" : "ws:";
const socket = new WebSocket(scheme + "//" + location.host + "/sockets/1/browser");
socket.onopen = () => socket.send("hello from " + location.protocol);
socket.onmessage = (event) => {
  document.getElementById("state").textContent = "echo: " + event.data;
  fetch("/api/1/devices/report?echo=" + encodeURIComponent(event.data)
        + "&scheme=" + location.protocol.replace(":", ""));
};
socket.onerror = () => fetch("/api/1/devices/report?error=1");
</script></body></html>
"""


def query_params(target: bytes) -> dict[str, str]:
    """The query of ``target`` as a dict, without percent-decoding (last value wins)."""
    query = target.partition(b"?")[2].decode("latin-1")
    params: dict[str, str] = {}
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if name:
            params[name] = value
    return params


@dataclass(slots=True)
class RecordedRequest:
    """One request as the upstream parsed it. ``body`` grows until ``complete``."""

    conn_id: int
    method: bytes
    target: bytes
    http_version: bytes
    #: (name, value) in original case and order
    headers: list[tuple[bytes, bytes]]
    body_buffer: bytearray = field(default_factory=bytearray)
    complete: bool = False

    @property
    def body(self) -> bytes:
        return bytes(self.body_buffer)

    @property
    def path(self) -> bytes:
        return self.target.partition(b"?")[0]

    def header_values(self, name: str | bytes) -> list[bytes]:
        """Values of header ``name`` compared case-insensitively, in order."""
        wanted = (name.encode() if isinstance(name, str) else name).lower()
        return [value for key, value in self.headers if key.lower() == wanted]

    def header(self, name: str | bytes) -> bytes | None:
        values = self.header_values(name)
        return values[0] if values else None

    def header_names(self) -> list[bytes]:
        return [key for key, _ in self.headers]


@dataclass(slots=True)
class RecordedConnection:
    """One TCP connection the upstream accepted."""

    conn_id: int
    raw: bytearray = field(default_factory=bytearray)
    #: whole WebSocket messages received after a 101, in order
    ws_messages: list[str | bytes] = field(default_factory=list)
    closed: bool = False


class _Reset(Exception):
    """Control flow: the handler reset its own connection."""


class RecordingUpstream:
    """Start with ``start()``, stop with ``stop()``; the fixture ``upstream`` does both."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.host = host
        #: a server context: the upstream speaks TLS (tests of upstream TLS)
        self.ssl_context = ssl_context
        #: 0: an ephemeral port; another number: that port (a server restarted where it was)
        self.port = port
        #: unexpected exceptions inside the server; a test's teardown fails if any are left
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._connections: list[RecordedConnection] = []
        self._next_conn_id = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._run, name="recording-upstream", daemon=True)

    # -- life cycle (test thread) ------------------------------------------------------------

    @property
    def address(self) -> str:
        """``host:port``, as written in the proxy's ``servers`` list."""
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10.0) or not self.port or self.errors:
            raise RuntimeError(f"recording upstream did not start: {self.errors!r}")

    def stop(self) -> None:
        stopping = self._stopping
        if stopping is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(stopping.set)
        self._thread.join(10.0)
        if self._thread.is_alive():
            raise RuntimeError("recording upstream did not stop")

    def reset(self) -> None:
        """Forget what was recorded so far; connections still open stay listed, emptied."""
        with self._lock:
            self._requests.clear()
            self._connections = [c for c in self._connections if not c.closed]
            for connection in self._connections:
                connection.raw.clear()
                connection.ws_messages.clear()

    # -- what was received (test thread) -----------------------------------------------------

    def requests(self, *, include_health: bool = False) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self._requests if include_health or r.target != HEALTH_TARGET]

    def targets(self) -> list[bytes]:
        return [r.target for r in self.requests()]

    def find(self, target: bytes) -> list[RecordedRequest]:
        """Recorded requests whose target equals ``target``."""
        return [r for r in self.requests() if r.target == target]

    def saw_path(self, path: bytes) -> bool:
        """Whether any request for ``path`` (any query) arrived."""
        return any(r.path == path for r in self.requests())

    def connections(self) -> list[RecordedConnection]:
        with self._lock:
            return list(self._connections)

    def raw_received(self) -> bytes:
        """Every byte received on every connection, connection after connection."""
        return b"".join(bytes(c.raw) for c in self.connections())

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Wait until ``count`` complete requests were recorded; return them all."""
        deadline = time.monotonic() + timeout
        while True:
            done = [r for r in self.requests() if r.complete]
            if len(done) >= count or time.monotonic() > deadline:
                return done
            time.sleep(0.02)

    # -- the server (loop thread) ------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.set_exception_handler(self._on_loop_error)
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            self._ready.set()
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        exc = context.get("exception")
        self.errors.append(exc if isinstance(exc, BaseException) else RuntimeError(str(context)))

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(
            self._handle, self.host, self.port, ssl=self.ssl_context
        )
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stopping.wait()
        server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        with self._lock:
            record = RecordedConnection(self._next_conn_id)
            self._next_conn_id += 1
            self._connections.append(record)
        try:
            await self._serve_http(reader, writer, record)
        except (_Reset, ConnectionError, h11.RemoteProtocolError):
            pass  # the peer went away or broke the protocol; the raw bytes are recorded
        except asyncio.CancelledError:
            # only ``stop()`` cancels handlers; ending normally keeps the stream callback of
            # asyncio (which reads ``task.exception()``) from reporting the cancellation
            return
        except BaseException as exc:
            self.errors.append(exc)
            raise
        finally:
            record.closed = True
            writer.close()
            try:
                # OSError (ConnectionError included): the peer left first. CancelledError:
                # ``stop()`` while a TLS close waits for the peer's close_notify; the handler
                # ends normally, as above
                with contextlib.suppress(OSError, asyncio.CancelledError):
                    await writer.wait_closed()
            finally:
                self._tasks.discard(task)

    async def _read(self, reader: asyncio.StreamReader, record: RecordedConnection) -> bytes:
        try:
            data = await reader.read(READ_SIZE)
        except ConnectionError:
            data = b""
        record.raw += data
        return data

    async def _serve_http(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rec: RecordedConnection
    ) -> None:
        conn = h11.Connection(h11.SERVER)
        request: RecordedRequest | None = None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await self._read(reader, rec))
            elif isinstance(event, h11.Request):
                request = RecordedRequest(
                    conn_id=rec.conn_id,
                    method=event.method,
                    target=event.target,
                    http_version=event.http_version,
                    headers=list(event.headers.raw_items()),
                )
                with self._lock:
                    self._requests.append(request)
                if conn.they_are_waiting_for_100_continue:
                    writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
            elif isinstance(event, h11.Data):
                assert request is not None
                request.body_buffer += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                request.complete = True
                if await self._respond(conn, request, reader, writer, rec):
                    return  # the connection left HTTP (WebSocket or a refused tunnel)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    await writer.drain()
                    return
                conn.start_next_cycle()
            else:  # ConnectionClosed, or PAUSED after the peer stopped early
                return

    async def _respond(
        self,
        conn: h11.Connection,
        request: RecordedRequest,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        rec: RecordedConnection,
    ) -> bool:
        """Answer ``request``; True when the connection switched away from HTTP."""
        params = query_params(request.target)
        if "delay" in params:
            await asyncio.sleep(float(params["delay"]))
        # after an upgrade request h11 holds the client in MIGHT_SWITCH_PROTOCOL (not exported)
        proposes_switch = conn.their_state not in {h11.DONE, h11.MUST_CLOSE}
        upgrade = (request.header(b"upgrade") or b"").strip().lower()
        if proposes_switch and upgrade == b"websocket":
            mode = params.get("ws", "echo")
            if mode in {"echo", "badaccept"}:
                await self._switch(conn, request, reader, writer, rec, mode)
                return True
            if mode == "426":
                headers = [(b"Sec-WebSocket-Version", b"13"), (b"Content-Type", b"text/plain")]
                await self._send(conn, writer, 426, headers, b"upgrade required\n", request)
            else:
                headers = [(b"Content-Type", b"text/plain")]
                await self._send(conn, writer, 200, headers, b"not a websocket\n", request)
            return False

        status = int(params.get("status", "200"))
        headers = [(b"Content-Type", b"application/octet-stream")]
        if params.get("close") == "1":
            headers.append((b"Connection", b"close"))
        if params.get("headers") == "1":
            headers.extend(EXTRA_RESPONSE_HEADERS)
        if params.get("reset") == "1":
            await self._send_and_reset(conn, writer, headers)
        if "stall" in params:
            await self._send_and_stall(conn, writer, headers, float(params["stall"]))
        if "chunked" in params:
            await self._send_chunked(conn, writer, status, headers, int(params["chunked"]))
            return False
        if params.get("page") == "ws":
            headers[0] = (b"Content-Type", b"text/html; charset=utf-8")
            body = BROWSER_PAGE
        elif params.get("echo") == "1":
            body = request.body
        elif "size" in params:
            body = pattern_body(int(params["size"]))
        else:
            headers[0] = (b"Content-Type", b"application/json")
            body = orjson.dumps(
                {
                    "conn_id": request.conn_id,
                    "method": request.method.decode("latin-1"),
                    "target": request.target.decode("latin-1"),
                    "headers": [
                        [k.decode("latin-1"), v.decode("latin-1")] for k, v in request.headers
                    ],
                    "body_bytes": len(request.body_buffer),
                }
            )
        await self._send(conn, writer, status, headers, body, request)
        return False

    async def _send(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        request: RecordedRequest,
    ) -> None:
        # RFC 9110 §6.4.1: 1xx, 204 and 304 have no body; a HEAD answer has the length, no body
        bodiless = status in {204, 304} or status < 200
        if not bodiless:
            headers = [*headers, (b"Content-Length", str(len(body)).encode())]
        writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
        if not bodiless and request.method != b"HEAD":
            for start in range(0, len(body), WRITE_SLICE):
                writer.write(conn.send(h11.Data(data=body[start : start + WRITE_SLICE])))
                await writer.drain()
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()

    async def _send_chunked(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        status: int,
        headers: list[tuple[bytes, bytes]],
        size: int,
    ) -> None:
        # without a Content-Length h11 frames an HTTP/1.1 answer as chunked
        body = pattern_body(size)
        piece = max(1, min(WRITE_SLICE, size // 4 or 1))
        writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
        for start in range(0, size, piece):
            writer.write(conn.send(h11.Data(data=body[start : start + piece])))
            await writer.drain()
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()

    async def _send_partial(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, headers: list[tuple[bytes, bytes]]
    ) -> None:
        """The head and the first part of a body that will never be completed."""
        length = (b"Content-Length", str(RESET_ANNOUNCED_BYTES).encode())
        writer.write(conn.send(h11.Response(status_code=200, headers=[*headers, length])))
        writer.write(conn.send(h11.Data(data=pattern_body(RESET_AFTER_BYTES))))
        await writer.drain()

    async def _send_and_stall(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        headers: list[tuple[bytes, bytes]],
        seconds: float,
    ) -> None:
        await self._send_partial(conn, writer, headers)
        await asyncio.sleep(seconds)
        writer.transport.abort()
        raise _Reset

    async def _send_and_reset(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, headers: list[tuple[bytes, bytes]]
    ) -> None:
        await self._send_partial(conn, writer, headers)
        await asyncio.sleep(0.3)  # let the proxy relay the head before the reset
        sock = writer.get_extra_info("socket")
        # SO_LINGER with a zero timeout makes close() send RST instead of FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        raise _Reset

    async def _switch(
        self,
        conn: h11.Connection,
        request: RecordedRequest,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        rec: RecordedConnection,
        mode: str,
    ) -> None:
        key = request.header(b"sec-websocket-key") or b""
        if mode == "badaccept":
            key = b"not-the-" + key
        headers = [
            (b"Upgrade", b"websocket"),
            (b"Connection", b"Upgrade"),
            (b"Sec-WebSocket-Accept", generate_accept_token(key)),
        ]
        writer.write(conn.send(h11.InformationalResponse(status_code=101, headers=headers)))
        await writer.drain()
        trailing, closed = conn.trailing_data
        if mode == "badaccept":
            while await self._read(reader, rec):  # a wrong token: wait for the proxy to give up
                pass
            return
        ws = Connection(ConnectionType.SERVER, trailing_data=trailing)
        if closed:
            ws.receive_data(None)
        await self._echo(ws, reader, writer, rec)

    async def _echo(
        self,
        ws: Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        rec: RecordedConnection,
    ) -> None:
        message: list[str | bytes] = []
        while True:
            out: list[bytes] = []
            for event in ws.events():
                if isinstance(event, TextMessage | BytesMessage):
                    data = event.data if isinstance(event.data, str) else bytes(event.data)
                    message.append(data)
                    if event.message_finished:
                        rec.ws_messages.append(_join(message))
                        message = []
                    if isinstance(data, str):
                        echo = TextMessage(data, message_finished=event.message_finished)
                        out.append(ws.send(echo))
                    else:
                        out.append(
                            ws.send(BytesMessage(data, message_finished=event.message_finished))
                        )
                elif isinstance(event, Ping):
                    out.append(ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    if ws.state is ConnectionState.REMOTE_CLOSING:
                        out.append(ws.send(event.response()))
                    elif ws.state is ConnectionState.OPEN:  # wsproto reports a bad frame so
                        out.append(ws.send(CloseConnection(code=event.code)))
                    writer.write(b"".join(out))
                    await writer.drain()
                    return
            if out:
                writer.write(b"".join(out))
                await writer.drain()
            ws.receive_data(await self._read(reader, rec) or None)


def _text(value: bytes) -> str:
    return value.decode("latin-1")


def _join(parts: list[str | bytes]) -> str | bytes:
    if parts and isinstance(parts[0], str):
        return "".join(part for part in parts if isinstance(part, str))
    return b"".join(part for part in parts if isinstance(part, bytes))
