"""RFC 6455 frame scanning: headers checked, bytes forwarded as received, every refusal.

Valid frames come from wsproto ``Connection`` objects (the reference peers); frames wsproto will
not write (reserved bits, unknown opcodes, bad lengths) are built by hand with ``raw_frame``.
"""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Event, Message, Ping, Pong, TextMessage

from fastproxy.wsframe import (
    CLOSE_INVALID_DATA,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    FrameError,
    FrameScanner,
    FrameTracker,
    close_code_allowed,
    close_frame,
    close_status,
    control_frame,
    xor_mask,
)

KEEPALIVE = b"keepalive-payload"


def raw_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    masked: bool,
    fin: bool = True,
    rsv: int = 0,
    length_bytes: int | None = None,
    length: int | None = None,
) -> bytes:
    """A frame built by hand; ``length_bytes`` 0, 2 or 8 forces the length's encoding."""
    n = len(payload) if length is None else length
    if length_bytes is None:
        length_bytes = 0 if n < 126 else 2 if n < 1 << 16 else 8
    first = (0x80 if fin else 0) | rsv | opcode
    bit = 0x80 if masked else 0
    if length_bytes == 0:
        head = bytes((first, bit | n))
    elif length_bytes == 2:
        head = bytes((first, bit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, bit | 127)) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + xor_mask(payload, key)


def client_scanner(limit: int = 1 << 20) -> FrameScanner:
    return FrameScanner(masked=True, max_message_bytes=limit, drop_pong=KEEPALIVE)


def server_scanner() -> FrameScanner:
    return FrameScanner(masked=False)


def events_of(conn: Connection, data: bytes) -> list[Event]:
    conn.receive_data(data)
    return list(conn.events())


def messages_of(events: list[Event]) -> list[bytes | str]:
    """Whole messages, with their fragments put together."""
    done: list[bytes | str] = []
    parts: list[bytes | str] = []
    for event in events:
        if isinstance(event, Message):
            parts.append(event.data)
            if event.message_finished:
                done.append(
                    "".join(p for p in parts if isinstance(p, str))
                    if isinstance(event, TextMessage)
                    else b"".join(p for p in parts if isinstance(p, bytes | bytearray))
                )
                parts = []
    return done


def feed_bytewise(scanner: FrameScanner, data: bytes) -> list[bytes]:
    out: list[bytes] = []
    for i in range(len(data)):
        assert scanner.feed(data[i : i + 1], True, out) is None
    return out


# -- helpers ------------------------------------------------------------------------------------


def test_xor_mask_is_its_own_inverse_and_matches_rfc6455_example() -> None:
    # RFC 6455 5.7: "Hello" masked with 37 fa 21 3d
    key = bytes.fromhex("37fa213d")
    assert xor_mask(b"Hello", key) == bytes.fromhex("7f9f4d5158")
    assert xor_mask(xor_mask(b"abcdefghij", key), key) == b"abcdefghij"
    assert xor_mask(b"", key) == b""


@pytest.mark.parametrize("masked", [True, False])
def test_close_frame_is_read_by_wsproto(masked: bool) -> None:
    # a masked frame is read by a server, an unmasked one by a client
    peer = Connection(ConnectionType.SERVER if masked else ConnectionType.CLIENT)
    [event] = events_of(peer, close_frame(1001, b"bye", masked=masked))
    assert isinstance(event, CloseConnection)
    assert (event.code, event.reason) == (1001, "bye")


def test_close_frame_reason_is_cut_to_fit_a_control_frame() -> None:
    frame = close_frame(1002, b"x" * 300, masked=False)
    assert len(frame) == 2 + 125


def test_control_frame_masked_ping_is_read_by_wsproto() -> None:
    [event] = events_of(
        Connection(ConnectionType.SERVER), control_frame(OP_PING, b"p", masked=True)
    )
    assert isinstance(event, Ping) and event.payload == b"p"


@pytest.mark.parametrize(
    "code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999]
)
def test_close_code_allowed(code: int) -> None:
    assert close_code_allowed(code)
    assert close_status(code.to_bytes(2, "big") + "ok é".encode()) == code


@pytest.mark.parametrize(
    "code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]
)
def test_close_code_refused(code: int) -> None:
    assert not close_code_allowed(code)
    with pytest.raises(FrameError) as refused:
        close_status(code.to_bytes(2, "big"))
    assert refused.value.code == CLOSE_PROTOCOL_ERROR


def test_close_status_without_payload_is_1005() -> None:
    assert close_status(b"") == 1005


def test_close_status_one_byte_payload_refused() -> None:
    with pytest.raises(FrameError) as refused:
        close_status(b"\x03")
    assert refused.value.code == CLOSE_PROTOCOL_ERROR


def test_close_status_reason_must_be_utf8() -> None:
    with pytest.raises(FrameError) as refused:
        close_status(b"\x03\xe8\xff\xfe")
    assert refused.value.code == CLOSE_INVALID_DATA


# -- passing frames through ---------------------------------------------------------------------


def test_scanner_forwards_a_whole_frame_as_the_same_object() -> None:
    data = Connection(ConnectionType.CLIENT).send(BytesMessage(data=b"x" * 32))
    out: list[bytes] = []
    assert client_scanner().feed(data, True, out) is None
    assert len(out) == 1 and out[0] is data


@pytest.mark.parametrize("size", [0, 1, 125, 126, 4096, 65535, 65536])
@pytest.mark.parametrize("masked", [True, False], ids=["client", "server"])
def test_scanner_whole_frame_read_and_its_limit(size: int, masked: bool) -> None:
    sender = Connection(ConnectionType.CLIENT if masked else ConnectionType.SERVER)
    data = sender.send(BytesMessage(data=os.urandom(size)))
    out: list[bytes] = []
    FrameScanner(masked=masked, max_message_bytes=size or 1).feed(data, True, out)
    assert len(out) == 1 and out[0] is data
    if size > 1:
        with pytest.raises(FrameError) as refused:
            FrameScanner(masked=masked, max_message_bytes=size - 1).feed(data, True, out)
        assert refused.value.code == CLOSE_TOO_BIG
        assert len(out) == 1, "nothing of a frame over the limit is forwarded"


def test_scanner_forwards_many_frames_in_one_read_as_one_object() -> None:
    client = Connection(ConnectionType.CLIENT)
    data = b"".join(
        [
            client.send(TextMessage(data="a", message_finished=False)),
            client.send(Ping(payload=b"p")),
            client.send(TextMessage(data="b")),
            client.send(BytesMessage(data=b"c" * 70_000)),
            client.send(Pong(payload=b"other")),
        ]
    )
    out: list[bytes] = []
    assert client_scanner().feed(data, True, out) is None
    assert out == [data] and out[0] is data


SIZES = [0, 1, 125, 126, 127, 65535, 65536, 70_000]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("masked", [True, False], ids=["client", "server"])
def test_scanner_split_at_every_byte(size: int, masked: bool) -> None:
    sender = Connection(ConnectionType.CLIENT if masked else ConnectionType.SERVER)
    receiver = Connection(ConnectionType.SERVER if masked else ConnectionType.CLIENT)
    payload = os.urandom(size)
    data = sender.send(BytesMessage(data=payload)) + sender.send(Ping(payload=b"ping"))
    scanner = client_scanner() if masked else server_scanner()
    if size > 1000:
        # one byte at a time through the header and the frame after; the long payload at once
        header = 2 + (0 if size < 126 else 2 if size < 65536 else 8) + (4 if masked else 0)
        out = feed_bytewise(scanner, data[: header + 10])
        assert scanner.feed(data[header + 10 : -8], True, out) is None
        out += feed_bytewise(scanner, data[-8:])
    else:
        out = feed_bytewise(scanner, data)
    assert b"".join(out) == data
    events = events_of(receiver, b"".join(out))
    assert messages_of(events) == [payload]
    assert isinstance(events[-1], Ping)


@pytest.mark.parametrize("length_bytes", [2, 8])
def test_scanner_holds_back_a_partial_header(length_bytes: int) -> None:
    data = raw_frame(2, b"abc", masked=True, length_bytes=length_bytes)
    header = 2 + length_bytes + 4
    scanner = client_scanner()
    out: list[bytes] = []
    for i in range(header - 1):
        scanner.feed(data[i : i + 1], True, out)
        assert out == [], "nothing of a header goes out before all of it is checked"
    scanner.feed(data[header - 1 : header], True, out)
    assert b"".join(out) == data[:header]


@pytest.mark.parametrize("length_bytes", [2, 8])
def test_scanner_accepts_non_minimal_lengths(length_bytes: int) -> None:
    data = raw_frame(2, b"hello", masked=True, length_bytes=length_bytes)
    out: list[bytes] = []
    client_scanner().feed(data, True, out)
    assert out == [data]


def test_scanner_passes_a_long_payload_without_copying() -> None:
    data = raw_frame(2, os.urandom(100_000), masked=True)
    chunks = [data[:30_000], data[30_000:60_000], data[60_000:]]
    scanner = client_scanner()
    out: list[bytes] = []
    for chunk in chunks:
        scanner.feed(chunk, True, out)
    assert len(out) == 3 and all(o is c for o, c in zip(out, chunks, strict=True))
    assert not scanner.mid_frame


def test_scanner_mid_frame_while_a_forwarded_frame_is_unfinished() -> None:
    data = raw_frame(2, b"x" * 1000, masked=True)
    scanner = client_scanner()
    scanner.feed(data[:500], True, [])
    assert scanner.mid_frame
    scanner.feed(data[500:], True, [])
    assert not scanner.mid_frame


def test_scanner_drops_keepalive_pongs_only() -> None:
    client = Connection(ConnectionType.CLIENT)
    keepalive = client.send(Pong(payload=KEEPALIVE))
    other = client.send(Pong(payload=b"k" * len(KEEPALIVE)))
    empty = client.send(Pong(payload=b""))
    text = client.send(TextMessage(data="after"))
    out: list[bytes] = []
    client_scanner().feed(keepalive + other + keepalive + empty + text, True, out)
    assert b"".join(out) == other + empty + text


def test_scanner_server_pong_with_keepalive_payload_is_not_special() -> None:
    # only client pongs answer our pings; the server scanner drops nothing
    data = Connection(ConnectionType.SERVER).send(Pong(payload=KEEPALIVE))
    out: list[bytes] = []
    server_scanner().feed(data, True, out)
    assert out == [data]


def test_scanner_not_forwarding_still_checks_and_drops_whole_frames() -> None:
    client = Connection(ConnectionType.CLIENT)
    first = client.send(BytesMessage(data=b"a" * 1000))
    second = client.send(BytesMessage(data=b"b" * 10))
    scanner = client_scanner()
    out: list[bytes] = []
    scanner.feed(first[:100], False, out)
    scanner.feed(first[100:], True, out)  # the frame was dropped at its header: all of it goes
    assert out == []
    scanner.feed(second, True, out)
    assert out == [second]
    with pytest.raises(FrameError):
        scanner.feed(b"\x81\x05hello", False, out)  # unmasked: refused even when dropping


def test_scanner_frame_forwarded_at_its_header_is_finished_even_if_forwarding_stops() -> None:
    data = raw_frame(2, b"z" * 1000, masked=True)
    scanner = client_scanner()
    out: list[bytes] = []
    scanner.feed(data[:100], True, out)
    scanner.feed(data[100:], False, out)
    assert b"".join(out) == data


def test_scanner_tails_of_kept_and_dropped_frames_with_frames_after_them() -> None:
    client = Connection(ConnectionType.CLIENT)
    kept = client.send(BytesMessage(data=b"k" * 500))
    dropped = client.send(BytesMessage(data=b"d" * 500))
    after = client.send(BytesMessage(data=b"a" * 5))
    scanner = client_scanner()
    out: list[bytes] = []
    scanner.feed(kept[:100], True, out)
    # forwarding stops: the kept frame's tail still goes, the frames starting after it do not
    scanner.feed(kept[100:] + dropped[:100], False, out)
    assert b"".join(out) == kept
    # forwarding resumes: the dropped frame's tail stays dropped, the next frame goes
    scanner.feed(dropped[100:] + after, True, out)
    assert b"".join(out) == kept + after


def test_scanner_close_returns_code_and_frame_and_ignores_what_follows() -> None:
    client = Connection(ConnectionType.CLIENT)
    text = client.send(TextMessage(data="last"))
    close = client.send(CloseConnection(code=1000, reason="done"))
    out: list[bytes] = []
    result = client_scanner().feed(text + close + b"\x81\x85junk!", True, out)
    assert result == (1000, close)
    assert out == [text]


def test_scanner_close_without_status_is_1005() -> None:
    data = raw_frame(OP_CLOSE, masked=False)
    assert server_scanner().feed(data, True, []) == (1005, data)


# -- refusals -----------------------------------------------------------------------------------

REFUSED = [
    pytest.param(raw_frame(1, b"hi", masked=True, rsv=0x40), 1002, id="rsv1"),
    pytest.param(raw_frame(1, b"hi", masked=True, rsv=0x20), 1002, id="rsv2"),
    pytest.param(raw_frame(1, b"hi", masked=True, rsv=0x10), 1002, id="rsv3"),
    *(
        pytest.param(raw_frame(op, b"hi", masked=True), 1002, id=f"opcode-{op:x}")
        for op in (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF)
    ),
    pytest.param(raw_frame(1, b"hi", masked=False), 1002, id="unmasked"),
    pytest.param(raw_frame(OP_PING, b"p" * 126, masked=True), 1002, id="ping-126"),
    pytest.param(raw_frame(OP_CLOSE, b"\x03\xe8" + b"r" * 124, masked=True), 1002, id="close-126"),
    pytest.param(raw_frame(OP_PING, b"p", masked=True, fin=False), 1002, id="ping-fragmented"),
    pytest.param(raw_frame(0, b"more", masked=True), 1002, id="stray-continuation"),
    pytest.param(raw_frame(2, masked=True, length_bytes=8, length=1 << 63), 1002, id="len-top-bit"),
    pytest.param(raw_frame(OP_CLOSE, b"\x03", masked=True), 1002, id="close-1-byte"),
    pytest.param(raw_frame(OP_CLOSE, b"\x03\xed", masked=True), 1002, id="close-1005"),
    pytest.param(raw_frame(OP_CLOSE, b"\x03\xee", masked=True), 1002, id="close-1006"),
    pytest.param(raw_frame(OP_CLOSE, b"\x03\xf7", masked=True), 1002, id="close-1015"),
    pytest.param(raw_frame(OP_CLOSE, b"\x03\xe7", masked=True), 1002, id="close-999"),
    pytest.param(raw_frame(OP_CLOSE, b"\x03\xe8\xc3\x28", masked=True), 1007, id="close-reason"),
    pytest.param(raw_frame(2, b"x" * 11, masked=True), 1009, id="too-big"),
    pytest.param(raw_frame(2, masked=True, length_bytes=8, length=1 << 40), 1009, id="too-big-64"),
]


@pytest.mark.parametrize(("frame", "code"), REFUSED)
@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_scanner_refuses_client_frame(frame: bytes, code: int, bytewise: bool) -> None:
    good = Connection(ConnectionType.CLIENT).send(TextMessage(data="fine"))
    scanner = client_scanner(limit=10)
    out: list[bytes] = []
    with pytest.raises(FrameError) as refused:
        if bytewise:
            scanner.feed(good, True, out)
            for i in range(len(frame)):
                scanner.feed(frame[i : i + 1], True, out)
        else:
            scanner.feed(good + frame, True, out)
    assert refused.value.code == code
    assert b"".join(out) == good, "the good frame before goes out, nothing of the bad one"


def test_scanner_refuses_masked_server_frame() -> None:
    with pytest.raises(FrameError) as refused:
        server_scanner().feed(raw_frame(1, b"hi", masked=True), True, [])
    assert refused.value.code == CLOSE_PROTOCOL_ERROR


def test_scanner_refuses_new_message_inside_fragmented_one() -> None:
    client = Connection(ConnectionType.CLIENT)
    first = client.send(TextMessage(data="part", message_finished=False))
    scanner = client_scanner()
    out: list[bytes] = []
    scanner.feed(first, True, out)
    with pytest.raises(FrameError) as refused:
        scanner.feed(raw_frame(2, b"new", masked=True), True, out)
    assert refused.value.code == CLOSE_PROTOCOL_ERROR
    assert out == [first]


def test_scanner_allows_control_frames_between_fragments() -> None:
    client = Connection(ConnectionType.CLIENT)
    data = b"".join(
        [
            client.send(BytesMessage(data=b"a", message_finished=False)),
            client.send(Ping(payload=b"1")),
            client.send(BytesMessage(data=b"b", message_finished=False)),
            client.send(Pong(payload=b"2")),
            client.send(BytesMessage(data=b"c")),
        ]
    )
    out = feed_bytewise(client_scanner(), data)
    assert messages_of(events_of(Connection(ConnectionType.SERVER), b"".join(out))) == [b"abc"]


def test_scanner_message_limit_counts_all_fragments() -> None:
    client = Connection(ConnectionType.CLIENT)
    scanner = client_scanner(limit=10)
    out: list[bytes] = []
    fits = client.send(BytesMessage(data=b"1234", message_finished=False)) + client.send(
        BytesMessage(data=b"567890")
    )
    scanner.feed(fits, True, out)  # exactly 10: allowed, and the count starts again after it
    scanner.feed(client.send(BytesMessage(data=b"x" * 10)), True, out)
    scanner.feed(client.send(BytesMessage(data=b"abcdef", message_finished=False)), True, out)
    assert len(b"".join(out)) == len(fits) + 16 + 12
    with pytest.raises(FrameError) as refused:
        scanner.feed(client.send(BytesMessage(data=b"ghijk")), True, out)
    assert refused.value.code == CLOSE_TOO_BIG


def test_scanner_server_messages_have_no_limit() -> None:
    data = Connection(ConnectionType.SERVER).send(BytesMessage(data=b"x" * 100_000))
    out: list[bytes] = []
    server_scanner().feed(data, True, out)
    assert out == [data]


# -- differential property against wsproto --------------------------------------------------------

CLOSE_PAYLOADS = st.one_of(
    st.just(b""),
    st.binary(min_size=1, max_size=1),
    st.builds(
        lambda code, reason: code.to_bytes(2, "big") + reason,
        st.sampled_from([999, 1000, 1001, 1004, 1005, 1006, 1007, 1011, 1013, 1015, 2999, 3000]),
        st.sampled_from([b"", b"bye", "é".encode(), b"\xff"]),
    ),
)


@st.composite
def raw_streams(draw: st.DrawFn, masked: bool) -> list[bytes]:
    """Frames, mostly well formed and in a valid order, with one thing wrong now and then."""
    frames: list[bytes] = []
    fragmented = False
    for _ in range(draw(st.integers(1, 6))):
        wrong = draw(st.integers(0, 60))
        control = draw(st.integers(0, 3)) == 0
        if control:
            opcode = draw(st.sampled_from([OP_PING, OP_PONG, OP_CLOSE]))
            fin = True
        else:
            opcode = 0 if fragmented else draw(st.sampled_from([1, 2]))
            if wrong == 7:
                opcode = 2 if fragmented else 0  # a new message inside one, or a stray fragment
            fin = draw(st.integers(0, 3)) > 0
            fragmented = not fin
        payload = draw(
            CLOSE_PAYLOADS
            if opcode == OP_CLOSE
            else st.binary(max_size=200).map(lambda b: bytes(c & 0x7F for c in b))  # ASCII
        )
        frames.append(
            raw_frame(
                3 if wrong == 1 else 0xB if wrong == 2 else opcode,
                payload,
                masked=masked != (wrong == 3),
                fin=fin and wrong != 4,
                rsv=0x40 if wrong == 5 else 0x10 if wrong == 6 else 0,
                length_bytes=draw(st.sampled_from([None, None, None, None, 0, 2, 8])),
            )
        )
        if opcode == OP_CLOSE:
            break
    return frames


def _wsproto_refuses(conn: Connection, data: bytes) -> bool:
    conn.receive_data(data)
    events = list(conn.events())
    # a parse failure is reported as a CloseConnection while the connection stays OPEN
    return conn.state is ConnectionState.OPEN and any(
        isinstance(e, CloseConnection) for e in events
    )


@settings(max_examples=400, deadline=None, database=None)
@given(data=st.data(), masked=st.booleans())
def test_scanner_never_stricter_than_wsproto(data: st.DataObject, masked: bool) -> None:
    """What the scanner refuses, wsproto refuses; what wsproto accepts goes through unchanged.

    The scanner is more lenient in exactly three ways: no UTF-8 check of Text payloads, no
    minimal-length rule, and close code 1014; so the implications go one way only.
    """
    stream = b"".join(data.draw(raw_streams(masked)))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    scanner = FrameScanner(masked=masked)
    out: list[bytes] = []
    refused = closed = False
    try:
        for a, b in itertools.pairwise([0, *cuts, len(stream)]):
            if scanner.feed(stream[a:b], True, out) is not None:
                closed = True
                break
    except FrameError:
        refused = True
    reference = Connection(ConnectionType.SERVER if masked else ConnectionType.CLIENT)
    wsproto_refuses = _wsproto_refuses(reference, stream)
    if refused:
        assert wsproto_refuses
    if not wsproto_refuses and not closed:
        assert b"".join(out) == stream
    assert stream.startswith(b"".join(out)), "only whole frames, in order, from the start"


# -- FrameTracker: frame boundaries in tunnel mode ----------------------------------------------


def _raw_frame(payload_size: int, *, masked: bool) -> bytes:
    """A frame header of the minimal form for ``payload_size`` (7, 16 or 64-bit length)."""
    mask_bit = 0x80 if masked else 0
    if payload_size < 126:
        header = bytes([0x82, mask_bit | payload_size])
    elif payload_size < 1 << 16:
        header = bytes([0x82, mask_bit | 126]) + payload_size.to_bytes(2, "big")
    else:
        header = bytes([0x82, mask_bit | 127]) + payload_size.to_bytes(8, "big")
    return header + (b"\x01\x02\x03\x04" if masked else b"") + b"p" * payload_size


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.sampled_from([0, 1, 5, 125, 126, 300, 65535, 65536, 70000]), max_size=6),
    masked=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=200_000), max_size=8),
)
def test_frame_tracker_knows_the_boundaries(
    sizes: list[int], masked: bool, cuts: list[int]
) -> None:
    frames = [_raw_frame(size, masked=masked) for size in sizes]
    stream = b"".join(frames)
    boundaries = set(itertools.accumulate(len(frame) for frame in frames)) | {0}
    points = sorted({min(cut, len(stream)) for cut in cuts} | {len(stream)})
    tracker = FrameTracker()
    start = 0
    for point in points:
        tracker.feed(stream[start:point])
        start = point
        assert tracker.mid_frame is (point not in boundaries), (point, sorted(boundaries))
