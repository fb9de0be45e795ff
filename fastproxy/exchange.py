"""The per-connection HTTP exchange, as a state machine without I/O.

[pure] Imports ``headers``, ``http1``, ``policy``, ``config``, ``runtime``, ``wsrelay`` and
``errors`` only:
no asyncio, sockets, clock, logging or metrics. The worker's ``ClientProtocol`` is a thin adapter
around ``Exchange``; the fuzzer and the call-budget test drive the very same class, ``fastproxy
explain`` and ``fastproxy test`` run ``admit``, so what they report cannot drift from what the
proxy does.

Theory of operation
-------------------
``admit`` takes a request head as a client leg parsed it, the listener's ``ListenerPlan`` the
request pinned, and what the connection knows (whether its peer is a trusted proxy, its
address), and returns an ``Admission``: either a local answer (``status`` set: 400, 403, 405,
413, or 204 for ``OPTIONS *``), or a forward (``status`` 0) with the upstream to use and the
header list to send. The checks run in one fixed order; the first that refuses decides:

1. the headers (``headers.inspect_request``: framing, Host, NUL) - 400;
2. Host present on HTTP/1.1 (RFC 9112 3.2) - 400 ``bad_host``;
3. the method by one positive rule - 400 ``bad_method``; then the refused methods - 405;
4. Transfer-Encoding on HTTP/1.0, a body on GET or HEAD - 400;
5. the canonical path (``PrefixTable.decide``) - 400 with the refusal's code, 204 for ``OPTIONS *``;
6. an absolute-form target's authority against Host - 400 ``bad_host``;
7. an upgrade: only ``websocket``, only on a ``websocket`` rule, a well-formed handshake;
8. the rule: ``deny`` (403, or ``would_deny`` and forwarded in report mode), a ``rewrite`` only
   for GET and HEAD (405 with Allow), the rule's body limit (413).

``Verdict`` names what happened, for metrics and the access log.

``Exchange`` is one client connection's life as a loop of ``Cycle`` objects (one request and its
response each). It receives events - client bytes, EOF and write-blocking, an upstream connection
ready or failed, its bytes, EOF and write-blocking, its one timer firing - with the current time
passed in where a decision needs it, and acts only through the ``ExchangeIO`` it was given (write
to the client, close, pause reading, open an upstream connection, arm the timer, report a
finished request) and the ``UpstreamConn`` handles that interface hands it. States: ``HEAD``
(scanning for a head), ``UPSTREAM`` (waiting for a connection), ``FORWARD`` (streaming both
ways), ``TUNNEL`` (after a checked 101: the adapter relays WebSocket frames), ``CLOSED``.

Upstream failures (nginx's ``proxy_next_upstream error timeout``): a failed connect is tried
again on another server (the pool has taken the failed one out of its rotation), and so is an
idempotent request without a body whose fresh connection closed before any response byte; at
most ``next_upstream_tries`` attempts in all, and none once the request is
``next_upstream_timeout_s`` old. A pool with no server up answers at once: 503
``no_healthy_upstream``.

Invariants: at most one timer is armed (``timer`` names it); at most one cycle is under way, and
it follows the ``ListenerPlan`` it started with; a request's bytes go upstream only after
``admit`` forwarded it; pipelined requests are answered in order, each from the bytes its
predecessor left (``leg.trailing``); every cycle is reported once through ``finished``.
"""

from __future__ import annotations

import enum
import ipaddress
import json
from collections.abc import Callable, Mapping
from typing import Final, Protocol

from fastproxy.config import UpstreamConfig
from fastproxy.errors import NoHealthyUpstream
from fastproxy.headers import (
    RequestInfo,
    RequestRefused,
    check_websocket_handshake,
    inspect_request,
    response_headers,
    same_authority,
    trusted_request_id,
    upstream_headers,
    valid_method,
)
from fastproxy.http1 import (
    ClientLeg,
    Ev,
    HeadScanner,
    RequestHead,
    ResponseHead,
    UpstreamBroken,
    UpstreamLeg,
    local_response,
)
from fastproxy.policy import Action, Decision, Refusal
from fastproxy.runtime import ListenerPlan
from fastproxy.wsrelay import upgrade_accepted

# Enum members as module constants (``_STATE_HEAD`` for ``State.HEAD``...), the only way this
# module reads them: on CPython 3.11 a member read off its class goes through
# ``EnumType.__getattr__``'s slot wrapper, about four times the cost of a module global, and an
# exchange tests its state and events a few dozen times per request.
_EV_END: Final = Ev.END
_EV_PAUSED: Final = Ev.PAUSED
_ACTION_WEBSOCKET: Final = Action.WEBSOCKET
_ACTION_REDIRECT_HTTPS: Final = Action.REDIRECT_HTTPS
_ACTION_DENY: Final = Action.DENY
_ACTION_REWRITE: Final = Action.REWRITE

#: methods whose body some backends ignore, reading it as the next request ("CL.0")
BODILESS_METHODS = frozenset({b"GET", b"HEAD"})
#: the kind counted and the reason logged for a response the upstream cut off after its head
#: was relayed (no answer of ours can follow it: the client connection is reset)
UPSTREAM_TRUNCATED = "upstream_truncated"
#: the methods a rewritten request (the SPA fallback) may carry
REWRITE_METHODS = frozenset({b"GET", b"HEAD"})
#: the Allow field of a 405 on a rewrite rule (RFC 9110 15.5.6)
REWRITE_ALLOW = b"Allow: GET, HEAD"


class Verdict(enum.Enum):
    """What was done with a request: the ``decision`` label of metrics and the access log."""

    #: forwarded as its canonical path
    FORWARD = "forward"
    #: forwarded as the rule's fixed path
    REWRITE = "rewrite"
    #: forwarded, upgrade allowed
    WEBSOCKET = "websocket"
    #: refused by the policy (403)
    DENY = "deny"
    #: would be refused, forwarded in report mode
    WOULD_DENY = "would_deny"
    #: refused as malformed or over a limit (4xx)
    REJECT = "reject"
    #: answered by fastproxy, not an error (``OPTIONS *``)
    LOCAL = "local"
    #: answered with a 308 to https (``redirect_https``)
    REDIRECT = "redirect"
    #: forwarded, then failed (5xx from fastproxy)
    ERROR = "error"


#: a verdict's label, read once per request (metrics): a dictionary lookup, where the enum's
#: ``value`` property costs ten times as much (an enum with its own ``__init__`` would hold it as
#: an attribute, but mypyc compiles no such enum)
VERDICT_LABEL: Final[dict[Verdict, str]] = {v: v.value for v in Verdict}


_VERDICT_FORWARD: Final = Verdict.FORWARD
_VERDICT_REWRITE: Final = Verdict.REWRITE
_VERDICT_WEBSOCKET: Final = Verdict.WEBSOCKET
_VERDICT_DENY: Final = Verdict.DENY
_VERDICT_WOULD_DENY: Final = Verdict.WOULD_DENY
_VERDICT_REJECT: Final = Verdict.REJECT
_VERDICT_LOCAL: Final = Verdict.LOCAL
_VERDICT_REDIRECT: Final = Verdict.REDIRECT
_VERDICT_ERROR: Final = Verdict.ERROR


class Admission:
    """The outcome of ``admit``: a local answer when ``status`` is set, else a forward."""

    __slots__ = (
        "close",
        "code",
        "decision",
        "field",
        "headers",
        "info",
        "request_id",
        "status",
        "upstream",
        "verdict",
        "websocket",
    )

    def __init__(
        self,
        verdict: Verdict,
        request_id: bytes,
        info: RequestInfo | None,
        decision: Decision | None,
        *,
        status: int = 0,
        code: str = "",
        close: bool = False,
        field: bytes = b"",
    ) -> None:
        self.verdict = verdict
        self.request_id = request_id
        #: what ``inspect_request`` found; None when the headers were refused
        self.info = info
        #: the policy's decision; None when the request was refused before it
        self.decision = decision
        #: the local answer's status (0: forward) and stable error code ("" for a 204)
        self.status = status
        self.code = code
        #: the connection ends after the local answer
        self.close = close
        #: one more header field of the local answer (``Allow`` of a 405, ``Location`` of a
        #: redirect), whole: ``b"Allow: GET, HEAD"``
        self.field = field
        #: forward: the upstream's name, the header list to send, whether it is a handshake
        self.upstream = ""
        self.headers: list[tuple[bytes, bytes]] = []
        self.websocket = False


def admit(
    head: RequestHead,
    plan: ListenerPlan,
    *,
    trusted: bool,
    peer: bytes,
    new_request_id: Callable[[], bytes],
    default_hosts: Mapping[str, bytes],
) -> Admission:
    """Decide what to do with ``head`` on a listener following ``plan``.

    ``trusted``: the peer is in ``trusted_proxies``; ``peer``: its address, for
    X-Forwarded-For; ``new_request_id`` makes an id when the request has no usable one;
    ``default_hosts``: the Host sent to each upstream for an HTTP/1.0 request without one.
    """
    try:
        info = inspect_request(head.headers)
    except RequestRefused as refused:
        return _refuse(new_request_id(), None, None, refused.status, refused.code, close=True)
    request_id = info.request_id
    if not (trusted and request_id is not None and trusted_request_id(request_id)):
        request_id = new_request_id()
    method = head.method
    if info.host is None and head.http_version == b"1.1":
        # RFC 9112 3.2 (h11 checks it too; llhttp does not)
        return _refuse(request_id, info, None, 400, "bad_host", close=True)
    if not valid_method(method):
        # one positive rule, so a method-keyed refusal below holds in every spelling:
        # backends such as Django and Werkzeug upper-case what they get
        return _refuse(request_id, info, None, 400, "bad_method", close=True)
    if method in plan.refused_methods:
        return _refuse(request_id, info, None, 405, "method_not_allowed", close=info.has_body)
    if info.chunked and head.http_version == b"1.0":
        # RFC 9112 6.1: Transfer-Encoding in HTTP/1.0 is faulty framing
        return _refuse(request_id, info, None, 400, "bad_request", close=True)
    if info.has_body and method in BODILESS_METHODS:
        # a backend that ignores GET/HEAD bodies would read this one as the next request
        return _refuse(request_id, info, None, 400, "unexpected_body", close=True)
    decision = plan.table.decide(head.target)
    refusal = decision.refusal
    if refusal is not None:
        if refusal is Refusal.ASTERISK_FORM and method == b"OPTIONS":
            return Admission(
                _VERDICT_LOCAL, request_id, info, decision, status=204, close=info.has_body
            )
        return _refuse(request_id, info, decision, 400, refusal.value, close=True)
    if decision.authority is not None and (
        info.host is None or not same_authority(decision.authority, info.host, plan.default_port)
    ):
        return _refuse(request_id, info, decision, 400, "bad_host", close=True)
    rule = decision.rule
    action = rule.action
    websocket = False
    if info.upgrade:
        if info.upgrade != (b"websocket",):
            return _refuse(request_id, info, decision, 400, "unsupported_upgrade", close=True)
        if action is not _ACTION_WEBSOCKET:
            # closed: a client that asked to leave HTTP may already send the other protocol
            return _refuse(
                request_id,
                info,
                decision,
                403,
                "upgrade_forbidden",
                close=True,
                verdict=_VERDICT_DENY,
            )
        try:
            check_websocket_handshake(method, head.http_version, info)
        except RequestRefused as refused:
            return _refuse(request_id, info, decision, refused.status, refused.code, close=True)
        websocket = True
    if action is _ACTION_REDIRECT_HTTPS:
        return _redirect_https(request_id, info, decision)
    if action is _ACTION_DENY:
        if not plan.report:
            return _refuse(
                request_id,
                info,
                decision,
                403,
                "forbidden",
                close=info.has_body,
                verdict=_VERDICT_DENY,
            )
        verdict = _VERDICT_WOULD_DENY
    elif action is _ACTION_REWRITE:
        if method not in REWRITE_METHODS:
            # a rewrite serves one fixed document (the SPA's index): only reads make sense, as
            # a static file server answers 405 to a POST
            return _refuse(
                request_id,
                info,
                decision,
                405,
                "method_not_allowed",
                close=True,
                field=REWRITE_ALLOW,
            )
        verdict = _VERDICT_REWRITE
    else:
        verdict = _VERDICT_WEBSOCKET if action is _ACTION_WEBSOCKET else _VERDICT_FORWARD
    if info.content_length is not None and info.content_length > rule.max_body_bytes:
        return _refuse(request_id, info, decision, 413, "body_too_large", close=True)
    upstream = rule.upstream or plan.upstream
    host = info.host
    admission = Admission(verdict, request_id, info, decision)
    admission.upstream = upstream
    admission.websocket = websocket
    admission.headers = upstream_headers(
        head.headers,
        info,
        host=default_hosts[upstream] if host is None else host,
        client_ip=peer,
        trusted=trusted,
        proto=plan.scheme,
        request_id=request_id,
        keep=plan.keep_headers,
        websocket=websocket,
        forwarded=plan.forwarded_header,
    )
    return admission


def _redirect_https(request_id: bytes, info: RequestInfo, decision: Decision) -> Admission:
    """308 to the same host (its port replaced by the rule's) and canonical target over https:
    nginx's ``return 308 https://$host$request_uri``. The method and body are kept by a 308."""
    host = decision.authority or info.host
    if host is None:
        # HTTP/1.0 without a Host: there is no name to send the client to
        return _refuse(request_id, info, decision, 400, "bad_host", close=True)
    # the name without the port; an IPv6 literal keeps its brackets
    bracketed = host.startswith(b"[")
    name = host[: host.index(b"]") + 1] if bracketed else host.partition(b":")[0]
    port = decision.rule.https_port
    location = b"Location: https://" + name
    if port != 443:
        location += b":%d" % port
    return Admission(
        _VERDICT_REDIRECT,
        request_id,
        info,
        decision,
        status=308,
        code="https_redirect",
        close=info.has_body,
        field=location + decision.target,
    )


def _refuse(
    request_id: bytes,
    info: RequestInfo | None,
    decision: Decision | None,
    status: int,
    code: str,
    *,
    close: bool,
    field: bytes = b"",
    verdict: Verdict = _VERDICT_REJECT,
) -> Admission:
    return Admission(
        verdict,
        request_id,
        info,
        decision,
        status=status,
        code=code,
        close=close,
        field=field,
    )


# --------------------------------------------------------------------------------------------
# The exchange of one client connection

#: a forwarded request that fastproxy ends up answering itself (502, 504...) is an error
_FAILED_IF_ANSWERED_HERE = frozenset({_VERDICT_FORWARD, _VERDICT_REWRITE, _VERDICT_WEBSOCKET})
#: requests that may be sent again when a pooled connection turns out to be closed
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"})


def _may_try_again(cycle: Cycle, config: UpstreamConfig, now: float) -> bool:
    """Another attempt fits the budget (``next_upstream_tries`` and ``_timeout_s``) and may go
    elsewhere: to another server, or to none (a 503 ``no_healthy_upstream``) once the failed
    one is marked down. The one server of an upstream without checks is never marked down, and
    nginx does not try it twice either."""
    return (
        (len(config.servers) > 1 or config.health is not None)
        and cycle.tries < config.next_upstream_tries
        and now - cycle.start < config.next_upstream_timeout_s
    )


class State(enum.Enum):
    #: waiting for (or scanning) the next request head
    HEAD = "head"
    #: a forward is waiting for an upstream connection
    UPSTREAM = "upstream"
    #: request and response are streaming
    FORWARD = "forward"
    #: WebSocket frames are relayed (by the adapter)
    TUNNEL = "tunnel"
    #: the connection is closing; input is ignored
    CLOSED = "closed"


_STATE_HEAD: Final = State.HEAD
_STATE_UPSTREAM: Final = State.UPSTREAM
_STATE_FORWARD: Final = State.FORWARD
_STATE_TUNNEL: Final = State.TUNNEL
_STATE_CLOSED: Final = State.CLOSED


class Timer(enum.Enum):
    """The one timeout an exchange has armed at a time."""

    #: header timeout (bytes of a head pending) or keep-alive timeout (nothing pending)
    HEAD = "head"
    #: the request is sent; no response head yet
    FIRST_BYTE = "first_byte"
    #: the request body is being read
    BODY = "body"
    #: a response body is being relayed
    UPSTREAM_READ = "upstream_read"


_TIMER_HEAD: Final = Timer.HEAD
_TIMER_FIRST_BYTE: Final = Timer.FIRST_BYTE
_TIMER_BODY: Final = Timer.BODY
_TIMER_UPSTREAM_READ: Final = Timer.UPSTREAM_READ


class UpstreamConn(Protocol):
    """One upstream connection as an exchange uses it (``upstream.UpstreamProtocol``)."""

    #: its reader and request writer
    leg: UpstreamLeg
    #: it carried a request before (a close before any byte may be a stale keep-alive)
    reused: bool
    #: the spec of the pool it came from, pinned with the connection
    config: UpstreamConfig

    def write(self, data: bytes) -> None: ...
    def writelines(self, data: list[bytes]) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def release(self) -> None:
        """The exchange is complete: back to the pool, if it can carry another."""

    def discard(self) -> None:
        """Failed or abandoned mid-exchange: close it."""

    def mark_failed(self) -> None:
        """Its server reset it before any response byte: passive health marks the server."""

    def close(self) -> None: ...


class WorkerView(Protocol):
    """What the connections of one worker share (``worker.WorkerState``)."""

    #: makes the client leg of a cycle (h11 or httptools), given ``max_head_bytes``
    leg_class: Callable[[int], ClientLeg]
    #: the Host sent to each upstream for an HTTP/1.0 request without one
    default_hosts: Mapping[str, bytes]

    def next_request_id(self) -> bytes: ...


class PlanHolder(Protocol):
    """A listener: its current plan, replaced by a reload (``worker.Listener``)."""

    plan: ListenerPlan


class ExchangeIO(Protocol):
    """The effects of an exchange: what the asyncio adapter (or a test's fake) carries out."""

    def write_client(self, data: bytes) -> None: ...
    def writelines_client(self, data: list[bytes]) -> None: ...
    def close_client(self, abort: bool) -> None:
        """Close the client connection: FIN after what was written, or a reset (``abort``)."""

    def set_reading(self, reading: bool) -> None:
        """Resume (True) or pause (False) reading from the client."""

    def open_upstream(self, upstream: str, fresh: bool) -> UpstreamConn | None:
        """A connection to ``upstream`` now, or None and ``upstream_ready`` or
        ``upstream_failed`` follows. ``fresh``: a new connection of the pool the cycle used.
        Raises ``NoHealthyUpstream`` when no server of the pool is up."""

    def arm(self, delay: float) -> None:
        """Call ``timer_fired`` in ``delay`` seconds, replacing the deadline armed before."""

    def cancel_timer(self) -> None: ...
    def soon(self, callback: Callable[[float], None]) -> None:
        """Call ``callback(now)`` on the next loop pass."""

    def finished(self, cycle: Cycle | None, status: int, code: str) -> None:
        """A request ended with ``status`` (None: one that never parsed): count and log it.

        ``code`` is the error code of fastproxy's own answer ("" for a relayed one)."""

    def upstream_error(self, upstream: str, code: str, detail: str) -> None: ...
    def switched(
        self, cycle: Cycle, conn: UpstreamConn, client_rest: bytes, upstream_rest: bytes
    ) -> None:
        """A checked 101 was relayed: the connection is a tunnel from now on."""


def error_response(
    status: int,
    code: str,
    request_id: bytes,
    *,
    close: bool,
    head_only: bool = False,
    field: bytes = b"",
) -> bytes:
    """A whole local answer: ``error_body`` as JSON (none when ``code`` is empty)."""
    return local_response(
        status,
        error_body(code, request_id) if code else b"",
        content_type=b"application/json",
        request_id=request_id,
        close=close,
        head_only=head_only,
        field=field,
    )


def error_body(code: str, request_id: bytes) -> bytes:
    """The JSON body of a local answer; ``request_id`` is visible ASCII."""
    rid = request_id.decode("ascii")
    if '"' in rid or "\\" in rid:
        rid = json.dumps(rid)[1:-1]
    return b'{"error":"%s","request_id":"%s"}' % (code.encode(), rid.encode())


def peer_trusted(peer: bytes, plan: ListenerPlan) -> bool:
    """Whether the client address ``peer`` is in the listener's ``trusted_proxies``."""
    networks = plan.config.trusted_proxies
    if not networks:
        return False
    try:
        address = ipaddress.ip_address(peer.decode())
    except ValueError:
        return False
    return any(address in net for net in networks)


class Cycle:
    """One request/response exchange on a client connection."""

    __slots__ = (
        "body_bytes",
        "decision",
        "head",
        "info",
        "last_body",
        "last_read",
        "leg",
        "plan",
        "request_done",
        "request_id",
        "response_done",
        "response_started",
        "retried",
        "sent_head",
        "served_by",
        "start",
        "status",
        "tries",
        "upstream",
        "upstream_config",
        "upstream_name",
        "upstream_s",
        "upstream_sent",
        "verdict",
        "websocket",
    )

    def __init__(self, leg: ClientLeg, head: RequestHead, start: float, plan: ListenerPlan) -> None:
        self.leg = leg
        self.head = head
        #: when the head was taken (the clock of the events)
        self.start = start
        #: the listener's plan when the request began: the whole exchange follows it
        self.plan = plan
        self.info: RequestInfo | None = None
        self.decision: Decision | None = None
        self.request_id = b""
        self.verdict = _VERDICT_REJECT
        self.status = 0
        self.upstream: UpstreamConn | None = None
        #: the spec of the pool the first connection came from (its timeouts)
        self.upstream_config: UpstreamConfig | None = None
        self.upstream_name = ""
        #: when the request went to the upstream, and the seconds until its response head
        #: (-1: none was read), for ``fastproxy_upstream_response_seconds``
        self.upstream_sent = 0.0
        self.upstream_s = -1.0
        #: the last upstream connection the request went to (the access log's server)
        self.served_by: UpstreamConn | None = None
        self.sent_head: tuple[bytes, bytes, list[tuple[bytes, bytes]]] | None = None
        self.body_bytes = 0
        self.last_read = 0.0
        self.last_body = 0.0
        self.request_done = False
        self.response_started = False
        self.response_done = False
        self.websocket = False
        self.retried = False
        #: attempts on a server so far (another server after a failed connect or a reset)
        self.tries = 1


#: the scanner of every exchange that became a tunnel: a tunnel reads no more heads (the bytes
#: after the 101 were handed over with it), so its own scanner goes; this one holds nothing and,
#: with its zero limits, would refuse any head
_NO_SCANNER = HeadScanner(0, 0, 0)


class Exchange:
    """The HTTP exchange of one client connection: events in, ``ExchangeIO`` calls out."""

    __slots__ = (
        "blocked_since",
        "client_write_blocked",
        "cycle",
        "half_closed",
        "io",
        "listener",
        "peer",
        "pump_yielded",
        "read_paused",
        "scanner",
        "served",
        "state",
        "timer",
        "trust_plan",
        "trusted",
        "upstream_write_blocked",
        "wind_down",
        "worker",
    )

    def __init__(self, io: ExchangeIO, worker: WorkerView, listener: PlanHolder) -> None:
        limits = listener.plan.limits
        self.io = io
        self.worker = worker
        self.listener = listener
        self.scanner = HeadScanner(limits.max_head_bytes, limits.max_headers, limits.max_uri_bytes)
        self.state = _STATE_HEAD
        self.cycle: Cycle | None = None
        #: the client's address, as bytes
        self.peer = b""
        #: the timeout armed (None: none)
        self.timer: Timer | None = None
        self.read_paused = False
        #: a read full of tiny chunks is being worked through a slice per loop pass
        self.pump_yielded = False
        self.upstream_write_blocked = False
        self.client_write_blocked = False
        self.blocked_since = 0.0
        self.trusted = False
        #: the plan ``trusted`` was decided with (a reload may change ``trusted_proxies``)
        self.trust_plan: ListenerPlan | None = None
        #: requests started on this connection
        self.served = 0
        #: the client half-closed after a complete request: answer what it sent, then close
        self.half_closed = False
        #: the worker drains or the listener was removed: the next answer says Connection: close
        self.wind_down = False

    @property
    def idle(self) -> bool:
        """Between requests with nothing of the next one read."""
        return self.state is _STATE_HEAD and not len(self.scanner)

    # ---------------------------------------------------------------- client events

    def open(self, peer: bytes) -> None:
        """The client connected from ``peer`` and is accepted."""
        self.peer = peer
        plan = self.listener.plan
        self.trusted = peer_trusted(peer, plan)
        self.trust_plan = plan
        self._arm(plan.limits.header_timeout_s, _TIMER_HEAD)

    def client_data(self, data: bytes, now: float) -> None:
        state = self.state
        if state is _STATE_HEAD:
            scanner = self.scanner
            first = len(scanner) == 0 and self.cycle is None
            scanner.feed(data)
            self._process(now)
            if first and self.state is _STATE_HEAD and self.cycle is None and len(scanner):
                # the first bytes of a head, not yet all of it: the header timeout replaces the
                # keep-alive one (a head that arrived whole needs no timer of its own)
                self._arm(self.listener.plan.limits.header_timeout_s, _TIMER_HEAD)
        elif state is _STATE_FORWARD or state is _STATE_UPSTREAM:
            cycle = self.cycle
            assert cycle is not None
            cycle.leg.feed(data)
            if state is _STATE_FORWARD:
                self._pump_request(now)
            self._update_reading()

    def client_eof(self) -> bool:
        """The client half-closed; True: keep the connection open to answer what it sent."""
        state = self.state
        cycle = self.cycle
        if (
            (state is _STATE_FORWARD or state is _STATE_UPSTREAM)
            and cycle is not None
            and cycle.request_done
        ):
            # A half-close after a whole request: the answer still goes out (and any complete
            # requests pipelined before the FIN), then the connection closes.
            self.half_closed = True
            return True
        return False

    def client_lost(self) -> None:
        """The client connection is gone."""
        self._cancel_timer()
        connecting = self.state is _STATE_UPSTREAM
        self.state = _STATE_CLOSED
        cycle = self.cycle
        if cycle is not None and cycle.upstream is not None:
            self._drop_upstream(cycle)
            if not cycle.response_done:
                self.io.finished(cycle, 499 if not cycle.status else cycle.status, "")
        elif cycle is not None and connecting:
            # every cycle is reported once, one still waiting for its upstream connection too
            self.io.finished(cycle, 499, "")

    def client_blocked(self, now: float) -> None:
        """The client stopped reading (its write buffer is full)."""
        self.client_write_blocked = True
        self.blocked_since = now
        cycle = self.cycle
        if cycle is not None and cycle.upstream is not None:
            cycle.upstream.pause_reading()

    def client_unblocked(self) -> None:
        self.client_write_blocked = False
        cycle = self.cycle
        if cycle is not None and cycle.upstream is not None:
            cycle.upstream.resume_reading()
        if self.state is _STATE_HEAD:
            # local replies were held back while the client did not read them
            self._update_reading()
            self.io.soon(self._process)

    def close(self, *, abort: bool = False) -> None:
        """End the connection (a reset when ``abort``)."""
        self._cancel_timer()
        self.state = _STATE_CLOSED
        self.io.close_client(abort)

    def abandon(self) -> None:
        """Shutdown, at the deadline: answer a request that has no response yet (503), and
        reset what is still busy. (A tunnel is the adapter's.)"""
        cycle = self.cycle
        if self.state is _STATE_CLOSED:
            return
        if cycle is not None and not cycle.leg.response_started:
            self._local_reply(cycle, 503, "shutting_down", close=True)
        else:
            self.close(abort=True)

    # ---------------------------------------------------------------- timers

    def _arm(self, delay: float, kind: Timer) -> None:
        self.timer = kind
        self.io.arm(delay)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer = None
            self.io.cancel_timer()

    def timer_fired(self, now: float) -> None:
        """The deadline armed last has passed; ``now`` is the clock of the events."""
        kind = self.timer
        if kind is None:
            return
        self.timer = None
        if kind is _TIMER_HEAD:
            self._on_head_timeout()
        elif kind is _TIMER_FIRST_BYTE:
            self._on_upstream_timeout()
        elif kind is _TIMER_BODY:
            self._on_body_timeout(now)
        else:
            self._on_upstream_read_timeout(now)

    def _on_head_timeout(self) -> None:
        """Header timeout (bytes of a head pending) or keep-alive timeout (nothing pending)."""
        if self.state is not _STATE_HEAD:
            return
        if self.client_write_blocked:
            self.close(abort=True)  # it does not even read our replies
            return
        if len(self.scanner) == 0:
            self.close()  # an idle connection: close quietly, as nginx does
            return
        self._local_reply_raw(408, "header_timeout")

    def _on_upstream_read_timeout(self, now: float) -> None:
        """No upstream byte for ``read_timeout_s`` in the middle of a response body."""
        cycle = self.cycle
        if cycle is None or self.state is not _STATE_FORWARD or cycle.response_done:
            return
        assert cycle.upstream_config is not None
        timeout = cycle.upstream_config.read_timeout_s
        if self.client_write_blocked:
            # the client is the slow side: its own send timeout applies, not the upstream's
            send_timeout = cycle.plan.limits.send_timeout_s
            if now - self.blocked_since >= send_timeout:
                self._drop_upstream(cycle)
                self.io.finished(cycle, cycle.status, "")
                self.close(abort=True)
                return
            self._arm(min(timeout, send_timeout), _TIMER_UPSTREAM_READ)
            return
        quiet = now - cycle.last_read
        if quiet < timeout:
            self._arm(timeout - quiet, _TIMER_UPSTREAM_READ)
            return
        self._upstream_failed(cycle, "upstream_timeout", 504)

    def _on_body_timeout(self, now: float) -> None:
        """The request body stalled: the client stopped sending, or the upstream reading."""
        cycle = self.cycle
        if cycle is None or self.state is not _STATE_FORWARD or cycle.request_done:
            return
        timeout = cycle.plan.limits.body_timeout_s
        quiet = now - cycle.last_body
        if quiet < timeout:
            self._arm(timeout - quiet, _TIMER_BODY)
            return
        if self.upstream_write_blocked:
            self._upstream_failed(cycle, "upstream_timeout", 504)
            return
        self._drop_upstream(cycle)
        if cycle.response_started:
            self.io.finished(cycle, cycle.status, "")
            self.close(abort=True)
        else:
            self._local_reply(cycle, 408, "body_timeout", close=True)

    def _on_upstream_timeout(self) -> None:
        cycle = self.cycle
        if cycle is None or self.state is not _STATE_FORWARD or cycle.response_started:
            return
        self._upstream_failed(cycle, "upstream_timeout", 504)

    # ---------------------------------------------------------------- reading control

    def _update_reading(self) -> None:
        """Read from the client only while its bytes can go somewhere.

        Paused while the upstream cannot take more, while waiting for an upstream connection,
        and once bytes arrive after the complete request (pipelined requests: they wait in the
        kernel until this cycle ends, so buffering stays bounded by one read). Reading is not
        paused merely because the request is complete: on a keep-alive connection that would
        cost two reading-state changes per request.
        """
        cycle = self.cycle
        want_pause = (
            self.pump_yielded
            or self.upstream_write_blocked
            or (self.client_write_blocked and self.state is _STATE_HEAD)
            or (
                cycle is not None
                and (
                    self.state is _STATE_UPSTREAM
                    or (cycle.request_done and len(cycle.leg.trailing) > 0)
                )
            )
        )
        if want_pause and not self.read_paused:
            self.read_paused = True
            self.io.set_reading(False)
        elif not want_pause and self.read_paused:
            self.read_paused = False
            self.io.set_reading(True)

    def upstream_blocked(self) -> None:
        """The upstream stopped reading (its write buffer is full)."""
        self.upstream_write_blocked = True
        self._update_reading()

    def upstream_unblocked(self) -> None:
        self.upstream_write_blocked = False
        self._update_reading()

    # ---------------------------------------------------------------- request cycle

    def _process(self, now: float) -> None:
        """Start as many cycles as the buffered bytes allow (pipelining, answered in order)."""
        while self.state is _STATE_HEAD:
            if self.client_write_blocked:
                # answers pile up unread: stop here, client_unblocked() starts again
                self._update_reading()
                return
            try:
                taken = self.scanner.maybe_take_head()
            except RequestRefused as refused:
                self._local_reply_raw(refused.status, refused.code)
                return
            if taken is None:
                if self.half_closed:
                    self.close()  # the client half-closed: nothing more can arrive
                return
            head_bytes, rest = taken
            plan = self.listener.plan
            leg = self.worker.leg_class(plan.limits.max_head_bytes)
            try:
                leg.feed_head(head_bytes)
                if rest:
                    leg.feed(rest)
                event = leg.next_event()
            except RequestRefused as refused:
                self._local_reply_raw(refused.status, refused.code)
                return
            assert isinstance(event, RequestHead)
            # The keep-alive (or header) timer stays armed: what follows arms the next one in
            # its place (first byte, body, or the next keep-alive), or cancels it (a close, a
            # wait for a connect); one timer call per request instead of two.
            cycle = Cycle(leg, event, now, plan)
            self.served += 1
            self.cycle = cycle
            self._start(cycle, now)

    def _start(self, cycle: Cycle, now: float) -> None:
        plan = cycle.plan
        if plan is not self.trust_plan:  # a reload: trusted_proxies may have changed
            self.trusted = peer_trusted(self.peer, plan)
            self.trust_plan = plan
        worker = self.worker
        admission = admit(
            cycle.head,
            plan,
            trusted=self.trusted,
            peer=self.peer,
            new_request_id=worker.next_request_id,
            default_hosts=worker.default_hosts,
        )
        cycle.info = admission.info
        cycle.request_id = admission.request_id
        cycle.decision = decision = admission.decision
        cycle.verdict = admission.verdict
        if admission.status:
            self._local_reply(
                cycle,
                admission.status,
                admission.code,
                close=admission.close,
                field=admission.field,
            )
            return
        assert decision is not None
        cycle.websocket = admission.websocket
        cycle.upstream_name = admission.upstream
        cycle.sent_head = (cycle.head.method, decision.target, admission.headers)
        self._acquire(cycle, False, now)

    def _acquire(self, cycle: Cycle, fresh: bool, now: float) -> None:
        self.state = _STATE_UPSTREAM
        try:
            conn = self.io.open_upstream(cycle.upstream_name, fresh)
        except NoHealthyUpstream as no_server:
            self.io.upstream_error(cycle.upstream_name, no_server.code, "")
            self._local_reply(cycle, 503, no_server.code, close=True)
            return
        if conn is not None:
            self.upstream_ready(conn, now)
        else:
            self._cancel_timer()  # the connect has its own timeout
            self._update_reading()

    # ---------------------------------------------------------------- upstream events

    def upstream_ready(self, conn: UpstreamConn, now: float) -> None:
        cycle = self.cycle
        if self.state is not _STATE_UPSTREAM or cycle is None or cycle.sent_head is None:
            # the client went away while we were connecting
            conn.release()
            return
        cycle.upstream = cycle.served_by = conn
        if cycle.upstream_config is None:
            cycle.upstream_config = conn.config
        self.state = _STATE_FORWARD
        if self.client_write_blocked:
            conn.pause_reading()
        method, target, headers = cycle.sent_head
        info = cycle.info
        assert info is not None
        # upstream_headers framed a chunked body as chunked, and nothing else
        conn.write(conn.leg.request(method, target, headers, chunked=info.chunked))
        cycle.upstream_sent = now
        if cycle.request_done:
            # a retry: the body-less request was read completely on the first attempt
            end = conn.leg.end()
            if end:
                conn.write(end)
            self._arm(conn.config.first_byte_timeout_s, _TIMER_FIRST_BYTE)
            return
        self._pump_request(now)
        if self.state is _STATE_FORWARD:
            if not cycle.request_done:
                cycle.last_body = now
                self._arm(cycle.plan.limits.body_timeout_s, _TIMER_BODY)
            self._update_reading()

    def upstream_failed(self, code: str, config: UpstreamConfig, now: float) -> None:
        """No connection could be made (``upstream_failed`` or ``upstream_timeout``) to a
        server of the pool whose spec is ``config``: another server, once, if the budget allows
        (no byte of the request went out, so any request may go again)."""
        cycle = self.cycle
        if self.state is not _STATE_UPSTREAM or cycle is None:
            return
        self.io.upstream_error(cycle.upstream_name, code, "")
        if _may_try_again(cycle, config, now):
            cycle.tries += 1
            self._acquire(cycle, True, now)
            return
        self._local_reply(cycle, 504 if code == "upstream_timeout" else 502, code, close=True)

    def upstream_data(self, data: bytes, now: float) -> None:
        """Bytes from the upstream (``b""``: its EOF, already fed to the leg)."""
        cycle = self.cycle
        if cycle is None or cycle.upstream is None:
            return
        if data:
            cycle.upstream.leg.feed(data)
            cycle.last_read = now
        self._pump_response(cycle, now)

    def upstream_lost(self, now: float) -> None:
        cycle = self.cycle
        if cycle is None or cycle.upstream is None or self.state is not _STATE_FORWARD:
            return
        cycle.upstream.leg.feed_eof()
        self._pump_response(cycle, now)
        if self.state is _STATE_FORWARD and not cycle.response_done and cycle.upstream is not None:
            self._upstream_broke(cycle, now, "closed before a complete response")

    def _upstream_broke(self, cycle: Cycle, now: float, detail: str) -> None:
        """The upstream closed, or broke HTTP, before a complete response."""
        conn = cycle.upstream
        self._drop_upstream(cycle)
        info = cycle.info
        if (
            conn is not None
            and conn.reused
            and not conn.leg.received_any
            and not cycle.response_started
            and not cycle.retried
            and info is not None
            and not info.has_body
            and cycle.head.method in IDEMPOTENT_METHODS
        ):
            # A keep-alive connection the backend closed while it sat idle in the pool: the
            # request cannot have been processed, so it is sent once more on a new connection
            # (nginx's proxy_next_upstream for idempotent requests).
            cycle.retried = True
            self._acquire(cycle, True, now)
            return
        if conn is not None and not conn.reused and not conn.leg.received_any:
            # a fresh connection the server reset or closed before any byte: the server, not a
            # stale keep-alive, failed; an idempotent body-less request goes to another one
            conn.mark_failed()
            if (
                not cycle.response_started
                and info is not None
                and not info.has_body
                and cycle.head.method in IDEMPOTENT_METHODS
                and _may_try_again(cycle, conn.config, now)
            ):
                self.io.upstream_error(cycle.upstream_name, "upstream_failed", detail)
                cycle.tries += 1
                self._acquire(cycle, True, now)
                return
        self._upstream_failed(cycle, "upstream_failed", 502, detail)

    def _upstream_failed(self, cycle: Cycle, code: str, status: int, detail: str = "") -> None:
        if cycle.response_started and code == "upstream_failed":
            code = UPSTREAM_TRUNCATED
        self.io.upstream_error(cycle.upstream_name, code, detail)
        if cycle.upstream is not None:
            self._drop_upstream(cycle)
        if cycle.response_started:
            # The head went out: the client sees the response end early (a reset). Reported
            # as the upstream's failure (502, or 504 for a stall), never as the status its
            # head carried.
            cycle.verdict = _VERDICT_ERROR
            self.io.finished(cycle, status, code)
            self.close(abort=True)
        else:
            self._local_reply(cycle, status, code, close=True)

    def _drop_upstream(self, cycle: Cycle) -> None:
        conn = cycle.upstream
        cycle.upstream = None
        self.upstream_write_blocked = False
        if conn is not None:
            conn.discard()

    # ---------------------------------------------------------------- streaming

    def _pump_request(self, now: float) -> None:
        """Move parsed request body events from the client to the upstream."""
        cycle = self.cycle
        assert cycle is not None
        conn = cycle.upstream
        if conn is None or cycle.request_done:
            return
        leg = cycle.leg
        limit = cycle.decision.rule.max_body_bytes if cycle.decision else 0
        while True:
            try:
                event = leg.next_event()
            except RequestRefused as refused:
                self._drop_upstream(cycle)
                if cycle.response_started:
                    self.close(abort=True)
                else:
                    self._local_reply(cycle, refused.status, refused.code, close=True)
                return
            if type(event) is bytes:
                cycle.body_bytes += len(event)
                cycle.last_body = now
                if cycle.body_bytes > limit:
                    self._drop_upstream(cycle)
                    if cycle.response_started:
                        self.close(abort=True)
                    else:
                        self._local_reply(cycle, 413, "body_too_large", close=True)
                    return
                conn.writelines(conn.leg.body(event))
                if leg.capped:
                    # a read of many tiny chunks: one slice per loop pass, so that other
                    # connections of this worker are served in between (SPEC 7)
                    self.pump_yielded = True
                    self._update_reading()
                    self.io.soon(self._resume_request_pump)
                    return
            elif event is _EV_END:
                end = conn.leg.end()
                if end:  # the last chunk; nothing after a Content-Length body
                    conn.write(end)
                cycle.request_done = True
                if not cycle.response_started:
                    self.timer = _TIMER_FIRST_BYTE  # _arm, inline: once per request
                    self.io.arm(conn.config.first_byte_timeout_s)
                if cycle.response_done:
                    self._finish_cycle(cycle)
                return
            else:
                return  # NEED_DATA or PAUSED

    def _resume_request_pump(self, now: float) -> None:
        self.pump_yielded = False
        if self.state is _STATE_FORWARD and self.cycle is not None:
            self._pump_request(now)
        if self.state is not _STATE_CLOSED and not self.pump_yielded:
            self._update_reading()

    def _yield_response_pump(self, cycle: Cycle, conn: UpstreamConn) -> None:
        conn.pause_reading()

        def resume(now: float) -> None:
            if cycle is not self.cycle or cycle.upstream is None:
                return
            if self.state is not _STATE_FORWARD:
                return
            if not self.client_write_blocked:
                cycle.upstream.resume_reading()
            self._pump_response(cycle, now)

        self.io.soon(resume)

    def _pump_response(self, cycle: Cycle, now: float) -> None:
        """Move parsed response events from the upstream to the client.

        What one call produces (typically head, body and end together) is written with one
        ``writelines``: one system call per response instead of one per event.
        """
        conn = cycle.upstream
        if conn is None:
            return
        leg = conn.leg
        client_leg = cycle.leg
        out: list[bytes] = []
        # the final head is in ``out``, not yet written: a failure now can still be a 502
        head_unsent = False
        while True:
            try:
                event = leg.next_event()
                if event is _EV_END and head_unsent and leg.overrun:
                    # the whole response and bytes after it came in one read: refused like
                    # the bytes after a response without a body (a second response appended)
                    raise UpstreamBroken("bytes after the complete response")
            except UpstreamBroken as broken:
                if head_unsent:
                    cycle.response_started = False
                    client_leg.discard_response_head()
                self._upstream_broke(cycle, now, str(broken))
                return
            try:
                if type(event) is bytes:
                    out += client_leg.body(event)
                    if leg.capped:
                        # a read of many tiny chunks: one slice per loop pass (SPEC 7)
                        if out:
                            self.io.writelines_client(out)
                        self._yield_response_pump(cycle, conn)
                        return
                    continue
                if type(event) is ResponseHead:
                    if event.status == 101:
                        if out:
                            self.io.writelines_client(out)
                        self._switch(cycle, conn, event)
                        return
                    out.append(self._response_head(cycle, event, now))
                    head_unsent = cycle.response_started
                    continue
                if event is _EV_END:
                    out.append(client_leg.end())
            except UpstreamBroken as broken:  # the body disagrees with the Content-Length relayed
                self._upstream_failed(cycle, "upstream_failed", 502, str(broken))
                return
            if out:
                self.io.writelines_client(out)
            if event is not _EV_END:
                if (
                    cycle.response_started
                    and self.timer is not _TIMER_UPSTREAM_READ
                    and self.state is _STATE_FORWARD
                ):
                    # in place of the first-byte (or body) timer
                    self._arm(conn.config.read_timeout_s, _TIMER_UPSTREAM_READ)
                return  # NEED_DATA, PAUSED, SWITCHED
            cycle.response_done = True
            if cycle.request_done:
                self._finish_cycle(cycle)
            else:
                # the upstream answered before the request body ended: the rest of the
                # body cannot be resynchronised, so this connection ends here
                self.io.finished(cycle, cycle.status, "")
                self._drop_upstream(cycle)
                self.close()
            return

    def _response_head(self, cycle: Cycle, event: ResponseHead, now: float) -> bytes:
        """The bytes of a relayed response head (``b""`` for a 1xx that is not relayed)."""
        status = event.status
        if status < 200:
            if status == 100 and not cycle.request_done:
                headers = response_headers(event.headers, request_id=cycle.request_id)
                return cycle.leg.response_head(100, headers, event.reason)
            return b""
        cycle.status = status
        cycle.response_started = True
        cycle.upstream_s = now - cycle.upstream_sent
        upstream = cycle.upstream
        assert upstream is not None
        cycle.last_read = now
        # The first-byte timer is done, but it stays armed: the read timer takes its place
        # only if the body goes on after this read (_pump_response), and a response complete
        # in this read has the keep-alive timer take its place (_read_next), so a small
        # response costs no timer call of its own.
        lines = event.relayed
        lines.append(b"X-Request-Id: " + cycle.request_id)
        return cycle.leg.response_head_lines(
            status,
            lines,
            event.reason,
            length=upstream.leg.declared_length,
            close=self.wind_down,
        )

    def _switch(self, cycle: Cycle, conn: UpstreamConn, event: ResponseHead) -> None:
        """A 101: relay it and become a tunnel, if it accepts the handshake that was sent."""
        info = cycle.info
        assert info is not None
        if (
            not cycle.websocket
            or info.ws_key is None
            or not upgrade_accepted(info.ws_key, event.headers)
        ):
            self._upstream_failed(cycle, "upstream_failed", 502, "101 not accepting the handshake")
            return
        self._cancel_timer()
        cycle.status = 101
        cycle.response_started = True
        headers = response_headers(event.headers, request_id=cycle.request_id, keep_upgrade=True)
        self.io.write_client(cycle.leg.response_head(101, headers, event.reason))
        client_rest = cycle.leg.trailing
        upstream_rest = conn.leg.trailing
        self.io.finished(cycle, 101, "")
        cycle.upstream = None
        self.cycle = None
        self.state = _STATE_TUNNEL
        self.scanner = _NO_SCANNER
        self.io.switched(cycle, conn, client_rest, upstream_rest)

    def _finish_cycle(self, cycle: Cycle) -> None:
        """Both messages are complete: recycle the upstream, then read the next request.

        The timer armed for this cycle is left to ``close`` to cancel or to ``_read_next`` to
        replace with the keep-alive timer."""
        conn = cycle.upstream
        cycle.upstream = None
        self.upstream_write_blocked = False
        if conn is not None:
            if conn.leg.overrun:
                # Bytes after a complete response, found once it was relayed: the upstream is
                # out of step (a second response appended). The pool drops the connection, and
                # this client's connection ends with this response, so nothing read after it
                # can ever be taken for the answer to a later request.
                cycle.leg.close_after_response()
            conn.release()
        self.io.finished(cycle, cycle.status, "")
        self.cycle = None
        if self.state is _STATE_CLOSED:
            return
        # Draining, a response sent without Connection: close (it started before the drain)
        # leaves the client free to send another request: that one is read and answered
        # with Connection: close; a quiet connection is closed by the drain itself.
        if not cycle.leg.keep_alive:
            self.close()
            return
        if self._read_next(cycle):
            # pipelined bytes: parse them on the next loop pass (no recursion per request)
            self.io.soon(self._process)

    def _read_next(self, cycle: Cycle) -> bool:
        """Hand the bytes after ``cycle`` back to the scanner and wait for the next head; True
        when bytes of it are there already (pipelined)."""
        rest = cycle.leg.trailing
        self.state = _STATE_HEAD
        plan = self.listener.plan
        limits = plan.limits
        if plan is not cycle.plan:  # a reload: the next head is read with the new limits
            scanner = self.scanner
            scanner.max_head_bytes = limits.max_head_bytes
            scanner.max_headers = limits.max_headers
            scanner.max_uri_bytes = limits.max_uri_bytes
        # (_arm, inline: once per request; in place of the cycle's timer)
        if rest:
            # the scanner handed everything it held to the cycle's leg: ``rest`` is all of it
            self.scanner.feed(rest)
            self.timer = _TIMER_HEAD
            self.io.arm(limits.header_timeout_s)
        elif self.half_closed:
            self.close()  # half-closed and everything it sent is answered
            return False
        else:
            self.timer = _TIMER_HEAD
            self.io.arm(limits.keepalive_timeout_s)
        # _update_reading, unless nothing it looks at without a cycle is set (as it is on a
        # keep-alive connection between requests): reading goes on as it was
        if (
            self.read_paused
            or self.pump_yielded
            or self.upstream_write_blocked
            or self.client_write_blocked
        ):
            self._update_reading()
        return bool(rest)

    # ---------------------------------------------------------------- local replies

    def _local_reply(
        self, cycle: Cycle, status: int, code: str, *, close: bool, field: bytes = b""
    ) -> None:
        """Answer ``cycle`` ourselves with a small JSON body; never echoes client input."""
        if cycle.upstream is not None:
            self._drop_upstream(cycle)
        cycle.status = status
        if cycle.verdict in _FAILED_IF_ANSWERED_HERE:
            cycle.verdict = _VERDICT_ERROR
        info = cycle.info
        if (
            cycle.head.http_version != b"1.1"
            or info is None
            or b"close" in info.connection
            or self.wind_down
        ):
            close = True
        if not close:
            # the request has no body; read its end so the next request can follow
            try:
                event = cycle.leg.next_event()
            except RequestRefused:
                close = True
            else:
                close = event is not _EV_END and event is not _EV_PAUSED
        if cycle.leg.response_started:
            self.io.finished(cycle, status, code)
            self.close(abort=True)
            return
        head_only = cycle.head.method == b"HEAD"
        self._write_reply(
            status, code, cycle.request_id, close=close, head_only=head_only, field=field
        )
        self.io.finished(cycle, status, code)
        self.cycle = None
        if close:
            self.close()
            return
        self._read_next(cycle)

    def _local_reply_raw(self, status: int, code: str) -> None:
        """Answer a request that never parsed, then close."""
        self._cancel_timer()
        request_id = self.worker.next_request_id()
        self._write_reply(status, code, request_id, close=True, head_only=False)
        self.io.finished(None, status, code)
        self.close()

    def _write_reply(
        self,
        status: int,
        code: str,
        request_id: bytes,
        *,
        close: bool,
        head_only: bool,
        field: bytes = b"",
    ) -> None:
        self.io.write_client(
            error_response(status, code, request_id, close=close, head_only=head_only, field=field)
        )
