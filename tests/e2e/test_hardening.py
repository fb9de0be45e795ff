"""Regression tests for desync, resource and close-semantics holes found in review."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import pytest
from support.client import (
    HttpConnection,
    assert_error,
    build_request,
    get,
    host_of,
)
from support.proxy import ProxyFactory, rss_bytes
from support.raw import LOOPBACK, RawUpstream
from support.upstream import RecordingUpstream

pytestmark = pytest.mark.e2e

WAIT_S = 20.0


@pytest.fixture
def canned() -> Iterator[type[RawUpstream]]:
    started: list[RawUpstream] = []

    class Started(RawUpstream):
        def __init__(self, answers: dict[bytes, bytes]) -> None:
            super().__init__(answers)
            self.start()
            started.append(self)

    yield Started
    for server in started:
        server.stop()


def _one_pooled_connection(server: RawUpstream) -> dict[str, object]:
    return {"upstreams": {"cobrowse": {"servers": [server.address], "keepalive": 1}}}


def test_hardening_bytes_after_a_response_never_reach_the_next_client(
    proxy: ProxyFactory, canned: type[RawUpstream]
) -> None:
    poison = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nX-Poison: 1\r\n\r\nPOISON"
    )
    server = canned({b"/api/1/devices/poison": poison})
    port = proxy(overrides=_one_pooled_connection(server)).sdk_port
    # the appended response arrives with the first: refused before anything is relayed
    assert_error(get(port, "/api/1/devices/poison"), 502, "upstream_failed")
    for _ in range(3):
        victim = get(port, "/api/1/sessions/victim")
        assert (victim.status, victim.body) == (200, b"/api/1/sessions/victim")
        assert victim.header("X-Poison") is None


def test_hardening_body_sent_with_a_head_response_is_not_pooled(
    proxy: ProxyFactory, canned: type[RawUpstream]
) -> None:
    server = canned({b"/api/1/devices/head": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"})
    port = proxy(overrides=_one_pooled_connection(server)).sdk_port
    with HttpConnection(port) as conn:
        conn.send(build_request("/api/1/devices/head", host=host_of(port), method="HEAD"))
        # the body arrives with the head: a response where none may be, refused (502)
        head = conn.read_response(method=b"HEAD")
        assert head.status == 502 and head.body == b""
    after = get(port, "/api/1/devices/after")
    assert (after.status, after.body) == (200, b"/api/1/devices/after")


def test_hardening_response_with_chunked_and_content_length_is_refused(
    proxy: ProxyFactory, canned: type[RawUpstream]
) -> None:
    both = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
        b"a\r\n0123456789\r\n0\r\n\r\n"
    )
    server = canned({b"/api/1/devices/both": both})
    port = proxy(overrides=_one_pooled_connection(server)).sdk_port
    # RFC 9112 6.1: both framings at once is an error; nginx >= 1.23 answers 502 as well
    assert_error(get(port, "/api/1/devices/both"), 502, "upstream_failed")
    assert get(port, "/api/1/devices/next").body == b"/api/1/devices/next"


def test_hardening_unread_local_replies_do_not_grow_memory(proxy: ProxyFactory) -> None:
    running = proxy()
    port = running.sdk_port
    [worker] = running.worker_pids()
    before = rss_bytes(worker)
    denied = build_request("/admin", host=host_of(port))
    batch = denied * 2000
    sent = 0
    with socket.create_connection((LOOPBACK, port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(0.5)
        deadline = time.monotonic() + 10
        while sent < 40_000_000 and time.monotonic() < deadline:
            try:
                sock.sendall(batch)
            except (TimeoutError, OSError):
                break  # the proxy stopped reading: that is the point
            sent += len(batch)
        growth_mib = (rss_bytes(worker) - before) / (1024 * 1024)
    # pipelined requests wait in the kernel while their answers are not read
    assert growth_mib < 32, f"worker grew {growth_mib:.0f} MiB after {sent} bytes sent"
    assert get(port, "/api/1/devices/alive").status == 200


def test_hardening_stalled_request_body_answered_408(
    proxy: ProxyFactory, upstream: RecordingUpstream
) -> None:
    port = proxy(overrides={"listeners": {"sdk": {"limits": {"body_timeout_s": 1.0}}}}).sdk_port
    with HttpConnection(port) as conn:
        conn.send(
            b"POST /api/1/devices/x HTTP/1.1\r\nHost: %s\r\nContent-Length: 100\r\n\r\n0123456789"
            % host_of(port).encode()
        )
        response = conn.read_response()
        assert_error(response, 408, "body_timeout")
        assert conn.wait_closed(WAIT_S)


def test_hardening_client_that_never_reads_is_cut_after_send_timeout(
    proxy: ProxyFactory, upstream: RecordingUpstream
) -> None:
    port = proxy(
        overrides={
            "listeners": {"sdk": {"limits": {"send_timeout_s": 1.0}}},
            "upstreams": {"cobrowse": {"read_timeout_s": 1.0}},
        }
    ).sdk_port
    with socket.create_connection((LOOPBACK, port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(build_request("/api/1/devices?size=50000000", host=host_of(port)))
        time.sleep(4)  # several send timeouts pass while nothing is read
        sock.settimeout(WAIT_S)
        received = 0
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
    assert 0 < received < 50_000_000


def test_hardening_local_reply_honours_connection_close(proxy: ProxyFactory) -> None:
    port = proxy().sdk_port
    with HttpConnection(port) as conn:
        conn.send(build_request("/admin", host=host_of(port), headers=[("Connection", "close")]))
        assert_error(conn.read_response(), 403, "forbidden")
        assert conn.wait_closed(WAIT_S)


def test_hardening_options_asterisk_answered_204_without_body_headers(proxy: ProxyFactory) -> None:
    port = proxy().sdk_port
    with HttpConnection(port) as conn:
        conn.send(b"OPTIONS * HTTP/1.1\r\nHost: %s\r\n\r\n" % host_of(port).encode())
        response = conn.read_response()
        assert response.status == 204
        assert response.header("Content-Length") is None
        assert response.header("Content-Type") is None
        assert conn.get("/api/1/devices/after").status == 200
