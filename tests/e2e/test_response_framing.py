"""Upstream responses held to the request standard, end to end: a raw upstream writes exact bytes,
the real fastproxy master relays them (or refuses them with 502) to a raw client.

Every refused case checks the client's answer (502, ``{"error": "upstream_failed", ...}``) and
that a new connection is then served normally: the broken upstream connection was not pooled,
and nothing it sent reaches a later client. The parser choice plays no part in reading
responses, so the proxy runs once, with h11, and one proxy serves the whole module.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator

import pytest
from support.client import (
    ConnectionClosedError,
    HttpConnection,
    assert_error,
    build_request,
    get,
    host_of,
)
from support.proxy import ProxyFactory
from support.raw import Answer, RawUpstream
from support.raw import ok as _ok

pytestmark = pytest.mark.e2e

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _fixed(*parts: bytes) -> Answer:
    return lambda _head: list(parts)


def _switch(extra: bytes) -> Answer:
    """A 101 that completes the client's WebSocket handshake, with ``extra`` header lines."""

    def answer(head: bytes) -> list[bytes]:
        key = next(
            line.partition(b":")[2].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())  # noqa: S324 (RFC 6455)
        return [
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n" + extra + b"\r\n"
        ]

    return answer


OK = b"HTTP/1.1 200 OK\r\n"
CHUNKED = OK + b"Transfer-Encoding: chunked\r\n\r\n"
SECOND = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nX-Poison: 1\r\n\r\nPOISON"

#: case -> the upstream's answer; each is refused with 502 before anything is relayed
REFUSED: dict[str, Answer] = {
    "content-length-and-chunked": _fixed(
        OK + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    ),
    "coding-gzip": _fixed(OK + b"Transfer-Encoding: gzip\r\n\r\nabc"),
    "coding-gzip-chunked": _fixed(OK + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
    "coding-identity": _fixed(OK + b"Transfer-Encoding: identity\r\nContent-Length: 1\r\n\r\nx"),
    "chunked-twice": _fixed(
        OK + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "chunked-in-http-1.0": _fixed(
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    ),
    "content-length-twice-equal": _fixed(OK + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc"),
    "content-length-underscore": _fixed(OK + b"Content_Length: 3\r\n\r\nabc"),
    "transfer-encoding-underscore": _fixed(
        OK + b"Transfer_Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc"
    ),
    "content-length-on-100": _fixed(
        b"HTTP/1.1 100 Continue\r\nContent-Length: 3\r\n\r\n", _ok(b"abc")
    ),
    "chunked-on-204": _fixed(
        b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "content-length-on-204": _fixed(b"HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\nabc"),
    "bytes-after-204": _fixed(b"HTTP/1.1 204 No Content\r\n\r\n" + SECOND),
    "bytes-after-304": _fixed(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 6\r\n\r\nPOISON"),
    "second-response-after-content-length": _fixed(_ok(b"ok") + SECOND),
    "second-response-after-chunked": _fixed(CHUNKED + b"2\r\nok\r\n0\r\n\r\n" + SECOND),
    "blank-line-before-status-line": _fixed(b"\r\n" + _ok(b"abc")),
    "space-before-status-line": _fixed(b" " + _ok(b"abc")),
    "two-status-lines": _fixed(OK + _ok(b"abc")),
    "status-600": _fixed(b"HTTP/1.1 600 Odd\r\nContent-Length: 0\r\n\r\n"),
    "control-character-in-a-value": _fixed(OK + b"X-A: a\x0bb\r\nContent-Length: 0\r\n\r\n"),
    "bare-cr-in-a-value": _fixed(OK + b"X-A: a\rContent-Length: 0\r\n\r\n"),
    "obs-fold": _fixed(OK + b"X-A: a\r\n b\r\nContent-Length: 0\r\n\r\n"),
    "oversize-head": _fixed(OK + b"X-A: " + b"a" * 70000 + b"\r\nContent-Length: 0\r\n\r\n"),
    "negative-length": _fixed(OK + b"Content-Length: -1\r\n\r\n"),
    "chunk-size-overflow": _fixed(CHUNKED + b"1" * 17 + b"\r\nabc\r\n0\r\n\r\n"),
    "bare-lf-in-chunk-extension": _fixed(CHUNKED + b"3;a=b\nabc\r\n0\r\n\r\n"),
    "malformed-trailer": _fixed(CHUNKED + b"3\r\nabc\r\n0\r\nX-T: a\nb\r\n\r\n"),
}


@pytest.fixture(scope="module")
def framing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyFactory]:
    """One proxy in front of the raw upstream, for the module (its output is added to the report
    of a failing test)."""
    answers: dict[bytes, Answer] = {
        b"/api/1/devices/" + name.encode(): answer for name, answer in REFUSED.items()
    }
    answers.update(
        {
            b"/api/1/devices/head-with-body": _fixed(_ok(b"hello")),
            b"/api/1/devices/chunked-then-second-response": _fixed(
                CHUNKED + b"2\r\nok\r\n",
                b"3\r\nabc\r\n0\r\n\r\n" + SECOND,
            ),
            b"/api/1/devices/content-length-then-second-response": _fixed(
                OK + b"Content-Length: 5\r\n\r\nok",
                b"abc" + SECOND,
            ),
            b"/api/1/devices/zero-length-204": _fixed(
                b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"
            ),
            b"/api/1/devices/no-reason": _fixed(b"HTTP/1.1 200\r\nContent-Length: 3\r\n\r\nabc"),
            b"/sockets/1/content-length-on-101": _switch(b"Content-Length: 5\r\n"),
            b"/api/1/devices/oversize-trailers": _fixed(
                CHUNKED + b"3\r\nabc\r\n0\r\n" + b"X-T: t\r\n" * 9000 + b"\r\n"
            ),
        }
    )
    upstream = RawUpstream(answers)
    upstream.start()
    factory = ProxyFactory(tmp_path_factory.mktemp("framing"), [upstream.address], "h11")
    try:
        # one pooled connection: a connection that was not discarded would serve the next test
        factory(overrides={"upstreams": {"cobrowse": {"keepalive": 1}}})
        yield factory
    finally:
        factory.stop_all()
        upstream.stop()


def _port(factory: ProxyFactory) -> int:
    return factory.started[0].sdk_port


def _then_served(port: int) -> None:
    """A new connection is served normally, and nothing the broken upstream sent reaches it."""
    for _ in range(2):
        after = get(port, "/api/1/devices/after")
        assert (after.status, after.body) == (200, b"/api/1/devices/after")
        assert after.header("X-Poison") is None


@pytest.mark.parametrize("case", list(REFUSED))
def test_response_framing_refused_with_502(framing: ProxyFactory, case: str) -> None:
    port = _port(framing)
    assert_error(get(port, "/api/1/devices/" + case), 502, "upstream_failed")
    _then_served(port)


def test_response_framing_head_response_with_a_body_refused(
    framing: ProxyFactory,
) -> None:
    port = _port(framing)
    with HttpConnection(port) as conn:
        request = build_request("/api/1/devices/head-with-body", host=host_of(port), method="HEAD")
        response = conn.request(request)
        assert response.status == 502 and response.body == b""
        assert conn.wait_closed()
    _then_served(port)


def test_response_framing_content_length_on_101_refused(
    framing: ProxyFactory,
) -> None:
    port = _port(framing)
    request = build_request(
        "/sockets/1/content-length-on-101",
        host=host_of(port),
        headers=[
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", base64.b64encode(b"0123456789abcdef").decode()),
        ],
    )
    with HttpConnection(port) as conn:
        assert_error(conn.request(request), 502, "upstream_failed")
    _then_served(port)


@pytest.mark.parametrize(
    ("case", "body"),
    [("chunked-then-second-response", b"okabc"), ("content-length-then-second-response", b"okabc")],
)
def test_response_framing_second_response_after_relay_ends_the_client_connection(
    framing: ProxyFactory, case: str, body: bytes
) -> None:
    # the head (and the first bytes of the body) went out before the second response arrived:
    # the first response is completed, then the client's connection ends with it
    port = _port(framing)
    with HttpConnection(port) as conn:
        response = conn.get("/api/1/devices/" + case)
        assert (response.status, response.body) == (200, body)
        assert response.header("X-Poison") is None
        assert conn.wait_closed()
    _then_served(port)


def test_response_framing_oversize_trailers_never_complete_the_response(
    framing: ProxyFactory,
) -> None:
    # trailers are dropped, and bounded like a head: past 64 KiB the upstream is broken. The
    # proxy may have relayed the head before the bound is reached (the trailers take several
    # reads): then the client's connection is cut and the response never completes.
    port = _port(framing)
    with HttpConnection(port) as conn:
        try:
            response = conn.get("/api/1/devices/oversize-trailers")
        except ConnectionClosedError:
            pass
        else:
            assert_error(response, 502, "upstream_failed")
    _then_served(port)


def test_response_framing_zero_length_on_204_is_tolerated(
    framing: ProxyFactory,
) -> None:
    port = _port(framing)
    with HttpConnection(port) as conn:
        response = conn.get("/api/1/devices/zero-length-204")
        assert response.status == 204
        assert response.header("Content-Length") is None
        again = conn.get("/api/1/devices/again")  # the connection is kept
        assert (again.status, again.body) == (200, b"/api/1/devices/again")


def test_response_framing_status_line_without_reason_is_relayed(
    framing: ProxyFactory,
) -> None:
    response = get(_port(framing), "/api/1/devices/no-reason")
    assert (response.status, response.body) == (200, b"abc")
