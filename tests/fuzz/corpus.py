"""The seed corpus: client byte streams known to break proxies, one per name.

Used as they are by ``test_fuzz.py`` (whole and one byte at a time), as material for the
generators' mutations, and written out by ``python -m tests.fuzz.run --write-corpus DIR`` for
coverage-guided fuzzers.
"""

from __future__ import annotations

import base64

H = b"Host: 127.0.0.1:8080\r\n"
WS = (
    b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: " + base64.b64encode(b"0123456789abcdef") + b"\r\n"
)


def _get(target: bytes, extra: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    return b"GET " + target + b" " + version + b"\r\n" + H + extra + b"\r\n"


SEEDS: dict[str, bytes] = {
    # plain requests on each route kind
    "get_devices": _get(b"/api/1/devices"),
    "get_sessions_query": _get(b"/api/1/sessions/abc?x=1&y=%2F"),
    "agent_spa_route": _get(b"/dashboard/settings?tab=2"),
    "agent_index": _get(b"/index.html"),
    "denied_admin": _get(b"/admin"),
    "post_content_length": b"POST /api/1/devices HTTP/1.1\r\n"
    + H
    + b"Content-Length: 5\r\n\r\nhello",
    "post_chunked": b"POST /api/1/devices HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "chunked_extension_trailer": b"POST /api/1/devices HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
    "http10_no_host": b"GET /api/1/devices HTTP/1.0\r\n\r\n",
    "http10_keepalive": _get(b"/api/1/devices", b"Connection: keep-alive\r\n", b"HTTP/1.0"),
    "leading_empty_lines": b"\r\n\r\n" + _get(b"/api/1/devices"),
    "pipelined_three": _get(b"/api/1/devices") + _get(b"/admin") + _get(b"/api/1/sessions"),
    "pipelined_after_close": _get(b"/api/1/devices", b"Connection: close\r\n")
    + _get(b"/api/1/sessions"),
    "head_request": b"HEAD /api/1/devices HTTP/1.1\r\n" + H + b"\r\n",
    "options_asterisk": b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n",
    "connect": b"CONNECT 127.0.0.1:22 HTTP/1.1\r\n" + H + b"\r\n",
    "trace": b"TRACE /api/1/devices HTTP/1.1\r\n" + H + b"\r\n",
    # request smuggling
    "cl_te": b"POST /api/1/devices HTTP/1.1\r\n"
    + H
    + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
    "te_cl": b"POST /api/1/devices HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
    "te_te_obfuscated": b"POST /api/1/devices HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n0\r\n\r\n",
    "te_underscore": b"POST /api/1/devices HTTP/1.1\r\n"
    + H
    + b"Content-Length: 4\r\nTransfer_Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te_gzip_chunked": b"POST /api/1/devices HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "te_space_before_colon": b"POST /api/1/devices HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "cl_duplicate": b"POST /api/1/devices HTTP/1.1\r\n"
    + H
    + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "cl_list": b"POST /api/1/devices HTTP/1.1\r\n" + H + b"Content-Length: 5, 5\r\n\r\nhello",
    "cl_plus": b"POST /api/1/devices HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nhello",
    "cl_huge": b"POST /api/1/devices HTTP/1.1\r\n"
    + H
    + b"Content-Length: 99999999999999999999\r\n\r\n",
    "chunk_size_overflow": b"POST /api/1/devices HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding: chunked\r\n\r\nfffffffffffffffff1\r\nx\r\n0\r\n\r\n",
    "chunk_size_0x": b"POST /api/1/devices HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
    "chunk_bare_lf": b"POST /api/1/devices HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n",
    "chunk_smuggled_request": b"POST /api/1/devices HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\n"
    + H
    + b"\r\n",
    "bare_lf_head": b"GET /api/1/devices HTTP/1.1\n" + H + b"\n",
    "bare_cr_head": b"GET /api/1/devices HTTP/1.1\r" + H + b"\r\n",
    "obs_fold": b"GET /api/1/devices HTTP/1.1\r\n" + H + b"X-A: a\r\n b\r\n\r\n",
    "obs_fold_te": b"POST /api/1/devices HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
    "nul_in_value": _get(b"/api/1/devices", b"X-A: a\x00b\r\n"),
    "two_hosts": b"GET /api/1/devices HTTP/1.1\r\n" + H + H + b"\r\n",
    "host_userinfo": b"GET /api/1/devices HTTP/1.1\r\nHost: user@h\r\n\r\n",
    # path normalisation bypasses
    "dotdot": _get(b"/api/1/devices/../../admin"),
    "encoded_dotdot": _get(b"/api/1/devices/%2e%2e/%2e%2e/admin"),
    "encoded_slash": _get(b"/api/1/devices%2F..%2F..%2Fadmin"),
    "tomcat_semicolon": _get(b"/api/1/devices/..;/..;/admin"),
    "double_encoding": _get(b"/api/1/devices/%252e%252e/admin"),
    "backslash": _get(b"/api/1/devices\\..\\admin"),
    "fullwidth_dots": _get(b"/api/1/devices/%ef%bc%8e%ef%bc%8e/admin"),
    "overlong_dot": _get(b"/api/1/devices/%c0%ae%c0%ae/admin"),
    "iis_unicode": _get(b"/api/1/devices/%u002e%u002e/admin"),
    "dot_whitespace": _get(b"/api/1/devices/..%20/admin"),
    "merged_slashes": _get(b"//api///1//devices"),
    "above_root": _get(b"/../api/1/devices"),
    "fragment": _get(b"/api/1/devices#x"),
    "absolute_form": _get(b"http://127.0.0.1:8080/api/1/devices?a=1"),
    "absolute_form_other_host": _get(b"http://evil.example/api/1/devices"),
    "absolute_form_no_path": _get(b"http://127.0.0.1:8080?a=/../admin"),
    "agent_rewrite_dotdot": _get(b"/dashboard/../api/2/admin?x"),
    "raw_non_ascii": _get(b"/api/1/devices/\xc3\xa9"),
    "query_with_hash": _get(b"/api/1/devices?a=1#b"),
    # upgrades
    "websocket": _get(b"/sockets/1/x", WS),
    "websocket_elsewhere": _get(b"/api/1/devices", WS),
    "h2c": _get(b"/sockets/1/x", b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"),
    "websocket_then_request": _get(b"/sockets/1/x", WS) + _get(b"/admin"),
    # hop-by-hop and override headers
    "connection_named": _get(b"/api/1/devices", b"Connection: close, X-Secret\r\nX-Secret: 1\r\n"),
    "override_header": _get(b"/api/1/devices", b"X-Original-URL: /admin\r\nX_Rewrite_URL: /\r\n"),
    # limits
    "head_at_limit": _get(b"/api/1/devices", b"X-Pad: " + b"p" * (16 * 1024 - 70) + b"\r\n"),
    "head_over_limit": _get(b"/api/1/devices", b"X-Pad: " + b"p" * (16 * 1024) + b"\r\n"),
    "uri_over_limit": _get(b"/api/1/devices?" + b"q" * (8 * 1024)),
    "no_end_of_line": b"GET /" + b"a" * (20 * 1024),
    "many_headers": _get(b"/api/1/devices", b"".join(b"X-%d: v\r\n" % n for n in range(101))),
}
