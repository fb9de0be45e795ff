"""The benchmark origin: small and large GETs, an upload sink and a WebSocket echo, on uvloop.

    python -m bench.origin --port 8000 [--large-bytes 104857600]

- ``GET /api/1/devices/blob``: ``--large-bytes`` of zeros (the download test);
- ``POST``/``PUT`` anywhere: the body is read to its end (Content-Length or chunked) and dropped,
  then ``{"received": N}`` is answered (the upload sink);
- ``GET`` anything with the query ``chunks=N``: a chunked body of N one-byte chunks (the response
  flood of ``bench.floods``);
- a WebSocket handshake on any path: 101, then every data frame is echoed as it arrives, pings
  are answered, a close is returned;
- ``GET /index.html`` (and ``/``), ``/favicon.png``, ``/static/...``, ``/apps/...``: small
  bodies of a plausible type (what the agent SPA loads);
- any other ``GET``: ``{"ok":true}``.

It also stands in for a co-browsing platform behind ``fastproxy run``'s loopback preset, which is
how ``bench/locustfile.py`` is driven. It trusts its clients: it is a load target, not a server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from typing import cast

import uvloop

from bench import wsframes

SMALL = b'{"ok":true}\n'
INDEX = b"<!doctype html><html><head><title>app</title></head><body>app</body></html>\n"
CHUNK = bytes(1 << 20)
TYPES = {
    b".js": b"application/javascript",
    b".css": b"text/css",
    b".png": b"image/png",
    b".html": b"text/html; charset=utf-8",
}


def response_head(status: bytes, ctype: bytes, length: int, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\nServer: bench-origin\r\nContent-Type: " + ctype
        + b"\r\nContent-Length: " + str(length).encode() + b"\r\n" + extra + b"\r\n"
    )  # fmt: skip


SMALL_RESPONSE = response_head(b"200 OK", b"application/json", len(SMALL)) + SMALL
CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\nServer: bench-origin\r\nContent-Type: application/octet-stream\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


class Origin(asyncio.Protocol):
    """One connection: HTTP/1.1 keep-alive until a WebSocket upgrade, then echo frames."""

    large_bytes = 100 * 1024 * 1024

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.body_left = 0  # bytes of a Content-Length body still to read
        self.chunked = False
        self.received = 0
        self.ws: wsframes.FrameReader | None = None
        self.sending = 0  # bytes of a large body still to write
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._send_large()
        if not self.sending:
            self._process()

    def data_received(self, data: bytes) -> None:
        if self.ws is not None:
            self._echo(data)
            return
        if self.body_left and not self.buf and len(data) <= self.body_left:
            # the common case of an upload: count the bytes without copying them
            self.body_left -= len(data)
            self.received += len(data)
            if not self.body_left:
                self._body_done()
            return
        self.buf += data
        self._process()

    def _process(self) -> None:
        transport = self.transport
        while transport is not None and not transport.is_closing() and not self.sending:
            if self.body_left:
                take = min(self.body_left, len(self.buf))
                if not take:
                    return
                self.body_left -= take
                self.received += take
                self.buf = self.buf[take:]
                if self.body_left:
                    return
                self._body_done()
                continue
            if self.chunked:
                if not self._chunks():
                    return
                continue
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            self.buf = self.buf[end + 4 :]
            self._request(head)
            if self.ws is not None:
                rest, self.buf = self.buf, b""
                if rest:
                    self._echo(rest)
                return

    def _chunks(self) -> bool:
        """Consume chunked body bytes; False when more bytes are needed.

        The buffer is cut once per call, not once per chunk: a body of one-byte chunks costs
        the origin linear time, so it never holds back the proxy in front of it.
        """
        buf = self.buf
        pos = 0
        try:
            while True:
                line_end = buf.find(b"\r\n", pos)
                if line_end < 0:
                    return False
                size = int(buf[pos:line_end].split(b";", 1)[0], 16)
                if size == 0:
                    # no trailers from our clients: the last chunk is followed by an empty line
                    if len(buf) < line_end + 4:
                        return False
                    pos = line_end + 4
                    self.chunked = False
                    self._body_done()
                    return True
                if len(buf) < line_end + 2 + size + 2:
                    return False
                self.received += size
                pos = line_end + 2 + size + 2
        finally:
            self.buf = buf[pos:]

    def _request(self, head: bytes) -> None:
        assert self.transport is not None
        lines = head.split(b"\r\n")
        method, target, _ = lines[0].split(b" ", 2)
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        path = target.split(b"?", 1)[0]
        if headers.get(b"upgrade", b"").lower() == b"websocket" and b"sec-websocket-key" in headers:
            accept = wsframes.accept_token(headers[b"sec-websocket-key"])
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            self.ws = wsframes.FrameReader()
            return
        if method in (b"POST", b"PUT", b"PATCH"):
            self.received = 0
            if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                self.chunked = True
            else:
                self.body_left = int(headers.get(b"content-length", b"0"))
                if not self.body_left:
                    self._body_done()
            return
        query = target.partition(b"?")[2]
        if query.startswith(b"chunks="):
            # the response flood: N one-byte chunks, written at once (the transport buffers it)
            self.transport.write(CHUNKED_HEAD)
            self.transport.write(b"1\r\nx\r\n" * int(query[7:]) + b"0\r\n\r\n")
            return
        if path == b"/api/1/devices/blob":
            self.transport.write(
                response_head(b"200 OK", b"application/octet-stream", self.large_bytes)
            )
            self.sending = self.large_bytes
            self._send_large()
            return
        if path in (b"/", b"/index.html"):
            self.transport.write(response_head(b"200 OK", TYPES[b".html"], len(INDEX)) + INDEX)
            return
        if path.startswith((b"/static/", b"/apps/", b"/favicon.png")):
            dot = path.rfind(b".")
            ctype = (
                TYPES.get(path[dot:], b"application/octet-stream") if dot >= 0 else b"text/plain"
            )
            body = b"/* " + path + b" */\n" + bytes(2048)
            self.transport.write(response_head(b"200 OK", ctype, len(body)) + body)
            return
        self.transport.write(SMALL_RESPONSE)

    def _body_done(self) -> None:
        assert self.transport is not None
        body = b'{"received":%d}\n' % self.received
        self.transport.write(response_head(b"200 OK", b"application/json", len(body)) + body)

    def _send_large(self) -> None:
        transport = self.transport
        while self.sending and not self.paused and transport is not None:
            n = min(self.sending, len(CHUNK))
            transport.write(CHUNK if n == len(CHUNK) else CHUNK[:n])
            self.sending -= n

    def _echo(self, data: bytes) -> None:
        assert self.ws is not None and self.transport is not None
        out = []
        for fin, opcode, payload in self.ws.feed(data):
            if opcode == wsframes.PING:
                out.append(wsframes.frame(wsframes.PONG, payload, masked=False))
            elif opcode == wsframes.CLOSE:
                out.append(wsframes.frame(wsframes.CLOSE, payload[:2], masked=False))
                self.transport.writelines(out)
                self.transport.close()
                return
            elif opcode != wsframes.PONG:
                out.append(wsframes.frame(opcode, payload, masked=False, fin=fin))
        if out:
            self.transport.writelines(out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Origin, host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.origin", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--large-bytes", type=int, default=Origin.large_bytes)
    args = parser.parse_args(argv)
    Origin.large_bytes = args.large_bytes
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
