"""WebSockets end to end (SPEC 6): the echo tunnel, refused upgrades, and no smuggling through a
handshake the upstream did not accept.

The recording upstream answers a handshake as its ``ws=`` query parameter says (``echo`` by
default, ``426``, ``200``, ``badaccept``), so each upstream outcome is one target.
"""

from __future__ import annotations

import base64
import time

import pytest
from support.client import (
    HeaderPairs,
    HttpConnection,
    WebSocketClient,
    WebSocketClosedError,
    assert_error,
    build_request,
    host_of,
)
from support.proxy import ProxyFactory, Stack
from support.upstream import pattern_body
from wsproto.events import CloseConnection, Ping

from fastproxy.wsrelay import KEEPALIVE_PING

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

KEY = base64.b64encode(b"sixteen byte key").decode()
H2C = [
    ("Connection", "Upgrade, HTTP2-Settings"),
    ("Upgrade", "h2c"),
    ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"),
]


def handshake(
    port: int,
    target: str,
    *,
    method: str = "GET",
    key: str | None = KEY,
    version: str = "13",
    extra: HeaderPairs = (),
) -> bytes:
    """A raw WebSocket opening handshake (RFC 6455 §4.1); ``key=None`` leaves the key out."""
    headers: list[tuple[str | bytes, str | bytes]] = [
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", version),
    ]
    if key is not None:
        headers.append(("Sec-WebSocket-Key", key))
    headers.extend(extra)
    return build_request(target, host=host_of(port), method=method, headers=headers)


@pytest.mark.parametrize("listener", ["sdk", "agent"])
def test_websocket_echo_through_listener(preset: Stack, listener: str) -> None:
    payload = pattern_body(200_000)
    with WebSocketClient(preset.proxy.port(listener), "/sockets/1/x") as ws:
        for text in ("one", "two", "three"):
            ws.send_text(text)
            assert ws.recv() == text
        ws.send_bytes(payload)
        assert ws.recv() == payload
        assert ws.close(1000) == 1000
    [request] = preset.upstream.requests()
    assert request.target == b"/sockets/1/x"
    assert request.header_values("upgrade") == [b"websocket"]
    [tunnel] = [c for c in preset.upstream.connections() if c.conn_id == request.conn_id]
    assert tunnel.ws_messages == ["one", "two", "three", payload]


@pytest.mark.parametrize("target", ["/api/1/devices", "/sockets/1/"])
def test_h2c_upgrade_refused_before_upstream(preset: Stack, target: str) -> None:
    port = preset.proxy.sdk_port
    with HttpConnection(port) as conn:
        response = conn.request(build_request(target, host=host_of(port), headers=H2C))
        assert conn.wait_closed(), "a 400 must close the connection"
    assert_error(response, 400, "unsupported_upgrade")
    assert preset.upstream.requests() == []


@pytest.mark.parametrize(("listener", "target"), [("sdk", "/api/1/devices"), ("agent", "/api/1/x")])
def test_websocket_upgrade_outside_websocket_rule_forbidden(
    preset: Stack, listener: str, target: str
) -> None:
    port = preset.proxy.port(listener)
    with HttpConnection(port) as conn:
        response = conn.request(handshake(port, target))
    assert_error(response, 403, "upgrade_forbidden")
    assert preset.upstream.requests() == []


MALFORMED = [
    pytest.param("GET", None, "13", id="missing-key"),
    pytest.param("GET", "not-a-key", "13", id="key-not-16-bytes"),
    pytest.param("GET", KEY, "8", id="version-8"),
    pytest.param("POST", KEY, "13", id="post"),
]


@pytest.mark.parametrize(("method", "key", "version"), MALFORMED)
def test_malformed_websocket_handshake_refused(
    preset: Stack, method: str, key: str | None, version: str
) -> None:
    port = preset.proxy.sdk_port
    raw = handshake(port, "/sockets/1/x", method=method, key=key, version=version)
    with HttpConnection(port) as conn:
        response = conn.request(raw)
        assert conn.wait_closed(), "a 400 must close the connection"
    assert_error(response, 400, "bad_websocket_handshake")
    assert preset.upstream.requests() == []


@pytest.mark.parametrize(("mode", "status"), [("426", 426), ("200", 200)])
@pytest.mark.parametrize("same_write", [False, True], ids=["next-write", "same-write"])
def test_failed_upgrade_stays_http(preset: Stack, mode: str, status: int, same_write: bool) -> None:
    port = preset.proxy.sdk_port
    attempt = handshake(port, f"/sockets/1/x?ws={mode}")
    smuggled = build_request("/admin", host=host_of(port))
    with HttpConnection(port) as conn:
        if same_write:  # the attacker does not wait for the answer to the handshake
            conn.send(attempt + smuggled)
            answer = conn.read_response()
        else:
            answer = conn.request(attempt)
            conn.send(smuggled)
        assert answer.status == status
        assert_error(conn.read_response(), 403, "forbidden")
    assert preset.upstream.targets() == [f"/sockets/1/x?ws={mode}".encode()]
    assert not preset.upstream.saw_path(b"/admin")
    assert b"/admin" not in preset.upstream.raw_received()


def test_upgrade_with_wrong_accept_answered_502_without_tunnel(preset: Stack) -> None:
    port = preset.proxy.sdk_port
    with HttpConnection(port) as conn:
        response = conn.request(handshake(port, "/sockets/1/x?ws=badaccept"))
        assert conn.wait_closed(), "no tunnel may open after a wrong Sec-WebSocket-Accept"
    assert_error(response, 502, "upstream_failed")


def test_unmasked_client_frame_closes_the_websocket(preset: Stack) -> None:
    with WebSocketClient(preset.proxy.sdk_port, "/sockets/1/x") as ws:
        ws.send_raw(b"\x81\x05hello")  # FIN, text, no mask bit: RFC 6455 §5.1 forbids it
        with pytest.raises(WebSocketClosedError) as closed:
            ws.recv()
    # 1002 protocol error in a Close frame, or 1006: the TCP connection closed without one
    assert closed.value.code in {1002, 1006}
    assert all(not c.ws_messages for c in preset.upstream.connections())


KEEPALIVE_LIMITS = {
    "listeners": {"sdk": {"limits": {"ws_ping_interval_s": 0.3, "ws_idle_timeout_s": 1.2}}}
}


def test_idle_websocket_is_pinged_then_closed_going_away(proxy: ProxyFactory) -> None:
    """A client that neither sends nor answers pings gets keep-alive pings, then Close 1001."""
    running = proxy(overrides=KEEPALIVE_LIMITS)
    with WebSocketClient(running.sdk_port, "/sockets/1/idle") as ws:
        start = time.monotonic()
        pings: list[bytes] = []
        close: CloseConnection | None = None
        while close is None and time.monotonic() - start < 15:
            for event in ws._receive():  # raw events: nothing answers the pings
                if isinstance(event, Ping):
                    pings.append(bytes(event.payload))
                elif isinstance(event, CloseConnection):
                    close = event
        assert close is not None and close.code == 1001
        assert time.monotonic() - start >= 1.2 - 0.05  # not before the idle timeout
    assert pings and all(p == KEEPALIVE_PING for p in pings)


def test_active_websocket_outlives_the_idle_timeout(proxy: ProxyFactory) -> None:
    running = proxy(overrides=KEEPALIVE_LIMITS)
    with WebSocketClient(running.sdk_port, "/sockets/1/busy") as ws:
        start = time.monotonic()
        count = 0
        while time.monotonic() - start < 2.5:  # twice the idle timeout
            ws.send_text(f"m{count}")
            assert ws.recv() == f"m{count}"
            count += 1
            time.sleep(0.2)
        assert ws.close(1000) == 1000
