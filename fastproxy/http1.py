"""The HTTP/1.1 parser seam: the client leg and the upstream leg of one proxied connection.

[pure] Imports ``headers`` and h11 only: no asyncio, sockets, clock, logging or metrics. h11 is
used here and nowhere else, so a second parser (llhttp through httptools) can sit beside it
without touching policy or I/O, as uvicorn keeps ``h11_impl`` and ``httptools_impl``.

Theory of operation
-------------------
Client leg. A ``HeadScanner`` owns the bytes of the client connection while no request is in
progress: it finds the end of the next head and refuses, on the raw bytes, what h11 would
tolerate but a backend might read differently (bare LF, bare CR, obs-fold), and what exceeds the
size limits (414, 431). The checked head goes to a fresh client leg that lives for one
request/response cycle (``ServerLeg``: h11's request reader, without an ``h11.Connection``), and
what follows it to that leg's body reader. When the cycle ends its unread bytes (``trailing``)
go back to the scanner, so every pipelined request is scanned the same way.

Responses. The client leg frames what it relays with fastproxy's own writer: the upstream's
Content-Length and body bytes pass through untouched, a chunked or close-delimited body is
chunked for HTTP/1.1 clients. Heads are serialised once, with one ``join``.

Upstream leg. One ``UpstreamLeg`` per upstream TCP connection, reused across cycles while both
sides keep it alive: fastproxy's own request serialiser and a small strict response reader that
holds responses to the standard of requests (502 for any framing two readers could take two
ways, before anything of the response is relayed).

Linear reading. Every reader consumes its buffer at an offset: a read is kept as the ``bytes``
object received, and only the rare read that ends inside a line or head starts a ``bytearray``,
compacted only when its consumed part is the larger (as h11's ``_receivebuffer`` does). No
reader re-slices what is left per element, and the data of all the chunks one read holds is one
body event, so the cost is linear in the bytes received whatever their shape; the readers count
the bytes they copy (``copied``) for ``tests/perf/test_linear.py``.

Events are returned, never raised: ``next_event`` returns a head object, body ``bytes``, or an
``Ev`` member. Peer errors are raised as ``RequestRefused`` (client leg) or ``UpstreamBroken``
(upstream leg) with the status fastproxy answers.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Final, cast

import h11
from h11._readers import maybe_read_from_IDLE_client
from h11._receivebuffer import ReceiveBuffer

try:
    from mypy_extensions import mypyc_attr
except ImportError:  # the usual case at run time: mypyc reads the decorator when it compiles
    from fastproxy.accel import mypyc_attr

from fastproxy.headers import (
    CONNECTION_OPTIONS,
    RESPONSE_DROPPED,
    RESPONSE_DROPPED_LENGTHS,
    RequestRefused,
    fold,
)


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


# The members of this module's enums as module constants, the only way the code below reads
# them: on CPython 3.11 a member read off its class goes through ``EnumType.__getattr__``'s slot
# wrapper, about four times the cost of a module global, and the readers test their state on
# every event (several dozen reads per proxied request).
_EV_NEED_DATA: Final = Ev.NEED_DATA
_EV_PAUSED: Final = Ev.PAUSED
_EV_END: Final = Ev.END
_EV_SWITCHED: Final = Ev.SWITCHED


class UpstreamBroken(Exception):
    """The upstream sent something that is not valid HTTP/1.1."""


# --------------------------------------------------------------------------------------------
# Client leg


def _append(buf: bytes | bytearray, pos: int, data: bytes) -> tuple[bytearray, int, int]:
    """``data`` appended to the unread part ``buf[pos:]`` of a reader's buffer, for the rare read
    that does not start at a boundary: ``(buffer, new pos, bytes copied)``.

    The unread bytes of a received ``bytes`` object are copied once into a ``bytearray``, which
    then grows in place. Its consumed front is dropped only when it is larger than the rest (as
    h11's ``_receivebuffer`` compacts), so each byte is moved a bounded number of times however
    the input is cut: a reader stays linear in the bytes it is given.
    """
    if type(buf) is bytes:
        grown = bytearray(memoryview(buf)[pos:])
        copied = len(grown) + len(data)
        grown += data
        return grown, 0, copied
    assert isinstance(buf, bytearray)
    copied = len(data)
    if pos > len(buf) - pos:
        del buf[:pos]
        copied += len(buf)
        pos = 0
    buf += data
    return buf, pos, copied


def _slice(buf: bytes | bytearray, start: int, stop: int) -> bytes:
    """``bytes`` of ``buf[start:stop]``: events are always ``bytes``, even from a ``bytearray``."""
    if type(buf) is bytes:
        return buf[start:stop]
    with memoryview(buf) as view:
        return bytes(view[start:stop])


def _join(buf: bytes | bytearray, spans: list[int]) -> bytes:
    """The bytes of several ``start, stop`` spans of ``buf``, copied once into one object."""
    if len(spans) == 2:
        return _slice(buf, spans[0], spans[1])
    with memoryview(buf) as view:
        return b"".join([view[spans[i] : spans[i + 1]] for i in range(0, len(spans), 2)])


#: blank lines skipped at once before a request line (a client may send many)
_CRLF_BLOCK = b"\r\n" * 512
#: CR and LF as ints: ``_CR in head`` is a memchr (``b"\r" in head`` tries its operand as an
#: index first, and builds and drops a TypeError)
_CR = 0x0D
_LF = 0x0A


class HeadScanner:
    """Find and check the next request head in the client's byte stream.

    The scan resumes where it stopped, so a client dripping one byte at a time costs O(n),
    not O(n^2) (the trick of h11's ``_receivebuffer``). The buffer is the received ``bytes``
    object itself until a second piece arrives (a head read whole is never copied) and only
    then a ``bytearray`` that grows in place; an idle connection holds the shared empty ``b""``.
    Blank lines before a request line are skipped by moving an offset, never by re-slicing the
    buffer, so megabytes of CRLF cost one pass. ``copied`` counts the bytes moved between
    buffers (the linear-time guard in ``tests/perf/test_linear.py`` reads it).
    """

    __slots__ = ("_buf", "_scanned", "copied", "max_head_bytes", "max_headers", "max_uri_bytes")

    def __init__(self, max_head_bytes: int, max_headers: int, max_uri_bytes: int) -> None:
        self._buf: bytes | bytearray = b""
        self._scanned = 0
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self.max_uri_bytes = max_uri_bytes
        self.copied = 0

    def __len__(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        buf = self._buf
        if not buf:
            self._buf = data
        else:
            self._buf, _pos, copied = _append(buf, 0, data)
            self.copied += copied

    def maybe_take_head(self) -> tuple[bytes, bytes] | None:
        """Return ``(head, rest)`` once a whole head is buffered, else None.

        ``rest`` is every byte after the head, handed over with it (body, or pipelined requests).
        Raises ``RequestRefused`` for malformed or oversize heads.
        """
        buf = self._buf
        # RFC 9112 2.2: a server SHOULD ignore at least one empty line before a request-line.
        if buf[:2] == b"\r\n":
            buf = self._skip_blank_lines()
        scanned = self._scanned
        end = buf.find(b"\r\n\r\n", scanned - 3 if scanned > 3 else 0)
        if end < 0:
            if buf:
                self._check_partial()
                self._scanned = len(buf)
            return None
        end += 4
        if end > self.max_head_bytes:
            raise self._too_large()
        if type(buf) is bytes:
            head = buf[:end]  # the very object received when it is exactly one head
            rest = buf[end:]
        else:
            head = _slice(buf, 0, end)
            rest = _slice(buf, end, len(buf))
        self._buf = b""
        self._scanned = 0
        self._check_head(head)
        return head, rest

    def _skip_blank_lines(self) -> bytes | bytearray:
        """Drop the CRLFs at the start of the buffer: whole blocks first, then pairs, so a flood
        of blank lines costs a few calls per block, and what follows is copied at most once."""
        buf = self._buf
        start = 0
        while buf.startswith(_CRLF_BLOCK, start):
            start += len(_CRLF_BLOCK)
        while buf.startswith(b"\r\n", start):
            start += 2
        if start == len(buf):
            self._buf = b""
        elif type(buf) is bytes:
            self._buf = buf[start:]
            self.copied += len(buf) - start
        else:
            assert isinstance(buf, bytearray)
            del buf[:start]
            self.copied += len(buf)
        self._scanned = 0
        return self._buf

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
        """414 when the target alone is over its limit, else 431."""
        buf = self._buf
        line_end = buf.find(b"\r\n")
        line = buf if line_end < 0 else buf[:line_end]
        first = line.find(b" ")
        last = len(line) if line_end < 0 else line.rfind(b" ")
        if last - first - 1 > self.max_uri_bytes:
            return RequestRefused(414, "uri_too_long")
        return RequestRefused(431, "headers_too_large")

    def _check_head(self, head: bytes) -> None:
        # (bytes.count and bytes.find parse their arguments the slow way on CPython 3.11: the
        # checks use as few as they can, and look for single bytes as ints)
        # CR and LF only as CRLF (RFC 9112 2.2): with the CRLFs taken out, none is left
        bare = head.replace(b"\r\n", b"")
        if _LF in bare or _CR in bare:
            raise RequestRefused(400, "bad_request", "bare CR or LF in the request head")
        # RFC 9112 5.2: obs-fold is refused rather than unfolded.
        if head.find(b"\r\n ") >= 0 or head.find(b"\r\n\t") >= 0:
            raise RequestRefused(400, "bad_request", "obsolete line folding")
        # h11 merges identical Content-Length fields ("5" twice, or "5, 5") into one; SPEC 5
        # refuses both, so they are counted here, on the raw bytes.
        lower = head.lower()
        at = lower.find(b"\ncontent-length:")
        if at >= 0:
            if lower.find(b"\ncontent-length:", at + 1) >= 0:
                raise RequestRefused(400, "bad_request", "more than one Content-Length")
            if head.find(b",", at, head.find(b"\r\n", at + 1)) >= 0:
                raise RequestRefused(400, "bad_request", "a list in Content-Length")
        # every line ends in CRLF: as many lines as CRLFs, less the request line and the last
        if (len(head) - len(bare)) // 2 - 2 > self.max_headers:
            raise RequestRefused(431, "headers_too_large", "too many header fields")
        # RFC 9112 3: method SP request-target SP HTTP-version, single spaces (llhttp is lenient)
        parts = head[: head.find(b"\r\n")].split(b" ")
        if len(parts) != 3:
            raise RequestRefused(400, "bad_request", "malformed request line")
        if len(parts[1]) > self.max_uri_bytes:
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


class _Req(enum.Enum):
    """States of the client leg's request body reader."""

    HEAD = "head"  #: the head is parsed but not yet returned
    LENGTH = "length"  #: a Content-Length body
    CHUNKED = "chunked"  #: a chunked body (``ChunkedReader``)
    DONE = "done"  #: the request is complete


_REQ_HEAD: Final = _Req.HEAD
_REQ_LENGTH: Final = _Req.LENGTH
_REQ_CHUNKED: Final = _Req.CHUNKED
_REQ_DONE: Final = _Req.DONE


#: a chunk-size line longer than this is refused (as h11 bounds it), on both legs
MAX_CHUNK_LINE_BYTES = 1024
#: chunks whose data one body event joins at most: a read full of tiny chunks is handed over
#: in slices of bounded work, so that the worker can let other connections run in between
MAX_CHUNKS_PER_EVENT = 1024


class _Body(enum.Enum):
    """How a relayed response body is framed for the client."""

    NONE = "none"  #: no body (HEAD, 1xx, 204, 304)
    LENGTH = "length"  #: Content-Length, bytes passed through
    CHUNKED = "chunked"  #: re-framed as chunks (HTTP/1.1 clients)
    CLOSE = "close"  #: delimited by closing the connection (HTTP/1.0 clients)


_BODY_NONE: Final = _Body.NONE
_BODY_LENGTH: Final = _Body.LENGTH
_BODY_CHUNKED: Final = _Body.CHUNKED
_BODY_CLOSE: Final = _Body.CLOSE


#: RFC 9110 15: the reason phrases of the statuses fastproxy writes itself (local answers, the
#: admin listener) or relays from an upstream that sent none. The one table of them.
REASONS = {
    100: b"Continue",
    101: b"Switching Protocols",
    200: b"OK",
    204: b"No Content",
    304: b"Not Modified",
    308: b"Permanent Redirect",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}
#: RFC 9112 7.1: the last chunk and the empty trailer section
LAST_CHUNK = b"0\r\n\r\n"


def chunk(data: bytes) -> list[bytes]:
    """``data`` as one chunk (RFC 9112 7.1), for ``writelines``; nothing for empty data."""
    return [b"%x\r\n" % len(data), data, b"\r\n"] if data else []


def local_response(
    status: int,
    body: bytes = b"",
    *,
    content_type: bytes = b"",
    request_id: bytes = b"",
    close: bool = False,
    head_only: bool = False,
    field: bytes = b"",
) -> bytes:
    """A whole response fastproxy writes itself: fixed fields, never raw client input (a
    redirect's ``Location`` is built from the checked Host and the canonical target).

    A 204 gets no field describing a body (RFC 9110 8.6); ``head_only`` leaves the body out
    (the answer to HEAD) but keeps its length.
    """
    parts = [b"HTTP/1.1 %d %s" % (status, REASONS.get(status, b""))]
    if status != 204:
        if content_type:
            parts.append(b"Content-Type: " + content_type)
        parts.append(b"Content-Length: %d" % len(body))
    if request_id:
        parts.append(b"X-Request-Id: " + request_id)
    if field:
        parts.append(field)
    if close:
        parts.append(b"Connection: close")
    parts.append(b"\r\n")
    head = b"\r\n".join(parts)
    return head if head_only or status == 204 else head + body


# the test harnesses record what the exchange does to a leg in subclasses
@mypyc_attr(allow_interpreted_subclasses=True)
class ClientLeg:
    """The client-facing side of one request/response cycle: the parser-independent part.

    Subclasses parse the request (``feed_head``, ``feed``, ``next_event``, ``trailing``,
    ``request_ended``); this class frames the relayed response with fastproxy's own writer, which
    passes the upstream's body bytes through untouched when their length is known and chunks
    them for HTTP/1.1 clients otherwise.
    """

    __slots__ = (
        "_body",
        "_body_left",
        "_buf",
        "_chunks",
        "_client_close",
        "_head",
        "_head_request",
        "_pos",
        "_remaining",
        "_req",
        "_sent_end",
        "capped",
        "copied",
    )

    def __init__(self, max_head_bytes: int = 0) -> None:
        # ``max_head_bytes`` (the ``WorkerView.leg_class`` signature) is HeadScanner's to
        # enforce: a head given to a leg is whole. Taken here, so that a parser's leg needs no
        # ``__init__`` of its own (one frame and a ``super()`` less per request).
        self._body: _Body | None = None  # None until a final response head is written
        #: the last body event stopped at ``MAX_CHUNKS_PER_EVENT``: more is ready without a read
        self.capped = False
        self._remaining = 0
        self._sent_end = False
        self._head_request = False
        self._client_close = True
        # the request side: the parsed head until returned, then the body reader's state
        self._head: RequestHead | None = None
        self._req = _REQ_HEAD
        self._body_left = 0
        self._chunks: ChunkedReader | None = None
        # unread request bytes: ``_buf[_pos:]``; ``_buf`` is ``b""`` once all of it is read
        self._buf: bytes | bytearray = b""
        self._pos = 0
        #: bytes moved between buffers (the linear-time guard reads it)
        self.copied = 0

    # -- request side: the head is parsed by each parser, the body read here

    def feed_head(self, head: bytes) -> None:
        """The bytes of one whole request head, as ``HeadScanner`` checked them.

        Parses it (raising ``RequestRefused``) and calls ``_begin_body``.
        """
        raise NotImplementedError

    def _begin_body(self, head: RequestHead) -> None:
        """Keep the parsed head for ``next_event``, choose how its body is read and whether the
        connection may stay open after the response.

        Framing by the rules of ``headers.inspect_request``, which refuses every ambiguous
        combination before any body byte is forwarded: ``chunked``, or Content-Length, or none.
        """
        self._head = head
        self._head_request = head.method == b"HEAD"
        # HTTP/1.0 connections are not kept alive (as h11 does); 1.1 unless "close"
        close = head.http_version == b"1.0"
        chunked = False
        length = 0
        # one pass, lower-casing only the names as long as the three looked for
        for name, value in head.headers:
            size = len(name)
            if size != 17 and size != 14 and size != 10:
                continue
            lower = name.lower()
            if lower == b"transfer-encoding":
                chunked = True
            elif lower == b"content-length":
                if value.isdigit() and len(value) <= 18:
                    length = int(value)
            elif lower == b"connection" and value.lower().find(b"close") >= 0:
                close = True
        self._client_close = close
        if chunked:
            self._req = _REQ_CHUNKED
            self._chunks = ChunkedReader(_bad_request_chunk)
        else:
            self._body_left = length
            self._req = _REQ_LENGTH

    def feed(self, data: bytes) -> None:
        """Bytes after the head: body, or the following requests."""
        buf = self._buf
        if not buf:
            self._buf = data
        else:
            self._buf, self._pos, copied = _append(buf, self._pos, data)
            self.copied += copied

    def next_event(self) -> RequestHead | bytes | Ev:
        """The next request event; raise ``RequestRefused`` on a protocol violation.

        The body reader is strict and the same for every parser: Content-Length, or ``chunked``
        with CRLF line ends only, bounded chunk-size lines and no trailer fields. It reads at an
        offset into what was fed, never re-slicing the rest, and returns the data of all the
        chunks one read holds as one event: the worker writes once per read, not per chunk.
        """
        if self._head is not None:
            head, self._head = self._head, None
            return head
        state = self._req
        if state is _REQ_LENGTH:
            remaining = self._body_left
            if not remaining:
                self._req = _REQ_DONE
                return _EV_END
            buf = self._buf
            if not buf:
                return _EV_NEED_DATA
            pos = self._pos
            size = len(buf) - pos
            if size <= remaining:
                self._body_left = remaining - size
                self._buf = b""
                self._pos = 0
                return buf if not pos and type(buf) is bytes else _slice(buf, pos, len(buf))
            self._pos = pos + remaining
            self._body_left = 0
            return _slice(buf, pos, pos + remaining)
        if state is _REQ_DONE:
            return _EV_PAUSED
        if state is _REQ_HEAD:
            return _EV_NEED_DATA  # no head fed yet
        return self._read_chunked()

    def _read_chunked(self) -> bytes | Ev:
        """The chunks in the buffer from ``_pos``, through the shared ``ChunkedReader``."""
        buf = self._buf
        chunks = self._chunks
        assert chunks is not None
        spans: list[int] = []
        pos, ended = chunks.read(buf, self._pos, spans)
        if pos >= len(buf):
            self._buf = b""
            pos = 0
        self._pos = pos
        self.capped = chunks.capped
        if spans:
            if ended:
                self._body_left = 0
                self._req = _REQ_LENGTH  # nothing left: the next event is END
            return _join(buf, spans)
        if ended:
            self._req = _REQ_DONE
            return _EV_END
        return _EV_NEED_DATA

    @property
    def request_ended(self) -> bool:
        """The request (head and body) has been read completely."""
        return self._req is _REQ_DONE

    @property
    def trailing(self) -> bytes:
        """Bytes received after the request (pipelined requests, or frames after an upgrade)."""
        buf = self._buf
        if not buf:
            return b""
        return buf if not self._pos and type(buf) is bytes else _slice(buf, self._pos, len(buf))

    # -- response side

    def response_head(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        reason: bytes = b"",
        *,
        length: int | None = None,
        close: bool = False,
    ) -> bytes:
        """Serialise a response head for this client and choose the body framing.

        ``headers`` carry no framing fields (``headers.response_headers`` removed them);
        ``length`` is the upstream's Content-Length, or None when its body is chunked or
        close-delimited. ``close`` asks for the connection to end after this response.
        """
        return self.response_head_lines(
            status,
            [b"%s: %s" % (name, value) for name, value in headers],
            reason,
            length=length,
            close=close,
        )

    def response_head_lines(
        self,
        status: int,
        lines: list[bytes],
        reason: bytes = b"",
        *,
        length: int | None = None,
        close: bool = False,
    ) -> bytes:
        """``response_head`` for field lines ready to send (``ResponseHead.relayed``)."""
        parts = [b"HTTP/1.1 %d %s" % (status, reason or REASONS.get(status, b""))]
        parts += lines
        if status < 200:
            parts.append(b"\r\n")
            return b"\r\n".join(parts)
        if self._head_request or status in (204, 304):
            body = _BODY_NONE
            if length is not None and status != 204:
                parts.append(b"Content-Length: %d" % length)
        elif length is not None:
            body = _BODY_LENGTH
            self._remaining = length
            parts.append(b"Content-Length: %d" % length)
        elif not self._client_close:
            body = _BODY_CHUNKED
            parts.append(b"Transfer-Encoding: chunked")
        else:
            body = _BODY_CLOSE
        self._body = body
        if close or body is _BODY_CLOSE:
            self._client_close = True
        if self._client_close:
            parts.append(b"Connection: close")
        parts.append(b"\r\n")
        return b"\r\n".join(parts)

    def body(self, data: bytes) -> list[bytes]:
        body = self._body
        if body is _BODY_LENGTH:
            self._remaining -= len(data)
            if self._remaining < 0:
                raise UpstreamBroken("more body than the relayed Content-Length")
            return [data]
        if body is _BODY_CHUNKED:
            return chunk(data)
        if body is _BODY_CLOSE:
            return [data]
        raise UpstreamBroken("a body where the response has none")

    def end(self) -> bytes:
        self._sent_end = True
        if self._body is _BODY_CHUNKED:
            return LAST_CHUNK
        if self._body is _BODY_LENGTH and self._remaining:
            raise UpstreamBroken("less body than the relayed Content-Length")
        return b""

    @property
    def response_started(self) -> bool:
        return self._body is not None

    def discard_response_head(self) -> None:
        """Forget the head ``response_head`` returned: it was never written (the upstream broke
        in the same read), so a reply of fastproxy's own can take its place."""
        self._body = None
        self._remaining = 0

    def close_after_response(self) -> None:
        """End the connection after this response even though its head did not say so (RFC 9112
        9.5: a client, server or proxy may close a connection at any time)."""
        self._client_close = True

    @property
    def keep_alive(self) -> bool:
        """Whether the connection may carry another request after this cycle."""
        return self._sent_end and not self._client_close and self.request_ended


class _HeadLines:
    """One whole head as h11's request reader takes it: the two methods of h11's
    ``ReceiveBuffer`` that ``maybe_read_from_IDLE_client`` calls.

    ``HeadScanner`` has found the end of the head and made sure that every line ends in CRLF
    and nothing else does, so the lines are one split, where a ``ReceiveBuffer`` would copy the
    head, search it for its end again and strip each line's CR (a sixth of h11's parse).
    """

    __slots__ = ("_lines",)

    def __init__(self, head: bytes) -> None:
        self._lines = head[:-4].split(b"\r\n")  # without the empty line

    def maybe_extract_lines(self) -> list[bytes]:
        return self._lines

    def is_next_line_obviously_invalid_request_line(self) -> bool:
        return False  # only asked when no whole head is there


# the test harnesses record what the exchange does to a leg in subclasses
@mypyc_attr(allow_interpreted_subclasses=True)
class ServerLeg(ClientLeg):
    """The client leg on h11, the reference parser (pure Python, strict) for the head.

    h11 parses the request line and the fields and applies its own framing checks; the body is
    read by ``ClientLeg``'s reader, so h11 never copies body bytes through its buffers.
    """

    __slots__ = ()

    def feed_head(self, head: bytes) -> None:
        # h11's own request reader, without an ``h11.Connection`` around it: the connection's
        # state machine (keep-alive, body framing, protocol switches) would decide again what
        # ``ClientLeg`` decides, at a third of the cost of the whole parse. The reader and the
        # ``Request`` it builds apply every check h11 makes on a request head (request line
        # and field grammar, obs-fold, Host, Content-Length, Transfer-Encoding); the connection
        # adds none for one whole head, only turns its LocalProtocolError into a
        # RemoteProtocolError (both are ``h11.ProtocolError``, with the same message and status
        # hint). tests/fuzz/test_differential.py holds the two to the same answers.
        try:
            event = maybe_read_from_IDLE_client(cast(ReceiveBuffer, _HeadLines(head)))
        except h11.ProtocolError as exc:
            status = exc.error_status_hint
            if status == 431:
                raise RequestRefused(431, "headers_too_large") from exc
            if "Host" in str(exc):  # h11: "Found multiple Host: headers", "Missing ... Host"
                raise RequestRefused(400, "bad_host", str(exc)) from exc
            raise RequestRefused(400, "bad_request", str(exc)) from exc
        if event is None:
            raise RequestRefused(400, "bad_request", "incomplete request head")
        version = event.http_version
        if version not in (b"1.1", b"1.0"):
            raise RequestRefused(400, "bad_request", "HTTP version not supported")
        self._begin_body(
            RequestHead(event.method, event.target, version, event.headers.raw_items())
        )


# --------------------------------------------------------------------------------------------
# Upstream leg


class ResponseHead:
    """A response head (final or informational) as the strict reader checked it.

    ``lines`` are its field lines as received (without CRLF), ``relayed`` those a client may be
    sent as they are: without hop-by-hop and framing fields, X-Request-Id, and the fields the
    Connection header names. ``headers`` parses ``lines`` into (name, value) pairs on demand:
    the relay of an ordinary response never needs them.
    """

    __slots__ = ("lines", "reason", "relayed", "status")

    def __init__(
        self, status: int, reason: bytes, lines: list[bytes], relayed: list[bytes]
    ) -> None:
        self.status = status
        self.reason = reason
        self.lines = lines
        self.relayed = relayed

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """(name, value) pairs: original case, values without surrounding whitespace."""
        pairs = []
        for line in self.lines:
            name, _, value = line.partition(b":")
            pairs.append((name, value.strip(b" \t")))
        return pairs


_TOKEN_BYTES = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
#: "_" as an int: ``_UNDERSCORE in name`` is a memchr (``b"_" in name`` tries its operand as an
#: index first, and builds and drops a TypeError: ten times the cost on CPython 3.11)
_UNDERSCORE = ord("_")
_HEX = b"0123456789abcdefABCDEF"
_DIGITS = b"0123456789"
#: control characters but HTAB (CR and LF included): RFC 9110 5.5 allows none in a field value,
#: RFC 9112 4 none in a reason phrase; CR and LF may only end lines
_CTL = bytes(range(0x20)).replace(b"\t", b"") + b"\x7f"
#: a response head larger than this is a broken upstream
MAX_RESPONSE_HEAD_BYTES = 64 * 1024
#: trailer fields (read and dropped) are a field section like the head, and bounded like it
MAX_RESPONSE_TRAILER_BYTES = MAX_RESPONSE_HEAD_BYTES


# chunk-ext: tokens, "=", quoted strings and whitespace: visible ASCII, SP and HTAB
_CHUNK_EXT_BYTES = bytes(range(0x20, 0x7F)) + b"\t"


def quote(data: bytes | bytearray) -> str:
    """``data`` for a log line or an error message: in double quotes, printable ASCII as it is,
    every other byte (and ``\\`` and ``"``) as ``\\xNN``; never a Python bytes repr."""
    return '"' + "".join(_QUOTED[byte] for byte in data) + '"'


#: how ``quote`` shows each byte
_QUOTED = tuple(
    chr(byte) if 0x20 <= byte < 0x7F and byte not in b'\\"' else f"\\x{byte:02x}"
    for byte in range(256)
)


def parse_chunk_size(line: bytes | bytearray) -> int:
    """RFC 9112 7.1: ``chunk-size [ chunk-ext ]`` of a line without its CRLF; or ValueError."""
    size, _, ext = line.partition(b";")
    size = size.rstrip(b" \t")  # BWS before a chunk extension
    if not size or size.strip(_HEX) or len(size) > 16:
        raise ValueError(f"bad chunk size {quote(line[:40])}")
    if ext and ext.translate(None, _CHUNK_EXT_BYTES):
        raise ValueError(f"bad chunk extension {quote(line[:40])}")
    return int(size, 16)


def _check_trailer_line(line: bytes | bytearray) -> None:
    """RFC 9112 7.1.2: a trailer field is a field line like those of the head (name, colon,
    visible value); it is dropped, but one a client could read otherwise is refused."""
    name, colon, _value = line.partition(b":")
    if (
        not colon
        or not name
        or name.translate(None, _TOKEN_BYTES)
        or line.translate(None, _CTL) != line
    ):
        raise UpstreamBroken(f"bad trailer line {quote(line[:100])}")


def _bad_request_chunk(message: str) -> RequestRefused:
    return RequestRefused(400, "bad_request", message)


class _Chunk(enum.Enum):
    """States of ``ChunkedReader``."""

    SIZE = "size"  #: a chunk-size line
    DATA = "data"  #: chunk data
    CRLF = "crlf"  #: the CRLF after chunk data
    TRAILERS = "trailers"  #: the trailer section after the last chunk, up to its empty line


_CHUNK_SIZE: Final = _Chunk.SIZE
_CHUNK_DATA: Final = _Chunk.DATA
_CHUNK_CRLF: Final = _Chunk.CRLF
_CHUNK_TRAILERS: Final = _Chunk.TRAILERS


class ChunkedReader:
    """The one chunked-body reader (RFC 9112 7.1), for requests and responses alike.

    ``read`` walks the chunks of ``buf[pos:end]`` at an offset, never re-slicing the buffer:
    chunk-size lines are found by bounded searches, chunk data is returned as spans of the
    buffer (joined once by the caller), at most ``MAX_CHUNKS_PER_EVENT`` chunks per call
    (``capped`` says the call stopped there). Strict: CRLF line ends only, chunk-size lines of
    at most ``MAX_CHUNK_LINE_BYTES``, chunk data followed by exactly CRLF. Trailer fields are
    refused (``trailer_bytes`` 0: requests, as nothing may change after the head was checked),
    or checked as field lines, bounded to ``trailer_bytes`` and dropped (responses). Errors are
    raised as ``error(message)``, the caller's exception type.
    """

    __slots__ = ("_error", "_left", "_state", "_trailer_bytes", "_trailer_left", "capped")

    def __init__(self, error: Callable[[str], Exception], trailer_bytes: int = 0) -> None:
        self._error = error
        self._trailer_bytes = trailer_bytes
        self._state = _CHUNK_SIZE
        #: bytes of the current chunk's data still to come
        self._left = 0
        self._trailer_left = 0
        self.capped = False

    def read(self, buf: bytes | bytearray, pos: int, spans: list[int]) -> tuple[int, bool]:
        """Consume from ``pos``; append data spans; return ``(new pos, the body ended)``."""
        end = len(buf)
        state = self._state
        error = self._error
        ended = False
        capped = False
        budget = MAX_CHUNKS_PER_EVENT
        try:
            while pos < end:
                if state is _CHUNK_DATA:
                    left = self._left
                    if end - pos < left:
                        spans += (pos, end)
                        self._left = left - (end - pos)
                        pos = end
                        break
                    spans += (pos, pos + left)
                    pos += left
                    self._left = 0
                    state = _CHUNK_CRLF
                elif state is _CHUNK_CRLF:
                    if buf[pos] != 0x0D or (end - pos > 1 and buf[pos + 1] != 0x0A):
                        raise error("chunk data longer than its size")
                    if end - pos < 2:
                        break
                    pos += 2
                    state = _CHUNK_SIZE
                elif state is _CHUNK_SIZE:
                    if not budget:
                        capped = True
                        break  # enough chunks for one event; the rest on the next call
                    line_end = buf.find(b"\r\n", pos, pos + MAX_CHUNK_LINE_BYTES + 2)
                    if line_end < 0:
                        if end - pos > MAX_CHUNK_LINE_BYTES + 1 or buf.find(b"\n", pos) >= 0:
                            raise error("bad chunk framing line")
                        break
                    try:
                        size = parse_chunk_size(buf[pos:line_end])
                    except ValueError as exc:
                        raise error(str(exc)) from exc
                    pos = line_end + 2
                    if size:
                        self._left = size
                        budget -= 1
                        state = _CHUNK_DATA
                    else:
                        self._trailer_left = self._trailer_bytes
                        state = _CHUNK_TRAILERS
                else:
                    # the trailer section, then its empty line (RFC 9112 7.1.2)
                    left = self._trailer_left
                    line_end = buf.find(b"\r\n", pos, pos + left + 2)
                    if line_end < 0:
                        if not self._trailer_bytes and end > pos and buf[pos] != 0x0D:
                            raise error("trailer fields in a request")
                        if end - pos > left + 1:
                            raise error("trailer section too large")
                        if buf.find(b"\n", pos) >= 0:
                            raise error("bare LF in the trailer section")
                        break
                    if line_end == pos:
                        pos += 2
                        ended = True
                        break
                    if not self._trailer_bytes:
                        raise error("trailer fields in a request")
                    _check_trailer_line(buf[pos:line_end])
                    self._trailer_left = left - (line_end + 2 - pos)
                    pos = line_end + 2
        finally:
            self._state = state
            self.capped = capped
        return pos, ended


class _Up(enum.Enum):
    """States of the upstream leg's response reader."""

    IDLE = "idle"  #: no request sent on this cycle
    HEAD = "head"  #: waiting for the (next) response head
    LENGTH = "length"  #: Content-Length body
    CHUNKED = "chunked"  #: a chunked body (``ChunkedReader``; trailers checked and dropped)
    CLOSE = "close"  #: a body delimited by the connection closing
    DONE = "done"  #: the response is complete
    SWITCHED = "switched"  #: a 101 was received; the bytes after it are another protocol


_UP_IDLE: Final = _Up.IDLE
_UP_HEAD: Final = _Up.HEAD
_UP_LENGTH: Final = _Up.LENGTH
_UP_CHUNKED: Final = _Up.CHUNKED
_UP_CLOSE: Final = _Up.CLOSE
_UP_DONE: Final = _Up.DONE
_UP_SWITCHED: Final = _Up.SWITCHED


# the test harnesses record what the exchange does to a leg in subclasses
@mypyc_attr(allow_interpreted_subclasses=True)
class UpstreamLeg:
    """The upstream-facing side of one upstream TCP connection.

    The request is written with fastproxy's own serialiser, and the response is read by a small
    strict reader held to the standard of the request reader: CRLF line ends, token header
    names, no obs-fold or control characters, at most one Content-Length, ``chunked`` as the
    only transfer coding and never beside a Content-Length, no framing field on a 1xx or a body
    on a 204, and nothing after a response that ends where its head says. The upstream is
    fastproxy's own backend, not the attacker, but every way of reading it differently from a
    client is refused (502) before anything of the response is relayed, so a confused backend
    can neither split a response nor desynchronise a pooled connection.

    The reader works at an offset into the received bytes (``_buf[_pos:]``) and returns the
    data of all the chunks one read holds as one event, so its cost is linear in the bytes
    received whatever their shape.
    """

    __slots__ = (
        "_buf",
        "_chunks",
        "_close",
        "_eof",
        "_method",
        "_pos",
        "_remaining",
        "_req_chunked",
        "_req_done",
        "_scanned",
        "_state",
        "capped",
        "copied",
        "declared_length",
        "overrun",
        "received_any",
    )

    def __init__(self) -> None:
        #: the last body event stopped at ``MAX_CHUNKS_PER_EVENT``: more is ready without a read
        self.capped = False
        # unread response bytes: ``_buf[_pos:]``; ``_buf`` is ``b""`` once all of it is read
        self._buf: bytes | bytearray = b""
        self._pos = 0
        # bytes after ``_pos`` already searched for the end of the head (less 3)
        self._scanned = 0
        self._state = _UP_IDLE
        self._eof = False
        self._method = b""
        self._remaining = 0
        self._chunks: ChunkedReader | None = None
        self._req_chunked = False
        self._req_done = False
        self._close = False
        #: the response's Content-Length, when it has one (also for HEAD and 304)
        self.declared_length: int | None = None
        #: bytes arrived since the last request was sent (a close before any is a stale pool)
        self.received_any = False
        #: bytes came after the complete response: the upstream is out of step
        self.overrun = False
        #: bytes moved between buffers (the linear-time guard reads it)
        self.copied = 0

    # -- request side

    def request(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        *,
        chunked: bool = False,
    ) -> bytes:
        """The request head. Names and values were checked by the request parser or are ours;
        ``chunked``: ``headers`` say ``Transfer-Encoding: chunked`` (the body is framed so)."""
        self._method = method
        self._state = _UP_HEAD
        self._req_done = False
        self._req_chunked = chunked
        parts = [method, b" ", target, b" HTTP/1.1\r\n"]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def body(self, data: bytes) -> list[bytes]:
        if not self._req_chunked:
            return [data]
        return chunk(data)

    def end(self) -> bytes:
        self._req_done = True
        return LAST_CHUNK if self._req_chunked else b""

    # -- response side

    def feed(self, data: bytes) -> None:
        self.received_any = True
        if self._state is _UP_DONE:
            self.overrun = True
        buf = self._buf
        if not buf:
            self._buf = data
        else:
            self._buf, self._pos, copied = _append(buf, self._pos, data)
            self.copied += copied

    def feed_eof(self) -> None:
        self._eof = True

    def next_event(self) -> ResponseHead | bytes | Ev:
        """The next response event; raise ``UpstreamBroken`` on a protocol violation."""
        state = self._state
        if state is _UP_LENGTH:
            remaining = self._remaining
            if not remaining:
                self._state = _UP_DONE
                return _EV_END
            buf = self._buf
            if not buf:
                if self._eof:
                    raise UpstreamBroken("upstream closed in the middle of the body")
                return _EV_NEED_DATA
            pos = self._pos
            size = len(buf) - pos
            if size <= remaining:
                self._remaining = remaining - size
                self._buf = b""
                self._pos = 0
                if type(buf) is bytes:
                    return buf[pos:]  # the received object itself when pos is 0
                return _slice(buf, pos, pos + size)
            # bytes after the body: kept as ``trailing`` (the connection is not reused)
            self.overrun = True
            self._pos = pos + remaining
            self._remaining = 0
            return _slice(buf, pos, pos + remaining)
        if state is _UP_HEAD:
            return self._read_head()
        if state is _UP_CHUNKED:
            return self._read_chunked()
        if state is _UP_CLOSE:
            buf = self._buf
            if buf:
                pos = self._pos
                self._buf = b""
                self._pos = 0
                return _slice(buf, pos, len(buf))
            if self._eof:
                self._state = _UP_DONE
                return _EV_END
            return _EV_NEED_DATA
        if state is _UP_SWITCHED:
            return _EV_SWITCHED
        if state is _UP_DONE:
            return _EV_PAUSED
        raise UpstreamBroken("response bytes before any request")  # IDLE

    def _read_head(self) -> ResponseHead | Ev:
        buf = self._buf
        pos = self._pos
        end = buf.find(b"\r\n\r\n", pos + self._scanned)
        if end < 0:
            unread = len(buf) - pos
            if unread >= MAX_RESPONSE_HEAD_BYTES:
                raise UpstreamBroken("response head too large")
            if self._eof:
                raise UpstreamBroken("upstream closed before a complete response head")
            # resume there: a head dripped in small reads is searched once, not once per read
            if unread > 3:
                self._scanned = unread - 3
            return _EV_NEED_DATA
        if end + 4 - pos > MAX_RESPONSE_HEAD_BYTES:
            raise UpstreamBroken("response head too large")
        head = buf[pos:end] if type(buf) is bytes else _slice(buf, pos, end)
        pos = end + 4
        unread = len(buf) - pos
        if unread:
            self._pos = pos
        else:
            self._buf = b""
            self._pos = 0
        self._scanned = 0
        # CR and LF only as CRLF, and no other control character (RFC 9112 2.2, RFC 9110 5.5):
        # deleting every control character must delete exactly the CRLFs
        if head.translate(None, _CTL) != head.replace(b"\r\n", b""):
            raise UpstreamBroken("bare CR or LF, or a control character, in the response head")
        lines = head.split(b"\r\n")
        status_line = lines[0]
        del lines[0]
        # RFC 9112 4: HTTP-version SP 3DIGIT SP reason (the reason may be missing, as h11 allows)
        version, _, rest = status_line.partition(b" ")
        code, _, reason = rest.partition(b" ")
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or code.strip(_DIGITS):
            raise UpstreamBroken(f"bad status line {quote(status_line[:100])}")
        status = int(code)
        if status < 100 or status > 599:  # RFC 9110 15: 100..599
            raise UpstreamBroken(f"bad status line {quote(status_line[:100])}")
        # One pass: check every field line, read the framing fields, and keep the lines that
        # are relayed as they are. Only names as long as a dropped one are lower-cased (a name
        # that is no token never lower-cases to one), and the names are held to the token
        # alphabet all at once after the pass.
        relayed: list[bytes] = []
        names: list[bytes] = []
        named: set[bytes] = set()
        length: bytes | None = None
        coding: bytes | None = None
        close = version == b"HTTP/1.0"
        for line in lines:
            name, colon, value = line.partition(b":")
            if not colon or not name:
                raise UpstreamBroken(f"bad header line {quote(line[:100])}")
            names.append(name)
            if len(name) not in RESPONSE_DROPPED_LENGTHS:
                relayed.append(line)
                continue
            lower = name.lower()
            if _UNDERSCORE in lower:
                lower = lower.replace(b"_", b"-")
                if lower == b"content-length" or lower == b"transfer-encoding":
                    # a CGI-style reader (HTTP_CONTENT_LENGTH) takes it for the real one
                    raise UpstreamBroken(f"framing field spelled with '_': {quote(name)}")
            elif lower == b"content-length":
                # RFC 9110 8.6 allows equal duplicates to be merged; like nginx, refuse them
                if length is not None:
                    raise UpstreamBroken("more than one Content-Length")
                value = value.strip(b" \t")
                if not value or value.strip(_DIGITS) or len(value) > 18:
                    raise UpstreamBroken(f"bad Content-Length {quote(value[:30])}")
                length = value
            elif lower == b"transfer-encoding":
                if coding is not None:
                    raise UpstreamBroken("more than one Transfer-Encoding")
                coding = value.strip(b" \t")
            elif lower == b"connection":
                tokens = [t.strip().lower() for t in value.split(b",")]
                named.update(tokens)
                if b"close" in tokens:
                    close = True
                elif b"keep-alive" in tokens and version == b"HTTP/1.0":
                    close = False
            if lower not in RESPONSE_DROPPED:
                relayed.append(line)
        if b"".join(names).translate(None, _TOKEN_BYTES):
            # RFC 9110 5.1: a field name is a token (one translate for all of them: its fixed
            # cost is several times that of a short name)
            for line, name in zip(lines, names, strict=True):
                if name.translate(None, _TOKEN_BYTES):
                    raise UpstreamBroken(f"bad header line {quote(line[:100])}")
        if named:
            named = {fold(token) for token in named} - CONNECTION_OPTIONS
            if named:  # rare: fields the upstream marked hop-by-hop by naming them
                relayed = [line for line in relayed if fold(line.partition(b":")[0]) not in named]
        if coding is not None or status < 200 or status == 204:
            self._check_framing(version, status, length, coding)
        size = -1 if length is None else int(length)
        self.declared_length = None if length is None else size
        if status < 200:
            if status == 101:
                self._state = _UP_SWITCHED
            return ResponseHead(status, reason, lines, relayed)
        self._close = close
        # RFC 9112 6.3: the order of these rules matters
        if self._method == b"HEAD" or status == 204 or status == 304:
            if unread:
                # a body after a response that has none: a second response, or a split one
                raise UpstreamBroken("bytes after a response without a body")
            self._remaining = 0  # no body: the next event is END
            self._state = _UP_LENGTH
        elif coding is not None:
            self._state = _UP_CHUNKED
            self._chunks = ChunkedReader(UpstreamBroken, MAX_RESPONSE_TRAILER_BYTES)
        elif size >= 0:
            if unread > size:
                raise UpstreamBroken("bytes after the Content-Length body")
            self._remaining = size
            self._state = _UP_LENGTH
        else:
            self._state = _UP_CLOSE
            self._close = True
        return ResponseHead(status, reason, lines, relayed)

    @staticmethod
    def _check_framing(
        version: bytes, status: int, length: bytes | None, coding: bytes | None
    ) -> None:
        """The framing rules beyond one well-formed Content-Length, refused like nginx >= 1.23."""
        if coding is not None:
            # RFC 9112 6.1: chunked is the only coding a proxy must understand; nginx answers
            # any other (or a list) with 502, as a reader that skips it frames the body otherwise
            if coding.lower() != b"chunked":
                raise UpstreamBroken(f"transfer coding other than chunked: {quote(coding[:40])}")
            # RFC 9112 6.1: "ought to be handled as an error" (smuggling, response splitting)
            if length is not None:
                raise UpstreamBroken("Content-Length together with Transfer-Encoding")
            # RFC 9112 6.1: Transfer-Encoding in an HTTP/1.0 message is faulty framing
            if version == b"HTTP/1.0":
                raise UpstreamBroken("Transfer-Encoding in an HTTP/1.0 response")
        if status < 200:
            # RFC 9110 8.6, RFC 9112 6.1: no Content-Length or Transfer-Encoding on a 1xx (a
            # client that honours one on a 101 reads the tunnel's first bytes as a body)
            if length is not None or coding is not None:
                raise UpstreamBroken(f"framing field on a {status} response")
        elif status == 204 and (coding is not None or (length is not None and int(length))):
            # RFC 9110 15.3.5: a 204 has no body; "Content-Length: 0" is common and harmless
            raise UpstreamBroken("a body announced on a 204 response")

    def _read_chunked(self) -> bytes | Ev:
        """The chunks in the buffer from ``_pos``, through the shared ``ChunkedReader``."""
        buf = self._buf
        chunks = self._chunks
        assert chunks is not None
        spans: list[int] = []
        pos, ended = chunks.read(buf, self._pos, spans)
        if pos >= len(buf):
            self._buf = b""
            pos = 0
        elif ended:
            self.overrun = True  # bytes after the last chunk's empty line
        self._pos = pos
        self.capped = chunks.capped
        if spans:
            if ended:
                self._remaining = 0
                self._state = _UP_LENGTH  # nothing left: the next event is END
            return _join(buf, spans)
        if ended:
            self._state = _UP_DONE
            return _EV_END
        if self._eof:
            raise UpstreamBroken("upstream closed in the middle of the chunked body")
        return _EV_NEED_DATA

    @property
    def reusable(self) -> bool:
        """The exchange is complete on both sides and the upstream keeps the connection."""
        return self._state is _UP_DONE and self._req_done and not self._close and not self._eof

    def start_next_cycle(self) -> None:
        self._state = _UP_IDLE
        self._method = b""
        self._scanned = 0
        self.declared_length = None
        self.received_any = False
        self.overrun = False

    @property
    def idle(self) -> bool:
        return self._state is _UP_IDLE

    @property
    def trailing(self) -> bytes:
        """Bytes received after the response (or after a 101): after a complete response they
        mean the upstream is out of step, and neither connection may carry another exchange."""
        buf = self._buf
        if not buf:
            return b""
        return buf if not self._pos and type(buf) is bytes else _slice(buf, self._pos, len(buf))
