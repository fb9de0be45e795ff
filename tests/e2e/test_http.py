"""HTTP/1.1 behaviour end to end (SPEC 5, 7): keep-alive, pipelining, streaming bodies, framing
refusals, limits, timeouts and upstream failures, through a real fastproxy and a real upstream.

Tests that need their own config start a proxy with the ``proxy`` factory; the others share the
module's ``preset``. Waits are generous and nothing asserts how fast something happened.
"""

from __future__ import annotations

import socket
import time

import pytest
from support.client import (
    ConnectionClosedError,
    HttpConnection,
    assert_error,
    build_request,
    chunked,
    get,
    host_of,
    http_request,
)
from support.proxy import ProxyFactory, Stack, free_port
from support.upstream import RESET_ANNOUNCED_BYTES, RecordingUpstream, pattern_body

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


# -- connections ----------------------------------------------------------------------------------


def test_keepalive_reuses_client_and_upstream_connections(
    proxy: ProxyFactory, upstream: RecordingUpstream
) -> None:
    port = proxy().sdk_port
    with HttpConnection(port) as conn:
        assert conn.get("/api/1/devices/first").status == 200
        time.sleep(0.2)  # the first upstream connection is back in the pool
        assert conn.get("/api/1/devices/second").status == 200
    first, second = upstream.requests()
    assert (first.target, second.target) == (b"/api/1/devices/first", b"/api/1/devices/second")
    assert first.conn_id == second.conn_id


def test_pipelined_requests_answered_in_order_skipping_denied(preset: Stack) -> None:
    port = preset.proxy.sdk_port
    host = host_of(port)
    with HttpConnection(port) as conn:
        conn.send(
            build_request("/api/1/devices/a", host=host)
            + build_request("/admin", host=host)
            + build_request("/api/1/sessions/b", host=host)
        )
        responses = [conn.read_response() for _ in range(3)]
    assert [r.status for r in responses] == [200, 403, 200]
    assert responses[0].json()["target"] == "/api/1/devices/a"
    assert_error(responses[1], 403, "forbidden")
    assert responses[2].json()["target"] == "/api/1/sessions/b"
    assert preset.upstream.targets() == [b"/api/1/devices/a", b"/api/1/sessions/b"]


def test_http10_request_without_host_forwarded_then_closed(preset: Stack) -> None:
    with HttpConnection(preset.proxy.sdk_port) as conn:
        response = conn.request(b"GET /api/1/devices HTTP/1.0\r\n\r\n")
        assert response.status == 200
        assert conn.wait_closed(), "HTTP/1.0 without keep-alive ends after one response"
    assert preset.upstream.targets() == [b"/api/1/devices"]


def test_half_closed_client_gets_its_pipelined_answers_then_close(preset: Stack) -> None:
    """A FIN after complete requests is not an abort: they are answered in order, then close."""
    port = preset.proxy.sdk_port
    host = host_of(port)
    with HttpConnection(port) as conn:
        conn.send(
            build_request("/api/1/devices/slow?delay=0.3", host=host)
            + build_request("/api/1/sessions/next", host=host)
        )
        conn.sock.shutdown(socket.SHUT_WR)
        first, second = conn.read_response(), conn.read_response()
        assert (first.status, second.status) == (200, 200)
        assert first.json()["target"] == "/api/1/devices/slow?delay=0.3"
        assert second.json()["target"] == "/api/1/sessions/next"
        assert conn.wait_closed()


def test_head_answered_without_body_and_connection_reusable(preset: Stack) -> None:
    port = preset.proxy.sdk_port
    with HttpConnection(port) as conn:
        raw = build_request("/api/1/devices?size=5000", host=host_of(port), method="HEAD")
        head = conn.request(raw)
        assert head.status == 200
        assert head.body == b""
        assert head.header("content-length") in {None, b"5000"}
        assert conn.get("/api/1/devices/after").status == 200
    assert [r.method for r in preset.upstream.requests()] == [b"HEAD", b"GET"]


# -- bodies stream intact -------------------------------------------------------------------------


def test_request_body_with_content_length_arrives_intact(preset: Stack) -> None:
    port = preset.proxy.sdk_port
    body = pattern_body(300_000)
    raw = build_request("/api/1/devices?echo=1", host=host_of(port), method="POST", body=body)
    response = http_request(port, raw)
    assert response.status == 200
    assert response.body == body
    [request] = preset.upstream.requests()
    assert request.body == body


def test_request_body_chunked_streams_intact(preset: Stack) -> None:
    port = preset.proxy.sdk_port
    body = pattern_body(5_000_000)
    with HttpConnection(port) as conn:
        conn.send(
            build_request(
                "/api/1/sessions?echo=1",
                host=host_of(port),
                method="POST",
                headers=[("Transfer-Encoding", "chunked")],
            )
        )
        for piece in chunked(body, 100_000):
            conn.send(piece)
        response = conn.read_response()
    assert response.status == 200
    assert response.body == body
    [request] = preset.upstream.requests()
    assert request.body == body


def test_large_response_with_content_length_streams_intact(preset: Stack) -> None:
    response = get(preset.proxy.sdk_port, "/api/1/devices?size=20000000")
    assert response.status == 200
    assert len(response.body) == 20_000_000
    assert response.body == pattern_body(20_000_000)


def test_chunked_response_streams_intact(preset: Stack) -> None:
    response = get(preset.proxy.sdk_port, "/api/1/devices?chunked=300001")
    assert response.status == 200
    assert response.body == pattern_body(300_001)


def test_response_hop_by_hop_headers_removed_custom_kept(preset: Stack) -> None:
    response = get(preset.proxy.sdk_port, "/api/1/devices?headers=1")
    assert response.status == 200
    names = {name.lower() for name, _ in response.headers}
    assert names.isdisjoint({b"x-up-hop", b"keep-alive", b"proxy-connection"}), response.headers
    assert response.header_values("x-resp_under") == [b"1"]
    assert response.header_values("x-resp-dup") == [b"a", b"b"]
    assert response.header_values("set-cookie") == [b"a=1", b"b=2"]


# -- framing the proxy must refuse (SPEC 5) -------------------------------------------------------

SMUGGLED = b"GET /api/1/devices/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
AMBIGUOUS = [
    pytest.param(
        b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" % (5 + len(SMUGGLED)),
        id="content-length-and-chunked",
    ),
    pytest.param(
        b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n\r\n0\r\n\r\n" % (5 + len(SMUGGLED)),
        id="chunked-and-content-length",
    ),
    pytest.param(
        b"Content-Length: %d\r\nTransfer_Encoding: chunked\r\n\r\n0\r\n\r\n" % (5 + len(SMUGGLED)),
        id="content-length-and-underscore-transfer-encoding",
    ),
    pytest.param(
        b"Content-Length: 0\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED),
        id="two-content-lengths",
    ),
    pytest.param(b"Content-Length: +%d\r\n\r\n" % len(SMUGGLED), id="signed-content-length"),
    pytest.param(
        b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", id="chunked-not-the-last-coding"
    ),
    pytest.param(b"Transfer-Encoding: gzip\r\n\r\n", id="unknown-coding"),
    pytest.param(b"X-Fold: a\r\n b\r\nContent-Length: 0\r\n\r\n", id="obs-fold"),
    pytest.param(b"X-Bare: lf\nContent-Length: 0\r\n\r\n", id="bare-lf"),
]


@pytest.mark.parametrize("tail", AMBIGUOUS)
def test_ambiguous_framing_refused_and_closed_before_upstream(preset: Stack, tail: bytes) -> None:
    port = preset.proxy.sdk_port
    raw = b"POST /api/1/devices HTTP/1.1\r\nHost: %s\r\n" % host_of(port).encode() + tail
    with HttpConnection(port) as conn:
        conn.send(raw + SMUGGLED)
        response = conn.read_response()
        assert conn.wait_closed(), "a 400 must close the connection"
    assert_error(response, 400)
    assert preset.upstream.requests() == []
    assert b"smuggled" not in preset.upstream.raw_received()


def test_invalid_chunk_size_refused_and_never_smuggled(preset: Stack) -> None:
    port = preset.proxy.sdk_port
    head = build_request(
        "/api/1/devices",
        host=host_of(port),
        method="POST",
        headers=[("Transfer-Encoding", "chunked")],
    )
    with HttpConnection(port) as conn:
        conn.send(head + b"zz\r\nhello\r\n0\r\n\r\n" + SMUGGLED)
        response = conn.read_response()
        assert conn.wait_closed(), "a 400 must close the connection"
    # the head may already have been streamed to the upstream; the body never completes there
    assert_error(response, 400)
    assert not any(r.complete for r in preset.upstream.requests())
    assert not preset.upstream.saw_path(b"/api/1/devices/smuggled")


# -- limits (SPEC 7) ------------------------------------------------------------------------------


def test_body_over_rule_limit_answered_413(
    proxy: ProxyFactory, upstream: RecordingUpstream
) -> None:
    small = {
        "fallback": "deny",
        "rules": {"api": {"prefix": "/api/1/", "action": "forward", "max_body_bytes": 1000}},
    }
    port = proxy(
        overrides={"policies": {"small": small}, "listeners": {"sdk": {"policy": "small"}}}
    ).sdk_port
    host = host_of(port)
    fits = http_request(port, build_request("/api/1/x", host=host, method="POST", body=b"a" * 500))
    assert fits.status == 200
    too_big = build_request("/api/1/y", host=host, method="POST", body=b"b" * 2000)
    assert_error(http_request(port, too_big), 413, "body_too_large")
    assert upstream.find(b"/api/1/x")[0].body == b"a" * 500
    assert not any(r.complete for r in upstream.find(b"/api/1/y"))


def test_header_section_over_limit_answered_431(preset: Stack) -> None:
    response = get(preset.proxy.sdk_port, "/api/1/devices", headers=[("X-Big", "a" * 20 * 1024)])
    assert_error(response, 431, "headers_too_large")
    assert preset.upstream.requests() == []


def test_uri_over_limit_answered_414(preset: Stack) -> None:
    response = get(preset.proxy.sdk_port, "/api/1/devices?" + "q" * 9 * 1024)
    assert_error(response, 414, "uri_too_long")
    assert preset.upstream.requests() == []


def test_slow_request_head_answered_408_and_closed(
    proxy: ProxyFactory, upstream: RecordingUpstream
) -> None:
    limits = {"limits": {"header_timeout_s": 1.0}}
    port = proxy(overrides={"listeners": {"sdk": limits}}).sdk_port
    with HttpConnection(port) as conn:
        conn.send(b"GET /api/1/devices HTTP/1.1\r\nHost: %s\r\n" % host_of(port).encode())
        response = conn.read_response()
        assert conn.wait_closed()
    assert_error(response, 408, "header_timeout")
    assert upstream.requests() == []


# -- upstream failures ----------------------------------------------------------------------------


def test_upstream_down_answered_502(proxy: ProxyFactory) -> None:
    # without health checks the only server is never marked down (nginx's rule): each request
    # tries it, and a refused connect is a 502
    overrides = {"upstreams": {"cobrowse": {"health": False}}}
    port = proxy(servers=[f"127.0.0.1:{free_port()}"], overrides=overrides).sdk_port
    assert_error(get(port, "/api/1/devices"), 502, "upstream_failed")
    assert_error(get(port, "/api/1/devices"), 502, "upstream_failed")


def test_upstream_down_with_health_checks_answered_503(proxy: ProxyFactory) -> None:
    # with checks (the default) the failed connect marks the only server down: no server is
    # up, so the request (tried again) and the next ones get 503 at once
    port = proxy(servers=[f"127.0.0.1:{free_port()}"]).sdk_port
    assert_error(get(port, "/api/1/devices"), 503, "no_healthy_upstream")
    assert_error(get(port, "/api/1/devices"), 503, "no_healthy_upstream")


# Upstream failures get a proxy of their own: passive health checks may remember them.


def test_upstream_without_first_byte_in_time_answered_504(
    proxy: ProxyFactory, upstream: RecordingUpstream
) -> None:
    # the default config gives the upstream 2 s for its first byte; it waits 5
    response = get(proxy().sdk_port, "/api/1/devices?delay=5")
    assert_error(response, 504, "upstream_timeout")
    assert upstream.targets() == [b"/api/1/devices?delay=5"]


def test_upstream_reset_mid_body_closes_client_connection(
    proxy: ProxyFactory, upstream: RecordingUpstream
) -> None:
    port = proxy().sdk_port
    with HttpConnection(port) as conn:
        conn.send(build_request("/api/1/devices?reset=1", host=host_of(port)))
        with pytest.raises(ConnectionClosedError) as closed:
            conn.read_response()
    # the head and part of the body were relayed; the client must not see a complete response
    assert closed.value.partial.startswith(b"HTTP/1.1 200")
    assert len(closed.value.partial) < RESET_ANNOUNCED_BYTES
    # the proxy keeps serving
    assert get(port, "/api/1/devices/next").status == 200
    assert upstream.targets() == [b"/api/1/devices?reset=1", b"/api/1/devices/next"]


def test_upstream_silent_mid_body_cut_after_read_timeout(
    proxy: ProxyFactory, upstream: RecordingUpstream
) -> None:
    port = proxy(overrides={"upstreams": {"cobrowse": {"read_timeout_s": 1.0}}}).sdk_port
    with HttpConnection(port) as conn:
        conn.send(build_request("/api/1/devices?stall=60", host=host_of(port)))
        # the upstream stays silent for 60 s, longer than the client waits: only the proxy's
        # 1 s read timeout can end this response in time
        with pytest.raises(ConnectionClosedError) as closed:
            conn.read_response()
    assert closed.value.partial.startswith(b"HTTP/1.1 200")
    assert len(closed.value.partial) < RESET_ANNOUNCED_BYTES
    assert get(port, "/api/1/devices/next").status == 200
