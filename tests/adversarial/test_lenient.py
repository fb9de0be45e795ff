"""The lenient readers: each reading finds what its kind of backend would, on known attacks.

These are the oracle of the corpus runner, so they are tested on their own: a reading that
missed the classic desynchronisations, or a path normaliser that missed the classic bypasses,
would let the corpus pass while the proxy leaks.
"""

from __future__ import annotations

import pytest

from adversarial.lenient import (
    ALLOWED_PREFIXES,
    READINGS,
    STRICT,
    Reading,
    WebSocketFault,
    escaping_paths,
    fold_name,
    fold_overlong_utf8,
    head_line_faults,
    inside,
    lenient_paths,
    path_of_target,
    percent_decode,
    read_requests,
    remove_dot_segments,
    websocket_frames,
)

READING = {reading.name: reading for reading in READINGS}
SMUGGLED = b"GET /admin HTTP/1.1\r\nHost: a\r\n\r\n"


def targets(raw: bytes, reading: Reading) -> list[bytes]:
    return [r.target for r in read_requests(raw, reading)]


# -- framing ------------------------------------------------------------------------------------


def test_readings_have_distinct_names() -> None:
    assert len(READING) == len(READINGS)
    assert READINGS[0] is STRICT


def test_pipelined_requests_with_offsets() -> None:
    first = b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
    second = b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n"
    for reading in READINGS:
        found = read_requests(first + second, reading)
        assert [r.target for r in found] == [b"/a", b"/b"], reading.name
        assert found[0].body == b"abc"
        assert (found[0].start, found[0].end) == (0, len(first))
        assert found[1].head_end == found[1].end == len(first + second)
        assert all(r.complete for r in found)


def test_leading_empty_lines_are_skipped() -> None:
    assert targets(b"\r\n\r\nGET /a HTTP/1.1\r\nHost: a\r\n\r\n", STRICT) == [b"/a"]


def test_cl_te_desync() -> None:
    length = b"Content-Length: %d\r\n" % (5 + len(SMUGGLED))
    raw = (
        b"POST /a HTTP/1.1\r\nHost: a\r\n" + length + b"Transfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n" + SMUGGLED
    )
    assert targets(raw, STRICT) == [b"/a", b"/admin"]  # RFC 9112: chunked wins
    assert targets(raw, READING["content-length-first"]) == [b"/a"]  # the body holds it all


def test_te_cl_desync() -> None:
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
    raw = (
        b"POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
        + body
    )
    assert targets(raw, STRICT) == [b"/a"]
    # the Content-Length-first backend reads a 4-byte body, then the smuggled request
    assert targets(raw, READING["content-length-first"]) == [b"/a", b"/admin"]


def test_underscore_transfer_encoding_is_chunked_to_folding_readers() -> None:
    raw = b"POST /a HTTP/1.1\r\nHost: a\r\nTransfer_Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED
    assert len(read_requests(raw, STRICT)) == 1  # no framing header: no body, then garbage
    assert targets(raw, READING["fuzzy-transfer-encoding"]) == [b"/a", b"/admin"]


def test_fuzzy_transfer_encoding_values() -> None:
    for value in (b"xchunked", b"chunked, identity", b'"chunked"', b"Chunked"):
        raw = b"POST /a HTTP/1.1\r\nTransfer-Encoding: %s\r\n\r\n0\r\n\r\n" % value + SMUGGLED
        assert targets(raw, READING["fuzzy-transfer-encoding"]) == [b"/a", b"/admin"], value


def test_strict_reading_stops_on_unknown_final_coding() -> None:
    raw = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n" + SMUGGLED
    assert targets(raw, STRICT) == []


def test_space_before_colon_only_for_lenient_names() -> None:
    raw = b"POST /a HTTP/1.1\r\nContent-Length : 3\r\n\r\nabc" + SMUGGLED
    assert targets(raw, STRICT) == []
    assert targets(raw, READING["content-length-first"]) == [b"/a", b"/admin"]


def test_lenient_content_length_forms() -> None:
    for value in (b"+3", b"3, 3", b"3abc", b" 3"):
        raw = b"POST /a HTTP/1.1\r\nContent-Length: %s\r\n\r\nabc" % value + SMUGGLED
        assert targets(raw, READING["content-length-first"]) == [b"/a", b"/admin"], value


def test_strict_content_length_conflicts_stop() -> None:
    raw = b"POST /a HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
    assert targets(raw, STRICT) == []


def test_lf_lines_and_obs_fold() -> None:
    raw = b"GET /a HTTP/1.1\nHost: a\nX-A: b\n c\n\n" + SMUGGLED
    assert targets(raw, STRICT) == []
    [first, second] = read_requests(raw, READING["lf-lines"])
    assert first.target == b"/a"
    assert first.header_values(b"x-a") == [b"b c"]
    assert second.target == b"/admin"


def test_http09_line_for_lenient_readers() -> None:
    raw = b"GET /admin\r\n"
    assert targets(raw, STRICT) == []
    assert targets(raw + b"\r\n", READING["lf-lines"]) == [b"/admin"]


def test_cl0_reading_ignores_get_bodies() -> None:
    raw = b"GET /a HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED
    assert targets(raw, STRICT) == [b"/a"]
    assert targets(raw, READING["body-ignored-on-get"]) == [b"/a", b"/admin"]
    post = raw.replace(b"GET /a", b"POST /a", 1)
    assert targets(post, READING["body-ignored-on-get"]) == [b"/a"]


def test_lenient_chunk_sizes() -> None:
    raw = (
        b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0x3 \r\nabc\r\n0\r\n\r\n" + SMUGGLED
    )
    assert targets(raw, STRICT) == []
    assert targets(raw, READING["fuzzy-transfer-encoding"]) == [b"/a", b"/admin"]


def test_chunk_extension_and_trailers() -> None:
    raw = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n"
    [request] = read_requests(raw, STRICT)
    assert request.body == b"abc"
    assert request.complete


def test_truncated_body_counts_as_an_incomplete_request() -> None:
    raw = b"POST /a HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc"
    [request] = read_requests(raw, STRICT)
    assert not request.complete
    chunked = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"
    [request] = read_requests(chunked, STRICT)
    assert (request.body, request.complete) == (b"ab", False)


def test_truncated_head_is_no_request() -> None:
    assert targets(b"GET /a HTTP/1.1\r\nHost: a\r\n", STRICT) == []


def test_head_line_faults() -> None:
    clean = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n"
    [request] = read_requests(clean, STRICT)
    assert head_line_faults(clean, request) == []
    for bad, label in ((b"a\x00b", "NUL"), (b"a\rb", "bare CR"), (b"a\nb", "bare LF")):
        raw = b"GET /a HTTP/1.1\r\nX: " + bad + b"\r\n\r\n"
        [request] = read_requests(raw, STRICT)
        assert any(label in fault for fault in head_line_faults(raw, request)), bad


def test_fold_name() -> None:
    assert fold_name(b" X_Original_URL ") == b"x-original-url"


# -- paths ----------------------------------------------------------------------------------------


def test_percent_decode() -> None:
    assert percent_decode(b"%2e%2E%u002e%zz%") == b"...%zz%"
    assert percent_decode(b"%uff0e") == "\uff0e".encode()
    assert percent_decode(b"%252e") == b"%2e"


def test_fold_overlong_utf8() -> None:
    assert fold_overlong_utf8(b"\xc0\xae\xe0\x80\xae\xf0\x80\x80\xae\xc1\x9c") == b"...\\"
    assert fold_overlong_utf8("é".encode()) == "é".encode()


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/a/b/../c", "/a/c"),
        ("/a/./b/", "/a/b/"),
        ("/../a", "/a"),
        ("//a//b", "/a/b"),
        ("/a/b/..", "/a/"),
        ("/", "/"),
    ],
)
def test_remove_dot_segments(path: str, expected: str) -> None:
    assert remove_dot_segments(path) == expected


def test_path_of_target() -> None:
    assert path_of_target(b"/a/b?c/../d") == b"/a/b"
    assert path_of_target(b"HTTP://h.example/a?b") == b"/a"
    assert path_of_target(b"http://h.example?b") == b"/"
    assert path_of_target(b"http://h.example") == b"/"


BYPASSES = [
    b"/static/%2e%2e/admin",
    b"/static/.%2E/admin",
    b"/static/%252e%252e/admin",
    b"/static/%25252e%25252e/admin",
    b"/static/..%2fadmin",
    b"/static/..%5cadmin",
    b"/static/..\\admin",
    b"/static/..%255cadmin",
    b"/static/%c0%ae%c0%ae/admin",
    b"/static/..%c0%afadmin",
    b"/static/%e0%80%ae%e0%80%ae/admin",
    b"/static/%u002e%u002e/admin",
    b"/static/..%u2215admin",
    b"/static/%ef%bc%8e%ef%bc%8e/admin",
    b"/static/..%ef%bc%8fadmin",
    b"/static/%e2%80%a5/admin",
    b"/static/%e2%80%a4%e2%80%a4/admin",
    b"/static/%ef%b9%92%ef%b9%92/admin",
    b"/static/..%c2%a5admin",
    b"/static/..;/admin",
    b"/static/..;jsessionid=1/admin",
    b"/static/..%3b/admin",
    b"/static/..%20/admin",
    b"/static/%20../admin",
    b"/static/..%09/admin",
    b"/static/..+/admin",
    b"/static/.../admin",
    b"/static/..%00/admin",
    b"/static/..%3f/admin",
    b"/static/..%23/admin",
    b"/static/..%e2%80%8b/admin",
    b"/admin%3f/static/x",
    b"/admin%00/static/x",
    b"/admin;/static/x",
    b"//evil/admin",
    b"/STATIC/../admin",
]


@pytest.mark.parametrize("target", BYPASSES, ids=[t.decode("latin-1") for t in BYPASSES])
def test_known_bypasses_escape(target: bytes) -> None:
    escapes = escaping_paths(target, ALLOWED_PREFIXES["agent"])
    assert escapes, sorted(lenient_paths(target))


CLEAN = [
    (b"/api/1/devices/abc", "sdk"),
    (b"/api/1/devices", "sdk"),
    (b"/api/1/sessions/x%3Ay", "sdk"),
    (b"/api/1/devices/a%3Bb", "sdk"),
    (b"/api/1/devices/x%3Fy?q=/../../admin", "sdk"),
    (b"/api/1/devices/..x", "sdk"),
    (b"/api/1/devices/x.", "sdk"),
    (b"/sockets/1/x?ws=426", "sdk"),
    (b"/static/my%20file.txt", "agent"),
    (b"/index.html?next=%2F..%2Fadmin", "agent"),
    (b"/api/1/devices.", "agent"),
    (b"/favicon.png", "agent"),
]


@pytest.mark.parametrize(("target", "listener"), CLEAN)
def test_clean_canonical_paths_stay_inside(target: bytes, listener: str) -> None:
    assert escaping_paths(target, ALLOWED_PREFIXES[listener]) == []


def test_lower_case_readings() -> None:
    assert "/api/1/devices" in lenient_paths(b"/API/1/Devices")


@pytest.mark.parametrize(
    ("path", "listener", "expected"),
    [
        ("/api/1/devices", "sdk", True),
        ("/api/1/devices/x", "sdk", True),
        ("/api/1/devicesx", "sdk", False),
        ("/API/1/DEVICES", "sdk", True),
        ("/api/1/", "sdk", False),
        ("/sockets/1", "sdk", False),
        ("/sockets/1/", "sdk", True),
        ("/index.html", "agent", True),
        ("/index.html/x", "agent", True),
        ("/index.htmlx", "agent", False),
        ("/admin", "agent", False),
    ],
)
def test_inside(path: str, listener: str, expected: bool) -> None:
    assert inside(path, ALLOWED_PREFIXES[listener]) is expected


# -- WebSocket frames -----------------------------------------------------------------------------


def test_masked_frames_parse() -> None:
    text = b"\x81\x82\x01\x02\x03\x04" + bytes(
        b ^ k for b, k in zip(b"hi", b"\x01\x02", strict=True)
    )
    close = b"\x88\x82\x00\x00\x00\x00\x03\xe8"
    frames = websocket_frames(text + close, masked=True)
    assert [(f.opcode, f.payload) for f in frames] == [(1, b"hi"), (8, b"\x03\xe8")]


def test_long_frame_lengths() -> None:
    payload = bytes(300)
    frame = b"\x82\xfe" + (300).to_bytes(2, "big") + b"\x00\x00\x00\x00" + payload
    [parsed] = websocket_frames(frame, masked=True)
    assert parsed.payload == payload


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x81\x02hi", id="unmasked"),
        pytest.param(b"\xc1\x82\x00\x00\x00\x00hi", id="reserved-bit"),
        pytest.param(b"\x83\x80\x00\x00\x00\x00", id="reserved-opcode"),
        pytest.param(b"\x81\x85\x00\x00\x00\x00hi", id="truncated"),
        pytest.param(b"\x88\x80\x00\x00\x00\x00GET / HTTP/1.1\r\n\r\n", id="after-close"),
        pytest.param(b"GET /admin HTTP/1.1\r\n\r\n", id="http"),
        pytest.param(b"\x09\x80\x00\x00\x00\x00", id="fragmented-ping"),
    ],
)
def test_malformed_client_frames(data: bytes) -> None:
    with pytest.raises(WebSocketFault):
        websocket_frames(data, masked=True)


def test_server_frames_are_unmasked() -> None:
    assert websocket_frames(b"\x81\x02hi", masked=False)[0].payload == b"hi"
    with pytest.raises(WebSocketFault):
        websocket_frames(b"\x81\x82\x00\x00\x00\x00hi", masked=False)
