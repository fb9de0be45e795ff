"""Re-read what an upstream received the way lenient backends do.

A proxy is only as safe as the most lenient backend behind it. The functions here are an oracle
written independently of fastproxy (they import nothing from it): they re-read the raw bytes of
one upstream connection with several framing rules, and reduce each request path to every path
a lenient backend could route it to. The corpus runner then asserts that all readings agree on
the number of requests and that none of them leaves the listener's allowed prefixes.

Framing readings (``READINGS``)
-------------------------------
- ``rfc9112``: CRLF line ends, ``Transfer-Encoding`` ending in ``chunked`` wins over
  ``Content-Length`` (RFC 9112 6.3), strict numbers.
- ``content-length-first``: ``Content-Length`` wins over ``Transfer-Encoding`` (old servers and
  some application servers), numbers read up to the first non-digit.
- ``fuzzy-transfer-encoding``: a body is chunked whenever any header whose trimmed, lower-cased
  name with ``_`` read as ``-`` is ``transfer-encoding`` mentions ``chunked``; chunk sizes read
  leniently (``0x`` prefix, surrounding blanks, trailing garbage).
- ``lf-lines``: a bare LF ends a line, obs-fold lines continue the previous value.
- ``body-ignored-on-get``: the framing headers of GET and HEAD requests are ignored, so their
  body is read as the next request (the "CL.0" desynchronisation of static-file handlers).

Path readings (``lenient_paths``)
---------------------------------
The path (query cut at the first ``?``) is percent-decoded zero to three times (``%XX`` and IIS
``%uXXXX``), and each decoding is read with every combination of: overlong UTF-8 folded and
Unicode NFKC plus Windows best-fit look-alikes applied; ``\\`` read as ``/`` and the path cut
at a decoded ``?``, ``#`` or NUL; ``;`` parameters stripped from each segment (Tomcat); blanks
trimmed from each segment and trailing dots dropped (IIS, .NET, Windows). Dot segments are then
removed (clamped at the root, as RFC 3986 5.2.4 does), slashes merged and the result lower-cased
(case-insensitive routers). An all-dots segment of two or more dots counts as ``..``.
"""

from __future__ import annotations

import itertools
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

Framing = Literal["rfc", "cl_first", "te_fuzzy"]

#: allowed prefixes of each listener of the Cobrowse preset (SPEC 2), for the lenient checks
ALLOWED_PREFIXES: dict[str, tuple[str, ...]] = {
    "sdk": ("/api/1/devices", "/api/1/sessions", "/sockets/1/"),
    "agent": (
        "/api/1/",
        "/proxy/1/",
        "/recording/1/",
        "/sockets/1/",
        "/index.html",
        "/favicon.png",
        "/apps/",
        "/static/",
    ),
}

#: headers that make some backend route to (or act as) another URL or method; names folded
OVERRIDE_HEADERS = frozenset(
    {
        b"x-original-url",
        b"x-rewrite-url",
        b"x-override-url",
        b"x-http-method-override",
        b"x-http-method",
        b"x-method-override",
    }
)
#: the override headers whose value is a URL a backend routes by
URL_OVERRIDE_HEADERS = frozenset({b"x-original-url", b"x-rewrite-url", b"x-override-url"})
#: the override headers whose value is a method a backend acts as
METHOD_OVERRIDE_HEADERS = OVERRIDE_HEADERS - URL_OVERRIDE_HEADERS
#: headers through which a backend or framework takes the request as a proxy described it
#: (path, prefix, scheme, host, client address, identity): kept independent of fastproxy's
#: families on purpose. The corpus's clients are untrusted, so none may reach the upstream as
#: the client sent it, on either listener (fastproxy sets X-Forwarded-For/-Proto/-Host itself).
PROVENANCE_READ = OVERRIDE_HEADERS | frozenset(
    {
        b"x-forwarded-prefix",  # Spring ForwardedHeaderFilter, Werkzeug ProxyFix, ASP.NET Core
        b"x-forwarded-uri",  # Traefik forward auth
        b"x-forwarded-path",
        b"x-forwarded-port",  # Django USE_X_FORWARDED_PORT, Rack
        b"x-forwarded-ssl",  # Rack, gunicorn secure_scheme_headers
        b"x-forwarded-scheme",  # Rack
        b"x-forwarded-server",
        b"x-forwarded-method",  # Traefik forward auth
        b"x-forwarded-client-cert",  # Envoy XFCC
        b"x-original-uri",  # nginx auth_request recipes, ingress-nginx
        b"x-original-host",  # ASP.NET Core ForwardedHeaders
        b"x-original-for",
        b"x-original-proto",
        b"x-original-prefix",
        b"x-original-method",
        b"x-envoy-original-path",
        b"x-envoy-external-address",
        b"x-envoy-internal",
        b"x-real-ip",
        b"true-client-ip",
        b"x-client-ip",
        b"x-cluster-client-ip",
        b"client-ip",  # Rails ActionDispatch::RemoteIp
        b"cf-connecting-ip",
        b"fastly-client-ip",
        b"x-amzn-oidc-identity",  # AWS ALB authentication
        b"x-amzn-oidc-data",
        b"x-goog-authenticated-user-email",  # Google IAP
        b"x-ms-client-principal-name",  # Azure App Service authentication
        b"x-azure-fdid",  # Azure Front Door
        b"x-arr-ssl",  # IIS ARR
        b"x-script-name",
        b"x-scheme",
        b"front-end-https",
        b"forwarded",
    }
)
#: methods the preset refuses (SPEC 5), which no override may bring back
REFUSED_METHODS = frozenset({b"TRACE", b"CONNECT"})

_BLANKS = b" \t"
_HEX = b"0123456789abcdefABCDEF"
_DIGITS = b"0123456789"


def fold_name(name: bytes) -> bytes:
    """A header name as a CGI/WSGI backend compares it: trimmed, lower case, ``_`` as ``-``."""
    return name.strip(b" \t\r\n\x0b\x0c").lower().replace(b"_", b"-")


# -- framing ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reading:
    """How one kind of backend finds request boundaries in a byte stream."""

    name: str
    #: a bare LF ends a line (the CR of a CRLF is dropped)
    lf_lines: bool = False
    #: lines starting with a blank continue the previous header value
    unfold: bool = False
    #: header names compared with ``fold_name``; otherwise only lower-cased
    fold_names: bool = False
    #: which framing header wins
    framing: Framing = "rfc"
    #: numbers read up to the first non-digit, ``+`` and list forms accepted
    lenient_numbers: bool = False
    #: methods whose framing headers are ignored (their body is the next request)
    bodiless_methods: frozenset[bytes] = frozenset()


READINGS: tuple[Reading, ...] = (
    Reading("rfc9112"),
    Reading("content-length-first", fold_names=True, framing="cl_first", lenient_numbers=True),
    Reading("fuzzy-transfer-encoding", fold_names=True, framing="te_fuzzy", lenient_numbers=True),
    Reading("lf-lines", lf_lines=True, unfold=True, fold_names=True, lenient_numbers=True),
    Reading("body-ignored-on-get", bodiless_methods=frozenset({b"GET", b"HEAD"})),
)
STRICT = READINGS[0]


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """One request as a reading found it in the raw bytes."""

    method: bytes
    target: bytes
    version: bytes
    #: (name, value) as received, values without surrounding blanks
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    #: offsets of the request in the raw bytes; ``head_end`` is where the body starts
    start: int
    head_end: int
    end: int
    #: False when the bytes ended inside the body
    complete: bool

    def header_values(self, folded: bytes) -> list[bytes]:
        """Values of the headers whose ``fold_name`` is ``folded``."""
        return [value for name, value in self.headers if fold_name(name) == folded]


class _Stop(Exception):
    """The reading cannot go on: a backend would answer 400 and close, or the bytes ended."""


class _Lines:
    """A cursor over raw bytes handing out lines as one reading sees them."""

    def __init__(self, raw: bytes, lf_lines: bool) -> None:
        self.raw = raw
        self.pos = 0
        self.lf_lines = lf_lines

    def line(self) -> bytes:
        raw = self.raw
        if self.lf_lines:
            end = raw.find(b"\n", self.pos)
            if end < 0:
                raise _Stop
            line = raw[self.pos : end]
            self.pos = end + 1
            return line[:-1] if line.endswith(b"\r") else line
        end = raw.find(b"\r\n", self.pos)
        if end < 0:
            raise _Stop
        line = raw[self.pos : end]
        self.pos = end + 2
        return line

    def take(self, size: int) -> tuple[bytes, bool]:
        data = self.raw[self.pos : self.pos + size]
        self.pos += len(data)
        return data, len(data) == size

    def at_end(self) -> bool:
        return self.pos >= len(self.raw)


def read_requests(raw: bytes, reading: Reading = STRICT) -> list[ParsedRequest]:
    """Every request ``reading`` finds in ``raw``, in order.

    A request counts once its head is complete, even when the bytes end inside its body.
    The reading stops where its backend would answer 400 and close the connection.
    """
    lines = _Lines(raw, reading.lf_lines)
    found: list[ParsedRequest] = []
    while not lines.at_end():
        try:
            request = _read_one(lines, reading)
        except _Stop:
            break
        found.append(request)
        if not request.complete:
            break
    return found


def _read_one(lines: _Lines, reading: Reading) -> ParsedRequest:
    # RFC 9112 2.2: empty lines before a request-line are ignored
    while True:
        start = lines.pos
        request_line = lines.line()
        if request_line:
            break
    method, target, version = _request_line(request_line, reading)
    headers: list[tuple[bytes, bytes]] = []
    while True:
        line = lines.line()
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            if not reading.unfold or not headers:
                raise _Stop  # RFC 9112 5.2: obs-fold refused
            name, value = headers[-1]
            headers[-1] = (name, (value + b" " + line.strip(_BLANKS)).strip(_BLANKS))
            continue
        name, colon, value = line.partition(b":")
        if not colon or not name:
            raise _Stop
        if not reading.fold_names and name != name.strip(b" \t"):
            raise _Stop  # RFC 9112 5.1: no whitespace between name and colon
        headers.append((name, value.strip(_BLANKS)))
    head_end = lines.pos
    body, complete = _read_body(lines, reading, method, headers)
    return ParsedRequest(
        method, target, version, tuple(headers), body, start, head_end, lines.pos, complete
    )


def _request_line(line: bytes, reading: Reading) -> tuple[bytes, bytes, bytes]:
    lenient = reading.lf_lines or reading.fold_names
    parts = line.split() if lenient else line.split(b" ")
    if len(parts) == 2 and lenient and parts[1][:1] == b"/":
        return parts[0], parts[1], b"HTTP/0.9"
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise _Stop
    version = parts[2]
    if not (version.upper() if lenient else version).startswith(b"HTTP/"):
        raise _Stop
    return parts[0], parts[1], version


def _names(reading: Reading, headers: list[tuple[bytes, bytes]], wanted: bytes) -> list[bytes]:
    if reading.fold_names:
        return [v for n, v in headers if fold_name(n) == wanted]
    return [v for n, v in headers if n.lower() == wanted]


def _read_body(
    lines: _Lines, reading: Reading, method: bytes, headers: list[tuple[bytes, bytes]]
) -> tuple[bytes, bool]:
    if method.upper() in reading.bodiless_methods:
        return b"", True
    codings = _names(reading, headers, b"transfer-encoding")
    lengths = _names(reading, headers, b"content-length")
    if reading.framing == "rfc":
        if codings:
            tokens = [t.strip().lower() for v in codings for t in v.split(b",")]
            if tokens[-1:] != [b"chunked"]:
                raise _Stop  # RFC 9112 6.3: a request body of unknown length
            return _read_chunked(lines, reading)
        if lengths:
            return lines.take(_content_length(lengths, reading))
        return b"", True
    chunked = any(b"chunked" in value.lower() for value in codings)
    if reading.framing == "cl_first" and lengths:
        return lines.take(_content_length(lengths, reading))
    if chunked:
        return _read_chunked(lines, reading)
    if lengths:
        return lines.take(_content_length(lengths, reading))
    return b"", True


def _content_length(values: list[bytes], reading: Reading) -> int:
    if reading.lenient_numbers:
        text = values[0].split(b",")[0].strip(b" \t+")
        digits = text[: len(text) - len(text.lstrip(_DIGITS))]
        if not digits:
            raise _Stop
        return int(digits)
    if any(not v or v.strip(_DIGITS) for v in values) or len(set(values)) != 1:
        raise _Stop  # RFC 9112 6.3: an invalid or conflicting Content-Length
    return int(values[0])


def _chunk_size(line: bytes, reading: Reading) -> int:
    text = line.split(b";", 1)[0]
    if reading.lenient_numbers or reading.framing == "te_fuzzy":
        text = text.strip(b" \t\r\x0b\x0c")
        if text[:2].lower() == b"0x":
            text = text[2:]
        text = text[: len(text) - len(text.lstrip(_HEX))]
    else:
        text = text.rstrip(_BLANKS)
        if not text or text.strip(_HEX) or len(text) > 16:
            raise _Stop
    if not text:
        raise _Stop
    return int(text, 16)


def _read_chunked(lines: _Lines, reading: Reading) -> tuple[bytes, bool]:
    body = bytearray()
    lenient = reading.lenient_numbers or reading.framing == "te_fuzzy"
    while True:
        try:
            size = _chunk_size(lines.line(), reading)
        except _Stop:
            if lines.at_end():
                return bytes(body), False
            raise
        if size == 0:
            try:
                while lines.line():  # the trailer section
                    pass
            except _Stop:
                return bytes(body), False
            return bytes(body), True
        data, whole = lines.take(size)
        body += data
        if not whole:
            return bytes(body), False
        raw, pos = lines.raw, lines.pos
        if raw.startswith(b"\r\n", pos):
            lines.pos += 2
        elif lenient and raw.startswith(b"\n", pos):
            lines.pos += 1
        elif pos >= len(raw):
            return bytes(body), False
        elif not lenient:
            raise _Stop


def head_line_faults(raw: bytes, request: ParsedRequest) -> list[str]:
    """NUL, bare CR or bare LF inside the head of ``request`` (found by a CRLF reading)."""
    head = raw[request.start : request.head_end]
    faults: list[str] = []
    for number, line in enumerate(head.split(b"\r\n")):
        for byte, label in ((b"\x00", "NUL"), (b"\r", "bare CR"), (b"\n", "bare LF")):
            if byte in line:
                faults.append(f"line {number}: {label} in {line[:120]!r}")
    return faults


# -- paths ------------------------------------------------------------------------------------

#: Windows "best-fit" code-page conversion of look-alikes that NFKC leaves alone
_BEST_FIT = str.maketrans({"\u00a5": "\\", "\u20a9": "\\", "\u2215": "/", "\u2044": "/"})
#: characters some backend ignores inside a segment although ``str.isspace`` is false for them
_INVISIBLE = dict.fromkeys(
    [*range(0x20), 0x7F, 0xAD, 0x180E, 0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF, 0xFFFD]
)


def percent_decode(data: bytes) -> bytes:
    """One round of ``%XX`` and ``%uXXXX`` decoding; malformed escapes are kept as they are."""
    out = bytearray()
    at, end = 0, len(data)
    while at < end:
        byte = data[at]
        if byte == 0x25:  # "%"
            pair = data[at + 1 : at + 3]
            if len(pair) == 2 and not pair.strip(_HEX):
                out.append(int(pair, 16))
                at += 3
                continue
            wide = data[at + 2 : at + 6]
            if data[at + 1 : at + 2] in (b"u", b"U") and len(wide) == 4 and not wide.strip(_HEX):
                out += chr(int(wide, 16)).encode("utf-8", "surrogatepass")
                at += 6
                continue
        out.append(byte)
        at += 1
    return bytes(out)


def fold_overlong_utf8(data: bytes) -> bytes:
    """Read overlong UTF-8 encodings of ASCII (``C0 AE`` for ``.``) as old decoders did."""
    out = bytearray()
    at, end = 0, len(data)
    while at < end:
        lead = data[at]
        if lead in (0xC0, 0xC1) and at + 1 < end:
            out.append(((lead & 0x1F) << 6 | data[at + 1] & 0x3F) & 0x7F)
            at += 2
            continue
        if lead == 0xE0 and at + 2 < end and data[at + 1] < 0xA0:
            out.append(((data[at + 1] & 0x3F) << 6 | data[at + 2] & 0x3F) & 0x7F)
            at += 3
            continue
        if lead == 0xF0 and at + 3 < end and data[at + 1] < 0x90:
            code = (data[at + 1] & 0x3F) << 12 | (data[at + 2] & 0x3F) << 6 | data[at + 3] & 0x3F
            out.append(code & 0x7F)
            at += 4
            continue
        out.append(lead)
        at += 1
    return bytes(out)


def remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 on segments, clamped at the root, with empty segments merged away."""
    stack: list[str] = []
    trailing = False
    for segment in path.split("/")[1:]:
        if segment in ("", "."):
            trailing = True
        elif segment == "..":
            if stack:
                stack.pop()
            trailing = True
        else:
            stack.append(segment)
            trailing = False
    if not stack:
        return "/"
    return "/" + "/".join(stack) + ("/" if trailing else "")


def _trim_segment(segment: str) -> str:
    kept = "".join(segment.translate(_INVISIBLE).split())
    if len(kept) >= 2 and not kept.strip("."):
        return ".."
    if kept and kept.strip("."):
        return kept.rstrip(". ")  # Windows drops trailing dots and spaces of a name
    return kept


def _normalise(data: bytes, unicode: bool, separators: bool, params: bool, trim: bool) -> str:
    if unicode:
        text = fold_overlong_utf8(data).decode("utf-8", "replace")
        text = unicodedata.normalize("NFKC", text).translate(_BEST_FIT)
    else:
        text = data.decode("latin-1")
    if separators:
        for stop in ("?", "#", "\x00"):
            text = text.split(stop, 1)[0]
        text = text.replace("\\", "/")
    if not text.startswith("/"):
        text = "/" + text
    segments = text.split("/")
    if params:
        segments = [s.split(";", 1)[0] for s in segments]
    if trim:
        segments = [_trim_segment(s) for s in segments]
    return remove_dot_segments("/".join(segments)).lower()


def path_of_target(target: bytes) -> bytes:
    """The path of a request-target (origin- or absolute-form), query cut at the first ``?``."""
    lowered = target[:8].lower()
    for scheme in (b"http://", b"https://"):
        if lowered.startswith(scheme):
            rest = target[len(scheme) :]
            cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=-1)
            target = rest[cut:] if cut >= 0 else b"/"
            break
    return target.split(b"?", 1)[0].split(b"#", 1)[0] or b"/"


def lenient_paths(target: bytes) -> frozenset[str]:
    """Every path (lower case, normalised) some lenient backend could read in ``target``."""
    path = path_of_target(target)
    decodings = [path]
    for _ in range(3):
        decoded = percent_decode(decodings[-1])
        if decoded == decodings[-1]:
            break
        decodings.append(decoded)
    plus_spaced = [d.replace(b"+", b" ") for d in decodings if b"+" in d]
    found: set[str] = set()
    for data in (*decodings, *plus_spaced):
        for flags in itertools.product((False, True), repeat=4):
            found.add(_normalise(data, *flags))
    if path.startswith(b"//"):  # read as a network-path reference: //authority/path
        found |= lenient_paths(b"/" + path[2:].partition(b"/")[2])
    return frozenset(found)


def inside(path: str, prefixes: Iterable[str]) -> bool:
    """Whether ``path`` is under one of ``prefixes`` (SPEC 3 semantics, case-insensitive)."""
    path = path.lower()
    for prefix in prefixes:
        prefix = prefix.lower()
        if prefix.endswith("/"):
            if path.startswith(prefix):
                return True
        elif path == prefix or path.startswith(prefix + "/"):
            return True
    return False


def escaping_paths(target: bytes, prefixes: Sequence[str]) -> list[str]:
    """The lenient readings of ``target`` that fall outside ``prefixes``, sorted."""
    return sorted(p for p in lenient_paths(target) if not inside(p, prefixes))


# -- WebSocket frames -------------------------------------------------------------------------


class WebSocketFault(Exception):
    """The bytes are not a sequence of well-formed WebSocket frames."""


@dataclass(frozen=True, slots=True)
class Frame:
    fin: bool
    opcode: int
    payload: bytes


_OPCODES = frozenset({0x0, 0x1, 0x2, 0x8, 0x9, 0xA})


def websocket_frames(data: bytes, *, masked: bool) -> list[Frame]:
    """Parse ``data`` as whole RFC 6455 frames (unmasked payloads), or raise ``WebSocketFault``.

    ``masked``: frames from a client must be masked (5.1), frames from a server must not be.
    Nothing may follow a Close frame.
    """
    frames: list[Frame] = []
    at, end = 0, len(data)
    while at < end:
        if frames and frames[-1].opcode == 0x8:
            raise WebSocketFault(f"{end - at} bytes after a Close frame: {data[at : at + 60]!r}")
        if end - at < 2:
            raise WebSocketFault("a truncated frame header")
        first, second = data[at], data[at + 1]
        fin, rsv, opcode = bool(first & 0x80), first & 0x70, first & 0x0F
        if rsv or opcode not in _OPCODES:
            raise WebSocketFault(f"reserved bits or opcode in {data[at : at + 16]!r}")
        if bool(second & 0x80) != masked:
            raise WebSocketFault("a frame masked the wrong way")
        length, at = second & 0x7F, at + 2
        if length == 126:
            length, at = int.from_bytes(data[at : at + 2], "big"), at + 2
        elif length == 127:
            length, at = int.from_bytes(data[at : at + 8], "big"), at + 8
        if opcode >= 0x8 and (length > 125 or not fin):
            raise WebSocketFault("a control frame fragmented or longer than 125 bytes")
        key = b""
        if masked:
            key, at = data[at : at + 4], at + 4
        payload = data[at : at + length]
        if len(payload) < length or len(key) < (4 if masked else 0):
            raise WebSocketFault("a truncated frame")
        at += length
        if masked:
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        frames.append(Frame(fin, opcode, payload))
    return frames
