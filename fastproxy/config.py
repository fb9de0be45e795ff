"""Configuration: TOML (``tomllib``) into frozen, validated objects.

Imports only ``errors`` and ``policy`` (and the standard library: no sockets, no DNS, no clock).
Every check happens here, at load, so the I/O layer never meets an invalid value; each listener's
rules are compiled into a ``policy.PrefixTable`` once at load to prove they are consistent.

Entry points: ``load_config(path)`` (None = the built-in Cobrowse preset on loopback),
``parse_config(data, source)`` for an already-parsed document, ``dump_config(config)`` for the
fully expanded TOML text (loading it gives an equal ``Config``; ``source`` is not compared).

Errors
------
Every mistake is one ``ConfigError`` whose text is
``<file>: <dotted.location>: <what is wrong>, got <value>`` plus an optional ``(hint)``; the value
is shown as TOML, e.g. ``fastproxy.toml: policies.web.rules.api.action: unknown rule action, got
"fwd" (did you mean "forward"?)``. A missing key reads ``<file>: <table>: missing key "bind"``;
a top-level key has no location, and an unreadable file or bad TOML gives ``<file>: <why>``.
Unknown keys are errors, with the nearest known key suggested and the known keys listed.

The file (SPEC 3)
-----------------
Top level: ``workers`` (int >= 1, default: CPU count), ``http_parser`` (``"auto"``, the
default: httptools when installed, else h11; or ``"h11"`` or ``"httptools"``),
``heartbeat_timeout_s``, ``graceful_timeout_s``, and the tables below.
``[upstreams]`` and ``[listeners]`` must each have at least one entry.

- ``[upstreams.NAME]``: ``servers`` (``"host:port"``, a host name or IP, IPv6 as ``"[::1]:8000"``;
  at least one), ``balance``, ``keepalive`` and the ``*_timeout_s`` of ``UpstreamConfig``;
  ``health`` (``false``, ``true`` or a table of ``HealthCheck`` fields; ``statuses`` is a list
  of statuses and ``"200-399"`` ranges), ``down_for_s``, ``next_upstream_tries`` and
  ``next_upstream_timeout_s``.
  ``tls`` (``true`` or a table ``{ca, verify, server_name, cert, key}``, ``UpstreamTls``).
- ``[listeners.NAME]``: ``bind`` (an IP literal and port; names are never resolved here; port 0
  lets the kernel choose and never conflicts), ``policy``, ``upstream`` (may be left out when
  there is exactly one upstream), ``mode``, ``limits`` (a table of ``Limits`` fields),
  ``trusted_proxies``, ``keep_headers``, ``forwarded_header``, ``websocket_mode``,
  ``refused_methods``, ``tls`` (``{cert, key, certificates = [{cert, key}, ...], min_version,
  handshake_timeout_s}``, ``TlsConfig``; the files are read and checked by ``tls.py``, which
  ``fastproxy check``, the master and the workers run). Two listeners (or a listener and
  admin) may not bind overlapping addresses (same port, same address or a wildcard of the same
  family).
- ``[policies.NAME]``: ``extends`` (a preset policy or an own policy defined earlier in the file),
  ``fallback`` (``"deny"`` | ``"forward"`` | ``"redirect_https"`` | a table ``{action,
  rewrite_to, upstream, max_body_bytes, https_port}``; default: inherited, else ``"deny"``) and
  ``[policies.NAME.rules.RULE]`` tables (``prefix``, ``action``, ``rewrite_to``, ``upstream``,
  ``max_body_bytes``, ``allow``, ``https_port``).
  A rule named like an inherited one replaces it; two rules with the same prefix are an error.
  A policy named like a preset policy extends that preset: its rules are added to (or replace)
  the preset's, which is how a vendor's new route is added without renaming the policy.
- ``[admin]``: ``bind``. Absent: 127.0.0.1:9901. ``admin = false`` turns the admin listener off.
- ``[presets.cobrowse]``: the toggles ``pin_sdk``, ``universal``, ``ai``, ``acme`` (booleans).
- ``[access_log]``: ``enabled`` (default true when the table is there), ``path`` (a file to
  append to, or ``"-"`` for stdout; required when enabled), ``sample`` (0 to 1, default 1;
  errors are always logged) and ``query`` (``"redact"`` | ``"keep"`` | ``"drop"``, default
  ``"redact"``), ``AccessLogConfig``. No table: no access log (``run --access-log`` wins).

Names of listeners, upstreams, policies and rules are TOML bare keys (letters, digits, ``-``,
``_``; at most 64) because they become metric labels; ``fallback`` is reserved for rules.
Prefixes and rewrite targets must be canonical paths (``policy`` would never match anything else):
they start with ``/`` and hold only letters, digits and ``/-._~!$&'()*+,;=:@`` (no ``?``, ``#``,
``%``, spaces), with no empty, ``.`` or ``..`` segment.

The preset
----------
``presets/cobrowse.toml`` holds the Cobrowse route lists and the toggles as data, with a
``version``. A toggle adds rules either to a preset policy (so policies extending it inherit
them) or to every listener without TLS; a listener's policy rule of the same name wins.
"""

from __future__ import annotations

import datetime
import difflib
import enum
import functools
import importlib.resources
import importlib.util
import ipaddress
import math
import os
import re
import tomllib
import types
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar, cast

from fastproxy.errors import ConfigError
from fastproxy.headers import FORWARDING_HEADERS, fold, is_provenance, valid_method
from fastproxy.policy import (
    FIXED_REFUSALS,
    Action,
    PathRefused,
    PrefixTable,
    Refusal,
    Rule,
    canonicalize,
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_SDK_BIND = "127.0.0.1:8080"
DEFAULT_AGENT_BIND = "127.0.0.1:8081"
DEFAULT_ADMIN_BIND = "127.0.0.1:9901"
DEFAULT_UPSTREAM = "127.0.0.1:8000"

HEARTBEAT_TIMEOUT_S = 30.0
GRACEFUL_TIMEOUT_S = 30.0

#: ``Config.source`` of the configuration used when no file is given
BUILT_IN_SOURCE = "<built-in>"
PRESET_SDK = "cobrowse-sdk"
PRESET_AGENT = "cobrowse-agent"
#: ``max_connections_per_client`` of a listener that does not set it, unless its policy is
#: ``PRESET_AGENT`` (0 there: the agents of one office share one NAT address)
PER_CLIENT_DEFAULT = 256


class Mode(enum.Enum):
    #: what the policy denies is answered 403
    ENFORCE = "enforce"
    #: what the policy would deny is forwarded, counted and logged as ``would_deny``
    REPORT = "report"


class Balance(enum.Enum):
    ROUND_ROBIN = "round_robin"
    LEAST_CONN = "least_conn"


class WebSocketMode(enum.Enum):
    #: client frames are parsed and validated (masked, well formed, size limit)
    VALIDATE = "validate"
    #: bytes are relayed without parsing, for the lowest cost
    TUNNEL = "tunnel"


class HttpParser(enum.Enum):
    H11 = "h11"
    HTTPTOOLS = "httptools"


@dataclass(frozen=True, slots=True)
class Address:
    host: str  # IPv6 without brackets
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class CertKey:
    """A certificate (PEM, its chain after it) and its private key (PEM, not encrypted)."""

    cert: str
    key: str


#: ``min_version`` values a listener accepts
TLS_VERSIONS = ("1.2", "1.3")


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS termination on a listener. The files are read by ``tls.py``, not here."""

    #: the default certificate: clients without SNI, or with a name no certificate holds
    cert: str
    key: str
    #: more certificates, chosen by SNI against the DNS names of their subjectAltName
    certificates: tuple[CertKey, ...] = ()
    min_version: str = "1.2"
    #: a connection whose handshake has not finished this long after accept is closed
    handshake_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """TLS to the servers of an upstream (``tls = true`` is all defaults)."""

    #: PEM file of the CAs to trust; None: the system's store
    ca: str | None = None
    verify: bool = True
    #: SNI and the name checked in the certificate; None: the server's host
    server_name: str | None = None
    #: a client certificate and its key
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    max_head_bytes: int = 16 * 1024
    max_headers: int = 100
    max_uri_bytes: int = 8 * 1024
    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 75.0
    #: longest silence of a client in the middle of a request body (nginx client_body_timeout)
    body_timeout_s: float = 60.0
    #: longest time a client may leave a response unread (nginx send_timeout)
    send_timeout_s: float = 60.0
    #: client connections one worker holds on this listener; more are closed at accept
    max_connections: int = 10_000
    #: connections one client address may hold on one worker; 0 = no limit. The default is
    #: ``PER_CLIENT_DEFAULT``, except 0 on a listener whose policy is ``cobrowse-agent``
    max_connections_per_client: int = 256
    ws_idle_timeout_s: float = 3600.0
    #: must be shorter than ``ws_idle_timeout_s``
    ws_ping_interval_s: float = 30.0
    ws_max_message_bytes: int = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    bind: Address
    #: name of the policy as written in the file (preset or own)
    policy: str
    #: the policy's resolved rules and fallback for this listener (preset toggles applied)
    rules: tuple[Rule, ...]
    fallback: Rule
    upstream: str
    mode: Mode = Mode.ENFORCE
    tls: TlsConfig | None = None
    limits: Limits = field(default_factory=Limits)
    #: X-Forwarded-*/Forwarded/X-Request-Id from these peers are kept, otherwise replaced
    trusted_proxies: tuple[IPNetwork, ...] = ()
    #: provenance headers (folded names) kept from clients outside ``trusted_proxies``
    keep_headers: frozenset[bytes] = frozenset()
    #: add an RFC 7239 ``Forwarded`` header
    forwarded_header: bool = False
    websocket_mode: WebSocketMode = WebSocketMode.VALIDATE
    #: methods answered 405 (upper-case bytes)
    refused_methods: frozenset[bytes] = frozenset({b"TRACE", b"CONNECT"})


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    servers: tuple[Address, ...]
    balance: Balance = Balance.ROUND_ROBIN
    #: idle keep-alive connections kept per server per worker; 0 = no reuse
    keepalive: int = 32
    keepalive_timeout_s: float = 60.0
    connect_timeout_s: float = 5.0
    #: time from the request head sent to the response head received
    first_byte_timeout_s: float = 60.0
    #: time an upstream may stay silent in the middle of a response body
    read_timeout_s: float = 60.0
    #: active health checks (``health = false``: None)
    health: HealthCheck | None = field(default_factory=lambda: HealthCheck())
    #: passive health: a failed connect, a connect timeout or a reset before any response byte
    #: marks the server down this long (or until an active check passes)
    down_for_s: float = 10.0
    #: attempts per request, the first included (nginx ``proxy_next_upstream_tries``): a failed
    #: connect, or a reset before any byte of an idempotent body-less request, is tried again on
    #: another server; 1 = never
    next_upstream_tries: int = 2
    #: no new attempt once the request is this old (nginx ``proxy_next_upstream_timeout``)
    next_upstream_timeout_s: float = 10.0

    tls: UpstreamTls | None = None


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """Active health checks of an upstream's servers, run by the master (``health.py``)."""

    #: request target of ``GET <path> HTTP/1.1``
    path: str = "/up"
    #: time from one check of a server to the next
    interval_s: float = 2.0
    #: a check without a status line within this time fails; at most ``interval_s``
    timeout_s: float = 1.0
    #: passing statuses, as inclusive ranges (HAProxy's and nginx's default: 2xx and 3xx)
    statuses: tuple[tuple[int, int], ...] = ((200, 399),)
    #: consecutive passing checks that bring a down server back
    rise: int = 1
    #: consecutive failing checks that mark an up server down
    fall: int = 2


@dataclass(frozen=True, slots=True)
class AdminConfig:
    bind: Address


@dataclass(frozen=True, slots=True)
class PresetToggles:
    pin_sdk: bool = False
    universal: bool = False
    ai: bool = False
    acme: bool = False


class QueryMode(enum.Enum):
    """What the access log keeps of a request's query string."""

    #: the keys, each value replaced by ``REDACTED``
    REDACT = "redact"
    #: the query as the client sent it
    KEEP = "keep"
    #: nothing: the path only
    DROP = "drop"


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    """``[access_log]``: one JSON line per request; ``path`` None means off."""

    #: a file to append to, ``"-"`` for stdout, None: off
    path: str | None = None
    #: the share of requests logged, 0 to 1; errors (4xx, 5xx, refusals) are always logged
    sample: float = 1.0
    query: QueryMode = QueryMode.REDACT


@dataclass(frozen=True, slots=True)
class Config:
    #: file name used in error messages; ``"<built-in>"`` for the preset default. Not compared:
    #: the same settings read from another file are the same configuration.
    source: str = field(compare=False)
    workers: int
    listeners: Mapping[str, ListenerConfig]
    upstreams: Mapping[str, UpstreamConfig]
    #: None when the file says ``admin = false``
    admin: AdminConfig | None
    presets: PresetToggles = field(default_factory=PresetToggles)
    http_parser: HttpParser = HttpParser.H11
    #: seconds a worker may miss its heartbeat before the master replaces it
    heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S
    #: seconds SIGTERM waits for in-flight requests before killing workers
    graceful_timeout_s: float = GRACEFUL_TIMEOUT_S
    access_log: AccessLogConfig = field(default_factory=AccessLogConfig)
    #: the file did not set ``workers``: one per CPU of the machine that loaded it, so
    #: ``dump_config`` leaves it unset too. Not compared, as ``source``.
    workers_per_cpu: bool = field(default=False, compare=False)


# --------------------------------------------------------------------------------------------
# Public entry points


def load_config(path: str | None) -> Config:
    """Read and validate ``path``; with None, the built-in Cobrowse preset on loopback.

    Raises ``ConfigError`` naming ``path`` as given for an unreadable file, a TOML syntax error
    or an invalid value.
    """
    if path is None:
        return parse_config(_BUILT_IN, BUILT_IN_SOURCE)
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"cannot read the file: {reason}", where="", source=path) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", where="", source=path) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"invalid TOML: not UTF-8 ({exc.reason})", where="", source=path
        ) from None
    return parse_config(data, path)


def parse_config(data: Mapping[str, object], source: str) -> Config:
    """Validate an already-parsed TOML document; ``source`` names it in error messages."""
    try:
        return _parse(data, source)
    except ConfigError as exc:
        raise exc.with_source(source) from None


def dump_config(config: Config) -> str:
    """Return ``config`` as TOML, fully expanded: every default written out and every listener's
    policy with all its resolved rules (preset and toggles included), so that loading the text
    gives an equal ``Config``."""
    return _dump(config)


def preset_version() -> int:
    """The ``version`` of the built-in Cobrowse preset data."""
    return _preset().version


# --------------------------------------------------------------------------------------------
# Values: checking types, showing values, suggesting names

Table = Mapping[str, object]
T = TypeVar("T")

_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
# RFC 3986 pchar without pct-encoded, plus "/": what a canonical path may hold (SPEC 4).
_PATH_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@/"
)
# RFC 9110 section 5.6.2 token: what a method name may hold.
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HOST_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?")
_SHOW_MAX_CHARS = 200


def _toml_string(text: str) -> str:
    out = ['"']
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char < " " or char == "\x7f":
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _toml_key(key: str) -> str:
    return key if _BARE_KEY_RE.fullmatch(key) else _toml_string(key)


def _toml(value: object) -> str:
    """``value`` written as a TOML value (inline tables for mappings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, Mapping):
        items = cast(Table, value).items()
        inner = ", ".join(f"{_toml_key(str(k))} = {_toml(v)}" for k, v in items)
        return "{ " + inner + " }" if inner else "{}"
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    return repr(value)


def _show(value: object) -> str:
    text = _toml(value)
    return text if len(text) <= _SHOW_MAX_CHARS else text[: _SHOW_MAX_CHARS - 3] + "..."


def _bad(where: str, what: str, value: object, hint: str | None = None) -> ConfigError:
    return ConfigError(f"{what}, got {_show(value)}", where=where, hint=hint)


def _missing(where: str, key: str, hint: str | None = None) -> ConfigError:
    return ConfigError(f'missing key "{key}"', where=where, hint=hint)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _suggest(word: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    return f'did you mean "{close[0]}"?' if close else "known: " + ", ".join(known)


def _table(value: object, where: str) -> Table:
    if not isinstance(value, Mapping):
        raise _bad(where, "expected a table", value)
    return cast(Table, value)


def _keys(table: Table, where: str, known: Sequence[str], required: Sequence[str] = ()) -> None:
    for key in table:
        if key not in known:
            ordered = sorted(known)
            close = difflib.get_close_matches(key, ordered, n=1, cutoff=0.6)
            hint = "known: " + ", ".join(ordered)
            if close:
                hint = f'did you mean "{close[0]}"? {hint}'
            raise _bad(where, "unknown key", key, hint=hint)
    for key in required:
        if key not in table:
            raise _missing(where, key)


def _str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise _bad(where, "expected a string", value)
    return value


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(where, "expected true or false", value)
    return value


def _int(value: object, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(where, "expected an integer", value)
    if value < minimum:
        raise _bad(where, f"must be at least {minimum}", value)
    return value


def _seconds(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(where, "expected a number of seconds", value)
    if not math.isfinite(value) or value <= 0:
        raise _bad(where, "must be a positive number of seconds", value)
    return float(value)


def _list(value: object, where: str) -> list[object]:
    if not isinstance(value, list):
        raise _bad(where, "expected a list", value)
    return cast(list[object], value)


def _choice(value: object, where: str, what: str, options: Mapping[str, T]) -> T:
    text = _str(value, where)
    if text not in options:
        raise _bad(where, f"unknown {what}", text, hint=_suggest(text, list(options)))
    return options[text]


def _name(name: str, where: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise _bad(where, 'a name may only hold letters, digits, "-" and "_" (at most 64)', name)
    return name


def _get_int(table: Table, key: str, where: str, default: int, minimum: int) -> int:
    return _int(table[key], _join(where, key), minimum) if key in table else default


def _get_seconds(table: Table, key: str, where: str, default: float) -> float:
    return _seconds(table[key], _join(where, key)) if key in table else default


def _get_bool(table: Table, key: str, where: str, default: bool) -> bool:
    return _bool(table[key], _join(where, key)) if key in table else default


_ACTIONS: Mapping[str, Action] = {a.value: a for a in Action}
_FALLBACK_ACTIONS: Mapping[str, Action] = {
    a.value: a for a in (Action.DENY, Action.FORWARD, Action.REWRITE, Action.REDIRECT_HTTPS)
}
_MODES: Mapping[str, Mode] = {m.value: m for m in Mode}
_BALANCES: Mapping[str, Balance] = {b.value: b for b in Balance}
_WS_MODES: Mapping[str, WebSocketMode] = {m.value: m for m in WebSocketMode}
_PARSERS: Mapping[str, HttpParser] = {p.value: p for p in HttpParser}
#: what ``http_parser`` accepts: a parser, or ``"auto"`` (handled before the choice)
_PARSER_NAMES: Mapping[str, HttpParser] = {**_PARSERS, "auto": HttpParser.H11}


def auto_parser() -> HttpParser:
    """``http_parser = "auto"``, the default: httptools (llhttp) when it is installed, else h11,
    as uvicorn chooses. httptools costs less per request; h11 is the strict reference that the
    differential test holds httptools to, and both pass the same suite."""
    if importlib.util.find_spec("httptools") is not None:
        return HttpParser.HTTPTOOLS
    return HttpParser.H11


#: refusals a rule may opt out of for its own prefix (SPEC 4); the others are never safe
_OPT_OUTS: Mapping[str, Refusal] = {r.value: r for r in Refusal if r not in FIXED_REFUSALS}


# --------------------------------------------------------------------------------------------
# Addresses and networks


def _split_host_port(text: str, where: str) -> tuple[str, str]:
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep or "]" in host or "[" in host:
            raise _bad(where, 'expected "host:port" (IPv6 as "[::1]:8000")', text)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise _bad(where, "not an IPv6 address", text) from None
        if ip.version != 6:
            raise _bad(where, "brackets are for IPv6 addresses only", text)
        return str(ip), port
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise _bad(where, 'expected "host:port"', text)
    if ":" in host:
        raise _bad(where, "an IPv6 address needs brackets", text, hint=f'write "[{host}]:{port}"')
    return host, port


def _port(port: str, text: str, where: str, minimum: int) -> int:
    if not port.isascii() or not port.isdigit() or not minimum <= int(port) <= 65535:
        raise _bad(where, f"port must be a number from {minimum} to 65535", text)
    return int(port)


def _bind_address(value: object, where: str) -> Address:
    """A listening address: an IP literal (names are not resolved at load) and a port, 0 = any."""
    text = _str(value, where)
    host, port = _split_host_port(text, where)
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise _bad(
            where,
            "the host must be an IP address",
            text,
            hint="0.0.0.0 or [::] for every interface, 127.0.0.1 or [::1] for loopback",
        ) from None
    return Address(host, _port(port, text, where, minimum=0))


def _server_address(value: object, where: str) -> Address:
    """An upstream server: a host name or IP literal and a port."""
    text = _str(value, where)
    host, port = _split_host_port(text, where)
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        if re.fullmatch(r"[0-9.]+", host) or not _HOSTNAME_RE.fullmatch(host) or len(host) > 253:
            raise _bad(where, "the host must be a host name or an IP address", text) from None
        host = host.lower()
    return Address(host, _port(port, text, where, minimum=1))


def _overlaps(a: Address, b: Address) -> bool:
    """True when binding both would fail: same port, same address or a same-family wildcard."""
    if a.port == 0 or b.port == 0 or a.port != b.port:
        return False
    ip_a, ip_b = ipaddress.ip_address(a.host), ipaddress.ip_address(b.host)
    if ip_a.version != ip_b.version:
        return False  # [::] and 0.0.0.0 coexist with IPV6_V6ONLY, as nginx binds them
    return ip_a == ip_b or ip_a.is_unspecified or ip_b.is_unspecified


def _network(value: object, where: str) -> IPNetwork:
    text = _str(value, where)
    try:
        return ipaddress.ip_network(text)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise _bad(where, "expected an IP address or a CIDR network", text) from None
    raise _bad(where, "host bits are set in the network", text, hint=f'did you mean "{loose}"?')


# --------------------------------------------------------------------------------------------
# Rules and policies


def _path(value: object, where: str, what: str, allow: frozenset[Refusal] = frozenset()) -> bytes:
    text = _str(value, where)
    if not text.startswith("/"):
        raise _bad(where, f'{what} must start with "/"', text)
    bad = next((char for char in text if char not in _PATH_CHARS), None)
    if bad is not None:
        raise _bad(
            where,
            f"{what} may only hold letters, digits and /-._~!$&'()*+,;=:@",
            text,
            hint=f"{_toml_string(bad)} is not allowed",
        )
    segments = text[1:].split("/")
    if "" in segments[:-1] or "." in segments or ".." in segments:
        raise _bad(
            where,
            f'{what} must be a canonical path, without "//", "." or ".." segments',
            text,
            hint="request paths are matched after normalisation, so it could never match",
        )
    path = text.encode("ascii")
    try:
        canonical = canonicalize(path, allow)
    except PathRefused as refused:
        code = refused.refusal.value
        hint = None
        if what == "prefix" and code in _OPT_OUTS:
            hint = f'add "{code}" to the rule\'s allow list to accept it'
        raise _bad(where, f"{what} is not a clean path ({code})", text, hint=hint) from None
    if canonical != path:
        shown = _toml_string(canonical.decode("ascii", "backslashreplace"))
        raise _bad(where, f"{what} could never match, its canonical form is {shown}", text)
    return path


def _rule_upstream(value: object, where: str, upstreams: Collection[str]) -> str:
    name = _str(value, where)
    if name not in upstreams:
        raise _bad(where, "unknown upstream", name, hint=_suggest(name, sorted(upstreams)))
    return name


_RULE_KEYS = (
    "prefix",
    "action",
    "rewrite_to",
    "upstream",
    "max_body_bytes",
    "allow",
    "https_port",
)
_FALLBACK_KEYS = ("action", "rewrite_to", "upstream", "max_body_bytes", "https_port")
_MAX_BODY_BYTES = Rule(name="", prefix=b"", action=Action.DENY).max_body_bytes


def _allow(table: Table, where: str) -> frozenset[Refusal]:
    """The refusals a rule opts out of, for its own prefix only (SPEC 4)."""
    allow: set[Refusal] = set()
    for index, item in enumerate(_list(table.get("allow", []), _join(where, "allow"))):
        item_where = f"{where}.allow[{index}]"
        text = _str(item, item_where)
        if text in _OPT_OUTS:
            allow.add(_OPT_OUTS[text])
        elif text in {r.value for r in Refusal}:
            raise _bad(
                item_where,
                "this refusal cannot be opted out of",
                text,
                hint="allowed: " + ", ".join(_OPT_OUTS),
            )
        else:
            raise _bad(item_where, "unknown refusal", text, hint=_suggest(text, list(_OPT_OUTS)))
    return frozenset(allow)


def _rule_common(
    name: str,
    table: Table,
    where: str,
    action: Action,
    prefix: bytes,
    allow: frozenset[Refusal],
    upstreams: Collection[str],
) -> Rule:
    """The fields rules and fallbacks share, once ``action`` is known."""
    rewrite_to = None
    if action is Action.REWRITE:
        if "rewrite_to" not in table:
            raise _missing(where, "rewrite_to", hint='required when action is "rewrite"')
        rewrite_to = _path(table["rewrite_to"], _join(where, "rewrite_to"), "rewrite_to")
    elif "rewrite_to" in table:
        raise _bad(
            _join(where, "rewrite_to"),
            'rewrite_to is only for action "rewrite"',
            table["rewrite_to"],
        )
    https_port = 443
    if "https_port" in table:
        port_where = _join(where, "https_port")
        if action is not Action.REDIRECT_HTTPS:
            raise _bad(
                port_where, 'https_port is only for action "redirect_https"', table["https_port"]
            )
        https_port = _int(table["https_port"], port_where, minimum=1)
        if https_port > 65535:
            raise _bad(port_where, "not a TCP port", https_port)
    upstream = None
    if "upstream" in table:
        upstream = _rule_upstream(table["upstream"], _join(where, "upstream"), upstreams)
    max_body = _get_int(table, "max_body_bytes", where, _MAX_BODY_BYTES, minimum=0)
    return Rule(
        name=name,
        prefix=prefix,
        action=action,
        rewrite_to=rewrite_to,
        upstream=upstream,
        max_body_bytes=max_body,
        allow=allow,
        https_port=https_port,
    )


def _rule(name: str, value: object, where: str, upstreams: Collection[str]) -> Rule:
    table = _table(value, where)
    _keys(table, where, _RULE_KEYS, required=("prefix", "action"))
    action = _choice(table["action"], _join(where, "action"), "rule action", _ACTIONS)
    allow = _allow(table, where)
    prefix = _path(table["prefix"], _join(where, "prefix"), "prefix", allow)
    return _rule_common(name, table, where, action, prefix, allow, upstreams)


def _fallback(value: object, where: str, upstreams: Collection[str]) -> Rule:
    if isinstance(value, str):
        action = _choice(value, where, "fallback action", _FALLBACK_ACTIONS)
        if action is Action.REWRITE:
            raise _missing(
                where,
                "rewrite_to",
                hint='write fallback = { action = "rewrite", rewrite_to = "/index.html" }',
            )
        table: Table = {}
    elif isinstance(value, Mapping):
        table = _table(value, where)
        _keys(table, where, _FALLBACK_KEYS, required=("action",))
        action_where = _join(where, "action")
        action = _choice(table["action"], action_where, "fallback action", _FALLBACK_ACTIONS)
    else:
        raise _bad(where, 'expected "deny", "forward", "redirect_https" or a table', value)
    return _rule_common("fallback", table, where, action, b"", frozenset(), upstreams)


@dataclass(frozen=True, slots=True)
class _Policy:
    """A resolved policy, before per-listener toggles."""

    rules: tuple[Rule, ...]
    fallback: Rule
    #: rule name -> the dotted location that defined it, for error messages
    origins: Mapping[str, str]


def _check_prefixes(rules: Sequence[Rule], blame: Mapping[str, tuple[str, str | None]]) -> None:
    """Raise for two rules with the same prefix. ``blame`` maps the names of the rules being
    added (one of them is at fault) to the location and hint to report."""
    seen: dict[bytes, Rule] = {}
    for rule in rules:
        other = seen.setdefault(rule.prefix, rule)
        if other is rule:
            continue
        where, hint = blame[rule.name] if rule.name in blame else blame[other.name]
        raise _bad(
            where,
            f'rules "{other.name}" and "{rule.name}" have the same prefix',
            rule.prefix.decode("ascii"),
            hint=hint,
        )


def _merge(
    base: _Policy | None, added: Sequence[tuple[Rule, str]], fallback: Rule | None
) -> _Policy:
    """``base`` with ``added`` rules (replacing same-named ones in place, else appended)."""
    rules = {rule.name: rule for rule in base.rules} if base else {}
    origins = dict(base.origins) if base else {}
    for rule, where in added:
        rules[rule.name] = rule
        origins[rule.name] = where
    _check_prefixes(list(rules.values()), {r.name: (f"{w}.prefix", None) for r, w in added})
    if fallback is None:
        fallback = base.fallback if base else Rule(name="fallback", prefix=b"", action=Action.DENY)
    return _Policy(tuple(rules.values()), fallback, types.MappingProxyType(origins))


def _rules_table(value: object, where: str, upstreams: Collection[str]) -> list[tuple[Rule, str]]:
    table = _table(value, where)
    out: list[tuple[Rule, str]] = []
    for name, rule_value in table.items():
        rule_where = _join(where, name)
        _name(name, rule_where)
        if name == "fallback":
            raise _bad(
                rule_where,
                'the rule name "fallback" is reserved',
                name,
                hint="set the policy's fallback key instead",
            )
        out.append((_rule(name, rule_value, rule_where, upstreams), rule_where))
    return out


def _policies(
    value: object, where: str, known: Mapping[str, _Policy], upstreams: Collection[str]
) -> dict[str, _Policy]:
    """Parse ``[policies]``; ``known`` are the preset policies, extended by same-named ones."""
    resolved: dict[str, _Policy] = {}
    names = list(_table(value, where))
    for name, policy_value in _table(value, where).items():
        policy_where = _join(where, name)
        _name(name, policy_where)
        table = _table(policy_value, policy_where)
        _keys(table, policy_where, ("extends", "fallback", "rules"))
        base = known.get(name)
        if "extends" in table:
            extends_where = _join(policy_where, "extends")
            parent = _str(table["extends"], extends_where)
            if base is not None:
                raise _bad(
                    extends_where,
                    f'a policy named after the preset "{name}" already extends it',
                    parent,
                    hint="give the policy another name",
                )
            if parent in resolved:
                base = resolved[parent]
            elif parent in known:
                base = known[parent]
            elif parent == name:
                raise _bad(extends_where, "a policy cannot extend itself", parent)
            elif parent in names:
                raise _bad(
                    extends_where,
                    "a policy can only extend one defined before it",
                    parent,
                    hint=f"move [policies.{parent}] above [policies.{name}]",
                )
            else:
                choices = [*known, *resolved]
                raise _bad(extends_where, "unknown policy", parent, hint=_suggest(parent, choices))
        added = _rules_table(table.get("rules", {}), _join(policy_where, "rules"), upstreams)
        fallback = None
        if "fallback" in table:
            fallback = _fallback(table["fallback"], _join(policy_where, "fallback"), upstreams)
        resolved[name] = policy = _merge(base, added, fallback)
        _compile(policy.rules, policy.fallback, policy_where)
    return resolved


# --------------------------------------------------------------------------------------------
# The preset


@dataclass(frozen=True, slots=True)
class _Toggle:
    #: the preset policy the rules are added to, or None for every listener without TLS
    policy: str | None
    rules: tuple[tuple[Rule, str], ...]


@dataclass(frozen=True, slots=True)
class _Preset:
    version: int
    policies: Mapping[str, _Policy]
    toggles: Mapping[str, _Toggle]


_PRESET_FILE = "presets/cobrowse.toml"
_TOGGLE_NAMES = tuple(PresetToggles.__dataclass_fields__)


@functools.cache
def _preset() -> _Preset:
    text = importlib.resources.files("fastproxy").joinpath(_PRESET_FILE).read_text("utf-8")
    try:
        return _parse_preset(tomllib.loads(text))
    except ConfigError as exc:
        raise exc.with_source(_PRESET_FILE) from None


def _parse_preset(data: Table) -> _Preset:
    _keys(data, "", ("version", "policies", "toggles"), required=("version", "policies"))
    version = _int(data["version"], "version", minimum=1)
    policies = _policies(data["policies"], "policies", {}, ())
    toggles: dict[str, _Toggle] = {}
    toggles_table = _table(data.get("toggles", {}), "toggles")
    _keys(toggles_table, "toggles", _TOGGLE_NAMES, required=_TOGGLE_NAMES)
    for name, value in toggles_table.items():
        where = _join("toggles", name)
        table = _table(value, where)
        _keys(table, where, ("description", "policy", "listeners", "rules"), required=("rules",))
        _str(table.get("description", ""), _join(where, "description"))
        if ("policy" in table) == ("listeners" in table):
            raise ConfigError('needs exactly one of "policy" and "listeners"', where=where)
        target = None
        if "policy" in table:
            target = _choice(
                table["policy"], _join(where, "policy"), "policy", {p: p for p in policies}
            )
        else:
            _choice(
                table["listeners"], _join(where, "listeners"), "listener set", {"plain_http": None}
            )
        toggles[name] = _Toggle(
            target, tuple(_rules_table(table["rules"], _join(where, "rules"), ()))
        )
    return _Preset(version, types.MappingProxyType(policies), types.MappingProxyType(toggles))


def _toggle_values(toggles: PresetToggles) -> dict[str, bool]:
    return {
        "pin_sdk": toggles.pin_sdk,
        "universal": toggles.universal,
        "ai": toggles.ai,
        "acme": toggles.acme,
    }


def _toggled(toggles: PresetToggles) -> tuple[dict[str, _Policy], list[tuple[Rule, str]]]:
    """The preset policies with the policy toggles applied, and the rules for plain listeners."""
    preset = _preset()
    policies = dict(preset.policies)
    plain: list[tuple[Rule, str]] = []
    for name, toggle in preset.toggles.items():
        if not _toggle_values(toggles)[name]:
            continue
        if toggle.policy is None:
            plain.extend((rule, f"presets.cobrowse.{name}") for rule, _ in toggle.rules)
        else:
            policies[toggle.policy] = _merge(policies[toggle.policy], toggle.rules, None)
    return policies, plain


# --------------------------------------------------------------------------------------------
# The document


_TOP_KEYS = (
    "workers",
    "http_parser",
    "heartbeat_timeout_s",
    "graceful_timeout_s",
    "upstreams",
    "listeners",
    "policies",
    "admin",
    "presets",
    "access_log",
)
_ACCESS_LOG_KEYS = ("enabled", "path", "sample", "query")
_QUERY_MODES = {mode.value: mode for mode in QueryMode}
_UPSTREAM_KEYS = (
    "servers",
    "balance",
    "keepalive",
    "keepalive_timeout_s",
    "connect_timeout_s",
    "first_byte_timeout_s",
    "read_timeout_s",
    "tls",
    "health",
    "down_for_s",
    "next_upstream_tries",
    "next_upstream_timeout_s",
)
_HEALTH_KEYS = ("path", "interval_s", "timeout_s", "statuses", "rise", "fall")
_HEALTH_PATH_RE = re.compile(r"/[!-~]*")
_STATUS_RANGE_RE = re.compile(r"([1-5][0-9][0-9])-([1-5][0-9][0-9])")
_LISTENER_KEYS = (
    "bind",
    "policy",
    "upstream",
    "mode",
    "tls",
    "limits",
    "trusted_proxies",
    "keep_headers",
    "forwarded_header",
    "websocket_mode",
    "refused_methods",
)
_LIMIT_KEYS = tuple(Limits.__dataclass_fields__)

_BUILT_IN: Table = types.MappingProxyType(
    {
        "upstreams": {"cobrowse": {"servers": [DEFAULT_UPSTREAM]}},
        "listeners": {
            "sdk": {"bind": DEFAULT_SDK_BIND, "policy": PRESET_SDK},
            "agent": {"bind": DEFAULT_AGENT_BIND, "policy": PRESET_AGENT},
        },
        "admin": {"bind": DEFAULT_ADMIN_BIND},
    }
)


def _parse(data: Table, source: str) -> Config:
    _keys(data, "", _TOP_KEYS)
    workers = _get_int(data, "workers", "", os.cpu_count() or 1, minimum=1)
    http_parser = auto_parser()
    if "http_parser" in data and data["http_parser"] != "auto":
        http_parser = _choice(data["http_parser"], "http_parser", "HTTP parser", _PARSER_NAMES)
        if http_parser is HttpParser.HTTPTOOLS and importlib.util.find_spec("httptools") is None:
            raise _bad(
                "http_parser",
                "httptools is not installed",
                data["http_parser"],
                hint="pip install 'fastproxy[httptools]', or use \"h11\"",
            )
    toggles = _preset_toggles(data.get("presets", {}))

    if "upstreams" not in data:
        raise _missing("", "upstreams", hint="at least one [upstreams.NAME] table")
    upstreams_table = _table(data["upstreams"], "upstreams")
    if not upstreams_table:
        raise _bad("upstreams", "at least one upstream is required", upstreams_table)
    upstreams: dict[str, UpstreamConfig] = {}
    for name, value in upstreams_table.items():
        upstreams[name] = _upstream(name, value, _join("upstreams", name))

    presets, plain_rules = _toggled(toggles)
    policies = dict(presets)
    policies.update(_policies(data.get("policies", {}), "policies", presets, upstreams))

    if "listeners" not in data:
        raise _missing("", "listeners", hint="at least one [listeners.NAME] table")
    listeners_table = _table(data["listeners"], "listeners")
    if not listeners_table:
        raise _bad("listeners", "at least one listener is required", listeners_table)
    listeners: dict[str, ListenerConfig] = {}
    for name, value in listeners_table.items():
        where = _join("listeners", name)
        listener = _listener(name, value, where, policies, upstreams, plain_rules)
        for other in listeners.values():
            _check_bind(listener.bind, _join(where, "bind"), f"listeners.{other.name}", other.bind)
        listeners[name] = listener

    admin: AdminConfig | None = AdminConfig(_bind_address(DEFAULT_ADMIN_BIND, "admin.bind"))
    if "admin" in data:
        admin = _admin(data["admin"])
    if admin is not None:
        for other in listeners.values():
            _check_bind(admin.bind, "admin.bind", f"listeners.{other.name}", other.bind)

    return Config(
        source=source,
        workers=workers,
        workers_per_cpu="workers" not in data,
        listeners=types.MappingProxyType(listeners),
        upstreams=types.MappingProxyType(upstreams),
        admin=admin,
        presets=toggles,
        http_parser=http_parser,
        heartbeat_timeout_s=_get_seconds(data, "heartbeat_timeout_s", "", HEARTBEAT_TIMEOUT_S),
        graceful_timeout_s=_get_seconds(data, "graceful_timeout_s", "", GRACEFUL_TIMEOUT_S),
        access_log=_access_log(data.get("access_log", {"enabled": False})),
    )


def _access_log(value: object) -> AccessLogConfig:
    where = "access_log"
    table = _table(value, where)
    _keys(table, where, _ACCESS_LOG_KEYS)
    enabled = _get_bool(table, "enabled", where, True)
    path = None
    if "path" in table:
        path = _str(table["path"], "access_log.path")
        if not path or "\0" in path:
            raise _bad("access_log.path", 'expected a file name or "-" for stdout', path)
    elif enabled:
        raise _missing(where, "path", hint='a file to append to, or "-" for stdout')
    sample = 1.0
    if "sample" in table:
        raw = table["sample"]
        if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 <= raw <= 1:
            raise _bad("access_log.sample", "expected a number from 0 to 1", raw)
        sample = float(raw)
    query = QueryMode.REDACT
    if "query" in table:
        query = _choice(table["query"], "access_log.query", "query mode", _QUERY_MODES)
    return AccessLogConfig(path=path if enabled else None, sample=sample, query=query)


def _preset_toggles(value: object) -> PresetToggles:
    presets = _table(value, "presets")
    _keys(presets, "presets", ("cobrowse",))
    table = _table(presets.get("cobrowse", {}), "presets.cobrowse")
    where = "presets.cobrowse"
    _keys(table, where, _TOGGLE_NAMES)
    return PresetToggles(
        pin_sdk=_get_bool(table, "pin_sdk", where, False),
        universal=_get_bool(table, "universal", where, False),
        ai=_get_bool(table, "ai", where, False),
        acme=_get_bool(table, "acme", where, False),
    )


def _upstream(name: str, value: object, where: str) -> UpstreamConfig:
    _name(name, where)
    table = _table(value, where)
    _keys(table, where, _UPSTREAM_KEYS, required=("servers",))
    servers_where = _join(where, "servers")
    items = _list(table["servers"], servers_where)
    if not items:
        raise _bad(servers_where, "at least one server is required", items)
    servers: list[Address] = []
    for index, item in enumerate(items):
        address = _server_address(item, f"{servers_where}[{index}]")
        if address in servers:
            raise _bad(f"{servers_where}[{index}]", "server listed twice", item)
        servers.append(address)
    defaults = UpstreamConfig(name, ())
    balance = defaults.balance
    if "balance" in table:
        balance = _choice(table["balance"], _join(where, "balance"), "balance", _BALANCES)
    return UpstreamConfig(
        name=name,
        servers=tuple(servers),
        balance=balance,
        keepalive=_get_int(table, "keepalive", where, defaults.keepalive, minimum=0),
        keepalive_timeout_s=_get_seconds(
            table, "keepalive_timeout_s", where, defaults.keepalive_timeout_s
        ),
        connect_timeout_s=_get_seconds(
            table, "connect_timeout_s", where, defaults.connect_timeout_s
        ),
        first_byte_timeout_s=_get_seconds(
            table, "first_byte_timeout_s", where, defaults.first_byte_timeout_s
        ),
        read_timeout_s=_get_seconds(table, "read_timeout_s", where, defaults.read_timeout_s),
        tls=_upstream_tls(table["tls"], _join(where, "tls")) if "tls" in table else None,
        health=_health(table["health"], _join(where, "health"))
        if "health" in table
        else defaults.health,
        down_for_s=_get_seconds(table, "down_for_s", where, defaults.down_for_s),
        next_upstream_tries=_get_int(
            table, "next_upstream_tries", where, defaults.next_upstream_tries, minimum=1
        ),
        next_upstream_timeout_s=_get_seconds(
            table, "next_upstream_timeout_s", where, defaults.next_upstream_timeout_s
        ),
    )


def _health(value: object, where: str) -> HealthCheck | None:
    """``health = false`` (no active checks), ``true`` (the defaults) or a table of fields."""
    if isinstance(value, bool):
        return HealthCheck() if value else None
    if not isinstance(value, Mapping):
        raise _bad(where, "expected true, false or a table", value)
    table = cast(Table, value)
    _keys(table, where, _HEALTH_KEYS)
    d = HealthCheck()
    path = d.path
    if "path" in table:
        path = _str(table["path"], _join(where, "path"))
        if not _HEALTH_PATH_RE.fullmatch(path):
            raise _bad(
                _join(where, "path"),
                'expected a request target starting with "/", visible ASCII, no spaces',
                path,
            )
    interval = _get_seconds(table, "interval_s", where, d.interval_s)
    timeout = _get_seconds(table, "timeout_s", where, min(d.timeout_s, interval))
    if timeout > interval:
        raise _bad(
            _join(where, "timeout_s"), f"must be at most interval_s ({_toml(interval)})", timeout
        )
    statuses = d.statuses
    if "statuses" in table:
        statuses = _statuses(table["statuses"], _join(where, "statuses"))
    return HealthCheck(
        path=path,
        interval_s=interval,
        timeout_s=timeout,
        statuses=statuses,
        rise=_get_int(table, "rise", where, d.rise, minimum=1),
        fall=_get_int(table, "fall", where, d.fall, minimum=1),
    )


def _statuses(value: object, where: str) -> tuple[tuple[int, int], ...]:
    """A list of statuses (``200``) and inclusive ranges (``"200-399"``), at least one."""
    items = _list(value, where)
    if not items:
        raise _bad(where, "at least one status or range is required", items)
    ranges: list[tuple[int, int]] = []
    for index, item in enumerate(items):
        item_where = f"{where}[{index}]"
        if isinstance(item, int) and not isinstance(item, bool):
            if not 100 <= item <= 599:
                raise _bad(item_where, "a status is from 100 to 599", item)
            ranges.append((item, item))
            continue
        match = _STATUS_RANGE_RE.fullmatch(item) if isinstance(item, str) else None
        if match is None or int(match[1]) > int(match[2]):
            raise _bad(item_where, 'expected a status (200) or a range ("200-399")', item)
        ranges.append((int(match[1]), int(match[2])))
    return tuple(ranges)


def _listener(
    name: str,
    value: object,
    where: str,
    policies: Mapping[str, _Policy],
    upstreams: Mapping[str, UpstreamConfig],
    plain_rules: Sequence[tuple[Rule, str]],
) -> ListenerConfig:
    _name(name, where)
    table = _table(value, where)
    if "strip_override_headers" in table:
        # removed when provenance headers became one rule for every listener
        raise ConfigError(
            "no longer a setting: provenance headers are removed from untrusted clients on "
            "every listener",
            where=_join(where, "strip_override_headers"),
            hint='keep_headers = ["X-Original-URL"] keeps a named one',
        )
    _keys(table, where, _LISTENER_KEYS, required=("bind", "policy"))
    bind = _bind_address(table["bind"], _join(where, "bind"))

    tls = _tls(table["tls"], _join(where, "tls")) if "tls" in table else None

    policy_where = _join(where, "policy")
    policy_name = _str(table["policy"], policy_where)
    if policy_name not in policies:
        raise _bad(
            policy_where, "unknown policy", policy_name, _suggest(policy_name, list(policies))
        )
    policy = policies[policy_name]
    rules = list(policy.rules)
    if tls is None:
        # A rule of the listener's policy wins over a toggle's rule of the same name.
        rules.extend(rule for rule, _ in plain_rules if rule.name not in policy.origins)
        _check_prefixes(
            rules, {r.name: (policy_where, f"{w} adds {r.name}") for r, w in plain_rules}
        )
    _compile(tuple(rules), policy.fallback, policy_where)

    if "upstream" in table:
        upstream = _rule_upstream(table["upstream"], _join(where, "upstream"), upstreams)
    elif len(upstreams) == 1:
        upstream = next(iter(upstreams))
    else:
        raise _missing(where, "upstream", hint="required when there is more than one upstream")

    mode = Mode.ENFORCE
    if "mode" in table:
        mode = _choice(table["mode"], _join(where, "mode"), "mode", _MODES)
    ws_mode = WebSocketMode.VALIDATE
    if "websocket_mode" in table:
        ws_where = _join(where, "websocket_mode")
        ws_mode = _choice(table["websocket_mode"], ws_where, "websocket mode", _WS_MODES)
    keep: frozenset[bytes] = frozenset()
    if "keep_headers" in table:
        keep = _keep_headers(table["keep_headers"], _join(where, "keep_headers"))
    defaults = ListenerConfig(name, bind, policy_name, (), policy.fallback, upstream)
    refused = defaults.refused_methods
    if "refused_methods" in table:
        refused = _methods(table["refused_methods"], _join(where, "refused_methods"))
    proxies_where = _join(where, "trusted_proxies")
    proxies = tuple(
        _network(item, f"{proxies_where}[{index}]")
        for index, item in enumerate(_list(table.get("trusted_proxies", []), proxies_where))
    )
    return ListenerConfig(
        name=name,
        bind=bind,
        policy=policy_name,
        rules=tuple(rules),
        fallback=policy.fallback,
        upstream=upstream,
        mode=mode,
        tls=tls,
        limits=_limits(
            table.get("limits", {}),
            _join(where, "limits"),
            # agents share a few NAT addresses: no per-client cap unless the file sets one
            per_client_default=0 if policy_name == PRESET_AGENT else PER_CLIENT_DEFAULT,
        ),
        trusted_proxies=proxies,
        keep_headers=keep,
        forwarded_header=_get_bool(table, "forwarded_header", where, defaults.forwarded_header),
        websocket_mode=ws_mode,
        refused_methods=refused,
    )


_TLS_KEYS = ("cert", "key", "certificates", "min_version", "handshake_timeout_s")
_UPSTREAM_TLS_KEYS = ("ca", "verify", "server_name", "cert", "key")


def _file(table: Table, key: str, where: str) -> str:
    key_where = _join(where, key)
    text = _str(table[key], key_where)
    if not text or "\0" in text:
        raise _bad(key_where, "expected a file name", text)
    return text


def _cert_key(value: object, where: str) -> CertKey:
    table = _table(value, where)
    _keys(table, where, ("cert", "key"), required=("cert", "key"))
    return CertKey(cert=_file(table, "cert", where), key=_file(table, "key", where))


def _tls(value: object, where: str) -> TlsConfig:
    """A listener's ``tls`` table; the files themselves are checked by ``tls.py``."""
    table = _table(value, where)
    _keys(table, where, _TLS_KEYS, required=("cert", "key"))
    default = _cert_key({"cert": table["cert"], "key": table["key"]}, where)
    certs_where = _join(where, "certificates")
    certificates = tuple(
        _cert_key(item, f"{certs_where}[{index}]")
        for index, item in enumerate(_list(table.get("certificates", []), certs_where))
    )
    min_version = "1.2"
    if "min_version" in table:
        version_where = _join(where, "min_version")
        min_version = _str(table["min_version"], version_where)
        if min_version not in TLS_VERSIONS:
            raise _bad(
                version_where,
                "unknown TLS version",
                table["min_version"],
                hint='"1.2" or "1.3"; TLS 1.0 and 1.1 are never accepted',
            )
    timeout = _get_seconds(table, "handshake_timeout_s", where, 10.0)
    return TlsConfig(default.cert, default.key, certificates, min_version, timeout)


def _upstream_tls(value: object, where: str) -> UpstreamTls | None:
    """An upstream's ``tls``: ``true``, ``false`` or a table of ``UpstreamTls`` fields."""
    if value is True:
        return UpstreamTls()
    if value is False:
        return None
    if not isinstance(value, Mapping):
        raise _bad(where, "expected true, false or a table", value)
    table = _table(value, where)
    _keys(table, where, _UPSTREAM_TLS_KEYS)
    if ("cert" in table) != ("key" in table):
        missing = "key" if "cert" in table else "cert"
        raise _missing(where, missing, hint="a client certificate needs both cert and key")
    server_name = None
    if "server_name" in table:
        name_where = _join(where, "server_name")
        server_name = _str(table["server_name"], name_where).lower()
        if len(server_name) > 253 or not _HOSTNAME_RE.fullmatch(server_name):
            raise _bad(name_where, "not a host name", table["server_name"])
    return UpstreamTls(
        ca=_file(table, "ca", where) if "ca" in table else None,
        verify=_get_bool(table, "verify", where, True),
        server_name=server_name,
        cert=_file(table, "cert", where) if "cert" in table else None,
        key=_file(table, "key", where) if "key" in table else None,
    )


def _dump_tls(tls: TlsConfig) -> dict[str, object]:
    items: dict[str, object] = {"cert": tls.cert, "key": tls.key}
    if tls.certificates:
        items["certificates"] = [{"cert": c.cert, "key": c.key} for c in tls.certificates]
    items["min_version"] = tls.min_version
    items["handshake_timeout_s"] = tls.handshake_timeout_s
    return items


def _dump_upstream_tls(tls: UpstreamTls) -> dict[str, object]:
    items: dict[str, object] = {"verify": tls.verify}
    for key in ("ca", "server_name", "cert", "key"):
        value = getattr(tls, key)
        if value is not None:
            items[key] = value
    return items


def _compile(rules: tuple[Rule, ...], fallback: Rule, where: str) -> None:
    """Build the listener's prefix table once, so an inconsistent policy fails at load."""
    try:
        PrefixTable(rules, fallback)
    except ValueError as exc:
        raise ConfigError(str(exc), where=where) from None


def _keep_headers(value: object, where: str) -> frozenset[bytes]:
    names: set[bytes] = set()
    for index, item in enumerate(_list(value, where)):
        item_where = f"{where}[{index}]"
        text = _str(item, item_where)
        if not _TOKEN_RE.fullmatch(text):
            raise _bad(item_where, "not a header name", text)
        folded = fold(text.encode("ascii"))
        if folded in FORWARDING_HEADERS:
            raise _bad(
                item_where,
                "fastproxy sets this header itself",
                text,
                hint="list the peers whose value is kept in trusted_proxies",
            )
        if not is_provenance(folded):
            raise _bad(
                item_where,
                "not a provenance header, it passes untouched already",
                text,
                hint='see "Provenance headers" in the README',
            )
        names.add(folded)
    return frozenset(names)


def _methods(value: object, where: str) -> frozenset[bytes]:
    methods: set[bytes] = set()
    for index, item in enumerate(_list(value, where)):
        item_where = f"{where}[{index}]"
        text = _str(item, item_where)
        if not _TOKEN_RE.fullmatch(text):
            raise _bad(item_where, "not an HTTP method name", text)
        method = text.upper().encode("ascii")
        if not valid_method(method):
            raise _bad(
                item_where,
                "not a method fastproxy accepts",
                text,
                hint='methods are upper-case letters, "_" and "-"; any other is refused with 400',
            )
        methods.add(method)
    return frozenset(methods)


def _limits(value: object, where: str, *, per_client_default: int) -> Limits:
    table = _table(value, where)
    _keys(table, where, _LIMIT_KEYS)
    d = Limits(max_connections_per_client=per_client_default)
    limits = Limits(
        max_head_bytes=_get_int(table, "max_head_bytes", where, d.max_head_bytes, minimum=1),
        max_headers=_get_int(table, "max_headers", where, d.max_headers, minimum=1),
        max_uri_bytes=_get_int(table, "max_uri_bytes", where, d.max_uri_bytes, minimum=1),
        header_timeout_s=_get_seconds(table, "header_timeout_s", where, d.header_timeout_s),
        keepalive_timeout_s=_get_seconds(
            table, "keepalive_timeout_s", where, d.keepalive_timeout_s
        ),
        body_timeout_s=_get_seconds(table, "body_timeout_s", where, d.body_timeout_s),
        send_timeout_s=_get_seconds(table, "send_timeout_s", where, d.send_timeout_s),
        max_connections=_get_int(table, "max_connections", where, d.max_connections, minimum=1),
        max_connections_per_client=_get_int(
            table, "max_connections_per_client", where, d.max_connections_per_client, minimum=0
        ),
        ws_idle_timeout_s=_get_seconds(table, "ws_idle_timeout_s", where, d.ws_idle_timeout_s),
        ws_ping_interval_s=_get_seconds(table, "ws_ping_interval_s", where, d.ws_ping_interval_s),
        ws_max_message_bytes=_get_int(
            table, "ws_max_message_bytes", where, d.ws_max_message_bytes, minimum=1
        ),
    )
    if limits.ws_ping_interval_s >= limits.ws_idle_timeout_s:
        raise _bad(
            _join(where, "ws_ping_interval_s"),
            f"must be shorter than ws_idle_timeout_s ({limits.ws_idle_timeout_s})",
            limits.ws_ping_interval_s,
        )
    return limits


def _admin(value: object) -> AdminConfig | None:
    if value is False:
        return None
    if value is True:
        return AdminConfig(_bind_address(DEFAULT_ADMIN_BIND, "admin.bind"))
    if not isinstance(value, Mapping):
        raise _bad("admin", "expected a table or false", value)
    table = _table(value, "admin")
    _keys(table, "admin", ("bind",), required=("bind",))
    return AdminConfig(_bind_address(table["bind"], "admin.bind"))


def _check_bind(bind: Address, where: str, other_where: str, other: Address) -> None:
    if not _overlaps(bind, other):
        return
    hint = None
    if bind != other:
        wildcard = bind if ipaddress.ip_address(bind.host).is_unspecified else other
        hint = f"{_toml_string(str(wildcard))} covers every address of its family on that port"
    raise _bad(
        where,
        f"address already used by {other_where} ({_toml_string(str(other))})",
        str(bind),
        hint=hint,
    )


# --------------------------------------------------------------------------------------------
# Dump


def _dump(config: Config) -> str:
    lines = [
        "# fastproxy configuration, fully expanded: every default written out and each policy",
        f"# with all its rules (Cobrowse preset version {preset_version()} and toggles applied).",
        "# Read from " + config.source.replace("\n", " ") + ".",
        "",
        (
            f"# workers: not set, so one per CPU ({config.workers} on this machine)"
            if config.workers_per_cpu
            else f"workers = {_toml(config.workers)}"
        ),
        f"http_parser = {_toml(config.http_parser.value)}",
        f"heartbeat_timeout_s = {_toml(config.heartbeat_timeout_s)}",
        f"graceful_timeout_s = {_toml(config.graceful_timeout_s)}",
    ]
    if config.admin is None:
        lines.append("admin = false")

    def section(header: str, items: Sequence[tuple[str, object]]) -> None:
        lines.extend(["", f"[{header}]"])
        lines.extend(f"{_toml_key(k)} = {_toml(v)}" for k, v in items)

    toggles = config.presets
    section("presets.cobrowse", list(_toggle_values(toggles).items()))
    access = config.access_log
    section(
        "access_log",
        [
            *([("enabled", False)] if access.path is None else [("path", access.path)]),
            ("sample", access.sample),
            ("query", access.query.value),
        ],
    )
    if config.admin is not None:
        section("admin", [("bind", str(config.admin.bind))])
    for name, up in config.upstreams.items():
        section(
            f"upstreams.{_toml_key(name)}",
            [
                ("servers", [str(s) for s in up.servers]),
                ("balance", up.balance.value),
                ("keepalive", up.keepalive),
                ("keepalive_timeout_s", up.keepalive_timeout_s),
                ("connect_timeout_s", up.connect_timeout_s),
                ("first_byte_timeout_s", up.first_byte_timeout_s),
                ("read_timeout_s", up.read_timeout_s),
                *([("tls", _dump_upstream_tls(up.tls))] if up.tls is not None else []),
                ("health", _health_items(up.health)),
                ("down_for_s", up.down_for_s),
                ("next_upstream_tries", up.next_upstream_tries),
                ("next_upstream_timeout_s", up.next_upstream_timeout_s),
            ],
        )
    policies: dict[str, list[ListenerConfig]] = {}
    for name, lis in config.listeners.items():
        policies.setdefault(lis.policy, []).append(lis)
        items: list[tuple[str, object]] = [
            ("bind", str(lis.bind)),
            ("policy", lis.policy),
            ("upstream", lis.upstream),
            ("mode", lis.mode.value),
        ]
        if lis.tls is not None:
            items.append(("tls", _dump_tls(lis.tls)))
        items += [
            ("trusted_proxies", [str(n) for n in lis.trusted_proxies]),
            ("forwarded_header", lis.forwarded_header),
            ("websocket_mode", lis.websocket_mode.value),
            ("refused_methods", sorted(m.decode("ascii") for m in lis.refused_methods)),
        ]
        items.append(("keep_headers", sorted(h.decode("ascii") for h in lis.keep_headers)))
        key = _toml_key(name)
        section(f"listeners.{key}", items)
        limits = lis.limits
        section(
            f"listeners.{key}.limits",
            [(k, getattr(limits, k)) for k in _LIMIT_KEYS],
        )
    for policy_name, users in policies.items():
        rules, fallback = _dump_policy_rules(config, users)
        key = _toml_key(policy_name)
        section(f"policies.{key}", [("fallback", _rule_items(fallback, with_prefix=False))])
        for rule in rules:
            section(f"policies.{key}.rules.{_toml_key(rule.name)}", list(_rule_items(rule).items()))
    return "\n".join(lines) + "\n"


def _health_items(check: HealthCheck | None) -> object:
    if check is None:
        return False
    return {
        "path": check.path,
        "interval_s": check.interval_s,
        "timeout_s": check.timeout_s,
        "statuses": [lo if lo == hi else f"{lo}-{hi}" for lo, hi in check.statuses],
        "rise": check.rise,
        "fall": check.fall,
    }


def _dump_policy_rules(
    config: Config, users: Sequence[ListenerConfig]
) -> tuple[tuple[Rule, ...], Rule]:
    """The rules to write for a policy shared by ``users``. They are the same for every
    listener, except that listeners without TLS also hold the per-listener toggle rules; those
    are then left out, since loading re-adds them."""
    first = users[0]
    if all(u.rules == first.rules and u.fallback == first.fallback for u in users):
        return first.rules, first.fallback
    _, plain = _toggled(config.presets)
    extra = {rule for rule, _ in plain}
    rules = tuple(r for r in first.rules if r not in extra)
    return rules, first.fallback


def _rule_items(rule: Rule, *, with_prefix: bool = True) -> dict[str, object]:
    items: dict[str, object] = {}
    if with_prefix:
        items["prefix"] = rule.prefix.decode("ascii")
    items["action"] = rule.action.value
    if rule.rewrite_to is not None:
        items["rewrite_to"] = rule.rewrite_to.decode("ascii")
    if rule.action is Action.REDIRECT_HTTPS:
        items["https_port"] = rule.https_port
    if rule.upstream is not None:
        items["upstream"] = rule.upstream
    items["max_body_bytes"] = rule.max_body_bytes
    if with_prefix:
        items["allow"] = sorted(r.value for r in rule.allow)
    return items
