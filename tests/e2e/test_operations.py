"""Operating the proxy end to end (SPEC 3, 5, 7, 8, 9): the admin listener and its metrics, report
mode, upstream keep-alive and the stale-connection retry, backpressure on a slow client, client
limits and timeouts, trusted proxies, the WebSocket tunnel mode and the ``check`` command.

Each test starts a proxy with the config it needs (``proxy`` factory). Waits poll with generous
deadlines; nothing asserts how fast something happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.client import (
    LOOPBACK,
    ConnectionClosedError,
    HttpConnection,
    WebSocketClient,
    assert_error,
    build_request,
    get,
    host_of,
)
from support.proxy import REPO_ROOT, ProxyFactory, RunningProxy, rss_bytes
from support.raw import ThreadedOrigin
from support.upstream import RecordingUpstream, pattern_body

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

WAIT_S = 20.0
POLL_S = 0.05


def wait_until(
    what: str, predicate: Callable[[], bool], proxy: RunningProxy, timeout: float = WAIT_S
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{proxy.output()}")
        time.sleep(POLL_S)


# -- the Prometheus exposition text ---------------------------------------------------------------

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')

Series = tuple[str, frozenset[tuple[str, str]]]


def parse_samples(text: str) -> dict[Series, float]:
    """Every sample of an exposition text, keyed by name and label set."""
    samples: dict[Series, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match is not None, line
        name, labels, value = match.groups()
        key = (name, frozenset(_LABEL.findall(labels or "")))
        samples[key] = float(value)
    return samples


def scrape(proxy: RunningProxy) -> dict[Series, float]:
    response = get(proxy.admin_port, "/metrics")
    assert response.status == 200, response
    return parse_samples(response.body.decode())


def requests_total(samples: dict[Series, float], **labels: str) -> float:
    """``fastproxy_requests_total`` with exactly these labels (0 when the series is absent)."""
    return samples.get(("fastproxy_requests_total", frozenset(labels.items())), 0.0)


def wait_for_count(proxy: RunningProxy, expected: float, **labels: str) -> dict[Series, float]:
    """Scrape until the series reaches ``expected``; assert it is exactly that."""
    deadline = time.monotonic() + WAIT_S
    while True:
        samples = scrape(proxy)
        value = requests_total(samples, **labels)
        if value >= expected or time.monotonic() > deadline:
            requests = {k: v for k, v in samples.items() if k[0] == "fastproxy_requests_total"}
            assert value == expected, (labels, value, requests)
            return samples
        time.sleep(POLL_S)


FORWARD_SDK = {"listener": "sdk", "rule": "api-devices", "decision": "forward"}
FALLBACK_SDK = {"listener": "sdk", "rule": "fallback"}


# -- admin listener -------------------------------------------------------------------------------


def test_metrics_count_requests_across_workers(
    proxy: ProxyFactory, upstream: RecordingUpstream
) -> None:
    running = proxy(overrides={"workers": 2})
    wait_until("two workers", lambda: len(running.worker_pids()) == 2, running)
    port = running.sdk_port
    allowed, denied = 7, 5
    # each request on a new connection, so both workers are likely to serve some
    for index in range(max(allowed, denied)):
        if index < allowed:
            assert get(port, f"/api/1/devices/m{index}").status == 200
        if index < denied:
            assert get(port, f"/admin/m{index}").status == 403
    samples = wait_for_count(running, allowed, **FORWARD_SDK, status_class="2xx")
    samples = wait_for_count(running, denied, **FALLBACK_SDK, decision="deny", status_class="4xx")
    forwarded = sum(
        value
        for (name, labels), value in samples.items()
        if name == "fastproxy_requests_total" and ("decision", "forward") in labels
    )
    assert forwarded == allowed
    assert len(upstream.requests()) == allowed


@pytest.mark.parametrize(
    ("path", "status", "body"),
    [("/livez", 200, b"ok\n"), ("/readyz", 200, b"ready\n"), ("/nope", 404, None)],
)
def test_admin_probes_and_unknown_path(
    proxy: ProxyFactory, path: str, status: int, body: bytes | None
) -> None:
    running = proxy()
    response = get(running.admin_port, path)
    assert response.status == status, response
    if body is not None:
        assert response.body == body


def test_report_mode_forwards_would_deny_and_counts_it(
    proxy: ProxyFactory, upstream: RecordingUpstream
) -> None:
    running = proxy(overrides={"listeners": {"sdk": {"mode": "report"}}})
    port = running.sdk_port
    response = get(port, "/admin?x=1")
    assert response.status == 200, response
    assert response.json()["target"] == "/admin?x=1"
    assert get(port, "/api/1/devices/x").status == 200
    assert upstream.targets() == [b"/admin?x=1", b"/api/1/devices/x"]
    samples = wait_for_count(running, 1, **FALLBACK_SDK, decision="would_deny", status_class="2xx")
    assert requests_total(samples, **FALLBACK_SDK, decision="deny", status_class="4xx") == 0
    assert requests_total(samples, **FORWARD_SDK, status_class="2xx") == 1
    wait_until(
        "the would_deny log line",
        lambda: '"decision":"would_deny"' in running.stderr_path.read_text(),
        running,
    )
    # the path as text, never a Python bytes repr
    assert '"msg":"would deny /admin on listener sdk (report mode)"' in (
        running.stderr_path.read_text()
    )


# -- upstream keep-alive --------------------------------------------------------------------------


class ScriptedUpstream(ThreadedOrigin):
    """A small keep-alive HTTP/1.1 upstream on plain sockets that closes connections on cue.

    Requests are heads without bodies. Each connection is served in its own thread and every
    request head is recorded as (connection index, target) before it is answered. ``mode``:

    - ``"drop-second"``: answer the first request of a connection; close the connection, without
      an answer, when a second request arrives on it (a backend whose idle timeout fired just as
      the proxy reused the connection);
    - ``"reset-second"``: the same, with a reset (RST) instead of an orderly close;
    - ``"idle-close"``: close a connection that stays idle for ``idle_close_s`` after an answer.
    """

    def __init__(self, mode: str, idle_close_s: float = 0.3) -> None:
        super().__init__()
        self.mode = mode
        self.idle_close_s = idle_close_s
        self.records: list[tuple[int, bytes]] = []
        #: indices of the connections this side has closed
        self.closed: set[int] = set()

    def _serve(self, sock: socket.socket, index: int) -> None:
        try:
            self._exchange(sock, index)
        finally:
            sock.close()
            with self._lock:
                self.closed.add(index)

    def _exchange(self, sock: socket.socket, index: int) -> None:
        sock.settimeout(self.idle_close_s if self.mode == "idle-close" else WAIT_S)
        buffer, served = b"", 0
        while not self._stopping.is_set():
            taken = self.read_head(sock, buffer)  # None: the idle timeout, or stop()
            if taken is None:
                return
            head, buffer = taken
            target = head.split(b" ", 2)[1]
            with self._lock:
                self.records.append((index, target))
            if self.mode in {"drop-second", "reset-second"} and served >= 1:
                if self.mode == "reset-second":  # SO_LINGER 0: close() sends RST, not FIN
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            body = b"%s on %d" % (target, index)
            try:
                sock.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
            except OSError:
                return
            served += 1


@pytest.fixture
def scripted() -> Iterator[Callable[[str], ScriptedUpstream]]:
    started: list[ScriptedUpstream] = []

    def start(mode: str) -> ScriptedUpstream:
        server = ScriptedUpstream(mode)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def test_upstream_connection_close_answer_not_reused(
    proxy: ProxyFactory, upstream: RecordingUpstream
) -> None:
    port = proxy().sdk_port
    with HttpConnection(port) as conn:
        first = conn.get("/api/1/devices/a?close=1")
        assert first.status == 200
        # the upstream's Connection: close is hop-by-hop: the client connection stays usable
        assert first.header("connection") is None or b"close" not in first.header_values(
            "connection"
        )
        second = conn.get("/api/1/devices/b")
        assert second.status == 200, second
        third = conn.get("/api/1/devices/c")
        assert third.status == 200, third
    a, b, c = upstream.requests()
    assert a.conn_id != b.conn_id, "a connection the upstream closes is never reused"
    assert b.conn_id == c.conn_id, "a keep-alive upstream connection is reused"


#: the scripted backend numbers every connection it accepts: no health check may take a number
NO_CHECKS = {"upstreams": {"cobrowse": {"health": False}}}


def test_upstream_idle_connection_closed_by_backend_not_used(
    proxy: ProxyFactory, scripted: Callable[[str], ScriptedUpstream]
) -> None:
    backend = scripted("idle-close")
    running = proxy(servers=[backend.address], overrides=NO_CHECKS)
    with HttpConnection(running.sdk_port) as conn:
        first = conn.get("/api/1/devices/a")
        assert (first.status, first.body) == (200, b"/api/1/devices/a on 0")
        # the backend closes the pooled connection while it is idle
        wait_until("the backend to close", lambda: 0 in backend.closed, running)
        second = conn.get("/api/1/devices/b")
        assert second.status == 200, second
        assert second.body == b"/api/1/devices/b on 1"
    assert backend.records == [(0, b"/api/1/devices/a"), (1, b"/api/1/devices/b")]


@pytest.mark.parametrize("mode", ["drop-second", "reset-second"], ids=["fin", "reset"])
def test_upstream_stale_keepalive_retried_once_on_new_connection(
    proxy: ProxyFactory, scripted: Callable[[str], ScriptedUpstream], mode: str
) -> None:
    backend = scripted(mode)
    port = proxy(servers=[backend.address], overrides=NO_CHECKS).sdk_port
    with HttpConnection(port) as conn:
        first = conn.get("/api/1/devices/a")
        assert (first.status, first.body) == (200, b"/api/1/devices/a on 0")
        time.sleep(0.2)  # the upstream connection is back in the pool
        second = conn.get("/api/1/devices/b")
        assert second.status == 200, (second.status, second.body)
        assert second.body == b"/api/1/devices/b on 1"
    assert backend.records == [
        (0, b"/api/1/devices/a"),
        (0, b"/api/1/devices/b"),
        (1, b"/api/1/devices/b"),
    ]


# -- backpressure (SPEC 5) ------------------------------------------------------------------------

MIB = 1024 * 1024


def test_slow_client_reading_large_response_keeps_worker_memory_flat(
    proxy: ProxyFactory, upstream: RecordingUpstream
) -> None:
    running = proxy()
    port = running.sdk_port
    wait_until("the worker", lambda: len(running.worker_pids()) == 1, running)
    [pid] = running.worker_pids()
    size = 50_000_000
    # a first large response warms the allocator, so the baseline is the worker's working set
    assert len(get(port, "/api/1/devices?size=4000000").body) == 4_000_000
    baseline = rss_bytes(pid)

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
        sock.settimeout(WAIT_S)
        sock.connect((LOOPBACK, port))
        sock.sendall(build_request(f"/api/1/devices?size={size}", host=host_of(port)))
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
        head, _, rest = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert b"\r\ncontent-length: %d" % size in head.lower(), head
        body = bytearray(rest)

        peak = baseline
        slow_until = time.monotonic() + 2.0
        while time.monotonic() < slow_until:
            chunk = sock.recv(65536)
            assert chunk, f"closed after {len(body)} body bytes"
            body += chunk
            peak = max(peak, rss_bytes(pid))
            time.sleep(0.01)
        # most of the body is still to come: it waits upstream, not in the proxy
        assert len(body) < size // 2, len(body)
        assert peak - baseline < 20 * MIB, (baseline, peak)

        while len(body) < size:
            chunk = sock.recv(4 * MIB)
            assert chunk, f"closed after {len(body)} body bytes"
            body += chunk
    assert len(body) == size
    assert body == pattern_body(size)


# -- client limits and timeouts (SPEC 7) ----------------------------------------------------------


def test_keepalive_timeout_closes_idle_connection_quietly(
    proxy: ProxyFactory, upstream: RecordingUpstream
) -> None:
    limits = {"limits": {"keepalive_timeout_s": 1.0}}
    port = proxy(overrides={"listeners": {"sdk": limits}}).sdk_port
    with HttpConnection(port, timeout=WAIT_S) as conn:
        assert conn.get("/api/1/devices/x").status == 200
        # an orderly close with nothing sent first (no 408 for a connection between requests)
        assert conn.sock.recv(65536) == b""


def _served(port: int) -> bool:
    try:
        return get(port, "/api/1/devices/again").status == 200
    except (ConnectionClosedError, OSError):
        return False


def test_connections_per_client_over_limit_closed_at_once(
    proxy: ProxyFactory, upstream: RecordingUpstream
) -> None:
    limits = {"limits": {"max_connections_per_client": 3}}
    running = proxy(overrides={"workers": 1, "listeners": {"sdk": limits}})
    port = running.sdk_port
    with contextlib.ExitStack() as stack:
        conns = [stack.enter_context(HttpConnection(port, timeout=WAIT_S)) for _ in range(3)]
        for index, conn in enumerate(conns):
            assert conn.get(f"/api/1/devices/{index}").status == 200
        with HttpConnection(port, timeout=WAIT_S) as fourth:
            # nginx limit_conn's answer: 503, then the connection closes
            assert_error(fourth.read_response(), 503, "overloaded")
            assert fourth.wait_closed(WAIT_S), "the fourth connection is closed after the 503"
        for index, conn in enumerate(conns):
            assert conn.get(f"/api/1/devices/{index}-again").status == 200
        conns[0].close()
        # once the proxy has seen that close, a new connection fits again
        wait_until("a new connection to be served", lambda: _served(port), running)
    assert len(upstream.requests()) == 3 + 3 + 1


# -- forwarding headers (SPEC 5) ------------------------------------------------------------------

INCOMING = [
    ("X-Forwarded-For", "203.0.113.9"),
    ("X-Forwarded-Proto", "https"),
    ("X-Request-Id", "abc-123"),
]


def test_trusted_proxy_forwarding_headers_kept_and_appended(
    proxy: ProxyFactory, upstream: RecordingUpstream
) -> None:
    trusted = {"trusted_proxies": ["127.0.0.1/32"]}
    port = proxy(overrides={"listeners": {"sdk": trusted}}).sdk_port
    response = get(port, "/api/1/devices/x", headers=INCOMING)
    assert response.status == 200
    [request] = upstream.requests()
    assert request.header_values("x-forwarded-for") == [b"203.0.113.9, 127.0.0.1"]
    assert request.header_values("x-forwarded-proto") == [b"https"]
    assert request.header_values("x-request-id") == [b"abc-123"]
    assert response.header_values("x-request-id") == [b"abc-123"]


def test_trusted_proxies_not_matching_client_replace_headers(
    proxy: ProxyFactory, upstream: RecordingUpstream
) -> None:
    trusted = {"trusted_proxies": ["10.0.0.0/8", "::1/128"]}
    port = proxy(overrides={"listeners": {"sdk": trusted}}).sdk_port
    response = get(port, "/api/1/devices/x", headers=INCOMING)
    assert response.status == 200
    [request] = upstream.requests()
    assert request.header_values("x-forwarded-for") == [b"127.0.0.1"]
    assert request.header_values("x-forwarded-proto") == [b"http"]
    [request_id] = request.header_values("x-request-id")
    assert request_id not in {b"", b"abc-123"}
    assert response.header_values("x-request-id") == [request_id]


# -- WebSocket tunnel mode (SPEC 6) ---------------------------------------------------------------


def test_websocket_tunnel_mode_echoes(proxy: ProxyFactory, upstream: RecordingUpstream) -> None:
    port = proxy(overrides={"listeners": {"sdk": {"websocket_mode": "tunnel"}}}).sdk_port
    payload = pattern_body(200_000)
    with WebSocketClient(port, "/sockets/1/t", timeout=WAIT_S) as ws:
        for text in ("one", "two"):
            ws.send_text(text)
            assert ws.recv() == text
        ws.send_bytes(payload)
        assert ws.recv() == payload
        assert ws.close(1000) == 1000
    [request] = upstream.requests()
    assert request.target == b"/sockets/1/t"
    [tunnel] = [c for c in upstream.connections() if c.conn_id == request.conn_id]
    assert tunnel.ws_messages == ["one", "two", payload]


# -- the command line (SPEC 10) -------------------------------------------------------------------

VALID_HEAD = """\
[upstreams.cobrowse]
servers = ["127.0.0.1:8000"]

[listeners.sdk]
bind = "127.0.0.1:18443"
policy = "cobrowse-sdk"
upstream = "cobrowse"
"""


@pytest.mark.parametrize(
    ("line", "where", "value"),
    [
        ('mode = "enforc"', "listeners.sdk.mode: ", '"enforc"'),
        ("keepalive_timout_s = 3", "listeners.sdk: ", '"keepalive_timout_s"'),
    ],
    ids=["bad-value", "unknown-key"],
)
def test_check_command_names_file_and_key(
    tmp_path: Path, line: str, where: str, value: str
) -> None:
    (tmp_path / "edge.toml").write_text(VALID_HEAD + line + "\n")
    completed = subprocess.run(
        [sys.executable, "-m", "fastproxy", "check", "-c", "edge.toml"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        check=False,
    )
    assert completed.returncode == 1, completed
    assert completed.stdout == ""
    assert completed.stderr.startswith("edge.toml: " + where), completed.stderr
    assert value in completed.stderr


def test_access_log_one_json_line_per_request_without_query_or_cookies(
    proxy: ProxyFactory, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    log_path = tmp_path / "access.log"
    running = proxy(args=["--access-log", str(log_path)])
    response = get(
        running.sdk_port, "/api/1/devices/x?token=s3cret", headers=[("Cookie", "session=s3cret")]
    )
    assert response.status == 200
    assert get(running.sdk_port, "/admin").status == 403
    wait_until(
        "two access records",
        lambda: log_path.exists() and len(log_path.read_text().splitlines()) >= 2,
        running,
    )
    text = log_path.read_text()
    assert "s3cret" not in text
    first, second = (json.loads(line) for line in text.splitlines()[:2])
    assert first["request_id"] == response.header("X-Request-Id").decode()  # type: ignore[union-attr]
    assert (first["path"], first["rule"], first["decision"], first["status"]) == (
        "/api/1/devices/x",
        "api-devices",
        "forward",
        200,
    )
    assert (second["path"], second["decision"], second["status"]) == ("/admin", "deny", 403)


def test_access_log_reopened_by_every_worker_on_sigusr1(
    proxy: ProxyFactory, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    """logrotate moves the file, then SIGUSR1: records after it go to a new file, none lost."""
    log_path = tmp_path / "access.log"
    running = proxy(overrides={"workers": 2}, args=["--access-log", str(log_path)])
    before = [get(running.sdk_port, f"/api/1/devices/before{i}") for i in range(6)]
    assert all(r.status == 200 for r in before)
    # records are buffered in each worker and written at least once a second
    wait_until(
        "six access records",
        lambda: log_path.exists() and len(log_path.read_text().splitlines()) >= 6,
        running,
    )
    rotated = tmp_path / "access.log.1"
    log_path.rename(rotated)
    os.kill(running.pid, signal.SIGUSR1)
    # the master forwards the signal; records a worker wrote before its own reopen belong to
    # the old file, so the new requests wait until both workers say they reopened
    wait_until(
        "both workers reopened",
        lambda: running.output().count("reopened 1 log files in worker") >= 2,
        running,
    )
    assert log_path.exists()
    after = [get(running.sdk_port, f"/api/1/devices/after{i}") for i in range(6)]
    assert all(r.status == 200 for r in after)
    wait_until(
        "six new access records",
        lambda: len(log_path.read_text().splitlines()) >= 6,
        running,
    )
    old = [json.loads(line)["path"] for line in rotated.read_text().splitlines()]
    new = [json.loads(line)["path"] for line in log_path.read_text().splitlines()]
    assert sorted(old) == sorted(f"/api/1/devices/before{i}" for i in range(6))
    assert sorted(new) == sorted(f"/api/1/devices/after{i}" for i in range(6))
    running.stop()
