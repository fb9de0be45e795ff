"""A real browser through both listeners: headless Chromium loads a page, opens a WebSocket on
the page's own origin, and reports the echo with one more request (SPEC 2's routes, as an agent's
browser and an SDK page use them). Chromium comes from the Debian package that ``.ci/run``
installs; it runs as a process of its own, stopped by its process group when the test ends."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from support.certs import Authority
from support.proxy import ProxyFactory
from support.upstream import RecordingUpstream

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

#: where each listener serves the page: the agent's SPA fallback, an allowed sdk API path
PAGES = {"agent": "/cobrowse/?page=ws", "sdk": "/api/1/devices/page?page=ws"}


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "chromium is needed (Debian: apt-get install chromium)"
    return found


@contextlib.contextmanager
def browser(url: str, profile: Path, args: Sequence[str] = ()) -> Iterator[subprocess.Popen[bytes]]:
    """Headless Chromium showing ``url`` until the block ends."""
    argv = [
        chromium(),
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespace for the sandbox
        "--disable-gpu",
        "--disable-dev-shm-usage",  # containers often give /dev/shm 64 MB
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        f"--user-data-dir={profile}",
        *args,
        url,
    ]
    log = (profile.parent / "chromium.log").open("wb")
    process = subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(20)
        log.close()


def wait_for_report(upstream: RecordingUpstream, timeout: float = 60.0) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for request in upstream.requests():
            if request.target.startswith(b"/api/1/devices/report?"):
                return request.target
        time.sleep(0.1)
    raise AssertionError(f"no report from the browser; the upstream saw {upstream.targets()}")


@pytest.mark.parametrize("listener", ["agent", "sdk"])
def test_browser_page_and_websocket_over_http(
    factory: ProxyFactory, upstream: RecordingUpstream, tmp_path: Path, listener: str
) -> None:
    proxy = factory()
    url = f"http://127.0.0.1:{proxy.port(listener)}{PAGES[listener]}"
    with browser(url, tmp_path / "profile"):
        report = wait_for_report(upstream)
    assert report == b"/api/1/devices/report?echo=hello%20from%20http%3A&scheme=http"
    sockets = [r for r in upstream.requests() if r.target.startswith(b"/sockets/1/browser")]
    assert len(sockets) == 1 and sockets[0].header(b"upgrade") == b"websocket"


def spki_hash(cert: Path) -> str:
    """Chromium's pin of a certificate: base64 of the SHA-256 of its SubjectPublicKeyInfo."""
    leaf = x509.load_pem_x509_certificates(cert.read_bytes())[0]
    spki = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.mark.parametrize("listener", ["agent", "sdk"])
def test_browser_page_and_websocket_over_https(
    factory: ProxyFactory, upstream: RecordingUpstream, tmp_path: Path, listener: str
) -> None:
    pair = Authority(tmp_path / "certs").issue("localhost")
    proxy = factory(
        overrides={"listeners": {name: {"tls": pair.table()} for name in ("sdk", "agent")}}
    )
    url = f"https://localhost:{proxy.port(listener)}{PAGES[listener]}"
    # the test CA is not in the browser's store: its leaf key is pinned instead, for this
    # profile only (without the pin the page does not load; the chain and name are checked by
    # the Python and curl tests)
    pin = f"--ignore-certificate-errors-spki-list={spki_hash(pair.cert)}"
    with browser(url, tmp_path / "profile", [pin]):
        report = wait_for_report(upstream)
    assert report == b"/api/1/devices/report?echo=hello%20from%20https%3A&scheme=https"
    [page] = [r for r in upstream.requests() if b"page=ws" in r.target]
    assert page.header(b"x-forwarded-proto") == b"https"
    sockets = [r for r in upstream.requests() if r.target.startswith(b"/sockets/1/browser")]
    assert len(sockets) == 1 and sockets[0].header(b"x-forwarded-proto") == b"https"
