"""The response-head fuzz target: bytes an upstream sends, read by ``UpstreamLeg`` and relayed
through ``ClientLeg``'s writer as ``ClientProtocol._pump_response`` relays them.

``relay(method, data, cuts)`` answers a ``method`` request (GET or HEAD) with ``data`` from the
upstream, read in the pieces ``cuts`` marks (each piece one read, one ``_pump_response``), then
end of stream. It returns an ``Outcome``; ``response_input`` checks the invariants:

- Nothing but ``UpstreamBroken`` is ever raised (the worker catches only that).
- A head the leg yields has unambiguous framing, judged again on its raw field lines: at most
  one Content-Length (names folded as backends fold them, ``_`` as ``-``), digits only and equal
  to ``declared_length``; at most one Transfer-Encoding, exactly ``chunked``, never beside a
  Content-Length nor in HTTP/1.0; no framing field on a 1xx, no body announced on a 204; its
  ``relayed`` lines are some of its lines, without framing or hop-by-hop fields.
- A response relayed completely parses with h11, as a client that sent the request, as exactly
  one response with the upstream's status and the body the leg read, with nothing behind it.
- When h11 (a strict client) also reads the upstream's bytes as a response, it finds the same
  status, the same body and the same end: fastproxy and a strict reader never disagree on where
  a response ends.
- Reading in pieces changes nothing: a response is relayed whole either way, or refused (502
  before anything is relayed, cut after its head, or completed and the connections closed
  because bytes followed it) either way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import h11

from fastproxy.headers import RESPONSE_DROPPED, fold
from fastproxy.http1 import (
    Ev,
    RequestHead,
    ResponseHead,
    ServerLeg,
    UpstreamBroken,
    UpstreamLeg,
)

from .grammar import Source, either, mutate, pick, rarely

__all__ = ["Outcome", "relay", "response", "response_input", "same_verdict"]

REQUEST_ID = b"X-Request-Id: fuzz"


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one response ended for the client."""

    #: "relayed" (complete), "refused" (502, nothing relayed), "cut" (broken after the head was
    #: written: the client's connection is reset), "closed" (relayed, then the connections end
    #: because bytes followed the response)
    verdict: str
    status: int = 0
    body: bytes = b""
    #: what the client received
    wire: bytes = b""


def _pieces(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    pieces = []
    start = 0
    for cut in sorted(set(cuts)):
        if 0 < cut < len(data):
            pieces.append(data[start:cut])
            start = cut
    pieces.append(data[start:])
    return [piece for piece in pieces if piece]


def check_head(head: ResponseHead, leg: UpstreamLeg) -> None:
    """The framing of a head the leg accepted, judged again on its raw lines."""
    lengths: list[bytes] = []
    codings: list[bytes] = []
    for line in head.lines:
        name, colon, value = line.partition(b":")
        assert colon and name, line
        folded = fold(name)
        if folded in (b"content-length", b"transfer-encoding"):
            assert b"_" not in name, f"framing field spelled with '_': {line!r}"
            (lengths if folded == b"content-length" else codings).append(value.strip(b" \t"))
    assert len(lengths) <= 1, f"{len(lengths)} Content-Length fields"
    assert len(codings) <= 1, f"{len(codings)} Transfer-Encoding fields"
    assert not (lengths and codings), "Content-Length beside Transfer-Encoding"
    if lengths:
        assert lengths[0].isdigit(), lengths
        assert leg.declared_length == int(lengths[0]), (leg.declared_length, lengths)
    else:
        assert leg.declared_length is None, leg.declared_length
    if codings:
        assert codings[0].lower() == b"chunked", codings
    status = head.status
    assert 100 <= status <= 599, status
    if status < 200:
        assert not lengths and not codings, f"framing field on a {status}"
    if status == 204:
        assert not codings and (not lengths or int(lengths[0]) == 0), "a body on a 204"
    for line in head.relayed:
        assert line in head.lines, line
        assert fold(line.partition(b":")[0]) not in RESPONSE_DROPPED, f"relayed {line!r}"


def relay(method: bytes, data: bytes, cuts: Iterable[int] = ()) -> Outcome:
    """``data`` as the upstream's answer to ``method``, relayed as the worker relays it."""
    leg = UpstreamLeg()
    leg.request(method, b"/x", [(b"Host", b"up")])
    leg.end()
    client = ServerLeg(1 << 16)
    client.feed_head(b"%s / HTTP/1.1\r\nHost: a\r\n\r\n" % method)
    assert isinstance(client.next_event(), RequestHead)
    assert client.next_event() is Ev.END
    wire: list[bytes] = []
    body = bytearray()
    status = 0
    written = False  # the final head went out with an earlier read
    reads: list[bytes | None] = [*_pieces(data, cuts), None]
    for index, piece in enumerate(reads):
        if piece is None:
            leg.feed_eof()
        else:
            leg.feed(piece)
        out: list[bytes] = []
        head_unsent = False
        try:
            while True:
                event = leg.next_event()
                if isinstance(event, ResponseHead):
                    check_head(event, leg)
                    if event.status == 101:
                        # not asked for: the worker's upgrade check refuses it (502)
                        return Outcome("refused")
                    if event.status < 200:
                        continue  # the request is complete: interim answers are not relayed
                    status = event.status
                    lines = [*event.relayed, REQUEST_ID]
                    out.append(
                        client.response_head_lines(
                            status, lines, event.reason, length=leg.declared_length
                        )
                    )
                    head_unsent = True
                elif type(event) is bytes:
                    body += event
                    out += client.body(event)
                elif event is Ev.END:
                    if head_unsent and leg.overrun:
                        raise UpstreamBroken("bytes after the complete response")
                    out.append(client.end())
                    wire += out
                    # what follows arrives on a connection the pool refuses (worker._finish_cycle)
                    for later in reads[index + 1 :]:
                        if later is not None:
                            leg.feed(later)
                    verdict = "closed" if leg.overrun else "relayed"
                    return Outcome(verdict, status, bytes(body), b"".join(wire))
                else:
                    break  # NEED_DATA, PAUSED
        except UpstreamBroken:
            return Outcome("cut" if written else "refused")
        wire += out
        written = written or head_unsent
    raise AssertionError("the end of stream neither ended nor broke the response")


def check_relayed(method: bytes, outcome: Outcome) -> None:
    """The client's bytes parse (h11, as a client) as exactly one response, as relayed."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=1 << 20)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "a")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(outcome.wire)
    event = conn.next_event()
    assert isinstance(event, h11.Response), (event, outcome.wire[:300])
    assert event.status_code == outcome.status, (event.status_code, outcome.status)
    received = bytearray()
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Data):
            received += event.data
            continue
        assert isinstance(event, h11.EndOfMessage), (event, outcome.wire[:300])
        break
    assert bytes(received) == outcome.body, (len(received), len(outcome.body))
    assert conn.trailing_data == (b"", False), conn.trailing_data


def check_against_h11(method: bytes, data: bytes, outcome: Outcome) -> None:
    """Where h11 also reads ``data`` as a response, it reads the same one, ending at the same
    byte (h11 refuses some responses fastproxy takes, e.g. BWS before a chunk extension)."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=1 << 20)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "a")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    conn.receive_data(b"")
    received = bytearray()
    final: h11.Response | None = None
    try:
        while True:
            event = conn.next_event()
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                final = event
            elif isinstance(event, h11.Data):
                received += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return  # NEED_DATA or PAUSED: h11 did not read a whole response
    except h11.RemoteProtocolError:
        return
    assert final is not None
    assert final.status_code == outcome.status, (final.status_code, outcome.status)
    assert bytes(received) == outcome.body, "h11 reads another body"
    leftover, _closed = conn.trailing_data
    assert not leftover, f"h11 finds bytes after the response fastproxy relayed: {leftover[:80]!r}"


def response_input(method: bytes, data: bytes, cuts: Iterable[int] = ()) -> Outcome:
    """The fuzz target: relay ``data`` whole and, when given, in pieces; check the invariants."""
    whole = relay(method, data)
    if whole.verdict == "relayed":
        check_relayed(method, whole)
        check_against_h11(method, data, whole)
    cuts = list(cuts)
    if cuts:
        pieces = relay(method, data, cuts)
        assert same_verdict(whole, pieces), (whole, pieces)
    return whole


def same_verdict(whole: Outcome, pieces: Outcome) -> bool:
    """A response is relayed whole in pieces too, or refused in some way either way."""
    if whole.verdict == "relayed" or pieces.verdict == "relayed":
        return (whole.verdict, whole.status, whole.body) == (
            pieces.verdict,
            pieces.status,
            pieces.body,
        )
    return True


# -- the generator -------------------------------------------------------------------------------

STATUS = [b"200", b"204", b"304", b"100", b"103", b"404", b"101", b"500", b"099", b"600", b"20"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"http/1.1", b"HTTP/1.1 "]
REASONS = [b" OK", b"", b" ", b" Fine \t Really", b" \xe9t\xe9", b" O\x01K", b" OK\x7f"]
PREFIXES = [b"", b"\r\n", b" ", b"\n"]
LENGTHS = [b"0", b"5", b"05", b" 5 ", b"-1", b"5, 5", b"+5", b"", b"0x5", b"99999999999999999999"]
CODINGS = [b"chunked", b"Chunked", b" chunked ", b"gzip", b"gzip, chunked", b"chunked, chunked"]
CODINGS_ODD = [b"identity", b"", b"chunked;q=1", b"chunked\x0b", b"x-chunked"]
NAMES_CL = [b"Content-Length", b"content-length", b"Content_Length", b"CONTENT-LENGTH"]
NAMES_TE = [b"Transfer-Encoding", b"transfer-encoding", b"Transfer_Encoding"]
OTHER_FIELDS = [
    b"Date: Tue, 14 Nov 2023 22:13:20 GMT",
    b"Content-Type: text/plain",
    b"Connection: close",
    b"Connection: keep-alive, X-Drop",
    b"X-Drop: secret",
    b"Keep-Alive: timeout=5",
    b"X-Request-Id: upstream",
    b"Set-Cookie: a=1",
    b"Trailer: X-T",
    b"Upgrade: h2c",
    b"X_Under: 1",
    b"X-Empty:",
    b"X-Tab:\tv\t",
]
ODD_FIELDS = [
    b" X-Fold: a",
    b"\tX-Fold: a",
    b"X-A: a\rb",
    b"X-A: a\nb",
    b"X-A: a\x00b",
    b"X-A: a\x0bb",
    b"Bad Name: a",
    b": empty name",
    b"NoColon",
    b"Content-Length : 5",
    b"HTTP/1.1 200 OK",
]
CHUNK_EXTS = [b"", b";a=b", b' ;a="q"', b"; a = b", b";\xff", b";a\nb", b";a\rb"]
TRAILERS = [b"X-T: 1", b"X-T:", b"Content-Length: 9", b" X-Fold: 1", b"X-T: a\nb", b"NoColon"]
APPENDED = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON",
    b"\r\n",
    b"X",
    b"0\r\n\r\n",
]


def _chunked(src: Source, body: bytes) -> bytes:
    parts = []
    at = 0
    while at < len(body):
        size = 1 + src.below(min(8, len(body) - at))
        piece = body[at : at + size]
        at += size
        declared = size if not rarely(src, 20) else size + pick(src, [-1, 1])
        size_text = b"%x" % declared if not rarely(src, 15) else b"%016x" % declared
        ext = either(src, [b""], CHUNK_EXTS, odds=4)
        parts.append(size_text + ext + b"\r\n" + piece + b"\r\n")
    parts.append(b"0" + either(src, [b""], CHUNK_EXTS, odds=6) + b"\r\n")
    trailers = src.below(3) if rarely(src, 3) else 0
    parts += [either(src, [b"X-T: 1"], TRAILERS, odds=3) + b"\r\n" for _ in range(trailers)]
    parts.append(b"\r\n")
    return b"".join(parts)


def response(src: Source) -> tuple[bytes, bytes]:
    """``(method, bytes the upstream sends)``: a response head with framing variants and a body
    framed (or mis-framed) to match, sometimes with bytes after it or byte-level mutations."""
    method = b"HEAD" if rarely(src, 5) else b"GET"
    status = either(src, [b"200", b"404"], STATUS, odds=3)
    line = (
        either(src, [b""], PREFIXES, odds=20)
        + either(src, [b"HTTP/1.1"], VERSIONS, odds=12)
        + b" "
        + status
        + either(src, [b" OK"], REASONS, odds=6)
    )
    fields: list[bytes] = []
    body = b"hello world"[: src.below(12)]
    framing = src.below(4)  # 0: Content-Length, 1: chunked, 2: none, 3: several
    if framing == 0 or framing == 3:
        value = either(src, [b"%d" % len(body)], LENGTHS, odds=5)
        fields.append(either(src, [b"Content-Length"], NAMES_CL, odds=6) + b": " + value)
    if framing == 1 or framing == 3:
        value = either(src, [b"chunked"], CODINGS + CODINGS_ODD, odds=5)
        fields.append(either(src, [b"Transfer-Encoding"], NAMES_TE, odds=6) + b": " + value)
    if rarely(src, 8):
        fields.append(pick(src, NAMES_CL) + b": " + pick(src, LENGTHS))
    for _ in range(src.below(4)):
        fields.insert(src.below(len(fields) + 1), either(src, OTHER_FIELDS, ODD_FIELDS, odds=10))
    head = b"\r\n".join([line, *fields]) + b"\r\n\r\n"
    chunked = framing == 1 or (framing == 3 and rarely(src, 2))
    payload = _chunked(src, body) if chunked else body
    data = head + (b"" if method == b"HEAD" and not rarely(src, 4) else payload)
    if status[:1] == b"1" and status not in (b"101",) and not rarely(src, 4):
        final = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        interim = b"HTTP/1.1 " + status + b" Info"
        if fields and rarely(src, 3):
            interim += b"\r\n" + fields[0]  # a framing field on a 1xx, sometimes
        data = interim + b"\r\n\r\n" + final
    if rarely(src, 6):
        data += pick(src, APPENDED)
    if rarely(src, 6):
        for _ in range(1 + src.below(2)):
            data = mutate(src, data)
    return method, data
