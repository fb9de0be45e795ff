"""The built-in demo upstream behind ``fastproxy demo``.

A stand-in for the co-browsing backend so a new user can see the preset at work with curl:
``/up`` answers "ok", ``/index.html`` is a tiny single-page-app index, every other path echoes the
request it received as JSON (what the proxy forwarded, after policy and header rewriting), and a
WebSocket handshake on any path opens an echo socket.

This module is an exception to the layering of the package: it is an application of its own, not a
part of the proxy, so it uses h11 and wsproto directly and is imported by nothing but ``cli``.
It never serves traffic of the proxy itself and has no test-only switches.

Run it alone with ``python -m fastproxy.demo [--host H] [--port P]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from http import HTTPStatus
from typing import cast

import h11
import orjson
import uvloop
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.utilities import LocalProtocolError, generate_accept_token

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000

INDEX_HTML = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>fastproxy demo</title></head>
<body><h1>fastproxy demo: single-page app index</h1>
<p>Served by the demo upstream. The agent listener answers every frontend route with this page.</p>
</body></html>
"""

SERVER_HEADER = (b"server", b"fastproxy-demo")


def _text(value: bytes) -> str:
    # latin-1 maps every byte to one code point, so nothing the proxy forwarded is lost
    return value.decode("latin-1")


def echo_body(request: h11.Request) -> bytes:
    """The JSON document the demo answers on API routes: what reached the upstream."""
    path, _, query = request.target.partition(b"?")
    return orjson.dumps(
        {
            "method": _text(request.method),
            "path": _text(path),
            "query": _text(query),
            "headers": [[_text(name), _text(value)] for name, value in request.headers.raw_items()],
        }
    )


class DemoProtocol(asyncio.Protocol):
    """One client connection: HTTP/1.1 through h11 until a WebSocket upgrade, then echo frames."""

    _transport: asyncio.Transport
    _http: h11.Connection
    _ws: Connection | None
    _request: h11.Request | None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._http = h11.Connection(h11.SERVER)
        #: set once the 101 has been sent; from then on bytes are WebSocket frames
        self._ws = None
        self._request = None

    def data_received(self, data: bytes) -> None:
        if self._ws is not None:
            self._ws.receive_data(data)
            self._pump_ws(self._ws)
        else:
            self._http.receive_data(data)
            self._pump_http()

    def eof_received(self) -> bool | None:
        if self._ws is not None:
            self._ws.receive_data(None)
            self._pump_ws(self._ws)
        else:
            self._http.receive_data(b"")
            self._pump_http()
        return None  # let the transport close itself

    def _pump_http(self) -> None:
        while not self._transport.is_closing():
            try:
                event = self._http.next_event()
            except h11.RemoteProtocolError as exc:
                self._send_error(exc.error_status_hint)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self._request = event
            elif isinstance(event, h11.EndOfMessage):
                self._respond()
            elif isinstance(event, h11.ConnectionClosed):
                self._transport.close()
                return
            # h11.Data: request bodies are read and dropped

    def _respond(self) -> None:
        request = self._request
        assert request is not None  # EndOfMessage always follows a Request
        key = _header(request, b"sec-websocket-key")
        # after an upgrade request h11 holds the client in MIGHT_SWITCH_PROTOCOL (not exported)
        proposes_switch = self._http.their_state not in {h11.DONE, h11.MUST_CLOSE}
        if proposes_switch and key and _is_websocket(request):
            self._accept_websocket(key)
            return
        # anything else, a refused or foreign upgrade included, gets an ordinary answer and the
        # connection stays HTTP (RFC 9110 §7.8: the server may ignore Upgrade)
        path = request.target.partition(b"?")[0]
        if path == b"/up":
            self._send(200, b"text/plain; charset=utf-8", b"ok\n", head=request.method == b"HEAD")
        elif path == b"/index.html":
            self._send(200, b"text/html; charset=utf-8", INDEX_HTML, head=request.method == b"HEAD")
        else:
            body = echo_body(request)
            self._send(200, b"application/json", body, head=request.method == b"HEAD")
        if self._http.our_state is h11.MUST_CLOSE:
            self._transport.close()
        elif self._http.our_state is h11.DONE and self._http.their_state is h11.DONE:
            self._http.start_next_cycle()

    def _send(self, status: int, content_type: bytes, body: bytes, *, head: bool) -> None:
        headers = [
            SERVER_HEADER,
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
        ]
        reason = HTTPStatus(status).phrase.encode()
        out = [self._http.send(h11.Response(status_code=status, headers=headers, reason=reason))]
        if not head:
            out.append(self._http.send(h11.Data(data=body)))
        out.append(self._http.send(h11.EndOfMessage()))
        self._transport.writelines(chunk for chunk in out if chunk)

    def _send_error(self, status: int) -> None:
        # RFC 9112 §2.2: a server that receives an unparseable request answers 400 and closes
        if self._http.our_state in {h11.IDLE, h11.SEND_RESPONSE}:
            with contextlib.suppress(h11.LocalProtocolError):
                self._send(status, b"text/plain; charset=utf-8", b"bad request\n", head=False)
        self._transport.close()

    def _accept_websocket(self, key: bytes) -> None:
        # RFC 6455 §4.2.2: the accept token proves the handshake was read by a WebSocket server
        headers = [
            (b"upgrade", b"websocket"),
            (b"connection", b"Upgrade"),
            (b"sec-websocket-accept", generate_accept_token(key)),
            SERVER_HEADER,
        ]
        self._transport.write(
            self._http.send(h11.InformationalResponse(status_code=101, headers=headers))
        )
        trailing, _closed = self._http.trailing_data
        self._ws = Connection(ConnectionType.SERVER, trailing_data=trailing)
        self._pump_ws(self._ws)

    def _pump_ws(self, ws: Connection) -> None:
        out: list[bytes] = []
        for event in ws.events():
            # frames are echoed as they arrive, fragments included, never buffered into messages
            if isinstance(event, TextMessage):
                out.append(
                    ws.send(TextMessage(event.data, message_finished=event.message_finished))
                )
            elif isinstance(event, BytesMessage):
                out.append(
                    ws.send(BytesMessage(event.data, message_finished=event.message_finished))
                )
            elif isinstance(event, Ping):
                out.append(ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                # RFC 6455 §5.5.1: answer a Close with a Close, then close the TCP connection
                with contextlib.suppress(LocalProtocolError):
                    if ws.state is ConnectionState.REMOTE_CLOSING:
                        out.append(ws.send(event.response()))
                    elif ws.state is ConnectionState.OPEN:
                        out.append(ws.send(CloseConnection(code=event.code)))
                self._transport.writelines(out)
                self._transport.close()
                return
        if out:
            self._transport.writelines(out)


def _header(request: h11.Request, name: bytes) -> bytes | None:
    for key, value in request.headers:
        if key == name:
            return value
    return None


def _is_websocket(request: h11.Request) -> bool:
    upgrade = _header(request, b"upgrade")
    return upgrade is not None and upgrade.strip().lower() == b"websocket"


async def start_upstream(host: str, port: int) -> asyncio.Server:
    """Listen on ``host:port`` (0 picks a free port) in the running loop and return the server."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(DemoProtocol, host, port)


async def _serve_forever(host: str, port: int) -> None:
    server = await start_upstream(host, port)
    async with server:
        await server.serve_forever()


def run_upstream(host: str, port: int) -> None:
    """Serve the demo upstream on ``host:port`` until the process is stopped."""
    uvloop.run(_serve_forever(host, port))


def main(argv: list[str] | None = None) -> int:
    """``python -m fastproxy.demo``: run the demo upstream in the foreground."""
    parser = argparse.ArgumentParser(prog="python -m fastproxy.demo", description=__doc__)
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        run_upstream(args.host, args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
