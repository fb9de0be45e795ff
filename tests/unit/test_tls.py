"""``tls.py``: contexts built from real files, certificate choice by SNI, and the messages of
``fastproxy check`` for the files it must refuse (verbatim)."""

from __future__ import annotations

import contextlib
import ssl
from pathlib import Path

import pytest
from support.certs import Authority, dns_names, encrypt_key, expired_pair
from support.proxy import to_toml

from fastproxy import cli, tls
from fastproxy.config import Config, parse_config
from fastproxy.errors import ConfigError

SOURCE = "fastproxy.toml"


def config(listener_tls: object = None, upstream_tls: object = None) -> Config:
    upstream: dict[str, object] = {"servers": ["127.0.0.1:8000"]}
    if upstream_tls is not None:
        upstream["tls"] = upstream_tls
    sdk: dict[str, object] = {"bind": "127.0.0.1:8443", "policy": "cobrowse-sdk"}
    if listener_tls is not None:
        sdk["tls"] = listener_tls
    document = {"upstreams": {"cobrowse": upstream}, "listeners": {"sdk": sdk}}
    return parse_config(document, SOURCE)


def build_error(cfg: Config) -> str:
    with pytest.raises(ConfigError) as caught:
        tls.build(cfg)
    return str(caught.value)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return Authority(tmp_path_factory.mktemp("certs"))


def names_of(context: ssl.SSLContext, ca: Authority, server_name: str | None) -> list[str]:
    """Which certificate ``context`` presents to a client sending ``server_name``: the DNS
    names of the leaf, read through a real handshake in memory."""
    client = ssl.create_default_context(cafile=str(ca.ca_file))
    client.check_hostname = False
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client_obj = client.wrap_bio(c_in, c_out, server_hostname=server_name)
    server_obj = context.wrap_bio(s_in, s_out, server_side=True)
    done = {id(client_obj): False, id(server_obj): False}
    for _ in range(10):
        for obj in (client_obj, server_obj):
            if not done[id(obj)]:
                with contextlib.suppress(ssl.SSLWantReadError):
                    obj.do_handshake()
                    done[id(obj)] = True
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    cert = client_obj.getpeercert()
    assert cert, "no handshake"
    return dns_names(cert)


def test_tls_sni_chooses_by_san_names_wildcards_included(ca: Authority) -> None:
    default = ca.issue("default.example")
    exact = ca.issue("api.example", "www.api.example")
    wild = ca.issue("*.apps.example")
    specific = ca.issue("one.apps.example")
    cfg = config(
        {
            **default.table(),
            "certificates": [exact.table(), wild.table(), specific.table()],
        }
    )
    server = tls.build(cfg).listeners["sdk"]
    context = server.context
    assert names_of(context, ca, None) == ["default.example"]
    assert names_of(context, ca, "unknown.example") == ["default.example"]
    assert names_of(context, ca, "WWW.api.example") == ["api.example", "www.api.example"]
    assert names_of(context, ca, "two.apps.example") == ["*.apps.example"]
    # an exact name wins over a wildcard listed before it
    assert names_of(context, ca, "one.apps.example") == ["one.apps.example"]
    # a wildcard covers one label only
    assert names_of(context, ca, "a.b.apps.example") == ["default.example"]
    assert names_of(context, ca, "apps.example") == ["default.example"]


def test_tls_server_context_settings(ca: Authority) -> None:
    pair = ca.issue("sdk.example")
    context = tls.build(config(pair.table())).listeners["sdk"].context
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    tls12 = {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 <= set(tls.INTERMEDIATE_CIPHERS.split(":"))
    assert "ECDHE-RSA-AES128-GCM-SHA256" in tls12
    assert context.options & ssl.OP_NO_RENEGOTIATION
    assert not context.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    strict = tls.build(config({**pair.table(), "min_version": "1.3"})).listeners["sdk"]
    assert strict.context.minimum_version is ssl.TLSVersion.TLSv1_3
    assert strict.handshake_timeout_s == 10.0


def test_tls_upstream_contexts(ca: Authority) -> None:
    client = ca.issue("client.example")
    cfg = config(
        upstream_tls={
            "ca": str(ca.ca_file),
            "server_name": "backend.example",
            **client.table(),
        }
    )
    contexts = tls.build(cfg)
    context = contexts.upstreams[cfg.upstreams["cobrowse"].tls]  # type: ignore[index]
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    assert [c["subject"] for c in context.get_ca_certs()] == [
        c["subject"] for c in ssl.create_default_context(cafile=str(ca.ca_file)).get_ca_certs()
    ]
    tls.install_upstream_contexts(contexts)
    assert tls.for_upstream(cfg.upstreams["cobrowse"], "10.0.0.5") == (context, "backend.example")
    off = config(upstream_tls={"verify": False})
    off_contexts = tls.build(off)
    tls.install_upstream_contexts(off_contexts)
    off_context, name = tls.for_upstream(off.upstreams["cobrowse"], "10.0.0.5")
    assert off_context is not None and off_context.verify_mode is ssl.CERT_NONE
    assert not off_context.check_hostname and name == "10.0.0.5"
    plain = config()
    assert tls.for_upstream(plain.upstreams["cobrowse"], "10.0.0.5") == (None, None)


# -- what fastproxy check refuses ----------------------------------------------------------------


def test_tls_check_key_of_another_certificate(ca: Authority) -> None:
    one, two = ca.issue("one.example"), ca.issue("two.example")
    message = build_error(config({"cert": str(one.cert), "key": str(two.key)}))
    assert message == (
        f"{SOURCE}: listeners.sdk.tls.key: the key does not match the certificate "
        f'"{one.cert}", got "{two.key}"'
    )


def test_tls_check_expired_certificate(tmp_path: Path) -> None:
    pair = expired_pair(tmp_path)
    message = build_error(config(pair.table()))
    assert message == (
        f"{SOURCE}: listeners.sdk.tls.cert: the certificate has expired "
        f'(not after 2020-01-02 03:04:05 UTC), got "{pair.cert}"'
    )


def test_tls_check_unreadable_files(ca: Authority, tmp_path: Path) -> None:
    pair = ca.issue("sdk.example")
    missing = tmp_path / "missing.crt"
    message = build_error(config({"cert": str(missing), "key": str(pair.key)}))
    assert message == (
        f"{SOURCE}: listeners.sdk.tls.cert: cannot read the file: No such file or directory, "
        f'got "{missing}"'
    )
    message = build_error(config({"cert": str(pair.cert), "key": str(tmp_path)}))
    assert message == (
        f'{SOURCE}: listeners.sdk.tls.key: cannot read the file: Is a directory, got "{tmp_path}"'
    )
    garbage = tmp_path / "garbage.crt"
    garbage.write_bytes(b"not a certificate\n")
    message = build_error(config({"cert": str(garbage), "key": str(pair.key)}))
    assert message == f'{SOURCE}: listeners.sdk.tls.cert: not a PEM certificate, got "{garbage}"'
    other = ca.issue("other.example")
    where = "listeners.sdk.tls.certificates[0].cert"
    message = build_error(
        config({**pair.table(), "certificates": [{"cert": str(missing), "key": str(other.key)}]})
    )
    assert message.startswith(f"{SOURCE}: {where}: cannot read the file")


def test_tls_check_encrypted_key_gets_a_message_not_a_prompt(ca: Authority, tmp_path: Path) -> None:
    pair = ca.issue("sdk.example")
    encrypted = encrypt_key(pair.key, tmp_path / "encrypted.key")
    message = build_error(config({"cert": str(pair.cert), "key": str(encrypted)}))
    assert message == (
        f'{SOURCE}: listeners.sdk.tls.key: the key is encrypted with a password, got "{encrypted}"'
        " (fastproxy asks for no password: write it decrypted, e.g. openssl pkey -in KEY -out "
        "KEY.plain, readable by the service user only)"
    )


def test_tls_check_encrypted_key_without_the_pem_marker_is_refused_by_the_callback(
    ca: Authority, tmp_path: Path
) -> None:
    # a traditional encrypted PEM says "Proc-Type: 4,ENCRYPTED"; remove every hint, so only
    # the password callback can tell: it must raise, never prompt
    pair = ca.issue("sdk.example")
    encrypted = encrypt_key(pair.key, tmp_path / "encrypted.key")
    text = encrypted.read_bytes().replace(b"ENCRYPTED PRIVATE KEY", b"PRIVATE KEY")
    disguised = tmp_path / "disguised.key"
    disguised.write_bytes(text)
    message = build_error(config({"cert": str(pair.cert), "key": str(disguised)}))
    assert message.startswith(f"{SOURCE}: listeners.sdk.tls.key: ")
    assert str(disguised) in message


def test_tls_check_upstream_ca_file(tmp_path: Path) -> None:
    missing = tmp_path / "ca.pem"
    message = build_error(config(upstream_tls={"ca": str(missing)}))
    assert message == (
        f"{SOURCE}: upstreams.cobrowse.tls.ca: cannot read the file: No such file or directory, "
        f'got "{missing}"'
    )


def test_tls_fastproxy_check_names_file_key_and_value(
    ca: Authority, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = ca.issue("sdk.example")
    expired = expired_pair(tmp_path)
    document: dict[str, object] = {
        "upstreams": {"cobrowse": {"servers": ["127.0.0.1:8000"]}},
        "listeners": {
            "sdk": {"bind": "127.0.0.1:8443", "policy": "cobrowse-sdk", "tls": good.table()}
        },
    }
    path = tmp_path / "fastproxy.toml"
    path.write_text(to_toml(document))
    assert cli.main(["check", "-c", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: ok (1 listener, 1 upstream)\n"
    listeners = document["listeners"]
    assert isinstance(listeners, dict)
    listeners["sdk"]["tls"] = expired.table()
    path.write_text(to_toml(document))
    assert cli.main(["check", "-c", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}: listeners.sdk.tls.cert: the certificate has expired" in err
    assert f'got "{expired.cert}"' in err
