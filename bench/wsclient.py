"""A small blocking WebSocket client for the locust scenarios (cooperative under gevent).

Locust patches the socket module with gevent, so a plain blocking socket here yields to other
simulated users while it waits. Frames are coded by ``bench.wsframes``; pings from the proxy are
answered while a message is awaited.
"""

from __future__ import annotations

import contextlib
import socket
import urllib.parse

from bench import wsframes


class WsError(Exception):
    pass


class WsClient:
    def __init__(self, base_url: str, path: str, timeout: float = 10.0) -> None:
        """Connect to ``path`` on the host of ``base_url`` (``http://host:port``), shake hands."""
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "ws") or parts.hostname is None:
            raise WsError(f"only plain http/ws hosts are supported, got {base_url!r}")
        port = parts.port or 80
        self.sock = socket.create_connection((parts.hostname, port), timeout=timeout)
        self.reader = wsframes.FrameReader()
        self.pending: list[tuple[bool, int, bytes]] = []
        key = wsframes.new_key()
        self.sock.sendall(wsframes.client_handshake(path, parts.netloc, key))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise WsError("connection closed during the handshake")
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        status = head[9:12]
        if status != b"101":
            self.sock.close()
            raise WsError(f"handshake answered {status.decode(errors='replace')}")
        if wsframes.accept_token(key) not in head:
            self.sock.close()
            raise WsError("handshake answered without the right Sec-WebSocket-Accept")
        if rest:
            self.pending.extend(self.reader.feed(rest))

    def send_text(self, text: str) -> None:
        self.sock.sendall(wsframes.frame(wsframes.TEXT, text.encode(), masked=True))

    def recv(self) -> bytes:
        """The next data frame's payload; pings are answered on the way."""
        while True:
            while self.pending:
                _fin, opcode, payload = self.pending.pop(0)
                if opcode == wsframes.PING:
                    self.sock.sendall(wsframes.frame(wsframes.PONG, payload, masked=True))
                elif opcode == wsframes.CLOSE:
                    raise WsError("closed by the server")
                elif opcode != wsframes.PONG:
                    return payload
            chunk = self.sock.recv(65536)
            if not chunk:
                raise WsError("connection closed")
            self.pending.extend(self.reader.feed(chunk))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(wsframes.frame(wsframes.CLOSE, b"\x03\xe8", masked=True))
        self.sock.close()
