"""The pure health state (``health.py``): rise and fall, passive marks, reload sync, the status
line; the health messages of the control channel; a worker pool following the table."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fastproxy import control
from fastproxy.config import HealthCheck, UpstreamConfig, parse_config
from fastproxy.errors import NoHealthyUpstream
from fastproxy.health import Change, HealthBoard, ServerHealth, parse_status_line, status_passes
from fastproxy.upstream import UpstreamPool

A, B = "10.0.0.1:80", "10.0.0.2:80"


def upstreams(*servers: str, **spec: Any) -> dict[str, UpstreamConfig]:
    document = {
        "upstreams": {"u": {"servers": list(servers), **spec}},
        "listeners": {"web": {"bind": "127.0.0.1:0", "policy": "p"}},
        "policies": {"p": {"fallback": "forward"}},
    }
    return dict(parse_config(document, "t.toml").upstreams)


def board(*servers: str, **spec: Any) -> HealthBoard:
    made = HealthBoard()
    made.sync(upstreams(*servers, **spec), 0.0)
    return made


def check(b: HealthBoard, server: str, ok: bool, now: float) -> Change | None:
    state = b.servers[("u", server)]
    b.check_started(state, now)
    return b.check_done(state, ok, "connection refused")


def test_health_status_line() -> None:
    assert parse_status_line(b"HTTP/1.1 200 OK") == 200
    assert parse_status_line(b"HTTP/1.0 503") == 503
    assert parse_status_line(b"HTTP/1.1 204 ") == 204
    for bad in (b"HTTP/2 200 OK", b"HTTP/1.1 20 OK", b"HTTP/1.1 2000", b"ICY 200 OK", b""):
        assert parse_status_line(bad) is None, bad
    ranges = ((200, 399),)
    assert status_passes(200, ranges) and status_passes(302, ranges)
    assert not status_passes(404, ranges) and not status_passes(199, ranges)


def test_health_defaults_are_an_operators_expectation() -> None:
    check = UpstreamConfig("u", ()).health
    assert check == HealthCheck("/up", 2.0, 1.0, ((200, 399),), rise=1, fall=2)
    assert UpstreamConfig("u", ()).down_for_s == 10.0


def test_health_servers_start_up_and_are_due_at_once() -> None:
    b = board(A, B)
    assert b.table() == {"u": {A: True, B: True}}
    assert {s.label for s in b.due(0.0)} == {A, B}


def test_health_fall_then_rise() -> None:
    b = board(A, B)
    assert check(b, A, False, 0.0) is None  # one failure is not enough (fall = 2)
    change = check(b, A, False, 2.0)
    assert change == Change("u", A, False, "2 checks failed: connection refused")
    assert b.table()["u"] == {A: False, B: True}
    assert check(b, A, True, 4.0) == Change("u", A, True, "check passed")  # rise = 1


def test_health_rise_and_fall_counts_are_consecutive() -> None:
    b = board(A, health={"rise": 2, "fall": 2})
    check(b, A, False, 0.0)
    check(b, A, True, 1.0)
    assert check(b, A, False, 2.0) is None  # the pass in between reset the count
    assert check(b, A, False, 3.0) is not None
    assert check(b, A, True, 4.0) is None
    assert check(b, A, True, 5.0) is not None


def test_health_passive_mark_lifted_by_a_check_started_after_it() -> None:
    b = board(A, B)
    version = b.version
    change = b.passive_failure("u", A, "connect failed", 10.0)
    assert change is not None and not change.up and b.version > version
    state = b.servers[("u", A)]
    # a check that started before the mark does not lift it
    b.check_started(state, 9.0)
    assert b.check_done(state, True, "") is None
    assert b.table()["u"][A] is False
    assert check(b, A, True, 11.0) == Change("u", A, True, "check passed")


def test_health_passive_mark_expires_without_checks() -> None:
    b = board(A, B, health=False, down_for_s=5)
    assert b.due(0.0) == []
    assert b.passive_failure("u", A, "reset", 1.0) is not None
    assert b.next_event() == 6.0
    assert b.expire(5.0) == []
    assert b.expire(6.0) == [Change("u", A, True, "passive mark expired")]


def test_health_passive_never_takes_the_only_server_without_checks() -> None:
    assert board(A, health=False).passive_failure("u", A, "refused", 0.0) is None
    assert board(A).passive_failure("u", A, "refused", 0.0) is not None


def test_health_sync_keeps_the_state_of_servers_that_stay() -> None:
    b = board(A, B)
    check(b, A, False, 0.0)
    check(b, A, False, 1.0)
    assert b.table()["u"][A] is False
    changes = b.sync(upstreams(A, "10.0.0.3:80"), 2.0)
    assert changes == []
    assert b.table() == {"u": {A: False, "10.0.0.3:80": True}}
    # checks turned off: the checks' verdict no longer counts
    changes = b.sync(upstreams(A, health=False), 3.0)
    assert changes == [Change("u", A, True, "settings changed")]
    assert b.due(10.0) == []


def test_health_tls_upstreams_are_checked_and_a_tls_change_checks_at_once() -> None:
    b = board(A, tls=True)
    state = b.servers[("u", A)]
    assert state.check is not None and state.tls is not None and state.tls.verify
    assert [s.label for s in b.due(0.0)] == [A]
    # the only server of a checked TLS upstream: passive marks apply, as for a plain one
    assert b.passive_failure("u", A, "refused", 0.0) is not None
    b2 = board(A, B, tls={"verify": False})
    check(b2, A, False, 0.0)
    check(b2, A, False, 1.0)
    assert b2.due(1.5) == [b2.servers[("u", B)]]
    # new TLS settings (the right CA, say): the state stays, the next check is due at once
    changes = b2.sync(upstreams(A, B, tls={"server_name": "backend.example"}), 2.0)
    assert changes == [] and b2.table()["u"] == {A: False, B: True}
    assert {s.label for s in b2.due(2.0)} == {A, B}
    tls = b2.servers[("u", A)].tls
    assert tls is not None and tls.server_name == "backend.example"


def test_health_result_of_a_removed_server_is_ignored() -> None:
    b = board(A, B)
    state: ServerHealth = b.servers[("u", B)]
    b.check_started(state, 0.0)
    b.sync(upstreams(A), 0.5)
    assert b.check_done(state, False, "x") is None
    assert b.table() == {"u": {A: True}}


def test_health_control_messages_round_trip() -> None:
    master, worker = control.channel_pair()
    try:
        control.send_health(
            master, control.encode_health(control.Health(4, {"u": {A: True, B: False}}))
        )
        assert control.receive(worker) == control.Health(4, {"u": {A: True, B: False}})
        worker.setblocking(False)
        control.send_down(worker, control.ServerDown(4, "u", B, "connect failed"))
        assert control.receive(master) == control.ServerDown(4, "u", B, "connect failed")
    finally:
        master.close()
        worker.close()


@pytest.fixture
def loop() -> Any:
    made = asyncio.new_event_loop()
    yield made
    made.close()


def test_pool_follows_the_table_and_raises_with_no_server_up(loop: Any) -> None:
    pool = UpstreamPool(upstreams(A, B)["u"], loop, {A: False})
    assert [pool.pick().label for _ in range(3)] == [B, B, B]
    pool.set_health({A: False, B: False}, 0.0)
    with pytest.raises(NoHealthyUpstream):
        pool.pick()
    pool.set_health({}, 0.0)
    assert {pool.pick().label for _ in range(2)} == {A, B}


def test_pool_local_mark_holds_until_the_master_confirms(loop: Any) -> None:
    reports: list[tuple[str, str, str]] = []
    pool = UpstreamPool(upstreams(A, B)["u"], loop, None, lambda *r: reports.append(r))
    server = pool.servers[0]
    pool.server_failed(server, "connect failed")
    assert reports == [("u", A, "connect failed")]
    assert [s.label for s in pool.up] == [B]
    pool.server_failed(server, "connect failed")
    assert len(reports) == 1  # reported once
    # a table sent before the master read the report does not put it back
    pool.set_health({A: True, B: True}, server.marked_at + 1)
    assert [s.label for s in pool.up] == [B]
    pool.set_health({A: False, B: True}, server.marked_at + 1)  # confirmed
    pool.set_health({A: True, B: True}, server.marked_at + 2)  # and back
    assert [s.label for s in pool.up] == [A, B]


def test_pool_least_conn_rotates_ties_and_prefers_the_least_busy(loop: Any) -> None:
    pool = UpstreamPool(upstreams(A, B, "10.0.0.3:80", balance="least_conn")["u"], loop)
    picks = [pool.pick().label for _ in range(6)]
    assert picks == [A, B, "10.0.0.3:80", A, B, "10.0.0.3:80"]
    pool.servers[0].active = 1
    pool.servers[2].active = 1
    assert {pool.pick().label for _ in range(3)} == {B}
