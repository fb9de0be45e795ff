"""Fuzzing the response reader in CI, briefly and deterministically: ``responses.response_input``
relays upstream bytes as the worker does and checks its invariants (``responses.py`` lists
them). Hypothesis feeds it the known desync shapes, structured responses from
``responses.response``, the same read in pieces, and random bytes after a status line.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from .grammar import HypothesisSource, cuts
from .responses import Outcome, relay, response, response_input
from .test_fuzz import budget

OK = b"HTTP/1.1 200 OK\r\n"
CHUNKED = OK + b"Transfer-Encoding: chunked\r\n\r\n"
SECOND = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON"

#: known ways of reading a response two ways, and how each must end for the client
SEEDS: dict[str, tuple[bytes, bytes, str]] = {
    "plain": (b"GET", OK + b"Content-Length: 5\r\n\r\nhello", "relayed"),
    "chunked": (b"GET", CHUNKED + b"5;a=b\r\nhello\r\n0\r\nX-T: 1\r\n\r\n", "relayed"),
    "close-delimited": (b"GET", b"HTTP/1.0 200 OK\r\n\r\nhello", "relayed"),
    "no-reason": (b"GET", b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n", "relayed"),
    "zero-on-204": (b"GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", "relayed"),
    "continue-then-final": (
        b"GET",
        b"HTTP/1.1 100 Continue\r\n\r\n" + OK + b"Content-Length: 2\r\n\r\nok",
        "relayed",
    ),
    "both-lengths": (
        b"GET",
        OK + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
        "refused",
    ),
    "gzip": (b"GET", OK + b"Transfer-Encoding: gzip\r\n\r\nhello", "refused"),
    "duplicate-length": (
        b"GET",
        OK + b"Content-Length: 2\r\nContent-Length: 2\r\n\r\nok",
        "refused",
    ),
    "underscore": (b"GET", OK + b"Content_Length: 2\r\n\r\nok", "refused"),
    "length-on-101": (b"GET", b"HTTP/1.1 101 Switching\r\nContent-Length: 2\r\n\r\nok", "refused"),
    "body-on-204": (b"GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 2\r\n\r\nok", "refused"),
    "body-on-head": (b"HEAD", OK + b"Content-Length: 2\r\n\r\nok", "refused"),
    "appended": (b"GET", OK + b"Content-Length: 2\r\n\r\nok" + SECOND, "refused"),
    "appended-to-chunked": (b"GET", CHUNKED + b"2\r\nok\r\n0\r\n\r\n" + SECOND, "refused"),
    "te-in-1.0": (
        b"GET",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "refused",
    ),
    "obs-fold": (b"GET", OK + b"X: a\r\n b\r\nContent-Length: 0\r\n\r\n", "refused"),
    "bare-lf-in-extension": (b"GET", CHUNKED + b"2;a\nb\r\nok\r\n0\r\n\r\n", "refused"),
    "bad-trailer": (b"GET", CHUNKED + b"2\r\nok\r\n0\r\nX: a\nb\r\n\r\n", "refused"),
    "leading-blank-line": (b"GET", b"\r\n" + OK + b"Content-Length: 0\r\n\r\n", "refused"),
}


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_response_seed_whole_and_one_byte_at_a_time(name: str) -> None:
    method, data, verdict = SEEDS[name]
    outcome = response_input(method, data, range(1, len(data)))
    assert outcome.verdict == verdict, outcome


def test_response_appended_after_relay_closes_instead() -> None:
    # the same appended response, when it comes in a read after the head went out
    method, data, _ = SEEDS["appended-to-chunked"]
    cut = data.index(b"0\r\n\r\n")
    assert relay(method, data, [cut]) == Outcome(
        "closed", 200, b"ok", relay(method, data[:cut] + b"0\r\n\r\n").wire
    )


@budget(400)
@given(st.data())
def test_structured_responses(data: st.DataObject) -> None:
    method, raw = response(HypothesisSource(data))
    response_input(method, raw)


@budget(200)
@given(st.data())
def test_structured_responses_read_in_pieces(data: st.DataObject) -> None:
    source = HypothesisSource(data)
    method, raw = response(source)
    response_input(method, raw, cuts(source, len(raw)) or [len(raw) // 2])


@budget(300)
@given(st.sampled_from([b"GET", b"HEAD"]), st.binary(max_size=200))
def test_random_bytes_after_a_status_line(method: bytes, tail: bytes) -> None:
    response_input(method, OK + tail)
