"""A minimal RFC 6455 frame codec for the benchmark's own clients and echo origin.

Hand-written rather than wsproto so that the load generator and the origin, which share one core
with each other, cost as little as possible per frame: the proxies are what is measured. No
extensions, no UTF-8 validation; fragments are passed through frame by frame.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

TEXT = 0x1
BINARY = 0x2
CLOSE = 0x8
PING = 0x9
PONG = 0xA


def accept_token(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key.strip() + GUID).digest())  # RFC 6455 4.2.2


def new_key() -> bytes:
    return base64.b64encode(os.urandom(16))


def mask_bytes(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    if n == 0:
        return b""
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


def frame(opcode: int, payload: bytes, *, masked: bool, fin: bool = True) -> bytes:
    """One frame; a client's frames are masked (RFC 6455 5.3), a server's are not."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    bit = 0x80 if masked else 0
    if n < 126:
        head = struct.pack("!BB", first, bit | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, bit | 127, n)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + mask_bytes(payload, mask)


class FrameReader:
    """Split a byte stream into frames: ``feed`` returns ``(fin, opcode, payload)`` tuples."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[tuple[bool, int, bytes]]:
        buf = self._buf + data if self._buf else data
        out: list[tuple[bool, int, bytes]] = []
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            n = b1 & 0x7F
            at = pos + 2
            if n == 126:
                if end - at < 2:
                    break
                n = int.from_bytes(buf[at : at + 2], "big")
                at += 2
            elif n == 127:
                if end - at < 8:
                    break
                n = int.from_bytes(buf[at : at + 8], "big")
                at += 8
            mask = b""
            if b1 & 0x80:
                if end - at < 4:
                    break
                mask = buf[at : at + 4]
                at += 4
            if end - at < n:
                break
            payload = buf[at : at + n]
            if mask:
                payload = mask_bytes(payload, mask)
            out.append((bool(b0 & 0x80), b0 & 0x0F, payload))
            pos = at + n
        self._buf = buf[pos:]
        return out


def client_handshake(path: str, host: str, key: bytes) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
