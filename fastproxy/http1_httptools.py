"""The client leg on httptools (llhttp in C): the fast implementation of the parser seam.

[pure] Imports ``http1`` and ``headers`` and httptools only. Selected by
``http_parser = "httptools"``; httptools is an optional extra (``pip install
'fastproxy[httptools]'``).

Theory of operation
-------------------
``HeadScanner`` has already cut out one whole, checked request head, so llhttp is given exactly
those bytes and nothing else: it parses the request line and the fields (about 1 µs instead of
h11's 20 µs) and stops. The body is then read by fastproxy's own strict reader below, the same
for every request, so llhttp's leniencies never decide where a body ends: Content-Length, or
``chunked`` with CRLF line ends only, bounded chunk-size lines and no trailer fields, as the h11
leg enforces. Bytes after the body are ``trailing``, handed back to the scanner.
"""

from __future__ import annotations

import enum

import httptools

from fastproxy.headers import RequestRefused
from fastproxy.http1 import ClientLeg, Ev, RequestHead, parse_chunk_size


class _State(enum.Enum):
    HEAD = "head"  #: the head is parsed but not yet returned
    LENGTH = "length"  #: a Content-Length body
    CHUNK_SIZE = "chunk_size"  #: a chunk-size line
    CHUNK_DATA = "chunk_data"  #: chunk data
    CHUNK_END = "chunk_end"  #: the CRLF after chunk data
    LAST = "last"  #: the empty line after the last chunk (trailer fields are refused)
    DONE = "done"  #: the request is complete


#: a chunk-size line longer than this is refused (h11 bounds it the same way)
MAX_CHUNK_LINE_BYTES = 1024
#: visible ASCII: the bytes a request-target may contain (RFC 9112 3.2, as h11 checks)
_VCHAR = bytes(range(0x21, 0x7F))
_OWS = (b" ", b"\t")


class _Head:
    """httptools callbacks collecting the request line and fields."""

    __slots__ = ("headers", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))


class HttptoolsLeg(ClientLeg):
    """The client leg with llhttp for the head and fastproxy's reader for the body."""

    __slots__ = ("_buf", "_head", "_remaining", "_state")

    def __init__(self, max_head_bytes: int) -> None:
        super().__init__()
        self._buf = b""
        self._state = _State.HEAD
        self._remaining = 0
        self._head: RequestHead | None = None

    def feed_head(self, head: bytes) -> None:
        # The target is taken from the request line as it is (HeadScanner guarantees exactly two
        # single spaces in it) and judged by the policy, as with h11; llhttp parses the rest of
        # the head with "/" in its place, so its URL leniencies and errors play no part.
        first = head.find(b" ")
        second = head.find(b" ", first + 1)
        target = head[first + 1 : second]
        if not target or target.translate(None, _VCHAR):
            raise RequestRefused(400, "bad_request", "invalid byte in the request target")
        fields = _Head()
        parser = httptools.HttpRequestParser(fields)
        try:
            parser.feed_data(head[: first + 1] + b"/" + head[second:])
        except httptools.HttpParserUpgrade:
            pass  # the head is complete; whether an upgrade is allowed is fastproxy's decision
        except httptools.HttpParserError as exc:
            if "Content-Length overflow" in str(exc):
                raise RequestRefused(413, "body_too_large", str(exc)) from exc
            raise RequestRefused(400, "bad_request", str(exc)) from exc
        fields.url = target
        for _name, value in fields.headers:
            # field values keep no surrounding whitespace (RFC 9110 5.5), as h11 strips them
            if value[:1] in _OWS or value[-1:] in _OWS:
                fields.headers = [(n, v.strip(b" \t")) for n, v in fields.headers]
                break
        version = parser.get_http_version().encode()
        if version not in (b"1.1", b"1.0"):
            raise RequestRefused(400, "bad_request", "HTTP version not supported")
        method = parser.get_method()
        self._head = RequestHead(method, fields.url, version, fields.headers)
        self._saw_head(method, version, fields.headers)
        # Framing by the same rules as headers.inspect_request, which refuses every ambiguous
        # combination before the body is read.
        chunked = False
        length = 0
        for name, value in fields.headers:
            if len(name) != 17 and len(name) != 14:
                continue
            lower = name.lower()
            if lower == b"transfer-encoding":
                chunked = True
            elif lower == b"content-length" and value.isdigit() and len(value) <= 18:
                length = int(value)
        if chunked:
            self._state = _State.CHUNK_SIZE
        else:
            self._remaining = length
            self._state = _State.LENGTH

    def feed(self, data: bytes) -> None:
        self._buf = self._buf + data if self._buf else data

    def next_event(self) -> RequestHead | bytes | Ev:
        if self._head is not None:
            head, self._head = self._head, None
            return head
        state = self._state
        if state is _State.LENGTH:
            remaining = self._remaining
            if not remaining:
                self._state = _State.DONE
                return Ev.END
            buf = self._buf
            if not buf:
                return Ev.NEED_DATA
            if len(buf) <= remaining:
                self._remaining = remaining - len(buf)
                self._buf = b""
                return buf
            self._buf = buf[remaining:]
            self._remaining = 0
            return buf[:remaining]
        if state is _State.CHUNK_DATA:
            buf = self._buf
            if not buf:
                return Ev.NEED_DATA
            remaining = self._remaining
            if len(buf) < remaining:
                self._remaining = remaining - len(buf)
                self._buf = b""
                return buf
            self._buf = buf[remaining:]
            self._state = _State.CHUNK_END
            return buf[:remaining]
        if state is _State.DONE:
            return Ev.PAUSED
        return self._read_chunk_lines()

    def _read_chunk_lines(self) -> bytes | Ev:
        while True:
            buf = self._buf
            line_end = buf.find(b"\r\n")
            if line_end < 0:
                if len(buf) > MAX_CHUNK_LINE_BYTES or b"\n" in buf:
                    raise RequestRefused(400, "bad_request", "bad chunk framing line")
                return Ev.NEED_DATA
            line = buf[:line_end]
            self._buf = buf[line_end + 2 :]
            if line_end > MAX_CHUNK_LINE_BYTES or b"\n" in line or b"\r" in line:
                raise RequestRefused(400, "bad_request", "bad chunk framing line")
            state = self._state
            if state is _State.CHUNK_END:
                if line:
                    raise RequestRefused(400, "bad_request", "chunk data longer than its size")
                self._state = _State.CHUNK_SIZE
                continue
            if state is _State.LAST:
                if line:
                    raise RequestRefused(400, "bad_request", "trailer fields in a request")
                self._state = _State.DONE
                return Ev.END
            try:
                size = parse_chunk_size(line)
            except ValueError as exc:
                raise RequestRefused(400, "bad_request", str(exc)) from exc
            if size:
                self._remaining = size
                self._state = _State.CHUNK_DATA
                event = self.next_event()
                assert not isinstance(event, RequestHead)
                return event
            self._state = _State.LAST

    @property
    def request_ended(self) -> bool:
        return self._state is _State.DONE

    @property
    def trailing(self) -> bytes:
        return self._buf
