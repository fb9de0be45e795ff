"""The https redirect listener (SPEC 2's ``acme`` toggle), end to end: a plain-HTTP listener
whose policy is the preset's ``https-redirect`` answers 308 to https, and forwards ACME HTTP-01
challenges to the upstream when the toggle is on."""

from __future__ import annotations

import pytest
from support.client import HttpConnection, build_request
from support.proxy import ProxyFactory
from support.upstream import RecordingUpstream

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


def test_plain_listener_redirects_to_https_and_forwards_acme_challenges(
    factory: ProxyFactory, upstream: RecordingUpstream
) -> None:
    proxy = factory(
        overrides={
            "listeners": {"http": {"policy": "https-redirect"}},
            "presets": {"cobrowse": {"acme": True}},
        }
    )
    with HttpConnection(proxy.port("http")) as conn:
        moved = conn.request(build_request("/a/./b?x=%41", host="example.com:80"))
        assert moved.status == 308
        assert moved.header("Location") == b"https://example.com/a/b?x=%41"
        # the same connection carries on: a challenge reaches the upstream as it was asked
        token = conn.request(build_request("/.well-known/acme-challenge/t0k3n", host="example.com"))
        assert token.status == 200
        # a POST keeps its method and body through a 308; the body is not read, so the
        # connection ends after the answer
        posted = conn.request(
            build_request("/form", host="example.com", method="POST", body=b"a=1")
        )
        assert posted.status == 308
        assert posted.header("Location") == b"https://example.com/form"
        assert conn.wait_closed()
    assert upstream.targets() == [b"/.well-known/acme-challenge/t0k3n"]
