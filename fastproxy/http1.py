"""The HTTP/1.1 parser seam: the client leg and the upstream leg of one proxied connection.

[pure] Imports ``headers`` and h11 only: no asyncio, sockets, clock, logging or metrics. h11 is
used here and nowhere else, so a second parser (llhttp through httptools) can sit beside it
without touching policy or I/O, as uvicorn keeps ``h11_impl`` and ``httptools_impl``.

Theory of operation
-------------------
Client leg. A ``HeadScanner`` owns the bytes of the client connection while no request is in
progress: it finds the end of the next head and refuses, on the raw bytes, what h11 would
tolerate but a backend might read differently (bare LF, bare CR, obs-fold), and what exceeds the
size limits (414, 431). The checked head, and what follows it, is fed to a fresh h11 ``SERVER``
connection that lives for one request/response cycle. When the cycle ends its unread bytes
(``trailing``) go back to the scanner, so every pipelined request is scanned the same way.

Upstream leg. One h11 ``CLIENT`` connection per upstream TCP connection, reused across cycles
while both sides keep it alive.

Events are returned, never raised: ``next_event`` returns a head object, body ``bytes``, or an
``Ev`` member. Peer errors are raised as ``RequestRefused`` (client leg) or ``UpstreamBroken``
(upstream leg) with the status fastproxy answers.
"""

from __future__ import annotations

import enum

import h11

from fastproxy.headers import RequestRefused


class Ev(enum.Enum):
    """Control events of both legs."""

    #: more bytes are needed
    NEED_DATA = "need_data"
    #: the message is complete; nothing more until the other side acts
    PAUSED = "paused"
    #: the current message ended (body complete)
    END = "end"
    #: the upstream accepted a protocol switch (101); the leg is done with HTTP
    SWITCHED = "switched"


class UpstreamBroken(Exception):
    """The upstream sent something that is not valid HTTP/1.1."""


# --------------------------------------------------------------------------------------------
# Client leg


class HeadScanner:
    """Find and check the next request head in the client's byte stream.

    The scan resumes where it stopped, so a client dripping one byte at a time costs O(n),
    not O(n^2) (the trick of h11's ``_receivebuffer``).
    """

    __slots__ = ("_buf", "_scanned", "max_head_bytes", "max_headers", "max_uri_bytes")

    def __init__(self, max_head_bytes: int, max_headers: int, max_uri_bytes: int) -> None:
        self._buf = bytearray()
        self._scanned = 0
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self.max_uri_bytes = max_uri_bytes

    def __len__(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        self._buf += data

    def maybe_take_head(self) -> tuple[bytes, bytes] | None:
        """Return ``(head, rest)`` once a whole head is buffered, else None.

        ``rest`` is every byte after the head, handed over with it (body, or pipelined requests).
        Raises ``RequestRefused`` for malformed or oversize heads.
        """
        buf = self._buf
        # RFC 9112 2.2: a server SHOULD ignore at least one empty line before a request-line.
        while buf[:2] == b"\r\n":
            del buf[:2]
            self._scanned = max(0, self._scanned - 2)
        end = buf.find(b"\r\n\r\n", max(0, self._scanned - 3))
        if end < 0:
            self._check_partial()
            self._scanned = len(buf)
            return None
        end += 4
        if end > self.max_head_bytes:
            raise self._too_large()
        head = bytes(buf[:end])
        rest = bytes(buf[end:])
        self._buf = bytearray()
        self._scanned = 0
        self._check_head(head)
        return head, rest

    def _check_partial(self) -> None:
        """Refuse a bare CR or LF in the newly arrived bytes at once, instead of waiting for a
        CRLFCRLF that a bare-LF client never sends."""
        buf = self._buf
        start = self._scanned
        if start and buf[start - 1] == 0x0D:  # a CR whose LF may just have arrived
            start -= 1
        region = buf[start:]
        crlf = region.count(b"\r\n")
        pending_cr = 1 if region[-1:] == b"\r" else 0
        if region.count(b"\n") != crlf or region.count(b"\r") - pending_cr != crlf:
            raise RequestRefused(400, "bad_request", "bare CR or LF in the request head")
        if len(buf) > self.max_head_bytes:
            raise self._too_large()

    def _too_large(self) -> RequestRefused:
        line_end = self._buf.find(b"\r\n")
        if line_end < 0 or line_end > self.max_uri_bytes:
            return RequestRefused(414, "uri_too_long")
        return RequestRefused(431, "headers_too_large")

    @staticmethod
    def _check_line_ends(head: bytes) -> None:
        crlf = head.count(b"\r\n")
        if head.count(b"\n") != crlf or head.count(b"\r") != crlf:
            raise RequestRefused(400, "bad_request", "bare CR or LF in the request head")

    def _check_head(self, head: bytes) -> None:
        self._check_line_ends(head)
        # RFC 9112 5.2: obs-fold is refused rather than unfolded.
        if b"\r\n " in head or b"\r\n\t" in head:
            raise RequestRefused(400, "bad_request", "obsolete line folding")
        # h11 merges identical Content-Length fields ("5" twice, or "5, 5") into one; SPEC 5
        # refuses both, so they are counted here, on the raw bytes.
        lower = head.lower()
        at = lower.find(b"\ncontent-length:")
        if at >= 0:
            if lower.find(b"\ncontent-length:", at + 1) >= 0:
                raise RequestRefused(400, "bad_request", "more than one Content-Length")
            if b"," in head[at : head.find(b"\r\n", at + 1)]:
                raise RequestRefused(400, "bad_request", "a list in Content-Length")
        if head.count(b"\r\n") - 2 > self.max_headers:
            raise RequestRefused(431, "headers_too_large", "too many header fields")
        line_end = head.find(b"\r\n")
        first_space = head.find(b" ", 0, line_end)
        last_space = head.rfind(b" ", 0, line_end)
        if last_space - first_space - 1 > self.max_uri_bytes:
            raise RequestRefused(414, "uri_too_long")


class RequestHead:
    """A parsed request head, as both parsers produce it."""

    __slots__ = ("headers", "http_version", "method", "target")

    def __init__(
        self, method: bytes, target: bytes, http_version: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        self.method = method
        self.target = target
        self.http_version = http_version
        #: raw names (original case) and values, in order
        self.headers = headers


class ServerLeg:
    """The client-facing side of one request/response cycle (h11 SERVER role)."""

    __slots__ = ("_conn",)

    def __init__(self, max_head_bytes: int) -> None:
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head_bytes)

    def feed(self, data: bytes) -> None:
        self._conn.receive_data(data)

    def feed_eof(self) -> None:
        self._conn.receive_data(b"")

    def next_event(self) -> RequestHead | bytes | Ev:
        """The next request event; raise ``RequestRefused`` on a protocol violation."""
        try:
            event = self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            if status == 431:
                raise RequestRefused(431, "headers_too_large") from exc
            if "Host" in str(exc):  # h11: "Found multiple Host: headers", "Missing ... Host"
                raise RequestRefused(400, "bad_host", str(exc)) from exc
            raise RequestRefused(400, "bad_request", str(exc)) from exc
        if type(event) is h11.Data:
            return bytes(event.data)
        if type(event) is h11.Request:
            version = event.http_version
            if version not in (b"1.1", b"1.0"):
                raise RequestRefused(400, "bad_request", "HTTP version not supported")
            return RequestHead(event.method, event.target, version, event.headers.raw_items())
        if type(event) is h11.EndOfMessage:
            if event.headers:
                # h11 reads trailer fields leniently (bare LF, obs-fold) and nothing may change
                # framing or routing after the head was checked: a request with trailers is
                # refused rather than forwarded without them.
                raise RequestRefused(400, "bad_request", "trailer fields in a request")
            return Ev.END
        if event is h11.NEED_DATA:
            return Ev.NEED_DATA
        if event is h11.PAUSED:
            return Ev.PAUSED
        if type(event) is h11.ConnectionClosed:
            raise RequestRefused(400, "bad_request", "connection closed mid-request")
        raise RequestRefused(400, "bad_request", f"unexpected event {type(event).__name__}")

    def response_head(
        self, status: int, headers: list[tuple[bytes, bytes]], reason: bytes = b""
    ) -> bytes:
        if status < 200:
            event: h11.Event = h11.InformationalResponse(
                status_code=status, headers=headers, reason=reason
            )
        else:
            event = h11.Response(status_code=status, headers=headers, reason=reason)
        try:
            data = self._conn.send(event)
        except h11.LocalProtocolError as exc:
            # the upstream's head cannot be relayed as it is (e.g. a header value h11 refuses)
            raise UpstreamBroken(f"cannot relay the response head: {exc}") from exc
        assert data is not None
        return data

    def body(self, data: bytes) -> list[bytes]:
        try:
            return self._conn.send_with_data_passthrough(h11.Data(data=data)) or []
        except h11.LocalProtocolError as exc:  # more body than the relayed Content-Length
            raise UpstreamBroken(f"cannot relay the response body: {exc}") from exc

    def end(self) -> bytes:
        try:
            return self._conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError as exc:  # less body than the relayed Content-Length
            raise UpstreamBroken(f"cannot end the response: {exc}") from exc

    @property
    def response_started(self) -> bool:
        return self._conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE)

    @property
    def request_complete(self) -> bool:
        return self._conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.SWITCHED_PROTOCOL)

    @property
    def keep_alive(self) -> bool:
        """Whether the connection may carry another request after this cycle."""
        return self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE

    @property
    def trailing(self) -> bytes:
        data, _closed = self._conn.trailing_data
        return data


# --------------------------------------------------------------------------------------------
# Upstream leg


class ResponseHead:
    """A parsed response head (final or informational)."""

    __slots__ = ("headers", "reason", "status")

    def __init__(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers


class UpstreamLeg:
    """The upstream-facing side of one upstream TCP connection (h11 CLIENT role)."""

    __slots__ = ("_conn", "_eof", "received_any")

    def __init__(self) -> None:
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
        self._eof = False
        #: bytes arrived since the last request was sent (a close before any is a stale pool)
        self.received_any = False

    def request(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
        data = self._conn.send(h11.Request(method=method, target=target, headers=headers))
        assert data is not None
        return data

    def body(self, data: bytes) -> list[bytes]:
        return self._conn.send_with_data_passthrough(h11.Data(data=data)) or []

    def end(self) -> bytes:
        return self._conn.send(h11.EndOfMessage()) or b""

    def feed(self, data: bytes) -> None:
        self.received_any = True
        self._conn.receive_data(data)

    def feed_eof(self) -> None:
        if not self._eof:
            self._eof = True
            self._conn.receive_data(b"")

    def next_event(self) -> ResponseHead | bytes | Ev:
        """The next response event; raise ``UpstreamBroken`` on a protocol violation."""
        try:
            event = self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise UpstreamBroken(str(exc)) from exc
        if type(event) is h11.Data:
            return bytes(event.data)
        if type(event) is h11.Response or type(event) is h11.InformationalResponse:
            return ResponseHead(event.status_code, event.reason, event.headers.raw_items())
        if type(event) is h11.EndOfMessage:
            return Ev.END
        if event is h11.NEED_DATA:
            return Ev.NEED_DATA
        if event is h11.PAUSED:
            if self._conn.their_state is h11.SWITCHED_PROTOCOL:
                return Ev.SWITCHED
            return Ev.PAUSED
        if type(event) is h11.ConnectionClosed:
            raise UpstreamBroken("upstream closed the connection")
        raise UpstreamBroken(f"unexpected event {type(event).__name__}")

    @property
    def reusable(self) -> bool:
        return self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE

    def start_next_cycle(self) -> None:
        self._conn.start_next_cycle()
        self.received_any = False

    @property
    def idle(self) -> bool:
        return self._conn.our_state is h11.IDLE and self._conn.their_state is h11.IDLE

    @property
    def trailing(self) -> bytes:
        data, _closed = self._conn.trailing_data
        return data
