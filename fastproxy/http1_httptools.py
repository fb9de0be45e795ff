"""The client leg on httptools (llhttp in C): the fast implementation of the parser seam.

[pure] Imports ``http1`` and ``headers`` and httptools only. Selected by
``http_parser = "httptools"``; httptools is an optional extra (``pip install
'fastproxy[httptools]'``).

Theory of operation
-------------------
``HeadScanner`` has already cut out one whole, checked request head, so llhttp is given exactly
those bytes and nothing else: it parses the request line and the fields (about 1 µs instead of
h11's 20 µs) and stops. The body is then read by ``ClientLeg``'s strict reader, the same as with
h11, so llhttp's leniencies never decide where a body ends. Bytes after the body are
``trailing``, handed back to the scanner.
"""

from __future__ import annotations

import httptools

from fastproxy.headers import RequestRefused
from fastproxy.http1 import ClientLeg, RequestHead

#: visible ASCII: the bytes a request-target may contain (RFC 9112 3.2, as h11 checks)
_VCHAR = bytes(range(0x21, 0x7F))
#: SP and HTAB, as ints (a byte of a value indexed)
_OWS = (0x20, 0x09)


class _Head:
    """httptools callbacks collecting the request line and fields."""

    __slots__ = ("headers", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))


class HttptoolsLeg(ClientLeg):
    """The client leg with llhttp for the head and fastproxy's reader for the body."""

    __slots__ = ()

    def feed_head(self, head: bytes) -> None:
        # The target is taken from the request line as it is (HeadScanner guarantees exactly two
        # single spaces in it) and judged by the policy, as with h11; llhttp parses the rest of
        # the head with "/" in its place, so its URL leniencies and errors play no part.
        first = head.find(b" ")
        second = head.find(b" ", first + 1)
        target = head[first + 1 : second]
        if not target or target.translate(None, _VCHAR):
            raise RequestRefused(400, "bad_request", "invalid byte in the request target")
        fields = _Head()
        parser = httptools.HttpRequestParser(fields)
        try:
            parser.feed_data(head[: first + 1] + b"/" + head[second:])
        except httptools.HttpParserUpgrade:
            pass  # the head is complete; whether an upgrade is allowed is fastproxy's decision
        except httptools.HttpParserError as exc:
            if "Content-Length overflow" in str(exc):
                raise RequestRefused(413, "body_too_large", str(exc)) from exc
            raise RequestRefused(400, "bad_request", str(exc)) from exc
        fields.url = target
        for _name, value in fields.headers:
            # field values keep no surrounding whitespace (RFC 9110 5.5), as h11 strips them
            if value and (value[0] in _OWS or value[-1] in _OWS):
                fields.headers = [(n, v.strip(b" \t")) for n, v in fields.headers]
                break
        # the version as sent (llhttp checked its form); bytes, not llhttp's formatted str
        protocol = head[second + 1 : head.find(b"\r\n")]
        if protocol == b"HTTP/1.1":
            version = b"1.1"
        elif protocol == b"HTTP/1.0":
            version = b"1.0"
        else:
            raise RequestRefused(400, "bad_request", "HTTP version not supported")
        self._begin_body(RequestHead(parser.get_method(), fields.url, version, fields.headers))
