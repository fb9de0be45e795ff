"""``exchange.Exchange`` driven in process: no socket, loop or clock (``fuzz/harness.py``).

Each test is one client connection of a listener of the built-in preset (``sdk``: deny
fallback, a WebSocket rule; ``agent``: rewrite fallback), or of a configuration of its own, in
front of fake upstream connections that answer a canned 200 unless the test scripts them.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import h11
import pytest
from fuzz.harness import OK_RESPONSE, FakeUpstream, Harness

from fastproxy.config import load_config, parse_config
from fastproxy.exchange import State, Timer, Verdict
from fastproxy.runtime import Snapshot

PRESET = Snapshot.build(load_config(None), 1)
SDK = PRESET.listeners["sdk"]
AGENT = PRESET.listeners["agent"]
GET = b"GET /api/1/devices HTTP/1.1\r\nHost: a\r\n\r\n"
WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


def harness(listener: str = "sdk", snapshot: Snapshot = PRESET, **kwargs: Any) -> Harness:
    return Harness(
        snapshot.listeners[listener],
        upstreams=snapshot.upstreams,
        default_hosts=snapshot.default_hosts,
        **kwargs,
    )


def responses(data: bytes, methods: tuple[bytes, ...] = ()) -> list[tuple[int, bytes]]:
    """The responses in ``data`` as a client reads them: ``(status, body)`` each; ``methods``
    are the requests' (GET when not given)."""
    client = h11.Connection(h11.CLIENT)
    client.receive_data(data)
    found: list[tuple[int, bytes]] = []
    for number in range(100):
        method = methods[number] if number < len(methods) else b"GET"
        client.send(h11.Request(method=method, target="/", headers=[("Host", "a")]))
        client.send(h11.EndOfMessage())
        status, body = 0, b""
        while True:
            event = client.next_event()
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                found.append((status, body))
                break
            else:
                return found
        if client.their_state is not h11.DONE or client.our_state is not h11.DONE:
            return found
        if not client.trailing_data[0]:
            return found
        client.start_next_cycle()
    return found


def state(h: Harness) -> State:
    """The exchange's state (a call, so that mypy does not narrow it across events)."""
    return h.exchange.state


def timer(h: Harness) -> Timer | None:
    return h.exchange.timer


def statuses(h: Harness) -> list[int]:
    return [record.status for record in h.records]


# -- request cycles -----------------------------------------------------------------------------


def test_forward_cycle_streams_the_body_then_relays_the_answer() -> None:
    h = harness(respond=lambda conn: b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
    h.send(b"POST /api/1/devices HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\nab")
    assert state(h) is State.FORWARD and timer(h) is Timer.BODY
    conn = h.upstreams[0]
    assert conn.wire[0].startswith(b"POST /api/1/devices HTTP/1.1\r\n")
    assert conn.body_events == [b"ab"] and not conn.answered
    h.send(b"cdef")
    assert conn.body_events == [b"ab", b"cdef"]
    assert conn.fate == "released" and state(h) is State.HEAD
    out = h.take_client()
    assert responses(out, (b"POST",)) == [(201, b"ok")]
    assert b"X-Request-Id: test-1\r\n" in out
    record = h.records[0]
    assert (record.status, record.code, record.upstream) == (201, "", conn)
    assert record.cycle is not None and record.cycle.verdict is Verdict.FORWARD
    # the keep-alive timeout waits for the next request
    assert timer(h) is Timer.HEAD
    assert h.deadline == pytest.approx(SDK.limits.keepalive_timeout_s)


def test_pipelined_requests_are_forwarded_one_at_a_time_and_answered_in_order() -> None:
    bodies = iter([b"one", b"two", b"three"])

    def respond(conn: FakeUpstream) -> bytes:
        body = next(bodies)
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)

    h = harness(respond=respond)
    h.exchange.client_data(GET * 3, h.now)
    # the first request is out; the other two wait (reading paused: they are already read)
    assert len(h.upstreams) == 1 and not h.reading
    h.run()
    assert [c.wire[0][:24] for c in h.upstreams] == [b"GET /api/1/devices HTTP/"] * 3
    assert all(c.fate == "released" for c in h.upstreams)
    assert responses(h.take_client()) == [(200, b"one"), (200, b"two"), (200, b"three")]
    assert statuses(h) == [200, 200, 200] and h.exchange.served == 3
    assert h.reading and state(h) is State.HEAD


def test_a_403_without_a_body_keeps_the_connection() -> None:
    h = harness()
    h.send(b"GET /admin HTTP/1.1\r\nHost: a\r\n\r\n" + GET)
    assert [(r.status, r.code) for r in h.records] == [(403, "forbidden"), (200, "")]
    assert [s for s, _ in responses(h.take_client())] == [403, 200]
    assert not h.effects.closed and state(h) is State.HEAD


def test_a_400_closes_the_connection() -> None:
    h = harness()
    h.send(b"GET /api/1/devices HTTP/1.1\r\n\r\n" + GET)  # no Host on HTTP/1.1
    assert [(r.status, r.code) for r in h.records] == [(400, "bad_host")]
    out = h.take_client()
    assert b"Connection: close" in out and b'"error":"bad_host"' in out
    assert h.effects.closed == "close" and state(h) is State.CLOSED
    assert not h.upstreams  # nothing after the refused request was read


def test_a_head_that_never_parses_is_counted_without_a_cycle() -> None:
    h = harness()
    h.send(b"GET /a HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n")
    assert [(r.cycle, r.status) for r in h.records] == [(None, 400)]
    assert h.effects.closed == "close"


def test_report_mode_forwards_what_it_would_deny() -> None:
    config = parse_config(
        {
            "upstreams": {"origin": {"servers": ["127.0.0.1:9"]}},
            "listeners": {
                "sdk": {"bind": "127.0.0.1:0", "policy": "cobrowse-sdk", "mode": "report"}
            },
        },
        "report.toml",
    )
    h = harness(snapshot=Snapshot.build(config, 1))
    h.send(b"GET /admin HTTP/1.1\r\nHost: a\r\n\r\n")
    record = h.records[0]
    assert record.status == 200 and record.cycle is not None
    assert record.cycle.verdict is Verdict.WOULD_DENY
    assert h.upstreams[0].wire[0].startswith(b"GET /admin HTTP/1.1\r\n")


def test_a_body_over_the_rule_limit_is_refused_mid_stream() -> None:
    limit = SDK.table.classify(b"/api/1/devices").max_body_bytes
    h = harness()
    h.send(b"POST /api/1/devices HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"x" * (limit + 1)
    h.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    assert [(r.status, r.code) for r in h.records] == [(413, "body_too_large")]
    assert h.upstreams[0].fate == "discarded" and h.effects.closed == "close"


def test_a_read_of_many_tiny_chunks_is_forwarded_a_slice_per_loop_pass() -> None:
    h = harness()
    h.send(b"POST /api/1/devices HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    h.exchange.client_data(b"1\r\nx\r\n" * 3000 + b"0\r\n\r\n", h.now)
    conn = h.upstreams[0]
    # one slice went out; the rest waits for the next loop pass, reading paused meanwhile
    assert len(conn.body_events) == 1 and not h.reading and h.queue
    h.run()
    assert b"".join(conn.body_events) == b"x" * 3000 and len(conn.body_events) > 2
    assert statuses(h) == [200] and h.reading


def test_a_client_that_half_closes_gets_its_answers_then_the_close() -> None:
    h = harness(respond=lambda conn: None)
    h.send(GET)
    assert h.eof() is True
    h.upstreams[0].answer(OK_RESPONSE)
    assert statuses(h) == [200] and h.effects.closed == "close"


# -- upstream connections -----------------------------------------------------------------------


REDIRECT = Snapshot.build(
    parse_config(
        {
            "upstreams": {"origin": {"servers": ["127.0.0.1:9"]}},
            "policies": {
                "to-8443": {
                    "extends": "https-redirect",
                    "fallback": {"action": "redirect_https", "https_port": 8443},
                }
            },
            "listeners": {
                "http": {"bind": "127.0.0.1:0", "policy": "https-redirect"},
                "alt": {"bind": "127.0.0.1:0", "policy": "to-8443"},
            },
            "presets": {"cobrowse": {"acme": True}},
        },
        "redirect.toml",
    ),
    1,
)


@pytest.mark.parametrize(
    ("listener", "request_head", "location"),
    [
        (
            "http",
            b"GET /a/../b?q=%41 HTTP/1.1\r\nHost: example.com:8080\r\n",
            b"https://example.com/b?q=%41",
        ),
        ("http", b"PUT /x HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n", b"https://[2001:db8::1]/x"),
        (
            "http",
            b"GET http://example.com/y HTTP/1.1\r\nHost: example.com\r\n",
            b"https://example.com/y",
        ),
        ("alt", b"DELETE /z HTTP/1.1\r\nHost: example.com\r\n", b"https://example.com:8443/z"),
    ],
)
def test_redirect_https_sends_the_canonical_target_to_https(
    listener: str, request_head: bytes, location: bytes
) -> None:
    h = harness(listener, REDIRECT)
    h.send(request_head + b"\r\n" + request_head + b"\r\n")
    assert [(r.status, r.code) for r in h.records] == [(308, "https_redirect")] * 2
    assert h.records[0].cycle is not None
    assert h.records[0].cycle.verdict is Verdict.REDIRECT
    out = h.take_client()
    assert out.count(b"HTTP/1.1 308 Permanent Redirect\r\n") == 2
    assert out.count(b"\r\nLocation: " + location + b"\r\n") == 2
    assert not h.effects.closed and not h.upstreams  # keep-alive, nothing forwarded


def test_redirect_https_forwards_acme_challenges_and_closes_after_a_body() -> None:
    h = harness("http", REDIRECT)
    h.send(b"GET /.well-known/acme-challenge/t0k HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert h.upstreams[0].wire[0].startswith(b"GET /.well-known/acme-challenge/t0k HTTP/1.1")
    h = harness("http", REDIRECT)
    h.send(b"POST /form HTTP/1.1\r\nHost: example.com\r\nContent-Length: 3\r\n\r\nabc")
    assert [(r.status, r.code) for r in h.records] == [(308, "https_redirect")]
    assert b"Connection: close" in h.take_client() and h.effects.closed == "close"
    h = harness("http", REDIRECT)
    h.send(b"GET /x HTTP/1.0\r\n\r\n")  # no name to redirect to
    assert [(r.status, r.code) for r in h.records] == [(400, "bad_host")]


def test_a_stale_pooled_connection_is_retried_once_on_a_fresh_one() -> None:
    h = harness(reused=True, respond=lambda conn: None)
    h.send(GET)
    stale = h.upstreams[0]
    assert stale.reused
    stale.lose()  # the backend had closed it while it sat in the pool: no byte came back
    assert stale.fate == "discarded" and h.connecting and not h.records
    fresh = h.connect()
    assert not fresh.reused and fresh.wire[0] == stale.wire[0]
    fresh.answer(OK_RESPONSE)
    assert statuses(h) == [200] and not h.effects.errors


def test_a_stale_connection_is_not_retried_for_a_post() -> None:
    h = harness(reused=True, respond=lambda conn: None)
    h.send(b"POST /api/1/devices HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx")
    h.upstreams[0].lose()
    assert [(r.status, r.code) for r in h.records] == [(502, "upstream_failed")]
    assert [code for _, code in h.effects.errors] == ["upstream_failed"]
    assert h.effects.closed == "close"


def test_a_connect_that_fails_twice_is_a_502_and_reading_waits_for_the_connect() -> None:
    h = harness(connect_later=True)
    h.send(GET)
    assert state(h) is State.UPSTREAM and not h.reading
    h.fail_connect()
    # tried again (another server: the pool took the failed one out of its rotation)
    assert state(h) is State.UPSTREAM and not h.records and len(h.connecting) == 1
    h.fail_connect()
    assert [(r.status, r.code) for r in h.records] == [(502, "upstream_failed")]
    assert [code for _, code in h.effects.errors] == ["upstream_failed", "upstream_failed"]
    assert h.effects.closed == "close"


def test_the_one_server_of_an_upstream_without_checks_is_not_tried_twice() -> None:
    config = parse_config(
        {
            "upstreams": {"origin": {"servers": ["127.0.0.1:9"], "health": False}},
            "listeners": {"sdk": {"bind": "127.0.0.1:0", "policy": "cobrowse-sdk"}},
        },
        "one.toml",
    )
    h = harness(snapshot=Snapshot.build(config, 1), connect_later=True)
    h.send(GET)
    h.fail_connect()
    # nothing would take it out of the rotation, so a second attempt would go to it again
    assert [(r.status, r.code) for r in h.records] == [(502, "upstream_failed")]
    assert not h.connecting and h.effects.closed == "close"


def test_a_failed_connect_is_tried_again_and_the_second_server_answers() -> None:
    h = harness(connect_later=True)
    h.send(b"POST /api/1/devices HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
    h.fail_connect("upstream_timeout")
    second = h.connect()
    # the body went to the second server whole: no byte had gone to the first
    assert second.body_events == [b"abc"] and second.request_ended
    assert statuses(h) == [200]


def upstream_snapshot(**spec: object) -> Snapshot:
    document: dict[str, Any] = {
        "upstreams": {"u": {"servers": ["127.0.0.1:1", "127.0.0.1:2"], **spec}},
        "listeners": {"web": {"bind": "127.0.0.1:0", "policy": "p"}},
        "policies": {"p": {"fallback": "forward"}},
    }
    return Snapshot.build(parse_config(document, "t.toml"), 1)


def test_no_second_try_when_next_upstream_tries_is_1() -> None:
    h = harness("web", upstream_snapshot(next_upstream_tries=1), connect_later=True)
    h.send(GET)
    h.fail_connect()
    assert [(r.status, r.code) for r in h.records] == [(502, "upstream_failed")]


def test_no_second_try_once_the_request_is_older_than_next_upstream_timeout() -> None:
    h = harness("web", upstream_snapshot(next_upstream_timeout_s=3), connect_later=True)
    h.send(GET)
    h.advance(3.5)
    h.fail_connect("upstream_timeout")
    assert [(r.status, r.code) for r in h.records] == [(504, "upstream_timeout")]


def test_no_server_up_is_a_503_at_once_without_a_connect() -> None:
    h = harness(no_server=True)
    h.send(GET)
    assert [(r.status, r.code) for r in h.records] == [(503, "no_healthy_upstream")]
    assert h.upstreams == [] and h.effects.closed == "close"
    assert b'"error":"no_healthy_upstream"' in h.take_client()


def test_a_fresh_connection_reset_before_any_byte_marks_the_server_and_retries_a_get() -> None:
    h = harness(respond=lambda conn: None)
    h.send(GET)
    first = h.upstreams[0]
    first.lose()
    assert first.failed and not h.records
    second = h.connect()
    assert second.request_ended
    second.answer(OK_RESPONSE)
    assert statuses(h) == [200]


def test_a_reset_before_any_byte_is_not_retried_for_a_post() -> None:
    h = harness(respond=lambda conn: None)
    h.send(b"POST /api/1/devices HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx")
    h.upstreams[0].lose()
    assert h.upstreams[0].failed and len(h.upstreams) == 1
    assert [(r.status, r.code) for r in h.records] == [(502, "upstream_failed")]


def test_a_reset_after_response_bytes_is_not_retried_nor_marked() -> None:
    h = harness(respond=lambda conn: None)
    h.send(GET)
    h.upstreams[0].answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
    h.upstreams[0].lose()
    assert not h.upstreams[0].failed and len(h.upstreams) == 1


def test_a_response_that_breaks_http_before_its_head_is_a_502() -> None:
    h = harness(
        respond=lambda conn: b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
    )
    h.send(GET)
    assert [(r.status, r.code) for r in h.records] == [(502, "upstream_failed")]
    assert responses(h.take_client())[0][0] == 502


# -- timers -------------------------------------------------------------------------------------


def test_an_idle_keep_alive_connection_closes_quietly() -> None:
    h = harness()
    h.send(GET)
    h.take_client()
    h.advance(SDK.limits.keepalive_timeout_s)
    assert h.effects.closed == "close" and h.take_client() == b""


def test_a_head_that_does_not_finish_in_time_gets_a_408() -> None:
    h = harness()
    h.send(b"GET /api/1/dev")
    assert timer(h) is Timer.HEAD
    h.advance(SDK.limits.header_timeout_s)
    assert [(r.status, r.code) for r in h.records] == [(408, "header_timeout")]
    assert h.effects.closed == "close"


def test_an_upstream_without_a_first_byte_gets_a_504() -> None:
    h = harness(respond=lambda conn: None)
    h.send(GET)
    assert timer(h) is Timer.FIRST_BYTE
    h.advance(h.upstreams[0].config.first_byte_timeout_s)
    assert [(r.status, r.code) for r in h.records] == [(504, "upstream_timeout")]
    assert h.upstreams[0].fate == "discarded"


def test_a_stalled_request_body_gets_a_408() -> None:
    h = harness()
    h.send(b"POST /api/1/devices HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nab")
    timeout = SDK.limits.body_timeout_s
    h.advance(timeout / 2)
    h.send(b"c")  # progress: the timeout counts from the last byte
    h.advance(timeout / 2)
    assert not h.records and timer(h) is Timer.BODY
    h.advance(timeout / 2)
    assert [(r.status, r.code) for r in h.records] == [(408, "body_timeout")]


def test_a_response_body_that_stalls_resets_the_client() -> None:
    h = harness(respond=lambda conn: b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    h.send(GET)
    assert timer(h) is Timer.UPSTREAM_READ
    h.advance(h.upstreams[0].config.read_timeout_s)
    # the head and part of the body are out: all that is left is to cut the connection; the
    # request is reported as the upstream's failure, not as the 200 its head said
    assert [(r.status, r.code) for r in h.records] == [(504, "upstream_timeout")]
    assert h.effects.closed == "abort"
    assert h.effects.errors[-1][1] == "upstream_timeout"


def test_a_response_the_upstream_cuts_off_is_reported_as_truncated() -> None:
    h = harness(respond=lambda conn: b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    h.send(GET)
    h.upstreams[0].lose()
    assert [(r.status, r.code) for r in h.records] == [(502, "upstream_truncated")]
    assert h.effects.closed == "abort"
    assert h.effects.errors[-1][1] == "upstream_truncated"


# -- WebSocket switch ---------------------------------------------------------------------------


def _accept(key: bytes) -> bytes:
    digest = hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()  # noqa: S324
    return base64.b64encode(digest)


HANDSHAKE = (
    b"GET /sockets/1/x HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + WS_KEY + b"\r\n\r\n"
)


def test_a_101_that_accepts_the_handshake_switches_to_a_tunnel() -> None:
    answer = (
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Accept: " + _accept(WS_KEY) + b"\r\n\r\n\x81\x00"
    )
    h = harness(respond=lambda conn: answer)
    h.send(HANDSHAKE)
    assert state(h) is State.TUNNEL and statuses(h) == [101]
    switch = h.effects.switches[0]
    assert switch.upstream_rest == b"\x81\x00" and switch.client_rest == b""
    assert h.take_client().startswith(b"HTTP/1.1 101 ")


def test_a_101_with_a_wrong_accept_is_a_502() -> None:
    answer = (
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Accept: " + _accept(b"another key") + b"\r\n\r\n"
    )
    h = harness(respond=lambda conn: answer)
    h.send(HANDSHAKE)
    assert [(r.status, r.code) for r in h.records] == [(502, "upstream_failed")]
    assert not h.effects.switches and state(h) is State.CLOSED


# -- shutdown -----------------------------------------------------------------------------------


def test_wind_down_answers_with_connection_close() -> None:
    h = harness()
    h.exchange.wind_down = True
    h.send(GET)
    assert b"Connection: close" in h.take_client() and h.effects.closed == "close"


def test_abandon_answers_a_request_without_a_response_503() -> None:
    h = harness(respond=lambda conn: None)
    h.send(GET)
    h.exchange.abandon()
    assert [(r.status, r.code) for r in h.records] == [(503, "shutting_down")]
    assert h.upstreams[0].fate == "discarded" and h.effects.closed == "close"
