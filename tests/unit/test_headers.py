"""Header rules: framing ambiguity, Host, hop-by-hop removal, forwarding headers."""

from __future__ import annotations

import pytest

from fastproxy.headers import (
    RequestInfo,
    RequestRefused,
    check_websocket_handshake,
    fold,
    inspect_request,
    is_provenance,
    response_headers,
    same_authority,
    trusted_request_id,
    upstream_headers,
    valid_authority,
    valid_method,
)

H = list[tuple[bytes, bytes]]


def _forward(headers: H, *, trusted: bool = False, keep: frozenset[bytes] = frozenset()) -> H:
    info = inspect_request(headers)
    return upstream_headers(
        headers,
        info,
        host=info.host or b"up:80",
        client_ip=b"192.0.2.7",
        trusted=trusted,
        proto=b"http",
        request_id=b"rid1",
        keep=keep,
        websocket=False,
        forwarded=False,
    )


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        (
            [(b"Host", b"a"), (b"Content-Length", b"3"), (b"Transfer-Encoding", b"chunked")],
            400,
            "bad_request",
        ),
        (
            [(b"Host", b"a"), (b"Content-Length", b"3"), (b"Transfer_Encoding", b"chunked")],
            400,
            "bad_request",
        ),
        (
            [(b"Host", b"a"), (b"Content-Length", b"3"), (b"Content-Length", b"3")],
            400,
            "bad_request",
        ),
        ([(b"Host", b"a"), (b"Content-Length", b"3, 3")], 400, "bad_request"),
        ([(b"Host", b"a"), (b"Content-Length", b"+3")], 400, "bad_request"),
        ([(b"Host", b"a"), (b"Content_Length", b"3")], 400, "bad_request"),
        ([(b"Host", b"a"), (b"Transfer-Encoding", b"gzip, chunked")], 400, "bad_request"),
        ([(b"Host", b"a"), (b"Transfer-Encoding", b"chunked, identity")], 400, "bad_request"),
        (
            [
                (b"Host", b"a"),
                (b"Transfer-Encoding", b"chunked"),
                (b"Transfer-Encoding", b"chunked"),
            ],
            400,
            "bad_request",
        ),
        ([(b"Host", b"a"), (b"Host", b"b")], 400, "bad_host"),
        ([(b"Host", b"user@a")], 400, "bad_host"),
        ([(b"Host", b"a b")], 400, "bad_host"),
        ([(b"Host", b"a/b")], 400, "bad_host"),
        ([(b"Host", b"a:99999")], 400, "bad_host"),
        ([(b"Host", b"")], 400, "bad_host"),
        ([(b"Host", b"a"), (b"X", b"a\x00b")], 400, "bad_request"),
        ([(b"Host", b"a"), (b"Content-Length", b"9" * 30)], 413, "body_too_large"),
    ],
)
def test_inspect_request_refuses_ambiguity(headers: H, status: int, code: str) -> None:
    with pytest.raises(RequestRefused) as caught:
        inspect_request(headers)
    assert (caught.value.status, caught.value.code) == (status, code)


def test_inspect_request_reads_framing_and_upgrade() -> None:
    info = inspect_request(
        [
            (b"host", b"Example.com:8080"),
            (b"transfer-encoding", b"Chunked"),
            (b"Connection", b"keep-alive, Upgrade"),
            (b"Upgrade", b"WebSocket"),
        ]
    )
    assert info.chunked and info.content_length is None and info.has_body
    assert info.host == b"Example.com:8080"
    assert info.upgrade == (b"websocket",)
    assert info.connection == frozenset({b"keep-alive", b"upgrade"})


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (b"example.com", True),
        (b"example.com:8443", True),
        (b"127.0.0.1:80", True),
        (b"[::1]:8080", True),
        (b"[::1]", True),
        (b"internal_host", True),
        (b"a@b", False),
        (b"a:", False),
        (b"a:8a", False),
        (b"[::1", False),
        (b"[::1]x", False),
        (b"a%2fb", False),
        (b"a\tb", False),
        (b"a?b", False),
        (b"a#b", False),
        (b"a\\b", False),
    ],
)
def test_valid_authority_positive_definition(value: bytes, ok: bool) -> None:
    assert valid_authority(value) is ok


def test_same_authority_default_port_and_case() -> None:
    assert same_authority(b"Example.COM", b"example.com:80", b"80")
    assert not same_authority(b"example.com:8080", b"example.com", b"80")
    assert not same_authority(b"a.example", b"b.example", b"80")


def test_upstream_headers_keeps_custom_headers_in_order_and_case() -> None:
    out = _forward(
        [
            (b"Host", b"a"),
            (b"X_Custom_Header", b"1"),
            (b"X-Dup", b"1"),
            (b"x-MiXeD", b"v"),
            (b"X-Dup", b"2"),
        ]
    )
    kept = [(n, v) for n, v in out if n not in (b"Host",) and not n.startswith(b"X-Forwarded")]
    assert kept[:4] == [
        (b"X_Custom_Header", b"1"),
        (b"X-Dup", b"1"),
        (b"x-MiXeD", b"v"),
        (b"X-Dup", b"2"),
    ]
    assert out[0] == (b"Host", b"a")


def test_upstream_headers_removes_hop_by_hop_and_connection_named() -> None:
    out = _forward(
        [
            (b"Host", b"a"),
            (b"Connection", b"keep-alive, X-Secret-Hop, Host, X-Forwarded-For"),
            (b"X-Secret-Hop", b"1"),
            (b"X_Secret_Hop", b"1"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Proxy-Connection", b"keep-alive"),
            (b"TE", b"trailers"),
            (b"Trailer", b"X"),
            (b"Proxy-Authorization", b"Basic x"),
            (b"Upgrade", b"foo"),
        ]
    )
    names = {n.lower() for n, _ in out}
    assert names.isdisjoint(
        {
            b"connection",
            b"x-secret-hop",
            b"x_secret_hop",
            b"keep-alive",
            b"proxy-connection",
            b"te",
            b"trailer",
            b"proxy-authorization",
            b"upgrade",
        }
    )
    assert (b"Host", b"a") in out
    assert (b"X-Forwarded-For", b"192.0.2.7") in out


def test_upstream_headers_replaces_untrusted_forwarding_headers() -> None:
    incoming = [
        (b"Host", b"a"),
        (b"X-Forwarded-For", b"10.9.9.9"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Request-Id", b"evil"),
    ]
    out = _forward(incoming)
    assert (b"X-Forwarded-For", b"192.0.2.7") in out
    assert (b"X-Forwarded-Proto", b"http") in out
    assert (b"X-Forwarded-Host", b"a") in out
    assert [v for n, v in out if n == b"X-Request-Id"] == [b"rid1"]
    trusted = _forward(incoming, trusted=True)
    assert (b"X-Forwarded-For", b"10.9.9.9, 192.0.2.7") in trusted
    assert (b"X-Forwarded-Proto", b"https") in trusted


@pytest.mark.parametrize(
    "name",
    [
        b"X-Original-URL",
        b"X_Original_URL",
        b"x-rewrite-url",
        b"X-HTTP-Method-Override",
        b"X_HTTP_Method",
        b"X-Method-Override",
        b"X-Override-URL",
    ],
)
def test_upstream_headers_strips_override_headers(name: bytes) -> None:
    headers = [(b"Host", b"a"), (name, b"/admin")]
    assert name not in {n for n, _ in _forward(headers)}
    assert name in {n for n, _ in _forward(headers, trusted=True)}
    assert name in {n for n, _ in _forward(headers, keep=frozenset({fold(name)}))}


@pytest.mark.parametrize(
    "name",
    [
        b"X-Forwarded-Prefix",  # Spring ForwardedHeaderFilter, ASP.NET, Werkzeug ProxyFix
        b"X_Forwarded_Prefix",
        b"x-forwarded-uri",  # Traefik
        b"X-Original-URI",  # nginx auth_request setups
        b"X-Original-Host",  # ASP.NET ForwardedHeaders
        b"X-Envoy-Original-Path",
        b"X-Amzn-Oidc-Identity",  # AWS ALB
        b"X-Goog-Authenticated-User-Email",  # Google IAP
        b"X-MS-CLIENT-PRINCIPAL-NAME",  # Azure App Service
        b"CF-Connecting-IP",
        b"Fastly-Client-IP",
        b"Forwarded",
        b"X-Real-IP",
        b"X-Script-Name",
        b"X-Forwarded",
        b"Remote-User",
        b"SSL_Client_Cert",
    ],
)
def test_upstream_headers_remove_provenance_families(name: bytes) -> None:
    assert is_provenance(fold(name))
    headers = [(b"Host", b"a"), (name, b"/admin")]
    out = _forward(headers)
    assert all(n != name for n, _ in out)
    assert (name, b"/admin") in _forward(headers, trusted=True) or fold(name) == b"forwarded"


@pytest.mark.parametrize(
    "name",
    [
        b"X-Custom_Header",
        b"X-Forwardable",  # no family member: the prefix is "x-forwarded-"
        b"X-Goog-Api-Key",  # Google API clients send it; only IAP's names are provenance
        b"X-Amz-Date",  # SigV4 clients send it; only "x-amzn-" is AWS's proxy namespace
        b"X-Original",
        b"X-Cobrowse-Device",
        b"Cookie",
        b"X-Requested-With",
        b"X-MS-Version",  # Azure's own API headers are not provenance
        b"traceparent",
        b"Via",
    ],
)
def test_upstream_headers_pass_application_headers(name: bytes) -> None:
    assert not is_provenance(fold(name))
    out = _forward([(b"Host", b"a"), (name, b"v"), (name, b"w")])
    assert [v for n, v in out if n == name] == [b"v", b"w"]


@pytest.mark.parametrize(
    ("method", "valid"),
    [
        (b"GET", True),
        (b"M-SEARCH", True),
        (b"VERSION-CONTROL", True),
        (b"X_CUSTOM", True),
        (b"get", False),
        (b"Trace", False),
        (b"tRACE", False),
        (b"GET1", False),
        (b"G.ET", False),
        (b"", False),
    ],
)
def test_valid_method_is_upper_case_letters(method: bytes, valid: bool) -> None:
    assert valid_method(method) is valid


def test_upstream_headers_reframes_body() -> None:
    out = _forward([(b"Host", b"a"), (b"transfer-encoding", b"chunked")])
    assert (b"Transfer-Encoding", b"chunked") in out
    out = _forward([(b"Host", b"a"), (b"content-length", b"12")])
    assert (b"Content-Length", b"12") in out


def _ws_info(**changes: object) -> RequestInfo:
    info = inspect_request(
        [
            (b"Host", b"a"),
            (b"Upgrade", b"websocket"),
            (b"Connection", b"Upgrade"),
            (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
            (b"Sec-WebSocket-Version", b"13"),
        ]
    )
    for key, value in changes.items():
        setattr(info, key, value)
    return info


def test_check_websocket_handshake_accepts_rfc_example() -> None:
    check_websocket_handshake(b"GET", b"1.1", _ws_info())


@pytest.mark.parametrize(
    ("method", "version", "changes"),
    [
        (b"POST", b"1.1", {}),
        (b"GET", b"1.0", {}),
        (b"GET", b"1.1", {"ws_version": b"8"}),
        (b"GET", b"1.1", {"ws_key": b"short"}),
        (b"GET", b"1.1", {"ws_key": None, "ws_fields": 1}),
        (b"GET", b"1.1", {"connection": frozenset({b"keep-alive"})}),
        (b"GET", b"1.1", {"content_length": 5}),
    ],
)
def test_check_websocket_handshake_refuses_malformed(
    method: bytes, version: bytes, changes: dict[str, object]
) -> None:
    with pytest.raises(RequestRefused) as caught:
        check_websocket_handshake(method, version, _ws_info(**changes))
    assert caught.value.code == "bad_websocket_handshake"


def test_response_headers_strip_hop_by_hop_and_set_request_id() -> None:
    out = response_headers(
        [
            (b"Content-Length", b"3"),
            (b"Connection", b"close, X-Internal"),
            (b"X-Internal", b"1"),
            (b"Transfer-Encoding", b"chunked"),
            (b"X-Request-Id", b"upstream-id"),
            (b"Set-Cookie", b"a=1"),
        ],
        request_id=b"rid",
    )
    # framing is the client leg's writer's job: neither framing field is relayed as is
    assert out == [(b"Set-Cookie", b"a=1"), (b"X-Request-Id", b"rid")]


def test_response_headers_fold_connection_tokens() -> None:
    out = response_headers(
        [(b"ETag", b"x"), (b"Connection", b"x_internal"), (b"X-Internal", b"1")],
        request_id=b"rid",
    )
    assert out == [(b"ETag", b"x"), (b"X-Request-Id", b"rid")]


def test_upstream_headers_fold_connection_tokens_and_drop_client_address_headers() -> None:
    out = _forward(
        [
            (b"Host", b"a"),
            (b"Connection", b"x_secret"),
            (b"X_Secret", b"1"),
            (b"X-Real-IP", b"10.0.0.1"),
            (b"True-Client-IP", b"10.0.0.1"),
        ]
    )
    names = {n.lower() for n, _ in out}
    assert names.isdisjoint({b"x_secret", b"x-real-ip", b"true-client-ip"})
    trusted = _forward([(b"Host", b"a"), (b"X-Real-IP", b"10.0.0.1")], trusted=True)
    assert (b"X-Real-IP", b"10.0.0.1") in trusted


def test_trusted_request_id_bounds() -> None:
    assert trusted_request_id(b"abc-123")
    assert not trusted_request_id(b"a b")
    assert not trusted_request_id(b"x" * 129)
    assert not trusted_request_id(None)
