"""Fuzzing the client leg in CI, briefly and deterministically (README.md beside this file has
the long runs).

``targets.one_input`` plays a byte stream into the worker's own ``exchange.Exchange`` on both
preset listeners and checks its invariants; here hypothesis feeds it the seed corpus, structured
streams from ``grammar`` (whole, and in pieces compared with whole), random bytes, and heads
right around each size limit. The properties of the preset's prefix tables come first: they are
cheap, so they get more examples.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastproxy import exchange, worker
from fastproxy.policy import PathRefused, canonicalize

from . import targets
from .corpus import SEEDS
from .grammar import (
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    MAX_URI_BYTES,
    SEGMENTS,
    HypothesisSource,
    cuts,
    stream,
    target,
)
from .run import fuzz
from .targets import (
    AGENT,
    LISTENERS,
    SDK,
    Listener,
    check_decision,
    check_in_pieces,
    drive,
    longest_prefix_rule,
    one_input,
)


def budget(examples: int) -> settings:
    """A fixed number of examples, drawn the same way on every run (CI is deterministic)."""
    return settings(
        max_examples=examples,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


listeners = st.sampled_from(LISTENERS)
H = b"Host: 127.0.0.1:8080\r\n"

# -- the preset's prefix tables -------------------------------------------------------------------

paths = st.lists(st.sampled_from(SEGMENTS), max_size=10).map(lambda parts: b"/" + b"".join(parts))


@budget(800)
@given(paths, listeners)
def test_preset_table_picks_the_longest_matching_prefix(path: bytes, listener: Listener) -> None:
    try:
        canonical = canonicalize(path)
    except PathRefused:
        return
    table = listener.table
    assert table.classify(canonical) is longest_prefix_rule(table, canonical)


@budget(600)
@given(st.data(), listeners)
def test_preset_table_forwards_only_canonical_targets(
    data: st.DataObject, listener: Listener
) -> None:
    raw = target(HypothesisSource(data))
    decision = listener.table.decide(raw)
    if decision.refusal is None:
        check_decision(listener.table, raw, decision)


@budget(300)
@given(st.sampled_from([b"", b"?", b"?a=1", b"?a=/../x&b=%2F", b"??"]), paths)
def test_agent_rewrite_forwards_index_html_with_the_query(query: bytes, path: bytes) -> None:
    decision = AGENT.table.decide(path + query)
    if decision.refusal is None and decision.rule is AGENT.table.fallback:
        assert decision.target == b"/index.html" + query


# -- the client leg -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_seed_whole_and_one_byte_at_a_time(name: str) -> None:
    data = SEEDS[name]
    one_input(data)
    check_in_pieces(data, range(1, len(data)))


@budget(300)
@given(st.data())
def test_structured_streams(data: st.DataObject) -> None:
    one_input(stream(HypothesisSource(data)))


@budget(150)
@given(st.data())
def test_structured_streams_read_in_pieces(data: st.DataObject) -> None:
    source = HypothesisSource(data)
    raw = stream(source)
    check_in_pieces(raw, cuts(source, len(raw)))


@budget(300)
@given(st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    one_input(data)


@budget(150)
@given(st.integers(MAX_HEAD_BYTES - 40, 3 * MAX_HEAD_BYTES), listeners)
def test_head_over_the_limit_refused_431(size: int, listener: Listener) -> None:
    start = b"GET /api/1/devices HTTP/1.1\r\n" + H + b"X-Pad: "
    head = start + b"p" * (size - len(start) - 4) + b"\r\n\r\n"
    assert len(head) == size
    transcript = drive(head, listener)
    statuses = [exchange.status for exchange in transcript.exchanges]
    if size <= MAX_HEAD_BYTES:
        assert statuses == [200]
    else:
        assert statuses == [431] and transcript.state == "closed"


@budget(150)
@given(st.integers(MAX_URI_BYTES - 40, 3 * MAX_URI_BYTES))
def test_target_over_the_limit_refused_414(size: int) -> None:
    raw_target = b"/api/1/devices?q=" + b"q" * (size - 17)
    assert len(raw_target) == size
    transcript = drive(b"GET " + raw_target + b" HTTP/1.1\r\n" + H + b"\r\n", SDK)
    statuses = [exchange.status for exchange in transcript.exchanges]
    assert statuses == ([200] if size <= MAX_URI_BYTES else [414])


@budget(60)
@given(st.integers(MAX_HEADERS - 5, MAX_HEADERS + 5))
def test_header_count_over_the_limit_refused_431(count: int) -> None:
    fields = H + b"".join(b"X-%d: v\r\n" % n for n in range(count - 1))
    transcript = drive(b"GET /api/1/devices HTTP/1.1\r\n" + fields + b"\r\n", SDK)
    statuses = [exchange.status for exchange in transcript.exchanges]
    assert statuses == ([200] if count <= MAX_HEADERS else [431])


def test_the_long_run_driver_finds_nothing_on_a_short_run() -> None:
    report = fuzz(examples=1500, seed=0)
    assert report.inputs == 1500
    assert not report.failures, list(report.failures.values())


def test_the_target_drives_the_worker_exchange() -> None:
    # the fuzzer plays its bytes into the class the worker's ClientProtocol adapts, not into a
    # model of it: nothing to drift
    assert type(targets.FuzzConnection(SDK).exchange) is exchange.Exchange
    assert vars(worker)["Exchange"] is exchange.Exchange


# -- findings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [b"Content-Length: 5\r\nContent-Length: 5\r\n", b"Content-Length: 5, 5\r\n"],
    ids=["two-fields", "list"],
)
def test_duplicate_content_length_refused(fields: bytes) -> None:
    # found by this fuzzer: h11 merges equal Content-Length values into one field, so only the
    # scanner's raw-byte count can refuse them (SPEC 5)
    request = b"POST /api/1/devices HTTP/1.1\r\n" + H + fields + b"\r\nhello"
    transcript = drive(request, SDK)
    assert [(e.status, e.code) for e in transcript.exchanges] == [(400, "bad_request")]


def test_oversize_head_with_a_target_within_the_limit_refused_431() -> None:
    raw_target = b"/api/1/devices?q=" + b"q" * (MAX_URI_BYTES - 17)
    assert len(raw_target) == MAX_URI_BYTES  # accepted on its own (test_target_over_the_limit)
    pad = b"X-Pad: " + b"p" * MAX_HEAD_BYTES + b"\r\n"
    transcript = drive(b"GET " + raw_target + b" HTTP/1.1\r\n" + H + pad + b"\r\n", SDK)
    assert [(e.status, e.code) for e in transcript.exchanges] == [(431, "headers_too_large")]
