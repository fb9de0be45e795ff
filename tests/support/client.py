"""Raw-socket clients for the end-to-end tests.

Requests are written as the exact bytes a test wants on the wire (malformed ones included), and
responses are parsed here by a small, lenient reader, so a test sees what the proxy really sent:
status, headers in order and original case, and the body after Content-Length, chunked or
close-delimited framing. WebSockets go through wsproto on a plain blocking socket.

Every socket has a timeout, so a proxy that hangs fails the test instead of stalling the run.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Self

import orjson
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

DEFAULT_TIMEOUT_S = 10.0
LOOPBACK = "127.0.0.1"
READ_SIZE = 65536

HeaderPairs = Sequence[tuple[str | bytes, str | bytes]]


def _b(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


def _norm(name: str | bytes) -> bytes:
    return _b(name).lower()


class ConnectionClosedError(Exception):
    """The peer closed or reset the connection before a complete response arrived."""

    def __init__(self, message: str, partial: bytes) -> None:
        super().__init__(f"{message} (received {len(partial)} bytes: {partial[:200]!r})")
        #: the bytes of the unfinished response that did arrive
        self.partial = partial


@dataclass(frozen=True, slots=True)
class Response:
    """One HTTP response as received: nothing normalised but the header-name lookups."""

    http_version: bytes
    status: int
    reason: bytes
    #: (name, value) pairs in the order and case they were sent
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes

    def header_values(self, name: str | bytes) -> list[bytes]:
        """All values of header ``name`` (case-insensitive), in order."""
        wanted = _norm(name)
        return [value for key, value in self.headers if key.lower() == wanted]

    def header(self, name: str | bytes) -> bytes | None:
        """The first value of header ``name``, or None."""
        values = self.header_values(name)
        return values[0] if values else None

    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def error(self) -> str:
        """The ``error`` code of one of fastproxy's own JSON replies."""
        code = self.json()["error"]
        assert isinstance(code, str)
        return code


def build_request(
    target: str | bytes,
    *,
    host: str | bytes | None,
    method: str | bytes = "GET",
    headers: HeaderPairs = (),
    body: bytes | None = None,
    version: str | bytes = "HTTP/1.1",
) -> bytes:
    """Serialise a request. ``host=None`` sends no Host; a body gets a Content-Length."""
    lines = [b"%s %s %s" % (_b(method), _b(target), _b(version))]
    if host is not None:
        lines.append(b"Host: " + _b(host))
    lines.extend(_b(name) + b": " + _b(value) for name, value in headers)
    if body is not None:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def host_of(port: int) -> str:
    """The Host value a client of ``127.0.0.1:port`` sends."""
    return f"{LOOPBACK}:{port}"


def chunked(body: bytes, piece: int = 65536) -> Iterable[bytes]:
    """``body`` framed as HTTP/1.1 chunks of ``piece`` bytes, ending with the last chunk."""
    for start in range(0, len(body), piece):
        part = body[start : start + piece]
        yield b"%x\r\n%s\r\n" % (len(part), part)
    yield b"0\r\n\r\n"


def _connect(
    host: str, port: int, timeout: float, tls: ssl.SSLContext | None, server_name: str | None
) -> socket.socket:
    """A TCP connection; with ``tls``, wrapped (handshake done, SNI ``server_name``)."""
    sock = socket.create_connection((host, port), timeout=timeout)
    if tls is None:
        return sock
    try:
        return tls.wrap_socket(sock, server_hostname=server_name)
    except BaseException:
        sock.close()
        raise


class HttpConnection:
    """One client connection: write raw bytes, read parsed responses in order (pipelining)."""

    def __init__(
        self,
        port: int,
        *,
        host: str = LOOPBACK,
        timeout: float = DEFAULT_TIMEOUT_S,
        tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
    ) -> None:
        self.port = port
        self.sock = _connect(host, port, timeout, tls, server_name)
        self._buffer = bytearray()
        self._eof = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, raw: bytes) -> Response:
        """Send one request and read its response (HEAD is recognised from ``raw``)."""
        self.send(raw)
        return self.read_response(method=raw.split(b" ", 1)[0])

    def get(self, target: str | bytes, headers: HeaderPairs = ()) -> Response:
        """``GET target`` with the Host a client of this port sends."""
        return self.request(build_request(target, host=host_of(self.port), headers=headers))

    def wait_closed(self, timeout: float = 5.0) -> bool:
        """True if the peer closes (or resets) within ``timeout`` and sent nothing more."""
        if self._buffer:
            return False
        if self._eof:
            return True
        previous = self.sock.gettimeout()
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(READ_SIZE)
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        finally:
            self.sock.settimeout(previous)
        if data:
            self._buffer += data
            return False
        self._eof = True
        return True

    def _fill(self) -> bool:
        """Read more bytes into the buffer; False at end of stream."""
        if self._eof:
            return False
        try:
            data = self.sock.recv(READ_SIZE)
        except ConnectionResetError:
            data = b""
        if not data:
            self._eof = True
            return False
        self._buffer += data
        return True

    def _take_line(self, partial: bytearray) -> bytes:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[: end + 1])
                del self._buffer[: end + 1]
                partial += line
                return line.rstrip(b"\r\n")
            if not self._fill():
                raise ConnectionClosedError("closed inside a line", bytes(partial + self._buffer))

    def _take_exact(self, size: int, partial: bytearray) -> bytes:
        while len(self._buffer) < size:
            if not self._fill():
                raise ConnectionClosedError(
                    f"closed with {size - len(self._buffer)} body bytes missing",
                    bytes(partial + self._buffer),
                )
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        partial += data
        return data

    def read_response(self, *, method: bytes = b"GET") -> Response:
        """Read the next final response (interim 1xx other than 101 are skipped).

        Raises ``ConnectionClosedError`` if the stream ends before the response is complete.
        """
        while True:
            response = self._read_one(method)
            if response.status == 101 or not 100 <= response.status < 200:
                return response

    def _read_one(self, method: bytes) -> Response:
        partial = bytearray()
        if not self._buffer and not self._fill():
            raise ConnectionClosedError("closed before a response", b"")
        status_line = self._take_line(partial)
        version, status, reason = [*status_line.split(b" ", 2), b""][:3]
        headers: list[tuple[bytes, bytes]] = []
        while line := self._take_line(partial):
            name, _, value = line.partition(b":")
            headers.append((name, value.strip(b" \t")))
        response = Response(version, int(status), reason, tuple(headers), b"")
        code = response.status
        if method == b"HEAD" or code in {101, 204, 304} or 100 <= code < 200:
            return response
        body = self._read_body(response, partial)
        return Response(version, code, reason, tuple(headers), body)

    def _read_body(self, response: Response, partial: bytearray) -> bytes:
        encodings = b",".join(response.header_values("transfer-encoding")).lower()
        if b"chunked" in encodings:
            return self._read_chunked(partial)
        length = response.header("content-length")
        if length is not None:
            return self._take_exact(int(length), partial)
        while self._fill():  # RFC 9112 §6.3: no framing means the body ends at close
            pass
        body = bytes(self._buffer)
        self._buffer.clear()
        return body

    def _read_chunked(self, partial: bytearray) -> bytes:
        body = bytearray()
        while True:
            size = int(self._take_line(partial).split(b";", 1)[0].strip(), 16)
            if size == 0:
                while self._take_line(partial):  # trailer section
                    pass
                return bytes(body)
            body += self._take_exact(size, partial)
            self._take_line(partial)


def http_request(port: int, raw: bytes, timeout: float = DEFAULT_TIMEOUT_S) -> Response:
    """Send ``raw`` on a new connection to ``127.0.0.1:port`` and return the one response."""
    with HttpConnection(port, timeout=timeout) as conn:
        return conn.request(raw)


def get(port: int, target: str | bytes, headers: HeaderPairs = ()) -> Response:
    """``GET target`` on a new connection, with the Host a client of this port sends."""
    return http_request(port, build_request(target, host=host_of(port), headers=headers))


class WebSocketRejectedError(Exception):
    """The handshake was answered with something other than 101."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"handshake rejected with {status}: {body[:200]!r}")
        self.status = status
        self.body = body


class WebSocketClosedError(Exception):
    """The peer closed the WebSocket; ``code`` is 1006 when TCP closed without a Close frame."""

    def __init__(self, code: int, reason: str | None) -> None:
        super().__init__(f"closed with {code} {reason or ''}".rstrip())
        self.code = code
        self.reason = reason


class WebSocketClient:
    """A minimal blocking WebSocket client (RFC 6455) on wsproto."""

    def __init__(
        self,
        port: int,
        target: str = "/sockets/1/x",
        *,
        headers: HeaderPairs = (),
        timeout: float = DEFAULT_TIMEOUT_S,
        tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
    ) -> None:
        self.sock = _connect(LOOPBACK, port, timeout, tls, server_name)
        self._ws = WSConnection(ConnectionType.CLIENT)
        self._pending: list[Event] = []
        self._eof = False
        try:
            self._handshake(host_of(port), target, headers)
        except BaseException:
            self.sock.close()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.sock.close()

    def _handshake(self, host: str, target: str, headers: HeaderPairs) -> None:
        extra = [(_b(name), _b(value)) for name, value in headers]
        self.sock.sendall(self._ws.send(Request(host=host, target=target, extra_headers=extra)))
        status, body = 0, bytearray()
        while True:
            events = self._receive()
            if self._eof and self._ws.state is ConnectionState.CONNECTING:
                raise ConnectionClosedError("closed during the WebSocket handshake", bytes(body))
            for event in events:
                if isinstance(event, AcceptConnection):
                    continue
                if isinstance(event, RejectConnection):
                    status = event.status_code
                    if not event.has_body:
                        raise WebSocketRejectedError(status, b"")
                elif isinstance(event, RejectData):
                    body += event.data
                    if event.body_finished:
                        raise WebSocketRejectedError(status, bytes(body))
                else:
                    self._pending.append(event)
            if self._ws.state is ConnectionState.OPEN:
                return

    def _receive(self) -> list[Event]:
        """Block for bytes from the peer and return the events they make (EOF included)."""
        try:
            data = self.sock.recv(READ_SIZE)
        except ConnectionResetError:
            data = b""
        self._eof = not data
        self._ws.receive_data(data or None)
        return list(self._ws.events())

    def send_text(self, text: str) -> None:
        self.sock.sendall(self._ws.send(TextMessage(data=text)))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(self._ws.send(BytesMessage(data=data)))

    def send_raw(self, data: bytes) -> None:
        """Write bytes as they are, bypassing wsproto (for malformed frames)."""
        self.sock.sendall(data)

    def recv(self) -> str | bytes:
        """The next whole message; raises ``WebSocketClosedError`` when the peer closes."""
        parts: list[str | bytes | bytearray] = []
        while True:
            events, self._pending = self._pending, []
            if not events:
                events = self._receive()
            for index, event in enumerate(events):
                if isinstance(event, TextMessage | BytesMessage):
                    parts.append(event.data)
                    if event.message_finished:
                        self._pending = events[index + 1 :]
                        if isinstance(parts[0], str):
                            return "".join(part for part in parts if isinstance(part, str))
                        return b"".join(part for part in parts if not isinstance(part, str))
                elif isinstance(event, Ping):
                    self.sock.sendall(self._ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    self._answer_close(event)
                    raise WebSocketClosedError(event.code, event.reason)

    def _answer_close(self, event: CloseConnection) -> None:
        # RFC 6455 §5.5.1: a Close we did not start is answered with a Close
        if self._ws.state is ConnectionState.REMOTE_CLOSING:
            with contextlib.suppress(OSError):
                self.sock.sendall(self._ws.send(event.response()))

    def close(self, code: int = 1000) -> int:
        """Start the closing handshake and return the code of the peer's Close frame."""
        self.sock.sendall(self._ws.send(CloseConnection(code=code)))
        while True:
            for event in self._pending or self._receive():
                if isinstance(event, CloseConnection):
                    self.sock.close()
                    return event.code
            self._pending = []


def assert_error(response: Response, status: int, code: str | None = None) -> None:
    """Check one of fastproxy's own replies: status, a JSON body with ``error`` (equal to
    ``code`` when given) and a non-empty ``request_id`` matching any ``X-Request-Id`` header."""
    assert response.status == status, (response.status, response.headers, response.body[:500])
    assert (response.header("content-type") or b"").startswith(b"application/json"), response
    document = response.json()
    assert isinstance(document, dict), document
    if code is not None:
        assert document.get("error") == code, document
    else:
        assert isinstance(document.get("error"), str), document
    request_id = document.get("request_id")
    assert isinstance(request_id, str) and request_id, document
    header = response.header("x-request-id")
    if header is not None:
        assert header.decode("latin-1") == request_id, (header, document)
