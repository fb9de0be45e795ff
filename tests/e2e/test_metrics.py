"""The metric set end to end (SPEC 9): every family of the documented table after mixed traffic
on a real proxy, the scrape checked by ``promtool check metrics``, and counters that survive a
worker killed outright and a reload.

Each worker publishes its per-request counts about every second (``metrics.WorkerMetrics``), so
every count is awaited by polling the scrape with a generous deadline.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support.certs import Authority
from support.client import HttpConnection, WebSocketClient, get
from support.proxy import ProxyFactory, RunningProxy, free_port
from support.upstream import RecordingUpstream

import fastproxy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

WAIT_S = 20.0
POLL_S = 0.1

#: the table of README "Metrics": name -> (type, labels)
FAMILIES: dict[str, tuple[str, frozenset[str]]] = {
    "fastproxy_requests_total": (
        "counter",
        frozenset({"listener", "rule", "decision", "status_class"}),
    ),
    "fastproxy_request_duration_seconds": ("histogram", frozenset({"listener", "rule"})),
    "fastproxy_upstream_response_seconds": ("histogram", frozenset({"upstream"})),
    "fastproxy_received_bytes_total": ("counter", frozenset({"listener"})),
    "fastproxy_sent_bytes_total": ("counter", frozenset({"listener"})),
    "fastproxy_active_connections": ("gauge", frozenset({"listener"})),
    "fastproxy_active_websockets": ("gauge", frozenset({"listener"})),
    "fastproxy_websocket_duration_seconds": ("histogram", frozenset({"listener"})),
    "fastproxy_websocket_closes_total": ("counter", frozenset({"listener", "code"})),
    "fastproxy_upstream_up": ("gauge", frozenset({"upstream", "server"})),
    "fastproxy_upstream_errors_total": ("counter", frozenset({"upstream", "kind"})),
    "fastproxy_reloads_total": ("counter", frozenset({"result"})),
    "fastproxy_config_last_reload_successful": ("gauge", frozenset()),
    "fastproxy_worker_restarts_total": ("counter", frozenset({"reason"})),
    "fastproxy_tls_certificate_not_after_seconds": ("gauge", frozenset({"listener", "cert"})),
    "fastproxy_build_info": ("gauge", frozenset({"version", "python", "parser", "build"})),
}

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')
_TYPE = re.compile(r"^# TYPE (\S+) (\S+)$")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape_text(proxy: RunningProxy) -> str:
    response = get(proxy.admin_port, "/metrics")
    assert response.status == 200, response
    return response.body.decode()


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """Every sample keyed by name and label set, and the declared type of each family."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        declared = _TYPE.match(line)
        if declared:
            types[declared.group(1)] = declared.group(2)
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match is not None, line
        name, labels, value = match.groups()
        samples[name, frozenset(_LABEL.findall(labels or ""))] = float(value)
    return samples, types


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name`` over the series that carry ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def wait_for(
    proxy: RunningProxy, what: str, predicate: Callable[[Samples], bool], timeout: float = WAIT_S
) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        samples, _ = parse(scrape_text(proxy))
        if predicate(samples):
            return samples
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{scrape_text(proxy)}\n{proxy.output()}")
        time.sleep(POLL_S)


def test_every_family_after_mixed_traffic_and_promtool_clean(
    factory: ProxyFactory, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    ca = Authority(tmp_path / "certs")
    pair = ca.issue("secure.example")
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: the agent listener answers 502
    running = factory(
        overrides={
            "upstreams": {"dead": {"servers": [dead]}},
            "listeners": {
                "agent": {"upstream": "dead"},
                "secure": {"policy": "cobrowse-sdk", "upstream": "cobrowse", "tls": pair.table()},
            },
        }
    )
    assert get(running.sdk_port, "/api/1/devices/x").status == 200
    assert get(running.sdk_port, "/admin/x").status == 403
    assert get(running.agent_port, "/api/1/devices/x").status in (502, 503)
    with HttpConnection(
        running.port("secure"), tls=ca.client_context(), server_name="secure.example"
    ) as conn:
        assert conn.get("/api/1/devices/t").status == 200
    with WebSocketClient(running.sdk_port, "/sockets/1/m") as ws:
        ws.send_text("hello")
        assert ws.recv() == "hello"
        assert ws.close(1000) == 1000

    def all_counted(samples: Samples) -> bool:
        return (
            total(samples, "fastproxy_requests_total", decision="forward") >= 2
            and total(samples, "fastproxy_requests_total", decision="websocket") >= 1
            and total(samples, "fastproxy_requests_total", decision="deny") >= 1
            and total(samples, "fastproxy_websocket_duration_seconds_count") >= 1
            and total(samples, "fastproxy_upstream_response_seconds_count") >= 2
        )

    samples = wait_for(running, "the traffic counted", all_counted)
    text = scrape_text(running)
    samples, types = parse(text)
    for name, (kind, labels) in FAMILIES.items():
        assert types.get(name) == kind, (name, types.get(name))
        suffix = "_bucket" if kind == "histogram" else ""
        series = [ls for (n, ls) in samples if n == name + suffix]
        assert series, f"{name}: no sample\n{text}"
        for label_set in series:
            assert {k for k, _ in label_set} - {"le"} == labels, (name, label_set)

    secure = {"listener": "secure"}
    assert total(samples, "fastproxy_requests_total", **secure, status_class="2xx") == 1
    assert total(samples, "fastproxy_received_bytes_total", **secure) > 0
    assert total(samples, "fastproxy_sent_bytes_total", **secure) > 0
    assert total(samples, "fastproxy_request_duration_seconds_count", **secure) == 1
    assert total(samples, "fastproxy_requests_total", listener="agent", status_class="5xx") == 1
    assert total(samples, "fastproxy_upstream_errors_total", upstream="dead") >= 1
    assert total(samples, "fastproxy_websocket_closes_total", listener="sdk", code="1000") == 1
    assert total(samples, "fastproxy_active_websockets", listener="sdk") == 0
    [(cert, not_after)] = [
        (dict(ls)["cert"], v)
        for (n, ls), v in samples.items()
        if n == "fastproxy_tls_certificate_not_after_seconds"
    ]
    assert cert == os.path.basename(pair.cert)
    assert not_after > time.time()
    [build] = [dict(ls) for (n, ls) in samples if n == "fastproxy_build_info"]
    assert build["parser"] == "h11"
    assert build["build"] == fastproxy.BUILD.kind  # the proxy inherits the suite's build
    assert build["python"].count(".") == 2
    # no raw path in any label value
    assert not any("/api/" in v or "/admin" in v for (_, ls) in samples for _, v in ls)

    check = subprocess.run(
        ["promtool", "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == "" and check.stderr.strip() == "", check.stdout + check.stderr


def test_counters_survive_a_killed_worker_and_a_reload(factory: ProxyFactory) -> None:
    running = factory(overrides={"workers": 2})
    wait_until_two = time.monotonic() + WAIT_S
    while len(running.worker_pids()) != 2:
        assert time.monotonic() < wait_until_two, running.output()
        time.sleep(POLL_S)
    forward = {"listener": "sdk", "rule": "api-devices", "decision": "forward"}

    def forwarded(samples: Samples) -> float:
        return total(samples, "fastproxy_requests_total", **forward)

    def send(count: int) -> None:
        for index in range(count):  # a connection each: both workers serve some
            assert get(running.sdk_port, f"/api/1/devices/k{index}").status == 200

    send(6)
    wait_for(running, "6 requests counted", lambda s: forwarded(s) == 6)
    victim = running.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    samples = wait_for(
        running,
        "the killed worker respawned",
        lambda s: (
            total(s, "fastproxy_worker_restarts_total", reason="crash") == 1
            and len(set(running.worker_pids()) - {victim}) == 2
        ),
    )
    assert forwarded(samples) == 6  # neither reset nor doubled
    time.sleep(1.5)  # the new worker publishes: still 6
    assert forwarded(parse(scrape_text(running))[0]) == 6
    send(4)
    wait_for(running, "10 requests counted", lambda s: forwarded(s) == 10)

    running.reload(running.document)
    samples = wait_for(
        running,
        "the reload counted",
        lambda s: total(s, "fastproxy_reloads_total", result="ok") == 1,
    )
    assert forwarded(samples) == 10
    assert total(samples, "fastproxy_config_last_reload_successful") == 1
    send(2)
    samples = wait_for(running, "12 requests counted", lambda s: forwarded(s) == 12)
    assert total(samples, "fastproxy_worker_restarts_total") == 1
    time.sleep(1.5)
    assert forwarded(parse(scrape_text(running))[0]) == 12


def test_a_worker_killed_for_its_heartbeat_counts_as_heartbeat(factory: ProxyFactory) -> None:
    running = factory(overrides={"heartbeat_timeout_s": 2.0})
    [victim] = running.worker_pids()
    os.kill(victim, signal.SIGSTOP)  # no heartbeat: the master's SIGABRT waits, then SIGKILL
    # a scrape meanwhile would wait for the stopped worker: none until it is replaced
    deadline = time.monotonic() + 40.0
    while victim in running.worker_pids() or not running.worker_pids():
        assert time.monotonic() < deadline, running.output()
        time.sleep(POLL_S)
    samples = wait_for(
        running,
        "the stopped worker replaced",
        lambda s: total(s, "fastproxy_worker_restarts_total", reason="heartbeat") == 1,
    )
    assert total(samples, "fastproxy_worker_restarts_total", reason="crash") == 0
