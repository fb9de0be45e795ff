"""The WebSocket relay after a checked 101: frames both ways, as they arrive.

[pure] Imports wsproto only: no asyncio, sockets, clock or logging. wsproto is used here and
nowhere else.

Theory of operation
-------------------
``expected_accept`` and ``upgrade_accepted`` decide whether the upstream's 101 really completes
the client's handshake (RFC 6455 4.2.2); only then does the worker open a tunnel.

In ``VALIDATE`` mode each leg has one wsproto ``Connection``: the client leg in the SERVER role
(client frames must be masked and well formed, RFC 6455 5.1) and the upstream leg in the CLIENT
role. Every frame is forwarded as soon as it is parsed, without waiting for whole messages.
Close frames are relayed so each side sees the other's close code, and the relay is ``done``
when both close handshakes completed or one side broke the protocol. In ``TUNNEL`` mode bytes
are relayed unparsed, for the lowest cost.

Methods return a ``RelayOutput``: bytes to write to each side, whether the relay is done, and
the close code seen from the client (for metrics).
"""

from __future__ import annotations

import base64
import hashlib

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, Pong, TextMessage

# RFC 6455 1.3: the GUID appended to Sec-WebSocket-Key
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# Payload of the keep-alive pings fastproxy sends to idle clients; their pongs are not relayed.
KEEPALIVE_PING = b"fastproxy-keepalive"

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_TOO_BIG = 1009
_UNSENDABLE = frozenset({1005, 1006, 1015})  # RFC 6455 7.4.1: never put on the wire


def expected_accept(key: bytes) -> bytes:
    """RFC 6455 4.2.2: ``base64(sha1(key + GUID))``."""
    return base64.b64encode(hashlib.sha1(key.strip() + _WS_GUID).digest())  # noqa: S324


def upgrade_accepted(key: bytes, headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a 101's headers complete the handshake started with ``key``.

    The accept must match exactly once, the upgrade must be to websocket, and no extension may
    have been negotiated (fastproxy strips ``Sec-WebSocket-Extensions`` from the request).
    """
    accepts = [v for n, v in headers if n.lower() == b"sec-websocket-accept"]
    upgrades = [v.strip().lower() for n, v in headers if n.lower() == b"upgrade"]
    extensions = [v for n, v in headers if n.lower() == b"sec-websocket-extensions"]
    return accepts == [expected_accept(key)] and upgrades == [b"websocket"] and not extensions


class RelayOutput:
    """What to do after feeding the relay."""

    __slots__ = ("client_close_code", "done", "to_client", "to_upstream")

    def __init__(self) -> None:
        self.to_client: list[bytes] = []
        self.to_upstream: list[bytes] = []
        #: the relay is finished: flush the bytes above, then close both connections
        self.done = False
        #: close code the client sent (or was sent for a protocol error), for metrics
        self.client_close_code: int | None = None


def _close_event(code: int, reason: str | None) -> CloseConnection:
    if code in _UNSENDABLE:
        return CloseConnection(code=CLOSE_NORMAL if code == 1005 else CLOSE_GOING_AWAY)
    return CloseConnection(code=code, reason=reason)


class WebSocketRelay:
    """Validate and relay frames between a client and an upstream (``VALIDATE`` mode)."""

    __slots__ = ("_client", "_message_bytes", "_upstream", "max_message_bytes")

    def __init__(self, max_message_bytes: int) -> None:
        self._client = Connection(ConnectionType.SERVER)
        self._upstream = Connection(ConnectionType.CLIENT)
        self.max_message_bytes = max_message_bytes
        self._message_bytes = 0

    def from_client(self, data: bytes) -> RelayOutput:
        out = RelayOutput()
        client, upstream = self._client, self._upstream
        client.receive_data(data)
        for event in client.events():
            if isinstance(event, Message):
                payload = event.data
                size = len(payload.encode()) if isinstance(payload, str) else len(payload)
                self._message_bytes += size
                if self._message_bytes > self.max_message_bytes:
                    self._fail_client(out, CLOSE_TOO_BIG, "message too big")
                    return out
                if event.message_finished:
                    self._message_bytes = 0
                if upstream.state is ConnectionState.OPEN:
                    relayed: TextMessage | BytesMessage = (
                        TextMessage(data=payload, message_finished=event.message_finished)
                        if isinstance(event, TextMessage)
                        else BytesMessage(
                            data=bytes(payload), message_finished=event.message_finished
                        )
                    )
                    out.to_upstream.append(upstream.send(relayed))
            elif isinstance(event, Ping):
                if upstream.state is ConnectionState.OPEN:
                    out.to_upstream.append(upstream.send(Ping(payload=bytes(event.payload))))
            elif isinstance(event, Pong):
                if event.payload != KEEPALIVE_PING and upstream.state is ConnectionState.OPEN:
                    out.to_upstream.append(upstream.send(Pong(payload=bytes(event.payload))))
            elif isinstance(event, CloseConnection):
                out.client_close_code = event.code
                if client.state is ConnectionState.OPEN:
                    # wsproto could not parse the client's frames: a protocol error
                    self._fail_client(out, event.code, event.reason)
                    return out
                self._relay_close(event, client, upstream, out.to_upstream, out)
        return out

    def from_upstream(self, data: bytes) -> RelayOutput:
        out = RelayOutput()
        client, upstream = self._client, self._upstream
        upstream.receive_data(data)
        for event in upstream.events():
            if isinstance(event, Message):
                if client.state is ConnectionState.OPEN:
                    relayed: TextMessage | BytesMessage = (
                        TextMessage(data=event.data, message_finished=event.message_finished)
                        if isinstance(event, TextMessage)
                        else BytesMessage(
                            data=bytes(event.data), message_finished=event.message_finished
                        )
                    )
                    out.to_client.append(client.send(relayed))
            elif isinstance(event, Ping):
                if client.state is ConnectionState.OPEN:
                    out.to_client.append(client.send(Ping(payload=bytes(event.payload))))
            elif isinstance(event, Pong):
                if client.state is ConnectionState.OPEN:
                    out.to_client.append(client.send(Pong(payload=bytes(event.payload))))
            elif isinstance(event, CloseConnection):
                if upstream.state is ConnectionState.OPEN:
                    # the upstream broke the protocol: tell the client the server failed
                    if client.state is ConnectionState.OPEN:
                        out.to_client.append(client.send(CloseConnection(code=1011)))
                    out.done = True
                    return out
                self._relay_close(event, upstream, client, out.to_client, out)
        return out

    @staticmethod
    def _relay_close(
        event: CloseConnection,
        source: Connection,
        other: Connection,
        to_other: list[bytes],
        out: RelayOutput,
    ) -> None:
        if other.state is ConnectionState.OPEN:
            # ``source`` started the close: pass it on and wait for ``other``'s reply
            to_other.append(other.send(_close_event(event.code, event.reason)))
        elif other.state is ConnectionState.REMOTE_CLOSING:
            # ``other`` closed first and this is ``source``'s reply: complete ``other``'s close
            to_other.append(other.send(_close_event(event.code, event.reason)))
            out.done = True
        if source.state is ConnectionState.CLOSED and other.state is ConnectionState.CLOSED:
            out.done = True

    def _fail_client(self, out: RelayOutput, code: int, reason: str | None) -> None:
        out.client_close_code = code
        if self._client.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            out.to_client.append(self._client.send(CloseConnection(code=code, reason=reason)))
        if self._upstream.state is ConnectionState.OPEN:
            out.to_upstream.append(self._upstream.send(CloseConnection(code=CLOSE_GOING_AWAY)))
        out.done = True

    @property
    def closing(self) -> bool:
        """A close handshake is under way: one side sent Close and the other has not answered."""
        return (
            self._client.state is not ConnectionState.OPEN
            or self._upstream.state is not ConnectionState.OPEN
        )

    def ping_client(self) -> bytes:
        """A keep-alive ping for an idle client, or ``b""`` once closing."""
        if self._client.state is ConnectionState.OPEN:
            return self._client.send(Ping(payload=KEEPALIVE_PING))
        return b""

    def going_away(self) -> RelayOutput:
        """Close both sides with 1001 (shutdown, idle timeout)."""
        out = RelayOutput()
        if self._client.state is ConnectionState.OPEN:
            out.to_client.append(self._client.send(CloseConnection(code=CLOSE_GOING_AWAY)))
        if self._upstream.state is ConnectionState.OPEN:
            out.to_upstream.append(self._upstream.send(CloseConnection(code=CLOSE_GOING_AWAY)))
        out.done = True
        return out
