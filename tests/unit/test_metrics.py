"""``metrics``: the bounded labels, and what a worker publishes is what the scrape shows.

The publishing test runs in a child process: prometheus-client picks its storage (multiprocess
files or not) when first imported, and this process may have imported it already.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support.proxy import REPO_ROOT

import fastproxy
from fastproxy import __version__, metrics


def test_status_class_is_bounded() -> None:
    assert [metrics.status_class(s) for s in (101, 200, 304, 404, 503)] == [
        "1xx",
        "2xx",
        "3xx",
        "4xx",
        "5xx",
    ]
    assert metrics.status_class(0) == "other"
    assert metrics.status_class(999) == "other"


def test_close_code_label_is_bounded_to_the_registry() -> None:
    assert metrics.close_code_label(1000) == "1000"
    assert metrics.close_code_label(1015) == "1015"
    assert metrics.close_code_label(1004) == "other"  # reserved, never sent
    assert metrics.close_code_label(4000) == "other"  # application codes: unbounded
    assert metrics.close_code_label(65535) == "other"


CHILD = """
import json, os, sys
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
from fastproxy import __version__, metrics
m = metrics.WorkerMetrics()
for duration in (0.0005, 0.001, 0.003, 0.3, 100.0):
    m.request_done("sdk", "api", "forward", 200, duration, "origin", duration / 2)
m.request_done("sdk", "-", "reject", 400, 0.0, "", -1.0)
m.websocket_ended("sdk", 42.0)
m.publish([("sdk", 100, 2000)])
m.publish([("sdk", 0, 0)])  # nothing new: nothing added twice
m.request_done("sdk", "api", "forward", 204, 0.02, "origin", 0.01)
m.publish([("sdk", 1, 0)])
# another worker's file, created but not sized yet: a scrape at that instant reads around it
open(os.path.join(sys.argv[1], "counter_99999.db"), "wb").close()
print(json.dumps(metrics.render(certificates=[("tls", "a.crt", 1.5e9)], parser="h11").decode()))
"""


def test_published_counts_are_what_the_scrape_shows(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
        check=True,
    )
    lines = set(json.loads(result.stdout).splitlines())
    duration = 'fastproxy_request_duration_seconds_bucket{le="%s",listener="sdk",rule="api"} %s'
    for bound, count in [
        ("0.0001", "0.0"),
        ("0.00025", "0.0"),
        ("0.0005", "1.0"),  # le: the bound itself counts
        ("0.001", "2.0"),
        ("0.0025", "2.0"),
        ("0.005", "3.0"),
        ("0.025", "4.0"),
        ("0.25", "4.0"),
        ("0.5", "5.0"),
        ("60.0", "5.0"),
        ("+Inf", "6.0"),
    ]:
        assert duration % (bound, count) in lines, (bound, sorted(lines))
    assert 'fastproxy_request_duration_seconds_count{listener="sdk",rule="api"} 6.0' in lines
    assert any(
        line.startswith('fastproxy_request_duration_seconds_sum{listener="sdk",rule="api"} 100.32')
        for line in lines
    )
    requests = 'fastproxy_requests_total{decision="%s",listener="sdk",rule="%s",status_class="%s"}'
    assert requests % ("forward", "api", "2xx") + " 6.0" in lines
    assert requests % ("reject", "-", "4xx") + " 1.0" in lines
    assert 'fastproxy_upstream_response_seconds_count{upstream="origin"} 6.0' in lines
    assert 'fastproxy_upstream_response_seconds_bucket{le="0.001",upstream="origin"} 2.0' in lines
    assert 'fastproxy_received_bytes_total{listener="sdk"} 101.0' in lines
    assert 'fastproxy_sent_bytes_total{listener="sdk"} 2000.0' in lines
    assert 'fastproxy_websocket_duration_seconds_bucket{le="60.0",listener="sdk"} 1.0' in lines
    assert 'fastproxy_websocket_duration_seconds_bucket{le="10.0",listener="sdk"} 0.0' in lines
    expiry = 'fastproxy_tls_certificate_not_after_seconds{cert="a.crt",listener="tls"}'
    assert expiry + " 1.5e+09" in lines
    python = "{}.{}.{}".format(*sys.version_info[:3])
    version = __version__
    kind = fastproxy.BUILD.kind
    build = (
        f'fastproxy_build_info{{build="{kind}",parser="h11",python="{python}",version="{version}"}}'
    )
    assert build + " 1.0" in lines
