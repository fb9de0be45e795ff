"""The Cobrowse preset end to end (SPEC 2, 4, 5): which requests reach the upstream, as what.

One proxy with the default config serves the whole module (fixture ``preset``); the recording
upstream's records are cleared before each test, so "never reached the upstream" is checked
against what this test sent. Every request goes over a real loopback socket.
"""

from __future__ import annotations

import pytest
from support.client import (
    HttpConnection,
    Response,
    assert_error,
    build_request,
    get,
    host_of,
    http_request,
)
from support.proxy import ProxyFactory, Stack
from support.upstream import RecordingUpstream

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


def _norm(name: bytes) -> bytes:
    # SPEC 5: header names are compared with "_" read as "-" when deciding what to strip
    return name.lower().replace(b"_", b"-")


def _refused(conn: HttpConnection, raw: bytes) -> Response:
    """Send ``raw``, expect a 400 that closes the connection."""
    response = conn.request(raw)
    assert response.status == 400, (response.status, response.body)
    assert conn.wait_closed(), "a 400 must close the connection"
    return response


# -- sdk: the public listener ---------------------------------------------------------------------

SDK_FORWARDED = [
    "/api/1/devices",
    "/api/1/devices/x",
    "/api/1/devices/",
    "/api/1/sessions",
    "/api/1/sessions/abc",
    "/sockets/1/",
    "/sockets/1/abc",
]


@pytest.mark.parametrize("target", SDK_FORWARDED)
def test_sdk_forwards_listed_route_unchanged(preset: Stack, target: str) -> None:
    response = get(preset.proxy.sdk_port, target)
    assert response.status == 200
    assert preset.upstream.targets() == [target.encode()]


SDK_DENIED = [
    "/api/1/devicesX",
    "/api/1/sessionsX/a",
    "/admin",
    "/",
    "/api/1/",
    "/api/1/virtualagents",
    "/API/1/devices",
    "/sockets/1",
    "/index.html",
    "/proxy/1/x",
    "/sdk-js/cobrowse.js",
    "/api/1/devices/../admin",
    "/api/1/devices/%2e%2e/admin",
    "/api/1/devices/%2E%2E/%2e%2E/admin",
    "/api/1/sessions/./../../admin",
]


@pytest.mark.parametrize("target", SDK_DENIED)
def test_sdk_denies_unlisted_route_before_the_upstream(preset: Stack, target: str) -> None:
    response = get(preset.proxy.sdk_port, target)
    assert_error(response, 403, "forbidden")
    assert preset.upstream.requests() == []


def test_sdk_forbidden_keeps_the_connection_usable(preset: Stack) -> None:
    with HttpConnection(preset.proxy.sdk_port) as conn:
        assert_error(conn.get("/admin"), 403, "forbidden")
        assert conn.get("/api/1/devices/after").status == 200
        assert_error(conn.get("/api/1/devicesX"), 403, "forbidden")
        assert conn.get("/api/1/sessions/after").status == 200
    assert preset.upstream.targets() == [b"/api/1/devices/after", b"/api/1/sessions/after"]


# -- agent: the internal listener -----------------------------------------------------------------

AGENT_FORWARDED = [
    "/api/1/anything",
    "/api/1/devices/x",
    "/proxy/1/x",
    "/recording/1/x",
    "/sockets/1/x",
    "/static/app.js",
    "/apps/x",
    "/favicon.png",
    "/index.html",
]


@pytest.mark.parametrize("target", AGENT_FORWARDED)
def test_agent_forwards_listed_route_unchanged(preset: Stack, target: str) -> None:
    response = get(preset.proxy.agent_port, target)
    assert response.status == 200
    assert preset.upstream.targets() == [target.encode()]


AGENT_REWRITTEN = [
    ("/some/page?x=1&y=%2F", "/index.html?x=1&y=%2F"),
    ("/", "/index.html"),
    ("/admin", "/index.html"),
    ("/dashboard/settings?tab=2", "/index.html?tab=2"),
    ("/api/1", "/index.html"),
    ("/api/2/x?q", "/index.html?q"),
    ("/favicon.pngX", "/index.html"),
    ("/static/../admin?a=1", "/index.html?a=1"),
]


@pytest.mark.parametrize(("target", "forwarded"), AGENT_REWRITTEN)
def test_agent_rewrites_frontend_route_to_index_keeping_query(
    preset: Stack, target: str, forwarded: str
) -> None:
    response = get(preset.proxy.agent_port, target)
    assert response.status == 200
    assert preset.upstream.targets() == [forwarded.encode()]


# -- the canonical path is the forwarded path (SPEC 4) --------------------------------------------

CANONICAL = [
    ("/api/1/devices/./x", "/api/1/devices/x"),
    ("//api//1//devices", "/api/1/devices"),
    ("/api/1/%64evices", "/api/1/devices"),
    ("/api/1/devices/%7Euser", "/api/1/devices/~user"),
    ("/api/1/devices/a%3ab", "/api/1/devices/a%3Ab"),
    ("/api/1/sessions/x/../y", "/api/1/sessions/y"),
    ("/api/1/sessions/x/%2e%2E/y", "/api/1/sessions/y"),
]


@pytest.mark.parametrize(("target", "forwarded"), CANONICAL)
def test_sdk_forwards_the_canonical_path_it_checked(
    preset: Stack, target: str, forwarded: str
) -> None:
    response = get(preset.proxy.sdk_port, target)
    assert response.status == 200
    assert preset.upstream.targets() == [forwarded.encode()]


QUERY = "?a=1&a=2&b=%zz&c=/../x&d=%2F&e"


@pytest.mark.parametrize(
    ("listener", "target", "forwarded"),
    [
        ("sdk", "/api/1/devices" + QUERY, "/api/1/devices" + QUERY),
        ("agent", "/api/1/x" + QUERY, "/api/1/x" + QUERY),
        ("agent", "/page" + QUERY, "/index.html" + QUERY),
    ],
)
def test_query_string_forwarded_byte_for_byte(
    preset: Stack, listener: str, target: str, forwarded: str
) -> None:
    response = get(preset.proxy.port(listener), target)
    assert response.status == 200
    assert preset.upstream.targets() == [forwarded.encode()]


REFUSED = [
    ("/api/1/devices%2Fx", "encoded_slash"),
    ("/api/1/devices%2fx", "encoded_slash"),
    ("/api/1/devices/..%2F..%2Fadmin", "encoded_slash"),
    ("/..", "above_root"),
    ("/api/1/../../..", "above_root"),
    ("/api/1/devices;x", "semicolon"),
    ("/api/1/devices/..;/admin", "semicolon"),
    ("/api/1/devices%5Cadmin", "encoded_backslash"),
    ("/api/1/devices\\admin", "raw_backslash"),
    ("/api/1/devices%00", "encoded_control"),
    ("/api/1/devices/%252e%252e/admin", "double_encoding"),
    ("/api/1/devices/%zz", "malformed_escape"),
    ("/api/1/devices/%C3%A9", "encoded_non_ascii"),
    ("/api/1/devices/%EF%BC%8E%EF%BC%8E/admin", "encoded_non_ascii"),
    ("/api/1/devices/..%20/admin", "dot_whitespace"),
    ("/api/1/devices#x", "fragment"),
]


@pytest.mark.parametrize(("target", "code"), REFUSED)
def test_sdk_refuses_unclean_path_with_its_name(preset: Stack, target: str, code: str) -> None:
    port = preset.proxy.sdk_port
    with HttpConnection(port) as conn:
        response = _refused(conn, build_request(target, host=host_of(port)))
    assert_error(response, 400, code)
    assert preset.upstream.requests() == []


@pytest.mark.parametrize(
    ("target", "code"), [("/static/..%2Fadmin", "encoded_slash"), ("/apps/../..", "above_root")]
)
def test_agent_refuses_unclean_path_instead_of_rewriting(
    preset: Stack, target: str, code: str
) -> None:
    port = preset.proxy.agent_port
    with HttpConnection(port) as conn:
        response = _refused(conn, build_request(target, host=host_of(port)))
    assert_error(response, 400, code)
    assert preset.upstream.requests() == []


def test_sdk_refuses_raw_non_ascii_target(preset: Stack) -> None:
    port = preset.proxy.sdk_port
    with HttpConnection(port) as conn:
        response = _refused(conn, build_request(b"/api/1/devices/\xc3\xa9", host=host_of(port)))
    assert_error(response, 400)
    assert preset.upstream.requests() == []


# -- headers (SPEC 2, 5) --------------------------------------------------------------------------

HOP_BY_HOP = [b"x-secret-hop", b"keep-alive", b"proxy-connection", b"te", b"trailer"]
HOP_BY_HOP += [b"proxy-authorization"]


def test_sdk_forwards_custom_headers_and_drops_hop_by_hop(preset: Stack) -> None:
    port = preset.proxy.sdk_port
    response = get(
        port,
        "/api/1/devices",
        headers=[
            ("X_Custom_Header", "a"),
            ("X-Dup", "1"),
            ("x-MiXeD", "v"),
            ("X-Dup", "2"),
            ("Connection", "keep-alive, X-Secret-Hop"),
            ("X-Secret-Hop", "s"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"),
            ("TE", "trailers"),
            ("Trailer", "X-Checksum"),
            ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
            ("Authorization", "Bearer end-to-end"),
        ],
    )
    assert response.status == 200
    [request] = preset.upstream.requests()
    assert (b"X_Custom_Header", b"a") in request.headers
    assert (b"x-MiXeD", b"v") in request.headers
    assert request.header_values("x-dup") == [b"1", b"2"]
    assert request.header_values("authorization") == [b"Bearer end-to-end"]
    names = {_norm(name) for name in request.header_names()}
    assert names.isdisjoint(HOP_BY_HOP), request.headers
    assert all(b"secret-hop" not in value.lower() for value in request.header_values("connection"))


def test_sdk_sets_forwarded_headers_replacing_untrusted_ones(preset: Stack) -> None:
    port = preset.proxy.sdk_port
    response = get(
        port,
        "/api/1/devices",
        headers=[
            ("X-Forwarded-For", "203.0.113.9"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "evil.example"),
        ],
    )
    assert response.status == 200
    [request] = preset.upstream.requests()
    assert request.header_values("x-forwarded-for") == [b"127.0.0.1"]
    assert request.header_values("x-forwarded-proto") == [b"http"]
    assert request.header_values("x-forwarded-host") == [host_of(port).encode()]


def test_request_id_generated_forwarded_and_returned(preset: Stack) -> None:
    response = get(preset.proxy.sdk_port, "/api/1/devices")
    assert response.status == 200
    [request] = preset.upstream.requests()
    [forwarded] = request.header_values("x-request-id")
    assert forwarded
    assert response.header_values("x-request-id") == [forwarded]


def test_request_id_from_untrusted_client_replaced(preset: Stack) -> None:
    response = get(preset.proxy.sdk_port, "/api/1/devices", headers=[("X-Request-Id", "mine")])
    assert response.status == 200
    [request] = preset.upstream.requests()
    [forwarded] = request.header_values("x-request-id")
    assert forwarded not in {b"", b"mine"}
    assert response.header("x-request-id") == forwarded


OVERRIDE_HEADERS = [
    ("X-Original-URL", "/admin"),
    ("X_Original_URL", "/admin"),
    ("X-Rewrite-URL", "/admin"),
    ("X-Override-URL", "/admin"),
    ("X-HTTP-Method-Override", "DELETE"),
    ("X-HTTP-Method", "DELETE"),
    ("X-Method-Override", "DELETE"),
    ("X-Forwarded-Prefix", "/admin"),
    ("X-Original-URI", "/admin"),
    ("X-Envoy-Original-Path", "/admin"),
    ("X-Real-IP", "10.0.0.1"),
    ("X-Amzn-Oidc-Identity", "admin"),
]


def test_sdk_strips_override_headers(preset: Stack) -> None:
    response = get(preset.proxy.sdk_port, "/api/1/devices", headers=OVERRIDE_HEADERS)
    assert response.status == 200
    [request] = preset.upstream.requests()
    stripped = {_norm(name.encode()) for name, _ in OVERRIDE_HEADERS}
    assert stripped.isdisjoint(_norm(name) for name in request.header_names()), request.headers


def test_agent_strips_override_headers_by_default(preset: Stack) -> None:
    # a rewrite fallback does not make X-Original-URL safe: it can name any path
    response = get(preset.proxy.agent_port, "/api/1/x", headers=[("X-Original-URL", "/admin")])
    assert response.status == 200
    [request] = preset.upstream.requests()
    assert request.header_values("x-original-url") == []


def test_provenance_header_kept_when_named(
    proxy: ProxyFactory, upstream: RecordingUpstream
) -> None:
    running = proxy(overrides={"listeners": {"agent": {"keep_headers": ["X-Original-URL"]}}})
    headers = [("X-Original-URL", "/admin"), ("X-Original-URI", "/admin")]
    response = get(running.agent_port, "/api/1/x", headers=headers)
    assert response.status == 200
    [request] = upstream.requests()
    assert request.header_values("x-original-url") == [b"/admin"]
    assert request.header_values("x-original-uri") == []  # only the named one is kept


# -- methods, Host and the target form (SPEC 4, 5) ------------------------------------------------


def test_trace_refused_with_405(preset: Stack) -> None:
    port = preset.proxy.sdk_port
    response = http_request(
        port, build_request("/api/1/devices", host=host_of(port), method="TRACE")
    )
    assert_error(response, 405)
    assert preset.upstream.requests() == []


def test_connect_refused_with_405(preset: Stack) -> None:
    port = preset.proxy.agent_port
    authority = host_of(port)
    response = http_request(port, build_request(authority, host=authority, method="CONNECT"))
    assert_error(response, 405)
    assert preset.upstream.requests() == []


BAD_HOST = [
    pytest.param([("Host", "127.0.0.1"), ("Host", "127.0.0.1")], id="two-hosts"),
    pytest.param([("Host", "a@b")], id="userinfo"),
    pytest.param([("Host", "a b")], id="whitespace"),
    pytest.param([("Host", "a/b")], id="path"),
    pytest.param([], id="missing"),
]


@pytest.mark.parametrize("headers", BAD_HOST)
def test_bad_host_refused(preset: Stack, headers: list[tuple[str, str]]) -> None:
    port = preset.proxy.sdk_port
    with HttpConnection(port) as conn:
        response = _refused(conn, build_request("/api/1/devices", host=None, headers=headers))
    assert_error(response, 400, "bad_host")
    assert preset.upstream.requests() == []


def test_absolute_form_forwarded_as_origin_form(preset: Stack) -> None:
    port = preset.proxy.sdk_port
    target = f"http://{host_of(port)}/api/1/devices?q=1"
    response = http_request(port, build_request(target, host=host_of(port)))
    assert response.status == 200
    assert preset.upstream.targets() == [b"/api/1/devices?q=1"]


def test_absolute_form_checked_like_origin_form(preset: Stack) -> None:
    port = preset.proxy.sdk_port
    target = f"http://{host_of(port)}/api/1/devices/../admin"
    response = http_request(port, build_request(target, host=host_of(port)))
    assert_error(response, 403, "forbidden")
    assert preset.upstream.requests() == []


def test_absolute_form_with_other_host_refused(preset: Stack) -> None:
    port = preset.proxy.sdk_port
    target = f"http://{host_of(port)}/api/1/devices"
    with HttpConnection(port) as conn:
        response = _refused(conn, build_request(target, host="other.example"))
    assert_error(response, 400)
    assert preset.upstream.requests() == []
