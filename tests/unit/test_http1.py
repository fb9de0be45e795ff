"""The parser seam: head scanning on raw bytes, and both h11 legs."""

from __future__ import annotations

import pytest

from fastproxy.headers import RequestRefused
from fastproxy.http1 import (
    MAX_CHUNKS_PER_EVENT,
    MAX_RESPONSE_HEAD_BYTES,
    MAX_RESPONSE_TRAILER_BYTES,
    ClientLeg,
    Ev,
    HeadScanner,
    RequestHead,
    ResponseHead,
    ServerLeg,
    UpstreamBroken,
    UpstreamLeg,
    quote,
)
from fastproxy.http1_httptools import HttptoolsLeg


def _scan(
    data: bytes, *, max_head: int = 16384, max_headers: int = 100, max_uri: int = 8192
) -> tuple[bytes, bytes] | None:
    scanner = HeadScanner(max_head, max_headers, max_uri)
    scanner.feed(data)
    return scanner.maybe_take_head()


def test_head_scanner_splits_head_and_rest() -> None:
    taken = _scan(b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\nGET /2")
    assert taken == (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"GET /2")


def test_head_scanner_waits_for_more() -> None:
    scanner = HeadScanner(16384, 100, 8192)
    for byte in b"GET / HTTP/1.1\r\nHost: a\r\n\r":
        scanner.feed(bytes([byte]))
        assert scanner.maybe_take_head() is None
    scanner.feed(b"\n")
    assert scanner.maybe_take_head() is not None


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET / HTTP/1.1\nHost: a\n\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n\tb\r\n\r\n", 400),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\nX: " + b"y" * 17000 + b"\r\n\r\n", 431),
        (b"GET /" + b"a" * 17000, 414),
        (b"GET / HTTP/1.1\r\nX: " + b"y" * 17000, 431),
    ],
)
def test_head_scanner_refuses(data: bytes, status: int) -> None:
    with pytest.raises(RequestRefused) as caught:
        _scan(data)
    assert caught.value.status == status


def _drain(leg: ClientLeg) -> list[RequestHead | bytes | Ev]:
    """Every event up to the first NEED_DATA or PAUSED."""
    events: list[RequestHead | bytes | Ev] = []
    while True:
        event = leg.next_event()
        events.append(event)
        if event in (Ev.NEED_DATA, Ev.PAUSED):
            return events


def _fed(leg: ClientLeg, data: bytes) -> None:
    """Feed ``data`` as the worker does: its head (up to the blank line), then the rest."""
    end = data.index(b"\r\n\r\n") + 4
    leg.feed_head(data[:end])
    if data[end:]:
        leg.feed(data[end:])


def _server(data: bytes) -> tuple[ServerLeg, list[RequestHead | bytes | Ev]]:
    leg = ServerLeg(16384)
    _fed(leg, data)
    return leg, _drain(leg)


def test_server_leg_keeps_raw_header_case_and_order() -> None:
    _leg, events = _server(
        b"GET /x?q HTTP/1.1\r\nHost: a\r\nX_Odd: 1\r\nx-MiXeD: 2\r\nX_Odd: 3\r\n\r\n"
    )
    head = events[0]
    assert isinstance(head, RequestHead)
    assert (head.method, head.target, head.http_version) == (b"GET", b"/x?q", b"1.1")
    assert head.headers == [(b"Host", b"a"), (b"X_Odd", b"1"), (b"x-MiXeD", b"2"), (b"X_Odd", b"3")]
    assert events[1] is Ev.END


def test_server_leg_streams_chunked_body_and_keeps_trailing_bytes() -> None:
    leg, events = _server(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\nGET /next HTTP/1.1\r\n"
    )
    assert b"".join(e for e in events if isinstance(e, bytes)) == b"abcde"
    assert Ev.END in events
    head = leg.response_head(200, [(b"Content-Length", b"0")])
    assert head.startswith(b"HTTP/1.1 200 ")
    leg.end()
    assert leg.keep_alive
    assert leg.trailing == b"GET /next HTTP/1.1\r\n"


@pytest.mark.parametrize("version", [b"2.0", b"0.9", b"1.2"])
def test_server_leg_refuses_other_versions(version: bytes) -> None:
    with pytest.raises(RequestRefused):
        _server(b"GET / HTTP/" + version + b"\r\nHost: a\r\n\r\n")


def test_server_leg_refuses_bad_chunk_size() -> None:
    with pytest.raises(RequestRefused) as caught:
        _server(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n")
    assert caught.value.status == 400


def test_server_leg_http10_closes_after_response() -> None:
    leg, _events = _server(b"GET / HTTP/1.0\r\n\r\n")
    leg.response_head(200, [])
    leg.body(b"hello")
    leg.end()
    assert not leg.keep_alive


def test_upstream_leg_round_trip_and_reuse() -> None:
    leg = UpstreamLeg()
    wire = leg.request(b"GET", b"/a", [(b"Host", b"up")])
    wire += leg.end()
    assert wire.startswith(b"GET /a HTTP/1.1\r\n")
    leg.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\n\r\nok")
    head = leg.next_event()
    assert isinstance(head, ResponseHead)
    assert head.status == 200 and (b"X-A", b"1") in head.headers
    assert leg.next_event() == b"ok"
    assert leg.next_event() is Ev.END
    assert leg.reusable
    leg.start_next_cycle()
    assert leg.idle


def test_upstream_leg_switch_keeps_trailing_frames() -> None:
    leg = UpstreamLeg()
    leg.request(
        b"GET",
        b"/ws",
        [(b"Host", b"up"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")],
    )
    leg.end()
    leg.feed(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        b"\x81\x02hi"
    )
    head = leg.next_event()
    assert isinstance(head, ResponseHead) and head.status == 101
    assert leg.next_event() is Ev.SWITCHED
    assert leg.trailing == b"\x81\x02hi"


def test_upstream_leg_refused_switch_stays_http() -> None:
    leg = UpstreamLeg()
    leg.request(
        b"GET",
        b"/ws",
        [(b"Host", b"up"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")],
    )
    leg.end()
    leg.feed(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n")
    head = leg.next_event()
    assert isinstance(head, ResponseHead) and head.status == 426
    assert leg.next_event() is Ev.END
    assert leg.reusable


def _upstream_events(response: bytes, *, method: bytes = b"GET") -> list[ResponseHead | bytes | Ev]:
    leg = UpstreamLeg()
    leg.request(method, b"/x", [(b"Host", b"up")])
    leg.end()
    leg.feed(response)
    events: list[ResponseHead | bytes | Ev] = []
    while True:
        event = leg.next_event()
        events.append(event)
        if event in (Ev.NEED_DATA, Ev.PAUSED, Ev.END, Ev.SWITCHED):
            return events


def _body(events: list[ResponseHead | bytes | Ev]) -> bytes:
    return b"".join(e for e in events if isinstance(e, bytes))


def test_upstream_leg_relays_end_to_end_lines_as_received() -> None:
    events = _upstream_events(
        b"HTTP/1.1 200 OK\r\nDate: x\r\nConnection: keep-alive, X-Private\r\n"
        b"Content-Length: 2\r\nX-Request-Id: upstream\r\nKeep_Alive: timeout=5\r\n"
        b"Keep-Alive: timeout=5\r\nx-private: secret\r\nSet-Cookie:a=1  \r\n"
        b"Proxy-Authorization: x\r\nTrailer: X\r\nUpgrade: h2c\r\nTE: trailers\r\n"
        b"Proxy-Connection: keep-alive\r\nContent-Type: text/plain\r\n\r\nok"
    )
    head = events[0]
    assert isinstance(head, ResponseHead) and head.status == 200
    # hop-by-hop (also spelled with "_"), framing, X-Request-Id and the fields Connection
    # names are dropped; the rest stays byte for byte, in order
    assert head.relayed == [b"Date: x", b"Set-Cookie:a=1  ", b"Content-Type: text/plain"]
    assert len(head.lines) == 14 and (b"Set-Cookie", b"a=1") in head.headers
    assert _body(events) == b"ok"


def test_client_leg_writes_relayed_lines_with_its_own_framing() -> None:
    leg = ServerLeg(1 << 14)
    leg.feed_head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    leg.next_event()
    assert leg.response_head_lines(200, [b"A: 1", b"B:2"], b"OK", length=2) == (
        b"HTTP/1.1 200 OK\r\nA: 1\r\nB:2\r\nContent-Length: 2\r\n\r\n"
    )
    other = ServerLeg(1 << 14)
    other.feed_head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    other.next_event()
    assert other.response_head_lines(204, []) == b"HTTP/1.1 204 No Content\r\n\r\n"


def test_upstream_leg_reads_chunked_body_and_drops_trailers() -> None:
    events = _upstream_events(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n"
    )
    assert _body(events) == b"hello world"
    assert events[-1] is Ev.END


def test_upstream_leg_reads_chunked_body_split_anywhere() -> None:
    response = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"a\r\n0123456789\r\n3;x=y\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"
    )
    for cut in range(1, len(response)):
        leg = UpstreamLeg()
        leg.request(b"GET", b"/x", [(b"Host", b"up")])
        leg.end()
        events: list[ResponseHead | bytes | Ev] = []
        for piece in (response[:cut], response[cut:]):
            leg.feed(piece)
            while (event := leg.next_event()) is not Ev.NEED_DATA:
                events.append(event)
                if event is Ev.END:
                    break
        assert isinstance(events[0], ResponseHead), cut
        assert _body(events) == b"0123456789abc", cut
        assert events[-1] is Ev.END and leg.reusable and not leg.trailing, cut


def test_upstream_leg_head_response_has_no_body_but_keeps_its_length() -> None:
    leg = UpstreamLeg()
    leg.request(b"HEAD", b"/x", [(b"Host", b"up")])
    leg.end()
    leg.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    assert isinstance(leg.next_event(), ResponseHead)
    assert leg.declared_length == 5
    assert leg.next_event() is Ev.END
    assert leg.reusable


def test_upstream_leg_close_delimited_body_ends_at_eof_and_is_not_reusable() -> None:
    leg = UpstreamLeg()
    leg.request(b"GET", b"/x", [(b"Host", b"up")])
    leg.end()
    leg.feed(b"HTTP/1.0 200 OK\r\n\r\nsome")
    assert isinstance(leg.next_event(), ResponseHead)
    assert leg.next_event() == b"some"
    assert leg.next_event() is Ev.NEED_DATA
    leg.feed_eof()
    assert leg.next_event() is Ev.END
    assert not leg.reusable


def test_upstream_leg_keeps_bytes_after_the_response_as_trailing() -> None:
    # the body ends in a later read than the head, with a second response behind it: the
    # head may have been relayed already, so the bytes are kept for the worker to see
    leg = UpstreamLeg()
    leg.request(b"GET", b"/x", [(b"Host", b"up")])
    leg.end()
    leg.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
    assert isinstance(leg.next_event(), ResponseHead)
    assert leg.next_event() is Ev.NEED_DATA
    leg.feed(b"okHTTP/1.1 200 OK\r\n")
    assert leg.next_event() == b"ok"
    assert leg.next_event() is Ev.END
    assert leg.trailing == b"HTTP/1.1 200 OK\r\n"


def test_upstream_leg_serialises_chunked_request_bodies() -> None:
    leg = UpstreamLeg()
    head = leg.request(
        b"POST", b"/x", [(b"Host", b"up"), (b"Transfer-Encoding", b"chunked")], chunked=True
    )
    assert head == b"POST /x HTTP/1.1\r\nHost: up\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert b"".join(leg.body(b"abc")) == b"3\r\nabc\r\n"
    assert leg.end() == b"0\r\n\r\n"


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\n\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1, 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Name: a\r\n\r\n",
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n",
    ],
)
def test_upstream_leg_refuses_what_could_desynchronise(response: bytes) -> None:
    with pytest.raises(UpstreamBroken):
        _upstream_events(response)


def _server_leg(request: bytes) -> ServerLeg:
    leg = ServerLeg(16384)
    _fed(leg, request)
    while leg.next_event() not in (Ev.NEED_DATA, Ev.PAUSED):
        pass
    return leg


def test_server_leg_writer_passes_content_length_bodies_through() -> None:
    leg = _server_leg(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    head = leg.response_head(200, [(b"ETag", b"x")], length=5)
    assert head == b"HTTP/1.1 200 OK\r\nETag: x\r\nContent-Length: 5\r\n\r\n"
    assert leg.body(b"hello") == [b"hello"]
    assert leg.end() == b""
    assert leg.keep_alive
    with pytest.raises(UpstreamBroken):
        leg.body(b"!")


def test_server_leg_writer_chunks_for_http11_and_closes_for_http10() -> None:
    leg = _server_leg(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert b"Transfer-Encoding: chunked\r\n" in leg.response_head(200, [])
    assert b"".join(leg.body(b"abc")) == b"3\r\nabc\r\n"
    assert leg.end() == b"0\r\n\r\n"
    old = _server_leg(b"GET / HTTP/1.0\r\n\r\n")
    head = old.response_head(200, [])
    assert b"Transfer-Encoding" not in head and b"Connection: close\r\n" in head
    assert old.body(b"abc") == [b"abc"]
    old.end()
    assert not old.keep_alive


def test_server_leg_writer_head_request_keeps_length_without_body() -> None:
    leg = _server_leg(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert b"Content-Length: 5\r\n" in leg.response_head(200, [], length=5)
    assert leg.end() == b""
    assert leg.keep_alive


def test_server_leg_writer_honours_connection_close() -> None:
    leg = _server_leg(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert b"Connection: close\r\n" in leg.response_head(200, [], length=0)
    leg.end()
    assert not leg.keep_alive


def _httptools_events(data: bytes) -> tuple[HttptoolsLeg, list[RequestHead | bytes | Ev]]:
    scanner = HeadScanner(16384, 100, 8192)
    scanner.feed(data)
    taken = scanner.maybe_take_head()
    assert taken is not None
    leg = HttptoolsLeg(16384)
    leg.feed_head(taken[0])
    leg.feed(taken[1])
    return leg, _drain(leg)


def test_httptools_leg_reads_head_as_sent_and_chunked_body() -> None:
    leg, events = _httptools_events(
        b"POST /a?b=%2F HTTP/1.1\r\nHost: a\r\nX_Odd: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\nGET /next HTTP/1.1\r\n"
    )
    head = events[0]
    assert isinstance(head, RequestHead)
    assert (head.method, head.target, head.http_version) == (b"POST", b"/a?b=%2F", b"1.1")
    assert (b"X_Odd", b"1") in head.headers
    assert b"".join(e for e in events if isinstance(e, bytes)) == b"abcde"
    assert Ev.END in events
    assert leg.request_ended and leg.trailing == b"GET /next HTTP/1.1\r\n"


@pytest.mark.parametrize(
    "data",
    [
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: y\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n",
        b"GET /\xff HTTP/1.1\r\nHost: a\r\n\r\n",
        b"G@T / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
)
def test_httptools_leg_refuses(data: bytes) -> None:
    with pytest.raises(RequestRefused):
        _httptools_events(data)


# -- response framing held to the request standard (502 before anything is relayed)

_OK = b"HTTP/1.1 200 OK\r\n"


@pytest.mark.parametrize(
    ("response", "method"),
    [
        # Content-Length and Transfer-Encoding together (RFC 9112 6.1)
        (_OK + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", b"GET"),
        (_OK + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", b"GET"),
        (_OK + b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"HEAD"),
        # any coding but exactly "chunked" (nginx >= 1.23: 502)
        (_OK + b"Transfer-Encoding: gzip\r\n\r\n", b"GET"),
        (_OK + b"Transfer-Encoding: gzip, chunked\r\n\r\n", b"GET"),
        (_OK + b"Transfer-Encoding: chunked, chunked\r\n\r\n", b"GET"),
        (_OK + b"Transfer-Encoding: identity\r\n\r\n", b"GET"),
        (_OK + b"Transfer-Encoding: \r\n\r\n", b"GET"),
        (_OK + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", b"GET"),
        (_OK + b"Transfer-Encoding: chunked;q=1\r\n\r\n", b"GET"),
        # RFC 9112 6.1: Transfer-Encoding in HTTP/1.0 is faulty framing
        (b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"GET"),
        # duplicate Content-Length, even equal
        (_OK + b"Content-Length: 2\r\nContent-Length: 2\r\n\r\nok", b"GET"),
        (_OK + b"Content-Length: 2, 2\r\n\r\nok", b"GET"),
        # underscore spellings of framing fields
        (_OK + b"Content_Length: 2\r\n\r\nok", b"GET"),
        (_OK + b"content_length: 2\r\nContent-Length: 2\r\n\r\nok", b"GET"),
        (_OK + b"Transfer_Encoding: chunked\r\nContent-Length: 2\r\n\r\nok", b"GET"),
        # framing fields on a 1xx (RFC 9110 8.6, RFC 9112 6.1)
        (b"HTTP/1.1 100 Continue\r\nContent-Length: 0\r\n\r\n", b"GET"),
        (b"HTTP/1.1 101 Switching Protocols\r\nContent-Length: 10\r\nUpgrade: x\r\n\r\n", b"GET"),
        (b"HTTP/1.1 103 Early Hints\r\nTransfer-Encoding: chunked\r\n\r\n", b"GET"),
        # a body on a 204
        (b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"GET"),
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\n", b"GET"),
        # bytes after a response without a body, or after a complete one, in the same read
        (b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\n\r\n", b"GET"),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\nhello", b"GET"),
        (_OK + b"Content-Length: 5\r\n\r\nhello", b"HEAD"),
        (_OK + b"Content-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"GET"),
        (_OK + b"Content-Length: 0\r\nConnection: close\r\n\r\nX", b"GET"),
        # status lines
        (b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"GET"),
        (b" HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"GET"),
        (b"HTTP/1.1  200 OK\r\nContent-Length: 0\r\n\r\n", b"GET"),
        (b"HTTP/1.1 600 Odd\r\nContent-Length: 0\r\n\r\n", b"GET"),
        (b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n", b"GET"),
        (b"HTTP/1.1 200 O\x01K\r\nContent-Length: 0\r\n\r\n", b"GET"),
        (b"HTTP/1.1 200 OK\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"GET"),
        # control characters, bare CR, obs-fold, whitespace before the colon
        (_OK + b"X: a\x0bb\r\nContent-Length: 0\r\n\r\n", b"GET"),
        (_OK + b"X: a\x7f\r\nContent-Length: 0\r\n\r\n", b"GET"),
        (_OK + b"X: a\rContent-Length: 0\r\n\r\n", b"GET"),
        (_OK + b"Content-Length: 0\r\n\tX: 1\r\n\r\n", b"GET"),
        (_OK + b"Content-Length : 0\r\n\r\n", b"GET"),
        # oversize head, even when it arrives whole
        (_OK + b"X: " + b"a" * MAX_RESPONSE_HEAD_BYTES + b"\r\nContent-Length: 0\r\n\r\n", b"GET"),
        # negative, signed, huge lengths and chunk sizes
        (_OK + b"Content-Length: +2\r\n\r\nok", b"GET"),
        (_OK + b"Content-Length: 1234567890123456789\r\n\r\n", b"GET"),
        (_OK + b"Transfer-Encoding: chunked\r\n\r\n" + b"1" * 17 + b"\r\n", b"GET"),
        (_OK + b"Transfer-Encoding: chunked\r\n\r\n-1\r\n", b"GET"),
        (_OK + b"Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n", b"GET"),
        # chunk extensions and chunk lines with bare LF or CR
        (_OK + b"Transfer-Encoding: chunked\r\n\r\n5;a=b\nhello\r\n0\r\n\r\n", b"GET"),
        (_OK + b"Transfer-Encoding: chunked\r\n\r\n5;a\n=b\r\nhello\r\n0\r\n\r\n", b"GET"),
        (_OK + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n", b"GET"),
        (_OK + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n\r\n", b"GET"),
        (_OK + b"Transfer-Encoding: chunked\r\n\r\n" + b"1;" + b"x" * 1100 + b"\r\n", b"GET"),
    ],
)
def test_upstream_leg_refuses_ambiguous_framing(response: bytes, method: bytes) -> None:
    leg = UpstreamLeg()
    leg.request(method, b"/x", [(b"Host", b"up")])
    leg.end()
    leg.feed(response)
    with pytest.raises(UpstreamBroken):
        for _ in range(10):
            if leg.next_event() in (Ev.NEED_DATA, Ev.PAUSED):
                break


@pytest.mark.parametrize(
    ("response", "method", "status", "length", "body"),
    [
        # real servers send "Content-Length: 0" on a 204; it is not relayed (RFC 9110 8.6)
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", b"GET", 204, 0, b""),
        # no reason phrase (h11 and browsers accept it)
        (b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok", b"GET", 200, 2, b"ok"),
        (b"HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\nok", b"GET", 200, 2, b"ok"),
        # RFC 9112 6.1: a HEAD response or a 304 may name the coding it would have used
        (_OK + b"Transfer-Encoding: chunked\r\n\r\n", b"HEAD", 200, None, b""),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", b"GET", 304, 5, b""),
        # coding names are case-insensitive (RFC 9112 7)
        (
            _OK + b"Transfer-Encoding:  Chunked \r\n\r\n2\r\nok\r\n0\r\n\r\n",
            b"GET",
            200,
            None,
            b"ok",
        ),
        # informational responses before the final one, in the same read
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            + _OK
            + b"Content-Length: 2\r\n\r\nok",
            b"POST",
            200,
            2,
            b"ok",
        ),
        # a value with obs-text and HTAB is fine
        (_OK + b"X: a\tb \xe9\r\nContent-Length: 0\r\n\r\n", b"GET", 200, 0, b""),
    ],
)
def test_upstream_leg_accepts_unambiguous_framing(
    response: bytes, method: bytes, status: int, length: int | None, body: bytes
) -> None:
    events = _upstream_events(response, method=method)
    heads = [e for e in events if isinstance(e, ResponseHead)]
    assert heads[-1].status == status
    assert _body(events) == body
    assert events[-1] is Ev.END


def test_upstream_leg_declared_length_of_accepted_heads() -> None:
    leg = UpstreamLeg()
    leg.request(b"GET", b"/x", [(b"Host", b"up")])
    leg.end()
    leg.feed(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(leg.next_event(), ResponseHead)
    assert leg.declared_length == 0
    assert leg.next_event() is Ev.END and leg.reusable


def test_upstream_leg_101_keeps_the_bytes_after_it() -> None:
    # bytes after a 101 belong to the new protocol, not to a second response
    events = _upstream_events(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\nxyz")
    assert events[-1] is Ev.SWITCHED


def _chunked(response_tail: bytes) -> bytes:
    return _OK + b"Transfer-Encoding: chunked\r\n\r\n" + response_tail


@pytest.mark.parametrize(
    "trailers",
    [
        b"X-T\r\n",  # no colon
        b": v\r\n",  # no name
        b"X T: v\r\n",  # not a token
        b" X-T: v\r\n",  # obs-fold
        b"X-T: a\nb\r\n",  # bare LF
        b"X-T: a\rb\r\n",  # bare CR
        b"X-T: a\x00b\r\n",  # NUL
        b"X-T: " + b"v" * MAX_RESPONSE_TRAILER_BYTES + b"\r\n",  # one line over the bound
        b"X-T: vvvvvvvvvvvvvvvv\r\n" * (MAX_RESPONSE_TRAILER_BYTES // 20),  # many lines over it
    ],
)
def test_upstream_leg_refuses_bad_or_oversize_trailers(trailers: bytes) -> None:
    with pytest.raises(UpstreamBroken):
        _upstream_events(_chunked(b"2\r\nok\r\n0\r\n" + trailers + b"\r\n"))


def test_upstream_leg_drops_trailers_within_the_bound() -> None:
    trailers = b"X-T: vvvvvvvvvvvvvvvv\r\n" * (MAX_RESPONSE_TRAILER_BYTES // 24)
    events = _upstream_events(_chunked(b"2\r\nok\r\n0\r\n" + trailers + b"\r\n"))
    assert _body(events) == b"ok" and events[-1] is Ev.END


def test_upstream_leg_coalesces_the_chunks_of_one_read() -> None:
    events = _upstream_events(_chunked(b"1\r\na\r\n" * 1000 + b"0\r\n\r\n"))
    assert isinstance(events[0], ResponseHead)
    assert events[1:] == [b"a" * 1000, Ev.END]


def test_upstream_leg_trailing_after_a_chunked_response() -> None:
    leg = UpstreamLeg()
    leg.request(b"GET", b"/x", [(b"Host", b"up")])
    leg.end()
    leg.feed(_chunked(b"2\r\nok\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n"))
    assert isinstance(leg.next_event(), ResponseHead)
    assert leg.next_event() == b"ok"
    assert leg.next_event() is Ev.END
    assert leg.trailing == b"HTTP/1.1 200 OK\r\n"
    assert leg.overrun


@pytest.mark.parametrize("late", [b"", b"X"])
def test_upstream_leg_overrun_marks_bytes_after_the_response(late: bytes) -> None:
    leg = UpstreamLeg()
    leg.request(b"GET", b"/x", [(b"Host", b"up")])
    leg.end()
    leg.feed(_chunked(b"2\r\nok\r\n0\r\n\r\n"))
    assert isinstance(leg.next_event(), ResponseHead)
    assert leg.next_event() == b"ok"
    assert leg.next_event() is Ev.END
    assert not leg.overrun
    if late:
        leg.feed(late)  # a later read, after the response ended
        assert leg.next_event() is Ev.PAUSED
    assert leg.overrun == bool(late)
    leg.start_next_cycle()
    assert not leg.overrun


def test_client_leg_discarded_head_leaves_the_response_unstarted() -> None:
    leg = _server_leg(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    leg.response_head_lines(200, [], length=5)
    assert leg.response_started
    leg.discard_response_head()
    assert not leg.response_started
    leg.close_after_response()
    leg.response_head_lines(502, [], length=0)
    leg.end()
    assert not leg.keep_alive


def test_upstream_leg_reads_a_head_dripped_byte_by_byte() -> None:
    response = (
        _OK + b"".join(b"X-%d: v\r\n" % i for i in range(200)) + b"Content-Length: 2\r\n\r\nok"
    )
    leg = UpstreamLeg()
    leg.request(b"GET", b"/x", [(b"Host", b"up")])
    leg.end()
    events: list[ResponseHead | bytes | Ev] = []
    for byte in response:
        leg.feed(bytes([byte]))
        while (event := leg.next_event()) is not Ev.NEED_DATA:
            events.append(event)
            if event is Ev.END:
                break
    head = events[0]
    assert isinstance(head, ResponseHead) and len(head.lines) == 201
    assert _body(events) == b"ok" and events[-1] is Ev.END


# -- the request body reader: offsets, coalescing, any cut


def test_client_leg_coalesces_the_chunks_of_one_read() -> None:
    _leg, events = _server(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"1;ext=1\r\nX\r\n" * 1000
        + b"0\r\n\r\n"
    )
    assert events[1:] == [b"X" * 1000, Ev.END, Ev.PAUSED]


@pytest.mark.parametrize("leg_class", [ServerLeg, HttptoolsLeg])
def test_client_leg_reads_a_chunked_body_cut_anywhere(
    leg_class: type[ServerLeg] | type[HttptoolsLeg],
) -> None:
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b'3\r\nabc\r\n1;x="y"\r\nd\r\n0\r\n\r\nGET /next'
    for cut in range(len(body) + 1):
        for step in (1, None):
            leg = leg_class(16384)
            leg.feed_head(head)
            events: list[RequestHead | bytes | Ev] = [leg.next_event()]
            pieces = [body[:cut], body[cut:]] if step is None else [bytes([b]) for b in body]
            for piece in pieces:
                if piece:
                    leg.feed(piece)
                events += _drain(leg)
            data = b"".join(e for e in events if isinstance(e, bytes))
            assert data == b"abcd", (cut, step, events)
            assert Ev.END in events and leg.request_ended
            assert leg.trailing == b"GET /next"


@pytest.mark.parametrize(
    "body",
    [
        b"3\r\nabcd\r\n",  # longer than its size
        b"3\r\nabc\n",  # bare LF after data
        b"3\nabc\r\n",  # bare LF ending the size line
        b"1;" + b"x" * 1100 + b"\r\n",  # size line too long
        b"1;" + b"x" * 1100,  # ... even before its end arrives
        b"0\r\nX: y\r\n\r\n",  # trailers in a request
        b"g\r\n",  # not hex
    ],
)
def test_client_leg_refuses_bad_chunked_bodies(body: bytes) -> None:
    with pytest.raises(RequestRefused):
        _server(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + body)


def test_client_leg_content_length_body_split_keeps_pipelined_bytes() -> None:
    leg = ServerLeg(16384)
    leg.feed_head(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n")
    assert isinstance(leg.next_event(), RequestHead)
    leg.feed(b"he")
    assert leg.next_event() == b"he"
    leg.feed(b"lloGET / HTTP/1.1\r\n")
    assert leg.next_event() == b"llo"
    assert leg.next_event() is Ev.END
    assert leg.trailing == b"GET / HTTP/1.1\r\n"


# -- the head scanner: blank lines before a request line


def test_head_scanner_skips_a_flood_of_blank_lines() -> None:
    scanner = HeadScanner(16384, 100, 8192)
    for _ in range(40):
        scanner.feed(b"\r\n" * 32768)
        assert scanner.maybe_take_head() is None
        assert len(scanner) == 0
    scanner.feed(b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\nrest")
    assert scanner.maybe_take_head() == (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"rest")
    # the blank lines are skipped by an offset; what follows them is copied once
    assert scanner.copied == len(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nrest")


def test_head_scanner_blank_lines_split_between_cr_and_lf() -> None:
    scanner = HeadScanner(16384, 100, 8192)
    for piece in (b"\r\n\r", b"\n\r", b"\nGET / HTTP/1.1\r", b"\nHost: a\r\n\r", b"\n"):
        assert scanner.maybe_take_head() is None
        scanner.feed(piece)
    assert scanner.maybe_take_head() == (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"")


@pytest.mark.parametrize("data", [b"\r\n\r\r\nGET / HTTP/1.1\r\n", b"\r\n\nGET / HTTP/1.1\r\n"])
def test_head_scanner_refuses_bare_cr_or_lf_among_blank_lines(data: bytes) -> None:
    with pytest.raises(RequestRefused):
        _scan(data)


def test_http1_tiny_chunks_come_in_slices_of_bounded_work() -> None:
    count = 3 * MAX_CHUNKS_PER_EVENT + 5
    leg = ServerLeg(16384)
    leg.feed_head(b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert isinstance(leg.next_event(), RequestHead)
    leg.feed(b"1\r\nx\r\n" * count + b"0\r\n\r\n")
    sizes = []
    capped = []
    while True:
        event = leg.next_event()
        if event is Ev.END:
            break
        assert isinstance(event, bytes)
        sizes.append(len(event))
        capped.append(leg.capped)
    assert sizes == [MAX_CHUNKS_PER_EVENT] * 3 + [5]
    assert capped == [True, True, True, False]


def test_http1_tiny_response_chunks_come_in_slices_of_bounded_work() -> None:
    count = 2 * MAX_CHUNKS_PER_EVENT + 1
    leg = UpstreamLeg()
    leg.request(b"GET", b"/", [(b"Host", b"a")])
    leg.end()
    leg.feed(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"1\r\ny\r\n" * count
        + b"0\r\n\r\n"
    )
    assert isinstance(leg.next_event(), ResponseHead)
    sizes = []
    while True:
        event = leg.next_event()
        if event is Ev.END:
            break
        assert isinstance(event, bytes)
        sizes.append((len(event), leg.capped))
    assert sizes == [(MAX_CHUNKS_PER_EVENT, True), (MAX_CHUNKS_PER_EVENT, True), (1, False)]


def test_http1_local_response_is_one_fixed_shape() -> None:
    from fastproxy.http1 import local_response

    assert local_response(
        405,
        b'{"error":"x"}',
        content_type=b"application/json",
        request_id=b"rid",
        close=True,
        field=b"Allow: GET, HEAD",
    ) == (
        b"HTTP/1.1 405 Method Not Allowed\r\nContent-Type: application/json\r\n"
        b"Content-Length: 13\r\nX-Request-Id: rid\r\nAllow: GET, HEAD\r\nConnection: close\r\n\r\n"
        b'{"error":"x"}'
    )
    # 204: nothing describes a body (RFC 9110 8.6); HEAD: the length, not the body
    assert (
        local_response(204, request_id=b"r")
        == b"HTTP/1.1 204 No Content\r\nX-Request-Id: r\r\n\r\n"
    )
    assert local_response(200, b"ok\n", content_type=b"text/plain", head_only=True).endswith(
        b"Content-Length: 3\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (b"HTTP/1.1 20 OK\r\n\r\n", 'bad status line "HTTP/1.1 20 OK"'),
        (b"HTTP/1.1 200 OK\r\nX\xff: a\r\n\r\n", 'bad header line "X\\xff: a"'),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n", 'bad Content-Length "1x"'),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nz\xffz\r\n",
            'bad chunk size "z\\xffz"',
        ),
    ],
)
def test_upstream_leg_messages_show_bytes_as_text(response: bytes, message: str) -> None:
    # the message goes into a WARNING log line: quoted text, never a Python bytes repr
    with pytest.raises(UpstreamBroken) as raised:
        _upstream_events(response)
    assert message in str(raised.value)
    assert "b'" not in str(raised.value)


def test_quote_escapes_what_is_not_printable() -> None:
    assert quote(b'a"\\\r\n\x7f\x80 z') == '"a\\x22\\x5c\\x0d\\x0a\\x7f\\x80 z"'
