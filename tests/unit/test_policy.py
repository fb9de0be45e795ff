"""Tables of request-targets against canonical paths, refusals and the Cobrowse preset decisions."""

from __future__ import annotations

import pytest

from fastproxy.policy import (
    FIXED_REFUSALS,
    Action,
    Decision,
    PathRefused,
    PrefixTable,
    Refusal,
    Rule,
    canonicalize,
)

R = Refusal
OPTABLE = frozenset(Refusal) - FIXED_REFUSALS

# --- canonicalize, strict ----------------------------------------------------------------------

CANONICAL: list[tuple[bytes, bytes | Refusal]] = [
    # unchanged (fast path and slow path)
    (b"/", b"/"),
    (b"/api/1/devices/abc123/sessions", b"/api/1/devices/abc123/sessions"),
    (b"/.well-known/acme-challenge/x", b"/.well-known/acme-challenge/x"),
    (b"/a..b/c./.d/..e", b"/a..b/c./.d/..e"),
    (b"/a:b@c!$&'()*+,=-_~", b"/a:b@c!$&'()*+,=-_~"),
    (b"/index.html", b"/index.html"),
    # dot segments (RFC 3986 5.2.4) and merged slashes
    (b"/api/1/devices/../admin", b"/api/1/admin"),
    (b"/a/./b/../c", b"/a/c"),
    (b"/./a", b"/a"),
    (b"//api//1", b"/api/1"),
    (b"//", b"/"),
    (b"/a//", b"/a/"),
    (b"/a/b/..", b"/a/"),
    (b"/a/.", b"/a/"),
    (b"/a/./", b"/a/"),
    (b"/a/..", b"/"),
    (b"/a/%2e", b"/a/"),
    (b"/a/%2e%2E/b", b"/b"),
    (b"/..", R.ABOVE_ROOT),
    (b"/a/../..", R.ABOVE_ROOT),
    (b"/%2e%2e/", R.ABOVE_ROOT),
    (b"/%2E./", R.ABOVE_ROOT),
    (b"/.%2e/x", R.ABOVE_ROOT),
    # escapes: unreserved decoded, others kept with upper-case hex
    (b"/%41", b"/A"),
    (b"/%7e", b"/~"),
    (b"/a%2d%2E%5f%30", b"/a-._0"),
    (b"/%3f", b"/%3F"),
    (b"/a%3Fb", b"/a%3Fb"),
    (b"/my%20file", b"/my%20file"),
    (b"/%25", b"/%25"),
    (b"/100%25/x", b"/100%25/x"),
    (b"/%25zz", b"/%25zz"),
    (b"/%3b", b"/%3B"),
    # refused escapes
    (b"/a%2fb", R.ENCODED_SLASH),
    (b"/a%2Fb", R.ENCODED_SLASH),
    (b"/a%5cb", R.ENCODED_BACKSLASH),
    (b"/a%00", R.ENCODED_CONTROL),
    (b"/a%1f", R.ENCODED_CONTROL),
    (b"/a%7F", R.ENCODED_CONTROL),
    (b"/a%0d%0aX: y", R.RAW_CONTROL),
    (b"/a%0d%0a", R.ENCODED_CONTROL),
    (b"/%uFF0E", R.MALFORMED_ESCAPE),
    (b"/%u002e%u002e/", R.MALFORMED_ESCAPE),
    (b"/%zz", R.MALFORMED_ESCAPE),
    (b"/a%", R.MALFORMED_ESCAPE),
    (b"/a%4", R.MALFORMED_ESCAPE),
    (b"/a%4/b", R.MALFORMED_ESCAPE),
    (b"/%4g", R.MALFORMED_ESCAPE),
    (b"/%EF%BC%8E", R.ENCODED_NON_ASCII),  # fullwidth full stop
    (b"/%ef%bc%8e%ef%bc%8e/", R.ENCODED_NON_ASCII),
    (b"/%C0%AE", R.ENCODED_NON_ASCII),  # overlong "."
    (b"/%c0%ae%c0%ae/", R.ENCODED_NON_ASCII),
    (b"/caf%C3%A9", R.ENCODED_NON_ASCII),
    (b"/%252e", R.DOUBLE_ENCODING),
    (b"/%252E%252E/", R.DOUBLE_ENCODING),
    (b"/%2541", R.DOUBLE_ENCODING),
    (b"/%25%32%65", R.DOUBLE_ENCODING),  # becomes "%2e" after one decoding
    (b"/%25u002e", R.DOUBLE_ENCODING),
    # parameters
    (b"/..;/", R.SEMICOLON),
    (b"/a;jsessionid=1", R.SEMICOLON),
    (b"/a/..;x/b", R.SEMICOLON),
    # segments that become dot segments for a lenient backend
    (b"/..%20", R.DOT_WHITESPACE),
    (b"/a/..%20/b", R.DOT_WHITESPACE),
    (b"/a/%20../b", R.DOT_WHITESPACE),
    (b"/a/.%20./b", R.DOT_WHITESPACE),
    (b"/a/%20.%20/b", R.DOT_WHITESPACE),
    (b"/a/+..+/b", R.DOT_WHITESPACE),
    (b"/a/..%2B/b", R.DOT_WHITESPACE),
    (b"/a/.../b", R.DOT_WHITESPACE),
    (b"/a/.%2e./b", R.DOT_WHITESPACE),
    (b"/a/.%09./b", R.ENCODED_CONTROL),
    (b"/a/..%3F/b", R.DOT_WHITESPACE),
    (b"/a/..%23/b", R.DOT_WHITESPACE),
    (b"/a/x..%20", b"/a/x..%20"),
    # raw bytes outside the path alphabet
    (b"/a\\b", R.RAW_BACKSLASH),
    (b"/..\\", R.RAW_BACKSLASH),
    ("/caf\u00e9".encode(), R.NON_ASCII),
    ("/\uff0e\uff0e/".encode(), R.NON_ASCII),
    (b"/a b", R.RAW_CONTROL),
    (b"/a\tb", R.RAW_CONTROL),
    (b"/a\x00", R.RAW_CONTROL),
    (b"/a\x7f", R.RAW_CONTROL),
    (b"/a\r\nHost: x", R.RAW_CONTROL),
    (b'/a"b', R.UNSAFE_CHARACTER),
    (b"/a<b>", R.UNSAFE_CHARACTER),
    (b"/a{b}", R.UNSAFE_CHARACTER),
    (b"/a|b", R.UNSAFE_CHARACTER),
    (b"/a^b", R.UNSAFE_CHARACTER),
    (b"/a`b", R.UNSAFE_CHARACTER),
    (b"/a[b]", R.UNSAFE_CHARACTER),
    (b"/a?b", R.UNSAFE_CHARACTER),
    (b"/a\\b|", R.UNSAFE_CHARACTER),  # the fixed refusal wins over the one a rule may lift
    (b"/a#b", R.FRAGMENT),
    (b"/a b#", R.FRAGMENT),
    # not origin-form
    (b"", R.BAD_TARGET),
    (b"a/b", R.BAD_TARGET),
    (b"*", R.BAD_TARGET),
    # case is kept: matching is case-sensitive
    (b"/API/1/devices", b"/API/1/devices"),
]


@pytest.mark.parametrize(("path", "expected"), CANONICAL)
def test_canonicalize_strict(path: bytes, expected: bytes | Refusal) -> None:
    if isinstance(expected, Refusal):
        with pytest.raises(PathRefused) as refused:
            canonicalize(path)
        assert refused.value.refusal is expected
    else:
        assert canonicalize(path) == expected
        assert canonicalize(expected) == expected


# --- canonicalize with opt-outs ----------------------------------------------------------------

OPTED_OUT: list[tuple[bytes, frozenset[Refusal], bytes | Refusal]] = [
    (b"/a;b", frozenset({R.SEMICOLON}), b"/a;b"),
    (b"/a;jsessionid=1/b", frozenset({R.SEMICOLON}), b"/a;jsessionid=1/b"),
    (b"/a/..;/b", frozenset({R.SEMICOLON}), R.DOT_WHITESPACE),
    (b"/a/;x/b", frozenset({R.SEMICOLON}), b"/a/;x/b"),
    (b"/a%2fb", frozenset({R.ENCODED_SLASH}), b"/a%2Fb"),
    (b"/a%2Fb/../c", frozenset({R.ENCODED_SLASH}), b"/c"),  # %2F is no separator here
    (b"/a/..%2fb", frozenset({R.ENCODED_SLASH}), R.DOT_WHITESPACE),
    (b"/a%5cb", frozenset({R.ENCODED_BACKSLASH}), b"/a%5Cb"),
    (b"/a/..%5c", frozenset({R.ENCODED_BACKSLASH}), R.DOT_WHITESPACE),
    (b"/a\\b", frozenset({R.RAW_BACKSLASH}), b"/a\\b"),
    (b"/a/..\\b", frozenset({R.RAW_BACKSLASH}), R.DOT_WHITESPACE),
    (b"/a%00b", frozenset({R.ENCODED_CONTROL}), b"/a%00b"),
    (b"/a/.%09./b", frozenset({R.ENCODED_CONTROL}), R.DOT_WHITESPACE),
    (b"/a/..%00.txt", frozenset({R.ENCODED_CONTROL}), R.DOT_WHITESPACE),
    (b"/a/%e4%b8%ad", frozenset({R.ENCODED_NON_ASCII}), b"/a/%E4%B8%AD"),
    (b"/a/%ef%bc%8e%ef%bc%8e/b", frozenset({R.ENCODED_NON_ASCII}), R.DOT_WHITESPACE),
    (b"/a/%e2%80%a5/b", frozenset({R.ENCODED_NON_ASCII}), R.DOT_WHITESPACE),  # two-dot leader
    (b"/a/..%ef%bc%8fb", frozenset({R.ENCODED_NON_ASCII}), R.DOT_WHITESPACE),  # fullwidth /
    (b"/a/%c0%ae%c0%ae/b", frozenset({R.ENCODED_NON_ASCII}), R.DOT_WHITESPACE),
    (b"/a/..%c2%a0/b", frozenset({R.ENCODED_NON_ASCII}), R.DOT_WHITESPACE),  # no-break space
    (b"/a/%zz", frozenset({R.MALFORMED_ESCAPE}), b"/a/%25zz"),
    (b"/a/b%", frozenset({R.MALFORMED_ESCAPE}), b"/a/b%25"),
    (b"/a/%%32e", frozenset({R.MALFORMED_ESCAPE}), R.DOUBLE_ENCODING),
    (b"/a/%uFF0E", frozenset({R.MALFORMED_ESCAPE}), R.DOUBLE_ENCODING),
    (b"/a/%uFF0E", frozenset({R.MALFORMED_ESCAPE, R.DOUBLE_ENCODING}), R.DOT_WHITESPACE),
    (b"/a/x%2541", frozenset({R.DOUBLE_ENCODING}), b"/a/x%2541"),
    (b"/a/x.%252e", frozenset({R.DOUBLE_ENCODING}), b"/a/x.%252e"),
    (b"/a/%252e", frozenset({R.DOUBLE_ENCODING}), R.DOT_WHITESPACE),
    (b"/a/%252e%252E/b", frozenset({R.DOUBLE_ENCODING}), R.DOT_WHITESPACE),
    (b"/a/%2520..", frozenset({R.DOUBLE_ENCODING}), R.DOT_WHITESPACE),
    (b"/a/%25EF%25BC%258E", frozenset({R.DOUBLE_ENCODING}), R.DOT_WHITESPACE),
    # fixed refusals cannot be lifted
    (b"/a/...", FIXED_REFUSALS, R.DOT_WHITESPACE),
    (b"/a/..%2f", OPTABLE, R.DOT_WHITESPACE),
    (b"/..", FIXED_REFUSALS, R.ABOVE_ROOT),
    (b"/a b", FIXED_REFUSALS, R.RAW_CONTROL),
    (b"/a|b", FIXED_REFUSALS, R.UNSAFE_CHARACTER),
    ("/caf\u00e9".encode(), FIXED_REFUSALS, R.NON_ASCII),
    (b"/a#b", FIXED_REFUSALS, R.FRAGMENT),
    (b"a", FIXED_REFUSALS, R.BAD_TARGET),
]


@pytest.mark.parametrize(("path", "allow", "expected"), OPTED_OUT)
def test_canonicalize_opted_out(
    path: bytes, allow: frozenset[Refusal], expected: bytes | Refusal
) -> None:
    if isinstance(expected, Refusal):
        with pytest.raises(PathRefused) as refused:
            canonicalize(path, allow)
        assert refused.value.refusal is expected
    else:
        assert canonicalize(path, allow) == expected
        assert canonicalize(expected, allow) == expected


def test_canonicalize_fast_path_returns_the_same_object() -> None:
    path = b"/api/1/devices/abc123/sessions"
    assert canonicalize(path) is path


# --- the Cobrowse preset, written out ------------------------------------------------------------

F, WS, RW, DENY = Action.FORWARD, Action.WEBSOCKET, Action.REWRITE, Action.DENY

SDK_FALLBACK = Rule("deny", b"", DENY)
SDK = PrefixTable(
    (
        Rule("devices", b"/api/1/devices", F),
        Rule("sessions", b"/api/1/sessions", F),
        Rule("sockets", b"/sockets/1/", WS),
    ),
    SDK_FALLBACK,
)
AGENT_FALLBACK = Rule("spa", b"", RW, rewrite_to=b"/index.html")
AGENT = PrefixTable(
    (
        Rule("api", b"/api/1/", F),
        Rule("proxy", b"/proxy/1/", F),
        Rule("recording", b"/recording/1/", F),
        Rule("sockets", b"/sockets/1/", WS),
        Rule("index", b"/index.html", F),
        Rule("favicon", b"/favicon.png", F),
        Rule("apps", b"/apps/", F),
        Rule("static", b"/static/", F),
    ),
    AGENT_FALLBACK,
)

# target, expected rule name, expected forwarded target
SDK_CASES: list[tuple[bytes, str, bytes]] = [
    (b"/api/1/devices", "devices", b"/api/1/devices"),
    (b"/api/1/devices/", "devices", b"/api/1/devices/"),
    (b"/api/1/devices/x", "devices", b"/api/1/devices/x"),
    (b"/api/1/devices/x/../y?a=1", "devices", b"/api/1/devices/y?a=1"),
    (b"/api/1/sessions/abc", "sessions", b"/api/1/sessions/abc"),
    (b"//api//1//sessions", "sessions", b"/api/1/sessions"),
    (b"/api/1/%64evices", "devices", b"/api/1/devices"),
    (b"/api/1/devices/a%3fb?c%3f", "devices", b"/api/1/devices/a%3Fb?c%3f"),
    (b"/api/1/devices%3f", "deny", b"/api/1/devices%3F"),
    (b"/sockets/1/abc?token=x", "sockets", b"/sockets/1/abc?token=x"),
    (b"/sockets/1/", "sockets", b"/sockets/1/"),
    (b"/sockets/1", "deny", b"/sockets/1"),
    (b"/api/1/devicesX", "deny", b"/api/1/devicesX"),
    (b"/api/1/devices.json", "deny", b"/api/1/devices.json"),
    (b"/API/1/devices", "deny", b"/API/1/devices"),
    (b"/api/1/devices/../admin", "deny", b"/api/1/admin"),
    (b"/api/1/devices/%2e%2e/%2e%2e/admin", "deny", b"/api/admin"),
    (b"/api/1/", "deny", b"/api/1/"),
    (b"/", "deny", b"/"),
    (b"/index.html", "deny", b"/index.html"),
]

AGENT_CASES: list[tuple[bytes, str, bytes]] = [
    (b"/api/1/anything", "api", b"/api/1/anything"),
    (b"/api/1/", "api", b"/api/1/"),
    (b"/api/1/x?a=%2F&b=/../&c", "api", b"/api/1/x?a=%2F&b=/../&c"),
    (b"/api/1/x?", "api", b"/api/1/x?"),
    (b"/api/1/x??a=;b", "api", b"/api/1/x??a=;b"),
    (b"/proxy/1/x", "proxy", b"/proxy/1/x"),
    (b"/recording/1/abc", "recording", b"/recording/1/abc"),
    (b"/sockets/1/x", "sockets", b"/sockets/1/x"),
    (b"/index.html", "index", b"/index.html"),
    (b"/index.html/deep", "index", b"/index.html/deep"),
    (b"/favicon.png", "favicon", b"/favicon.png"),
    (b"/apps/dashboard", "apps", b"/apps/dashboard"),
    (b"/static/js/app.js?v=3", "static", b"/static/js/app.js?v=3"),
    # frontend routes go to the single-page app, query string kept byte for byte
    (b"/apps", "spa", b"/index.html"),
    (b"/dashboard", "spa", b"/index.html"),
    (b"/dashboard?tab=2&x=%zz", "spa", b"/index.html?tab=2&x=%zz"),
    (b"/dashboard?", "spa", b"/index.html?"),
    (b"/", "spa", b"/index.html"),
    (b"/index.htmlx", "spa", b"/index.html"),
    (b"/api/2/x", "spa", b"/index.html"),
    (b"/API/1/x", "spa", b"/index.html"),
    (b"/static/../admin", "spa", b"/index.html"),
]


@pytest.mark.parametrize(("target", "rule", "forwarded"), SDK_CASES)
def test_decide_sdk_preset(target: bytes, rule: str, forwarded: bytes) -> None:
    decision = SDK.decide(target)
    assert decision.refusal is None
    assert decision.rule.name == rule
    assert decision.target == forwarded
    assert decision.authority is None


@pytest.mark.parametrize(("target", "rule", "forwarded"), AGENT_CASES)
def test_decide_agent_preset(target: bytes, rule: str, forwarded: bytes) -> None:
    decision = AGENT.decide(target)
    assert decision.refusal is None
    assert decision.rule.name == rule
    assert decision.target == forwarded


def test_decide_rewrite_keeps_the_classified_path() -> None:
    decision = AGENT.decide(b"/apps/../dashboard/./x?q=1")
    assert decision == Decision(
        rule=AGENT_FALLBACK, target=b"/index.html?q=1", path=b"/dashboard/x"
    )


REFUSED: list[tuple[bytes, Refusal]] = [
    (b"/api/1/devices/..;/admin", R.SEMICOLON),
    (b"/api/1/devices/%2e%2e/%2e%2e/%2e%2e/%2e%2e", R.ABOVE_ROOT),
    (b"/api/1/devices%2f..%2fadmin", R.ENCODED_SLASH),
    (b"/api/1/devices/x#frag", R.FRAGMENT),
    (b"/api/1/devices/x?a=1#frag", R.FRAGMENT),
    (b"/api/1/devices/x?a=#", R.FRAGMENT),
    (b"/api/1/devices/x?a b", R.RAW_CONTROL),
    (b"/api/1/devices/x?a=\x00", R.RAW_CONTROL),
    ("/api/1/devices/x?q=caf\u00e9".encode(), R.NON_ASCII),
    (b"*", R.ASTERISK_FORM),
    (b"", R.BAD_TARGET),
    (b"api/1/devices", R.BAD_TARGET),
    (b"example.com:443", R.BAD_TARGET),
    (b"ftp://example.com/api/1/devices", R.BAD_TARGET),
    (b"http:/api/1/devices", R.BAD_TARGET),
    (b"http:///api/1/devices", R.BAD_TARGET),
    (b"http://user@example.com/api/1/devices", R.BAD_TARGET),
    (b"http://user:pw@example.com/api/1/devices", R.BAD_TARGET),
    (b"http://exa mple.com/api/1/devices", R.BAD_TARGET),
    (b"http://example.com/api/1/devices/../../../..", R.ABOVE_ROOT),
]


@pytest.mark.parametrize(("target", "refusal"), REFUSED)
def test_decide_refused(target: bytes, refusal: Refusal) -> None:
    assert SDK.decide(target) == Decision(rule=SDK_FALLBACK, target=b"", path=b"", refusal=refusal)


ABSOLUTE: list[tuple[bytes, bytes, str, bytes]] = [
    (b"http://example.com/api/1/devices?x=1", b"example.com", "devices", b"/api/1/devices?x=1"),
    (b"HTTPS://cb.example:8443/api/1/devices", b"cb.example:8443", "devices", b"/api/1/devices"),
    (b"hTtP://[::1]:8080//api/1/sessions/", b"[::1]:8080", "sessions", b"/api/1/sessions/"),
    (b"http://example.com", b"example.com", "deny", b"/"),
    (b"http://example.com?x", b"example.com", "deny", b"/?x"),
]


@pytest.mark.parametrize(("target", "authority", "rule", "forwarded"), ABSOLUTE)
def test_decide_absolute_form(target: bytes, authority: bytes, rule: str, forwarded: bytes) -> None:
    decision = SDK.decide(target)
    assert decision.refusal is None
    assert decision.authority == authority
    assert decision.rule.name == rule
    assert decision.target == forwarded


def test_decide_absolute_form_with_empty_path_is_rewritten_with_its_query() -> None:
    decision = AGENT.decide(b"http://agent.example?tab=1")
    assert decision.rule is AGENT_FALLBACK
    assert decision.path == b"/"
    assert decision.target == b"/index.html?tab=1"
    assert decision.authority == b"agent.example"


# --- opt-outs, for the rule's own prefix only --------------------------------------------------

LEGACY = Rule("legacy", b"/legacy/", F, allow=frozenset({R.SEMICOLON}))
FILES = Rule("files", b"/files", F, allow=frozenset({R.ENCODED_SLASH, R.ABOVE_ROOT}))
OPT_OUT = PrefixTable((LEGACY, FILES, Rule("other", b"/other/", F)), SDK_FALLBACK)

OPT_OUT_CASES: list[tuple[bytes, Rule, bytes | Refusal]] = [
    (b"/legacy/a;b", LEGACY, b"/legacy/a;b"),
    (b"/legacy/a;jsessionid=1?x=;", LEGACY, b"/legacy/a;jsessionid=1?x=;"),
    (b"/other/a;b", SDK_FALLBACK, R.SEMICOLON),
    (b"/legacy;x/a", SDK_FALLBACK, R.SEMICOLON),
    (b"/legacy/../other/a;b", SDK_FALLBACK, R.SEMICOLON),
    (b"/legacy/..;/other/", SDK_FALLBACK, R.DOT_WHITESPACE),
    (b"/legacy/a%2Fb", SDK_FALLBACK, R.ENCODED_SLASH),
    (b"/files/a%2fb", FILES, b"/files/a%2Fb"),
    (b"/files/a%2fb;c", SDK_FALLBACK, R.SEMICOLON),
    (b"/files/..%2f..%2fapi", SDK_FALLBACK, R.DOT_WHITESPACE),
    (b"/files/../..", SDK_FALLBACK, R.ABOVE_ROOT),  # fixed: an allow of ABOVE_ROOT is ignored
    (b"/filesX/a%2fb", SDK_FALLBACK, R.ENCODED_SLASH),
]


@pytest.mark.parametrize(("target", "rule", "expected"), OPT_OUT_CASES)
def test_decide_opt_out_only_under_its_prefix(
    target: bytes, rule: Rule, expected: bytes | Refusal
) -> None:
    decision = OPT_OUT.decide(target)
    assert decision.rule is rule
    if isinstance(expected, Refusal):
        assert decision.refusal is expected
        assert decision.target == b""
    else:
        assert decision.refusal is None
        assert decision.target == expected


def test_decide_opt_out_on_the_fallback_applies_to_unmatched_paths() -> None:
    fallback = Rule("spa", b"", RW, rewrite_to=b"/index.html", allow=frozenset({R.SEMICOLON}))
    table = PrefixTable((Rule("api", b"/api/", F),), fallback)
    assert table.decide(b"/app;x?q").target == b"/index.html?q"
    assert table.decide(b"/api/x;y").refusal is R.SEMICOLON


# --- PrefixTable construction and classification -----------------------------------------------


def test_prefix_table_longest_prefix_wins() -> None:
    table = PrefixTable(
        (
            Rule("api", b"/api/", F),
            Rule("devices", b"/api/1/devices", WS),
            Rule("devices-dir", b"/api/1/devices/", DENY),
            Rule("v1", b"/api/1", F),
        ),
        SDK_FALLBACK,
    )
    assert table.classify(b"/api/1/devices/x").name == "devices-dir"
    assert table.classify(b"/api/1/devices").name == "devices"
    assert table.classify(b"/api/1/devicesX").name == "v1"
    assert table.classify(b"/api/1").name == "v1"
    assert table.classify(b"/api/1x").name == "api"
    assert table.classify(b"/api/").name == "api"
    assert table.classify(b"/api").name == "deny"
    assert table.classify(b"/apix/1").name == "deny"


def test_prefix_table_root_prefix_matches_everything_else() -> None:
    root = Rule("root", b"/", F)
    table = PrefixTable((root, Rule("admin", b"/admin/", DENY)), SDK_FALLBACK)
    assert table.classify(b"/") is root
    assert table.classify(b"/x/y") is root
    assert table.classify(b"/admin") is root
    assert table.classify(b"/admin/x").name == "admin"


def test_prefix_table_without_rules_falls_back() -> None:
    table = PrefixTable((), SDK_FALLBACK)
    assert table.decide(b"/x").rule is SDK_FALLBACK


def test_prefix_table_duplicate_prefix_names_both_rules() -> None:
    with pytest.raises(ValueError, match=r"'first' and 'second' have the same prefix '/api/'"):
        PrefixTable((Rule("first", b"/api/", F), Rule("second", b"/api/", DENY)), SDK_FALLBACK)


@pytest.mark.parametrize(
    "prefix", [b"", b"api/", b"/api//x", b"/api/./x", b"/%41pi/", b"/a b/", b"/a;b/"]
)
def test_prefix_table_refuses_a_prefix_that_can_never_match(prefix: bytes) -> None:
    with pytest.raises(ValueError, match="rule 'r'"):
        PrefixTable((Rule("r", prefix, F),), SDK_FALLBACK)


def test_prefix_table_accepts_a_prefix_clean_under_its_own_opt_outs() -> None:
    rule = Rule("r", b"/a;v=1/", F, allow=frozenset({R.SEMICOLON}))
    assert PrefixTable((rule,), SDK_FALLBACK).classify(b"/a;v=1/x") is rule


@pytest.mark.parametrize("rewrite_to", [None, b"index.html", b"/a/../b", b"/index.html?x"])
def test_prefix_table_refuses_a_bad_rewrite_target(rewrite_to: bytes | None) -> None:
    with pytest.raises(ValueError, match="rewrite_to"):
        PrefixTable((), Rule("spa", b"", RW, rewrite_to=rewrite_to))
