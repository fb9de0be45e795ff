"""SIGHUP reload (``systemctl reload``): the new configuration applied inside the live workers.

Counts, not timings: no connection or WebSocket is closed, no request fails, the worker PIDs
stay the same unless ``workers`` changes, and every route is in force after its reload. The
parser cannot matter here, so these run on the default one only.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
from conftest import running_upstream
from support.client import ConnectionClosedError, HttpConnection, WebSocketClient, get
from support.proxy import ProxyFactory, RunningProxy, free_port, merge
from support.upstream import RecordingUpstream

pytestmark = pytest.mark.e2e

EXTRA_RULE = {"rules": {"extra": {"prefix": "/extra", "action": "forward"}}}


def _start(factory: ProxyFactory, workers: int = 2) -> RunningProxy:
    return factory(
        overrides={
            "workers": workers,
            "policies": {"sdk-plus": {"extends": "cobrowse-sdk"}},
            "listeners": {"sdk": {"policy": "sdk-plus"}},
        }
    )


def _metric(proxy: RunningProxy, line_start: str) -> float:
    text = get(proxy.admin_port, "/metrics").body.decode()
    values = [line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(line_start)]
    assert len(values) == 1, (line_start, text)
    return float(values[0])


def test_reload_applies_routes_without_closing_anything(factory: ProxyFactory) -> None:
    proxy = _start(factory)
    pids = sorted(proxy.worker_pids())
    assert len(pids) == 2
    with (
        HttpConnection(proxy.sdk_port) as kept,
        WebSocketClient(proxy.sdk_port, "/sockets/1/x") as ws,
    ):
        assert kept.get("/api/1/devices").status == 200
        assert kept.get("/extra").status == 403
        ws.send_text("before")
        assert ws.recv() == "before"

        proxy.reload(merge(proxy.document, {"policies": {"sdk-plus": EXTRA_RULE}}))
        proxy.wait_for_message("generation 2 applied by every worker")

        # the same keep-alive connection: its next request follows the new routes
        assert kept.get("/extra").status == 200
        routes = get(proxy.admin_port, "/routes").json()
        assert routes["generation"] == 2
        rules = {rule["name"]: rule for rule in routes["listeners"]["sdk"]["rules"]}
        assert rules["extra"] == {
            "name": "extra",
            "prefix": "/extra",
            "action": "forward",
            "rewrite_to": None,
            "upstream": None,
            "max_body_bytes": 64 * 1024 * 1024,
            "allow": [],
            "https_port": None,
        }
        assert get(proxy.sdk_port, "/extra").status == 200
        ws.send_text("after")
        assert ws.recv() == "after"

        # and back: the route is gone again
        document = merge(proxy.document, {})
        policies = document["policies"]
        assert isinstance(policies, dict)
        policies["sdk-plus"] = {"extends": "cobrowse-sdk"}
        proxy.reload(document)
        proxy.wait_for_message("generation 3 applied by every worker")
        assert kept.get("/extra").status == 403
        ws.send_text("still")
        assert ws.recv() == "still"
    assert sorted(proxy.worker_pids()) == pids
    assert _metric(proxy, 'fastproxy_reloads_total{result="ok"}') >= 2
    assert _metric(proxy, "fastproxy_config_last_reload_successful") == 1


def test_reload_of_an_invalid_file_changes_nothing(factory: ProxyFactory) -> None:
    proxy = _start(factory)
    good = merge(proxy.document, {})
    with HttpConnection(proxy.sdk_port) as kept:
        assert kept.get("/api/1/devices").status == 200
        proxy.reload(text=proxy.config_text.replace('policy = "sdk-plus"', 'policy = "nope"'))
        proxy.wait_for_message("reload failed, still serving generation 1")
        [message] = [m for m in proxy.messages() if "reload failed" in m]
        # the message fastproxy check prints: the file, the key and the value
        assert f'{proxy.config_path}: listeners.sdk.policy: unknown policy, got "nope"' in message
        assert kept.get("/api/1/devices").status == 200
        assert _metric(proxy, 'fastproxy_reloads_total{result="failed"}') == 1
        assert _metric(proxy, "fastproxy_config_last_reload_successful") == 0

        proxy.reload(text="this is = = not TOML")
        proxy.wait_for_message("reload failed, still serving generation 1", count=2)
        assert kept.get("/api/1/devices").status == 200

        proxy.reload(merge(good, {"policies": {"sdk-plus": EXTRA_RULE}}))
        proxy.wait_for_message("generation 2 applied by every worker")
        assert kept.get("/extra").status == 200
    assert _metric(proxy, "fastproxy_config_last_reload_successful") == 1


def test_reload_lets_a_request_in_flight_finish(factory: ProxyFactory) -> None:
    proxy = _start(factory)
    results: list[int] = []

    def slow() -> None:
        results.append(get(proxy.sdk_port, "/api/1/devices?delay=1.0").status)

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.3)  # the request is at the upstream
    proxy.reload(merge(proxy.document, {"policies": {"sdk-plus": EXTRA_RULE}}))
    proxy.wait_for_message("generation 2 applied by every worker")
    thread.join(timeout=30)
    assert results == [200]


def test_reload_adds_and_removes_a_listener(factory: ProxyFactory) -> None:
    proxy = _start(factory, workers=1)
    port = free_port()
    added = merge(
        proxy.document,
        {"listeners": {"more": {"bind": f"127.0.0.1:{port}", "policy": "cobrowse-agent"}}},
    )
    proxy.reload(added)
    proxy.wait_for_message("generation 2 applied by every worker")
    response = get(port, "/some/page?q=1")
    assert response.status == 200
    with HttpConnection(proxy.sdk_port) as kept:
        assert kept.get("/api/1/devices").status == 200
        removed = merge(proxy.document, {})
        listeners = removed["listeners"]
        assert isinstance(listeners, dict)
        del listeners["more"]
        proxy.reload(removed)
        proxy.wait_for_message("generation 3 applied by every worker")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        assert kept.get("/api/1/devices").status == 200  # other listeners are untouched


def test_reload_changes_the_number_of_workers(factory: ProxyFactory) -> None:
    proxy = _start(factory, workers=1)
    [first] = proxy.worker_pids()
    proxy.reload(merge(proxy.document, {"workers": 3}))
    proxy.wait_for_message("generation 2 applied by every worker")
    proxy.wait_for_message("all 3 workers ready")
    assert len(proxy.worker_pids()) == 3
    assert first in proxy.worker_pids()
    proxy.reload(merge(proxy.document, {"workers": 1}))
    proxy.wait_for_message("generation 3 applied by every worker")
    deadline = time.monotonic() + 30
    while len(proxy.worker_pids()) != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(proxy.worker_pids()) == 1
    assert get(proxy.sdk_port, "/api/1/devices").status == 200
    assert not any("respawning" in m for m in proxy.messages())


def test_reload_under_load_drops_nothing(
    factory: ProxyFactory, upstream: RecordingUpstream
) -> None:
    """20 reloads alternating two configurations (a route, a limit, an upstream server), one
    invalid file among them, under keep-alive load and with 200 WebSockets open."""
    with running_upstream() as second:
        proxy = _start(factory)
        pids = sorted(proxy.worker_pids())
        with_route = merge(
            proxy.document,
            {
                "policies": {"sdk-plus": EXTRA_RULE},
                "listeners": {"sdk": {"limits": {"max_headers": 50}}},
            },
        )
        without_route = merge(
            proxy.document,
            {"upstreams": {"cobrowse": {"servers": [upstream.address, second.address]}}},
        )
        failures: list[str] = []
        answered = [0]
        stop = threading.Event()

        def load() -> None:
            with HttpConnection(proxy.sdk_port, timeout=30) as conn:
                while not stop.is_set():
                    try:
                        status = conn.get("/api/1/devices").status
                    except (OSError, ConnectionClosedError) as err:
                        failures.append(repr(err))
                        return
                    if status != 200:
                        failures.append(str(status))
                    answered[0] += 1

        sockets = [WebSocketClient(proxy.sdk_port, f"/sockets/1/{i}") for i in range(200)]
        threads = [threading.Thread(target=load) for _ in range(3)]
        for thread in threads:
            thread.start()
        try:
            generation = 1
            for round_ in range(21):
                if round_ == 10:
                    proxy.reload(
                        text=proxy.config_text.replace("[listeners.sdk]", "[listeners.sdk")
                    )
                    proxy.wait_for_message("reload failed, still serving", count=1)
                else:
                    routed = generation % 2 == 1
                    proxy.reload(with_route if routed else without_route)
                    generation += 1
                    proxy.wait_for_message(f"generation {generation} applied by every worker")
                    assert get(proxy.sdk_port, "/extra").status == (200 if routed else 403)
                for index, ws in enumerate(sockets):
                    ws.send_text(f"{round_}-{index}")
                for index, ws in enumerate(sockets):
                    assert ws.recv() == f"{round_}-{index}"
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
            for ws in sockets:
                ws.close()
        assert generation == 21
        assert failures == []
        assert answered[0] > 0
        assert sorted(proxy.worker_pids()) == pids
        assert second.requests(), "the added server took requests"


def test_reload_signals_in_a_row_end_on_the_newest_file(factory: ProxyFactory) -> None:
    """A SIGHUP that arrives while the workers still apply the previous one is applied after
    it, from the file as it is then: the last file written wins, however the signals fall (two
    signals close together may also arrive as one)."""
    proxy = _start(factory)
    first = merge(proxy.document, {"policies": {"sdk-plus": EXTRA_RULE}})
    last = merge(first, {"policies": {"sdk-plus": {"rules": {"extra": {"action": "deny"}}}}})
    proxy.reload(first)
    proxy.reload(last)
    deadline = time.monotonic() + 30
    while True:
        routes = get(proxy.admin_port, "/routes").json()
        rules = {rule["name"]: rule["action"] for rule in routes["listeners"]["sdk"]["rules"]}
        if rules.get("extra") == "deny":
            break
        assert time.monotonic() < deadline, routes
        time.sleep(0.05)
    proxy.wait_for_message(f"generation {routes['generation']} applied by every worker")
    assert routes["generation"] in (2, 3)
    assert get(proxy.sdk_port, "/extra").status == 403  # the rule of the last file
    assert not any("reload failed" in m for m in proxy.messages())
