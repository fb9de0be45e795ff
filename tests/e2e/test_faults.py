"""Faults end to end: nothing hangs, nothing is silent.

A ``FaultProxy`` between fastproxy and the recording upstream cuts, stalls or resets the
upstream connection at every phase of a response and of a WebSocket handshake and tunnel. For
each, the client gets an answer (502 ``upstream_failed``, 504 ``upstream_timeout``) or, once the
response had begun, a close, within a bounded time; the worker's open connections
(``fastproxy_active_connections``) come back to zero; the failure is counted in
``fastproxy_upstream_errors_total`` and logged as a JSON WARNING; no line of stderr is a plain
traceback. Then the descriptors: a proxy started under ``prlimit`` with few open files sheds
the connections it cannot hold with 503 ``overloaded`` and keeps serving.

Timeouts are short in these configurations (first byte and read 1 s, WebSocket idle 2 s) so
that stalls end quickly; bounds are generous, as the machine may be busy.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import running_upstream
from support.client import HttpConnection, build_request, get, host_of
from support.faultproxy import Action, Fault, FaultProxy, Phase
from support.proxy import ProxyFactory, RunningProxy
from support.upstream import RecordingUpstream

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

#: how long a client may wait for its answer or close (the timeouts are 1-2 s; the WebSocket
#: close handshake may wait 10 s more)
END_WITHIN_S = 25.0
WAIT_S = 20.0
BODY_BYTES = 200_000
UPSTREAM = "cobrowse"

FAULT_CONFIG = {
    # health = false: the one server is never marked down (the faults are the proxy's, one
    # request at a time), so every case reaches it and shows its own outcome
    "upstreams": {
        UPSTREAM: {
            "keepalive": 0,
            "first_byte_timeout_s": 1.0,
            "read_timeout_s": 1.0,
            "health": False,
        }
    },
    "listeners": {
        "sdk": {"limits": {"ws_idle_timeout_s": 2.0, "ws_ping_interval_s": 1.0}},
    },
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FaultProxy, RunningProxy]]:
    with running_upstream() as upstream:
        faults = FaultProxy(upstream.address)
        faults.start()
        factory = ProxyFactory(tmp_path_factory.mktemp("faults"), [faults.address])
        try:
            yield faults, factory(overrides=FAULT_CONFIG)
        finally:
            factory.stop_all()
            faults.stop()
        assert not faults.errors, faults.errors


# -- helpers ------------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def sample(proxy: RunningProxy, name: str, **labels: str) -> float:
    """One series of ``/metrics`` (0 when absent)."""
    response = get(proxy.admin_port, "/metrics")
    assert response.status == 200, response
    wanted = frozenset(labels.items())
    for line in response.body.decode().splitlines():
        match = _SAMPLE.match(line)
        if match and match[1] == name and frozenset(_LABEL.findall(match[2] or "")) == wanted:
            return float(match[3])
    return 0.0


def wait_until(what: str, predicate: Callable[[], bool], proxy: RunningProxy) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{proxy.output()}")
        time.sleep(0.05)


def read_until_end(sock: socket.socket, timeout: float = END_WITHIN_S) -> tuple[bytes, bool]:
    """Everything the proxy sends until it closes or resets; (bytes, ended in time)."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return data, False
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data, False
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk


def error_of(data: bytes) -> tuple[int, str]:
    """Status and JSON ``error`` of one of fastproxy's own answers."""
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"]


def assert_json_stderr(proxy: RunningProxy) -> None:
    """Every line fastproxy wrote to stderr is a JSON object: no plain-text traceback."""
    for line in proxy.stderr_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"a line of stderr is not JSON: {line!r}\n{proxy.output()}")
        assert isinstance(record, dict), line


def settle(proxy: RunningProxy) -> None:
    """The worker has no client connection open (the test's own are closed)."""
    wait_until(
        "no open connection in the worker",
        lambda: sample(proxy, "fastproxy_active_connections", listener="sdk") == 0,
        proxy,
    )


@contextlib.contextmanager
def fault(faults: FaultProxy, action: Action, phase: Phase) -> Iterator[None]:
    faults.fault = Fault(action, phase)
    before = faults.faulted
    try:
        yield
    finally:
        faults.fault = None
    assert faults.faulted > before, "the fault was never reached"


def errors_total(proxy: RunningProxy) -> float:
    return sum(
        sample(proxy, "fastproxy_upstream_errors_total", upstream=UPSTREAM, kind=kind)
        for kind in ("upstream_failed", "upstream_timeout", "upstream_truncated")
    )


# -- HTTP ---------------------------------------------------------------------------------------

#: a phase before anything of the response reached the client: fastproxy answers itself
BEFORE_RESPONSE = (Phase.BEFORE_HEAD, Phase.MID_HEAD)
#: a phase after the head went out: the client sees the response end early
AFTER_RESPONSE = (Phase.AFTER_HEAD, Phase.MID_BODY, Phase.MID_CHUNKED)


@pytest.mark.parametrize("action", list(Action), ids=lambda a: a.value)
@pytest.mark.parametrize("phase", [*BEFORE_RESPONSE, *AFTER_RESPONSE], ids=lambda p: p.value)
def test_fault_http_ends_with_an_answer_or_a_close(
    stack: tuple[FaultProxy, RunningProxy], action: Action, phase: Phase
) -> None:
    faults, proxy = stack
    query = f"chunked={BODY_BYTES}" if phase is Phase.MID_CHUNKED else f"size={BODY_BYTES}"
    target = f"/api/1/devices/fault?{query}"
    errors_before = errors_total(proxy)
    with (
        fault(faults, action, phase),
        socket.create_connection(("127.0.0.1", proxy.sdk_port), timeout=5.0) as client,
    ):
        client.sendall(build_request(target, host=host_of(proxy.sdk_port)))
        data, ended = read_until_end(client)
    assert ended, f"no answer or close within {END_WITHIN_S} s, got {data[:300]!r}"
    if phase in BEFORE_RESPONSE:
        expected = (504, "upstream_timeout") if action is Action.STALL else (502, "upstream_failed")
        assert error_of(data) == expected, data[:500]
    else:
        # the upstream's head went out, then the response ended early: never a whole body
        assert data.startswith(b"HTTP/1.1 200 "), data[:300]
        body = data.partition(b"\r\n\r\n")[2]
        assert len(body) < BODY_BYTES, len(body)
    wait_until("the failure counted", lambda: errors_total(proxy) > errors_before, proxy)
    settle(proxy)
    proxy.wait_for_message(f"upstream {UPSTREAM}: ")
    assert_json_stderr(proxy)


def test_fault_truncated_response_counted_as_upstream_error_not_2xx(
    stack: tuple[FaultProxy, RunningProxy],
) -> None:
    faults, proxy = stack
    labels = {"upstream": UPSTREAM, "kind": "upstream_truncated"}
    truncated = sample(proxy, "fastproxy_upstream_errors_total", **labels)
    forward = {"listener": "sdk", "rule": "api-devices", "decision": "forward"}
    ok = sample(proxy, "fastproxy_requests_total", **forward, status_class="2xx")
    with (
        fault(faults, Action.CUT, Phase.MID_BODY),
        socket.create_connection(("127.0.0.1", proxy.sdk_port), timeout=5.0) as client,
    ):
        client.sendall(build_request(f"/api/1/devices/t?size={BODY_BYTES}", host="a"))
        _, ended = read_until_end(client)
    assert ended
    wait_until(
        "the truncation counted",
        lambda: sample(proxy, "fastproxy_upstream_errors_total", **labels) == truncated + 1,
        proxy,
    )
    error = {"listener": "sdk", "rule": "api-devices", "decision": "error"}
    assert sample(proxy, "fastproxy_requests_total", **error, status_class="5xx") >= 1
    assert sample(proxy, "fastproxy_requests_total", **forward, status_class="2xx") == ok


def test_fault_upstream_down_answers_502_and_logs_a_warning(
    factory: ProxyFactory, upstream: RecordingUpstream
) -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{closed.getsockname()[1]}"
    closed.close()  # nothing listens there now: every connect is refused
    # health = false: the one server is never marked down, so every request tries it (with
    # checks on, the second one would be a 503 no_healthy_upstream)
    proxy = factory(servers=[address], overrides={"upstreams": {UPSTREAM: {"health": False}}})
    for _ in range(5):
        response = get(proxy.sdk_port, "/api/1/devices/down")
        assert response.status == 502 and response.error == "upstream_failed", response
    proxy.wait_for_message(f"upstream {UPSTREAM}: connect failed")
    warnings = [
        json.loads(line)
        for line in proxy.stderr_path.read_text().splitlines()
        if "connect failed" in line and '"fastproxy.worker"' in line
    ]
    # rate-limited: one line for the five failures, with the upstream named
    assert len(warnings) == 1, warnings
    assert warnings[0]["level"] == "WARNING" and warnings[0]["upstream"] == UPSTREAM
    assert (
        sample(proxy, "fastproxy_upstream_errors_total", upstream=UPSTREAM, kind="upstream_failed")
        == 5
    )
    assert_json_stderr(proxy)


# -- WebSocket ----------------------------------------------------------------------------------

WS_KEY = base64.b64encode(os.urandom(16)).decode()


def ws_handshake(port: int) -> bytes:
    return build_request(
        "/sockets/1/fault",
        host=host_of(port),
        headers=[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", WS_KEY),
            ("Sec-WebSocket-Version", "13"),
        ],
    )


def masked_text(payload: bytes) -> bytes:
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + body


@pytest.mark.parametrize("action", list(Action), ids=lambda a: a.value)
@pytest.mark.parametrize(
    "phase", [Phase.BEFORE_101, Phase.AFTER_101, Phase.MID_FRAME], ids=lambda p: p.value
)
def test_fault_websocket_ends_with_an_answer_or_a_close(
    stack: tuple[FaultProxy, RunningProxy], action: Action, phase: Phase
) -> None:
    faults, proxy = stack
    with (
        fault(faults, action, phase),
        socket.create_connection(("127.0.0.1", proxy.sdk_port), timeout=5.0) as client,
    ):
        client.sendall(ws_handshake(proxy.sdk_port))
        if phase is Phase.MID_FRAME:
            client.sendall(masked_text(b"hello through the fault"))  # echoed: a frame back
        data, ended = read_until_end(client)
    assert ended, f"no answer or close within {END_WITHIN_S} s, got {data[:300]!r}"
    if phase is Phase.BEFORE_101:
        expected = (504, "upstream_timeout") if action is Action.STALL else (502, "upstream_failed")
        assert error_of(data) == expected, data[:500]
    else:
        assert data.startswith(b"HTTP/1.1 101 "), data[:300]
    settle(proxy)
    assert sample(proxy, "fastproxy_active_websockets", listener="sdk") == 0
    assert_json_stderr(proxy)


# -- limits at accept ---------------------------------------------------------------------------


def test_fault_over_max_connections_answered_503_and_closed(factory: ProxyFactory) -> None:
    proxy = factory(overrides={"listeners": {"sdk": {"limits": {"max_connections": 2}}}})
    port = proxy.sdk_port
    with HttpConnection(port) as one, HttpConnection(port) as two:
        assert one.get("/api/1/devices/1").status == 200
        assert two.get("/api/1/devices/2").status == 200
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as third:
            third.sendall(build_request("/api/1/devices/3", host=host_of(port)))
            data = b""
            while chunk := third.recv(65536):  # a reset would raise: the close is a FIN
                data += chunk
            assert error_of(data) == (503, "overloaded"), data
            assert b"\r\nConnection: close\r\n" in data, data
    proxy.wait_for_message("over max_connections, answered 503")
    assert (
        sample(proxy, "fastproxy_connections_shed_total", listener="sdk", reason="max_connections")
        == 1
    )
    settle(proxy)
    assert get(port, "/api/1/devices/after").status == 200
    assert_json_stderr(proxy)


def test_fault_agent_listener_has_no_per_client_cap_by_default(factory: ProxyFactory) -> None:
    proxy = factory(overrides={"listeners": {"sdk": {"limits": {"max_connections_per_client": 2}}}})
    held = [HttpConnection(proxy.agent_port) for _ in range(4)]
    try:
        assert all(conn.get("/api/1/x").status == 200 for conn in held)
        with HttpConnection(proxy.sdk_port) as a, HttpConnection(proxy.sdk_port) as b:
            assert a.get("/api/1/devices/a").status == 200
            assert b.get("/api/1/devices/b").status == 200
            with HttpConnection(proxy.sdk_port) as c:
                response = c.get("/api/1/devices/c")
                assert response.status == 503 and response.error == "overloaded"
    finally:
        for conn in held:
            conn.close()
    proxy.wait_for_message("over max_connections_per_client")


def test_fault_out_of_descriptors_sheds_with_503_and_keeps_serving(
    factory: ProxyFactory, tmp_path: Path
) -> None:
    # 160 open files: the worker can hold (160 - 64 reserved - 32 idle upstream) / 2 = 32 clients
    proxy = factory(prefix=["prlimit", "--nofile=160:160", "--"])
    proxy.wait_for_message("the open-files limit 160 lets a worker hold about 32 client")
    port = proxy.sdk_port
    held: list[socket.socket] = []
    outcomes: dict[str, int] = {"served": 0, "overloaded": 0, "closed": 0}
    try:
        for index in range(80):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10.0)
            held.append(sock)
            sock.sendall(build_request(f"/api/1/devices/fd{index}", host=host_of(port)))
            try:
                data = sock.recv(65536)
            except ConnectionResetError:  # the request reached a socket already closed
                data = b""
            if data.startswith(b"HTTP/1.1 200 "):
                outcomes["served"] += 1
            elif data.startswith(b"HTTP/1.1 503 "):
                assert b'"error":"overloaded"' in data, data
                outcomes["overloaded"] += 1
            else:
                assert data == b"", data[:300]
                outcomes["closed"] += 1
        assert outcomes["served"] >= 16, outcomes
        # about 48 are over the capacity; most read their 503 before the close
        assert outcomes["overloaded"] >= 24, outcomes
    finally:
        for sock in held:
            sock.close()
    proxy.wait_for_message("out of descriptors")
    settle(proxy)
    # the worker accepts again once the connections are gone
    assert get(port, "/api/1/devices/after").status == 200
    assert proxy.alive()
    assert_json_stderr(proxy)
