"""Upstream health: active checks run once by the master, passive marks shared by every worker,
failed connects and early resets tried on another server, 503 with no server up, /readyz;
checks over TLS to TLS upstreams.

Real processes: the proxy (master and workers) in a subprocess, recording upstreams in threads
stopped and restarted on the same port. Counts and states, not timings: every wait is generous
(seconds). Checks run every ``INTERVAL_S`` here, so a state change shows within a few seconds.
The parser plays no part: these run on the default one only.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.certs import Authority
from support.client import HttpConnection, get
from support.proxy import ProxyFactory, RunningProxy, merge
from support.raw import RawUpstream, ThreadedOrigin
from support.upstream import RecordingUpstream

pytestmark = pytest.mark.e2e

INTERVAL_S = 1.0
HEALTH = {"interval_s": INTERVAL_S, "timeout_s": 0.5}
#: generous bound for anything that should happen within an interval or two
WAIT_S = 20.0


def _cobrowse(servers: list[str], **spec: object) -> dict[str, object]:
    return {"upstreams": {"cobrowse": {"servers": servers, "health": HEALTH, **spec}}}


def _metrics(proxy: RunningProxy) -> dict[str, float]:
    """``fastproxy_upstream_up`` by server."""
    found = {}
    for line in get(proxy.admin_port, "/metrics").body.decode().splitlines():
        if line.startswith("fastproxy_upstream_up{"):
            labels, value = line.rsplit(" ", 1)
            server = labels.split('server="', 1)[1].split('"', 1)[0]
            found[server] = float(value)
    return found


def _wait(what: str, condition: Callable[[], bool], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)


def _up(proxy: RunningProxy, server: str) -> Callable[[], bool]:
    return lambda: _metrics(proxy).get(server) == 1.0


def _down(proxy: RunningProxy, server: str) -> Callable[[], bool]:
    return lambda: _metrics(proxy).get(server) == 0.0


@pytest.fixture
def second() -> Iterator[list[RecordingUpstream]]:
    """A second recording upstream, as a list: a test that stops it appends its restart."""
    started = [RecordingUpstream()]
    started[0].start()
    try:
        yield started
    finally:
        for server in started:
            server.stop()


def test_a_killed_server_costs_no_client_error_and_is_back_within_an_interval(
    factory: ProxyFactory, upstream: RecordingUpstream, second: list[RecordingUpstream]
) -> None:
    b = second[0]
    label = b.address
    proxy = factory(overrides=merge(_cobrowse([upstream.address, label]), {"workers": 2}))
    statuses: list[int] = []

    def send(count: int) -> None:
        for _ in range(count):
            with HttpConnection(proxy.sdk_port) as conn:
                statuses.append(conn.get("/api/1/devices").status)

    send(20)
    assert b.requests() and upstream.requests(), "round robin reaches both servers"
    b.stop()
    upstream.reset()
    # the first requests to the dead server fail to connect and go to the other one
    send(30)
    _wait("the dead server is marked down", _down(proxy, label))
    proxy.wait_for_message(f"upstream cobrowse server {label} is down")
    send(20)
    assert statuses == [200] * len(statuses), statuses

    restarted = RecordingUpstream(port=int(label.rsplit(":", 1)[1]))
    second.append(restarted)
    restarted.start()
    _wait("the restored server is up", _up(proxy, label))
    proxy.wait_for_message(f"upstream cobrowse server {label} is up")

    def traffic_back() -> bool:
        send(4)
        return bool(restarted.requests())

    _wait("the restored server gets requests again", traffic_back)
    assert statuses == [200] * len(statuses), statuses


def test_every_server_down_is_a_503_at_once_and_readyz_says_why(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    first = RecordingUpstream()
    first.start()
    servers = [first]
    factory = ProxyFactory(tmp_path_factory.mktemp("down"), [first.address])
    try:
        proxy = factory(overrides=_cobrowse([first.address]))
        label = first.address
        assert get(proxy.sdk_port, "/api/1/devices").status == 200
        assert get(proxy.admin_port, "/readyz").status == 200
        first.stop()

        reply = get(proxy.sdk_port, "/api/1/devices")
        assert reply.status == 503 and reply.error == "no_healthy_upstream", reply
        ready = get(proxy.admin_port, "/readyz")
        assert ready.status == 503
        assert ready.json() == {
            "ready": False,
            "reason": "no_healthy_upstream",
            "upstreams": ["cobrowse"],
        }
        assert _metrics(proxy) == {label: 0.0}

        restarted = RecordingUpstream(port=first.port)
        servers.append(restarted)
        restarted.start()
        _wait("/readyz back to 200", lambda: get(proxy.admin_port, "/readyz").status == 200)
        assert get(proxy.sdk_port, "/api/1/devices").status == 200
        assert restarted.requests()
    finally:
        factory.stop_all()
        for server in servers[1:]:
            server.stop()


class StatusOrigin(RawUpstream):
    """Answers ``GET /up`` with ``up_status`` and everything else with 200; records targets."""

    def __init__(self, up_status: int) -> None:
        super().__init__({b"/up": b"HTTP/1.1 %d Nope\r\nContent-Length: 0\r\n\r\n" % up_status})

    def served(self) -> list[bytes]:
        with self._lock:
            return [t for t in self.targets if t != b"/up"]

    def checks(self) -> int:
        with self._lock:
            return self.targets.count(b"/up")


def test_a_respawned_worker_knows_which_server_is_down(
    factory: ProxyFactory, upstream: RecordingUpstream
) -> None:
    sick = StatusOrigin(up_status=503)
    sick.start()
    try:
        servers = [upstream.address, sick.address]
        proxy = factory(overrides=merge(_cobrowse(servers), {"workers": 2}))
        _wait("the failing server is marked down", _down(proxy, sick.address))
        proxy.wait_for_message(f"upstream cobrowse server {sick.address} is down: 2 checks")
        served_before = len(sick.served())
        checks = sick.checks()

        victim = proxy.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        proxy.wait_for_message(f"worker {victim} killed by SIGKILL")
        _wait(
            "a replacement worker",
            lambda: len(proxy.worker_pids()) == 2 and victim not in proxy.worker_pids(),
        )
        for _ in range(40):
            assert get(proxy.sdk_port, "/api/1/devices").status == 200
        assert len(sick.served()) == served_before, "a worker sent a request to a down server"
        # the checks run once per host, in the master: about one per interval, not per worker
        time.sleep(3 * INTERVAL_S)
        assert 2 <= sick.checks() - checks <= 3 + 3 * 2
        assert _metrics(proxy) == {upstream.address: 1.0, sick.address: 0.0}
    finally:
        sick.stop()


def test_least_conn_breaks_ties_round_robin(factory: ProxyFactory) -> None:
    origins = [StatusOrigin(up_status=200) for _ in range(3)]
    for origin in origins:
        origin.start()
    try:
        servers = [o.address for o in origins]
        proxy = factory(overrides=_cobrowse(servers, balance="least_conn"))
        with HttpConnection(proxy.sdk_port) as conn:
            for _ in range(30):
                assert conn.get("/api/1/devices").status == 200
        # one request at a time: every pick is a tie, and ties rotate
        assert [len(o.served()) for o in origins] == [10, 10, 10]
    finally:
        for origin in origins:
            origin.stop()


class ResettingOrigin(ThreadedOrigin):
    """Answers ``/up`` with 200 and resets every other request before any response byte."""

    def __init__(self) -> None:
        super().__init__()
        self.resets = 0

    def _serve(self, sock: socket.socket, index: int) -> None:
        with sock:
            taken = self.read_head(sock, b"")
            if taken is None:
                return
            if taken[0].split(b" ", 2)[1] == b"/up":
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                return
            with self._lock:
                self.resets += 1
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_a_reset_before_any_byte_is_tried_on_another_server_for_idempotent_requests(
    factory: ProxyFactory, upstream: RecordingUpstream
) -> None:
    resetter = ResettingOrigin()
    resetter.start()
    try:
        # long interval: the passive mark (down_for_s) keeps the resetter out after its reset
        proxy = factory(
            overrides=_cobrowse(
                [resetter.address, upstream.address],
                health={"interval_s": 30.0, "timeout_s": 1.0},
                keepalive=0,
            )
        )
        for _ in range(4):
            assert get(proxy.sdk_port, "/api/1/devices").status == 200
        assert resetter.resets == 1
        assert len(upstream.requests()) == 4
        proxy.wait_for_message(
            f"upstream cobrowse server {resetter.address} is down: reset before any response byte"
        )
        assert _metrics(proxy)[resetter.address] == 0.0
    finally:
        resetter.stop()


def test_a_post_reset_before_any_byte_is_a_502_not_a_retry(
    factory: ProxyFactory, upstream: RecordingUpstream
) -> None:
    resetter = ResettingOrigin()
    resetter.start()
    try:
        proxy = factory(overrides=_cobrowse([resetter.address], keepalive=0))
        with HttpConnection(proxy.sdk_port) as conn:
            conn.send(b"POST /api/1/devices HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
            reply = conn.read_response(method=b"POST")
        assert reply.status == 502 and reply.error == "upstream_failed"
        assert resetter.resets == 1
    finally:
        resetter.stop()


def test_reload_checks_the_new_server_set_and_health_false_sends_no_check(
    factory: ProxyFactory, upstream: RecordingUpstream
) -> None:
    sick = StatusOrigin(up_status=500)
    sick.start()
    try:
        proxy = factory(overrides=_cobrowse([upstream.address]))
        assert _metrics(proxy) == {upstream.address: 1.0}
        proxy.reload(merge(proxy.document, _cobrowse([upstream.address, sick.address])))
        proxy.wait_for_message("generation 2 applied by every worker")
        _wait("the added server is checked and marked down", _down(proxy, sick.address))
        assert _metrics(proxy)[upstream.address] == 1.0

        document = merge(proxy.document, {})
        document["upstreams"] = {"cobrowse": {"servers": [upstream.address], "health": False}}
        proxy.reload(document)
        proxy.wait_for_message("generation 3 applied by every worker")
        assert _metrics(proxy) == {upstream.address: 1.0}
        checks = len(upstream.requests(include_health=True)) - len(upstream.requests())
        time.sleep(3 * INTERVAL_S)
        assert len(upstream.requests(include_health=True)) - len(upstream.requests()) == checks
    finally:
        sick.stop()


def test_tls_upstreams_are_checked_over_tls_down_and_back_without_a_client_error(
    factory: ProxyFactory, tmp_path: Path
) -> None:
    ca = Authority(tmp_path / "certs")
    backends = [
        RecordingUpstream(ssl_context=ca.server_context("backend.example")) for _ in range(2)
    ]
    for backend in backends:
        backend.start()
    a, b = backends
    label = b.address
    try:
        tls = {"ca": str(ca.ca_file), "server_name": "backend.example"}
        proxy = factory(overrides=merge(_cobrowse([a.address, label], tls=tls), {"workers": 2}))
        statuses: list[int] = []

        def send(count: int) -> None:
            for _ in range(count):
                with HttpConnection(proxy.sdk_port) as conn:
                    statuses.append(conn.get("/api/1/devices").status)

        # the checks reach both servers through a verified handshake and pass
        _wait(
            "a check of each server",
            lambda: all(s.requests(include_health=True) != s.requests() for s in backends),
        )
        assert _metrics(proxy) == {a.address: 1.0, label: 1.0}
        send(20)
        assert a.requests() and b.requests(), "round robin reaches both servers"

        # no traffic while it is down: the checks alone find it
        b.stop()
        _wait("the stopped server is marked down", _down(proxy, label))
        proxy.wait_for_message(
            f"upstream cobrowse server {label} is down: 2 checks failed: Connection refused"
        )
        a.reset()
        send(20)
        assert len(a.requests()) == 20

        restarted = RecordingUpstream(port=b.port, ssl_context=ca.server_context("backend.example"))
        backends.append(restarted)
        restarted.start()
        _wait("the restarted server is up", _up(proxy, label))
        proxy.wait_for_message(f"upstream cobrowse server {label} is up: check passed")

        def traffic_back() -> bool:
            send(4)
            return bool(restarted.requests())

        _wait("the restarted server gets requests again", traffic_back)
        assert statuses == [200] * len(statuses), statuses
        assert not any("is down" in m and a.address in m for m in proxy.messages())
    finally:
        # the proxies first: a handshake under way when a backend's loop closes would be
        # left unclosed (the server tracks connections once their handshake is done)
        factory.stop_all()
        deadline = time.monotonic() + 10.0
        for backend in backends:
            while time.monotonic() < deadline and not all(c.closed for c in backend.connections()):
                time.sleep(0.05)
        time.sleep(0.2)
        for backend in backends:
            backend.stop()
    for backend in backends:
        assert not backend.errors, backend.errors
