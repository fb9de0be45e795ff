"""What fastproxy does with one parsed request: forward it, or answer it itself.

[pure] Imports ``headers``, ``policy``, ``runtime`` and ``http1`` only: no asyncio, sockets,
clock, logging or metrics. The worker runs it for every request; the fuzzer, the call-budget
test, ``fastproxy explain`` and ``fastproxy test`` run the very same function, so what they
report cannot drift from what the proxy does.

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
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping

from fastproxy.headers import (
    RequestInfo,
    RequestRefused,
    check_websocket_handshake,
    inspect_request,
    same_authority,
    trusted_request_id,
    upstream_headers,
    valid_method,
)
from fastproxy.http1 import RequestHead
from fastproxy.policy import Action, Decision, Refusal
from fastproxy.runtime import ListenerPlan

#: methods whose body some backends ignore, reading it as the next request ("CL.0")
BODILESS_METHODS = frozenset({b"GET", b"HEAD"})
#: the methods a rewritten request (the SPA fallback) may carry
REWRITE_METHODS = frozenset({b"GET", b"HEAD"})
#: the Allow header of a 405 on a rewrite rule (RFC 9110 15.5.6)
REWRITE_ALLOW = b"GET, HEAD"


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
    #: forwarded, then failed (5xx from fastproxy)
    ERROR = "error"


DENY = Verdict.DENY


class Admission:
    """The outcome of ``admit``: a local answer when ``status`` is set, else a forward."""

    __slots__ = (
        "allow",
        "close",
        "code",
        "decision",
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
        allow: bytes = b"",
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
        #: the Allow header of a 405, if any
        self.allow = allow
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
                Verdict.LOCAL, request_id, info, decision, status=204, close=info.has_body
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
        if action is not Action.WEBSOCKET:
            # closed: a client that asked to leave HTTP may already send the other protocol
            return _refuse(
                request_id, info, decision, 403, "upgrade_forbidden", close=True, verdict=DENY
            )
        try:
            check_websocket_handshake(method, head.http_version, info)
        except RequestRefused as refused:
            return _refuse(request_id, info, decision, refused.status, refused.code, close=True)
        websocket = True
    if action is Action.DENY:
        if not plan.report:
            return _refuse(
                request_id, info, decision, 403, "forbidden", close=info.has_body, verdict=DENY
            )
        verdict = Verdict.WOULD_DENY
    elif action is Action.REWRITE:
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
                allow=REWRITE_ALLOW,
            )
        verdict = Verdict.REWRITE
    else:
        verdict = Verdict.WEBSOCKET if action is Action.WEBSOCKET else Verdict.FORWARD
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


def _refuse(
    request_id: bytes,
    info: RequestInfo | None,
    decision: Decision | None,
    status: int,
    code: str,
    *,
    close: bool,
    allow: bytes = b"",
    verdict: Verdict = Verdict.REJECT,
) -> Admission:
    return Admission(
        verdict,
        request_id,
        info,
        decision,
        status=status,
        code=code,
        close=close,
        allow=allow,
    )
