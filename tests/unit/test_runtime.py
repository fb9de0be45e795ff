"""The run-time snapshot: plans resolved once per generation, and what a reload changes."""

from __future__ import annotations

import ipaddress
import textwrap
import tomllib

from fastproxy.config import Address, Config, HttpParser, load_config, parse_config
from fastproxy.policy import Action
from fastproxy.runtime import FD_RESERVE, Snapshot, diff

BASE = """
[upstreams.app]
servers = ["127.0.0.1:8000"]

[listeners.sdk]
bind = "127.0.0.1:8080"
policy = "cobrowse-sdk"
"""


def _config(text: str) -> Config:
    return parse_config(tomllib.loads(textwrap.dedent(text)), "fastproxy.toml")


def test_runtime_snapshot_resolves_every_listener_once() -> None:
    config = load_config(None)
    snapshot = Snapshot.build(config, 1)
    assert snapshot.generation == 1
    assert set(snapshot.listeners) == {"sdk", "agent"}
    sdk = snapshot.listeners["sdk"]
    assert sdk.table.decide(b"/api/1/devices").rule.action is Action.FORWARD
    assert sdk.table.decide(b"/admin").rule.action is Action.DENY
    assert (sdk.scheme, sdk.default_port, sdk.report, sdk.validate_frames) == (
        b"http",
        b"80",
        False,
        True,
    )
    assert sdk.refused_methods == frozenset({b"TRACE", b"CONNECT"})
    assert snapshot.listeners["agent"].table.decide(b"/x").target == b"/index.html"
    assert snapshot.http_parser is HttpParser.HTTPTOOLS  # "auto" with the httptools extra


def test_runtime_plan_carries_listener_settings() -> None:
    config = _config(
        BASE
        + """
        mode = "report"
        websocket_mode = "tunnel"
        trusted_proxies = ["10.0.0.0/8"]
        keep_headers = ["X-Forwarded-Prefix"]
        """
    )
    plan = Snapshot.build(config, 7).listeners["sdk"]
    assert plan.report and not plan.validate_frames
    assert plan.keep_headers == frozenset({b"x-forwarded-prefix"})
    assert plan.config.trusted_proxies == (ipaddress.ip_network("10.0.0.0/8"),)
    assert plan.upstream == "app"


def test_runtime_diff_of_equal_configs_is_empty() -> None:
    old = Snapshot.build(_config(BASE), 1)
    new = Snapshot.build(_config(BASE), 2)
    changes = diff(old, new)
    assert not changes.listeners_changed
    assert (changes.retire, changes.workers, changes.admin) == ((), False, False)


def test_runtime_diff_names_listeners_to_bind_and_close() -> None:
    old = Snapshot.build(_config(BASE), 1)
    moved = BASE.replace("127.0.0.1:8080", "127.0.0.1:8090")
    added = moved + '\n[listeners.agent]\nbind = "127.0.0.1:8081"\npolicy = "cobrowse-agent"\n'
    changes = diff(old, Snapshot.build(_config(added), 2))
    assert changes.bind == ("agent", "sdk")  # new, and moved
    assert changes.close == ("sdk",)  # moved: the old socket closes
    assert Snapshot.build(_config(added), 2).binds()["sdk"] == Address("127.0.0.1", 8090)


def test_runtime_diff_retires_changed_and_removed_upstreams() -> None:
    text = BASE + '\n[upstreams.other]\nservers = ["127.0.0.1:9000"]\n'
    text = text.replace('policy = "cobrowse-sdk"', 'policy = "cobrowse-sdk"\nupstream = "app"')
    old = Snapshot.build(_config(text), 1)
    changed = text.replace('["127.0.0.1:8000"]', '["127.0.0.1:8000", "127.0.0.1:8001"]')
    changed = changed.replace('[upstreams.other]\nservers = ["127.0.0.1:9000"]\n', "")
    changes = diff(old, Snapshot.build(_config(changed), 2))
    assert changes.retire == ("app", "other")


def test_runtime_diff_sees_workers_and_admin() -> None:
    old = Snapshot.build(_config("workers = 2\n" + BASE), 1)
    new = Snapshot.build(_config("workers = 3\nadmin = false\n" + BASE), 2)
    changes = diff(old, new)
    assert changes.workers and changes.admin


def test_runtime_routes_are_the_compiled_tables_as_data() -> None:
    routes = Snapshot.build(load_config(None), 4).routes()
    assert routes["generation"] == 4
    listeners = routes["listeners"]
    assert isinstance(listeners, dict)
    agent = listeners["agent"]
    assert agent["fallback"] == {
        "name": "fallback",
        "prefix": "",
        "action": "rewrite",
        "rewrite_to": "/index.html",
        "upstream": None,
        "max_body_bytes": 64 * 1024 * 1024,
        "allow": [],
        "https_port": None,
    }
    prefixes = {rule["prefix"]: rule["action"] for rule in agent["rules"]}
    assert prefixes["/sockets/1/"] == "websocket"
    assert prefixes["/api/1/"] == "forward"


def test_runtime_routes_show_the_port_of_an_https_redirect() -> None:
    text = BASE.replace('policy = "cobrowse-sdk"', 'policy = "https-redirect"', 1)
    assert text != BASE
    routes = Snapshot.build(_config(text), 1).routes()
    listeners = routes["listeners"]
    assert isinstance(listeners, dict)
    [redirecting] = [
        plan for plan in listeners.values() if plan["fallback"]["action"] == "redirect_https"
    ]
    assert redirecting["fallback"]["https_port"] == 443


def test_runtime_client_capacity_counts_two_descriptors_per_client() -> None:
    snapshot = Snapshot.build(_config(BASE), 1)
    # 32 idle keep-alives of the one server and FD_RESERVE come off first
    assert snapshot.client_capacity(FD_RESERVE + 32 + 200) == 100
    assert snapshot.client_capacity(FD_RESERVE + 32 + 201) == 100
    assert snapshot.client_capacity(10) == 0
    assert snapshot.max_clients() == 10_000
