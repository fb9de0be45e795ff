"""config: the file shape of SPEC 3, the Cobrowse preset of SPEC 2, every error message verbatim,
and ``dump_config`` round trips."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from support.spec import SPEC_EXAMPLE

from fastproxy.config import (
    BUILT_IN_SOURCE,
    AccessLogConfig,
    Address,
    Balance,
    CertKey,
    Config,
    HealthCheck,
    HttpParser,
    Limits,
    ListenerConfig,
    Mode,
    PresetToggles,
    QueryMode,
    TlsConfig,
    UpstreamTls,
    WebSocketMode,
    auto_parser,
    dump_config,
    load_config,
    parse_config,
    preset_version,
)
from fastproxy.errors import ConfigError
from fastproxy.policy import Action, PrefixTable, Refusal, Rule

MIB = 1024 * 1024

# SPEC 3, verbatim.
SPEC_TLS_LINE = 'tls = { cert = "/etc/fastproxy/tls.crt", key = "/etc/fastproxy/tls.key" }\n'
SPEC_EXAMPLE_WITHOUT_TLS = SPEC_EXAMPLE.replace(SPEC_TLS_LINE, "")

# The smallest valid file; error cases add to it.
BASE = """\
[upstreams.cobrowse]
servers = ["10.0.0.5:8080"]

[listeners.sdk]
bind = "0.0.0.0:8443"
policy = "cobrowse-sdk"
"""

SDK_RULES = [
    ("api-devices", b"/api/1/devices", Action.FORWARD),
    ("api-sessions", b"/api/1/sessions", Action.FORWARD),
    ("sockets", b"/sockets/1/", Action.WEBSOCKET),
]
AGENT_RULES = [
    ("api", b"/api/1/", Action.FORWARD),
    ("proxy", b"/proxy/1/", Action.FORWARD),
    ("recording", b"/recording/1/", Action.FORWARD),
    ("sockets", b"/sockets/1/", Action.WEBSOCKET),
    ("index", b"/index.html", Action.FORWARD),
    ("favicon", b"/favicon.png", Action.FORWARD),
    ("apps", b"/apps/", Action.FORWARD),
    ("static", b"/static/", Action.FORWARD),
]


def parse(text: str, source: str = "fastproxy.toml") -> Config:
    return parse_config(tomllib.loads(textwrap.dedent(text)), source)


def summary(listener: ListenerConfig) -> list[tuple[str, bytes, Action]]:
    return [(rule.name, rule.prefix, rule.action) for rule in listener.rules]


def write(tmp_path: Path, text: str, name: str = "fastproxy.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# -- the SPEC 3 example -------------------------------------------------------------------------


def test_config_spec_example_loads_with_tls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the files are read by tls.build (tests/unit/test_tls.py), not by the configuration
    monkeypatch.chdir(tmp_path)
    write(tmp_path, SPEC_EXAMPLE)
    config = load_config("fastproxy.toml")
    sdk = config.listeners["sdk"]
    assert sdk.tls == TlsConfig("/etc/fastproxy/tls.crt", "/etc/fastproxy/tls.key")
    assert (sdk.tls.min_version, sdk.tls.handshake_timeout_s, sdk.tls.certificates) == (
        "1.2",
        10.0,
        (),
    )
    assert config.listeners["agent"].tls is None
    # a toggle's per-listener rules go to listeners without TLS only; pin_sdk is a policy's
    assert summary(sdk) == [*SDK_RULES, ("sdk-js", b"/sdk-js/", Action.FORWARD)]


def test_config_tls_full_shape_and_dump_round_trip() -> None:
    config = parse(
        BASE.replace(
            'servers = ["10.0.0.5:8080"]',
            'servers = ["10.0.0.5:8080"]\n'
            'tls = { ca = "/ca.pem", server_name = "Backend.Example", cert = "/c", key = "/k" }',
        ).replace('policy = "cobrowse-sdk"', 'policy = "cobrowse-sdk"\nupstream = "cobrowse"')
        + """
        [listeners.sdk.tls]
        cert = "/a.crt"
        key = "/a.key"
        min_version = "1.3"
        handshake_timeout_s = 3
        certificates = [{ cert = "/b.crt", key = "/b.key" }]

        [upstreams.plain]
        servers = ["10.0.0.7:80"]
        tls = false

        [upstreams.simple]
        servers = ["10.0.0.8:443"]
        tls = true
        """
    )
    tls = config.listeners["sdk"].tls
    assert tls == TlsConfig("/a.crt", "/a.key", (CertKey("/b.crt", "/b.key"),), "1.3", 3.0)
    assert config.upstreams["cobrowse"].tls == UpstreamTls(
        ca="/ca.pem", verify=True, server_name="backend.example", cert="/c", key="/k"
    )
    assert config.upstreams["plain"].tls is None
    assert config.upstreams["simple"].tls == UpstreamTls()
    again = parse_config(tomllib.loads(dump_config(config)), "again.toml")
    assert again == config


def test_config_spec_example_without_tls_loads(tmp_path: Path) -> None:
    path = write(tmp_path, SPEC_EXAMPLE_WITHOUT_TLS)
    config = load_config(path)
    assert config.source == path
    assert config.workers == 2
    assert config.http_parser is HttpParser.HTTPTOOLS  # "auto" with the httptools extra
    assert list(config.upstreams) == ["cobrowse"]
    upstream = config.upstreams["cobrowse"]
    assert upstream.servers == (Address("10.0.0.5", 8080), Address("10.0.0.6", 8080))
    assert upstream.balance is Balance.ROUND_ROBIN
    assert list(config.listeners) == ["sdk", "agent"]
    sdk, agent = config.listeners["sdk"], config.listeners["agent"]
    assert sdk.bind == Address("0.0.0.0", 8443)
    assert (sdk.policy, sdk.upstream, sdk.tls) == ("cobrowse-sdk", "cobrowse", None)
    assert summary(sdk) == [*SDK_RULES, ("sdk-js", b"/sdk-js/", Action.FORWARD)]
    assert agent.bind == Address("10.1.0.2", 8080)
    assert summary(agent) == AGENT_RULES
    assert config.admin is not None
    assert config.admin.bind == Address("127.0.0.1", 9901)
    assert config.presets == PresetToggles(pin_sdk=True)


# -- the built-in default and the preset --------------------------------------------------------


def test_config_built_in_default_is_the_cobrowse_preset_on_loopback() -> None:
    config = load_config(None)
    assert config.source == BUILT_IN_SOURCE == "<built-in>"
    assert config.workers == (os.cpu_count() or 1)
    assert config.presets == PresetToggles()
    assert config.admin is not None
    assert str(config.admin.bind) == "127.0.0.1:9901"
    assert list(config.upstreams) == ["cobrowse"]
    assert config.upstreams["cobrowse"].servers == (Address("127.0.0.1", 8000),)
    sdk, agent = config.listeners["sdk"], config.listeners["agent"]
    assert (str(sdk.bind), sdk.policy, sdk.upstream) == (
        "127.0.0.1:8080",
        "cobrowse-sdk",
        "cobrowse",
    )
    assert (str(agent.bind), agent.policy) == ("127.0.0.1:8081", "cobrowse-agent")
    assert summary(sdk) == SDK_RULES
    assert summary(agent) == AGENT_RULES
    assert sdk.fallback == Rule(name="fallback", prefix=b"", action=Action.DENY)
    assert agent.fallback == Rule(
        name="fallback", prefix=b"", action=Action.REWRITE, rewrite_to=b"/index.html"
    )
    # the per-client cap is on where the public connects, off where agents share a NAT address
    assert sdk.limits == Limits()
    assert sdk.limits.max_connections_per_client == 256
    assert agent.limits == Limits(max_connections_per_client=0)
    for listener in (sdk, agent):
        assert listener.mode is Mode.ENFORCE
        assert listener.refused_methods == frozenset({b"TRACE", b"CONNECT"})
        assert listener.keep_headers == frozenset()
        assert all(rule.max_body_bytes == 64 * MIB for rule in listener.rules)
        assert all(rule.upstream is None and not rule.allow for rule in listener.rules)


def test_config_preset_is_versioned_data() -> None:
    assert preset_version() >= 1


def test_config_preset_classifies_as_spec_2() -> None:
    config = load_config(None)
    sdk = PrefixTable(config.listeners["sdk"].rules, config.listeners["sdk"].fallback)
    agent = PrefixTable(config.listeners["agent"].rules, config.listeners["agent"].fallback)
    assert sdk.classify(b"/api/1/devices/abc").name == "api-devices"
    assert sdk.classify(b"/api/1/devicesX").name == "fallback"
    assert sdk.classify(b"/api/1/accounts").name == "fallback"
    assert sdk.classify(b"/sockets/1/x").action is Action.WEBSOCKET
    assert agent.classify(b"/settings/team").action is Action.REWRITE
    assert agent.classify(b"/api/1/accounts").name == "api"


@pytest.mark.parametrize(
    ("toggle", "listener", "rule"),
    [
        ("pin_sdk", "sdk", ("sdk-js", b"/sdk-js/", Action.FORWARD)),
        ("universal", "sdk", ("proxy-universal", b"/proxy/1/universal", Action.FORWARD)),
        ("ai", "sdk", ("api-virtualagents", b"/api/1/virtualagents", Action.FORWARD)),
    ],
)
def test_config_toggle_adds_a_rule_to_the_sdk_policy(
    toggle: str, listener: str, rule: tuple[str, bytes, Action]
) -> None:
    config = parse(f"{BASE}\n[presets.cobrowse]\n{toggle} = true\n")
    assert config.presets == PresetToggles(**{toggle: True})
    assert summary(config.listeners[listener]) == [*SDK_RULES, rule]


def test_config_acme_toggle_adds_a_rule_to_every_plain_listener() -> None:
    config = parse(
        f"""{BASE}
        [listeners.agent]
        bind = "127.0.0.1:8081"
        policy = "cobrowse-agent"

        [policies.own]
        fallback = "forward"

        [listeners.own]
        bind = "127.0.0.1:8082"
        policy = "own"

        [presets.cobrowse]
        acme = true
        """
    )
    acme = ("acme-challenge", b"/.well-known/acme-challenge/", Action.FORWARD)
    assert summary(config.listeners["sdk"]) == [*SDK_RULES, acme]
    assert summary(config.listeners["agent"]) == [*AGENT_RULES, acme]
    assert summary(config.listeners["own"]) == [acme]


def test_config_toggles_are_off_by_default_and_all_can_be_on() -> None:
    assert parse(BASE).presets == PresetToggles()
    config = parse(
        f"{BASE}\n[presets.cobrowse]\npin_sdk = true\nuniversal = true\nai = true\nacme = true\n"
    )
    assert [name for name, _, _ in summary(config.listeners["sdk"])] == [
        "api-devices",
        "api-sessions",
        "sockets",
        "sdk-js",
        "proxy-universal",
        "api-virtualagents",
        "acme-challenge",
    ]


# -- own policies -------------------------------------------------------------------------------


def test_config_own_policy_extends_a_preset_replacing_and_adding_rules() -> None:
    config = parse(
        f"""{BASE}upstream = "cobrowse"

        [upstreams.recordings]
        servers = ["[fd00::7]:9000", "recordings.internal:9000"]
        balance = "least_conn"

        [policies.sdk-plus]
        extends = "cobrowse-sdk"

        [policies.sdk-plus.rules.api-sessions]
        prefix = "/api/1/sessions"
        action = "forward"
        max_body_bytes = 1024

        [policies.sdk-plus.rules.uploads]
        prefix = "/uploads/"
        action = "forward"
        upstream = "recordings"
        max_body_bytes = 0
        allow = ["semicolon", "encoded_slash"]

        [policies.strict]
        extends = "sdk-plus"
        fallback = {{ action = "rewrite", rewrite_to = "/denied.html" }}

        [policies.strict.rules.uploads]
        prefix = "/uploads/v2/"
        action = "deny"

        [listeners.sdk2]
        bind = "0.0.0.0:8444"
        policy = "strict"
        upstream = "cobrowse"

        [presets.cobrowse]
        pin_sdk = true
        """
    )
    assert config.upstreams["recordings"].servers == (
        Address("fd00::7", 9000),
        Address("recordings.internal", 9000),
    )
    strict = config.listeners["sdk2"]
    assert summary(strict) == [
        SDK_RULES[0],
        ("api-sessions", b"/api/1/sessions", Action.FORWARD),
        SDK_RULES[2],
        ("sdk-js", b"/sdk-js/", Action.FORWARD),  # the toggle is inherited through the preset
        ("uploads", b"/uploads/v2/", Action.DENY),
    ]
    assert strict.rules[1].max_body_bytes == 1024
    assert strict.fallback.rewrite_to == b"/denied.html"
    assert strict.fallback.name == "fallback" and strict.fallback.prefix == b""


def test_config_rule_upstream_and_allow() -> None:
    config = parse(
        f"""{BASE}upstream = "cobrowse"

        [upstreams.files]
        servers = ["10.0.0.9:80"]

        [policies.files]
        [policies.files.rules.blobs]
        prefix = "/blobs/"
        action = "forward"
        upstream = "files"
        allow = ["encoded_slash", "semicolon"]

        [listeners.files]
        bind = "127.0.0.1:8090"
        policy = "files"
        upstream = "cobrowse"
        """
    )
    files = config.listeners["files"]
    assert files.upstream == "cobrowse"
    (blobs,) = files.rules
    assert blobs.upstream == "files"
    assert blobs.allow == frozenset({Refusal.ENCODED_SLASH, Refusal.SEMICOLON})
    assert files.fallback.action is Action.DENY  # an own policy denies what it does not list


def test_config_policy_named_after_a_preset_adds_to_it() -> None:
    config = parse(
        f"""{BASE}
        [policies.cobrowse-sdk.rules.status]
        prefix = "/api/1/status"
        action = "forward"
        """
    )
    assert summary(config.listeners["sdk"]) == [
        *SDK_RULES,
        ("status", b"/api/1/status", Action.FORWARD),
    ]


def test_config_listener_options() -> None:
    config = parse(
        """
        workers = 3
        http_parser = "h11"
        heartbeat_timeout_s = 5
        graceful_timeout_s = 12.5
        admin = false

        [upstreams.cobrowse]
        servers = ["127.0.0.1:8000"]
        keepalive = 0
        connect_timeout_s = 1.5

        [listeners.sdk]
        bind = "[::]:0"
        policy = "cobrowse-sdk"
        mode = "report"
        websocket_mode = "tunnel"
        trusted_proxies = ["10.0.0.0/8", "::1"]
        keep_headers = ["X_Forwarded_Prefix", "X-Original-URL"]
        forwarded_header = true
        refused_methods = ["trace"]
        limits = { max_headers = 50, header_timeout_s = 2, max_connections_per_client = 0 }

        [listeners.other]
        bind = "[::]:0"
        policy = "cobrowse-agent"
        """
    )
    assert (config.workers, config.http_parser, config.admin) == (3, HttpParser.H11, None)
    assert (config.heartbeat_timeout_s, config.graceful_timeout_s) == (5.0, 12.5)
    upstream = config.upstreams["cobrowse"]
    assert (upstream.keepalive, upstream.connect_timeout_s) == (0, 1.5)
    sdk = config.listeners["sdk"]
    assert sdk.bind == Address("::", 0)  # port 0: the kernel chooses, so no conflict
    assert (sdk.mode, sdk.websocket_mode) == (Mode.REPORT, WebSocketMode.TUNNEL)
    assert sdk.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert sdk.keep_headers == frozenset({b"x-forwarded-prefix", b"x-original-url"})
    assert sdk.forwarded_header
    assert sdk.refused_methods == frozenset({b"TRACE"})
    assert sdk.limits == Limits(max_headers=50, header_timeout_s=2.0, max_connections_per_client=0)
    assert config.listeners["other"].refused_methods == frozenset({b"TRACE", b"CONNECT"})


def test_config_is_frozen() -> None:
    config = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.workers = 1  # type: ignore[misc]  # the point: frozen dataclasses refuse it
    with pytest.raises(TypeError):
        config.listeners["x"] = config.listeners["sdk"]  # type: ignore[index]  # read-only view


# -- errors, verbatim ---------------------------------------------------------------------------

# (what the file adds to BASE, or replaces it with when it starts with "!", the error)
ERRORS = [
    pytest.param(
        "wrokers = 2\n" + BASE,
        'fastproxy.toml: unknown key, got "wrokers" (did you mean "workers"? known: access_log, '
        "admin, graceful_timeout_s, heartbeat_timeout_s, http_parser, listeners, policies, "
        "presets, upstreams, workers)",
        id="unknown-top-level-key",
    ),
    pytest.param(
        BASE + 'polcy = "x"\n',
        'fastproxy.toml: listeners.sdk: unknown key, got "polcy" (did you mean "policy"? known: '
        "bind, forwarded_header, keep_headers, limits, mode, policy, refused_methods, tls, "
        "trusted_proxies, upstream, websocket_mode)",
        id="unknown-listener-key",
    ),
    pytest.param(
        BASE + '[policies.p.rules.r]\nprefix = "/x/"\naction = "fwd"\n',
        'fastproxy.toml: policies.p.rules.r.action: unknown rule action, got "fwd" '
        '(did you mean "forward"?)',
        id="bad-action",
    ),
    pytest.param(
        BASE + '[policies.p.rules.r]\nprefix = "/x/"\naction = "allow"\n',
        'fastproxy.toml: policies.p.rules.r.action: unknown rule action, got "allow" '
        "(known: forward, websocket, rewrite, deny, redirect_https)",
        id="bad-action-no-suggestion",
    ),
    pytest.param(
        BASE.replace('"0.0.0.0:8443"', '"8443"'),
        'fastproxy.toml: listeners.sdk.bind: expected "host:port", got "8443"',
        id="bad-bind",
    ),
    pytest.param(
        BASE.replace('"0.0.0.0:8443"', '"localhost:8443"'),
        'fastproxy.toml: listeners.sdk.bind: the host must be an IP address, got "localhost:8443" '
        "(0.0.0.0 or [::] for every interface, 127.0.0.1 or [::1] for loopback)",
        id="bind-host-name",
    ),
    pytest.param(
        BASE.replace('"0.0.0.0:8443"', '"::1:8443"'),
        'fastproxy.toml: listeners.sdk.bind: an IPv6 address needs brackets, got "::1:8443" '
        '(write "[::1]:8443")',
        id="bind-ipv6-brackets",
    ),
    pytest.param(
        BASE.replace('"0.0.0.0:8443"', '"0.0.0.0:70000"'),
        "fastproxy.toml: listeners.sdk.bind: port must be a number from 0 to 65535, "
        'got "0.0.0.0:70000"',
        id="bind-port",
    ),
    pytest.param(
        BASE + '[listeners.agent]\nbind = "0.0.0.0:8443"\npolicy = "cobrowse-agent"\n',
        "fastproxy.toml: listeners.agent.bind: address already used by listeners.sdk "
        '("0.0.0.0:8443"), got "0.0.0.0:8443"',
        id="duplicate-bind",
    ),
    pytest.param(
        BASE + '[listeners.agent]\nbind = "10.1.0.2:8443"\npolicy = "cobrowse-agent"\n',
        "fastproxy.toml: listeners.agent.bind: address already used by listeners.sdk "
        '("0.0.0.0:8443"), got "10.1.0.2:8443" ("0.0.0.0:8443" covers every address of its '
        "family on that port)",
        id="overlapping-bind",
    ),
    pytest.param(
        BASE + '[admin]\nbind = "0.0.0.0:8443"\n',
        'fastproxy.toml: admin.bind: address already used by listeners.sdk ("0.0.0.0:8443"), '
        'got "0.0.0.0:8443"',
        id="admin-bind-taken",
    ),
    pytest.param(
        BASE.replace('"cobrowse-sdk"', '"cobrowse-skd"'),
        'fastproxy.toml: listeners.sdk.policy: unknown policy, got "cobrowse-skd" '
        '(did you mean "cobrowse-sdk"?)',
        id="unknown-policy",
    ),
    pytest.param(
        BASE + 'upstream = "cobrows"\n',
        'fastproxy.toml: listeners.sdk.upstream: unknown upstream, got "cobrows" '
        '(did you mean "cobrowse"?)',
        id="unknown-upstream",
    ),
    pytest.param(
        BASE + '[policies.p.rules.r]\nprefix = "/x/"\naction = "forward"\nupstream = "nope"\n',
        'fastproxy.toml: policies.p.rules.r.upstream: unknown upstream, got "nope" '
        "(known: cobrowse)",
        id="unknown-rule-upstream",
    ),
    pytest.param(
        BASE + '[upstreams.other]\nservers = ["10.0.0.7:80"]\n',
        'fastproxy.toml: listeners.sdk: missing key "upstream" '
        "(required when there is more than one upstream)",
        id="ambiguous-upstream",
    ),
    pytest.param(
        BASE + '[policies.p.rules.r]\nprefix = "api/"\naction = "forward"\n',
        'fastproxy.toml: policies.p.rules.r.prefix: prefix must start with "/", got "api/"',
        id="prefix-relative",
    ),
    pytest.param(
        BASE + '[policies.p.rules.r]\nprefix = "/api/?x=1"\naction = "forward"\n',
        "fastproxy.toml: policies.p.rules.r.prefix: prefix may only hold letters, digits and "
        '/-._~!$&\'()*+,;=:@, got "/api/?x=1" ("?" is not allowed)',
        id="prefix-query",
    ),
    pytest.param(
        BASE + '[policies.p.rules.r]\nprefix = "/api/../admin"\naction = "forward"\n',
        "fastproxy.toml: policies.p.rules.r.prefix: prefix must be a canonical path, without "
        '"//", "." or ".." segments, got "/api/../admin" (request paths are matched after '
        "normalisation, so it could never match)",
        id="prefix-dot-segment",
    ),
    pytest.param(
        BASE + '[policies.p.rules.r]\nprefix = "/a;b/"\naction = "forward"\n',
        "fastproxy.toml: policies.p.rules.r.prefix: prefix is not a clean path (semicolon), "
        'got "/a;b/" (add "semicolon" to the rule\'s allow list to accept it)',
        id="prefix-not-clean",
    ),
    pytest.param(
        BASE + '[policies.p]\nextends = "cobrowse-sdk"\n'
        '[policies.p.rules.devices]\nprefix = "/api/1/devices"\naction = "deny"\n',
        'fastproxy.toml: policies.p.rules.devices.prefix: rules "api-devices" and "devices" '
        'have the same prefix, got "/api/1/devices"',
        id="duplicate-prefix",
    ),
    pytest.param(
        BASE + "[presets.cobrowse]\nacme = true\n"
        '[policies.p.rules.le]\nprefix = "/.well-known/acme-challenge/"\naction = "forward"\n'
        '[listeners.p]\nbind = "127.0.0.1:80"\npolicy = "p"\n',
        'fastproxy.toml: listeners.p.policy: rules "le" and "acme-challenge" have the same '
        'prefix, got "/.well-known/acme-challenge/" (presets.cobrowse.acme adds acme-challenge)',
        id="duplicate-prefix-from-toggle",
    ),
    pytest.param(
        BASE + '[policies.p.rules.r]\nprefix = "/x/"\naction = "rewrite"\n',
        'fastproxy.toml: policies.p.rules.r: missing key "rewrite_to" '
        '(required when action is "rewrite")',
        id="rewrite-without-rewrite-to",
    ),
    pytest.param(
        BASE + '[policies.p.rules.r]\nprefix = "/x/"\naction = "deny"\nrewrite_to = "/y"\n',
        'fastproxy.toml: policies.p.rules.r.rewrite_to: rewrite_to is only for action "rewrite", '
        'got "/y"',
        id="rewrite-to-without-rewrite",
    ),
    pytest.param(
        BASE + '[policies.p]\nfallback = "rewite"\n',
        'fastproxy.toml: policies.p.fallback: unknown fallback action, got "rewite" '
        '(did you mean "rewrite"?)',
        id="bad-fallback",
    ),
    pytest.param(
        BASE + '[policies.p]\nfallback = "rewrite"\n',
        'fastproxy.toml: policies.p.fallback: missing key "rewrite_to" '
        '(write fallback = { action = "rewrite", rewrite_to = "/index.html" })',
        id="fallback-rewrite-without-target",
    ),
    pytest.param(
        BASE + '[policies.p]\nextends = "q"\n[policies.q]\n',
        "fastproxy.toml: policies.p.extends: a policy can only extend one defined before it, "
        'got "q" (move [policies.q] above [policies.p])',
        id="extends-later-policy",
    ),
    pytest.param(
        BASE + '[policies.p]\nextends = "cobrowse-sdkk"\n',
        'fastproxy.toml: policies.p.extends: unknown policy, got "cobrowse-sdkk" '
        '(did you mean "cobrowse-sdk"?)',
        id="extends-unknown",
    ),
    pytest.param(
        BASE + '[policies.p.rules.fallback]\nprefix = "/x/"\naction = "deny"\n',
        'fastproxy.toml: policies.p.rules.fallback: the rule name "fallback" is reserved, '
        'got "fallback" (set the policy\'s fallback key instead)',
        id="reserved-rule-name",
    ),
    pytest.param(
        BASE + 'tls = { cert = "/etc/tls.crt", key = "/etc/tls.key", min_version = "1.1" }\n',
        'fastproxy.toml: listeners.sdk.tls.min_version: unknown TLS version, got "1.1" '
        '("1.2" or "1.3"; TLS 1.0 and 1.1 are never accepted)',
        id="tls-min-version",
    ),
    pytest.param(
        BASE + 'tls = { cert = "/c", key = "/k", certificates = [{ cert = "/d" }] }\n',
        'fastproxy.toml: listeners.sdk.tls.certificates[0]: missing key "key"',
        id="tls-sni-certificate-without-key",
    ),
    pytest.param(
        BASE + 'tls = { cert = "", key = "/k" }\n',
        'fastproxy.toml: listeners.sdk.tls.cert: expected a file name, got ""',
        id="tls-empty-file-name",
    ),
    pytest.param(
        BASE.replace('servers = ["10.0.0.5:8080"]', 'servers = ["10.0.0.5:8080"]\ntls = "yes"'),
        'fastproxy.toml: upstreams.cobrowse.tls: expected true, false or a table, got "yes"',
        id="upstream-tls-type",
    ),
    pytest.param(
        BASE.replace(
            'servers = ["10.0.0.5:8080"]', 'servers = ["10.0.0.5:8080"]\ntls = { cert = "/c" }'
        ),
        'fastproxy.toml: upstreams.cobrowse.tls: missing key "key" '
        "(a client certificate needs both cert and key)",
        id="upstream-tls-cert-without-key",
    ),
    pytest.param(
        BASE.replace(
            'servers = ["10.0.0.5:8080"]',
            'servers = ["10.0.0.5:8080"]\ntls = { server_name = "a b" }',
        ),
        'fastproxy.toml: upstreams.cobrowse.tls.server_name: not a host name, got "a b"',
        id="upstream-tls-server-name",
    ),
    pytest.param(
        BASE + 'tls = { cert = "/etc/tls.crt" }\n',
        'fastproxy.toml: listeners.sdk.tls: missing key "key"',
        id="tls-without-key",
    ),
    pytest.param(
        BASE + 'tls = { cert = 1, key = "k" }\n',
        "fastproxy.toml: listeners.sdk.tls.cert: expected a string, got 1",
        id="tls-cert-type",
    ),
    pytest.param(
        BASE.replace('["10.0.0.5:8080"]', '["10.0.0.5:8080", "10.0.0.5:8080"]'),
        'fastproxy.toml: upstreams.cobrowse.servers[1]: server listed twice, got "10.0.0.5:8080"',
        id="duplicate-server",
    ),
    pytest.param(
        BASE + '[policies.p]\nextends = "p"\n',
        'fastproxy.toml: policies.p.extends: a policy cannot extend itself, got "p"',
        id="extends-itself",
    ),
    pytest.param(
        BASE + '[policies.cobrowse-sdk]\nextends = "cobrowse-agent"\n',
        "fastproxy.toml: policies.cobrowse-sdk.extends: a policy named after the preset "
        '"cobrowse-sdk" already extends it, got "cobrowse-agent" (give the policy another name)',
        id="preset-named-policy-extends",
    ),
    pytest.param(
        'workers = "2"\n' + BASE,
        'fastproxy.toml: workers: expected an integer, got "2"',
        id="bad-type",
    ),
    pytest.param(
        "workers = true\n" + BASE,
        "fastproxy.toml: workers: expected an integer, got true",
        id="bool-is-not-an-integer",
    ),
    pytest.param(
        "workers = 0\n" + BASE,
        "fastproxy.toml: workers: must be at least 1, got 0",
        id="workers-0",
    ),
    pytest.param(
        BASE + 'forwarded_header = "yes"\n',
        'fastproxy.toml: listeners.sdk.forwarded_header: expected true or false, got "yes"',
        id="bad-bool",
    ),
    pytest.param(
        BASE + "[listeners.sdk.limits]\nmax_headers = 0\n",
        "fastproxy.toml: listeners.sdk.limits.max_headers: must be at least 1, got 0",
        id="bad-limit",
    ),
    pytest.param(
        BASE + "[listeners.sdk.limits]\nheader_timeout_s = -1.5\n",
        "fastproxy.toml: listeners.sdk.limits.header_timeout_s: must be a positive number of "
        "seconds, got -1.5",
        id="negative-timeout",
    ),
    pytest.param(
        BASE + "[listeners.sdk.limits]\nheader_timeout_s = nan\n",
        "fastproxy.toml: listeners.sdk.limits.header_timeout_s: must be a positive number of "
        "seconds, got nan",
        id="nan-timeout",
    ),
    pytest.param(
        BASE + "[listeners.sdk.limits]\nws_ping_interval_s = 4000\n",
        "fastproxy.toml: listeners.sdk.limits.ws_ping_interval_s: must be shorter than "
        "ws_idle_timeout_s (3600.0), got 4000.0",
        id="ping-after-idle-timeout",
    ),
    pytest.param(
        BASE + "[listeners.sdk.limits]\nmax_header = 10\n",
        'fastproxy.toml: listeners.sdk.limits: unknown key, got "max_header" (did you mean '
        '"max_headers"? known: body_timeout_s, header_timeout_s, keepalive_timeout_s, '
        "max_connections, max_connections_per_client, max_head_bytes, max_headers, "
        "max_uri_bytes, send_timeout_s, ws_idle_timeout_s, ws_max_message_bytes, "
        "ws_ping_interval_s)",
        id="unknown-limit",
    ),
    pytest.param(
        BASE + '[policies.p.rules.r]\nprefix = "/x/"\naction = "forward"\nallow = ["semicolons"]\n',
        'fastproxy.toml: policies.p.rules.r.allow[0]: unknown refusal, got "semicolons" '
        '(did you mean "semicolon"?)',
        id="bad-allow",
    ),
    pytest.param(
        BASE + '[policies.p.rules.r]\nprefix = "/x/"\naction = "forward"\nallow = ["above_root"]\n',
        "fastproxy.toml: policies.p.rules.r.allow[0]: this refusal cannot be opted out of, got "
        '"above_root" (allowed: encoded_slash, encoded_backslash, encoded_control, '
        "raw_backslash, encoded_non_ascii, malformed_escape, double_encoding, semicolon)",
        id="allow-not-opt-out-able",
    ),
    pytest.param(
        BASE + '[policies.p.rules.r]\nprefix = "/x/"\naction = "forward"\nhttps_port = 8443\n',
        "fastproxy.toml: policies.p.rules.r.https_port: https_port is only for action "
        '"redirect_https", got 8443',
        id="https-port-not-a-redirect",
    ),
    pytest.param(
        BASE + '[policies.p]\nfallback = { action = "redirect_https", https_port = 70000 }\n',
        "fastproxy.toml: policies.p.fallback.https_port: not a TCP port, got 70000",
        id="https-port-out-of-range",
    ),
    pytest.param(
        BASE + 'trusted_proxies = ["10.0.0.1/8"]\n',
        "fastproxy.toml: listeners.sdk.trusted_proxies[0]: host bits are set in the network, "
        'got "10.0.0.1/8" (did you mean "10.0.0.0/8"?)',
        id="bad-trusted-proxy",
    ),
    pytest.param(
        BASE + 'mode = "reporting"\n',
        'fastproxy.toml: listeners.sdk.mode: unknown mode, got "reporting" '
        '(did you mean "report"?)',
        id="bad-mode",
    ),
    pytest.param(
        BASE + 'refused_methods = ["GET /"]\n',
        'fastproxy.toml: listeners.sdk.refused_methods[0]: not an HTTP method name, got "GET /"',
        id="bad-method",
    ),
    pytest.param(
        BASE + 'refused_methods = ["M.SEARCH"]\n',
        "fastproxy.toml: listeners.sdk.refused_methods[0]: not a method fastproxy accepts, got "
        '"M.SEARCH" (methods are upper-case letters, "_" and "-"; any other is refused with 400)',
        id="method-never-accepted",
    ),
    pytest.param(
        BASE + "strip_override_headers = false\n",
        "fastproxy.toml: listeners.sdk.strip_override_headers: no longer a setting: provenance "
        "headers are removed from untrusted clients on every listener "
        '(keep_headers = ["X-Original-URL"] keeps a named one)',
        id="strip-override-headers-removed",
    ),
    pytest.param(
        BASE + 'keep_headers = ["X-Custom"]\n',
        "fastproxy.toml: listeners.sdk.keep_headers[0]: not a provenance header, it passes "
        'untouched already, got "X-Custom" (see "Provenance headers" in the README)',
        id="keep-headers-not-provenance",
    ),
    pytest.param(
        BASE + 'keep_headers = ["X-Forwarded-For"]\n',
        "fastproxy.toml: listeners.sdk.keep_headers[0]: fastproxy sets this header itself, got "
        '"X-Forwarded-For" (list the peers whose value is kept in trusted_proxies)',
        id="keep-headers-own",
    ),
    pytest.param(
        BASE + 'keep_headers = ["X Original"]\n',
        'fastproxy.toml: listeners.sdk.keep_headers[0]: not a header name, got "X Original"',
        id="keep-headers-not-a-name",
    ),
    pytest.param(
        BASE.replace('["10.0.0.5:8080"]', "[]"),
        "fastproxy.toml: upstreams.cobrowse.servers: at least one server is required, got []",
        id="no-servers",
    ),
    pytest.param(
        BASE.replace('["10.0.0.5:8080"]', '["10.0.0.256:8080"]'),
        "fastproxy.toml: upstreams.cobrowse.servers[0]: the host must be a host name or an IP "
        'address, got "10.0.0.256:8080"',
        id="bad-server",
    ),
    pytest.param(
        BASE.replace("[listeners.sdk]", "health = 1\n[listeners.sdk]"),
        "fastproxy.toml: upstreams.cobrowse.health: expected true, false or a table, got 1",
        id="health-not-a-table",
    ),
    pytest.param(
        BASE.replace("[listeners.sdk]", 'health = { path = "up" }\n[listeners.sdk]'),
        "fastproxy.toml: upstreams.cobrowse.health.path: expected a request target starting with "
        '"/", visible ASCII, no spaces, got "up"',
        id="health-path",
    ),
    pytest.param(
        BASE.replace(
            "[listeners.sdk]", "health = { interval_s = 1, timeout_s = 2 }\n[listeners.sdk]"
        ),
        "fastproxy.toml: upstreams.cobrowse.health.timeout_s: must be at most interval_s (1.0), "
        "got 2.0",
        id="health-timeout-over-interval",
    ),
    pytest.param(
        BASE.replace("[listeners.sdk]", 'health = { statuses = ["2xx"] }\n[listeners.sdk]'),
        "fastproxy.toml: upstreams.cobrowse.health.statuses[0]: expected a status (200) or a "
        'range ("200-399"), got "2xx"',
        id="health-status-range",
    ),
    pytest.param(
        BASE.replace("[listeners.sdk]", "health = { statuses = [] }\n[listeners.sdk]"),
        "fastproxy.toml: upstreams.cobrowse.health.statuses: at least one status or range is "
        "required, got []",
        id="health-no-status",
    ),
    pytest.param(
        BASE.replace("[listeners.sdk]", "health = { fall = 0 }\n[listeners.sdk]"),
        "fastproxy.toml: upstreams.cobrowse.health.fall: must be at least 1, got 0",
        id="health-fall",
    ),
    pytest.param(
        BASE.replace("[listeners.sdk]", "health = { rsie = 2 }\n[listeners.sdk]"),
        'fastproxy.toml: upstreams.cobrowse.health: unknown key, got "rsie" (did you mean "rise"? '
        "known: fall, interval_s, path, rise, statuses, timeout_s)",
        id="health-unknown-key",
    ),
    pytest.param(
        BASE.replace("[listeners.sdk]", "next_upstream_tries = 0\n[listeners.sdk]"),
        "fastproxy.toml: upstreams.cobrowse.next_upstream_tries: must be at least 1, got 0",
        id="next-upstream-tries",
    ),
    pytest.param(
        "!workers = 2\n",
        'fastproxy.toml: missing key "upstreams" (at least one [upstreams.NAME] table)',
        id="no-upstreams",
    ),
    pytest.param(
        '![upstreams.a]\nservers = ["a:1"]\n',
        'fastproxy.toml: missing key "listeners" (at least one [listeners.NAME] table)',
        id="no-listeners",
    ),
    pytest.param(
        BASE + "[presets.cobrowse]\npin_sdk = 1\n",
        "fastproxy.toml: presets.cobrowse.pin_sdk: expected true or false, got 1",
        id="bad-toggle",
    ),
    pytest.param(
        'http_parser = "httptool"\n' + BASE,
        'fastproxy.toml: http_parser: unknown HTTP parser, got "httptool" '
        '(did you mean "httptools"?)',
        id="bad-parser",
    ),
    pytest.param(
        'admin = "off"\n' + BASE,
        'fastproxy.toml: admin: expected a table or false, got "off"',
        id="bad-admin",
    ),
    pytest.param(
        BASE + '[listeners."sdk public"]\nbind = "127.0.0.1:1"\npolicy = "cobrowse-sdk"\n',
        'fastproxy.toml: listeners.sdk public: a name may only hold letters, digits, "-" and "_" '
        '(at most 64), got "sdk public"',
        id="bad-name",
    ),
    pytest.param(
        BASE + '[access_log]\nsample = 1.5\npath = "a.log"\n',
        "fastproxy.toml: access_log.sample: expected a number from 0 to 1, got 1.5",
        id="access-log-sample-over-1",
    ),
    pytest.param(
        BASE + '[access_log]\nsample = true\npath = "a.log"\n',
        "fastproxy.toml: access_log.sample: expected a number from 0 to 1, got true",
        id="access-log-sample-bool",
    ),
    pytest.param(
        BASE + '[access_log]\nquery = "hide"\npath = "a.log"\n',
        'fastproxy.toml: access_log.query: unknown query mode, got "hide" '
        "(known: redact, keep, drop)",
        id="access-log-query",
    ),
    pytest.param(
        BASE + "[access_log]\nsample = 0.5\n",
        'fastproxy.toml: access_log: missing key "path" (a file to append to, or "-" for stdout)',
        id="access-log-no-path",
    ),
    pytest.param(
        BASE + '[access_log]\npath = ""\n',
        'fastproxy.toml: access_log.path: expected a file name or "-" for stdout, got ""',
        id="access-log-empty-path",
    ),
    pytest.param(
        BASE + '[access_log]\npaht = "a.log"\n',
        'fastproxy.toml: access_log: unknown key, got "paht" (did you mean "path"? known: '
        "enabled, path, query, sample)",
        id="access-log-unknown-key",
    ),
    pytest.param(
        BASE + '[access_log]\nenabled = "no"\npath = "a.log"\n',
        'fastproxy.toml: access_log.enabled: expected true or false, got "no"',
        id="access-log-enabled",
    ),
]


@pytest.mark.parametrize(("text", "message"), ERRORS)
def test_config_error_message(text: str, message: str) -> None:
    data = tomllib.loads(text[1:] if text.startswith("!") else text)
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "fastproxy.toml")
    assert str(caught.value) == message


def test_config_error_carries_its_parts() -> None:
    with pytest.raises(ConfigError) as caught:
        parse(BASE.replace('"cobrowse-sdk"', '"cobrowse-skd"'))
    error = caught.value
    assert (error.source, error.where) == ("fastproxy.toml", "listeners.sdk.policy")
    assert error.msg == 'unknown policy, got "cobrowse-skd"'
    assert error.hint == 'did you mean "cobrowse-sdk"?'


def test_config_missing_file_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_config("nope.toml")
    assert str(caught.value) == "nope.toml: cannot read the file: No such file or directory"


def test_config_directory_is_not_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conf.d").mkdir()
    with pytest.raises(ConfigError) as caught:
        load_config("conf.d")
    assert str(caught.value) == "conf.d: cannot read the file: Is a directory"


def test_config_toml_syntax_error_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "workers 2\n")
    with pytest.raises(ConfigError) as caught:
        load_config("fastproxy.toml")
    assert str(caught.value) == (
        "fastproxy.toml: invalid TOML: Expected '=' after a key in a key/value pair "
        "(at line 1, column 9)"
    )


def test_config_not_utf8_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fastproxy.toml").write_bytes(b"# caf\xe9\nworkers = 2\n")
    with pytest.raises(ConfigError) as caught:
        load_config("fastproxy.toml")
    assert (
        str(caught.value) == "fastproxy.toml: invalid TOML: not UTF-8 (invalid continuation byte)"
    )


def test_config_long_values_are_cut_in_messages() -> None:
    with pytest.raises(ConfigError) as caught:
        parse(BASE + f'mode = "{"x" * 500}"\n')
    assert caught.value.msg == 'unknown mode, got "' + "x" * 196 + "..."


# -- [access_log] ---------------------------------------------------------------------------------


def test_access_log_defaults_off_and_table_values() -> None:
    assert parse(BASE).access_log == AccessLogConfig(path=None, sample=1.0, query=QueryMode.REDACT)
    on = parse(BASE + '[access_log]\npath = "/var/log/fastproxy/access.log"\n').access_log
    assert on == AccessLogConfig(path="/var/log/fastproxy/access.log")
    full = parse(BASE + '[access_log]\npath = "-"\nsample = 0\nquery = "drop"\n').access_log
    assert full == AccessLogConfig(path="-", sample=0.0, query=QueryMode.DROP)
    off = parse(BASE + '[access_log]\nenabled = false\npath = "a.log"\nquery = "keep"\n')
    assert off.access_log == AccessLogConfig(path=None, query=QueryMode.KEEP)
    assert parse(BASE + "[access_log]\nenabled = false\n").access_log.path is None


@pytest.mark.parametrize(
    "table",
    ["", 'path = "/tmp/a.log"\nsample = 0.25\nquery = "keep"\n', "enabled = false\n"],
)
def test_access_log_dump_roundtrip(table: str, tmp_path: Path) -> None:
    config = parse(BASE + ("[access_log]\n" + table if table else ""))
    assert "[access_log]" in dump_config(config)
    again = roundtrip(config, tmp_path)
    assert again.access_log == config.access_log


# -- dump_config --------------------------------------------------------------------------------


def roundtrip(config: Config, tmp_path: Path) -> Config:
    return load_config(write(tmp_path, dump_config(config), "dumped.toml"))


def test_config_dump_roundtrip_built_in(tmp_path: Path) -> None:
    config = load_config(None)
    assert roundtrip(config, tmp_path) == config


def test_config_dump_roundtrip_spec_example(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, SPEC_EXAMPLE_WITHOUT_TLS))
    again = roundtrip(config, tmp_path)
    assert again == config
    assert again.source.endswith("dumped.toml")  # the source is not compared


def test_config_dump_roundtrip_everything(tmp_path: Path) -> None:
    config = parse(
        """
        workers = 3
        http_parser = "h11"
        heartbeat_timeout_s = 7.5
        admin = false

        [presets.cobrowse]
        pin_sdk = true
        universal = true
        ai = true
        acme = true

        [upstreams.cobrowse]
        servers = ["[::1]:8000", "cobrowse.internal:8000"]
        balance = "least_conn"
        keepalive = 4

        [upstreams.cobrowse.health]
        path = "/healthz?full=1"
        interval_s = 5
        timeout_s = 2.5
        statuses = [200, "300-302"]
        rise = 2
        fall = 3

        [upstreams.files]
        servers = ["10.0.0.9:80"]
        health = false
        down_for_s = 30
        next_upstream_tries = 1
        next_upstream_timeout_s = 2

        [policies.sdk-plus]
        extends = "cobrowse-sdk"
        fallback = { action = "rewrite", rewrite_to = "/sorry.html", upstream = "files" }

        [policies.sdk-plus.rules.blobs]
        prefix = "/blobs/"
        action = "forward"
        upstream = "files"
        max_body_bytes = 0
        allow = ["semicolon", "encoded_slash"]

        [policies.cobrowse-agent.rules.extra]
        prefix = "/extra"
        action = "websocket"

        [listeners.sdk]
        bind = "[::]:8443"
        policy = "sdk-plus"
        upstream = "cobrowse"
        mode = "report"
        trusted_proxies = ["10.0.0.0/8"]
        keep_headers = ["X-Forwarded-Prefix"]
        refused_methods = []
        limits = { max_headers = 10, ws_idle_timeout_s = 60, ws_ping_interval_s = 15 }

        [listeners.agent]
        bind = "10.1.0.2:8080"
        policy = "cobrowse-agent"
        upstream = "files"
        websocket_mode = "tunnel"

        [listeners.agent2]
        bind = "10.1.0.3:8080"
        policy = "cobrowse-agent"
        upstream = "files"
        """
    )
    text = dump_config(config)
    assert config.upstreams["cobrowse"].health == HealthCheck(
        "/healthz?full=1", 5.0, 2.5, ((200, 200), (300, 302)), 2, 3
    )
    files = config.upstreams["files"]
    assert files.health is None and files.down_for_s == 30.0
    assert (files.next_upstream_tries, files.next_upstream_timeout_s) == (1, 2.0)
    assert "[policies.sdk-plus.rules.acme-challenge]" in text
    assert "extends" not in text
    again = roundtrip(config, tmp_path)
    assert again == config
    assert dump_config(again) == text.replace(config.source, again.source)


def test_config_dump_shows_the_expanded_preset() -> None:
    text = dump_config(parse(BASE + "[presets.cobrowse]\npin_sdk = true\n"))
    assert f"Cobrowse preset version {preset_version()}" in text
    assert '[policies.cobrowse-sdk.rules.sdk-js]\nprefix = "/sdk-js/"\naction = "forward"\n' in text
    assert 'fallback = { action = "deny", max_body_bytes = 67108864 }' in text


def test_config_dump_writes_tls_as_a_table() -> None:
    config = load_config(None)
    sdk = dataclasses.replace(config.listeners["sdk"], tls=TlsConfig(cert="c.pem", key="k.pem"))
    text = dump_config(dataclasses.replace(config, listeners={"sdk": sdk}))
    assert (
        'tls = { cert = "c.pem", key = "k.pem", min_version = "1.2", handshake_timeout_s = 10.0 }\n'
        in text
    )


def test_config_dump_escapes_strings() -> None:
    config = load_config(None)
    tls = TlsConfig(cert='dir "x"\\c.pem\n', key="ké.pem")
    sdk = dataclasses.replace(config.listeners["sdk"], tls=tls)
    text = dump_config(dataclasses.replace(config, listeners={"sdk": sdk}))
    dumped = tomllib.loads(text)["listeners"]["sdk"]["tls"]
    assert (dumped["cert"], dumped["key"]) == (tls.cert, tls.key)


def test_config_dump_leaves_plain_listener_rules_to_the_toggle_when_listeners_differ() -> None:
    # A TLS listener gets no acme rule; its plain neighbour on the same policy does. The policy
    # is written without it and the toggle re-adds it on load.
    config = parse(BASE + "[presets.cobrowse]\nacme = true\n")
    sdk = config.listeners["sdk"]
    tls_sdk = dataclasses.replace(
        sdk, name="tls", rules=sdk.rules[:-1], tls=TlsConfig(cert="c", key="k")
    )
    text = dump_config(dataclasses.replace(config, listeners={"sdk": sdk, "tls": tls_sdk}))
    assert "acme-challenge" not in text
    assert "[policies.cobrowse-sdk.rules.sockets]" in text


def test_config_httptools_parser_selected(tmp_path: Path) -> None:
    path = tmp_path / "fastproxy.toml"
    path.write_text('http_parser = "httptools"\n' + BASE)
    assert load_config(str(path)).http_parser is HttpParser.HTTPTOOLS


def test_config_parser_auto_is_httptools_when_installed_else_h11(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "fastproxy.toml"
    path.write_text(BASE)
    assert load_config(str(path)).http_parser is HttpParser.HTTPTOOLS  # a test extra
    path.write_text('http_parser = "auto"\n' + BASE)
    assert load_config(str(path)).http_parser is HttpParser.HTTPTOOLS
    path.write_text('http_parser = "h11"\n' + BASE)
    assert load_config(str(path)).http_parser is HttpParser.H11  # the reference, on request
    monkeypatch.setitem(sys.modules, "httptools", None)  # as if not installed
    assert auto_parser() is HttpParser.H11
    path.write_text('http_parser = "auto"\n' + BASE)
    assert load_config(str(path)).http_parser is HttpParser.H11
    path.write_text(BASE)
    assert load_config(str(path)).http_parser is HttpParser.H11


def test_config_per_client_cap_defaults_by_policy_and_can_be_set() -> None:
    text = """
    [upstreams.app]
    servers = ["127.0.0.1:9000"]
    [listeners.public]
    bind = "127.0.0.1:8080"
    policy = "cobrowse-sdk"
    [listeners.office]
    bind = "127.0.0.1:8081"
    policy = "cobrowse-agent"
    [listeners.office2]
    bind = "127.0.0.1:8082"
    policy = "cobrowse-agent"
    limits = { max_connections_per_client = 40 }
    [listeners.public2]
    bind = "127.0.0.1:8083"
    policy = "cobrowse-sdk"
    limits = { max_connections_per_client = 0 }
    """
    listeners = parse_config(tomllib.loads(textwrap.dedent(text)), "f.toml").listeners
    caps = {name: lis.limits.max_connections_per_client for name, lis in listeners.items()}
    assert caps == {"public": 256, "office": 0, "office2": 40, "public2": 0}


def test_config_dump_writes_every_key_the_loader_reads() -> None:
    # "every default written out": each key a file may set, at each level, is in the dump (TLS
    # only where configured, see the TLS round trip above); workers only when the file set it
    from fastproxy import config as module

    dumped = tomllib.loads(dump_config(load_config(None)))
    assert set(dumped) == set(module._TOP_KEYS) - {"workers"}
    upstream = dumped["upstreams"]["cobrowse"]
    assert set(upstream) == set(module._UPSTREAM_KEYS) - {"tls"}
    assert set(upstream["health"]) == set(module._HEALTH_KEYS)
    for listener in dumped["listeners"].values():
        assert set(listener) == set(module._LISTENER_KEYS) - {"tls"}
        assert set(listener["limits"]) == set(module._LIMIT_KEYS)


def test_config_dump_keeps_workers_as_the_file_says(tmp_path: Path) -> None:
    # not set: one per CPU wherever the dump is loaded, not the dumping machine's count
    default = load_config(None)
    assert default.workers_per_cpu
    text = dump_config(default)
    assert "workers" not in tomllib.loads(text)
    assert f"# workers: not set, so one per CPU ({os.cpu_count()} on this machine)" in text
    again = roundtrip(default, tmp_path)
    assert again.workers_per_cpu and again == default
    # set: written as it was, even when it equals the CPU count
    three = parse("workers = 3\n" + BASE)
    assert not three.workers_per_cpu
    assert tomllib.loads(dump_config(three))["workers"] == 3
    assert not roundtrip(three, tmp_path).workers_per_cpu
