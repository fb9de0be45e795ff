"""What an idle WebSocket tunnel keeps, in process on a real uvloop loop (no master, no fork).

After a checked 101 the connection holds no HTTP parser state: the exchange's head scanner is a
shared stand-in that holds nothing, the plain TCP upstream connection is a bare descriptor
(``upstream.TunnelSocket``; one that stays a transport drops its reader for a shared spent
one), the exchange's two per-connection timer callables are gone, and the relay keeps no frame
scanner between frames.
The tunnels' timeouts fall on the coarse ``WS_TICK_S`` grid, so idle tunnels share
``Deadlines`` buckets. Both parsers (``http_parser`` fixture), in front of the recording
upstream's WebSocket echo.
"""

from __future__ import annotations

import asyncio
import functools
import socket

import prometheus_client
import pytest
import uvloop
from support.client import ConnectionClosedError, WebSocketClient, WebSocketClosedError
from support.upstream import RecordingUpstream

from fastproxy import worker
from fastproxy.config import parse_config
from fastproxy.deadlines import RESOLUTION_S
from fastproxy.exchange import State
from fastproxy.runtime import Snapshot
from fastproxy.upstream import TunnelSocket, UpstreamProtocol


def _open(port: int, name: str) -> WebSocketClient:
    ws = WebSocketClient(port, f"/sockets/1/{name}")
    ws.send_text(f"hello {name}")
    assert ws.recv() == f"hello {name}"
    return ws


@pytest.mark.timeout(60)
def test_an_idle_tunnel_holds_no_parser_state(
    upstream: RecordingUpstream, http_parser: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a WorkerState per parser in this process: its metrics stay out of the global registry
    monkeypatch.setattr(prometheus_client.REGISTRY, "register", lambda collector: None)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        config = parse_config(
            {
                "http_parser": http_parser,
                "upstreams": {"app": {"servers": [upstream.address]}},
                "listeners": {"sdk": {"bind": "127.0.0.1:0", "policy": "cobrowse-sdk"}},
            },
            "fastproxy.toml",
        )
        state = worker.WorkerState(Snapshot.build(config, 1), loop)
        listener = state.listeners["sdk"]
        sock = socket.create_server(("127.0.0.1", 0))
        sock.setblocking(False)
        port = sock.getsockname()[1]
        await worker._start_listener(state, listener, sock)
        clients = [await loop.run_in_executor(None, _open, port, name) for name in ("a", "b")]
        try:
            conns = list(listener.connections)
            assert len(conns) == 2 and all(c.state is State.TUNNEL for c in conns)
            first, second = conns
            for conn in conns:
                assert not isinstance(conn.arm, functools.partial)
                assert not isinstance(conn.cancel_timer, functools.partial)
                assert len(conn.exchange.scanner) == 0 and conn.exchange.cycle is None
                assert conn.relay is not None and conn.relay.at_rest
                # the plain TCP upstream is a bare descriptor now, not a second transport
                upstream_conn = conn.tunnel_upstream
                assert isinstance(upstream_conn, TunnelSocket) and upstream_conn.is_open
                # the ping timer sits on the WS_TICK_S grid (plus the one tick of rounding)
                per_step = round(worker.WS_TICK_S / RESOLUTION_S)
                assert conn.deadline_tick % per_step == 1, conn.deadline_tick
            # one shared stand-in each, not an object per connection
            assert first.arm is second.arm and first.cancel_timer is second.cancel_timer
            assert first.exchange.scanner is second.exchange.scanner
            assert first.exchange.scanner is not None
            pool = state.pools["app"]
            assert [server.active for server in pool.servers] == [2]
            # an upstream connection that stays one (TLS) drops its HTTP reader: the spent leg,
            # shared, which no pool keeps
            legs = []
            for _ in range(2):
                spare = UpstreamProtocol(pool.servers[0])
                spare.tunnel()
                legs.append(spare.leg)
            assert legs[0] is legs[1] and not legs[0].idle and not legs[0].reusable
            # and the tunnels still relay, both ways, and close cleanly
            for ws, name in zip(clients, ("a", "b"), strict=True):
                await loop.run_in_executor(None, ws.send_text, f"again {name}")
                assert await loop.run_in_executor(None, ws.recv) == f"again {name}"
                assert await loop.run_in_executor(None, ws.close, 1000) == 1000
            for _ in range(100):  # the tunnels end: the server's count goes back, fds close
                if not listener.connections and pool.servers[0].active == 0:
                    break
                await asyncio.sleep(0.05)
            assert not listener.connections and pool.servers[0].active == 0
        finally:
            for ws in clients:
                ws.sock.close()
            server = listener.server
            assert server is not None
            server.close()
            await server.wait_closed()

    uvloop.run(scenario())


@pytest.mark.timeout(60)
def test_an_error_relaying_upstream_bytes_ends_the_tunnel(
    upstream: RecordingUpstream, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The upstream side's reads come from the loop's reader callback, not a transport's: an
    exception there is logged and ends the connection, as one in a transport callback does."""
    monkeypatch.setattr(prometheus_client.REGISTRY, "register", lambda collector: None)

    def boom(self: worker.ClientProtocol, data: bytes) -> None:
        raise RuntimeError("injected failure")

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        config = parse_config(
            {
                "upstreams": {"app": {"servers": [upstream.address]}},
                "listeners": {"sdk": {"bind": "127.0.0.1:0", "policy": "cobrowse-sdk"}},
            },
            "fastproxy.toml",
        )
        state = worker.WorkerState(Snapshot.build(config, 1), loop)
        loop.set_exception_handler(functools.partial(worker._on_loop_exception, state))
        listener = state.listeners["sdk"]
        sock = socket.create_server(("127.0.0.1", 0))
        sock.setblocking(False)
        await worker._start_listener(state, listener, sock)
        ws = await loop.run_in_executor(None, _open, sock.getsockname()[1], "a")
        try:
            [conn] = listener.connections
            assert isinstance(conn.tunnel_upstream, TunnelSocket)
            monkeypatch.setattr(worker.ClientProtocol, "_tunnel_from_upstream", boom)
            await loop.run_in_executor(None, ws.send_text, "echo me")  # the echo raises
            pool = state.pools["app"]
            for _ in range(100):
                if not listener.connections and pool.servers[0].active == 0:
                    break
                await asyncio.sleep(0.05)
            assert not listener.connections and pool.servers[0].active == 0
            with pytest.raises((ConnectionClosedError, OSError, WebSocketClosedError)):
                await loop.run_in_executor(None, ws.recv)
        finally:
            ws.sock.close()
            server = listener.server
            assert server is not None
            server.close()
            await server.wait_closed()

    uvloop.run(scenario())
    assert "injected failure" in caplog.text
