"""Canonical request paths and the precompiled prefix table.

[pure] Imports nothing from fastproxy and no third-party package: no asyncio, no sockets, no
clock, no logging, no metrics. Standard library only (``unicodedata``, on a rare opt-out path).

Theory of operation
-------------------
The path that is checked is exactly the path that is forwarded (SPEC 4). ``PrefixTable.decide``
takes the raw request-target bytes, reduces them to one canonical origin-form path, finds the
longest matching rule, and returns a ``Decision`` whose ``target`` is the byte string to put on
the upstream request line. Nothing else in fastproxy rewrites a path.

A clean path is defined positively: after decoding percent-encoded unreserved characters,
removing dot segments and merging slashes, every byte is an RFC 3986 ``pchar`` or ``/`` that no
mainstream backend reads differently. Anything else is refused with a named ``Refusal`` (answered
400 by the caller); a rule may opt out of named refusals for its own prefix only.

Invariants
----------
- ``canonicalize`` is idempotent, and its output starts with ``/`` and has no empty segment
  (``//``) and no dot segment (``.``, ``..``), nor a segment that a backend trimming whitespace
  or ``;`` parameters, decoding again or applying Unicode NFKC would read as one.
- Escapes left in the output are ``%XX`` with upper-case hex and never encode an unreserved
  character; a ``%`` in the output always starts such an escape.
- ``decide`` never alters the query: the bytes after the first ``?`` are forwarded as received.
- Wire values stay ``bytes``; the hot path does no regex, no ``str`` decoding, and allocates
  little beyond slicing.
"""

from __future__ import annotations

import enum
import unicodedata
from dataclasses import dataclass, field
from typing import NamedTuple


class Action(enum.Enum):
    """What a rule does with a request whose path it matches."""

    #: forward the canonical path to the upstream
    FORWARD = "forward"
    #: forward, and allow a WebSocket upgrade
    WEBSOCKET = "websocket"
    #: forward to the rule's fixed ``rewrite_to`` path, query string kept
    REWRITE = "rewrite"
    #: answer 403 (or, in report mode, forward and count ``would_deny``)
    DENY = "deny"
    #: answer 308 to the same host and target over https (a plain-HTTP listener in front of
    #: a TLS one)
    REDIRECT_HTTPS = "redirect_https"


class Refusal(enum.Enum):
    """Why a request-target is not a clean path. The value is the stable error code."""

    ENCODED_SLASH = "encoded_slash"  #: ``%2F``
    ENCODED_BACKSLASH = "encoded_backslash"  #: ``%5C``
    ENCODED_CONTROL = "encoded_control"  #: ``%00``-``%1F``, ``%7F``
    RAW_BACKSLASH = "raw_backslash"  #: ``\``
    RAW_CONTROL = "raw_control"  #: control bytes, space, DEL
    NON_ASCII = "non_ascii"  #: raw bytes >= 0x80
    ENCODED_NON_ASCII = "encoded_non_ascii"  #: ``%80``-``%FF`` (overlong UTF-8, fullwidth dots)
    MALFORMED_ESCAPE = "malformed_escape"  #: ``%`` not followed by two hex digits, ``%uXXXX``
    DOUBLE_ENCODING = "double_encoding"  #: ``%25`` followed by two hex digits (or ``u``)
    SEMICOLON = "semicolon"  #: ``;`` in a path segment (``..;`` is a dot segment to Tomcat)
    #: a segment that is a dot segment once a backend trims whitespace or ``;`` parameters,
    #: decodes it again or normalises Unicode (``..%20``, ``.%09.``, ``...``, ``..;x``)
    DOT_WHITESPACE = "dot_whitespace"
    UNSAFE_CHARACTER = "unsafe_character"  #: a byte outside pchar that no rule may opt out of
    ABOVE_ROOT = "above_root"  #: ``/..`` climbs above ``/``
    FRAGMENT = "fragment"  #: ``#`` in the target
    ASTERISK_FORM = "asterisk_form"  #: ``*`` target: only ``OPTIONS *``, never forwarded
    BAD_TARGET = "bad_target"  #: not origin-form nor a valid absolute-form ``http(s)://`` URI


#: Refusals that a rule's ``allow`` set cannot lift: they are ignored when present there.
#: ``DOT_WHITESPACE`` is among them so that no opt-out lets a backend read a path outside the
#: rule's prefix (``/legacy/..%2F`` with ``%2F`` allowed is still refused).
FIXED_REFUSALS: frozenset[Refusal] = frozenset(
    {
        Refusal.DOT_WHITESPACE,
        Refusal.ABOVE_ROOT,
        Refusal.FRAGMENT,
        Refusal.RAW_CONTROL,
        Refusal.NON_ASCII,
        Refusal.BAD_TARGET,
        Refusal.ASTERISK_FORM,
        Refusal.UNSAFE_CHARACTER,
    }
)


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled rule: a prefix and what to do with requests under it."""

    name: str
    #: ``b"/api/1/"`` matches what starts with it; ``b"/api/1/devices"`` matches itself and
    #: ``/api/1/devices/...`` but never ``/api/1/devicesX``. ``b""`` is the fallback.
    prefix: bytes
    action: Action
    #: for ``REWRITE``: the fixed path the request is forwarded as (``b"/index.html"``)
    rewrite_to: bytes | None = None
    #: upstream name overriding the listener's default, or None
    upstream: str | None = None
    #: request body limit for this rule, bytes
    max_body_bytes: int = 64 * 1024 * 1024
    #: refusals this rule opts out of, for its own prefix only
    allow: frozenset[Refusal] = field(default_factory=frozenset)
    #: for ``REDIRECT_HTTPS``: the port of the Location (443 is left out of it)
    https_port: int = 443


class Decision(NamedTuple):
    """What to do with one request-target.

    When ``refusal`` is set the target is not a clean path: answer 400 with ``refusal.value`` as
    the error code, and ``rule`` is the fallback rule (for counting only). Otherwise ``rule`` is the
    matched rule (the fallback when nothing matched) and ``target`` is the canonical path plus the
    untouched query (``?`` and all) to send upstream: for ``REWRITE`` the rule's ``rewrite_to`` plus
    the query.

    A named tuple rather than a frozen dataclass: one is made per request, and a tuple is built
    in C where a frozen dataclass sets each field through ``object.__setattr__``.
    """

    rule: Rule
    target: bytes
    #: the canonical path that was classified, without the query
    path: bytes
    #: authority from an absolute-form target (``b"example.com:8080"``), None for origin-form
    authority: bytes | None = None
    refusal: Refusal | None = None


# --- byte classes (RFC 3986 section 2 and 3.3) -----------------------------------------------

_ALPHA_DIGIT = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
#: RFC 3986 2.3: unreserved = ALPHA / DIGIT / "-" / "." / "_" / "~"
_UNRESERVED = _ALPHA_DIGIT + b"-._~"
#: RFC 3986 2.2: sub-delims = "!" / "$" / "&" / "'" / "(" / ")" / "*" / "+" / "," / ";" / "="
_SUB_DELIMS = b"!$&'()*+,;="
#: RFC 3986 3.3: pchar = unreserved / pct-encoded / sub-delims / ":" / "@" (plus "/" between
#: segments). Bytes outside this set make a path unclean.
_PATH_BYTES = _UNRESERVED + _SUB_DELIMS + b":@/%"
#: Bytes that need no work at all: pchar minus "%" (escapes), ";" (parameters) and "+" (read as a
#: space by form decoders, so it takes part in the whitespace-trimming check).
_PLAIN_BYTES = _PATH_BYTES.translate(None, b"%;+")
_HEX_DIGITS = b"0123456789ABCDEFabcdef"
#: every two-character hex pair, either case, to its value
_HEX_PAIRS: dict[bytes, int] = {
    bytes((a, b)): int(bytes((a, b)), 16) for a in _HEX_DIGITS for b in _HEX_DIGITS
}
#: RFC 3986 3.2: authority without userinfo = host [ ":" port ], host a reg-name or IP literal
_AUTHORITY_BYTES = _UNRESERVED + _SUB_DELIMS + b":[]"
#: what may stand in a query on a request line (RFC 9112 3.2: no whitespace or control bytes)
_VISIBLE_ASCII = bytes(range(0x21, 0x7F))
#: ASCII bytes some backend trims from or ignores in a segment: C0 controls, space, DEL
_ASCII_BLANKS = bytes(range(0x21)) + b"\x7f"
#: separators a lenient backend finds inside a segment once decoded: "\" (IIS, Windows), ";"
#: (Tomcat path parameters), "?" and "#" (re-parsed targets), NUL (C string truncation)
_INNER_SEPARATORS = bytes.maketrans(b"\\;?#\x00", b"/////")

#: for each escape value: the bytes it becomes and the refusal it raises (None when clean)
_ESCAPES: list[tuple[bytes, Refusal | None]] = []
for _code in range(256):
    if _code in _UNRESERVED:
        # RFC 3986 2.3 / 6.2.2.2: decode percent-encoded unreserved characters
        _ESCAPES.append((bytes((_code,)), None))
        continue
    # RFC 3986 6.2.2.1: other escapes keep their meaning; normalise to upper-case hex
    _kept = b"%" + b"%02X" % _code
    if _code == 0x2F:
        _ESCAPES.append((_kept, Refusal.ENCODED_SLASH))
    elif _code == 0x5C:
        _ESCAPES.append((_kept, Refusal.ENCODED_BACKSLASH))
    elif _code < 0x20 or _code == 0x7F:
        _ESCAPES.append((_kept, Refusal.ENCODED_CONTROL))
    elif _code >= 0x80:
        _ESCAPES.append((_kept, Refusal.ENCODED_NON_ASCII))
    else:
        _ESCAPES.append((_kept, None))
del _code, _kept

#: look-alikes that Windows "best-fit" code page conversion maps onto separators
_BEST_FIT = str.maketrans({"\u00a5": "\\", "\u20a9": "\\", "\u2215": "/", "\u2044": "/"})
#: inner separators once text is NFKC-normalised (fullwidth solidus etc. are NFKC-mapped already)
_TEXT_SEPARATORS = str.maketrans({"\\": "/", ";": "/", "?": "/", "#": "/", "\x00": "/"})
#: characters ignored by some backend although ``str.isspace`` is false for them
_TEXT_INVISIBLE = str.maketrans(
    dict.fromkeys([*range(0x20), 0x7F, 0xAD, 0x180E, 0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF])
)


class PathRefused(Exception):  # named as a result, not a failure of fastproxy
    """Raised by ``canonicalize``; carries the ``Refusal``."""

    def __init__(self, refusal: Refusal) -> None:
        self.refusal = refusal
        super().__init__(refusal.value)


# Measured with timeit on CPython 3.11 (x86-64, one core), per call:
#   canonicalize(b"/api/1/devices/abc123/sessions")              0.30 us (fast path)
#   canonicalize(b"/static/my%20file.txt")                        3.1 us
#   canonicalize(b"/api/1/devices/../%7Eabc/%3f//sessions/./x")  4.5 us
#   PrefixTable.decide(b"/api/1/devices/abc123/sessions?x=1")    1.7 us (agent preset; 0.27 us
#   of it classify, 0.6 us building the frozen Decision)
def canonicalize(path: bytes, allow: frozenset[Refusal] = frozenset()) -> bytes:
    """Return the canonical form of an origin-form ``path`` (no query), or raise ``PathRefused``.

    Idempotent: ``canonicalize(canonicalize(p)) == canonicalize(p)``. ``allow`` names refusals
    to lift (``FIXED_REFUSALS`` in it are ignored).
    """
    # Fast path: only plain pchar bytes, no escape, no parameter, no dot or empty segment.
    if (
        path[:1] == b"/"
        and not path.translate(None, _PLAIN_BYTES)
        and path.find(b"/.") < 0  # bytes.find is about twice as fast as "in" here
        and path.find(b"//") < 0
    ):
        return path
    return _canonicalize_slowly(path, allow)


def _canonicalize_slowly(path: bytes, allow: frozenset[Refusal]) -> bytes:
    if path[:1] != b"/":
        raise PathRefused(Refusal.BAD_TARGET)
    unclean = path.translate(None, _PATH_BYTES)
    if unclean and (Refusal.RAW_BACKSLASH not in allow or unclean.translate(None, b"\\")):
        raise PathRefused(_refusal_for_raw(unclean))
    if path.find(b";") >= 0 and Refusal.SEMICOLON not in allow:
        raise PathRefused(Refusal.SEMICOLON)

    stack: list[bytes] = []
    trailing_slash = False
    for raw in path.split(b"/")[1:]:
        segment = _decode_segment(raw, allow) if raw.find(b"%") >= 0 else raw
        # RFC 3986 5.2.4 (remove_dot_segments), with empty segments merged away: "//" and "."
        # vanish, ".." drops the previous segment, and the path keeps a trailing "/" when its
        # last segment was one of those.
        if not segment or segment == b".":
            trailing_slash = True
        elif segment == b"..":
            if not stack:
                # SPEC 4: climbing above "/" is refused, not clamped as RFC 3986 5.2.4 would
                raise PathRefused(Refusal.ABOVE_ROOT)
            stack.pop()
            trailing_slash = True
        else:
            if (segment.find(b".") >= 0 or segment.find(b"%") >= 0) and _reads_as_dot_segment(
                segment, allow
            ):
                raise PathRefused(Refusal.DOT_WHITESPACE)
            stack.append(segment)
            trailing_slash = False
    if not stack:
        return b"/"
    canonical = b"/" + b"/".join(stack)
    return canonical + b"/" if trailing_slash else canonical


def _refusal_for_raw(unclean: bytes) -> Refusal:
    """Name the worst of the bytes outside the path alphabet (fixed refusals first)."""
    if b"#" in unclean:
        return Refusal.FRAGMENT  # RFC 3986 3.5: a fragment is never sent in a request-target
    if unclean.translate(None, _ASCII_BLANKS) != unclean:
        return Refusal.RAW_CONTROL
    if not unclean.isascii():
        return Refusal.NON_ASCII
    if unclean.translate(None, b"\\"):
        return Refusal.UNSAFE_CHARACTER
    return Refusal.RAW_BACKSLASH


def _decode_segment(segment: bytes, allow: frozenset[Refusal]) -> bytes:
    """Apply RFC 3986 6.2.2.1-2 to the escapes of one segment, refusing the dangerous ones."""
    parts = segment.split(b"%")
    out = [parts[0]]
    for part in parts[1:]:
        code = _HEX_PAIRS.get(part[:2])
        if code is None:
            # RFC 3986 2.1: "%" must start "%" HEXDIG HEXDIG; IIS also decodes "%uXXXX".
            if Refusal.MALFORMED_ESCAPE not in allow:
                raise PathRefused(Refusal.MALFORMED_ESCAPE)
            # Opted out: keep the stray "%" as data, spelt "%25", so that the output is well
            # formed and cannot grow a new escape when decoded ("%%32e" must not become "%2e").
            out.append(b"%25")
            out.append(part)
            continue
        replacement, refusal = _ESCAPES[code]
        if refusal is not None and refusal not in allow:
            raise PathRefused(refusal)
        out.append(replacement)
        out.append(part[2:])
    decoded = b"".join(out)
    if Refusal.DOUBLE_ENCODING not in allow and decoded.find(b"%25") >= 0:
        # RFC 3986 2.4: a URI must not be decoded twice, yet some stacks do; "%25" followed by
        # two hex digits (or "u" for IIS %uXXXX) becomes a new escape after one more decoding.
        at = decoded.find(b"%25")
        while at >= 0:
            following = decoded[at + 3 : at + 5]
            if following in _HEX_PAIRS or following[:1] in (b"u", b"U"):
                raise PathRefused(Refusal.DOUBLE_ENCODING)
            at = decoded.find(b"%25", at + 3)
    return decoded


def _reads_as_dot_segment(segment: bytes, allow: frozenset[Refusal]) -> bool:
    """Whether a lenient backend could read part of ``segment`` as a dot segment.

    ``segment`` is canonical (decoded) and not exactly ``.`` or ``..``. The model: decode
    escapes again until stable (``%XX``, ``%uXXXX``, ``+`` as space), split at backslash, ``;``,
    ``?``, ``#`` and NUL, drop whitespace and control characters (IIS, .NET ``Trim``, Java
    ``String.trim``, Node ``trim`` all strip some of them), apply Unicode NFKC plus best-fit
    look-alikes, and look for a piece made of dots only. ``...`` counts too: Windows trims
    trailing dots.
    """
    if segment.find(b".") < 0 and (
        segment.find(b"%") < 0
        or (Refusal.DOUBLE_ENCODING not in allow and Refusal.ENCODED_NON_ASCII not in allow)
    ):
        # A dot can only come from ".", or from an escape that survives strict decoding: a
        # double-encoded one or a non-ASCII look-alike. Both are refused unless opted out of.
        return False
    if not segment.translate(None, b"."):
        return True
    if segment.translate(None, b"%+;\\") == segment:
        return False  # no escape, no blank, no inner separator, and not all dots
    data = _decode_leniently(segment)
    if not data.isascii():
        return _text_reads_as_dots(data)
    for piece in data.translate(_INNER_SEPARATORS).split(b"/"):
        kept = piece.translate(None, _ASCII_BLANKS)
        if kept and not kept.translate(None, b"."):
            return True
    return False


def _decode_leniently(data: bytes) -> bytes:
    """Percent-decode ``data`` repeatedly as the most lenient backend would (model only)."""
    for _ in range(4):
        parts = data.replace(b"+", b" ").split(b"%")
        out = [parts[0]]
        for part in parts[1:]:
            code = _HEX_PAIRS.get(part[:2])
            if code is not None:
                out.append(bytes((code,)))
                out.append(part[2:])
            elif part[:1] in (b"u", b"U") and len(part) >= 5 and _is_hex(part[1:5]):
                out.append(chr(int(part[1:5], 16)).encode("utf-8", "surrogatepass"))
                out.append(part[5:])
            else:
                out.append(b"%")
                out.append(part)
        decoded = b"".join(out)
        if decoded == data:
            break
        data = decoded
    return data


def _is_hex(data: bytes) -> bool:
    return not data.translate(None, _HEX_DIGITS)


def _text_reads_as_dots(data: bytes) -> bool:
    """The non-ASCII half of ``_reads_as_dot_segment``: only reachable when a rule opts out of
    ``ENCODED_NON_ASCII`` (or ``DOUBLE_ENCODING``), so decoding to text here costs nothing on
    the usual path."""
    text = _fold_overlong_utf8(data).decode("utf-8", "replace")
    # Unicode UAX 15 NFKC maps "\uff0e" (fullwidth full stop), "\u2024", "\u2025", "\ufe52" to
    # dots and "\uff0f" to "/"; Windows best-fit maps a few more look-alikes.
    text = unicodedata.normalize("NFKC", text).translate(_BEST_FIT).translate(_TEXT_SEPARATORS)
    for piece in text.split("/"):
        kept = "".join(piece.translate(_TEXT_INVISIBLE).split())
        if kept and not kept.strip("."):
            return True
    return False


def _fold_overlong_utf8(data: bytes) -> bytes:
    """Read overlong UTF-8 forms of ASCII (``C0 AE`` is ".") as old IIS decoders did."""
    out = bytearray()
    at, end = 0, len(data)
    while at < end:
        lead = data[at]
        if lead in (0xC0, 0xC1) and at + 1 < end:
            out.append(((lead & 0x1F) << 6 | data[at + 1] & 0x3F) & 0x7F)
            at += 2
            continue
        if lead == 0xE0 and at + 2 < end and data[at + 1] < 0xA0:
            code = (data[at + 1] & 0x3F) << 6 | data[at + 2] & 0x3F
            if code < 0x80:
                out.append(code)
                at += 3
                continue
        if lead == 0xF0 and at + 3 < end and data[at + 1] < 0x90:
            code = (data[at + 1] & 0x3F) << 12 | (data[at + 2] & 0x3F) << 6 | data[at + 3] & 0x3F
            if code < 0x80:
                out.append(code)
                at += 4
                continue
        out.append(lead)
        at += 1
    return bytes(out)


class PrefixTable:
    """Longest-prefix classification of canonical paths, compiled once per policy.

    Rules are grouped by the first segment of their prefix (a prefix either ends in ``/`` or
    matches only at a segment boundary, so every match shares the path's first segment); each
    group is scanned longest prefix first. The rule for ``/``, if any, catches the rest.
    """

    __slots__ = ("_by_first_segment", "_opt_outs", "_refused", "_root", "fallback", "rules")

    def __init__(self, rules: tuple[Rule, ...], fallback: Rule) -> None:
        self.rules = rules
        self.fallback = fallback
        seen: dict[bytes, Rule] = {}
        groups: dict[bytes, list[tuple[bytes, bytes, Rule]]] = {}
        root: Rule | None = None
        for rule in (*rules, fallback):
            _check_rewrite(rule)
        for rule in rules:
            prefix = rule.prefix
            if prefix in seen:
                raise ValueError(
                    f"rules {seen[prefix].name!r} and {rule.name!r} have the same prefix "
                    f"{_text(prefix)!r}"
                )
            _check_prefix(rule)
            seen[prefix] = rule
            if prefix == b"/":
                root = rule
                continue
            end = prefix.find(b"/", 1)
            first = prefix[1:end] if end > 0 else prefix[1:]
            # (bytes a longer path must start with, the bytes the path may equal, rule)
            starts = prefix if prefix.endswith(b"/") else prefix + b"/"
            groups.setdefault(first, []).append((starts, prefix, rule))
        self._by_first_segment: dict[bytes, tuple[tuple[bytes, bytes, Rule], ...]] = {
            first: tuple(sorted(entries, key=lambda entry: -len(entry[1])))
            for first, entries in groups.items()
        }
        self._root = root if root is not None else fallback
        self._opt_outs = frozenset().union(*(r.allow for r in (*rules, fallback))) - FIXED_REFUSALS
        # Refusals are immutable and carry no client bytes: build each once.
        self._refused = {
            refusal: Decision(rule=fallback, target=b"", path=b"", refusal=refusal)
            for refusal in Refusal
        }

    def classify(self, path: bytes) -> Rule:
        """Return the longest-prefix rule matching canonical ``path``, else the fallback."""
        end = path.find(b"/", 1)
        candidates = self._by_first_segment.get(path[1:end] if end > 0 else path[1:])
        if candidates is not None:
            for starts, prefix, rule in candidates:
                if path.startswith(starts) or path == prefix:
                    return rule
        return self._root

    def decide(self, target: bytes) -> Decision:
        """Canonicalise a raw request-target (origin- or absolute-form) and classify it."""
        if target.find(b"#") >= 0:
            return self._refused[Refusal.FRAGMENT]  # RFC 9112 3.2: no fragment in a target
        authority: bytes | None = None
        if target[:1] != b"/":
            if target == b"*":
                # RFC 9112 3.2.4: asterisk-form, only for a server-wide OPTIONS; never forwarded
                return self._refused[Refusal.ASTERISK_FORM]
            split = _split_absolute_form(target)
            if split is None:
                return self._refused[Refusal.BAD_TARGET]
            authority, target = split
        # RFC 3986 3.4: the query starts at the first "?"; it is forwarded untouched.
        path, question, query = target.partition(b"?")
        if query:
            unclean = query.translate(None, _VISIBLE_ASCII)
            if unclean:
                # RFC 9112 3.2: a request-target has no whitespace or control bytes
                refusal = Refusal.RAW_CONTROL if unclean.isascii() else Refusal.NON_ASCII
                return self._refused[refusal]
        try:
            canonical = canonicalize(path)
        except PathRefused as refused:
            opted = self._canonicalize_opted_out(path, refused.refusal)
            if isinstance(opted, Refusal):
                return self._refused[opted]
            canonical, rule = opted
        else:
            rule = self.classify(canonical)
        rewrite_to = rule.rewrite_to
        forwarded = (
            rewrite_to if rewrite_to is not None and rule.action is Action.REWRITE else canonical
        )
        if question:
            forwarded = forwarded + question + query
        return Decision(rule, forwarded, canonical, authority)

    def _canonicalize_opted_out(
        self, path: bytes, refusal: Refusal
    ) -> tuple[bytes, Rule] | Refusal:
        """Retry a refused path with the opt-outs of the rule it would match (SPEC 4: for its
        own prefix only). Returns the canonical path and rule, or the refusal to answer."""
        if refusal not in self._opt_outs:
            return refusal
        try:
            # With every opt-out of the table lifted, find which rule the path would fall under;
            # lifting a refusal never changes the canonical form, only whether there is one.
            rule = self.classify(canonicalize(path, self._opt_outs))
            canonical = canonicalize(path, rule.allow)
        except PathRefused as refused:
            return refused.refusal
        if self.classify(canonical) is not rule:
            return refusal
        return canonical, rule


def _split_absolute_form(target: bytes) -> tuple[bytes, bytes] | None:
    """Split ``http(s)://authority/path?query`` (RFC 9112 3.2.2) into authority and the
    origin-form rest; None when it is not one."""
    scheme = target[:8].lower()
    if scheme.startswith(b"http://"):
        start = 7
    elif scheme == b"https://":
        start = 8
    else:
        return None
    end = len(target)
    for separator in (b"/", b"?"):
        at = target.find(separator, start, end)
        if at >= 0:
            end = at
    authority = target[start:end]
    # RFC 9110 4.2.4: userinfo ("@") is not allowed in http(s) URIs sent on the wire
    if not authority or authority.translate(None, _AUTHORITY_BYTES):
        return None
    rest = target[end:]
    # RFC 9112 3.2.2: an empty path in absolute-form stands for "/"
    return authority, rest if rest[:1] == b"/" else b"/" + rest


def _check_prefix(rule: Rule) -> None:
    prefix = rule.prefix
    try:
        canonical = canonicalize(prefix, rule.allow)
    except PathRefused as refused:
        raise ValueError(
            f"rule {rule.name!r}: prefix {_text(prefix)!r} is not a clean path "
            f"({refused.refusal.value})"
        ) from None
    if canonical != prefix:
        raise ValueError(
            f"rule {rule.name!r}: prefix {_text(prefix)!r} can never match; its canonical form "
            f"is {_text(canonical)!r}"
        )


def _text(path: bytes) -> str:
    return path.decode("ascii", "backslashreplace")


def _check_rewrite(rule: Rule) -> None:
    if rule.action is not Action.REWRITE:
        return
    target = rule.rewrite_to
    canonical: bytes | None = None
    if target is not None:
        try:
            canonical = canonicalize(target)
        except PathRefused:
            canonical = None
    if canonical is None or canonical != target:
        raise ValueError(f"rule {rule.name!r}: rewrite_to must be a canonical path, got {target!r}")
