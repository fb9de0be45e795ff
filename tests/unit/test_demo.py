"""The demo upstream of ``fastproxy demo``, served on a loopback port from a background thread.

Not pure like the rest of ``tests/unit``: the demo is an application of its own, and the quickest
honest check of it is a real socket (well under a second for the module). The same clients drive
the proxy in ``tests/e2e``, so this also checks them against a known-good server.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
import uvloop
from support.client import (
    HttpConnection,
    WebSocketClient,
    build_request,
    get,
    host_of,
    http_request,
)

from fastproxy.demo import start_upstream


@pytest.fixture(params=["asyncio", "uvloop"])
def demo_port(request: pytest.FixtureRequest) -> Iterator[int]:
    # ``fastproxy demo`` runs on uvloop, whose transports differ from asyncio's
    loop = uvloop.new_event_loop() if request.param == "uvloop" else asyncio.new_event_loop()
    ready = threading.Event()
    ports: list[int] = []

    async def serve(stopping: asyncio.Event) -> None:
        server = await start_upstream("127.0.0.1", 0)
        ports.append(server.sockets[0].getsockname()[1])
        ready.set()
        await stopping.wait()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.1)  # let connections the clients closed finish closing

    stopping = asyncio.Event()
    thread = threading.Thread(target=loop.run_until_complete, args=(serve(stopping),))
    thread.start()
    try:
        assert ready.wait(10.0)
        yield ports[0]
    finally:
        loop.call_soon_threadsafe(stopping.set)
        thread.join(10.0)
        loop.close()


def test_demo_up_answers_ok(demo_port: int) -> None:
    response = get(demo_port, "/up")
    assert (response.status, response.body) == (200, b"ok\n")


def test_demo_index_shows_nothing_of_the_request(demo_port: int) -> None:
    response = get(demo_port, "/index.html?secret=q-marker", headers=[("X-Secret", "h-marker")])
    assert response.status == 200
    assert response.header("content-type") == b"text/html; charset=utf-8"
    assert b"fastproxy demo: single-page app index" in response.body
    assert b"marker" not in response.body


def test_demo_api_echoes_the_request_as_json(demo_port: int) -> None:
    response = get(
        demo_port,
        "/api/1/devices/x?a=1&b=%2F",
        headers=[("X_Custom_Header", "a"), ("X-Dup", "1"), ("X-Dup", "2")],
    )
    assert response.status == 200
    assert response.header("content-type") == b"application/json"
    assert response.json() == {
        "method": "GET",
        "path": "/api/1/devices/x",
        "query": "a=1&b=%2F",
        "headers": [
            ["Host", host_of(demo_port)],
            ["X_Custom_Header", "a"],
            ["X-Dup", "1"],
            ["X-Dup", "2"],
        ],
    }


def test_demo_keep_alive_answers_pipelined_requests_in_order(demo_port: int) -> None:
    host = host_of(demo_port)
    with HttpConnection(demo_port) as conn:
        conn.send(
            build_request("/proxy/1/a", host=host)
            + build_request("/up", host=host, method="HEAD")
            + build_request("/recording/1/b", host=host, method="POST", body=b"x" * 100)
        )
        first = conn.read_response()
        head = conn.read_response(method=b"HEAD")
        last = conn.read_response()
    assert first.json()["path"] == "/proxy/1/a"
    assert (head.status, head.header("content-length"), head.body) == (200, b"3", b"")
    assert (last.json()["method"], last.json()["path"]) == ("POST", "/recording/1/b")


def test_demo_malformed_request_answers_400_and_closes(demo_port: int) -> None:
    with HttpConnection(demo_port) as conn:
        response = conn.request(b"GET /api/1/x HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n")
        assert response.status == 400
        assert conn.wait_closed()


def test_demo_foreign_upgrade_is_answered_as_http(demo_port: int) -> None:
    raw = build_request(
        "/api/1/x",
        host=host_of(demo_port),
        headers=[
            ("Connection", "Upgrade, HTTP2-Settings"),
            ("Upgrade", "h2c"),
            ("HTTP2-Settings", ""),
        ],
    )
    response = http_request(demo_port, raw)
    assert (response.status, response.json()["path"]) == (200, "/api/1/x")


def test_demo_websocket_echoes_messages_and_closes(demo_port: int) -> None:
    with WebSocketClient(demo_port, "/sockets/1/x") as ws:
        ws.send_text("hello")
        assert ws.recv() == "hello"
        payload = bytes(range(256)) * 800
        ws.send_bytes(payload)
        assert ws.recv() == payload
        assert ws.close() == 1000
