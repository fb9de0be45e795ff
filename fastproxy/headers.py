"""Request and response header rules of a reverse proxy: framing, Host, hop-by-hop, forwarding.

[pure] Imports only ``errors``-free standard library code: no h11, no asyncio, no clock, no
logging. Both HTTP parsers behind the ``http1`` seam hand their headers to these functions, so the
checks here are fastproxy's own and hold whichever parser runs (SPEC 5).

Theory of operation
-------------------
``inspect_request`` makes one pass over the raw request headers (original case, in order) and
returns a ``RequestInfo``: the framing, the Host, the upgrade tokens and the WebSocket handshake
fields. It raises ``RequestRefused`` for anything a backend could read differently from us:
ambiguous framing, a bad Host, a NUL in a value. Names are compared with ``_`` read as ``-``,
because CGI/WSGI backends fold the two (``Transfer_Encoding`` is a framing header to them).

``upstream_headers`` and ``response_headers`` then build the header lists to send on each leg:
hop-by-hop headers removed (RFC 9110 7.6.1), framing headers replaced by our own, forwarding
headers added. Every other header, custom ones included, passes unchanged, in order and case.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

# RFC 9110 7.6.1 hop-by-hop fields, plus Proxy-Connection (a de facto one) and
# Proxy-Authorization (credentials meant for this hop only).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"content-length",  # framing: re-added from RequestInfo, never copied
    }
)

# Provenance headers (SPEC 5): fields that describe the request as an earlier proxy saw it, or
# that make a backend route or act on something other than the checked request (another path,
# scheme, host, client address, method or an authenticated identity). They are kept only from
# ``trusted_proxies`` and removed from everyone else, on every listener. The rule is by family:
# a namespace prefix a proxy or load balancer owns, or a closed set of names; never a guess at
# words inside a name, because every other custom application header passes untouched. Names
# are compared folded (lower case, ``_`` as ``-``). README "Provenance headers" gives the source
# of each family.
PROVENANCE_PREFIXES: tuple[bytes, ...] = (
    b"x-forwarded-",  # the de facto family (Spring, Tomcat, Rack, gunicorn, Traefik, Envoy XFCC)
    b"x-original-",  # ASP.NET Core, nginx auth_request, ingress-nginx, Azure, IIS
    b"x-rewrite-",  # IIS URL Rewrite (X-Rewrite-URL; Symfony until 2018, Zend)
    b"x-envoy-",  # Envoy's own namespace
    b"x-amzn-",  # AWS ALB: OIDC identity, mTLS client certificate, trace
    b"cloudfront-",  # Amazon CloudFront viewer fields
    b"x-goog-iap-",  # Google IAP: the signed identity
    b"x-goog-authenticated-user-",  # Google IAP: the identity
    b"x-google-",  # App Engine: reserved for Google
    b"x-appengine-",  # App Engine: geo, cron, caller app
    b"x-cloudtasks-",  # Google Cloud Tasks
    b"x-azure-",  # Azure Front Door: client and socket address, Front Door id
    b"x-fd-",  # Azure Front Door: reserved
    b"x-appgw-",  # Azure Application Gateway
    b"x-ms-client-principal",  # Azure App Service authentication: the identity
    b"x-ms-token-",  # Azure App Service authentication: provider tokens
    b"x-arr-",  # IIS Application Request Routing, Azure App Service: TLS, client certificate
    b"cf-",  # Cloudflare, Cloudflare Access identity
    b"fastly-",  # Fastly: client address, TLS
    b"akamai-",  # Akamai
    b"x-akamai-",  # Akamai
    b"ssl-client-",  # Tomcat SSLValve, ingress-nginx, Keycloak: client certificate
    b"x-ssl-client-",  # HAProxy convention: client certificate
    b"x-auth-request-",  # oauth2-proxy: identity
)
PROVENANCE_NAMES = frozenset(
    {
        b"forwarded",  # RFC 7239
        b"x-forwarded",  # an X-Forwarded-For variant (request-ip, django-ipware)
        b"forwarded-for",  # the same
        b"x-real-ip",  # nginx realip, Traefik, Tornado
        b"true-client-ip",  # Akamai, Cloudflare
        b"x-client-ip",  # request-ip
        b"x-cluster-client-ip",  # request-ip
        b"client-ip",  # Rails ActionDispatch::RemoteIp
        b"x-proxyuser-ip",  # client-address detection code
        b"appengine-user-ip",  # request-ip
        b"x-host",  # Apache mod_rpaf
        b"x-scheme",  # Tornado, ingress-nginx, Traefik
        b"x-url-scheme",  # WSGI scheme middleware
        b"front-end-https",  # Microsoft; Plack ReverseProxy
        b"x-script-name",  # SCRIPT_NAME behind a path prefix (Flask recipes)
        b"script-name",  # gunicorn forwarder_headers
        b"path-info",  # gunicorn forwarder_headers
        b"remote-user",  # gunicorn forwarder_headers, Authelia
        b"remote-groups",  # Authelia trusted-header SSO
        b"remote-email",  # Authelia
        b"remote-name",  # Authelia
        b"client-cert",  # RFC 9440
        b"client-cert-chain",  # RFC 9440
        b"ssl-cipher",  # Tomcat SSLValve
        b"ssl-session-id",  # Tomcat SSLValve
        b"ssl-cipher-usekeysize",  # Tomcat SSLValve
        b"x-http-method-override",  # Rack, Symfony, ASP.NET Core, Express
        b"x-http-method",  # MS-ODATA, SharePoint
        b"x-method-override",  # PHP code
        b"x-override-url",  # a URL override of the same kind as X-Original-URL
        b"x-request-id",  # fastproxy sets its own; kept from trusted proxies (and logged)
    }
)
#: the provenance fields fastproxy sets itself (README): rebuilt, never copied as they are
FORWARDING_HEADERS = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"x-request-id"}
)


#: folded names already found to belong to no provenance family: a set lookup instead of a
#: prefix scan for the names a worker sees on every request. Bounded, so a client sending
#: random names cannot grow it; a name outside it is simply scanned.
_PLAIN_NAMES: set[bytes] = set()
_PLAIN_NAMES_MAX = 4096


def is_provenance(folded: bytes) -> bool:
    """Whether a folded header name belongs to a provenance family."""
    return folded in PROVENANCE_NAMES or folded.startswith(PROVENANCE_PREFIXES)


# Connection tokens that must never remove an end-to-end header we rely on.
_PROTECTED = frozenset({b"host", b"content-length", b"x-request-id"}) | FORWARDING_HEADERS

_MAX_REQUEST_ID_BYTES = 128
_DIGITS = b"0123456789"
# RFC 3986 reg-name / IPv4 characters we accept in Host (a positive definition: DNS-ish names,
# underscores for internal names; no userinfo, path, query, whitespace or escapes).
_HOST_NAME_BYTES = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_"
_HOST_V6_BYTES = b"0123456789abcdefABCDEF:."
# Visible ASCII, for request ids we keep.
_VCHAR = bytes(range(0x21, 0x7F))
#: Single bytes looked for in names and values, as ints: ``_NUL in value`` is a memchr, where
#: ``b"\x00" in value`` first tries its operand as an index and builds (and drops) a TypeError,
#: ten times the cost on CPython 3.11, once per header field.
_NUL = 0
_UNDERSCORE = ord("_")


class RequestRefused(Exception):
    """The request is answered by fastproxy itself with ``status`` and the stable ``code``."""

    def __init__(self, status: int, code: str, detail: str = "") -> None:
        self.status = status
        self.code = code
        self.detail = detail
        super().__init__(f"{status} {code}: {detail}" if detail else f"{status} {code}")


@dataclass(slots=True)
class RequestInfo:
    """What one pass over the request headers found."""

    host: bytes | None = None
    content_length: int | None = None
    chunked: bool = False
    #: lower-cased tokens of ``Upgrade``; empty when absent
    upgrade: tuple[bytes, ...] = ()
    #: lower-cased tokens of ``Connection`` (and ``Proxy-Connection``)
    connection: frozenset[bytes] = frozenset()
    ws_key: bytes | None = None
    ws_version: bytes | None = None
    request_id: bytes | None = None
    #: number of ``Sec-WebSocket-Key`` / ``-Version`` headers (each must be exactly one)
    ws_fields: int = 0
    #: ``fold`` of each header name, in order (``upstream_headers`` reuses them)
    folded: list[bytes] = field(default_factory=list)

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


#: RFC 9110 9.1 makes methods case-sensitive tokens, and every registered method is upper case;
#: nginx refuses any other byte (``ngx_http_parse_request_line``: ``A-Z``, ``_`` and ``-``)
_METHOD_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ_-"


def valid_method(method: bytes) -> bool:
    """Whether ``method`` is a method fastproxy accepts: upper-case letters, ``_`` and ``-``.

    A positive rule, so that every method-keyed rule (refused methods, the body guard on GET
    and HEAD, the WebSocket handshake's GET) holds in every spelling: ``trace`` is not TRACE
    here, but Django and Werkzeug upper-case it before they dispatch.
    """
    return bool(method) and not method.translate(None, _METHOD_BYTES)


def fold(name: bytes) -> bytes:
    """The name as backends compare it: lower case, ``_`` read as ``-``."""
    return name.lower().replace(b"_", b"-")


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


#: the (folded) names ``inspect_request`` looks at; any other field is only folded
_INSPECTED = frozenset(
    {
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"proxy-connection",
        b"upgrade",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"x-request-id",
    }
)


def inspect_request(headers: list[tuple[bytes, bytes]]) -> RequestInfo:
    """One pass over raw request headers; raise ``RequestRefused`` on ambiguity."""
    info = RequestInfo()
    hosts = 0
    lengths = 0
    codings: list[bytes] = []
    connection: set[bytes] = set()
    upgrade: list[bytes] = []
    folded_names = info.folded
    for name, value in headers:
        if _NUL in value:
            raise RequestRefused(400, "bad_request", "NUL in a header value")
        folded = name.lower()
        if _UNDERSCORE in folded:
            folded = folded.replace(b"_", b"-")
        folded_names.append(folded)
        if folded not in _INSPECTED:
            continue
        if folded == b"host":
            hosts += 1
            info.host = value
        elif folded == b"content-length":
            lengths += 1
            if name.lower() != b"content-length" or not value or value.strip(_DIGITS):
                raise RequestRefused(400, "bad_request", "malformed Content-Length")
            if len(value) > 18:
                raise RequestRefused(413, "body_too_large", "Content-Length too large")
            info.content_length = int(value)
        elif folded == b"transfer-encoding":
            if name.lower() != b"transfer-encoding":
                raise RequestRefused(400, "bad_request", "underscore spelling of Transfer-Encoding")
            # exactly "chunked": no other coding, no empty list elements (", chunked")
            codings.append(value.strip(b" \t").lower())
        elif folded in (b"connection", b"proxy-connection"):
            connection.update(fold(t) for t in _tokens(value))
        elif folded == b"upgrade":
            upgrade.extend(_tokens(value))
        elif folded == b"sec-websocket-key":
            info.ws_key = value
            info.ws_fields += 1
        elif folded == b"sec-websocket-version":
            info.ws_version = value
            info.ws_fields += 1
        elif folded == b"x-request-id":
            info.request_id = value
    if hosts > 1:
        raise RequestRefused(400, "bad_host", "more than one Host")
    if lengths > 1:
        raise RequestRefused(400, "bad_request", "more than one Content-Length")
    if codings:
        # RFC 9112 6.1/6.3: chunked must be the final coding, and we accept no other coding
        # (a proxy that cannot decode a coding cannot frame the body safely).
        if lengths:
            raise RequestRefused(400, "bad_request", "Content-Length with Transfer-Encoding")
        if codings != [b"chunked"]:
            raise RequestRefused(400, "bad_request", "transfer coding other than chunked")
        info.chunked = True
    if info.host is not None and not valid_authority(info.host):
        raise RequestRefused(400, "bad_host", "Host is not a valid authority")
    info.connection = frozenset(connection)
    info.upgrade = tuple(upgrade)
    return info


def valid_authority(value: bytes) -> bool:
    """RFC 9112 3.2: ``host [":" port]``; no userinfo, path, whitespace or escapes."""
    if not value or len(value) > 255:
        return False
    if value[:1] == b"[":
        end = value.find(b"]")
        if end < 2 or value[1:end].strip(_HOST_V6_BYTES):
            return False
        rest = value[end + 1 :]
        if not rest:
            return True
        if rest[:1] != b":":
            return False
        port = rest[1:]
    else:
        host, sep, port = value.partition(b":")
        if not host or host.strip(_HOST_NAME_BYTES):
            return False
        if not sep:
            return True
    return 0 < len(port) <= 5 and not port.strip(_DIGITS) and int(port) <= 65535


def same_authority(a: bytes, b: bytes, default_port: bytes) -> bool:
    """Whether two authorities name the same origin (case-insensitive, default port implied)."""
    a, b = a.lower(), b.lower()
    if a == b:
        return True
    suffix = b":" + default_port
    return a.removesuffix(suffix) == b.removesuffix(suffix)


def check_websocket_handshake(method: bytes, http_version: bytes, info: RequestInfo) -> None:
    """RFC 6455 4.2.1: the opening handshake a server accepts; raise ``RequestRefused``."""
    bad = "bad_websocket_handshake"
    if method != b"GET" or http_version != b"1.1":
        raise RequestRefused(400, bad, "WebSocket handshake must be GET over HTTP/1.1")
    if info.upgrade != (b"websocket",) or b"upgrade" not in info.connection:
        raise RequestRefused(400, bad, "Upgrade: websocket with Connection: upgrade required")
    if info.ws_fields != 2 or info.ws_version != b"13" or info.ws_key is None:
        raise RequestRefused(400, bad, "one Sec-WebSocket-Key and Sec-WebSocket-Version: 13")
    try:
        raw = base64.b64decode(info.ws_key, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 16:
        raise RequestRefused(400, bad, "Sec-WebSocket-Key is not 16 bytes of base64")
    if info.has_body:
        raise RequestRefused(400, bad, "WebSocket handshake with a body")


def upstream_headers(
    headers: list[tuple[bytes, bytes]],
    info: RequestInfo,
    *,
    host: bytes,
    client_ip: bytes,
    trusted: bool,
    proto: bytes,
    request_id: bytes,
    keep: frozenset[bytes] = frozenset(),
    websocket: bool,
    forwarded: bool,
) -> list[tuple[bytes, bytes]]:
    """The header list to send upstream for an accepted request.

    ``host`` is the Host to send (the client's, or the upstream address for HTTP/1.0 requests
    without one). Framing headers are rebuilt from ``info``. Provenance headers pass only from
    a ``trusted`` peer, or when their folded name is in ``keep``; fastproxy's own forwarding
    headers are then set.
    """
    named = info.connection - _PROTECTED
    out: list[tuple[bytes, bytes]] = [(b"Host", host)]
    prior_xff: list[bytes] = []
    prior_fwd: list[bytes] = []
    folded_names = info.folded
    if len(folded_names) != len(headers):  # an info made from other headers (tests)
        folded_names = [fold(name) for name, _ in headers]
    # a field that passes is the received pair itself (no new tuple per field)
    for pair, folded in zip(headers, folded_names, strict=True):
        if folded in HOP_BY_HOP or folded == b"host" or folded in named:
            continue
        if folded in _PLAIN_NAMES:
            pass
        elif folded in PROVENANCE_NAMES or folded.startswith(PROVENANCE_PREFIXES):
            value = pair[1]
            if folded in FORWARDING_HEADERS:
                if trusted:
                    if folded == b"x-forwarded-for":
                        prior_xff.append(value)
                    elif folded == b"forwarded":
                        prior_fwd.append(value)
                    elif folded != b"x-request-id":  # re-added below, once
                        out.append(pair)
            elif trusted or folded in keep:
                out.append(pair)
            continue
        elif len(_PLAIN_NAMES) < _PLAIN_NAMES_MAX:
            _PLAIN_NAMES.add(folded)
        if websocket and folded == b"sec-websocket-extensions":
            continue  # no compression in the tunnel: frames stay checkable
        out.append(pair)
    if info.content_length is not None:
        out.append((b"Content-Length", b"%d" % info.content_length))
    elif info.chunked:
        out.append((b"Transfer-Encoding", b"chunked"))
    if websocket:
        out.append((b"Connection", b"Upgrade"))
        out.append((b"Upgrade", b"websocket"))
    prior_xff.append(client_ip)
    out.append((b"X-Forwarded-For", b", ".join(prior_xff)))
    if not trusted or not any(fold(n) == b"x-forwarded-proto" for n, _ in out):
        out.append((b"X-Forwarded-Proto", proto))
    if not trusted or not any(fold(n) == b"x-forwarded-host" for n, _ in out):
        out.append((b"X-Forwarded-Host", info.host if info.host is not None else host))
    if forwarded:
        node = b'"[%s]"' % client_ip if client_ip.find(b":") >= 0 else client_ip
        prior_fwd.append(b"for=%s;proto=%s;host=%s" % (node, proto, b'"%s"' % host))
        out.append((b"Forwarded", b", ".join(prior_fwd)))
    out.append((b"X-Request-Id", request_id))
    return out


def trusted_request_id(value: bytes | None) -> bool:
    """Whether an incoming X-Request-Id is safe to keep (visible ASCII, bounded)."""
    return (
        value is not None
        and 0 < len(value) <= _MAX_REQUEST_ID_BYTES
        and not value.translate(None, _VCHAR)
    )


#: response fields never relayed as received (folded names): hop-by-hop and framing (the writer
#: sets its own), and X-Request-Id (fastproxy sets the one it logged)
RESPONSE_DROPPED = HOP_BY_HOP | {b"x-request-id"}
#: lengths of the names in ``RESPONSE_DROPPED``: a name of another length needs no lower-casing
RESPONSE_DROPPED_LENGTHS = frozenset(len(name) for name in RESPONSE_DROPPED)
#: Connection options that name no field
CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b"upgrade"})


def response_headers(
    headers: list[tuple[bytes, bytes]], *, request_id: bytes, keep_upgrade: bool = False
) -> list[tuple[bytes, bytes]]:
    """The header list to relay to the client: hop-by-hop and framing removed, request id added.

    The client leg's writer adds the framing back (Content-Length from the upstream's, or
    chunked), so the relayed head can never carry two framings.
    """
    # One pass; the rare fields named by Connection are filtered afterwards.
    out: list[tuple[bytes, bytes]] = []
    named: set[bytes] = set()
    for name, value in headers:
        folded = name.lower()
        if _UNDERSCORE in folded:
            folded = folded.replace(b"_", b"-")
        if folded in RESPONSE_DROPPED:
            if folded == b"connection":
                named.update(fold(t) for t in _tokens(value))
            elif folded == b"upgrade" and keep_upgrade:
                out.append((b"Upgrade", b"websocket"))
            continue
        out.append((name, value))
    named -= CONNECTION_OPTIONS
    if named:
        out = [(n, v) for n, v in out if fold(n) not in named]
    if keep_upgrade:
        out.append((b"Connection", b"Upgrade"))
    out.append((b"X-Request-Id", request_id))
    return out
