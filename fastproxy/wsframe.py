"""RFC 6455 framing for the relay: check each frame's header, forward the bytes as they came.

[pure] Imports ``os`` only (masking keys for the frames fastproxy sends): no asyncio, sockets,
clock, logging, and no third-party package. ``wsrelay`` is its only user.

Theory of operation
-------------------
A ``FrameScanner`` follows one direction of a WebSocket connection. It is a small state machine
over the byte stream: at a frame boundary it decodes the 2..14-byte header (FIN, RSV1-3, opcode,
MASK, 7/16/64-bit length, masking key, RFC 6455 5.2), checks it, then lets ``payload_length``
bytes through without looking at them, then reads the next header. What it forwards are the
received chunks themselves, or slices of them where something had to be cut out: the payload
of a data frame is never unmasked, re-masked or copied into a new frame.

Invariants:

- Only whole, checked headers are forwarded. A header split across reads is held back (at most
  14 bytes) until it is complete, so a refused frame never reaches the other side in part.
- A control frame is at most 131 bytes (RFC 6455 5.5) and is held back whole until it has all
  arrived: Close must be checked and keep-alive Pongs dropped before anything of them is sent.
- Once a data frame's header has been forwarded, all its payload is forwarded too (or, for a
  frame dropped at its header, none of it); nothing may be written into that direction until
  the frame ends (``mid_frame``), or the peer would read our bytes as payload.

What is checked, on every frame, both ways (RFC 6455 5.2-5.5): RSV1-3 are zero (the proxy
strips ``Sec-WebSocket-Extensions``, so no extension can give them a meaning); the opcode is
known; the MASK bit is set on client frames and clear on server frames (5.1); control frames
have FIN and at most 125 bytes of payload; a continuation frame comes only inside a fragmented
message and a new Text or Binary frame never does (5.4); a 64-bit length has its top bit clear.
A message from the client may not exceed ``max_message_bytes`` over all its fragments (1009,
checked at each header, before the frame is forwarded). A Close must carry no payload or a
status code a peer may send (7.4) and a UTF-8 reason.

What is not checked: data frame payloads are not unmasked, so Text messages are not checked for
UTF-8. RFC 6455 8.1 puts that check on the endpoint that receives the message ("the endpoint
MUST _Fail the WebSocket Connection_"), which both ends of the tunnel are; checking it here would
mean unmasking every byte, most of the relay's cost. Nor do 16- and 64-bit lengths have to be
minimal: RFC 6455 5.2 says "the minimal number of bytes MUST be used to encode the length" of
the sender, but gives the receiver no rule to fail on, and refusing it buys nothing here.
"""

from __future__ import annotations

import os

# RFC 6455 5.2 opcodes
OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

# RFC 6455 7.4.1 status codes fastproxy sends or reports
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_NO_STATUS = 1005  # reported (never sent) for a Close without a payload
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011

# RFC 6455 5.5: control frames carry at most 125 bytes (held whole: 131 with the header and key)
MAX_CONTROL_PAYLOAD = 125


def close_code_allowed(code: int) -> bool:
    """Whether a peer may put ``code`` in a Close frame (RFC 6455 7.4.1, 7.4.2).

    1000-1003 and 1007-1011 are RFC 6455's; 1012-1014 (service restart, try again later, bad
    gateway) are registered with IANA and sent by real servers when they restart (wsproto
    accepts 1012 and 1013 as well). 3000-4999 belong to libraries and applications. 1004 is
    reserved; 1005, 1006 and 1015 must never be sent; the rest of 0-2999 is unassigned.
    """
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def xor_mask(payload: bytes, key: bytes) -> bytes:
    """Mask or unmask ``payload`` with a 4-byte ``key`` (RFC 6455 5.3); only for small payloads."""
    n = len(payload)
    if not n:
        return b""
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def control_frame(opcode: int, payload: bytes, *, masked: bool) -> bytes:
    """One control frame of fastproxy's own: masked with a fresh key towards a server (5.3)."""
    if not masked:
        return bytes((0x80 | opcode, len(payload))) + payload
    key = os.urandom(4)
    return bytes((0x80 | opcode, 0x80 | len(payload))) + key + xor_mask(payload, key)


def close_frame(code: int, reason: bytes = b"", *, masked: bool) -> bytes:
    """A Close frame with ``code`` and ``reason`` (cut to fit 125 bytes)."""
    return control_frame(
        OP_CLOSE, code.to_bytes(2, "big") + reason[: MAX_CONTROL_PAYLOAD - 2], masked=masked
    )


def close_status(payload: bytes) -> int:
    """The status code of a Close frame's (unmasked) payload; ``FrameError`` if it is not valid.

    RFC 6455 5.5.1: no payload, or a 2-byte status code then a UTF-8 reason; 1005 stands for
    "no status" (7.4.1), as wsproto and browsers report it.
    """
    n = len(payload)
    if not n:
        return CLOSE_NO_STATUS
    if n == 1:
        raise FrameError(CLOSE_PROTOCOL_ERROR, b"close frame with a 1-byte payload")
    code = payload[0] << 8 | payload[1]
    if not close_code_allowed(code):
        raise FrameError(CLOSE_PROTOCOL_ERROR, b"close code %d not allowed" % code)
    try:
        payload[2:].decode()
    except UnicodeDecodeError:
        raise FrameError(CLOSE_INVALID_DATA, b"close reason is not UTF-8") from None
    return code


class FrameError(Exception):
    """The peer broke RFC 6455: fail the connection with ``code`` (``reason`` goes in the Close)."""

    def __init__(self, code: int, reason: bytes) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


def _refused(
    out: list[bytes],
    data: bytes,
    run: int,
    end: int,
    reason: bytes,
    code: int = CLOSE_PROTOCOL_ERROR,
) -> FrameError:
    # the frames before the bad one were good: they go out before the Close
    if end > run:
        out.append(data[run:end])
    return FrameError(code, reason)


def whole_data_frame(data: bytes, mask_bit: int, limit: int) -> bool:
    """Whether ``data`` is exactly one whole, unfragmented Text or Binary frame (7- or 16-bit
    length) that passes every check, read at a frame boundary outside a fragmented message:
    ``mask_bit`` is 0x80 for client frames (RFC 6455 5.1), 0 for server frames; ``limit`` is
    the message size limit (0: none)."""
    n = len(data)
    if n <= 3:
        return False
    b0 = data[0]
    b1 = data[1]
    if (b0 != 0x82 and b0 != 0x81) or (b1 & 0x80) != mask_bit:
        return False
    short = 6 if mask_bit else 2
    length = b1 & 0x7F
    if length < 126:
        whole = n - length == short
    elif length == 126:
        length = data[2] << 8 | data[3]
        whole = n - length == short + 2
    else:
        return False
    return whole and not length > limit > 0


class FrameScanner:
    """One direction of a WebSocket: check headers, pass the bytes through.

    ``masked``: whether this direction's frames must be masked (client to server, RFC 6455 5.1).
    ``max_message_bytes``: limit on one message over all its fragments, 0 for none.
    ``drop_pong``: a Pong with exactly this payload is not forwarded (the answers to fastproxy's
    own keep-alive pings); ``b""`` drops none.
    """

    __slots__ = (
        "_drop_pong",
        "_fragmented",
        "_held",
        "_limit",
        "_mask_bit",
        "_message",
        "_rest",
        "copied",
    )

    def __init__(self, *, masked: bool, max_message_bytes: int = 0, drop_pong: bytes = b"") -> None:
        self._mask_bit = 0x80 if masked else 0
        self._limit = max_message_bytes
        self._drop_pong = drop_pong
        # payload bytes of the current data frame still to come; negative for a dropped frame
        self._rest = 0
        # the start of a frame whose header (or, for a control frame, payload) is incomplete
        self._held = b""
        # inside a fragmented message (RFC 6455 5.4)
        self._fragmented = False
        # bytes of the current message so far, counted only when there is a limit
        self._message = 0
        #: bytes moved between buffers (the linear-time guard reads it)
        self.copied = 0

    @property
    def mid_frame(self) -> bool:
        """Part of a data frame was forwarded but not all: nothing else may go that way now."""
        return self._rest > 0

    @property
    def at_rest(self) -> bool:
        """At a frame boundary outside a fragmented message, holding nothing: the state of a
        fresh scanner (``wsrelay`` drops a scanner at rest and makes a new one when needed)."""
        return not self._rest and not self._held and not self._fragmented

    def whole_data_frame(self, data: bytes) -> bool:
        """Whether ``data`` is exactly one whole, unfragmented Text or Binary frame (7- or 16-bit
        length) that passes every check: the common read, forwarded as it is without ``feed``.
        """
        if self._rest or self._held or self._fragmented:
            return False
        return whole_data_frame(data, self._mask_bit, self._limit)

    def feed(self, data: bytes, forward: bool, out: list[bytes]) -> tuple[int, bytes] | None:
        """Scan ``data`` and append to ``out`` what is to be forwarded.

        With ``forward`` false the frames that start in ``data`` are checked but dropped. Returns
        ``(code, frame)`` when a Close ends the scan: ``frame`` is the Close as received and
        ``code`` its status (1005 for none); what follows a Close is ignored. Otherwise returns
        None. Raises ``FrameError`` after appending the good frames before the bad one.
        """
        if self.whole_data_frame(data):
            if forward:
                out.append(data)
            return None
        rest = self._rest
        n = len(data)
        if rest:
            # inside a data frame's payload
            if rest > 0:
                if rest >= n:
                    self._rest = rest - n
                    out.append(data)
                    return None
                pos = rest
                run = 0
            else:
                if -rest >= n:
                    self._rest = rest + n
                    return None
                pos = run = -rest
            self._rest = 0
        else:
            held = self._held
            if held:
                data = held + data
                self._held = b""
                n = len(data)
                self.copied += n
            pos = run = 0
        mask_bit = self._mask_bit
        # invariant: a frame starts at ``pos``, and data[run:pos] is still to be forwarded
        while pos < n:
            if pos + 1 == n:
                break
            b0 = data[pos]
            b1 = data[pos + 1]
            if b0 & 0x70:
                raise _refused(out, data, run, pos, b"reserved bit set")
            if (b1 & 0x80) != mask_bit:
                reason = b"masked server frame" if mask_bit == 0 else b"unmasked client frame"
                raise _refused(out, data, run, pos, reason)
            opcode = b0 & 0x0F
            length = b1 & 0x7F
            if opcode > OP_BINARY:
                if opcode > OP_PONG or opcode < OP_CLOSE:
                    raise _refused(out, data, run, pos, b"unknown opcode %d" % opcode)
                if b0 < 0x80:
                    raise _refused(out, data, run, pos, b"fragmented control frame")
                if length > MAX_CONTROL_PAYLOAD:
                    raise _refused(out, data, run, pos, b"control frame over 125 bytes")
                start = pos + 6 if mask_bit else pos + 2
                end = start + length
                if end > n:
                    break  # held back until all of it is here
                keep = forward
                if opcode == OP_CLOSE:
                    payload = data[start:end]
                    if mask_bit:
                        payload = xor_mask(payload, data[start - 4 : start])
                    if pos > run:
                        out.append(data[run:pos])
                    return close_status(payload), data[pos:end]
                if opcode == OP_PONG and length and length == len(self._drop_pong):
                    payload = data[start:end]
                    if mask_bit:
                        payload = xor_mask(payload, data[start - 4 : start])
                    if payload == self._drop_pong:
                        keep = False
                if not keep:
                    if pos > run:
                        out.append(data[run:pos])
                    run = end
                pos = end
                continue
            if opcode == OP_CONTINUATION:
                if not self._fragmented:
                    reason = b"continuation frame outside a fragmented message"
                    raise _refused(out, data, run, pos, reason)
            elif self._fragmented:
                raise _refused(out, data, run, pos, b"new message inside a fragmented one")
            if length < 126:
                start = pos + 2
            elif length == 126:
                start = pos + 4
                if start > n:
                    break
                length = data[pos + 2] << 8 | data[pos + 3]
            else:
                start = pos + 10
                if start > n:
                    break
                length = int.from_bytes(data[pos + 2 : start], "big")
                if length >> 63:
                    reason = b"64-bit length with the most significant bit set"
                    raise _refused(out, data, run, pos, reason)
            if mask_bit:
                start += 4
                if start > n:
                    break
            # the header is whole and good
            self._fragmented = b0 < 0x80
            limit = self._limit
            if limit:
                size = self._message + length
                if size > limit:
                    raise _refused(out, data, run, pos, b"message too big", CLOSE_TOO_BIG)
                self._message = size if b0 < 0x80 else 0
            if not forward:
                if pos > run:
                    out.append(data[run:pos])
                run = start + length
            pos = start + length
        if pos > n:
            # the last frame goes on in the next read
            self._rest = pos - n if forward else n - pos
            pos = n
        elif pos < n:
            self._held = data[pos:]
            self.copied += n - pos
        if pos > run:
            out.append(data if run == 0 and pos == n else data[run:pos])
        return None


class FrameTracker:
    """Where the frame boundaries fall in one direction of a ``tunnel``-mode WebSocket.

    Nothing is checked: only the lengths in the frame headers are read, which is just enough to
    write a frame of fastproxy's own (a Close 1001 at shutdown) between two of the peer's. A
    header split across reads is kept (at most 13 bytes) until the rest arrives.
    """

    __slots__ = ("_head", "_left")

    def __init__(self) -> None:
        self._head = b""
        #: payload bytes of the current frame still to come
        self._left = 0

    @property
    def mid_frame(self) -> bool:
        return self._left > 0 or bool(self._head)

    def feed(self, data: bytes) -> None:
        size = len(data)
        left = self._left
        if left >= size:  # the common read: inside one frame's payload
            self._left = left - size
            return
        pos = left
        if self._head:
            data = self._head + data  # at most 13 bytes of a header, once
            size = len(data)
            pos = 0
            self._head = b""
        while pos < size:
            if size - pos < 2:
                self._head = data[pos:]
                self._left = 0
                return
            second = data[pos + 1]
            length = second & 0x7F
            extra = 2 if length == 126 else 8 if length == 127 else 0
            need = 2 + extra + (4 if second & 0x80 else 0)
            if size - pos < need:
                self._head = data[pos:]
                self._left = 0
                return
            if extra:
                length = int.from_bytes(data[pos + 2 : pos + 2 + extra], "big")
            pos += need + length
        self._left = pos - size
