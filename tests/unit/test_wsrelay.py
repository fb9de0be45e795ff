"""WebSocket relay: accept check, frames both ways, close handshake, protocol errors."""

from __future__ import annotations

from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

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
