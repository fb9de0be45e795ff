"""The fuzz target: the bytes of one client connection, played into the worker's own
``exchange.Exchange``, with the invariants that must hold whatever the bytes are.

``one_input(data)`` plays ``data`` into one ``Exchange`` per listener of the built-in Cobrowse
preset (``sdk``: deny fallback; ``agent``: rewrite to ``/index.html``), through the in-process
harness of ``tests/support/exchange.py``: the exchange's effects are recorded, and every request
it forwards is answered by a fake upstream with a canned 200 on the next loop pass, so whole
cycles, keep-alive and pipelining run as in a worker. It is the class ``ClientProtocol`` adapts,
not a model of it: ``HeadScanner``, a fresh ``ServerLeg`` per request, ``exchange.admit``, the
request pump, the ``UpstreamLeg`` that writes upstream and reads the answer, the client leg's
response writer, ``_read_next``. ``RequestRefused`` is caught only where the exchange catches
it; any other exception is one that would escape from a transport callback: a bug.

Invariants (an ``AssertionError`` names the one broken):

- The scanner never holds more than ``max_head_bytes`` while waiting for the end of a head, and
  never hands over a head, a target or a header count over the limits; a first head over the
  size limit is refused with 414 or 431 (400 when it also has a bare CR or LF), never accepted.
- A head the scanner accepts is parsed by h11 into a request or refused: the exchange asserts
  as much before it starts a cycle.
- An accepted target is canonical: its path is its own ``canonicalize`` image, made only of
  clean bytes (no dot segment, no ``//``, escapes upper-case and never of an unreserved, a
  separator, a control or a non-ASCII byte), its query is the client's, byte for byte; the rule
  is the longest matching prefix; deciding the forwarded target again gives the same rule and
  the same target. The agent's rewrite fallback forwards ``/index.html`` plus the query.
- What is written upstream parses back (h11, as a strict backend) as exactly one request, with
  the decided target, the client's body, one Host, and no hop-by-hop or override header that
  should have been removed: nothing is smuggled in or behind it.
- Once the loop has settled, reading from the client is paused only on a closed connection, and
  nothing is written to the client after its close.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import h11

from fastproxy.config import Limits, ListenerConfig, load_config
from fastproxy.exchange import Cycle, State, UpstreamConn
from fastproxy.headers import (
    FORWARDING_HEADERS,
    RequestInfo,
    fold,
    is_provenance,
    valid_method,
)
from fastproxy.policy import Action, Decision, PrefixTable, Rule, canonicalize
from fastproxy.runtime import ListenerPlan, Snapshot

from .harness import FakeUpstream, Harness, RecordingLeg

__all__ = [
    "LISTENERS",
    "FuzzConnection",
    "Listener",
    "Outcome",
    "Transcript",
    "check_decision",
    "drive",
    "one_input",
]

CLIENT_IP = b"127.0.0.1"
#: statuses fastproxy itself may answer on the client leg before any upstream is involved
LOCAL_STATUSES = frozenset({204, 400, 403, 405, 413, 414, 431})
#: what the fake upstream answers for every forwarded request
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
_SNAPSHOT = Snapshot.build(_PRESET, 1)
#: the Host the worker sends for an HTTP/1.0 request without one
DEFAULT_HOSTS = _SNAPSHOT.default_hosts
UPSTREAMS = _SNAPSHOT.upstreams


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request as the exchange ended it: answered locally, or forwarded and answered."""

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

    exchanges: list[Outcome] = field(default_factory=list)
    #: "closed", "head" (waiting for more of a head; ``buffered`` bytes held) or "body"
    state: str = "head"
    buffered: int = 0


class FuzzConnection(Harness):
    """One client connection of ``listener``: the real ``Exchange``, its invariants checked at
    each effect, its outcomes kept in ``transcript``."""

    def __init__(self, listener: Listener) -> None:
        super().__init__(
            listener.plan, upstreams=UPSTREAMS, default_hosts=DEFAULT_HOSTS, peer=CLIENT_IP
        )
        self.fuzz_listener = listener
        self.transcript = Transcript()

    def send(self, data: bytes) -> None:
        super().send(data)
        exchange = self.exchange
        held = len(exchange.scanner)
        if exchange.state is State.HEAD:
            assert held <= self.fuzz_listener.limits.max_head_bytes, (
                f"the scanner holds {held} bytes of an unfinished head"
            )
        assert exchange.state is State.CLOSED or self.reading, "reading paused on a settled loop"

    def finish(self) -> Transcript:
        """The client stops sending (the worker would wait for a timeout or the EOF)."""
        transcript = self.transcript
        exchange = self.exchange
        if exchange.state is State.CLOSED:
            transcript.state = "closed"
        elif exchange.cycle is not None:
            transcript.state = "body"
        else:
            transcript.state = "head"
            transcript.buffered = len(exchange.scanner)
        return transcript

    # -- effects, checked

    def open_upstream(self, upstream: str, fresh: bool) -> UpstreamConn | None:
        """A forward: its invariants, on the request as the client sent it."""
        cycle = self.exchange.cycle
        assert cycle is not None and cycle.sent_head is not None
        listener = self.fuzz_listener
        head, info, decision = cycle.head, cycle.info, cycle.decision
        assert info is not None and decision is not None and decision.refusal is None
        rule = decision.rule
        assert valid_method(head.method), head.method
        assert head.method not in listener.refused_methods, head.method
        assert not (info.has_body and head.method in (b"GET", b"HEAD")), head.method
        assert info.host is not None or head.http_version == b"1.0"
        assert rule.action is not Action.DENY  # the preset listeners enforce
        assert rule.action is not Action.REWRITE or head.method in (b"GET", b"HEAD")
        method, target, headers = cycle.sent_head
        assert (method, target) == (head.method, decision.target)
        check_upstream_headers(headers, info, websocket=cycle.websocket, listener=listener)
        leg = cycle.leg
        assert isinstance(leg, RecordingLeg)
        check_raw_framing(leg.raw_head)
        return super().open_upstream(upstream, fresh)

    def request_sent(self, conn: FakeUpstream) -> None:
        cycle = conn.cycle
        assert cycle is not None and cycle.decision is not None
        check_upstream_request(
            b"".join(conn.wire), cycle.head.method, cycle.decision, b"".join(conn.body_events)
        )
        super().request_sent(conn)

    def finished(self, cycle: Cycle | None, status: int, code: str) -> None:
        super().finished(cycle, status, code)
        upstream = self.records[-1].upstream
        if upstream is None:
            assert status in LOCAL_STATUSES, (status, code)
        else:
            assert status == UPSTREAM_STATUS and not code, (status, code)
        rule = ""
        if cycle is not None:
            limits = self.fuzz_listener.limits
            head = cycle.head
            assert len(head.target) <= limits.max_uri_bytes, (
                f"accepted a target of {len(head.target)} bytes"
            )
            assert len(head.headers) <= limits.max_headers, (
                f"accepted {len(head.headers)} header fields"
            )
            decision = cycle.decision
            if decision is not None:
                if decision.refusal is not None:
                    check_refusal(self.fuzz_listener.table, decision)
                else:
                    check_decision(self.fuzz_listener.table, head.target, decision)
                    rule = decision.rule.name
        self.transcript.exchanges.append(
            Outcome(
                status,
                code,
                rule,
                upstream.wire[0] if upstream is not None else b"",
                b"".join(upstream.body_events) if upstream is not None else b"",
            )
        )


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
    connection = FuzzConnection(listener)
    start = 0
    pieces: list[bytes] = []
    for cut in sorted(set(cuts)):
        if 0 < cut < len(data):
            pieces.append(data[start:cut])
            start = cut
    if start < len(data):
        pieces.append(data[start:])
    for piece in pieces:
        if connection.exchange.state is State.CLOSED:
            break  # the transport delivers nothing more
        connection.send(piece)
    return connection.finish()


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
