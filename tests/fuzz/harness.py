"""``exchange.Exchange`` in process: a recording ``ExchangeIO``, a manual clock, a loop queue and
upstream connections that answer from a script. No socket, event loop or real clock.

[test support] Imports fastproxy's pure modules only. Used by the fuzz target
(``targets.py`` beside it) and the unit tests of the exchange (``tests/unit/test_exchange.py``).

Theory of operation
-------------------
A ``Harness`` is one client connection: it owns the ``Exchange`` and is its ``ExchangeIO``.
``send`` is a client read, ``advance`` moves the clock and fires the armed timer when it is due,
and both then run what the exchange queued with ``soon`` (the next loop passes) until nothing
is left. ``open_upstream`` makes a ``FakeUpstream``: handed over at once (a pooled connection)
or, with ``connect_later``, left in ``connecting`` for the test to complete with ``connect``.
When the exchange writes the end of a request, the connection answers with ``respond(conn)``
(by default a canned 200 with an empty body) on the next loop pass; ``None`` means no answer,
and the test feeds one with ``FakeUpstream.answer``.

Invariants kept by the harness: at most one deadline armed (the exchange's ``timer`` names it);
a discarded or released connection never delivers bytes; everything written to the client is
kept in order in ``client``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from fastproxy.config import UpstreamConfig
from fastproxy.errors import NoHealthyUpstream
from fastproxy.exchange import Cycle, Exchange, UpstreamConn
from fastproxy.http1 import ClientLeg, ServerLeg, UpstreamLeg
from fastproxy.runtime import ListenerPlan

#: what a ``FakeUpstream`` answers unless told otherwise
OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


class RecordingLeg(ServerLeg):
    """The h11 client leg, keeping the raw head it was given (framing is checked on it)."""

    __slots__ = ("max_head_bytes", "raw_head")

    def __init__(self, max_head_bytes: int) -> None:
        super().__init__(max_head_bytes)
        self.max_head_bytes = max_head_bytes
        self.raw_head = b""

    def feed_head(self, head: bytes) -> None:
        # the scanner never hands over a head over the limit
        assert len(head) <= self.max_head_bytes, f"accepted a head of {len(head)} bytes"
        self.raw_head = head
        super().feed_head(head)


class RecordingUpstreamLeg(UpstreamLeg):
    """The upstream leg, keeping the body events it framed and whether the request ended."""

    __slots__ = ("body_events", "ended", "on_end")

    def __init__(self, on_end: Callable[[], None]) -> None:
        super().__init__()
        self.body_events: list[bytes] = []
        self.ended = False
        #: called when the request ends with nothing more to write (a Content-Length body);
        #: the last chunk ends it when it is written
        self.on_end = on_end

    def body(self, data: bytes) -> list[bytes]:
        self.body_events.append(data)
        return super().body(data)

    def end(self) -> bytes:
        self.ended = True
        data = super().end()
        if not data:
            self.on_end()
        return data


class FakeWorker:
    """The ``WorkerView``: the client leg class, default Hosts and request ids."""

    def __init__(self, default_hosts: Mapping[str, bytes]) -> None:
        self.leg_class: Callable[[int], ClientLeg] = RecordingLeg
        self.default_hosts = default_hosts
        self.ids = 0

    def next_request_id(self) -> bytes:
        self.ids += 1
        return b"test-%d" % self.ids


class FakeListener:
    """The ``PlanHolder``: a reload replaces ``plan``."""

    def __init__(self, plan: ListenerPlan) -> None:
        self.plan = plan


class FakeUpstream:
    """One upstream connection (``UpstreamConn``): records what was written to it."""

    def __init__(
        self, harness: Harness, name: str, config: UpstreamConfig, cycle: Cycle | None, reused: bool
    ) -> None:
        self.harness = harness
        self.name = name
        self.config = config
        self.reused = reused
        self.leg: UpstreamLeg = RecordingUpstreamLeg(self._request_ended)
        #: the cycle that opened it (``None``: opened when no cycle was under way)
        self.cycle = cycle
        self.wire: list[bytes] = []
        self.paused = False
        #: "released", "discarded" or "closed" once the exchange is done with it
        self.fate = ""
        self.answered = False
        #: the exchange said its server failed (passive health)
        self.failed = False

    @property
    def live(self) -> bool:
        return not self.fate

    @property
    def request_ended(self) -> bool:
        leg = self.leg
        return isinstance(leg, RecordingUpstreamLeg) and leg.ended

    @property
    def body_events(self) -> list[bytes]:
        leg = self.leg
        return leg.body_events if isinstance(leg, RecordingUpstreamLeg) else []

    def _request_ended(self) -> None:
        if not self.answered:
            self.answered = True
            self.harness.request_sent(self)

    def write(self, data: bytes) -> None:
        assert self.live, "a write on a connection the exchange gave back"
        self.wire.append(data)
        if self.request_ended:
            self._request_ended()

    def writelines(self, data: list[bytes]) -> None:
        assert self.live, "a write on a connection the exchange gave back"
        self.wire.extend(data)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def release(self) -> None:
        self.fate = "released"

    def discard(self) -> None:
        self.fate = "discarded"

    def mark_failed(self) -> None:
        self.failed = True

    def close(self) -> None:
        self.fate = "closed"

    def answer(self, data: bytes) -> None:
        """Bytes from the upstream, now (``b""``: its EOF, as ``UpstreamProtocol`` feeds it)."""
        if not self.live:
            return
        if not data:
            self.leg.feed_eof()
        self.harness.exchange.upstream_data(data, self.harness.now)
        self.harness.run()

    def lose(self) -> None:
        """The connection closes (``connection_lost``)."""
        if not self.live:
            return
        self.fate = "closed"
        self.harness.exchange.upstream_lost(self.harness.now)
        self.harness.run()


@dataclass(slots=True)
class Finished:
    """One ``finished`` call: the cycle (None for a head that never parsed), status, code."""

    cycle: Cycle | None
    status: int
    code: str
    #: the connection that answered it, if the upstream did
    upstream: FakeUpstream | None = None


@dataclass(slots=True)
class Switch:
    cycle: Cycle
    conn: UpstreamConn
    client_rest: bytes
    upstream_rest: bytes


@dataclass(slots=True)
class Effects:
    """What the exchange asked for, besides client bytes and records."""

    #: "close" or "abort" once the client connection is closed
    closed: str = ""
    errors: list[tuple[str, str]] = field(default_factory=list)
    switches: list[Switch] = field(default_factory=list)


class Harness:
    """One client connection around a real ``Exchange`` (see the module docstring).

    An ``ExchangeIO`` by its methods, not by inheritance: a compiled ``exchange`` (mypyc)
    makes its protocol classes traits, which interpreted classes cannot subclass.
    """

    def __init__(
        self,
        plan: ListenerPlan,
        *,
        upstreams: Mapping[str, UpstreamConfig],
        default_hosts: Mapping[str, bytes],
        peer: bytes = b"127.0.0.1",
        respond: Callable[[FakeUpstream], bytes | None] = lambda conn: OK_RESPONSE,
        connect_later: bool = False,
        reused: bool = False,
        no_server: bool = False,
    ) -> None:
        self.upstream_configs = upstreams
        self.respond = respond
        self.connect_later = connect_later
        #: pooled connections handed out claim to have carried a request before
        self.reused = reused
        #: every server is down: ``open_upstream`` raises ``NoHealthyUpstream``
        self.no_server = no_server
        self.worker = FakeWorker(default_hosts)
        self.listener = FakeListener(plan)
        self.now = 0.0
        self.client = bytearray()
        self.reading = True
        #: when the armed timer is due (None: none armed)
        self.deadline: float | None = None
        self.queue: list[Callable[[float], None]] = []
        self.records: list[Finished] = []
        self.upstreams: list[FakeUpstream] = []
        self.connecting: list[FakeUpstream] = []
        self.effects = Effects()
        self.exchange = Exchange(self, self.worker, self.listener)
        self.exchange.open(peer)

    # -- driving

    def send(self, data: bytes) -> None:
        """One client read (the transport delivers only while reading is on)."""
        assert self.reading, "bytes delivered while reading is paused"
        self.exchange.client_data(data, self.now)
        self.run()

    def eof(self) -> bool:
        kept = self.exchange.client_eof()
        if not kept:
            self.close_client(False)
            self.exchange.client_lost()
        self.run()
        return kept

    def run(self) -> None:
        """The next loop passes: run what was queued until nothing is left."""
        while self.queue:
            self.queue.pop(0)(self.now)

    def advance(self, seconds: float) -> None:
        """Move the clock; the armed timer fires once it is due."""
        self.now += seconds
        while self.deadline is not None and self.deadline <= self.now:
            self.deadline = None
            self.exchange.timer_fired(self.now)
            self.run()

    def connect(self, conn: FakeUpstream | None = None) -> FakeUpstream:
        """Complete a connect started with ``connect_later``."""
        conn = conn or self.connecting.pop(0)
        self.exchange.upstream_ready(conn, self.now)
        self.run()
        return conn

    def fail_connect(self, code: str = "upstream_failed") -> None:
        """The connect started with ``connect_later`` failed."""
        conn = self.connecting.pop(0)
        self.exchange.upstream_failed(code, conn.config, self.now)
        self.run()

    def take_client(self) -> bytes:
        data = bytes(self.client)
        self.client.clear()
        return data

    # -- hooks for subclasses

    def request_sent(self, conn: FakeUpstream) -> None:
        """The exchange ended a request on ``conn``: answer it on the next pass."""
        response = self.respond(conn)
        if response is not None:
            self.queue.append(lambda now: conn.answer(response))

    # -- ExchangeIO

    def write_client(self, data: bytes) -> None:
        assert not self.effects.closed, "a write after the close"
        self.client += data

    def writelines_client(self, data: list[bytes]) -> None:
        assert not self.effects.closed, "a write after the close"
        for part in data:
            self.client += part

    def close_client(self, abort: bool) -> None:
        if not self.effects.closed:
            self.effects.closed = "abort" if abort else "close"

    def set_reading(self, reading: bool) -> None:
        assert reading != self.reading, "a reading change that changes nothing"
        self.reading = reading

    def open_upstream(self, upstream: str, fresh: bool) -> UpstreamConn | None:
        if self.no_server:
            raise NoHealthyUpstream(upstream)
        conn = FakeUpstream(
            self,
            upstream,
            self.upstream_configs[upstream],
            self.exchange.cycle,
            reused=self.reused and not fresh,
        )
        self.upstreams.append(conn)
        if self.connect_later or fresh:
            self.connecting.append(conn)
            return None
        return conn

    def arm(self, delay: float) -> None:
        self.deadline = self.now + delay

    def cancel_timer(self) -> None:
        self.deadline = None

    def soon(self, callback: Callable[[float], None]) -> None:
        self.queue.append(callback)

    def finished(self, cycle: Cycle | None, status: int, code: str) -> None:
        answered_by = None
        if cycle is not None and not code:
            answered_by = next(
                (c for c in reversed(self.upstreams) if c.cycle is cycle and c.answered), None
            )
        self.records.append(Finished(cycle, status, code, answered_by))

    def upstream_error(self, upstream: str, code: str, detail: str) -> None:
        self.effects.errors.append((upstream, code))

    def switched(
        self, cycle: Cycle, conn: UpstreamConn, client_rest: bytes, upstream_rest: bytes
    ) -> None:
        self.effects.switches.append(Switch(cycle, conn, client_rest, upstream_rest))
