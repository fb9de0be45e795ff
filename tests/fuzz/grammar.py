"""Generators of hostile client byte streams, written once for two sources of choices.

Every generator takes a ``Source``: ``HypothesisSource`` draws from a hypothesis ``DataObject``
(shrinkable, deterministic under ``derandomize``), ``RandomSource`` from ``random.Random`` (fast,
for runs of millions of inputs). Choices are ordered plain first, so shrinking moves toward an
ordinary request and leaves only the bytes that matter.

A stream is one of: a pipeline of 1-3 structured requests (request lines with nasty targets,
header sets with Content-Length / Transfer-Encoding variants, chunked bodies with odd sizes,
bare CR/LF, obs-fold, heads and targets around the size limits), a seed of ``corpus.SEEDS``,
or random bytes; then, sometimes, byte-level mutations.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Sequence
from typing import Protocol, TypeVar

from hypothesis import strategies as st

from fastproxy.config import Limits

from .corpus import SEEDS

T = TypeVar("T")

#: the preset's limits (``fastproxy.config.Limits`` defaults)
MAX_HEAD_BYTES = Limits().max_head_bytes
MAX_URI_BYTES = Limits().max_uri_bytes
MAX_HEADERS = Limits().max_headers


class Source(Protocol):
    def below(self, bound: int) -> int:
        """An integer in ``[0, bound)``; shrinks toward 0."""

    def binary(self, max_size: int) -> bytes:
        """Arbitrary bytes, at most ``max_size`` of them."""


class RandomSource:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def below(self, bound: int) -> int:
        return self.rng.randrange(bound) if bound > 1 else 0

    def binary(self, max_size: int) -> bytes:
        return self.rng.randbytes(self.rng.randrange(max_size + 1))


class HypothesisSource:
    def __init__(self, data: st.DataObject) -> None:
        self.data = data

    def below(self, bound: int) -> int:
        return self.data.draw(st.integers(0, bound - 1)) if bound > 1 else 0

    def binary(self, max_size: int) -> bytes:
        return self.data.draw(st.binary(max_size=max_size))


def pick(src: Source, options: Sequence[T]) -> T:
    return options[src.below(len(options))]


def rarely(src: Source, odds: int) -> bool:
    """True about once in ``odds`` draws (False is the shrunk value)."""
    return src.below(odds) == odds - 1


def either(src: Source, plain: Sequence[T], odd: Sequence[T], odds: int = 8) -> T:
    """From ``odd`` about once in ``odds`` draws, else from ``plain``."""
    return pick(src, odd) if rarely(src, odds) else pick(src, plain)


# -- request line ---------------------------------------------------------------------------

METHODS = [b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH"]
ODD_METHODS = [
    *(b"TRACE", b"CONNECT", b"get", b"PRI", b"G\x00T", b"GET\t", b"", b"X" * 40, b"Trace"),
    *(b"tRACE", b"post", b"M-SEARCH", b"GET1", b"G.T"),
]
TARGET_STARTS = [
    *(b"/api/1/devices", b"/api/1/sessions", b"/sockets/1/", b"/index.html", b"/static/"),
    *(b"/apps/", b"/proxy/1/", b"/recording/1/", b"/favicon.png", b"/api/1/", b"/", b"/admin"),
    *(b"/sdk-js/", b"/proxy/1/universal", b"/api/1/virtualagents", b"/.well-known/"),
    *(b"http://127.0.0.1:8080", b"/API/1/devices", b"/api/1/devicesX", b"/api/1/devices/"),
]
ODD_TARGET_STARTS = [
    *(b"https://example.com", b"HTTP://h:80", b"http://h?x", b"http://user@h/", b"http:/"),
    *(b"http://[::1]:80/", b"", b"*", b"//", b"\\", b".", b"/api//1/devices", b"%2fapi"),
]
SEGMENTS = [
    *(b"/", b"x", b"abc123", b"/", b".", b"..", b"...", b"~", b"-", b"+", b"=", b"@", b":"),
    *(b"%2e", b"%2E", b"%2e%2e", b"%41", b"%7e", b"%7E", b"%20", b"%3f", b"%2b", b"'", b"*"),
    *(b"api", b"1", b"devices", b"sessions", b"sockets", b"index.html", b"static", b"admin"),
]
ODD_SEGMENTS = [
    *(b";", b"\\", b"%25", b"%2f", b"%2F", b"%5c", b"%09", b"%00", b"%3b", b"%c0%ae", b"%80"),
    *(b"%ef%bc%8e", b"%e2%80%a5", b"%ef%bc%8f", b"%c2%a0", b"%u002e", b"%uff0e", b"%", b"%2"),
    *(b"%zz", b"2e", b"%252e", b"%25%32%65", b"..;", b";jsessionid=1", b"..%00", b".%09."),
    *(b"..%20", b"#", b"#frag", b"?", b"%0d%0a", b"%7f", b"%C0%AF", b"[", b"]", b"|", b"^"),
]
#: bytes that h11 refuses in a request line: rarer still, or little else would be tested
RAW_BYTES = [b" ", b"\t", b"\x00", b"\xff", b"\xef\xbc\x8e", b"\r", b"\n", b"\x7f"]
QUERIES = [b"", b"", b"?", b"?a=1", b"?a=%2F&b=/../&c", b"??x=;", b"?/../../admin", b"?a=1&a=2"]
ODD_QUERIES = [b"?q=%zz", b"?a=1#f", b"?a b", b"?\xff", b"?\x00", b"?x=" + b"y" * 64, b"?%"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]
ODD_VERSIONS = [
    *(b"HTTP/2.0", b"HTTP/1.2", b"http/1.1", b"HTTP/0.9", b"HTTP/1.1 ", b"HTTP/1"),
    *(b"HTTP/1.1\x00", b"", b"HTTP/11", b"HTTP/1.10", b"HTTPS/1.1"),
]
ODD_SPACES = [b"  ", b"\t", b"", b" \t", b"\x0b"]
ODD_LINE_ENDS = [b"\n", b"\r", b"\r\r\n", b"\n\r", b"\r\n "]


def line_end(src: Source, odds: int = 80) -> bytes:
    return either(src, [b"\r\n"], ODD_LINE_ENDS, odds)


def space(src: Source) -> bytes:
    return either(src, [b" "], ODD_SPACES, 16)


def target(src: Source) -> bytes:
    parts = [either(src, TARGET_STARTS, ODD_TARGET_STARTS)]
    for _ in range(src.below(8)):
        odd = rarely(src, 6)
        parts.append(pick(src, ODD_SEGMENTS) if odd else either(src, SEGMENTS, RAW_BYTES, 60))
    parts.append(either(src, QUERIES, ODD_QUERIES))
    return b"".join(parts)


def padded(data: bytes, size: int, filler: bytes = b"a") -> bytes:
    """``data`` grown to ``size`` bytes by appending ``filler`` (kept as it is if longer)."""
    return data + filler * max(0, size - len(data))


def request_line(src: Source) -> bytes:
    raw_target = target(src)
    if rarely(src, 8):
        # a target right around the URI limit, or far over it
        size = pick(src, [MAX_URI_BYTES + d for d in (-1, 0, 1, 2)] + [3 * MAX_URI_BYTES])
        filler = pick(src, [b"a", b"/", b"%41", b"/.."])
        base = raw_target.partition(b"?")[0] or b"/"
        raw_target = padded(base + pick(src, [b"", b"?q="]), size, filler)[:size]
    method = either(src, METHODS, ODD_METHODS, 16)
    version = either(src, VERSIONS, ODD_VERSIONS, 16)
    return method + space(src) + raw_target + space(src) + version


# -- headers ----------------------------------------------------------------------------------

WS_KEY = base64.b64encode(b"0123456789abcdef")
WEBSOCKET_FIELDS = [
    *(b"Upgrade: websocket", b"Connection: Upgrade", b"Sec-WebSocket-Version: 13"),
    b"Sec-WebSocket-Key: " + WS_KEY,
]
HOSTS = [
    *(b"127.0.0.1:8080", b"127.0.0.1:8081", b"example.com", b"h", b"[::1]:80", b"127.0.0.1"),
    *(b"127.0.0.1:80", b"HOST:8080"),
]
ODD_HOSTS = [
    *(b"", b"a b", b"user@h", b"h/p", b"h:99999", b"h:", b"h:0x50", b"[::1", b"h\x00", b"h?"),
    *(b"h%2e", b"h,h", b"-", b"[::1]x"),
]
ODD_CONTENT_LENGTHS = [
    *(b" %d", b"%d ", b"+%d", b"%d,%d", b"%d, %d", b"-1", b"0x%x", b"0%d", b"", b"1e3"),
    *(b"99999999999999999999", b"%d\x00", b"%d;", b"4294967296%d", b"0", b"%d0", b"%d\t"),
]
ODD_CODINGS = [
    *(b"Chunked", b"CHUNKED", b"gzip, chunked", b"chunked, gzip", b"identity", b" chunked"),
    *(b"chunked ", b"chunked,", b",chunked", b"x-chunked", b"chunked, chunked", b'"chunked"'),
    *(b"chunked\x0b", b"\tchunked", b"", b"chunked;q=1", b"gzip"),
]
PLAIN_FIELDS = [
    *(b"Accept: */*", b"User-Agent: fuzz/1", b"X-Custom_Under: 1", b"x-dup: a", b"X-Dup: b"),
    *(b"Cookie: a=1; b=2", b"Connection: keep-alive", b"Connection: close", b"X-Secret: s"),
    *(b"Connection: close, X-Secret", b"Connection: te", b"TE: trailers", b"Trailer: X-T"),
    *(b"Keep-Alive: timeout=5", b"Proxy-Connection: keep-alive", b"Expect: 100-continue"),
    *(b"Proxy-Authorization: Basic Zm9vOmJhcg==", b"X-Original-URL: /admin", b"Upgrade: h2c"),
    *(b"X_Original_URL: /admin", b"X-HTTP-Method-Override: DELETE", b"X-Request-Id: abc"),
    *(b"X-Request-Id: " + b"r" * 200, b"X-Forwarded-For: 10.0.0.1", b"Forwarded: for=1.2.3.4"),
    *(b"X-Forwarded-Host: evil", b"Sec-WebSocket-Extensions: permessage-deflate"),
    *(b"X-Forwarded-Prefix: /admin", b"X-Original-URI: /admin", b"X_Envoy_Original_Path: /x"),
    *(b"X-Amzn-Oidc-Identity: root", b"CF-Connecting-IP: 1.2.3.4", b"X-Real-IP: 1.2.3.4"),
    *(b"Content-Type: text/plain", b"Host: 127.0.0.1:8080", *WEBSOCKET_FIELDS),
]
ODD_FIELDS = [
    *(b"X-Folded: a\r\n b", b"X-Folded: a\r\n\tb", b"NoColon", b": empty-name", b"Host : h"),
    *(b"X Y: z", b"X-\x00: v", b"X-V: \x00", b"X-V: \x7f", b"X-V: \xff\xfe", b"X-V: a\rb"),
    *(b"X-V: a\x0bb", b"Transfer_Encoding: chunked", b"Content_Length: 5", b"X-V:\tsp\t"),
    *(b"X-Request-Id: \x01\x7f", b"Sec-WebSocket-Key: short", b"Sec-WebSocket-Version: 8"),
    *(b"Upgrade: websocket, h2c", b"Connection: Upgrade, HTTP2-Settings", b"X-V: a\nb"),
]


def header_field(src: Source) -> bytes:
    return either(src, PLAIN_FIELDS, ODD_FIELDS)


def framing(src: Source, body_size: int) -> list[bytes]:
    """Content-Length / Transfer-Encoding fields, coherent with the body most of the time."""
    kind = src.below(8)
    if kind < 3:
        return []
    length = either(src, [b"%d"], ODD_CONTENT_LENGTHS)
    if length.count(b"%") == 2:
        length = length % (body_size, body_size)
    elif b"%" in length:
        length = length % body_size
    length_field = either(
        src, [b"Content-Length: "], [b"content-length:", b"Content-Length :", b"CONTENT-LENGTH: "]
    )
    coding_field = either(
        src,
        [b"Transfer-Encoding: "],
        [b"transfer-encoding:", b"Transfer-Encoding:\t", b"Transfer-Encoding : "],
    )
    coding = either(src, [b"chunked"], ODD_CODINGS)
    if kind < 5:
        return [length_field + length]
    if kind == 5:
        return [coding_field + coding] + ([coding_field + coding] if rarely(src, 8) else [])
    if kind == 6:  # CL.TE and TE.CL
        fields = [length_field + length, coding_field + coding]
        return fields if src.below(2) else fields[::-1]
    return [length_field + length, length_field + pick(src, [length, b"0", b"1"])]


CHUNK_DATA = [b"hello", b"x", b"0123456789abcdef" * 3, b"\r\n", b"0\r\n\r\nGET /x", b""]
ODD_CHUNK_SIZES = [
    *(b"%X", b"0%x", b"%x;ext=1", b'%x;e="q"', b"%x ", b" %x", b"0x%x", b"-%x", b"+%x"),
    *(b"%x\t", b"fffffffffffffffffff", b"", b"g", b"%x%x"),
]
LAST_CHUNKS = [
    *(b"0\r\n\r\n", b"0\r\n\r\n", b"0\r\nX-Trailer: 1\r\n\r\n", b"0;x=y\r\n\r\n"),
    *(b"00\r\n\r\n", b"0\r\nContent-Length: 5\r\n\r\n", b"0\r\nTransfer-Encoding: x\r\n\r\n"),
]
ODD_LAST_CHUNKS = [b"0\r\n", b"0\n\n", b"", b"0\r\n\r\nGET /smuggled HTTP/1.1", b"0\r\n \r\n"]


def chunked_body(src: Source) -> bytes:
    out: list[bytes] = []
    for _ in range(src.below(4)):
        data = pick(src, CHUNK_DATA)
        size = either(src, [b"%x"], ODD_CHUNK_SIZES)
        if b"%" in size:
            size = size.replace(b"%x%x", b"%x") % len(data)
        if rarely(src, 10):
            data = data[: max(0, len(data) - 1)] if src.below(2) else data + b"!"
        out.append(size + line_end(src, 16) + data + line_end(src, 16))
    out.append(either(src, LAST_CHUNKS, ODD_LAST_CHUNKS))
    return b"".join(out)


def request(src: Source) -> bytes:
    body = pick(src, [b"", b"hello", b"x" * 40, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"])
    fields = [b"Host: " + either(src, HOSTS, ODD_HOSTS)] if src.below(6) else []
    if rarely(src, 5):
        fields += WEBSOCKET_FIELDS
    fields += [header_field(src) for _ in range(src.below(5))]
    fields += framing(src, len(body))
    if rarely(src, 12):
        count = pick(src, [MAX_HEADERS - 3, MAX_HEADERS - 2, MAX_HEADERS - 1, MAX_HEADERS, 400])
        fields += [b"X-N%d: v" % n for n in range(count)]
    shuffled = [fields.pop(src.below(len(fields))) for _ in range(len(fields))]
    head = either(src, [b""], [b"\r\n", b"\r\n\r\n", b"\n", b" ", b"\r"], 16)
    head += request_line(src) + b"".join(line_end(src) + field for field in shuffled)
    end = line_end(src)
    if rarely(src, 10):
        # a head right around the head limit, or far over it
        size = pick(src, [MAX_HEAD_BYTES + d for d in (-2, -1, 0, 1, 2)] + [80 * 1024])
        grown = padded(head + b"\r\nX-Pad: ", size - 4, b"p")
        head = grown if len(grown) > len(head) + 10 else head
    head += end + line_end(src)
    if any(f.lower().startswith((b"transfer-encoding", b"transfer_encoding")) for f in fields):
        body = chunked_body(src)
    elif rarely(src, 10):
        body = body[:-1] if src.below(2) else body + b"!"  # shorter or longer than announced
    return head + body


# -- whole streams ------------------------------------------------------------------------------

INSERTS = [
    *(b"\r", b"\n", b"\r\n", b" ", b"\t", b"\x00", b"\r\n ", b"\xff", b"%", b"/../", b"#"),
    *(b"\r\n\r\n", b";", b"?", b":", b"0\r\n\r\n", b"Transfer-Encoding: chunked\r\n"),
]


def mutate(src: Source, data: bytes) -> bytes:
    """One byte-level mutation: flip, insert, delete, duplicate, truncate or overwrite."""
    buf = bytearray(data)
    at = src.below(len(buf) + 1)
    kind = src.below(6)
    if kind == 0 and at < len(buf):
        buf[at] ^= 1 << src.below(8)
    elif kind == 1:
        buf[at:at] = pick(src, INSERTS)
    elif kind == 2:
        del buf[at : at + 1 + src.below(16)]
    elif kind == 3:
        buf[at:at] = buf[at : at + 1 + src.below(64)]
    elif kind == 4:
        del buf[at:]
    elif at < len(buf):
        buf[at] = src.below(256)
    return bytes(buf)


SEED_LIST = list(SEEDS.values())


def stream(src: Source) -> bytes:
    """One client connection's bytes."""
    kind = src.below(8)
    if kind < 5:
        data = b"".join(request(src) for _ in range(1 + src.below(3)))
    elif kind == 5:
        data = pick(src, SEED_LIST)
    elif kind == 6:
        data = src.binary(96)
    else:
        data = request(src) + src.binary(32)
    if rarely(src, 5):
        for _ in range(1 + src.below(3)):
            data = mutate(src, data)
    return data


def cuts(src: Source, size: int) -> list[int]:
    """Offsets where the stream is split into separate reads."""
    if size and size < 200 and rarely(src, 4):
        return list(range(1, size))  # one byte at a time
    return [src.below(size + 1) for _ in range(src.below(6))]
