"""Canonical request paths and the precompiled prefix table.

[pure] Imports only ``errors``: no asyncio, no sockets, no clock, no logging, no metrics.

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
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


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
    DOUBLE_ENCODING = "double_encoding"  #: ``%25`` followed by two hex digits
    SEMICOLON = "semicolon"  #: ``;`` in a path segment (``..;`` is a dot segment to Tomcat)
    DOT_WHITESPACE = "dot_whitespace"  #: a segment that is a dot segment once whitespace is trimmed
    UNSAFE_CHARACTER = "unsafe_character"  #: a byte outside pchar that no rule may opt out of
    ABOVE_ROOT = "above_root"  #: ``/..`` climbs above ``/``
    FRAGMENT = "fragment"  #: ``#`` in the target
    ASTERISK_FORM = "asterisk_form"  #: ``*`` target: only ``OPTIONS *``, never forwarded
    BAD_TARGET = "bad_target"  #: not origin-form nor a valid absolute-form ``http(s)://`` URI


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


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one request-target.

    When ``refusal`` is set the target is not a clean path: answer 400 with ``refusal.value`` as
    the error code, and ``rule`` is the fallback rule (for counting only). Otherwise ``rule`` is the
    matched rule (the fallback when nothing matched) and ``target`` is the canonical path plus the
    untouched query (``?`` and all) to send upstream: for ``REWRITE`` the rule's ``rewrite_to`` plus
    the query.
    """

    rule: Rule
    target: bytes
    #: the canonical path that was classified, without the query
    path: bytes
    #: authority from an absolute-form target (``b"example.com:8080"``), None for origin-form
    authority: bytes | None = None
    refusal: Refusal | None = None


def canonicalize(path: bytes, allow: frozenset[Refusal] = frozenset()) -> bytes:
    """Return the canonical form of an origin-form ``path`` (no query), or raise ``PathRefused``.

    Idempotent: ``canonicalize(canonicalize(p)) == canonicalize(p)``.
    """
    raise NotImplementedError


class PathRefused(Exception):  # noqa: N818 - a result, not a failure of fastproxy
    """Raised by ``canonicalize``; carries the ``Refusal``."""

    def __init__(self, refusal: Refusal) -> None:
        self.refusal = refusal
        super().__init__(refusal.value)


class PrefixTable:
    """Longest-prefix classification of canonical paths, compiled once per policy."""

    def __init__(self, rules: tuple[Rule, ...], fallback: Rule) -> None:
        raise NotImplementedError

    def classify(self, path: bytes) -> Rule:
        """Return the rule with the longest prefix matching canonical ``path``, else the fallback."""
        raise NotImplementedError

    def decide(self, target: bytes) -> Decision:
        """Canonicalise a raw request-target (origin- or absolute-form) and classify it."""
        raise NotImplementedError
