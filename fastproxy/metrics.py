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

On the hot path a request costs one dictionary lookup and one ``inc()`` on a child whose labels
were resolved the first time that combination was seen.

The children of the error paths (every upstream with every kind in ``UPSTREAM_ERROR_KINDS``,
every listener with every ``SHED_REASONS``) are resolved when the worker starts or a reload adds
the name: resolving a child is where prometheus-client may open its memory-mapped file, and an
error path may run when the worker has no descriptor left (EMFILE).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from fastproxy import __version__

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge

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


class WorkerMetrics:
    """The metrics one worker updates. Created in the worker, after the fork."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge

        self.requests = Counter(
            "fastproxy_requests",
            "Requests by listener, rule, decision and status class.",
            ["listener", "rule", "decision", "status_class"],
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
        build = Gauge(
            "fastproxy_build_info",
            "Build information.",
            ["version"],
            multiprocess_mode="max",
        )
        build.labels(__version__).set(1)
        self._request_children: dict[tuple[str, str, str, int], Counter] = {}
        self._upstream_error_children: dict[tuple[str, str], Counter] = {}
        self._shed_children: dict[tuple[str, str], Counter] = {}

    def count_request(self, listener: str, rule: str, decision: str, status: int) -> None:
        key = (listener, rule, decision, status // 100)
        child = self._request_children.get(key)
        if child is None:
            child = self.requests.labels(listener, rule, decision, status_class(status))
            self._request_children[key] = child
        child.inc()

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
        """Resolve the shed children of ``listener`` now, not when descriptors run out."""
        for reason in SHED_REASONS:
            self.shed(listener, reason)

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
    """The metrics the master updates: reloads. Created after ``prepare_multiproc_dir``.

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

    def reload_done(self, *, ok: bool, now: float) -> None:
        self.reloads.labels("ok" if ok else "failed").inc()
        self.last_reload_successful.set(1 if ok else 0)
        if ok:
            self.last_reload_success.set(now)


def render(upstream_up: Iterable[tuple[str, str, bool]] = ()) -> bytes:
    """The exposition text of every worker's metrics, summed, and ``fastproxy_upstream_up``.

    ``upstream_up`` is ``(upstream, server, up)`` of the health table the scraped worker holds:
    the master decides it once for every worker, so it is one value per server, not a sum, and
    a server a reload removed leaves the scrape with it (a multiprocess gauge file would keep it).
    """
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess
    from prometheus_client.core import GaugeMetricFamily

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # unannotated
    states = list(upstream_up)

    class UpstreamUp:
        def collect(self) -> Iterator[GaugeMetricFamily]:
            family = GaugeMetricFamily(
                "fastproxy_upstream_up",
                "Whether a server of an upstream is up (1) or down (0), by health checks and "
                "passive failures.",
                labels=["upstream", "server"],
            )
            for upstream, server, up in states:
                family.add_metric([upstream, server], 1.0 if up else 0.0)
            yield family

    if states:
        registry.register(UpstreamUp())
    data: bytes = generate_latest(registry)
    return data
