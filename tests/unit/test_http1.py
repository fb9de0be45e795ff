"""The parser seam: head scanning on raw bytes, and both h11 legs."""

from __future__ import annotations

import pytest

from fastproxy.headers import RequestRefused
from fastproxy.http1 import (
    ClientLeg,
    Ev,
    HeadScanner,
    RequestHead,
    ResponseHead,
    ServerLeg,
    UpstreamBroken,
    UpstreamLeg,
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
        b"Content-Length: 2\r\nX-Request-Id: upstream\r\nTransfer_Encoding: gzip\r\n"
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


def test_upstream_leg_chunked_wins_over_content_length() -> None:
    leg = UpstreamLeg()
    leg.request(b"GET", b"/x", [(b"Host", b"up")])
    leg.end()
    leg.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n")
    assert isinstance(leg.next_event(), ResponseHead)
    assert leg.declared_length is None
    leg.feed(b"a\r\n0123456789\r\n0\r\n\r\n")
    assert leg.next_event() == b"0123456789"
    assert leg.next_event() is Ev.END


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
    leg = UpstreamLeg()
    leg.request(b"GET", b"/x", [(b"Host", b"up")])
    leg.end()
    leg.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n")
    assert isinstance(leg.next_event(), ResponseHead)
    assert leg.next_event() == b"ok"
    assert leg.next_event() is Ev.END
    assert leg.trailing == b"HTTP/1.1 200 OK\r\n"


def test_upstream_leg_serialises_chunked_request_bodies() -> None:
    leg = UpstreamLeg()
    head = leg.request(b"POST", b"/x", [(b"Host", b"up"), (b"Transfer-Encoding", b"chunked")])
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
