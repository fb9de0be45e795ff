"""TLS: the ``ssl.SSLContext`` objects of one configuration generation, built and checked.

[I/O] Imports ``errors`` and ``config`` (and the standard library's ``ssl``); reads the
certificate and key files and the clock (certificate expiry), never a socket. The master runs
``build`` to validate a configuration (``fastproxy check``, start, SIGHUP) and every worker
runs the very same ``build`` to get the contexts it serves with, so a file that ``check``
accepts is one the workers can load.

Theory of operation
-------------------
A listener with ``tls`` gets a ``ServerTls`` per generation: one server context per certificate,
all with the listener's settings (minimum version, Mozilla's "intermediate" TLS 1.2 ciphers,
OpenSSL's default TLS 1.3 suites, ALPN ``http/1.1`` only, no renegotiation). The first one
serves every handshake; its ``sni_callback`` points the handshake's ``SSLObject`` at the
certificate whose subjectAltName DNS names hold the name the client sent (an exact name before
a wildcard ``*.example.com``, which covers one label; in the order of the file). A reload builds
a new ``ServerTls`` from the files as they are now; the worker hands it to new handshakes only,
so established connections (and their WebSockets) keep the session they made.

An upstream with ``tls`` gets a client context (``client_context``): the system store or the
``ca`` file, hostname check on ``server_name`` or the server's host, unless ``verify = false``;
an optional client certificate. ``install_upstream_contexts`` makes one generation's contexts the
ones ``for_upstream`` hands to ``upstream.py`` when it connects.

Every failure is a ``ConfigError`` naming the file, the key and the value, e.g.
``fastproxy.toml: listeners.sdk.tls.cert: the certificate has expired (not after
2020-01-01 00:00:00 UTC), got "/etc/fastproxy/tls.crt"``. An encrypted key is refused with a
message, never a password prompt.
"""

from __future__ import annotations

import _ssl
import datetime
import os
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from fastproxy.config import CertKey, Config, TlsConfig, UpstreamConfig, UpstreamTls, _toml_string
from fastproxy.errors import ConfigError

#: Mozilla's "intermediate" TLS 1.2 cipher list (Server Side TLS guidelines, version 5.7); the
#: TLS 1.3 suites are OpenSSL's defaults, which ``set_ciphers`` does not touch
INTERMEDIATE_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    )
)
ALPN = ["http/1.1"]
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class _EncryptedKey(Exception):
    """Raised by the password callback: fastproxy never asks for a key's password."""


def _no_password() -> str:
    raise _EncryptedKey


@dataclass(frozen=True, slots=True, eq=False)
class ServerTls:
    """One generation's contexts of one TLS listener."""

    #: the context every handshake starts with (the default certificate)
    context: ssl.SSLContext
    handshake_timeout_s: float
    #: SAN DNS name -> context; wildcard names keyed by what follows ``*.``
    exact: Mapping[str, ssl.SSLContext]
    wildcard: Mapping[str, ssl.SSLContext]
    #: ``(file name, not after as Unix time)`` of each certificate, the default first (metrics)
    not_after: tuple[tuple[str, float], ...] = ()

    def choose(self, server_name: str | None) -> ssl.SSLContext:
        """The context for a client that sent ``server_name`` (None: no SNI)."""
        if server_name:
            name = server_name.lower().rstrip(".")
            found = self.exact.get(name)
            if found is not None:
                return found
            _, dot, parent = name.partition(".")
            if dot:
                found = self.wildcard.get(parent)
                if found is not None:
                    return found
        return self.context

    def _on_sni(
        self, ssl_object: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext
    ) -> None:
        chosen = self.choose(server_name)
        if chosen is not context:
            ssl_object.context = chosen


@dataclass(frozen=True, slots=True, eq=False)
class Contexts:
    """Every context of one configuration generation."""

    #: listener name -> its TLS (listeners without TLS are absent)
    listeners: Mapping[str, ServerTls]
    #: an upstream's TLS settings -> its client context
    upstreams: Mapping[UpstreamTls, ssl.SSLContext]


def build(config: Config, *, now: float | None = None) -> Contexts:
    """Read every certificate, key and CA file of ``config``; raise ``ConfigError`` on the
    first that is unreadable, malformed, encrypted, expired or does not match its key."""
    moment = time.time() if now is None else now
    listeners = {
        name: server_tls(lc.tls, f"listeners.{name}.tls", config.source, now=moment)
        for name, lc in config.listeners.items()
        if lc.tls is not None
    }
    upstreams: dict[UpstreamTls, ssl.SSLContext] = {}
    for name, uc in config.upstreams.items():
        if uc.tls is not None and uc.tls not in upstreams:
            upstreams[uc.tls] = client_context(
                uc.tls, f"upstreams.{name}.tls", config.source, now=moment
            )
    return Contexts(listeners, upstreams)


def server_tls(tls: TlsConfig, where: str, source: str, *, now: float) -> ServerTls:
    """The contexts of one listener's ``tls`` table (``where`` names it in errors)."""
    pairs = [(CertKey(tls.cert, tls.key), where)]
    pairs += [(pair, f"{where}.certificates[{i}]") for i, pair in enumerate(tls.certificates)]
    exact: dict[str, ssl.SSLContext] = {}
    wildcard: dict[str, ssl.SSLContext] = {}
    contexts = []
    expiry: list[tuple[str, float]] = []
    for pair, pair_where in pairs:
        context = _server_context(tls.min_version)
        names = _load_pair(context, pair, pair_where, source, now=now)
        contexts.append(context)
        label = os.path.basename(pair.cert)
        if any(label == seen for seen, _ in expiry):
            label = f"{label}#{len(expiry)}"  # two files of one name in different directories
        expiry.append((label, cert_not_after(pair.cert)))
        for name in names:
            if name.startswith("*."):
                wildcard.setdefault(name[2:], context)
            else:
                exact.setdefault(name, context)
    result = ServerTls(contexts[0], tls.handshake_timeout_s, exact, wildcard, tuple(expiry))
    if len(contexts) > 1:
        # every context carries the callback: OpenSSL calls the one the handshake started
        # with. With one certificate there is nothing to choose, and no Python call per
        # handshake.
        for context in contexts:
            context.sni_callback = result._on_sni
    return result


def _server_context(min_version: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[min_version]
    context.set_ciphers(INTERMEDIATE_CIPHERS)
    context.set_alpn_protocols(ALPN)
    # Mozilla's intermediate profile leaves the choice to the client (its ciphers are all
    # strong); renegotiation is an amplification a client does not need
    context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    return context


def client_context(tls: UpstreamTls, where: str, source: str, *, now: float) -> ssl.SSLContext:
    """The context for connecting to an upstream's servers."""
    if tls.ca is not None:
        _read(tls.ca, f"{where}.ca", source)
        try:
            # the CA file replaces the system store
            context = ssl.create_default_context(cafile=tls.ca)
        except (ssl.SSLError, OSError) as err:
            raise _error(
                f"{where}.ca", f"not a PEM CA file ({_reason(err)})", tls.ca, source
            ) from None
    else:
        context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(ALPN)
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.cert is not None and tls.key is not None:
        _load_pair(context, CertKey(tls.cert, tls.key), where, source, now=now)
    return context


def _load_pair(
    context: ssl.SSLContext, pair: CertKey, where: str, source: str, *, now: float
) -> list[str]:
    """Load ``pair`` into ``context``; return the certificate's subjectAltName DNS names."""
    cert_where, key_where = f"{where}.cert", f"{where}.key"
    cert_text = _read(pair.cert, cert_where, source)
    key_text = _read(pair.key, key_where, source)
    if b"-----BEGIN CERTIFICATE-----" not in cert_text:
        raise _error(cert_where, "not a PEM certificate", pair.cert, source)
    if b"-----BEGIN" not in key_text or b"PRIVATE KEY-----" not in key_text:
        raise _error(key_where, "not a PEM private key", pair.key, source)
    if b"ENCRYPTED" in key_text:
        raise _encrypted(key_where, pair.key, source)
    try:
        # the first certificate of the file, decoded by the ssl module's own (private, long
        # stable) decoder: the standard library has no public one, and no dependency is needed
        decoded = _decode_cert(pair.cert)
    except (ssl.SSLError, OSError) as err:
        raise _error(
            cert_where, f"not a PEM certificate ({_reason(err)})", pair.cert, source
        ) from None
    not_after = ssl.cert_time_to_seconds(decoded["notAfter"])
    if not_after < now:
        when = datetime.datetime.fromtimestamp(not_after, datetime.UTC)
        raise _error(
            cert_where,
            f"the certificate has expired (not after {when:%Y-%m-%d %H:%M:%S} UTC)",
            pair.cert,
            source,
        )
    try:
        context.load_cert_chain(pair.cert, pair.key, password=_no_password)
    except _EncryptedKey:
        raise _encrypted(key_where, pair.key, source) from None
    except (ssl.SSLError, OSError) as err:
        if "KEY_VALUES_MISMATCH" in str(err) or "key values mismatch" in str(err):
            raise _error(
                key_where,
                f"the key does not match the certificate {_toml_string(pair.cert)}",
                pair.key,
                source,
            ) from None
        raise _error(
            key_where, f"cannot load the certificate and key ({_reason(err)})", pair.key, source
        ) from None
    names = [value.lower() for kind, value in decoded.get("subjectAltName", ()) if kind == "DNS"]
    return names


def cert_not_after(path: str) -> float:
    """The Unix time after which the first certificate of ``path`` (checked) is invalid."""
    return float(ssl.cert_time_to_seconds(_decode_cert(path)["notAfter"]))


def _decode_cert(path: str) -> dict[str, Any]:
    decode = cast(Callable[[str], dict[str, Any]], _ssl._test_decode_cert)  # type: ignore[attr-defined]
    return decode(path)


def _read(path: str, where: str, source: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as err:
        raise _error(where, f"cannot read the file: {err.strerror or err}", path, source) from None


def _encrypted(where: str, path: str, source: str) -> ConfigError:
    return ConfigError(
        f"the key is encrypted with a password, got {_toml_string(path)}",
        where=where,
        source=source,
        hint="fastproxy asks for no password: write it decrypted, e.g. "
        "openssl pkey -in KEY -out KEY.plain, readable by the service user only",
    )


def _error(where: str, what: str, path: str, source: str) -> ConfigError:
    return ConfigError(f"{what}, got {_toml_string(path)}", where=where, source=source)


def _reason(err: Exception) -> str:
    if isinstance(err, ssl.SSLError) and err.reason:
        return str(err.reason)
    return str(err.strerror if isinstance(err, OSError) and err.strerror else err)


# -- upstream contexts of the current generation --------------------------------------------------

_upstream_contexts: Mapping[UpstreamTls, ssl.SSLContext] = {}


def install_upstream_contexts(contexts: Contexts) -> None:
    """Make ``contexts`` the generation whose client contexts new upstream connections use.

    Those of earlier generations stay for settings this one does not have: a pool a reload
    retired may still open a connection to retry the request it started.
    """
    global _upstream_contexts
    _upstream_contexts = {**_upstream_contexts, **contexts.upstreams}


def for_upstream(config: UpstreamConfig, host: str) -> tuple[ssl.SSLContext | None, str | None]:
    """``(ssl, server_hostname)`` for ``loop.create_connection`` to a server of ``config``."""
    tls = config.tls
    if tls is None:
        return None, None
    return _upstream_contexts[tls], tls.server_name or host
