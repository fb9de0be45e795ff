"""Linear-time guard for every reader: work per input byte, counted, not timed, whatever the shape.

A reader that re-slices its buffer per element (``buf = buf[line_end + 2:]``) is quadratic in
the bytes of one read: one-byte chunks, a flood of blank lines or a head dripped one byte at a
time then cost seconds of a worker per megabyte. Timings flake on CI, so this guard counts,
like ``test_call_budget.py``:

- ``copied``: bytes a reader moved between its own buffers (concatenation, compaction). Each
  reader counts them in its ``copied`` attribute, on the slow paths only; handing out event
  bytes is not counted.
- ``calls`` and ``c_calls``: Python calls into own code (and out of it) and C calls made from
  own code, counted by the call budget's ``sys.setprofile`` hook around the feeding loop.

Each adversarial shape is fed as a worker feeds it (``feed`` then ``next_event`` until more data
is needed; ``FrameScanner.feed`` for WebSocket frames), in realistic reads: 64 KiB pieces, and
one-byte pieces for the drip shapes. Two properties are held:

- *Linearity*: each measure for 2N bytes is at most twice the measure for N bytes, plus a small
  constant (``SLACK``). A quadratic reader fails this on the drip shapes.
- *Budget*: each measure per input byte, at 2N, is at most the recorded figure plus 25%
  (``HEADROOM``) and a small absolute slack. A reader quadratic within one read (64 KiB pieces)
  is linear in the number of reads, so only the budget catches it: it copies thousands of bytes
  per input byte where a linear one copies at most about one.

A plain Content-Length body of the same size is measured beside them and printed, for scale.

The suite runs on both builds (``fastproxy.accel``). Compiled readers make no calls that the
hook sees, so on the compiled build ``calls`` and ``c_calls`` only fall and ``copied`` is the
guard; the plain-Python run holds all three to the figures below.

Re-recording
------------
After an intended change of a reader, run ``pytest tests/perf/test_linear.py -s``: each shape
prints its figures per input byte as a ``MEASURED_AT`` entry (the same on every run and
machine). Paste them into ``MEASURED_AT``. Re-record after a saving too, or the headroom grows.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pytest

import fastproxy
from fastproxy import accel
from fastproxy.http1 import (
    MAX_RESPONSE_HEAD_BYTES,
    Ev,
    HeadScanner,
    RequestHead,
    ServerLeg,
    UpstreamLeg,
)
from fastproxy.http1_httptools import HttptoolsLeg
from fastproxy.wsframe import FrameScanner

from .test_call_budget import OWN_DIRS, CallCounter

KIB = 1024
#: a read of a busy connection (uvloop reads up to 256 KiB; 64 KiB is the common size)
READ = 64 * KIB
HEADROOM = 1.25
#: absolute slack per input byte on top of the headroom (rounding of tiny figures)
PER_BYTE_SLACK = {"copied": 0.01, "calls": 0.0001, "c_calls": 0.0001}
#: what "twice N plus a constant" allows for: one read's worth of copying, a few calls
SLACK = {"copied": 2 * READ, "calls": 64, "c_calls": 128}


@dataclass(frozen=True)
class Measure:
    copied: int
    calls: int
    c_calls: int

    def per_byte(self, size: int) -> dict[str, float]:
        return {
            "copied": self.copied / size,
            "calls": self.calls / size,
            "c_calls": self.c_calls / size,
        }


def _pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def _counted(feed_all: Callable[[], int]) -> Measure:
    counter = CallCounter(OWN_DIRS)
    sys.setprofile(counter)
    try:
        copied = feed_all()
    finally:
        sys.setprofile(None)
    counts = counter.counts
    return Measure(copied, counts.own_calls + counts.calls_out, counts.c_calls)


# -- drivers: each reader fed as the worker feeds it ---------------------------------------------

REQUEST_HEAD = b"POST /api/1/devices/x HTTP/1.1\r\nHost: a\r\n"
CHUNKED_HEAD = REQUEST_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"


def request_body(head: bytes, pieces: list[bytes]) -> Measure:
    """``ClientLeg``'s body reader, as ``ClientProtocol._pump_request`` drives it."""
    leg = ServerLeg(1 << 20)
    leg.feed_head(head)
    assert isinstance(leg.next_event(), RequestHead)

    def feed_all() -> int:
        received = 0
        for piece in pieces:
            leg.feed(piece)
            while True:
                event = leg.next_event()
                if type(event) is bytes:
                    received += len(event)
                elif event is Ev.END or event is Ev.NEED_DATA or event is Ev.PAUSED:
                    break
        assert received, "no body was read"
        return leg.copied

    measure = _counted(feed_all)
    assert leg.request_ended, "the body did not end"
    return measure


def head_scanner(pieces: list[bytes], *, parse: bool = False) -> Measure:
    """``HeadScanner`` as ``ClientProtocol.data_received`` drives it (and, with ``parse``, both
    client legs given the head)."""
    scanner = HeadScanner(1 << 22, 1 << 20, 8192)
    taken: list[tuple[bytes, bytes]] = []

    def feed_all() -> int:
        for piece in pieces:
            scanner.feed(piece)
            head = scanner.maybe_take_head()
            if head is not None:
                taken.append(head)
                if parse:
                    for leg_class in (ServerLeg, HttptoolsLeg):
                        leg = leg_class(1 << 22)
                        leg.feed_head(head[0])
                        leg.next_event()
        return scanner.copied

    measure = _counted(feed_all)
    assert len(taken) == 1, "no head (or more than one) was found"
    return measure


def response(pieces: list[bytes], method: bytes = b"GET") -> Measure:
    """``UpstreamLeg``'s response reader, as ``ClientProtocol._pump_response`` drives it."""
    leg = UpstreamLeg()
    leg.request(method, b"/x", [(b"Host", b"up")])
    leg.end()
    ended: list[bool] = []

    def feed_all() -> int:
        for piece in pieces:
            leg.feed(piece)
            while True:
                event = leg.next_event()
                if event is Ev.END:
                    ended.append(True)
                    break
                if event is Ev.NEED_DATA:
                    break
        return leg.copied

    measure = _counted(feed_all)
    assert ended, "the response did not end"
    return measure


def frames(pieces: list[bytes], *, masked: bool) -> Measure:
    """One direction of ``WebSocketRelay``: ``FrameScanner.feed`` per read."""
    scanner = FrameScanner(masked=masked, max_message_bytes=1 << 30)
    forwarded: list[int] = []

    def feed_all() -> int:
        for piece in pieces:
            out: list[bytes] = []
            assert scanner.feed(piece, True, out) is None
            forwarded.append(sum(len(b) for b in out))
        return scanner.copied

    measure = _counted(feed_all)
    assert sum(forwarded) == sum(len(p) for p in pieces), "not every byte was forwarded"
    return measure


# -- shapes: name -> (how to build N bytes of it, how to read it) --------------------------------


def _repeat(unit: bytes, size: int) -> bytes:
    return unit * max(1, size // len(unit))


def _chunked_body(unit: bytes, size: int) -> bytes:
    return _repeat(unit, size) + b"0\r\n\r\n"


def _response_head(fields: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 0\r\n\r\n"


def _ws_frame(opcode_byte: int, payload: bytes, key: bytes = b"\x01\x02\x03\x04") -> bytes:
    return bytes((opcode_byte, 0x80 | len(payload))) + key + payload


def _fragments(size: int) -> bytes:
    piece = _ws_frame(0x00, b"x")  # continuation, not final
    body = _repeat(piece, size)
    return _ws_frame(0x01, b"x") + body + _ws_frame(0x80, b"x")


@dataclass(frozen=True)
class Shape:
    make: Callable[[int], bytes]
    read: Callable[[list[bytes]], Measure]
    piece: int
    #: N; the guard measures N and 2N bytes
    size: int


SHAPES: dict[str, Shape] = {
    "plain body": Shape(
        lambda n: b"x" * n,
        lambda p: request_body(REQUEST_HEAD + b"Content-Length: %d\r\n\r\n" % len(b"".join(p)), p),
        READ,
        256 * KIB,
    ),
    "one-byte chunks": Shape(
        lambda n: _chunked_body(b"1\r\nX\r\n", n),
        lambda p: request_body(CHUNKED_HEAD, p),
        READ,
        256 * KIB,
    ),
    "one-byte chunks, dripped": Shape(
        lambda n: _chunked_body(b"1\r\nX\r\n", n),
        lambda p: request_body(CHUNKED_HEAD, p),
        1,
        8 * KIB,
    ),
    "chunk extensions": Shape(
        lambda n: _chunked_body(b"1" + b";e=v" * 250 + b"\r\nX\r\n", n),
        lambda p: request_body(CHUNKED_HEAD, p),
        READ,
        256 * KIB,
    ),
    "chunk extensions, dripped": Shape(
        lambda n: _chunked_body(b"1" + b";e=v" * 250 + b"\r\nX\r\n", n),
        lambda p: request_body(CHUNKED_HEAD, p),
        1,
        8 * KIB,
    ),
    "zero-padded chunk sizes": Shape(
        lambda n: _chunked_body(b"0000000000000001\r\nX\r\n", n),
        lambda p: request_body(CHUNKED_HEAD, p),
        READ,
        256 * KIB,
    ),
    "CRLF flood before a head": Shape(
        lambda n: b"\r\n" * (n // 2) + b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        head_scanner,
        READ,
        1024 * KIB,
    ),
    "CRLF flood, dripped": Shape(
        lambda n: b"\r\n" * (n // 2) + b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        head_scanner,
        1,
        8 * KIB,
    ),
    "dripped head": Shape(
        lambda n: b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * n + b"\r\n\r\n",
        head_scanner,
        1,
        8 * KIB,
    ),
    "many header fields": Shape(
        lambda n: b"GET / HTTP/1.1\r\nHost: a\r\n" + _repeat(b"X-F: v\r\n", n) + b"\r\n",
        lambda p: head_scanner(p, parse=True),
        READ,
        64 * KIB,
    ),
    "many response fields": Shape(
        lambda n: _response_head(_repeat(b"X-F: v\r\n", n)),
        response,
        READ,
        MAX_RESPONSE_HEAD_BYTES // 4,
    ),
    "many response fields, dripped": Shape(
        lambda n: _response_head(_repeat(b"X-F: v\r\n", n)),
        response,
        1,
        8 * KIB,
    ),
    "tiny response chunks": Shape(
        lambda n: (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + _chunked_body(b"1\r\nX\r\n", n)
        ),
        response,
        READ,
        256 * KIB,
    ),
    "tiny response chunks, dripped": Shape(
        lambda n: (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + _chunked_body(b"1\r\nX\r\n", n)
        ),
        response,
        1,
        8 * KIB,
    ),
    "many trailer lines": Shape(
        lambda n: (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nX\r\n0\r\n"
            + _repeat(b"X-T: v\r\n", n)
            + b"\r\n"
        ),
        response,
        1 * KIB,
        MAX_RESPONSE_HEAD_BYTES // 4,
    ),
    "tiny WebSocket frames": Shape(
        lambda n: _repeat(_ws_frame(0x82, b"x"), n),
        lambda p: frames(p, masked=True),
        READ,
        256 * KIB,
    ),
    "tiny WebSocket frames, dripped": Shape(
        lambda n: _repeat(_ws_frame(0x82, b"x"), n),
        lambda p: frames(p, masked=True),
        1,
        8 * KIB,
    ),
    "many continuation frames": Shape(
        _fragments,
        lambda p: frames(p, masked=True),
        READ,
        256 * KIB,
    ),
}

#: per input byte at 2N: (copied, calls, c_calls), as last recorded; see "Re-recording"
MEASURED_AT: dict[str, tuple[float, float, float]] = {
    "plain body": (0, 4.578e-05, 1.526e-05),
    "one-byte chunks": (0.25, 0.1676, 0.8344),
    "one-byte chunks, dripped": (0.8334, 5.5, 5.167),
    "chunk extensions": (0.8808, 0.001143, 0.006197),
    "chunk extensions, dripped": (0.999, 5.003, 6.99),
    "zero-padded chunk sizes": (0.8751, 0.04801, 0.2386),
    "CRLF flood before a head": (0, 4.768e-05, 0.002035),
    "CRLF flood, dripped": (1, 3.501, 7.504),
    "dripped head": (1, 4, 10),
    "many header fields": (1, 0.7505, 1.875),
    "many response fields": (0, 0.0001524, 0.4999),
    "many response fields, dripped": (1, 4, 5.5),
    "tiny response chunks": (0.6249, 0.1676, 0.8344),
    "tiny response chunks, dripped": (0.8339, 5.496, 5.167),
    "many trailer lines": (0, 0.1292, 0.502),
    "tiny WebSocket frames": (0.6251, 3.052e-05, 5.531e-05),
    "tiny WebSocket frames, dripped": (5, 2, 3),
    "many continuation frames": (0.6251, 3.433e-05, 6.294e-05),
}


def _measure(shape: Shape, size: int) -> tuple[int, Measure]:
    data = shape.make(size)
    return len(data), shape.read(_pieces(data, shape.piece))


def _figures(values: Iterable[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


@pytest.mark.parametrize("name", list(SHAPES))
def test_reader_work_is_linear_in_the_input(name: str) -> None:
    shape = SHAPES[name]
    size_1, one = _measure(shape, shape.size)
    size_2, two = _measure(shape, 2 * shape.size)
    assert size_2 >= 2 * size_1 - 64, "the shape does not double"
    per_byte = two.per_byte(size_2)
    plain_size, plain = _measure(SHAPES["plain body"], size_2)
    plain_per_byte = plain.per_byte(plain_size)
    print(
        f"\n{name}: {size_2} bytes in {shape.piece}-byte reads; per byte "
        f"{_figures(per_byte.values())} (a plain body: {_figures(plain_per_byte.values())}); "
        f"MEASURED_AT[{name!r}] = {_figures(per_byte.values())}"
    )
    for field, slack in SLACK.items():
        at_n = getattr(one, field)
        at_2n = getattr(two, field)
        assert at_2n <= 2 * at_n + slack, (
            f"{name}: {field} grows faster than the input: {at_n} for {size_1} bytes, "
            f"{at_2n} for {size_2}"
        )
    recorded = MEASURED_AT.get(name)
    assert recorded is not None, f"{name}: no budget recorded; see Re-recording"
    for (field, value), budget in zip(per_byte.items(), recorded, strict=True):
        limit = budget * HEADROOM + PER_BYTE_SLACK[field]
        assert value <= limit, f"{name}: {value:.4g} {field} per byte, over {limit:.4g}"


def test_the_measures_see_the_readers() -> None:
    # a reader that copies nothing on plain input copies when a line is cut between reads
    _size, measure = _measure(SHAPES["one-byte chunks"], 256 * KIB)
    assert measure.copied > 0
    if fastproxy.BUILD.kind == "python":
        assert measure.calls > 1000
    else:  # compiled readers make no Python calls the hook could see; ``copied`` still counts
        assert {"fastproxy.http1", "fastproxy.wsframe"} <= set(accel.loaded_compiled())
    assert os.path.dirname(__file__) not in OWN_DIRS
