"""WebSocket relay: accept check, frames both ways, close handshake, protocol errors."""

from __future__ import annotations

import gc
import itertools
import os
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason

from fastproxy.wsrelay import (
    KEEPALIVE_PING,
    WebSocketRelay,
    expected_accept,
    upgrade_accepted,
)

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


def test_expected_accept_rfc6455_example() -> None:
    assert expected_accept(KEY) == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_upgrade_accepted_requires_exact_accept_and_websocket() -> None:
    good = [(b"Upgrade", b"websocket"), (b"Sec-WebSocket-Accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")]
    assert upgrade_accepted(KEY, good)
    assert not upgrade_accepted(KEY, [(b"Upgrade", b"websocket"), (b"Sec-WebSocket-Accept", b"x")])
    assert not upgrade_accepted(KEY, [(b"Upgrade", b"h2c"), good[1]])
    assert not upgrade_accepted(KEY, [*good, good[1]])
    assert not upgrade_accepted(KEY, [*good, (b"Sec-WebSocket-Extensions", b"permessage-deflate")])


def _peers() -> tuple[Connection, Connection]:
    return Connection(ConnectionType.CLIENT), Connection(ConnectionType.SERVER)


def test_relay_messages_both_ways() -> None:
    relay = WebSocketRelay(1 << 20)
    client, server = _peers()
    out = relay.from_client(
        client.send(TextMessage(data="héllo")) + client.send(BytesMessage(data=b"\x00\x01"))
    )
    server.receive_data(b"".join(out.to_upstream))
    events = list(server.events())
    assert isinstance(events[0], TextMessage) and events[0].data == "héllo"
    assert isinstance(events[1], BytesMessage) and events[1].data == b"\x00\x01"
    out = relay.from_upstream(server.send(TextMessage(data="back")))
    client.receive_data(b"".join(out.to_client))
    assert [e.data for e in client.events() if isinstance(e, TextMessage)] == ["back"]


def test_relay_close_handshake_initiated_by_client() -> None:
    relay = WebSocketRelay(1 << 20)
    client, server = _peers()
    out = relay.from_client(client.send(CloseConnection(code=1000, reason="bye")))
    assert not out.done and out.client_close_code == 1000
    server.receive_data(b"".join(out.to_upstream))
    close = next(e for e in server.events() if isinstance(e, CloseConnection))
    assert close.code == 1000
    out = relay.from_upstream(server.send(close.response()))
    assert out.done
    client.receive_data(b"".join(out.to_client))
    assert any(isinstance(e, CloseConnection) for e in client.events())


def test_relay_unmasked_client_frame_is_protocol_error() -> None:
    relay = WebSocketRelay(1 << 20)
    out = relay.from_client(b"\x81\x05hello")  # a server-style (unmasked) frame from the client
    assert out.done and out.client_close_code == 1002
    assert out.to_client and out.to_upstream


def test_relay_message_size_limit() -> None:
    relay = WebSocketRelay(10)
    client, _server = _peers()
    out = relay.from_client(client.send(BytesMessage(data=b"x" * 11)))
    assert out.done and out.client_close_code == 1009


def test_relay_swallows_pongs_to_keepalive_pings() -> None:
    relay = WebSocketRelay(1 << 20)
    client, _server = _peers()
    client.receive_data(relay.ping_client())
    ping = next(e for e in client.events() if isinstance(e, Ping))
    assert ping.payload == KEEPALIVE_PING
    out = relay.from_client(client.send(ping.response()))
    assert out.to_upstream == []


def test_relay_going_away_closes_both() -> None:
    relay = WebSocketRelay(1 << 20)
    out = relay.going_away()
    assert out.done and out.to_client and out.to_upstream


# -- the relay on top of the frame scanner --------------------------------------------------------


def _events(conn: Connection, chunks: list[bytes]) -> list[Event]:
    conn.receive_data(b"".join(chunks))
    return list(conn.events())


def _close_of(conn: Connection, chunks: list[bytes]) -> CloseConnection:
    [close] = [e for e in _events(conn, chunks) if isinstance(e, CloseConnection)]
    return close


def test_relay_forwards_frames_as_received() -> None:
    relay = WebSocketRelay(1 << 20)
    client, server = _peers()
    data = client.send(BytesMessage(data=b"x" * 32))
    out = relay.from_client(data)
    assert out.to_upstream == [data] and out.to_upstream[0] is data
    assert out.to_client == [] and not out.done and out.client_close_code is None
    back = server.send(BytesMessage(data=b"y" * 32))
    out = relay.from_upstream(back)
    assert out.to_client == [back] and out.to_upstream == [] and not out.done


def test_relay_pings_and_pongs_both_ways() -> None:
    relay = WebSocketRelay(1 << 20)
    client, server = _peers()
    out = relay.from_client(client.send(Ping(payload=b"c")))
    [ping] = _events(server, out.to_upstream)
    assert isinstance(ping, Ping) and ping.payload == b"c"
    out = relay.from_upstream(server.send(ping.response()) + server.send(Ping(payload=b"s")))
    events = _events(client, out.to_client)
    assert [(type(e), e.payload) for e in events if isinstance(e, Ping | Pong)] == [
        (Pong, b"c"),
        (Ping, b"s"),
    ]
    out = relay.from_client(client.send(Pong(payload=b"s")))
    [pong] = _events(server, out.to_upstream)
    assert isinstance(pong, Pong) and pong.payload == b"s"


def test_relay_close_handshake_initiated_by_upstream() -> None:
    relay = WebSocketRelay(1 << 20)
    client, server = _peers()
    out = relay.from_upstream(server.send(CloseConnection(code=1001, reason="restart")))
    assert not out.done and relay.closing and out.client_close_code is None
    close = _close_of(client, out.to_client)
    assert (close.code, close.reason) == (1001, "restart")
    out = relay.from_client(client.send(close.response()))
    assert out.done and out.client_close_code == 1001
    assert _close_of(server, out.to_upstream).code == 1001


def test_relay_close_without_status_reported_as_1005() -> None:
    relay = WebSocketRelay(1 << 20)
    client, server = _peers()
    close = client.send(CloseConnection(code=CloseReason.NO_STATUS_RCVD))
    assert close[1] == 0x80  # a Close without payload
    out = relay.from_client(close)
    assert out.client_close_code == 1005
    assert _close_of(server, out.to_upstream).code == 1005


def test_relay_closes_crossing_each_other() -> None:
    relay = WebSocketRelay(1 << 20)
    client, server = _peers()
    to_upstream = relay.from_client(client.send(CloseConnection(code=1000)))
    to_client = relay.from_upstream(server.send(CloseConnection(code=1000)))
    assert not to_upstream.done and to_client.done
    assert _close_of(client, to_client.to_client).code == 1000


def test_relay_ignores_client_bytes_after_its_close() -> None:
    relay = WebSocketRelay(1 << 20)
    client, server = _peers()
    close = client.send(CloseConnection(code=1000))
    out = relay.from_client(close + b"\x81\x05hello")  # even a bad frame after it
    assert out.to_upstream == [close] and not out.done
    out = relay.from_client(b"\xff\xff\xff")
    assert out.to_upstream == [] and out.to_client == [] and not out.done
    assert out.client_close_code is None
    # the upstream's data before its reply goes nowhere: the client has closed (as before)
    out = relay.from_upstream(server.send(TextMessage(data="late")))
    assert out.to_client == [] and not out.done
    out = relay.from_upstream(server.send(CloseConnection(code=1000)))
    assert out.done and _close_of(client, out.to_client).code == 1000


def test_relay_drops_client_data_after_upstream_close_then_relays_client_close() -> None:
    relay = WebSocketRelay(1 << 20)
    client, server = _peers()
    relay.from_upstream(server.send(CloseConnection(code=1000)))
    out = relay.from_client(client.send(TextMessage(data="late")))
    assert out.to_upstream == [] and not out.done
    out = relay.from_upstream(b"\x89\x00")  # nothing may follow the upstream's Close
    assert out.to_client == [] and not out.done
    out = relay.from_client(client.send(CloseConnection(code=1000)))
    assert out.done and out.client_close_code == 1000
    assert _close_of(server, out.to_upstream).code == 1000


def test_relay_after_done_does_nothing_more() -> None:
    relay = WebSocketRelay(1 << 20)
    relay.from_client(b"\x81\x05hello")
    out = relay.from_client(b"\x81\x05hello")
    assert out.done and out.to_client == [] and out.to_upstream == []
    assert out.client_close_code is None
    out = relay.from_upstream(b"\x81\x05hello")
    assert out.done and out.to_client == [] and out.to_upstream == []


CLIENT_REFUSALS = [
    pytest.param(b"\xc1\x82\x00\x00\x00\x00hi", 1002, id="rsv1"),
    pytest.param(b"\x83\x82\x00\x00\x00\x00hi", 1002, id="opcode-3"),
    pytest.param(b"\x81\x02hi", 1002, id="unmasked"),
    pytest.param(b"\x89\xfe\x00\x7e" + b"\x00" * 4 + b"p" * 126, 1002, id="ping-126"),
    pytest.param(b"\x09\x80\x00\x00\x00\x00", 1002, id="ping-fragmented"),
    pytest.param(b"\x80\x82\x00\x00\x00\x00hi", 1002, id="stray-continuation"),
    pytest.param(b"\x88\x81\x00\x00\x00\x00\x03", 1002, id="close-1-byte"),
    pytest.param(b"\x88\x82\x00\x00\x00\x00\x03\xed", 1002, id="close-1005"),
    pytest.param(b"\x88\x82\x00\x00\x00\x00\x03\xec", 1002, id="close-1004"),
    pytest.param(b"\x88\x84\x00\x00\x00\x00\x03\xe8\xff\xfe", 1007, id="close-bad-utf8"),
    pytest.param(b"\x82\x8b\x00\x00\x00\x00" + b"x" * 11, 1009, id="too-big"),
]


@pytest.mark.parametrize(("frame", "code"), CLIENT_REFUSALS)
def test_relay_client_protocol_error_fails_both_sides(frame: bytes, code: int) -> None:
    relay = WebSocketRelay(10)
    client, server = _peers()
    good = client.send(TextMessage(data="ok"))
    out = relay.from_client(good + frame)
    assert out.done and out.client_close_code == code and relay.closing
    # the good frame first, then a masked 1001 the upstream can read
    events = _events(server, out.to_upstream)
    assert isinstance(events[0], TextMessage) and events[0].data == "ok"
    assert isinstance(events[1], CloseConnection) and events[1].code == 1001
    # an unmasked Close with the code for the client
    assert _close_of(client, out.to_client).code == code
    assert relay.ping_client() == b""


def test_relay_data_frame_inside_fragmented_message_refused() -> None:
    relay = WebSocketRelay(1 << 20)
    client, _server = _peers()
    out = relay.from_client(client.send(TextMessage(data="a", message_finished=False)))
    assert not out.done
    out = relay.from_client(client.send(TextMessage(data="b")) + b"")
    assert not out.done  # a continuation: fine
    out = relay.from_client(client.send(TextMessage(data="c", message_finished=False)))
    out = relay.from_client(b"\x81\x80\x00\x00\x00\x00")  # a new Text frame inside it
    assert out.done and out.client_close_code == 1002


def test_relay_message_size_limit_across_fragments() -> None:
    relay = WebSocketRelay(10)
    client, server = _peers()
    first = client.send(BytesMessage(data=b"x" * 6, message_finished=False))
    out = relay.from_client(first)
    assert out.to_upstream == [first] and not out.done
    out = relay.from_client(client.send(BytesMessage(data=b"y" * 5)))
    assert out.done and out.client_close_code == 1009
    assert _close_of(client, out.to_client).code == 1009
    # nothing of the fragment over the limit was forwarded, only the Close after the first
    events = _events(server, [first, *out.to_upstream])
    assert isinstance(events[-1], CloseConnection) and events[-1].code == 1001
    assert sum(len(e.data) for e in events if isinstance(e, BytesMessage)) == 6


UPSTREAM_REFUSALS = [
    pytest.param(b"\x82\x82\x00\x00\x00\x00hi", id="masked"),
    pytest.param(b"\xa1\x02hi", id="rsv2"),
    pytest.param(b"\x8f\x00", id="opcode-f"),
    pytest.param(b"\x88\x02\x03\xee", id="close-1006"),
    pytest.param(b"\x88\x01\x03", id="close-1-byte"),
    pytest.param(b"\x00\x01x", id="stray-continuation"),
]


@pytest.mark.parametrize("frame", UPSTREAM_REFUSALS)
def test_relay_upstream_protocol_error_sends_1011_to_client(frame: bytes) -> None:
    relay = WebSocketRelay(1 << 20)
    client, server = _peers()
    good = server.send(TextMessage(data="ok"))
    out = relay.from_upstream(good + frame)
    assert out.done and out.to_upstream == [] and out.client_close_code is None
    events = _events(client, out.to_client)
    assert isinstance(events[0], TextMessage) and events[0].data == "ok"
    assert isinstance(events[1], CloseConnection) and events[1].code == 1011


def test_relay_keepalive_ping_not_sent_into_an_unfinished_frame() -> None:
    relay = WebSocketRelay(1 << 20)
    _client, server = _peers()
    data = server.send(BytesMessage(data=b"z" * 1000))
    relay.from_upstream(data[:100])
    assert relay.ping_client() == b""
    relay.from_upstream(data[100:])
    assert relay.ping_client() != b""


def test_relay_going_away_leaves_close_out_of_an_unfinished_frame() -> None:
    relay = WebSocketRelay(1 << 20)
    client, server = _peers()
    relay.from_client(client.send(BytesMessage(data=b"c" * 1000))[:50])
    out = relay.going_away()
    assert out.done and out.to_upstream == [], "a Close inside a frame would be read as payload"
    assert _close_of(client, out.to_client).code == 1001
    relay = WebSocketRelay(1 << 20)
    relay.from_upstream(server.send(BytesMessage(data=b"s" * 1000))[:50])
    out = relay.going_away()
    assert out.done and out.to_client == []
    assert _close_of(server, out.to_upstream).code == 1001


def test_relay_going_away_answers_a_pending_client_close() -> None:
    relay = WebSocketRelay(1 << 20)
    client, _server = _peers()
    relay.from_client(client.send(CloseConnection(code=1000)))
    out = relay.going_away()
    assert out.done and out.to_upstream == []  # the upstream was already sent the client's Close
    assert _close_of(client, out.to_client).code == 1001


def test_relay_bytes_one_at_a_time() -> None:
    relay = WebSocketRelay(1 << 20)
    client, server = _peers()
    data = b"".join(
        [
            client.send(TextMessage(data="héllo", message_finished=False)),
            client.send(Ping(payload=b"between")),
            client.send(TextMessage(data=" world")),
            client.send(BytesMessage(data=bytes(range(256)) * 300)),
            client.send(CloseConnection(code=4000, reason="app")),
        ]
    )
    chunks: list[bytes] = []
    code = None
    for i in range(len(data)):
        out = relay.from_client(data[i : i + 1])
        chunks += out.to_upstream
        code = out.client_close_code or code
    assert b"".join(chunks) == data and code == 4000
    events = _events(server, chunks)
    assert [e.data for e in events if isinstance(e, TextMessage)] == ["héllo", " world"]
    assert [e.code for e in events if isinstance(e, CloseConnection)] == [4000]


def test_relay_holds_a_scanner_only_while_a_frame_is_under_way() -> None:
    relay = WebSocketRelay(1 << 20)
    client, server = _peers()
    assert relay.at_rest
    frame = client.send(TextMessage(data="hello"))
    first = relay.from_client(frame[:3])  # a header cut in two: held back
    assert not relay.at_rest and first.to_upstream == []
    rest = relay.from_client(frame[3:])
    assert relay.at_rest
    assert _seen(_events(server, rest.to_upstream)) == [("text", b"hello")]
    # a fragmented message keeps its scanner until the last fragment
    out = relay.from_upstream(server.send(TextMessage(data="a", message_finished=False)))
    assert not relay.at_rest
    out.to_client += relay.from_upstream(server.send(TextMessage(data="b"))).to_client
    assert relay.at_rest
    assert _seen(_events(client, out.to_client)) == [("text", b"ab")]
    # the keep-alive pong is dropped, and a message over the limit still refused, from rest
    assert relay.from_client(client.send(Pong(KEEPALIVE_PING))).to_upstream == []
    assert relay.at_rest
    small = WebSocketRelay(10)
    assert small.from_client(client.send(BytesMessage(data=b"x" * 11))).client_close_code == 1009


def test_relay_idle_memory_is_small() -> None:
    client, server = _peers()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        relays = [WebSocketRelay(1 << 20) for _ in range(1000)]
        for relay in relays:  # a message each way, cut in two: idle again after it
            frame = client.send(BytesMessage(data=b"hello"))
            relay.from_client(frame[:3])
            relay.from_client(frame[3:])
            back = server.send(BytesMessage(data=b"hello"))
            relay.from_upstream(back[:1])
            relay.from_upstream(back[1:])
        per_relay = (tracemalloc.get_traced_memory()[0] - before) / len(relays)
    finally:
        tracemalloc.stop()
    # the relay object alone (no frame scanner): an idle tunnel's share of a worker's memory
    assert per_relay < 128, f"{per_relay:.0f} bytes per idle relay"


# -- property: whatever is sent arrives, however the bytes are cut --------------------------------

SIZES = st.one_of(
    st.sampled_from([0, 1, 125, 126, 127, 65535, 65536]), st.integers(min_value=0, max_value=300)
)


@st.composite
def conversations(draw: st.DrawFn) -> list[Event]:
    """Messages (some fragmented) with pings and pongs between and inside them."""
    events: list[Event] = []
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        text = draw(st.booleans())
        sizes = draw(st.lists(SIZES, min_size=1, max_size=3))
        for i, size in enumerate(sizes):
            finished = i == len(sizes) - 1
            if text:
                events.append(TextMessage(data="é" * (size // 2), message_finished=finished))
            else:
                events.append(BytesMessage(data=os.urandom(size), message_finished=finished))
            if draw(st.integers(min_value=0, max_value=3)) == 0:
                # (a Pong carrying fastproxy's keep-alive payload is dropped on purpose)
                payload = draw(st.binary(max_size=125).filter(lambda p: p != KEEPALIVE_PING))
                events.append(Ping(payload=payload) if draw(st.booleans()) else Pong(payload))
    return events


def _cut(data: bytes, points: list[int]) -> list[bytes]:
    cuts = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(cuts)]


def _seen(events: list[Event]) -> list[tuple[str, bytes]]:
    """What a peer saw: whole messages (as bytes) and control frames, in order."""
    seen: list[tuple[str, bytes]] = []
    parts: list[bytes] = []
    for event in events:
        if isinstance(event, Message):
            parts.append(event.data.encode() if isinstance(event.data, str) else event.data)
            if event.message_finished:
                kind = "text" if isinstance(event, TextMessage) else "bytes"
                seen.append((kind, b"".join(parts)))
                parts = []
        elif isinstance(event, Ping | Pong):
            seen.append((type(event).__name__, bytes(event.payload)))
    return seen


PROPERTY = settings(max_examples=150, deadline=None, database=None)


@PROPERTY
@given(conversation=conversations(), points=st.lists(st.integers(min_value=0), max_size=12))
def test_relay_property_client_to_upstream(conversation: list[Event], points: list[int]) -> None:
    relay = WebSocketRelay(1 << 20)
    client, server = _peers()
    data = b"".join(client.send(e) for e in conversation)
    forwarded: list[bytes] = []
    for chunk in _cut(data, points):
        out = relay.from_client(chunk)
        assert not out.done and out.to_client == []
        forwarded += out.to_upstream
    assert b"".join(forwarded) == data
    assert relay.at_rest  # every message ended: no scanner is left
    reference = Connection(ConnectionType.SERVER)
    reference.receive_data(data)
    assert _seen(_events(server, forwarded)) == _seen(list(reference.events()))


@PROPERTY
@given(conversation=conversations(), points=st.lists(st.integers(min_value=0), max_size=12))
def test_relay_property_upstream_to_client(conversation: list[Event], points: list[int]) -> None:
    relay = WebSocketRelay(1 << 20)
    client, server = _peers()
    data = b"".join(server.send(e) for e in conversation)
    forwarded: list[bytes] = []
    for chunk in _cut(data, points):
        out = relay.from_upstream(chunk)
        assert not out.done and out.to_upstream == []
        forwarded += out.to_client
    assert b"".join(forwarded) == data
    assert relay.at_rest
    reference = Connection(ConnectionType.CLIENT)
    reference.receive_data(data)
    assert _seen(_events(client, forwarded)) == _seen(list(reference.events()))


def test_whole_data_frames_pass_as_they_are_only_while_both_sides_are_open() -> None:
    relay = WebSocketRelay(100)
    client, server = _peers()
    frame = client.send(BytesMessage(data=b"x" * 32))
    assert relay.client_passes(frame)
    assert not relay.client_passes(frame[:-1])  # not whole
    assert not relay.client_passes(frame + frame)  # more than one frame
    assert not relay.client_passes(client.send(BytesMessage(data=b"y" * 101)))  # over the limit
    assert not relay.client_passes(client.send(Ping(payload=b"p")))  # control frames: from_client
    assert not relay.client_passes(server.send(BytesMessage(data=b"z")))  # unmasked from a client
    back = server.send(TextMessage(data="ok"))
    assert relay.upstream_passes(back) and not relay.upstream_passes(frame)
    relay.from_upstream(server.send(CloseConnection(code=1000)))  # the upstream starts closing
    assert not relay.client_passes(frame) and not relay.upstream_passes(back)
