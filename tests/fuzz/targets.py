"""The fuzz target: the bytes of one client connection, driven through the client leg as a worker
drives them, with the invariants that must hold whatever the bytes are.

``one_input(data)`` plays ``data`` into a model of ``worker.ClientProtocol`` once per listener
of the built-in Cobrowse preset (``sdk``: deny fallback; ``agent``: rewrite to ``/index.html``).
The model calls the same pure functions in the same order as the worker — ``HeadScanner.feed``
and ``maybe_take_head``, a fresh ``ServerLeg`` per request, ``inspect_request``, the refused
methods, ``PrefixTable.decide``, the absolute-form Host check, the WebSocket checks, the body
limit, ``upstream_headers`` and the ``UpstreamLeg`` that writes the request upstream — and
catches ``RequestRefused`` only where the worker does. Any other exception is one that the
worker would let escape from a transport callback: a bug.

Invariants (an ``AssertionError`` names the one broken):

- The scanner never holds more than ``max_head_bytes`` while waiting for the end of a head, and
  never hands over a head, a target or a header count over the limits; a first head over the
  size limit is refused with 414 or 431 (400 when it also has a bare CR or LF), never accepted.
- A head the scanner accepts is parsed by h11 into a request or refused: the worker asserts as
  much before it starts a cycle.
- An accepted target is canonical: its path is its own ``canonicalize`` image, made only of
  clean bytes (no dot segment, no ``//``, escapes upper-case and never of an unreserved, a
  separator, a control or a non-ASCII byte), its query is the client's, byte for byte; the rule
  is the longest matching prefix; deciding the forwarded target again gives the same rule and
  the same target. The agent's rewrite fallback forwards ``/index.html`` plus the query.
- What is written upstream parses back (h11, as a strict backend) as exactly one request, with
  the decided target, the client's body, one Host, and no hop-by-hop or override header that
  should have been removed: nothing is smuggled in or behind it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import h11

from fastproxy.config import Limits, ListenerConfig, load_config
from fastproxy.exchange import admit
from fastproxy.headers import (
    FORWARDING_HEADERS,
    RequestInfo,
    RequestRefused,
    fold,
    is_provenance,
    valid_method,
)
from fastproxy.http1 import Ev, HeadScanner, RequestHead, ServerLeg, UpstreamLeg
from fastproxy.policy import Action, Decision, PrefixTable, Rule, canonicalize
from fastproxy.runtime import ListenerPlan, Snapshot

__all__ = [
    "LISTENERS",
    "Exchange",
    "Listener",
    "Transcript",
    "admit",
    "check_decision",
    "drive",
    "one_input",
]

CLIENT_IP = b"127.0.0.1"
#: statuses fastproxy itself may answer on the client leg before any upstream is involved
LOCAL_STATUSES = frozenset({204, 400, 403, 405, 413, 414, 431})
#: what the model answers for every forwarded request (the upstream's response is out of scope)
UPSTREAM_STATUS = 200

_UNRESERVED = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
#: bytes a canonical path may hold: pchar without ";" (refused), plus "/" and "%" (escapes)
CLEAN_PATH_BYTES = _UNRESERVED + b"!$&'()*+,=:@/%"
#: bytes a forwarded query may hold: visible ASCII without "#"
CLEAN_QUERY_BYTES = bytes(range(0x21, 0x7F)).replace(b"#", b"")
_HEX_UPPER = b"0123456789ABCDEF"
_HEX_ANY = b"0123456789ABCDEFabcdef"
#: headers that must never reach the upstream as the client sent them (RFC 9110 7.6.1)
_NEVER_FORWARDED = frozenset(
    {b"te", b"trailer", b"keep-alive", b"proxy-connection", b"proxy-authorization"}
)
#: headers fastproxy writes itself, whatever Connection names
_REBUILT = FORWARDING_HEADERS | {b"host", b"content-length", b"transfer-encoding"}
_WEBSOCKET_PAIR = frozenset({b"connection", b"upgrade"})


@dataclass(frozen=True, slots=True)
class Listener:
    """One listener of the preset as the worker runs it: its ``runtime.ListenerPlan``."""

    name: str
    plan: ListenerPlan
    table: PrefixTable
    limits: Limits
    refused_methods: frozenset[bytes]
    keep_headers: frozenset[bytes]

    @classmethod
    def from_config(cls, config: ListenerConfig) -> Listener:
        plan = ListenerPlan.build(config)
        return cls(
            name=config.name,
            plan=plan,
            table=plan.table,
            limits=plan.limits,
            refused_methods=plan.refused_methods,
            keep_headers=plan.keep_headers,
        )


_PRESET = load_config(None)
SDK = Listener.from_config(_PRESET.listeners["sdk"])
AGENT = Listener.from_config(_PRESET.listeners["agent"])
LISTENERS: tuple[Listener, ...] = (SDK, AGENT)
#: the Host the worker sends for an HTTP/1.0 request without one
DEFAULT_HOSTS = Snapshot.build(_PRESET, 1).default_hosts


@dataclass(frozen=True, slots=True)
class Exchange:
    """One request as the client leg ended it: answered locally, or forwarded upstream."""

    status: int
    code: str
    #: the rule name, "" when no decision was made
    rule: str = ""
    #: the request head written upstream, empty for a local answer
    upstream_head: bytes = b""
    #: the request body forwarded (its chunk framing depends on the reads, so not compared)
    body: bytes = b""


@dataclass(slots=True)
class Transcript:
    """Everything one connection did, in order; ``state`` is where it stopped."""

    exchanges: list[Exchange] = field(default_factory=list)
    #: "closed", "head" (waiting for more of a head; ``buffered`` bytes held) or "body"
    state: str = "head"
    buffered: int = 0


@dataclass(slots=True)
class _Forward:
    """A request being forwarded: its client leg, what was decided, what went upstream."""

    leg: ServerLeg
    head: RequestHead
    decision: Decision
    websocket: bool
    upstream: UpstreamLeg
    wire: list[bytes]
    body: bytearray = field(default_factory=bytearray)


class ClientModel:
    """The client leg of ``worker.ClientProtocol``, minus sockets, timers and the upstream."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        limits = listener.limits
        self.scanner = HeadScanner(limits.max_head_bytes, limits.max_headers, limits.max_uri_bytes)
        self.forward: _Forward | None = None
        self.transcript = Transcript()
        self.closed = False
        #: what ``inspect_request`` found in the request in progress
        self.info: RequestInfo | None = None
        self._request_ids = 0

    # -- transport callbacks

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.forward is not None:
            self.forward.leg.feed(data)
            self._pump_request()
        else:
            self.scanner.feed(data)
        self._process()

    def finish(self) -> Transcript:
        """The client stops sending (the worker would wait for a timeout or the EOF)."""
        transcript = self.transcript
        if self.closed:
            transcript.state = "closed"
        elif self.forward is not None:
            transcript.state = "body"
        else:
            transcript.state = "head"
            transcript.buffered = len(self.scanner)
        return transcript

    # -- request cycle (worker._process and worker._start)

    def _process(self) -> None:
        limits = self.listener.limits
        while not self.closed and self.forward is None:
            try:
                taken = self.scanner.maybe_take_head()
            except RequestRefused as refused:
                self._reply_raw(refused.status, refused.code)
                return
            if taken is None:
                assert len(self.scanner) <= limits.max_head_bytes, (
                    f"the scanner holds {len(self.scanner)} bytes of an unfinished head"
                )
                return
            head_bytes, rest = taken
            assert len(head_bytes) <= limits.max_head_bytes, (
                f"accepted a head of {len(head_bytes)} bytes"
            )
            leg = ServerLeg(limits.max_head_bytes)
            try:
                leg.feed_head(head_bytes)
                if rest:
                    leg.feed(rest)
                event = leg.next_event()
            except RequestRefused as refused:
                self._reply_raw(refused.status, refused.code)
                return
            # worker._process asserts this before it starts a cycle
            assert isinstance(event, RequestHead), f"a checked head parsed as {event!r}"
            assert len(event.target) <= limits.max_uri_bytes, (
                f"accepted a target of {len(event.target)} bytes"
            )
            assert len(event.headers) <= limits.max_headers, (
                f"accepted {len(event.headers)} header fields"
            )
            self._start(leg, event, head_bytes)

    def _start(self, leg: ServerLeg, head: RequestHead, raw_head: bytes) -> None:
        """``worker._start``: the very ``exchange.admit`` the worker runs, then its checks."""
        listener = self.listener
        self._request_ids += 1
        admission = admit(
            head,
            listener.plan,
            trusted=False,
            peer=CLIENT_IP,
            new_request_id=lambda: b"fuzz-%d" % self._request_ids,
            default_hosts=DEFAULT_HOSTS,
        )
        info = self.info = admission.info
        decision = admission.decision
        rule = decision.rule if decision is not None and decision.refusal is None else None
        if decision is not None:
            if decision.refusal is not None:
                check_refusal(listener.table, decision)
            else:
                check_decision(listener.table, head.target, decision)
        if admission.status:
            self._reply(
                leg, head, admission.status, admission.code, close=admission.close, rule=rule
            )
            return
        assert info is not None and decision is not None and rule is not None
        # invariants of a forward, checked here against the request as the client sent it
        assert valid_method(head.method), head.method
        assert head.method not in listener.refused_methods, head.method
        assert not (info.has_body and head.method in (b"GET", b"HEAD")), head.method
        assert info.host is not None or head.http_version == b"1.0"
        assert rule.action is not Action.DENY  # the preset listeners enforce
        assert rule.action is not Action.REWRITE or head.method in (b"GET", b"HEAD")
        headers = admission.headers
        websocket = admission.websocket
        check_upstream_headers(headers, info, websocket=websocket, listener=listener)
        check_raw_framing(raw_head)
        upstream = UpstreamLeg()
        wire = [upstream.request(head.method, decision.target, headers)]
        self.forward = _Forward(leg, head, decision, websocket, upstream, wire)
        self._pump_request()

    # -- worker._pump_request, and the end of a forwarded cycle

    def _pump_request(self) -> None:
        forward = self.forward
        assert forward is not None
        rule = forward.decision.rule
        while True:
            try:
                event = forward.leg.next_event()
            except RequestRefused as refused:
                self.forward = None
                self._reply(
                    forward.leg, forward.head, refused.status, refused.code, close=True, rule=rule
                )
                return
            if type(event) is bytes:
                forward.body += event
                if len(forward.body) > rule.max_body_bytes:
                    self.forward = None
                    self._reply(
                        forward.leg, forward.head, 413, "body_too_large", close=True, rule=rule
                    )
                    return
                forward.wire.extend(forward.upstream.body(event))
            elif event is Ev.END:
                forward.wire.append(forward.upstream.end())
                self._forwarded(forward)
                return
            else:
                return  # NEED_DATA (PAUSED comes only after END)

    def _forwarded(self, forward: _Forward) -> None:
        self.forward = None
        wire = b"".join(forward.wire)
        check_upstream_request(wire, forward.head.method, forward.decision, bytes(forward.body))
        self.transcript.exchanges.append(
            Exchange(
                UPSTREAM_STATUS,
                "",
                forward.decision.rule.name,
                forward.wire[0],
                bytes(forward.body),
            )
        )
        # the upstream's answer, relayed through the client leg (worker._pump_response)
        leg = forward.leg
        leg.response_head(UPSTREAM_STATUS, [(b"Content-Length", b"0")])
        leg.end()
        if not leg.keep_alive:
            self.closed = True
            return
        self.scanner.feed(leg.trailing)  # worker._read_next

    # -- local answers (worker._local_reply and _local_reply_raw)

    def _reply(
        self,
        leg: ServerLeg,
        head: RequestHead,
        status: int,
        code: str,
        *,
        close: bool,
        rule: Rule | None = None,
    ) -> None:
        assert status in LOCAL_STATUSES, (status, code)
        info = self.info
        if head.http_version != b"1.1" or info is None or b"close" in info.connection:
            close = True
        if not close:
            try:
                event = leg.next_event()
            except RequestRefused:
                close = True
            else:
                close = event is not Ev.END and event is not Ev.PAUSED
        self.transcript.exchanges.append(Exchange(status, code, rule=rule.name if rule else ""))
        if close:
            self.closed = True
            return
        self.scanner.feed(leg.trailing)

    def _reply_raw(self, status: int, code: str) -> None:
        assert status in LOCAL_STATUSES, (status, code)
        self.transcript.exchanges.append(Exchange(status, code))
        self.closed = True


# -- invariants ------------------------------------------------------------------------------


def longest_prefix_rule(table: PrefixTable, path: bytes) -> Rule:
    """The rule ``path`` falls under, by brute force: the oracle for ``PrefixTable.classify``."""
    best: Rule | None = None
    for rule in table.rules:
        prefix = rule.prefix
        starts = prefix if prefix.endswith(b"/") else prefix + b"/"
        if (path == prefix or path.startswith(starts)) and (
            best is None or len(prefix) > len(best.prefix)
        ):
            best = rule
    return best if best is not None else table.fallback


def check_clean_path(path: bytes) -> None:
    """A canonical path: clean bytes, no empty or dot segment, escapes in their one form."""
    assert path.startswith(b"/"), path
    assert not path.translate(None, CLEAN_PATH_BYTES), f"unclean byte in {path!r}"
    assert b"//" not in path, path
    segments = path.split(b"/")
    assert b"." not in segments and b".." not in segments, f"dot segment in {path!r}"
    for escape in path.split(b"%")[1:]:
        pair = escape[:2]
        assert len(pair) == 2 and not pair.translate(None, _HEX_UPPER), f"escape in {path!r}"
        code = int(pair, 16)
        assert code not in _UNRESERVED, f"escaped unreserved byte in {path!r}"
        assert 0x20 <= code < 0x7F and code not in (0x2F, 0x5C), f"bad escape in {path!r}"
        if code == 0x25:
            following = escape[2:4]
            double = len(following) == 2 and not following.translate(None, _HEX_ANY)
            assert not double and following[:1] not in (b"u", b"U"), f"double escape {path!r}"
    assert canonicalize(path) == path, f"{path!r} is not its own canonical form"


def check_decision(table: PrefixTable, target: bytes, decision: Decision) -> None:
    """The invariants of an accepted ``decision = table.decide(target)``."""
    assert decision.refusal is None
    rule = decision.rule
    check_clean_path(decision.path)
    assert rule is longest_prefix_rule(table, decision.path), (decision.path, rule.name)
    forwarded_path, question, query = decision.target.partition(b"?")
    assert not query.translate(None, CLEAN_QUERY_BYTES), f"unclean query {decision.target!r}"
    # the query is the client's, byte for byte: in either form it starts at the first "?"
    # (an absolute-form authority ends at the first "/" or "?")
    _, client_question, client_query = target.partition(b"?")
    assert (question, query) == (client_question, client_query), (target, decision.target)
    if rule.action is Action.REWRITE:
        assert rule.rewrite_to is not None
        assert forwarded_path == rule.rewrite_to, decision.target
        if table.fallback.action is Action.REWRITE and rule is table.fallback:
            assert decision.target.startswith(b"/index.html"), decision.target
    else:
        assert forwarded_path == decision.path, (decision.target, decision.path)
    check_clean_path(forwarded_path)
    again = table.decide(decision.target)
    assert again.refusal is None, (decision.target, again.refusal)
    assert again.target == decision.target, (decision.target, again.target)
    if rule.action is Action.REWRITE:
        assert again.rule is longest_prefix_rule(table, forwarded_path)
        assert again.rule.action is not Action.REWRITE or again.rule is rule
    else:
        assert again.rule is rule, (decision.target, rule.name, again.rule.name)


def check_refusal(table: PrefixTable, decision: Decision) -> None:
    assert decision.rule is table.fallback
    assert decision.target == b"" and decision.path == b""


def check_upstream_headers(
    headers: list[tuple[bytes, bytes]], info: RequestInfo, *, websocket: bool, listener: Listener
) -> None:
    folded = [fold(name) for name, _ in headers]
    assert folded.count(b"host") == 1, headers
    # the client is untrusted: forwarding headers are fastproxy's, one each, client ones dropped
    assert [v for n, v in headers if fold(n) == b"x-forwarded-for"] == [CLIENT_IP], headers
    for name in (b"x-forwarded-proto", b"x-forwarded-host", b"x-request-id"):
        assert folded.count(name) == 1, (name, headers)
    assert b"forwarded" not in folded, headers
    # provenance headers from an untrusted client never pass; only fastproxy's own are set
    provenance = {name for name in folded if is_provenance(name)} - listener.keep_headers
    assert provenance <= FORWARDING_HEADERS, headers
    assert folded.count(b"content-length") + folded.count(b"transfer-encoding") <= 1, headers
    assert not _NEVER_FORWARDED.intersection(folded), headers
    assert (b"upgrade" in folded) == websocket, headers
    # headers named by Connection are removed (the framing is rebuilt, forwarding headers and
    # the WebSocket pair are fastproxy's own)
    named = info.connection - _REBUILT - (_WEBSOCKET_PAIR if websocket else frozenset())
    assert not named.intersection(folded), (info.connection, headers)
    assert folded.count(b"connection") == (1 if websocket else 0), headers


def check_raw_framing(raw_head: bytes) -> None:
    """A forwarded head framed its body one way on the wire, before h11 normalised it: at most
    one Content-Length field (names compared as backends do), holding digits only, and not
    beside a Transfer-Encoding."""
    fields = [line.partition(b":") for line in raw_head.split(b"\r\n")[1:] if line]
    lengths = [value.strip(b" \t") for name, _, value in fields if fold(name) == b"content-length"]
    codings = [name for name, _, _ in fields if fold(name) == b"transfer-encoding"]
    assert len(lengths) <= 1, f"forwarded with {len(lengths)} Content-Length fields"
    assert not lengths or lengths[0].isdigit(), f"forwarded with Content-Length {lengths[0]!r}"
    assert not (lengths and codings), "forwarded with Content-Length and Transfer-Encoding"


def check_upstream_request(wire: bytes, method: bytes, decision: Decision, body: bytes) -> None:
    """Parse what went upstream as a strict backend would: exactly one request, as decided."""
    backend = h11.Connection(h11.SERVER)
    backend.receive_data(wire)
    events = list(_events(backend))
    assert events, wire
    request = events[0]
    assert isinstance(request, h11.Request), (request, wire)
    assert request.method == method and request.target == decision.target, (request, decision)
    received = b"".join(bytes(e.data) for e in events[1:-1] if isinstance(e, h11.Data))
    assert received == body, (len(received), len(body))
    assert all(isinstance(e, h11.Data) for e in events[1:-1]), events
    assert isinstance(events[-1], h11.EndOfMessage), events[-1]
    leftover, _ = backend.trailing_data
    assert leftover == b"", f"bytes behind the forwarded request: {leftover[:200]!r}"


def _events(conn: h11.Connection) -> Iterable[h11.Event]:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA or event is h11.PAUSED:
            return
        assert isinstance(event, h11.Event)
        yield event
        if isinstance(event, h11.EndOfMessage):
            return


def first_head_region(data: bytes) -> bytes:
    """The bytes the scanner judges as the first head (leading empty lines skipped)."""
    start = 0
    while data[start : start + 2] == b"\r\n":
        start += 2
    end = data.find(b"\r\n\r\n", start)
    return data[start:] if end < 0 else data[start : end + 4]


def has_bare_cr_or_lf(data: bytes) -> bool:
    crlf = data.count(b"\r\n")
    return data.count(b"\n") != crlf or data.count(b"\r") != crlf


def check_oversize(data: bytes, transcript: Transcript, limits: Limits) -> None:
    """A first head over ``max_head_bytes`` is refused by size, never accepted or waited for:
    414 when its target (the request line between its first and last space, or to the end of
    what arrived) is over ``max_uri_bytes``, else 431; 400 instead when the head has no end yet
    and a bare CR or LF (that check comes first).
    """
    region = first_head_region(data)
    if len(region) <= limits.max_head_bytes:
        return
    assert transcript.exchanges, f"an oversize head of {len(region)} bytes was not refused"
    first = transcript.exchanges[0]
    line_end = region.find(b"\r\n")
    line = region if line_end < 0 else region[:line_end]
    first_space = line.find(b" ")
    last_space = len(line) if line_end < 0 else line.rfind(b" ")
    expected = 414 if last_space - first_space - 1 > limits.max_uri_bytes else 431
    unfinished = not region.endswith(b"\r\n\r\n")
    pending = region[:-1] if region.endswith(b"\r") else region
    allowed = {expected, 400} if unfinished and has_bare_cr_or_lf(pending) else {expected}
    assert first.status in allowed and not first.upstream_head, (first, len(region), allowed)
    assert transcript.state == "closed", transcript.state


# -- entry points ----------------------------------------------------------------------------


def drive(data: bytes, listener: Listener, cuts: Iterable[int] = ()) -> Transcript:
    """Play ``data`` into one connection of ``listener``, split at the offsets ``cuts``."""
    model = ClientModel(listener)
    start = 0
    for cut in sorted(set(cuts)):
        if 0 < cut < len(data):
            model.data_received(data[start:cut])
            start = cut
    if start < len(data):
        model.data_received(data[start:])
    return model.finish()


def one_input(data: bytes) -> None:
    """The fuzz target: ``data`` as one client connection, on each preset listener."""
    for listener in LISTENERS:
        transcript = drive(data, listener)
        check_oversize(data, transcript, listener.limits)


def same_outcome(whole: Transcript, pieces: Transcript) -> bool:
    """Whether two transcripts of one stream agree; a size refusal may stand for the 400 of a
    bare CR or LF that reads in another order would find first (and the other way round)."""
    if whole.state != pieces.state or len(whole.exchanges) != len(pieces.exchanges):
        return False
    if whole.exchanges[:-1] != pieces.exchanges[:-1]:
        return False
    if not whole.exchanges or whole.exchanges[-1] == pieces.exchanges[-1]:
        return whole.buffered == pieces.buffered
    last = {whole.exchanges[-1].status, pieces.exchanges[-1].status}
    return last <= {400, 414, 431} and whole.state == "closed"


def check_in_pieces(data: bytes, cuts: Iterable[int]) -> None:
    """``data`` read in pieces is handled as ``data`` read at once, on each preset listener."""
    cuts = list(cuts)
    for listener in LISTENERS:
        whole = drive(data, listener)
        pieces = drive(data, listener, cuts)
        assert same_outcome(whole, pieces), (listener.name, whole, pieces)
