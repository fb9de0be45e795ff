"""One configuration generation, compiled for serving: the run-time ``Snapshot``.

[pure] Imports ``config``, ``policy`` and ``headers`` only: no asyncio, sockets, clock or logging.
The master builds a snapshot to validate a configuration and the workers build the very same
one to apply it, from the same code, so what ``fastproxy check`` accepts is what runs.

Theory of operation
-------------------
A ``Snapshot`` is immutable. It holds, per listener, a ``ListenerPlan``: the compiled
``PrefixTable`` and every setting a request needs, resolved once (limits, trusted networks,
provenance headers kept, refused methods, mode, scheme); per upstream, its ``UpstreamConfig``
(the spec its connection pool is keyed by). Nothing on the request path reads ``Config``.

A reload is "build a snapshot, swap a reference": a request keeps the plan it started with
(its cycle holds it), the next request on the same connection uses the newest. ``diff`` says
what a reload changes that is not a plain swap: listeners to bind or close, pools to retire.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fastproxy.config import (
    Address,
    Config,
    HttpParser,
    Limits,
    ListenerConfig,
    Mode,
    UpstreamConfig,
    WebSocketMode,
)
from fastproxy.policy import Action, PrefixTable, Rule

#: descriptors a worker keeps for itself: standard streams, logs, metrics files, listening,
#: admin and control sockets, the event loop's own (epoll, signals, libuv's EMFILE reserve)
FD_RESERVE = 64

#: what a listener without TLS calls itself in X-Forwarded-Proto and in Host checks
HTTP_SCHEME = b"http"
HTTP_DEFAULT_PORT = b"80"
#: the same for a listener with TLS
HTTPS_SCHEME = b"https"
HTTPS_DEFAULT_PORT = b"443"


@dataclass(frozen=True, slots=True, eq=False)
class ListenerPlan:
    """Everything a request on one listener needs, resolved from its ``ListenerConfig``."""

    name: str
    config: ListenerConfig
    table: PrefixTable
    limits: Limits
    #: the listener's default upstream
    upstream: str
    #: what would be denied is forwarded and counted as ``would_deny``
    report: bool
    #: WebSocket frames are checked (``validate``) rather than relayed as bytes (``tunnel``)
    validate_frames: bool
    refused_methods: frozenset[bytes]
    keep_headers: frozenset[bytes]
    forwarded_header: bool
    scheme: bytes
    default_port: bytes

    @classmethod
    def build(cls, config: ListenerConfig) -> ListenerPlan:
        return cls(
            name=config.name,
            config=config,
            table=PrefixTable(config.rules, config.fallback),
            limits=config.limits,
            upstream=config.upstream,
            report=config.mode is Mode.REPORT,
            validate_frames=config.websocket_mode is WebSocketMode.VALIDATE,
            refused_methods=config.refused_methods,
            keep_headers=config.keep_headers,
            forwarded_header=config.forwarded_header,
            scheme=HTTP_SCHEME if config.tls is None else HTTPS_SCHEME,
            default_port=HTTP_DEFAULT_PORT if config.tls is None else HTTPS_DEFAULT_PORT,
        )


@dataclass(frozen=True, slots=True, eq=False)
class Snapshot:
    """One configuration generation, compiled. ``generation`` counts successful loads from 1."""

    generation: int
    config: Config
    listeners: Mapping[str, ListenerPlan]
    upstreams: Mapping[str, UpstreamConfig]
    http_parser: HttpParser
    #: the Host sent to each upstream for an HTTP/1.0 request that has none: its first server
    default_hosts: Mapping[str, bytes]

    @classmethod
    def build(cls, config: Config, generation: int) -> Snapshot:
        return cls(
            generation=generation,
            config=config,
            listeners={name: ListenerPlan.build(lc) for name, lc in config.listeners.items()},
            upstreams=dict(config.upstreams),
            http_parser=config.http_parser,
            default_hosts={
                name: str(spec.servers[0]).encode()
                for name, spec in config.upstreams.items()
                if spec.servers
            },
        )

    def routes(self) -> dict[str, object]:
        """The compiled tables per listener, as plain data (admin ``/routes``)."""
        return {
            "generation": self.generation,
            "source": self.config.source,
            "http_parser": self.http_parser.value,
            "listeners": {
                name: {
                    "bind": str(plan.config.bind),
                    "policy": plan.config.policy,
                    "mode": plan.config.mode.value,
                    "upstream": plan.upstream,
                    "websocket_mode": plan.config.websocket_mode.value,
                    "tls": plan.config.tls is not None,
                    "rules": [_rule(rule) for rule in plan.table.rules],
                    "fallback": _rule(plan.table.fallback),
                }
                for name, plan in self.listeners.items()
            },
            "upstreams": {
                name: {
                    "servers": [str(server) for server in spec.servers],
                    "balance": spec.balance.value,
                }
                for name, spec in self.upstreams.items()
            },
        }

    def client_capacity(self, nofile: int) -> int:
        """Client connections a worker can hold with ``nofile`` descriptors.

        Each client connection may hold one upstream connection too (two descriptors); the
        idle keep-alive connections every pool may keep and ``FD_RESERVE`` (logs, metrics files,
        listening and control sockets, the loop's own) come off first.
        """
        idle = sum(spec.keepalive * len(spec.servers) for spec in self.upstreams.values())
        return max(0, (nofile - FD_RESERVE - idle) // 2)

    def max_clients(self) -> int:
        """The client connections a worker may hold: the sum of the listeners' max_connections."""
        return sum(plan.limits.max_connections for plan in self.listeners.values())

    def binds(self) -> dict[str, Address]:
        """Listener name -> bind address (the sockets this generation needs)."""
        return {name: plan.config.bind for name, plan in self.listeners.items()}


def _rule(rule: Rule) -> dict[str, object]:
    return {
        "name": rule.name,
        "prefix": rule.prefix.decode("ascii"),
        "action": rule.action.value,
        "rewrite_to": None if rule.rewrite_to is None else rule.rewrite_to.decode("ascii"),
        "upstream": rule.upstream,
        "max_body_bytes": rule.max_body_bytes,
        "allow": sorted(refusal.value for refusal in rule.allow),
        "https_port": rule.https_port if rule.action is Action.REDIRECT_HTTPS else None,
    }


@dataclass(frozen=True, slots=True)
class Changes:
    """What a reload from one snapshot to the next does beyond swapping the reference."""

    #: listeners to bind and start serving (new names, or a name whose address changed)
    bind: tuple[str, ...]
    #: listeners to stop accepting on (removed names, or a name whose address changed); their
    #: open connections finish as in a drain
    close: tuple[str, ...]
    #: upstreams whose spec changed or that are gone: their pools retire
    retire: tuple[str, ...]
    #: the number of workers changed
    workers: bool
    #: the admin listener moved, appeared or went away
    admin: bool

    @property
    def listeners_changed(self) -> bool:
        return bool(self.bind or self.close)


def diff(old: Snapshot, new: Snapshot) -> Changes:
    """What changes between ``old`` and ``new`` beyond the plans themselves."""
    old_binds, new_binds = old.binds(), new.binds()
    bind = tuple(sorted(n for n, a in new_binds.items() if old_binds.get(n) != a))
    close = tuple(sorted(n for n, a in old_binds.items() if new_binds.get(n) != a))
    retire = tuple(sorted(n for n, spec in old.upstreams.items() if new.upstreams.get(n) != spec))
    old_admin = old.config.admin.bind if old.config.admin else None
    new_admin = new.config.admin.bind if new.config.admin else None
    return Changes(
        bind=bind,
        close=close,
        retire=retire,
        workers=old.config.workers != new.config.workers,
        admin=old_admin != new_admin,
    )
