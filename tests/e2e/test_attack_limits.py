"""Limits under attack, end to end (SPEC 7: "a slow or hostile client delays no one but itself").

One real fastproxy with one worker, so every attacker shares the event loop with the normal
client: clients dribbling heads or bodies a byte at a time do not delay a normal request;
oversize heads and targets are answered 431/414 and closed without the worker buffering what
was sent; a flood of connections from one address is capped per client; the header timeout
answers a dribbler 408 while normal clients go on. Deadlines are generous and nothing asserts
how fast anything happened; all traffic stays on the loopback interface.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import select
import socket
import threading
import time
from collections.abc import Iterator, Sequence

import pytest
from support.client import (
    ConnectionClosedError,
    HttpConnection,
    Response,
    assert_error,
    build_request,
    get,
    host_of,
)
from support.proxy import ProxyFactory, RunningProxy, rss_bytes
from support.upstream import RecordingUpstream

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

DRIBBLE_INTERVAL_S = 0.2
#: how long a normal request may take while the attackers run; the point is "not stuck behind
#: them", never a latency figure
NORMAL_DEADLINE_S = 10.0
MB = 1024 * 1024


def the_worker(proxy: RunningProxy) -> int:
    pids = proxy.worker_pids()
    assert len(pids) == 1, pids
    return pids[0]


class Dribbler:
    """Connections that each send a burst, then one more byte every ``interval`` seconds.

    A background thread does the sending. A connection the proxy answers or closes stops being
    fed, and the time is kept in ``answered`` (by index); its bytes stay unread for the test.
    """

    def __init__(
        self,
        port: int,
        scripts: Sequence[tuple[bytes, bytes]],
        interval: float = DRIBBLE_INTERVAL_S,
    ) -> None:
        self.conns: list[HttpConnection] = []
        self.scripts = [slow for _, slow in scripts]
        self.sent = [0] * len(scripts)
        self.answered: dict[int, float] = {}
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dribbler", daemon=True)
        try:
            for burst, _ in scripts:
                conn = HttpConnection(port)
                self.conns.append(conn)
                if burst:
                    conn.send(burst)
        except BaseException:
            self.close()
            raise
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            live = [i for i in range(len(self.conns)) if i not in self.answered]
            if not live:
                return
            readable, _, _ = select.select([self.conns[i].sock for i in live], [], [], 0)
            for i in live:
                sock = self.conns[i].sock
                if sock in readable:
                    self.answered[i] = time.monotonic()
                    continue
                script, at = self.scripts[i], self.sent[i]
                if at >= len(script):
                    continue
                try:
                    self.sent[i] += sock.send(script[at : at + 1])
                except OSError:
                    self.answered[i] = time.monotonic()

    def still_dribbling(self) -> list[int]:
        """Connections neither answered nor done sending."""
        return [
            i
            for i in range(len(self.conns))
            if i not in self.answered and self.sent[i] < len(self.scripts[i])
        ]

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def close(self) -> None:
        self.stop()
        for conn in self.conns:
            conn.close()


@contextlib.contextmanager
def dribbling(
    port: int, scripts: Sequence[tuple[bytes, bytes]], interval: float = DRIBBLE_INTERVAL_S
) -> Iterator[Dribbler]:
    dribbler = Dribbler(port, scripts, interval)
    try:
        yield dribbler
    finally:
        dribbler.close()


def slow_head(port: int) -> tuple[bytes, bytes]:
    """A head sent one byte at a time from the start; long enough never to finish here."""
    head = build_request("/api/1/devices/slow-head", host=host_of(port))
    return b"", head[:-2] + b"X-Slow: " + b"s" * 200 + b"\r\n\r\n"


def slow_body(port: int) -> tuple[bytes, bytes]:
    """An allowed POST whose head is sent at once and whose body then arrives a byte at a time."""
    body = b"b" * 1000
    request = build_request(
        "/api/1/devices/slow-body", host=host_of(port), method="POST", body=body
    )
    return request[: -len(body)], body


def timed_get(port: int, target: str) -> tuple[Response, float]:
    started = time.monotonic()
    with HttpConnection(port, timeout=NORMAL_DEADLINE_S) as conn:
        response = conn.get(target)
    return response, time.monotonic() - started


# -- slow clients (SPEC 7) ------------------------------------------------------------------------


def test_dribbling_heads_and_bodies_do_not_delay_a_normal_request(
    proxy: ProxyFactory, upstream: RecordingUpstream
) -> None:
    port = proxy(overrides={"workers": 1}).sdk_port
    scripts = [slow_head(port) for _ in range(32)] + [slow_body(port) for _ in range(32)]
    with dribbling(port, scripts) as dribbler:
        # every slow body has reached the upstream, which now waits on it as the proxy does
        deadline = time.monotonic() + NORMAL_DEADLINE_S
        while len(upstream.find(b"/api/1/devices/slow-body")) < 32:
            assert time.monotonic() < deadline, "the slow bodies were not all forwarded"
            time.sleep(0.05)
        time.sleep(5 * DRIBBLE_INTERVAL_S)  # a few bytes of every attacker are in
        for n in range(3):
            response, elapsed = timed_get(port, f"/api/1/devices/normal-{n}")
            assert response.status == 200, response
            assert elapsed < NORMAL_DEADLINE_S, elapsed
        with HttpConnection(port, timeout=NORMAL_DEADLINE_S) as conn:
            posted = conn.request(
                build_request(
                    "/api/1/devices/normal-post", host=host_of(port), method="POST", body=b"x" * 10
                )
            )
        assert posted.status == 200, posted
        # the attackers were dribbling all along: none answered, none finished
        assert dribbler.still_dribbling() == list(range(64)), dribbler.answered
        assert min(dribbler.sent) >= 3, dribbler.sent
    normal = [r.target for r in upstream.requests() if b"normal" in r.target]
    assert normal == [b"/api/1/devices/normal-%d" % n for n in range(3)] + [
        b"/api/1/devices/normal-post"
    ]
    assert not upstream.find(b"/api/1/devices/slow-head")


def test_header_timeout_answers_a_dribbler_408_while_normal_clients_go_on(
    proxy: ProxyFactory, upstream: RecordingUpstream
) -> None:
    limits = {"limits": {"header_timeout_s": 1.0}}
    port = proxy(overrides={"workers": 1, "listeners": {"sdk": limits}}).sdk_port
    with dribbling(port, [slow_head(port)]) as dribbler:
        # a keep-alive client sends whole requests now and then, for longer than the timeout
        with HttpConnection(port, timeout=NORMAL_DEADLINE_S) as conn:
            for n in range(6):
                assert conn.get(f"/api/1/devices/keepalive-{n}").status == 200
                time.sleep(0.4)
        deadline = time.monotonic() + NORMAL_DEADLINE_S
        while 0 not in dribbler.answered and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 0 in dribbler.answered, "the dribbler was never answered"
        dribbler.stop()
        assert dribbler.sent[0] < len(dribbler.scripts[0])  # cut off before its head ended
        conn = dribbler.conns[0]
        response = conn.read_response()
        assert conn.wait_closed()
    assert_error(response, 408, "header_timeout")
    assert get(port, "/api/1/devices/after").status == 200
    assert not upstream.find(b"/api/1/devices/slow-head")
    assert len(upstream.find(b"/api/1/devices/keepalive-5")) == 1


# -- oversize heads (SPEC 7) ----------------------------------------------------------------------


def blast(port: int, payload: bytes) -> tuple[Response, bool, int]:
    """Send ``payload`` as fast as the proxy takes it while reading the answer.

    Returns the response, whether the connection was then closed, and how many bytes the
    kernel accepted before the proxy closed the connection.
    """
    conn = HttpConnection(port, timeout=NORMAL_DEADLINE_S)
    sent = [0]

    def pour() -> None:
        view = memoryview(payload)
        with contextlib.suppress(OSError):
            while sent[0] < len(payload):
                sent[0] += conn.sock.send(view[sent[0] : sent[0] + 65536])

    sender = threading.Thread(target=pour, name="blast", daemon=True)
    sender.start()
    try:
        response = conn.read_response()
        closed = conn.wait_closed(timeout=NORMAL_DEADLINE_S)
    finally:
        sender.join(timeout=NORMAL_DEADLINE_S)
        conn.close()
    return response, closed, sent[0]


def oversize_head(port: int) -> bytes:
    head = build_request("/api/1/devices", host=host_of(port))
    return head[:-2] + b"X-Big: " + b"h" * MB + b"\r\n\r\n"


def oversize_target(port: int) -> bytes:
    return build_request("/api/1/devices?q=" + "u" * MB, host=host_of(port))


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [(oversize_head, 431, "headers_too_large"), (oversize_target, 414, "uri_too_long")],
    ids=["head-1MB", "target-1MB"],
)
def test_oversize_heads_refused_without_buffering_what_was_sent(
    proxy: ProxyFactory,
    upstream: RecordingUpstream,
    payload: object,
    status: int,
    code: str,
) -> None:
    assert callable(payload)
    running = proxy(overrides={"workers": 1})
    port = running.sdk_port
    data = payload(port)
    assert isinstance(data, bytes)
    worker = the_worker(running)
    for _ in range(2):  # warm up: the first refusals size the worker's allocator
        blast(port, data)
    before = rss_bytes(worker)
    attempted = 0
    accepted = 0
    # 20 connections, 4 at a time, each pouring 1 MB as fast as the kernel takes it
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for response, closed, sent in pool.map(lambda _: blast(port, data), range(20)):
            assert_error(response, status, code)
            assert closed, "the proxy kept the connection after refusing the head"
            attempted += len(data)
            accepted += sent
    growth = rss_bytes(worker) - before
    assert attempted >= 20 * MB
    assert growth < 8 * MB, (growth, accepted)
    assert upstream.requests() == []
    assert get(port, "/api/1/devices/after").status == 200


# -- connection floods (SPEC 7) -------------------------------------------------------------------


def usable(conn: HttpConnection, target: str) -> bool:
    """Whether a request on ``conn`` is answered 200 (False when the proxy closed it)."""
    try:
        return conn.get(target).status == 200
    except (ConnectionClosedError, OSError):
        return False


def test_connection_flood_from_one_address_capped_per_client(
    proxy: ProxyFactory, upstream: RecordingUpstream
) -> None:
    limits = {"limits": {"max_connections_per_client": 16}}
    port = proxy(overrides={"workers": 1, "listeners": {"sdk": limits}}).sdk_port
    conns: list[HttpConnection] = []
    try:
        conns.extend(HttpConnection(port, timeout=NORMAL_DEADLINE_S) for _ in range(64))
        answered = [usable(conn, f"/api/1/devices/flood-{n}") for n, conn in enumerate(conns)]
        assert 1 <= sum(answered) <= 16, answered
        assert sum(answered) == 16, answered  # the cap, not something stricter
        # the others were closed by the proxy, not merely left waiting
        for conn, ok in zip(conns, answered, strict=True):
            if not ok:
                with contextlib.suppress(OSError):
                    assert conn.wait_closed(timeout=NORMAL_DEADLINE_S)
    finally:
        for conn in conns:
            conn.close()
    # once they are closed, the address may connect again
    deadline = time.monotonic() + NORMAL_DEADLINE_S
    while True:
        with HttpConnection(port, timeout=NORMAL_DEADLINE_S) as conn:
            if usable(conn, "/api/1/devices/after-flood"):
                break
        assert time.monotonic() < deadline, "no connection accepted after the flood ended"
        time.sleep(0.1)
    # and it is capped again: 16 held open leave no room for a 17th
    held = [HttpConnection(port, timeout=NORMAL_DEADLINE_S) for _ in range(16)]
    try:
        assert all(usable(conn, "/api/1/devices/held") for conn in held)
        with HttpConnection(port, timeout=NORMAL_DEADLINE_S) as extra:
            assert not usable(extra, "/api/1/devices/extra")
    finally:
        for conn in held:
            conn.close()
    assert not upstream.find(b"/api/1/devices/extra")


def test_flood_of_other_clients_is_not_capped_by_one(proxy: ProxyFactory) -> None:
    # the cap is per address: one address at its cap does not lock out another one
    limits = {"limits": {"max_connections_per_client": 4}}
    port = proxy(overrides={"workers": 1, "listeners": {"sdk": limits}}).sdk_port
    held = [HttpConnection(port, timeout=NORMAL_DEADLINE_S) for _ in range(4)]
    try:
        assert all(usable(conn, "/api/1/devices/held") for conn in held)
        other = socket.create_connection(
            ("127.0.0.1", port), timeout=NORMAL_DEADLINE_S, source_address=("127.0.0.2", 0)
        )
        with other:
            other.sendall(build_request("/api/1/devices/other", host=host_of(port)))
            assert other.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        for conn in held:
            conn.close()
