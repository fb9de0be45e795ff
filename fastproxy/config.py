"""Configuration: TOML (``tomllib``) into frozen, validated objects.

Imports only ``errors`` and ``policy`` (and the standard library). Every check happens here, at
load, so the I/O layer never meets an invalid value. Errors name the file, the dotted key and the
value: ``fastproxy.toml: listeners.sdk.policy: unknown policy "cobrowse-skd", got ...``.

SKELETON: the types below are the contract the rest of fastproxy codes against.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from fastproxy.policy import Rule

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_SDK_BIND = "127.0.0.1:8080"
DEFAULT_AGENT_BIND = "127.0.0.1:8081"
DEFAULT_ADMIN_BIND = "127.0.0.1:9901"
DEFAULT_UPSTREAM = "127.0.0.1:8000"


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
class TlsConfig:
    cert: str
    key: str


@dataclass(frozen=True, slots=True)
class Limits:
    max_head_bytes: int = 16 * 1024
    max_headers: int = 100
    max_uri_bytes: int = 8 * 1024
    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 75.0
    #: client connections one worker holds on this listener; more are closed at accept
    max_connections: int = 10_000
    #: connections one client address may hold on one worker; 0 = no limit
    max_connections_per_client: int = 256
    ws_idle_timeout_s: float = 3600.0
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
    #: remove X-Original-URL and the other override headers; None = when the fallback denies
    strip_override_headers: bool | None = None
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
    #: idle keep-alive connections kept per server per worker
    keepalive: int = 32
    keepalive_timeout_s: float = 60.0
    connect_timeout_s: float = 5.0
    #: time from the request head sent to the response head received
    first_byte_timeout_s: float = 60.0
    #: time an upstream may stay silent in the middle of a response body
    read_timeout_s: float = 60.0


@dataclass(frozen=True, slots=True)
class AdminConfig:
    bind: Address


@dataclass(frozen=True, slots=True)
class PresetToggles:
    pin_sdk: bool = False
    universal: bool = False
    ai: bool = False
    acme: bool = False


@dataclass(frozen=True, slots=True)
class Config:
    #: file name used in error messages; ``"<built-in>"`` for the preset default
    source: str
    workers: int
    listeners: Mapping[str, ListenerConfig]
    upstreams: Mapping[str, UpstreamConfig]
    admin: AdminConfig | None
    presets: PresetToggles = field(default_factory=PresetToggles)
    http_parser: HttpParser = HttpParser.H11
    #: seconds a worker may miss its heartbeat before the master replaces it
    heartbeat_timeout_s: float = 30.0
    #: seconds SIGTERM waits for in-flight requests before killing workers
    graceful_timeout_s: float = 30.0


def load_config(path: str | None) -> Config:
    """Read and validate ``path``; with None, the built-in Cobrowse preset on loopback."""
    raise NotImplementedError
