"""Prometheus metrics, aggregated across workers in one scrape.

Imports ``errors`` only (and prometheus-client, lazily). Metric names start with ``fastproxy_``,
use base units, and carry bounded labels only: listener, rule name, decision, status class,
upstream, error kind, close code. Never a raw path.

Theory of operation
-------------------
prometheus-client's multiprocess mode: every worker writes its values to memory-mapped files in
``PROMETHEUS_MULTIPROC_DIR`` and the admin listener, served by whichever worker accepts the
scrape, sums them with ``MultiProcessCollector``. The client library picks its value class when
it is first imported, so nothing here imports it before ``prepare_multiproc_dir`` has set the
directory; the master calls that before forking and never imports the collectors itself.

On the hot path a request costs one ``WorkerMetrics.request_done``: a dictionary lookup and
additions to plain Python numbers (a counter, one or two histogram buckets). ``publish`` adds
them to the children (resolved the first time a label combination was seen) every heartbeat:
a histogram observation written straight to the files costs about 1.7 µs, the whole per-request
set about 6 µs, against 0.5 µs counted here (``bench/micro.py``). Families one worker states
rather than sums (upstream up, build, certificate expiry) are added by ``render``.

The children of the error paths (every upstream with every kind in ``UPSTREAM_ERROR_KINDS``,
every listener with every ``SHED_REASONS``) are resolved when the worker starts or a reload adds
the name: resolving a child is where prometheus-client may open its memory-mapped file, and an
error path may run when the worker has no descriptor left (EMFILE).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import tempfile
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from fastproxy import BUILD, __version__

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge, Histogram

ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


def prepare_multiproc_dir() -> str:
    """Make ``PROMETHEUS_MULTIPROC_DIR`` exist and empty; called by the master before forking.

    When the variable is unset (no systemd ``RuntimeDirectory=``), a private temporary
    directory is created for this master's lifetime.
    """
    path = os.environ.get(ENV)
    if not path:
        path = tempfile.mkdtemp(prefix="fastproxy-metrics-")
        os.environ[ENV] = path
    os.makedirs(path, exist_ok=True)
    for entry in os.listdir(path):
        if entry.endswith(".db"):
            os.unlink(os.path.join(path, entry))
    return path


def remove_multiproc_dir(path: str) -> None:
    """Remove a directory made by ``prepare_multiproc_dir`` (only temporary ones)."""
    if os.path.basename(path).startswith("fastproxy-metrics-"):
        shutil.rmtree(path, ignore_errors=True)


def mark_process_dead(pid: int) -> None:
    """Drop the live gauges of a reaped worker; called by the master after each reap."""
    if not os.environ.get(ENV):
        return
    from prometheus_client import multiprocess

    # prometheus-client leaves this function unannotated
    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def status_class(status: int) -> str:
    return _STATUS_CLASSES[status // 100] if 0 < status < 600 else "other"


_STATUS_CLASSES = ("other", "1xx", "2xx", "3xx", "4xx", "5xx")

#: ``kind`` of ``fastproxy_upstream_errors_total``: the client's error code, or
#: ``upstream_truncated`` for a response the upstream cut off after its head was relayed
UPSTREAM_ERROR_KINDS = ("upstream_failed", "upstream_timeout", "upstream_truncated")
#: ``reason`` of ``fastproxy_connections_shed_total``
SHED_REASONS = ("max_connections", "max_connections_per_client", "descriptors")


#: ``fastproxy_request_duration_seconds`` and ``fastproxy_upstream_response_seconds``: 100 µs
#: (a proxy's own work and a loopback round trip: the latency tail is read here) to 60 s (the
#: longest default timeout)
DURATION_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
#: ``fastproxy_websocket_duration_seconds``: a second to a day (a co-browsing session)
WEBSOCKET_BUCKETS = (1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 4 * 3600.0, 86400.0)
#: ``code`` of ``fastproxy_websocket_closes_total``: the codes RFC 6455 and its IANA registry
#: define; any other code a peer sends is counted as ``other``
WEBSOCKET_CLOSE_CODES = frozenset(
    (1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 1015)
)
#: ``reason`` of ``fastproxy_worker_restarts_total``: an unexpected exit, the master's kill of a
#: worker whose heartbeat went stale, a worker replaced because it could not apply a reload
RESTART_REASONS = ("crash", "heartbeat", "reload_failed")


def close_code_label(code: int) -> str:
    return str(code) if code in WEBSOCKET_CLOSE_CODES else "other"


class _Histogram:
    """A histogram child's observations since the last ``publish``: plain Python numbers.

    ``counts[i]`` counts the values ``<= bounds[i]`` and above the bound before (the last slot is
    +Inf), the layout of prometheus-client's own bucket values, which ``publish`` adds to.
    """

    __slots__ = ("child", "counts", "sum")

    def __init__(self, child: Histogram, size: int) -> None:
        self.child = child
        self.counts = [0] * size
        self.sum = 0.0

    def publish(self) -> None:
        counts = self.counts
        # prometheus-client has no public way to add a batch of observations; ``_buckets``
        # (one value per bucket, not cumulative) and ``_sum`` are what ``observe`` adds to,
        # checked by tests/unit/test_metrics.py against the exposition
        buckets = self.child._buckets
        for index, count in enumerate(counts):
            if count:
                buckets[index].inc(count)
                counts[index] = 0
        if self.sum:
            self.child._sum.inc(self.sum)
            self.sum = 0.0


class _Requests:
    """One ``fastproxy_requests_total`` series and the duration histogram of its listener and
    rule: counted here, published by ``WorkerMetrics.publish``."""

    __slots__ = ("child", "count", "duration")

    def __init__(self, child: Counter, duration: _Histogram) -> None:
        self.child = child
        self.count = 0
        self.duration = duration


class WorkerMetrics:
    """The metrics one worker updates. Created in the worker, after the fork.

    The per-request families (requests, their durations, upstream response times, bytes) are
    counted in plain Python numbers and added to the multiprocess files by ``publish``, which
    the worker calls every heartbeat (about a second), before it answers a scrape, and when it
    stops: a counter of a worker killed outright loses at most its last second. The rare
    events (errors, sheds, WebSocket closes) write their files at once.
    """

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.requests = Counter(
            "fastproxy_requests",
            "Requests by listener, rule, decision and status class.",
            ["listener", "rule", "decision", "status_class"],
        )
        self.request_duration = Histogram(
            "fastproxy_request_duration_seconds",
            "Time from a request's head to the end of its answer, by listener and rule.",
            ["listener", "rule"],
            buckets=DURATION_BUCKETS,
        )
        self.upstream_response = Histogram(
            "fastproxy_upstream_response_seconds",
            "Time from a request sent to an upstream to the head of its response.",
            ["upstream"],
            buckets=DURATION_BUCKETS,
        )
        self.received_bytes = Counter(
            "fastproxy_received_bytes",
            "Bytes received from clients (TLS: decrypted), by listener.",
            ["listener"],
        )
        self.sent_bytes = Counter(
            "fastproxy_sent_bytes",
            "Bytes sent to clients (TLS: before encryption), by listener.",
            ["listener"],
        )
        self.connections = Gauge(
            "fastproxy_active_connections",
            "Open client connections.",
            ["listener"],
            multiprocess_mode="livesum",
        )
        self.websockets = Gauge(
            "fastproxy_active_websockets",
            "Open WebSocket tunnels.",
            ["listener"],
            multiprocess_mode="livesum",
        )
        self.websocket_duration = Histogram(
            "fastproxy_websocket_duration_seconds",
            "How long WebSocket tunnels were open, by listener.",
            ["listener"],
            buckets=WEBSOCKET_BUCKETS,
        )
        self.websocket_closes = Counter(
            "fastproxy_websocket_closes",
            "WebSocket tunnels closed, by the close code the client sent or was sent.",
            ["listener", "code"],
        )
        self.upstream_errors = Counter(
            "fastproxy_upstream_errors",
            "Upstream failures by kind.",
            ["upstream", "kind"],
        )
        self.connections_shed = Counter(
            "fastproxy_connections_shed",
            "Client connections answered 503 and closed at accept, by reason.",
            ["listener", "reason"],
        )
        self._requests: dict[tuple[str, str, str, int], _Requests] = {}
        self._durations: dict[tuple[str, str], _Histogram] = {}
        self._upstream_times: dict[str, _Histogram] = {}
        self._websocket_times: dict[str, _Histogram] = {}
        self._bytes: dict[str, tuple[Counter, Counter]] = {}
        self._upstream_error_children: dict[tuple[str, str], Counter] = {}
        self._shed_children: dict[tuple[str, str], Counter] = {}
        self._close_children: dict[tuple[str, str], Counter] = {}

    # -- the per-request path: plain Python numbers

    def request_done(
        self,
        listener: str,
        rule: str,
        decision: str,
        status: int,
        duration: float,
        upstream: str,
        upstream_s: float,
    ) -> None:
        """One answered request; ``upstream_s`` < 0: no upstream response head was read."""
        key = (listener, rule, decision, status // 100)
        series = self._requests.get(key)
        if series is None:
            series = self._new_requests(key, status)
        series.count += 1
        histogram = series.duration
        histogram.counts[bisect_left(DURATION_BUCKETS, duration)] += 1
        histogram.sum += duration
        if upstream_s >= 0.0:
            histogram = self._upstream_times.get(upstream) or self._new_upstream_time(upstream)
            histogram.counts[bisect_left(DURATION_BUCKETS, upstream_s)] += 1
            histogram.sum += upstream_s

    def _new_requests(self, key: tuple[str, str, str, int], status: int) -> _Requests:
        listener, rule, decision, _ = key
        duration = self._durations.get((listener, rule))
        if duration is None:
            child = self.request_duration.labels(listener, rule)
            duration = _Histogram(child, len(DURATION_BUCKETS) + 1)
            self._durations[listener, rule] = duration
        counter = self.requests.labels(listener, rule, decision, status_class(status))
        series = self._requests[key] = _Requests(counter, duration)
        return series

    def _new_upstream_time(self, upstream: str) -> _Histogram:
        child = self.upstream_response.labels(upstream)
        histogram = self._upstream_times[upstream] = _Histogram(child, len(DURATION_BUCKETS) + 1)
        return histogram

    def publish(self, traffic: Iterable[tuple[str, int, int]] = ()) -> None:
        """Add what was counted since the last call to the multiprocess files; ``traffic`` is
        ``(listener, received, sent)``, bytes since the last call."""
        for series in self._requests.values():
            if series.count:
                series.child.inc(series.count)
                series.count = 0
        for histogram in self._durations.values():
            histogram.publish()
        for histogram in self._upstream_times.values():
            histogram.publish()
        for histogram in self._websocket_times.values():
            histogram.publish()
        for listener, received, sent in traffic:
            if received or sent:
                children = self._bytes.get(listener)
                if children is None:
                    children = self._bytes[listener] = (
                        self.received_bytes.labels(listener),
                        self.sent_bytes.labels(listener),
                    )
                if received:
                    children[0].inc(received)
                if sent:
                    children[1].inc(sent)

    # -- rare events

    def websocket_ended(self, listener: str, seconds: float) -> None:
        histogram = self._websocket_times.get(listener)
        if histogram is None:
            child = self.websocket_duration.labels(listener)
            histogram = _Histogram(child, len(WEBSOCKET_BUCKETS) + 1)
            self._websocket_times[listener] = histogram
        histogram.counts[bisect_left(WEBSOCKET_BUCKETS, seconds)] += 1
        histogram.sum += seconds

    def websocket_close(self, listener: str, code: int) -> Counter:
        key = (listener, close_code_label(code))
        child = self._close_children.get(key)
        if child is None:
            child = self._close_children[key] = self.websocket_closes.labels(*key)
        return child

    def prepare_upstream(self, upstream: str) -> None:
        """Resolve the error children of ``upstream`` now, not on an error path."""
        for kind in UPSTREAM_ERROR_KINDS:
            self.upstream_error(upstream, kind)

    def upstream_error(self, upstream: str, kind: str) -> Counter:
        key = (upstream, kind)
        child = self._upstream_error_children.get(key)
        if child is None:
            child = self._upstream_error_children[key] = self.upstream_errors.labels(upstream, kind)
        return child

    def prepare_listener(self, listener: str) -> None:
        """Resolve the shed and WebSocket close children of ``listener`` now, not when
        descriptors run out."""
        for reason in SHED_REASONS:
            self.shed(listener, reason)
        self.websocket_close(listener, 1000)
        self.websocket_close(listener, 1001)

    def shed(self, listener: str, reason: str) -> Counter:
        key = (listener, reason)
        child = self._shed_children.get(key)
        if child is None:
            child = self._shed_children[key] = self.connections_shed.labels(listener, reason)
        return child

    def connection_gauge(self, listener: str) -> Gauge:
        return self.connections.labels(listener)

    def websocket_gauge(self, listener: str) -> Gauge:
        return self.websockets.labels(listener)


class MasterMetrics:
    """The metrics the master updates: reloads and worker restarts. Created after
    ``prepare_multiproc_dir``.

    The gauges are written by the master alone (``max`` over one writer is its value).
    """

    def __init__(self, now: float) -> None:
        from prometheus_client import Counter, Gauge

        self.reloads = Counter("fastproxy_reloads", "Configuration reloads by result.", ["result"])
        for result in ("ok", "failed"):
            self.reloads.labels(result)
        self.last_reload_successful = Gauge(
            "fastproxy_config_last_reload_successful",
            "Whether the last configuration reload succeeded (the start counts as one).",
            multiprocess_mode="max",
        )
        self.last_reload_success = Gauge(
            "fastproxy_config_last_reload_success_timestamp_seconds",
            "When the configuration was last loaded successfully (the start counts as one).",
            multiprocess_mode="max",
        )
        self.last_reload_successful.set(1)
        self.last_reload_success.set(now)
        self.worker_restarts = Counter(
            "fastproxy_worker_restarts",
            "Workers the master replaced, by reason: crash (an unexpected exit), heartbeat (killed"
            " after missing its heartbeat), reload_failed (could not apply a configuration).",
            ["reason"],
        )
        for reason in RESTART_REASONS:
            self.worker_restarts.labels(reason)

    def worker_restarted(self, reason: str) -> None:
        self.worker_restarts.labels(reason).inc()

    def reload_done(self, *, ok: bool, now: float) -> None:
        self.reloads.labels("ok" if ok else "failed").inc()
        self.last_reload_successful.set(1 if ok else 0)
        if ok:
            self.last_reload_success.set(now)


def render(
    upstream_up: Iterable[tuple[str, str, bool]] = (),
    certificates: Iterable[tuple[str, str, float]] = (),
    parser: str = "",
) -> bytes:
    """The exposition text of every worker's metrics, summed, and the families the scraped
    worker states itself, one value each, never a sum:

    - ``fastproxy_upstream_up`` from ``upstream_up``, ``(upstream, server, up)`` of the health
      table the master decides once for every worker; a server a reload removed leaves the
      scrape with it (a multiprocess gauge file would keep it);
    - ``fastproxy_tls_certificate_not_after_seconds`` from ``certificates``, ``(listener,
      cert, not_after)`` of the certificates the current configuration loaded;
    - ``fastproxy_build_info`` with the version, Python, HTTP ``parser`` and ``build`` in use.
    """
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess
    from prometheus_client.core import GaugeMetricFamily

    registry = CollectorRegistry()

    class Collector(multiprocess.MultiProcessCollector):
        """The workers' files, less any still empty: a worker creating its file while this one
        reads the directory (prometheus-client creates it, then sizes it) has nothing in it
        yet, and reading it as a file of values would fail the scrape."""

        def collect(self) -> Iterable[Any]:
            files = [f for f in glob.glob(os.path.join(self._path, "*.db")) if _nonempty(f)]
            merged: Iterable[Any] = self.merge(files, accumulate=True)  # type: ignore[no-untyped-call]
            return merged

    Collector(registry)  # type: ignore[no-untyped-call]  # unannotated
    states = list(upstream_up)
    certs = list(certificates)

    class Stated:
        def collect(self) -> Iterator[GaugeMetricFamily]:
            build = GaugeMetricFamily(
                "fastproxy_build_info",
                "Build information: fastproxy's version, the Python running it, the HTTP parser, "
                "and the build (mypyc: the per-request modules compiled; python: plain Python).",
                labels=["version", "python", "parser", "build"],
            )
            build.add_metric([__version__, PYTHON, parser, BUILD.kind], 1.0)
            yield build
            family = GaugeMetricFamily(
                "fastproxy_upstream_up",
                "Whether a server of an upstream is up (1) or down (0), by health checks and "
                "passive failures.",
                labels=["upstream", "server"],
            )
            for upstream, server, up in states:
                family.add_metric([upstream, server], 1.0 if up else 0.0)
            yield family
            expiry = GaugeMetricFamily(
                "fastproxy_tls_certificate_not_after_seconds",
                "When a listener's certificate expires (Unix time), by listener and certificate"
                " file name.",
                labels=["listener", "cert"],
            )
            for listener, cert, not_after in certs:
                expiry.add_metric([listener, cert], not_after)
            yield expiry

    registry.register(Stated())
    data: bytes = generate_latest(registry)
    return data


def _nonempty(path: str) -> bool:
    try:
        return os.path.getsize(path) > 0
    except OSError:  # removed meanwhile (a directory reset)
        return False


#: the ``python`` label of ``fastproxy_build_info``
PYTHON = "{}.{}.{}".format(*sys.version_info[:3])
