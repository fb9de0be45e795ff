"""The WebSocket relay after a checked 101: frames both ways, as they arrive.

[pure] Imports ``wsframe`` only: no asyncio, sockets, clock, logging or third-party package.

Theory of operation
-------------------
``expected_accept`` and ``upgrade_accepted`` decide whether the upstream's 101 really completes
the client's handshake (RFC 6455 4.2.2); only then does the worker open a tunnel.

In ``VALIDATE`` mode each direction has a ``wsframe.FrameScanner`` while something is under way
in it (a payload still to come, a header or a control frame held back, a fragmented message); a
read that is one whole data frame is checked by ``wsframe.whole_data_frame`` alone, and an idle
tunnel holds no scanner at all (a scanner at rest is dropped). Client frames must be masked
(RFC 6455 5.1), upstream frames must not be, and both must be well formed (5.2-5.5); a client's
message may not exceed ``max_message_bytes``. The scanners check frame headers only and forward
the bytes as received, as soon as they arrive: payloads are neither unmasked nor re-framed, and
Text payloads are not checked for UTF-8 (RFC 6455 8.1 leaves that to the endpoints; see
``wsframe``). In ``TUNNEL`` mode the worker relays bytes without a relay at all.

Close handshake (RFC 6455 7.1): each side's Close is relayed to the other as it came; once a side
has sent Close, its later bytes are ignored and frames towards it are dropped, and the relay is
``done`` when both sides have sent Close. A protocol error from the client is answered with a
Close 1002 (1009 for a message too big, 1007 for a close reason that is not UTF-8) to the client
and a Close 1001 to the upstream; one from the upstream with a Close 1011 to the client. Either
way the relay is ``done``. Pongs answering fastproxy's keep-alive pings are not relayed.

The frames fastproxy itself writes (keep-alive Ping, Close) go only where no frame is half
forwarded (``FrameScanner.mid_frame``); a Close that cannot be sent is left out, and the
connection is closed without it.

Methods return a ``RelayOutput``: bytes to write to each side, whether the relay is done, and
the close code seen from the client (for metrics).
"""

from __future__ import annotations

import base64
import hashlib

from fastproxy.wsframe import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_NORMAL,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    OP_PING,
    FrameError,
    FrameScanner,
    close_frame,
    control_frame,
    whole_data_frame,
)

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL_ERROR",
    "CLOSE_NORMAL",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_TOO_BIG",
    "KEEPALIVE_PING",
    "RelayOutput",
    "WebSocketRelay",
    "expected_accept",
    "upgrade_accepted",
]

# RFC 6455 1.3: the GUID appended to Sec-WebSocket-Key
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# Payload of the keep-alive pings fastproxy sends to idle clients; their pongs are not relayed.
KEEPALIVE_PING = b"fastproxy-keepalive"
_KEEPALIVE_FRAME = control_frame(OP_PING, KEEPALIVE_PING, masked=False)


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
        #: bytes for ``writelines`` towards each side
        self.to_client: list[bytes] = []
        self.to_upstream: list[bytes] = []
        #: the relay is finished: flush the bytes above, then close both connections
        self.done = False
        #: close code the client sent (or was sent for a protocol error), for metrics
        self.client_close_code: int | None = None


# The close handshake, as bits of ``WebSocketRelay._state`` (0 while open). Plain ints rather
# than an enum.Flag: the state is tested on every read.
_CLIENT_CLOSED = 1  # the client sent Close
_UPSTREAM_CLOSED = 2  # the upstream sent Close
_CLIENT_TOLD = 4  # a Close was written to the client
_UPSTREAM_TOLD = 8  # a Close was written to the upstream
_DONE = 16  # finished (both closed, a protocol error, or going away)


class WebSocketRelay:
    """Validate and relay frames between a client and an upstream (``VALIDATE`` mode)."""

    __slots__ = ("_client", "_limit", "_state", "_upstream")

    def __init__(self, max_message_bytes: int) -> None:
        self._limit = max_message_bytes
        # Each direction's scanner exists only while it is inside something: a payload still to
        # come, a header or a control frame held back, a fragmented message. A scanner at rest
        # is in the state of a fresh one, so it is dropped, and an idle tunnel holds none.
        # frames from the client: masked, size limit, pongs to our keep-alive pings dropped
        self._client: FrameScanner | None = None
        # frames from the upstream
        self._upstream: FrameScanner | None = None
        self._state = 0

    @property
    def at_rest(self) -> bool:
        """No frame is under way either way: the relay holds no scanner."""
        return self._client is None and self._upstream is None

    def client_passes(self, data: bytes) -> bool:
        """``data`` from the client may be forwarded as it is, with nothing else to do: both
        sides are open and it is one whole, checked data frame (the common read). Otherwise
        ``from_client`` decides."""
        if self._state:
            return False
        scanner = self._client
        if scanner is None:
            return whole_data_frame(data, 0x80, self._limit)
        return scanner.whole_data_frame(data)

    def upstream_passes(self, data: bytes) -> bool:
        """``client_passes`` for ``data`` from the upstream."""
        if self._state:
            return False
        scanner = self._upstream
        if scanner is None:
            return whole_data_frame(data, 0, 0)
        return scanner.whole_data_frame(data)

    def from_client(self, data: bytes) -> RelayOutput:
        """Bytes read from the client."""
        out = RelayOutput()
        state = self._state
        if state & (_CLIENT_CLOSED | _DONE):
            # nothing may follow the client's Close (RFC 6455 5.5.1)
            out.done = state >= _DONE
            return out
        scanner = self._client
        if scanner is None:
            scanner = self._client = FrameScanner(
                masked=True, max_message_bytes=self._limit, drop_pong=KEEPALIVE_PING
            )
        try:
            close = scanner.feed(
                data, not state & (_UPSTREAM_CLOSED | _UPSTREAM_TOLD), out.to_upstream
            )
        except FrameError as error:
            self._fail_client(out, error.code, error.reason)
            return out
        if scanner.at_rest:
            self._client = None
        if close is not None:
            code, frame = close
            out.client_close_code = code
            if not state & _UPSTREAM_TOLD:
                out.to_upstream.append(frame)
            state |= _CLIENT_CLOSED | _UPSTREAM_TOLD
            if state & _UPSTREAM_CLOSED:
                # the client's Close answers the upstream's: the handshake is complete
                state |= _DONE
                out.done = True
            self._state = state
        return out

    def from_upstream(self, data: bytes) -> RelayOutput:
        """Bytes read from the upstream."""
        out = RelayOutput()
        state = self._state
        if state & (_UPSTREAM_CLOSED | _DONE):
            out.done = state >= _DONE
            return out
        scanner = self._upstream
        if scanner is None:
            scanner = self._upstream = FrameScanner(masked=False)
        try:
            close = scanner.feed(data, not state & (_CLIENT_CLOSED | _CLIENT_TOLD), out.to_client)
        except FrameError:
            # the upstream broke the protocol: tell the client the server failed
            if not state & _CLIENT_TOLD:
                out.to_client.append(close_frame(CLOSE_INTERNAL_ERROR, masked=False))
            self._state = state | _CLIENT_TOLD | _DONE
            out.done = True
            return out
        if scanner.at_rest:
            self._upstream = None
        if close is not None:
            _code, frame = close
            if not state & _CLIENT_TOLD:
                out.to_client.append(frame)
            state |= _UPSTREAM_CLOSED | _CLIENT_TOLD
            if state & _CLIENT_CLOSED:
                state |= _DONE
                out.done = True
            self._state = state
        return out

    def _fail_client(self, out: RelayOutput, code: int, reason: bytes) -> None:
        # RFC 6455 7.1.7: _Fail the WebSocket Connection_, telling both sides why
        out.client_close_code = code
        state = self._state
        if not state & _CLIENT_TOLD and not _mid_frame(self._upstream):
            out.to_client.append(close_frame(code, reason, masked=False))
        if not state & _UPSTREAM_TOLD:
            # the client's frames before the bad one all ended: no frame is open upstream
            out.to_upstream.append(close_frame(CLOSE_GOING_AWAY, masked=True))
        self._state = state | _CLIENT_TOLD | _UPSTREAM_TOLD | _DONE
        out.done = True

    @property
    def closing(self) -> bool:
        """A close handshake is under way (or over): one side sent or was sent a Close."""
        return self._state != 0

    def ping_client(self) -> bytes:
        """A keep-alive ping for an idle client, or ``b""`` once closing or mid-frame."""
        if self._state & (_CLIENT_CLOSED | _CLIENT_TOLD | _DONE) or _mid_frame(self._upstream):
            return b""
        return _KEEPALIVE_FRAME

    def going_away(self) -> RelayOutput:
        """Close both sides with 1001 (shutdown, idle timeout)."""
        out = RelayOutput()
        state = self._state
        if not state & (_CLIENT_TOLD | _DONE) and not _mid_frame(self._upstream):
            out.to_client.append(close_frame(CLOSE_GOING_AWAY, masked=False))
        if not state & (_UPSTREAM_TOLD | _DONE) and not _mid_frame(self._client):
            out.to_upstream.append(close_frame(CLOSE_GOING_AWAY, masked=True))
        self._state = state | _CLIENT_TOLD | _UPSTREAM_TOLD | _DONE
        out.done = True
        return out


def _mid_frame(scanner: FrameScanner | None) -> bool:
    return scanner is not None and scanner.mid_frame
