"""Certificates made at test time: a trustme CA, leaf certificates written as PEM files, and
the broken kinds ``fastproxy check`` must refuse (expired, encrypted key, key of another
certificate), made with ``cryptography``.

Files go into the test's temporary directory; nothing is read from or written to the system.
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Pair:
    """A certificate file (the leaf, then its chain) and its key file."""

    cert: Path
    key: Path

    def table(self) -> dict[str, str]:
        return {"cert": str(self.cert), "key": str(self.key)}


class Authority:
    """A trustme CA that writes the certificates it issues into ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.ca_file = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def issue(self, name: str, *names: str) -> Pair:
        """A certificate for ``name`` and ``names`` (DNS names, wildcards, IP addresses)."""
        leaf = self.ca.issue_cert(name, *names)
        return self.write(leaf, name.replace("*", "star"))

    def write(self, leaf: trustme.LeafCert, stem: str) -> Pair:
        cert = self.directory / f"{stem}.crt"
        key = self.directory / f"{stem}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        return Pair(cert, key)

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this CA (and nothing else)."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.set_alpn_protocols(["http/1.1"])
        return context

    def server_context(self, name: str, *names: str) -> ssl.SSLContext:
        """A server context with a certificate of this CA (the TLS upstream's)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ca.issue_cert(name, *names).configure_cert(context)
        return context


def san_names(sock: ssl.SSLSocket) -> list[str]:
    """The DNS names of the certificate the server presented."""
    cert = sock.getpeercert()
    assert cert is not None
    return dns_names(cert)


def dns_names(cert: Mapping[str, object]) -> list[str]:
    """The DNS names of the subjectAltName of a certificate as ``getpeercert()`` gives it."""
    names = []
    entries = cert.get("subjectAltName", ())
    assert isinstance(entries, tuple)
    for entry in entries:
        assert isinstance(entry, tuple) and len(entry) == 2
        if entry[0] == "DNS":
            names.append(str(entry[1]))
    return names


def expired_pair(directory: Path, name: str = "expired.example") -> Pair:
    """A self-signed certificate that expired on 2020-01-02, with its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime(2019, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(datetime.datetime(2020, 1, 2, 3, 4, 5, tzinfo=datetime.UTC))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    pair = Pair(directory / "expired.crt", directory / "expired.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pair


def encrypt_key(source: Path, target: Path, password: bytes = b"secret") -> Path:
    """``source``'s key written to ``target`` encrypted with ``password`` (PKCS#8)."""
    key = serialization.load_pem_private_key(source.read_bytes(), password=None)
    target.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(password),
        )
    )
    return target
