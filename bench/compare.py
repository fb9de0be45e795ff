"""Comparison runner: fastproxy beside nginx and HAProxy with the same policy, in one run.

    python -m bench.compare [--quick] [--out bench]

Starts the origins (nginx serving small and large files when installed, else the Python origin;
``bench.origin`` for the upload sink and the WebSocket echo) on the load core, then each proxy
with one worker pinned to the proxy core (``taskset``): nginx and HAProxy from the system
packages when installed, fastproxy with the h11 parser (and with httptools when ``fastproxy
check`` accepts it), fastproxy without its admin listener (and with an access log when ``run``
has a switch for it), and a raw uvloop relay as the floor of a Python proxy. Every proxy gets the
sdk listener's policy of the Cobrowse preset. Then, for every proxy and every run (interleaved,
so drift hits all alike):

- CPU per small request: ``wrk`` against an allowed path; the proxy's CPU time from /proc;
- CPU per WebSocket round trip: echo round trips over a few WebSockets;
- CPU per GB: repeated large GETs, and one large POST to the upload sink;
- added latency at 500 requests/s: a paced client through the proxy, minus the same directly;

once: resident memory per idle keep-alive connection and per idle WebSocket; and finally the
WebSockets two fastproxy workers hold at once (10,000 by default) with the echo still answering.
Writes ``RESULTS.md`` and PNG plots into ``--out``. Never part of the test suite: it needs the
whole machine for ~20 minutes (``--quick``: ~5).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import uvloop

import fastproxy
from bench import clients, plots, procs
from bench.procs import Started

T = TypeVar("T")
HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"

SMALL_PATH = "/api/1/devices/x"
BLOB_PATH = "/api/1/devices/blob"
UPLOAD_PATH = "/api/1/devices/upload"
WS_PATH = "/sockets/1/device/bench"
DENIED_PATH = "/admin"
GB = 1e9  # "GB" in the figures is 10**9 bytes; "KB" is 1000 bytes


@dataclass(frozen=True)
class Settings:
    runs: int
    http_seconds: int
    warm_seconds: int
    wrk_connections: int
    ws_round_trips: int
    ws_connections: int
    large_bytes: int
    downloads: int
    upload_bytes: int
    idle: int
    latency_seconds: float
    latency_rate: float
    hold: int
    hold_seconds: float
    hold_sources: int


FULL = Settings(
    runs=3,
    http_seconds=10,
    warm_seconds=2,
    wrk_connections=32,
    ws_round_trips=200_000,
    ws_connections=16,
    large_bytes=100 * 1000 * 1000,
    downloads=10,
    upload_bytes=1000 * 1000 * 1000,
    idle=2000,
    latency_seconds=20,
    latency_rate=500,
    hold=10_000,
    hold_seconds=20,
    hold_sources=100,
)
QUICK = Settings(
    runs=1,
    http_seconds=4,
    warm_seconds=1,
    wrk_connections=32,
    ws_round_trips=20_000,
    ws_connections=16,
    large_bytes=100 * 1000 * 1000,
    downloads=3,
    upload_bytes=300 * 1000 * 1000,
    idle=1000,
    latency_seconds=4,
    latency_rate=500,
    hold=10_000,
    hold_seconds=5,
    hold_sources=100,
)


class Handle:
    """A proxy process that can be started again on the same port and configuration."""

    def __init__(
        self,
        bench: Bench,
        name: str,
        argv: list[str],
        port: int,
        *,
        forks: bool,
        env: dict[str, str] | None = None,
    ) -> None:
        self.bench = bench
        self.env = env
        self.name = name
        self.argv = argv
        self.port = port
        #: whether the processes that count are the children (workers) of the started one
        self.forks = forks
        self.proc = self._launch()

    def _launch(self) -> Started:
        proc = self.bench.start(self.name, self.argv, self.bench.proxy_core, self.env)
        if self.forks:
            procs.wait_children(proc.pid, 1)
        procs.wait_port(self.port)
        return proc

    def workers(self) -> list[int]:
        return procs.children(self.proc.pid) if self.forks else [self.proc.pid]

    def restart(self, *, plain_http: bool = True) -> None:
        """A fresh process: memory is measured on one that never held other connections.
        ``plain_http``: wait until its port answers HTTP (else until it accepts)."""
        self.proc.stop()
        self.bench.started.remove(self.proc)
        self.proc = self._launch()
        if plain_http:
            procs.wait_http(f"http://127.0.0.1:{self.port}{SMALL_PATH}")


@dataclass
class Target:
    """One proxy under test: its port and the processes whose CPU and RSS count."""

    key: str
    label: str
    port: int
    handle: Handle
    #: tests this target takes part in (``http``, ``ws``, ``bulk``, ``idle``, ``latency``)
    tests: frozenset[str]
    policy_enforced: bool = True
    note: str = ""

    def workers(self) -> list[int]:
        return self.handle.workers()


ALL_TESTS = frozenset({"http", "ws", "bulk", "idle", "latency"})


@dataclass
class Results:
    #: metric -> target key -> one value per run
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    #: target key -> label, in the order they were started
    labels: dict[str, str] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    policy: dict[str, str] = field(default_factory=dict)
    latency_samples: dict[str, list[float]] = field(default_factory=dict)
    hold: clients.HoldResult | None = None
    hold_error: str = ""
    micro: dict[str, float] = field(default_factory=dict)
    access_log_switch: bool = False

    def add(self, metric: str, key: str, value: float) -> None:
        self.values.setdefault(metric, {}).setdefault(key, []).append(value)

    def median(self, metric: str, key: str) -> float | None:
        got = self.values.get(metric, {}).get(key)
        return statistics.median(got) if got else None

    def ratio(self, metric: str, key: str, base: str = "nginx") -> float | None:
        """Median of the per-run ratios ``key / base`` (each run measured both)."""
        a = self.values.get(metric, {}).get(key, [])
        b = self.values.get(metric, {}).get(base, [])
        pairs = [x / y for x, y in zip(a, b, strict=False) if y]
        return statistics.median(pairs) if pairs else None


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def render(name: str, dest: Path, **values: object) -> Path:
    text = (CONFIGS / name).read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", str(value))
    if "{{" in text:
        raise ValueError(f"{name}: unfilled placeholder in {text[text.index('{{') :][:40]!r}")
    dest.write_text(text)
    return dest


# ------------------------------------------------------------------------ the bench


class Bench:
    def __init__(
        self, settings: Settings, tmp: Path, proxy_core: int | None, load_core: int | None
    ):
        self.s = settings
        self.tmp = tmp
        self.proxy_core = proxy_core
        self.load_core = load_core
        self.started: list[Started] = []
        self.targets: list[Target] = []
        self.results = Results()
        self.nginx = shutil.which("nginx") or next(
            (p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None
        )
        self.haproxy = shutil.which("haproxy") or next(
            (p for p in ("/usr/sbin/haproxy",) if Path(p).exists()), None
        )
        self.origin_port = 0
        self.py_port = 0
        #: a fastproxy target's admin port (its /metrics: the worker's own request durations)
        self.admin_ports: dict[str, int] = {}
        self.all_cores = os.sched_getaffinity(0)
        self.nofile = 20000

    # ---------------------------------------------------------------- processes

    def start(
        self, name: str, argv: list[str], core: int | None, env: dict[str, str] | None = None
    ) -> Started:
        proc = Started(name, procs.taskset(core, argv), self.tmp / f"{name}.log", env)
        self.started.append(proc)
        return proc

    def stop_all(self, keep: frozenset[str] = frozenset()) -> None:
        """Stop what the runner started, newest first, except the processes named in ``keep``."""
        kept = []
        for proc in reversed(self.started):
            if proc.name in keep:
                kept.append(proc)
                continue
            with contextlib.suppress(Exception):
                proc.stop()
        self.started = kept[::-1]

    def start_origins(self) -> None:
        self.py_port = procs.free_port()
        self.start(
            "py-origin",
            [
                sys.executable,
                "-m",
                "bench.origin",
                "--port",
                str(self.py_port),
                "--large-bytes",
                str(self.s.large_bytes),
            ],
            self.load_core,
        )
        procs.wait_http(f"http://127.0.0.1:{self.py_port}{SMALL_PATH}")
        if self.nginx is None:
            self.origin_port = self.py_port
            return
        root = self.tmp / "www"
        files = root / "api" / "1" / "devices"
        files.mkdir(parents=True)
        (files / "x").write_bytes(b'{"ok":true}\n')
        with (files / "blob").open("wb") as f:
            left = self.s.large_bytes
            while left:
                left -= f.write(bytes(min(left, 1 << 20)))
        for path in [self.tmp, *root.rglob("*"), root]:
            path.chmod(0o755 if path.is_dir() else 0o644)  # nginx workers run unprivileged
        self.origin_port = procs.free_port()
        conf = render(
            "nginx-origin.conf",
            self.tmp / "nginx-origin.conf",
            TMP=self.tmp,
            ROOT=root,
            PORT=self.origin_port,
        )
        self.start("nginx-origin", [self.nginx, "-c", str(conf)], self.load_core)
        procs.wait_http(f"http://127.0.0.1:{self.origin_port}{SMALL_PATH}")

    def add_target(self, target: Target) -> None:
        self.targets.append(target)
        self.results.labels[target.key] = target.label
        if target.note:
            self.results.notes[target.key] = target.note
        url = f"http://127.0.0.1:{target.port}"
        procs.wait_http(url + SMALL_PATH)
        self.results.policy[target.key] = self.policy_check(url, target.policy_enforced)
        log(f"started {target.label} on port {target.port} ({self.results.policy[target.key]})")

    @staticmethod
    def policy_check(url: str, enforced: bool) -> str:
        def status(path: str) -> int:
            try:
                with urllib.request.urlopen(url + path, timeout=5) as resp:
                    code: int = resp.status
                    return code
            except urllib.error.HTTPError as err:
                return err.code

        allowed, denied = status(SMALL_PATH), status(DENIED_PATH)
        if not enforced:
            return f"no policy ({SMALL_PATH} {allowed}, {DENIED_PATH} {denied})"
        if allowed == 200 and denied == 403:
            return f"ok ({SMALL_PATH} 200, {DENIED_PATH} 403)"
        raise RuntimeError(f"{url}: policy check failed: {allowed} and {denied}")

    def start_nginx(self) -> None:
        if self.nginx is None:
            self.results.unavailable["nginx"] = "nginx is not installed"
            return
        port = procs.free_port()
        conf = render(
            "nginx-proxy.conf",
            self.tmp / "nginx-proxy.conf",
            TMP=self.tmp,
            PORT=port,
            ORIGIN=self.origin_port,
            PY=self.py_port,
        )
        handle = Handle(self, "nginx-proxy", [self.nginx, "-c", str(conf)], port, forks=True)
        version = procs.first_line([self.nginx, "-v"]).split("/")[-1]
        self.add_target(Target("nginx", f"nginx {version}", port, handle, ALL_TESTS))

    def start_haproxy(self) -> None:
        if self.haproxy is None:
            self.results.unavailable["haproxy"] = "HAProxy is not installed"
            return
        port = procs.free_port()
        conf = render(
            "haproxy.cfg",
            self.tmp / "haproxy.cfg",
            PORT=port,
            ORIGIN=self.origin_port,
            PY=self.py_port,
            # HAProxy refuses to start when two descriptors per connection exceed the limit
            MAXCONN=max(1000, (self.nofile - 200) // 2),
        )
        argv = [self.haproxy, "-db", "-f", str(conf)]
        handle = Handle(self, "haproxy", argv, port, forks=False)
        version = procs.first_line([self.haproxy, "-v"]).split()[2]
        self.add_target(Target("haproxy", f"HAProxy {version}", port, handle, ALL_TESTS))

    def fastproxy_config(
        self, name: str, *, workers: int, parser: str, admin: bool, per_client: int
    ) -> tuple[Path, int, int]:
        port, tunnel = procs.free_port(), procs.free_port()
        top = [f'http_parser = "{parser}"']
        if not admin:
            top.append("admin = false")
        admin_port = procs.free_port()
        if admin:
            self.admin_ports[name] = admin_port
        conf = render(
            "fastproxy.toml",
            self.tmp / f"{name}.toml",
            WORKERS=workers,
            EXTRA_TOP="\n".join(top),
            ORIGIN=self.origin_port,
            PY=self.py_port,
            PORT=port,
            TUNNEL_PORT=tunnel,
            PER_CLIENT=per_client,
            ADMIN=f'\n[admin]\nbind = "127.0.0.1:{admin_port}"' if admin else "",
        )
        return conf, port, tunnel

    def start_fastproxy(
        self,
        key: str,
        label: str,
        *,
        parser: str = "h11",
        admin: bool = True,
        access_log: bool = False,
        tests: frozenset[str] = ALL_TESTS,
        note: str = "",
        env: dict[str, str] | None = None,
        with_tunnel: bool = False,
    ) -> bool:
        """``env``: extra environment of fastproxy (e.g. ``PYTHONPATH`` of another build)."""
        conf, port, tunnel = self.fastproxy_config(
            key, workers=1, parser=parser, admin=admin, per_client=0
        )
        check = procs.run([sys.executable, "-m", "fastproxy", "check", "-c", str(conf)], env=env)
        if check.returncode != 0:
            why = (check.stdout + check.stderr).strip().splitlines()
            self.results.unavailable[key] = (why[-1] if why else "refused").replace(
                str(self.tmp), "$TMP"
            )
            log(f"{label}: not available: {self.results.unavailable[key]}")
            return False
        argv = [sys.executable, "-m", "fastproxy", "run", "-c", str(conf), "--log-level", "warning"]
        if access_log:
            argv += ["--access-log", str(self.tmp / f"{key}-access.log")]
        handle = Handle(self, key, argv, port, forks=True, env=env)
        self.add_target(Target(key, label, port, handle, tests, note=note))
        if with_tunnel:
            self.add_target(
                Target(
                    f"{key}-tunnel",
                    f"{label}, websocket_mode tunnel",
                    tunnel,
                    handle,
                    frozenset({"ws"}),
                    note="same process as the row above, second listener",
                )
            )
        return True

    def start_relay(self) -> None:
        port = procs.free_port()
        handle = Handle(
            self,
            "relay",
            [
                sys.executable,
                "-m",
                "bench.relay",
                "--listen",
                f"127.0.0.1:{port}",
                "--origin",
                f"127.0.0.1:{self.origin_port}",
                "--py",
                f"127.0.0.1:{self.py_port}",
            ],
            port,
            forks=False,
        )
        self.add_target(
            Target(
                "relay",
                "raw uvloop relay (reference)",
                port,
                handle,
                ALL_TESTS,
                policy_enforced=False,
                note="bytes copied both ways, no parsing, no policy",
            )
        )

    # ---------------------------------------------------------------- measurements

    def cpu_during(self, target: Target, action: Callable[[], T]) -> tuple[float, float, T]:
        """(proxy CPU seconds, proxy core busy seconds, what ``action`` returned)."""
        pids = target.workers()
        core = self.proxy_core
        before = procs.total_cpu(pids)
        core_before = procs.core_busy(core) if core is not None else 0.0
        got = action()
        cpu = procs.total_cpu(pids) - before
        busy = procs.core_busy(core) - core_before if core is not None else float("nan")
        return cpu, busy, got

    def wrk(self, port: int, seconds: int) -> tuple[int, float]:
        argv = procs.taskset(
            self.load_core,
            [
                "wrk",
                "-t1",
                f"-c{self.s.wrk_connections}",
                f"-d{seconds}s",
                f"http://127.0.0.1:{port}{SMALL_PATH}",
            ],
        )
        out = procs.run(argv, timeout=seconds + 60)
        text = out.stdout
        found = re.search(r"(\d+) requests in ([\d.]+)s", text)
        if out.returncode != 0 or found is None:
            raise RuntimeError(f"wrk failed on port {port}: {text} {out.stderr}")
        if "Non-2xx" in text or "Socket errors" in text:
            raise RuntimeError(f"errors from port {port}:\n{text}")
        return int(found.group(1)), float(found.group(2))

    def measure_http(self, t: Target) -> None:
        self.wrk(t.port, self.s.warm_seconds)
        cpu, busy, (n, elapsed) = self.cpu_during(t, lambda: self.wrk(t.port, self.s.http_seconds))
        self.results.add("http_us", t.key, cpu / n * 1e6)
        self.results.add("http_core_us", t.key, busy / n * 1e6)
        self.results.add("http_rps", t.key, n / elapsed)
        self.results.add("http_cpu_share", t.key, cpu / elapsed)
        log(
            f"  {t.label}: {cpu / n * 1e6:.1f} µs CPU/request ({busy / n * 1e6:.1f} µs with "
            f"the core's softirq), {n / elapsed:.0f} req/s"
        )

    def measure_ws(self, t: Target) -> None:
        def load() -> int:
            n, _secs = uvloop.run(
                clients.ws_round_trips(
                    t.port, WS_PATH, self.s.ws_connections, self.s.ws_round_trips
                )
            )
            return n

        uvloop.run(clients.ws_round_trips(t.port, WS_PATH, self.s.ws_connections, 2000))
        cpu, busy, n = self.cpu_during(t, load)
        self.results.add("ws_us", t.key, cpu / n * 1e6)
        self.results.add("ws_core_us", t.key, busy / n * 1e6)
        log(
            f"  {t.label}: {cpu / n * 1e6:.1f} µs CPU/WebSocket round trip "
            f"({busy / n * 1e6:.1f} µs with softirq)"
        )

    def measure_bulk(self, t: Target) -> None:
        start = time.perf_counter()
        cpu, busy, n = self.cpu_during(
            t, lambda: clients.download(t.port, BLOB_PATH, self.s.downloads)
        )
        secs = time.perf_counter() - start
        self.results.add("down_s_per_gb", t.key, cpu / (n / GB))
        self.results.add("down_core_s_per_gb", t.key, busy / (n / GB))
        self.results.add("down_gb_s", t.key, n / GB / secs)
        start = time.perf_counter()
        cpu_up, busy_up, up = self.cpu_during(
            t, lambda: clients.upload(t.port, UPLOAD_PATH, self.s.upload_bytes)
        )
        secs_up = time.perf_counter() - start
        self.results.add("up_s_per_gb", t.key, cpu_up / (up / GB))
        self.results.add("up_core_s_per_gb", t.key, busy_up / (up / GB))
        self.results.add("up_gb_s", t.key, up / GB / secs_up)
        log(
            f"  {t.label}: download {cpu / (n / GB):.2f} CPU s/GB ({n / GB / secs:.2f} GB/s), "
            f"upload {cpu_up / (up / GB):.2f} CPU s/GB ({up / GB / secs_up:.2f} GB/s)"
        )

    def measure_idle(self, t: Target) -> None:
        """Each figure on a freshly started, briefly warmed process of the proxy."""
        n = self.s.idle
        t.handle.restart()
        self.wrk(t.port, 1)
        pids = t.workers()
        before = procs.total_rss(pids)
        after = uvloop.run(
            clients.idle_http(t.port, n, SMALL_PATH, lambda: procs.total_rss(pids), 1.0)
        )
        self.results.add("idle_http_bytes", t.key, (after - before) / n)
        t.handle.restart()
        self.wrk(t.port, 1)
        uvloop.run(clients.ws_round_trips(t.port, WS_PATH, 4, 400))
        pids = t.workers()
        before = procs.total_rss(pids)
        after = uvloop.run(clients.idle_ws(t.port, n, WS_PATH, lambda: procs.total_rss(pids), 1.0))
        self.results.add("idle_ws_bytes", t.key, (after - before) / n)
        log(
            f"  {t.label}: {self.results.values['idle_http_bytes'][t.key][-1]:.0f} B per idle "
            f"HTTP connection, {(after - before) / n:.0f} B per idle WebSocket"
        )

    def worker_histograms(self, t: Target) -> dict[str, dict[float, float]] | None:
        """The request-duration and upstream-response buckets the worker counted so far."""
        port = self.admin_ports.get(t.key)
        if port is None:
            return None
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        found: dict[str, dict[float, float]] = {"request": {}, "upstream": {}}
        for line in text.splitlines():
            for kind, family in (
                ("request", "fastproxy_request_duration_seconds_bucket{"),
                ("upstream", "fastproxy_upstream_response_seconds_bucket{"),
            ):
                if line.startswith(family):
                    labels, _, value = line.rpartition(" ")
                    bound = labels.split('le="', 1)[1].split('"', 1)[0]
                    le = float("inf") if bound == "+Inf" else float(bound)
                    found[kind][le] = found[kind].get(le, 0.0) + float(value)
        return found

    def measure_latency(self, t: Target) -> None:
        """The proxy and the origin directly, interleaved in the same window; for fastproxy,
        also the durations its worker measured (its histograms, before and after)."""
        before = self.worker_histograms(t)
        (direct, lat), skipped = uvloop.run(
            clients.paced_latency(
                [self.origin_port, t.port],
                SMALL_PATH,
                self.s.latency_rate,
                self.s.latency_seconds,
            )
        )
        self.results.latency_samples[t.key] = lat
        self.results.latency_samples["direct"] = direct
        p50, p99 = percentile(lat, 50), percentile(lat, 99)
        d50, d99 = percentile(direct, 50), percentile(direct, 99)
        self.results.add("lat_p50_ms", t.key, (p50 - d50) * 1e3)
        self.results.add("lat_p99_ms", t.key, (p99 - d99) * 1e3)
        self.results.add("lat_abs_p50_ms", t.key, p50 * 1e3)
        self.results.add("lat_abs_p99_ms", t.key, p99 * 1e3)
        self.results.add("lat_direct_p50_ms", t.key, d50 * 1e3)
        self.results.add("lat_direct_p99_ms", t.key, d99 * 1e3)
        self.results.add("lat_skipped", t.key, skipped)
        after = self.worker_histograms(t)
        if before is not None and after is not None:
            for kind in ("request", "upstream"):
                counts = {
                    le: after[kind].get(le, 0.0) - before[kind].get(le, 0.0) for le in after[kind]
                }
                for pct in (50, 99):
                    value = bucket_percentile(counts, pct)
                    if value is not None:
                        self.results.add(f"lat_worker_{kind}_p{pct}_ms", t.key, value * 1e3)
        log(
            f"  {t.label}: +{(p50 - d50) * 1e3:.3f} ms p50, +{(p99 - d99) * 1e3:.3f} ms p99 "
            f"(through it {p50 * 1e3:.3f}/{p99 * 1e3:.3f}, direct {d50 * 1e3:.3f}/"
            f"{d99 * 1e3:.3f}, {skipped} skipped)"
        )

    def each(self, test: str) -> Iterator[Target]:
        for t in self.targets:
            if test in t.tests:
                yield t

    def run_all(self) -> None:
        log("memory per idle connection")
        for t in self.each("idle"):
            self.measure_idle(t)
        for run in range(self.s.runs):
            log(f"run {run + 1} of {self.s.runs}: CPU per small request")
            for t in self.each("http"):
                self.measure_http(t)
            log(f"run {run + 1}: CPU per WebSocket round trip")
            for t in self.each("ws"):
                self.measure_ws(t)
            log(f"run {run + 1}: CPU per GB")
            for t in self.each("bulk"):
                self.measure_bulk(t)
            log(f"run {run + 1}: added latency at {self.s.latency_rate:.0f} requests/s")
            for t in self.each("latency"):
                self.measure_latency(t)

    def run_hold(self) -> None:
        """Two fastproxy workers on both cores holding many WebSockets, echo still answering."""
        n = self.s.hold
        conf, port, _tunnel = self.fastproxy_config(
            "fastproxy-hold", workers=2, parser="auto", admin=True, per_client=256
        )
        argv = [sys.executable, "-m", "fastproxy", "run", "-c", str(conf), "--log-level", "warning"]
        # both cores: the runner's own affinity (the load core) would be inherited otherwise
        all_cores = ",".join(str(c) for c in sorted(self.all_cores))
        proc = self.start("fastproxy-hold", ["taskset", "-c", all_cores, *argv], None)
        workers = procs.wait_children(proc.pid, 2)
        procs.wait_http(f"http://127.0.0.1:{port}{SMALL_PATH}")
        before = procs.total_rss(workers)
        sources = [f"127.0.0.{i}" for i in range(2, 2 + self.s.hold_sources)]
        log(f"holding {n} WebSockets through 2 fastproxy workers from {len(sources)} addresses")

        def measure() -> dict[str, float]:
            per_worker = [float(sum(1 for _ in Path(f"/proc/{w}/fd").iterdir())) for w in workers]
            return {
                "rss_per_ws": (procs.total_rss(workers) - before) / n,
                "fds_worker_0": per_worker[0],
                "fds_worker_1": per_worker[1],
            }

        try:
            self.results.hold = uvloop.run(
                clients.hold_websockets(port, WS_PATH, n, sources, self.s.hold_seconds, measure)
            )
        except Exception as err:  # reported, not fatal: the other figures stand
            self.results.hold_error = f"{type(err).__name__}: {err}"
        h = self.results.hold
        if h is not None:
            log(
                f"  opened {h.opened}/{n} in {h.open_seconds:.1f} s, held {h.held}, "
                f"echoed {h.echoed}, fresh echo {h.fresh_echo}"
            )
        proc.stop()

    def run_micro(self) -> None:
        out = procs.run([sys.executable, "-m", "bench.micro"], timeout=300)
        with contextlib.suppress(ValueError):
            self.results.micro = json.loads(out.stdout)


def bucket_percentile(cumulative: dict[float, float], pct: float) -> float | None:
    """A percentile from cumulative histogram buckets (``le`` -> count), linear within the
    bucket it falls in, as Prometheus' ``histogram_quantile`` does."""
    bounds = sorted(cumulative)
    if not bounds or cumulative[bounds[-1]] <= 0:
        return None
    rank = cumulative[bounds[-1]] * pct / 100
    lower, below = 0.0, 0.0
    for le in bounds:
        count = cumulative[le]
        if count >= rank:
            if le == float("inf"):
                return lower
            inside = count - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 0.0)
        lower, below = le, count
    return None


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * pct / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# ------------------------------------------------------------------------ report


#: the environment that makes a fastproxy process run plain Python on a compiled install
PURE = {"FASTPROXY_PURE": "1"}
#: what this environment's fastproxy runs by default: "compiled" (mypyc) or "plain Python"
SHIPPED_BUILD = "compiled" if fastproxy.BUILD.kind == "mypyc" else "plain Python"


def versions() -> dict[str, str]:
    out: dict[str, str] = {}
    fp = procs.first_line([sys.executable, "-m", "fastproxy", "version"])
    out["fastproxy"] = fp
    text = subprocess.run(
        [sys.executable, "-m", "fastproxy", "version"], capture_output=True, text=True, check=False
    ).stdout
    for line in text.splitlines()[1:]:
        name, _, version = line.partition(" ")
        out[name] = version
    try:
        import httptools

        out.setdefault("httptools", str(getattr(httptools, "__version__", "installed")))
    except ImportError:
        out.setdefault("httptools", "not installed")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    out["nginx"] = procs.first_line([nginx, "-v"])
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    out["haproxy"] = procs.first_line([haproxy, "-v"])
    out["wrk"] = procs.first_line(["wrk", "--version"]).split(" Copyright")[0]
    out["kernel"] = platform.release()
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    out["cpu"] = f"{model}, {os.cpu_count()} cores"
    with contextlib.suppress(OSError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        out["memory"] = f"{kb / 1024 / 1024:.0f} GiB"
    return out


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def verdict(value: float | None, limit: float, *, at_least: bool = False) -> str:
    if value is None:
        return "not measured"
    ok = value >= limit if at_least else value <= limit
    return "**met**" if ok else "**not met**"


def target_rows(r: Results, s: Settings) -> list[tuple[str, str, str, str, str]]:
    """(target, fastproxy, nginx, measured vs limit, verdict) for the issue's targets."""
    rows: list[tuple[str, str, str, str, str]] = []

    def ratio_row(name: str, metric: str, key: str, limit: float, spec: str, unit: str) -> None:
        if key in r.unavailable:
            rows.append((name, "not available", "", r.unavailable[key], "not measured"))
            return
        ratio = r.ratio(metric, key)
        rows.append(
            (
                name,
                f"{fmt(r.median(metric, key), spec)} {unit}",
                f"{fmt(r.median(metric, 'nginx'), spec)} {unit}",
                f"{fmt(ratio, '.2f')}x (limit {limit}x)",
                verdict(ratio, limit),
            )
        )

    ratio_row(
        "CPU per small request, fastest shipped configuration",
        "http_us",
        "fastproxy",
        2.0,
        ".1f",
        "µs",
    )
    ratio_row(
        "CPU per small request, plain Python with h11",
        "http_us",
        "fastproxy-h11",
        5.0,
        ".1f",
        "µs",
    )
    ratio_row(
        "CPU per WebSocket round trip, frames validated",
        "ws_us",
        "fastproxy",
        1.1,
        ".1f",
        "µs",
    )
    ratio_row("CPU per GB downloaded", "down_s_per_gb", "fastproxy", 1.0, ".2f", "s")
    ratio_row("CPU per GB uploaded", "up_s_per_gb", "fastproxy", 1.0, ".2f", "s")

    def abs_row(name: str, metric: str, limit: float, spec: str, unit: str) -> None:
        value = r.median(metric, "fastproxy")
        rows.append(
            (
                name,
                f"{fmt(value, spec)} {unit}",
                f"{fmt(r.median(metric, 'nginx'), spec)} {unit}",
                f"{fmt(value, spec)} {unit} (limit {limit} {unit})",
                verdict(value, limit),
            )
        )

    abs_row("RSS per idle keep-alive connection", "idle_http_bytes", 1500, ".0f", "B")
    abs_row("RSS per idle WebSocket", "idle_ws_bytes", 2000, ".0f", "B")
    ratio_row("Added latency p99 at 500 req/s", "lat_p99_ms", "fastproxy", 1.25, ".3f", "ms")

    h = r.hold
    if h is None:
        rows.append(
            (
                f"{s.hold} concurrent WebSockets, 2 workers",
                "failed",
                "",
                r.hold_error or "not run",
                "**not met**",
            )
        )
    else:
        ok = h.held >= 10_000 and h.echoed == h.held and h.fresh_echo
        rows.append(
            (
                f"{s.hold} concurrent WebSockets, 2 workers",
                f"{h.held} held, {h.echoed} echoed",
                "",
                f"{h.held} held (limit >= 10000), echo {'answering' if h.echoed else 'silent'}",
                "**met**" if ok else "**not met**",
            )
        )

    base = r.median("http_us", "fastproxy")
    noadmin = r.median("http_us", "fastproxy-noadmin")
    # the share is measured on the shipped default, where it weighs most (the smallest base)
    e2e = (
        f"admin listener off: {fmt(noadmin, '.1f')} µs vs {fmt(base, '.1f')} µs "
        f"({fmt((base - noadmin) / base * 100 if base and noadmin else None, '+.1f')}%)"
    )
    acc = r.median("http_us", "fastproxy-accesslog")
    micro = r.micro
    metrics_us = micro.get("metrics_us") if micro else None
    name = "Metrics and access log, share of CPU per request"
    if acc is not None and base is not None and metrics_us is not None:
        # the access log end to end; the metrics cannot be switched off, so their share is
        # the in-process cost of one update
        log_us = acc - base
        share = (log_us + metrics_us) / acc
        rows.append(
            (
                name,
                f"{share * 100:.1f}%",
                "",
                f"{share * 100:.1f}% (limit 10%): access log +{log_us:.1f} µs end to end "
                f"({acc:.1f} vs {base:.1f} µs), metrics {metrics_us:.2f} µs in-process (no "
                f"switch turns counting off; a `metrics = false` key would allow measuring it "
                f"end to end); {e2e}",
                verdict(share, 0.10),
            )
        )
    else:
        estimate = ""
        if micro and base:
            share = (micro["metrics_us"] + micro["access_log_us"]) / (base + micro["access_log_us"])
            estimate = (
                f"; estimate from bench.micro: metrics {micro['metrics_us']:.2f} µs + access "
                f"record {micro['access_log_us']:.2f} µs = {share * 100:.1f}% of a request"
            )
        rows.append(
            (
                name,
                "not measurable",
                "",
                "no switch turns the metrics or the access log on or off: needs a "
                "`metrics = false` config key and `fastproxy run --access-log PATH`; "
                + e2e
                + estimate,
                "not measured",
            )
        )
    return rows


CPU_COLUMNS = [
    ("http_us", "CPU µs / small request", ".1f"),
    ("http_core_us", "core busy", ".1f"),
    ("http_rps", "requests/s", ".0f"),
    ("ws_us", "CPU µs / WS round trip", ".1f"),
    ("ws_core_us", "core busy", ".1f"),
    ("down_s_per_gb", "CPU s / GB down", ".2f"),
    ("down_core_s_per_gb", "core busy", ".2f"),
    ("up_s_per_gb", "CPU s / GB up", ".2f"),
    ("up_core_s_per_gb", "core busy", ".2f"),
    ("down_gb_s", "GB/s down", ".2f"),
    ("up_gb_s", "GB/s up", ".2f"),
]
OTHER_COLUMNS = [
    ("idle_http_bytes", "B / idle keep-alive conn", ".0f"),
    ("idle_ws_bytes", "B / idle WebSocket", ".0f"),
    ("lat_p50_ms", "added p50 ms", ".3f"),
    ("lat_p99_ms", "added p99 ms", ".3f"),
    ("lat_abs_p50_ms", "through it p50 ms", ".3f"),
    ("lat_abs_p99_ms", "through it p99 ms", ".3f"),
    ("lat_direct_p50_ms", "direct p50 ms", ".3f"),
    ("lat_direct_p99_ms", "direct p99 ms", ".3f"),
    ("lat_worker_request_p50_ms", "in the worker p50 ms", ".3f"),
    ("lat_worker_request_p99_ms", "in the worker p99 ms", ".3f"),
    ("lat_worker_upstream_p99_ms", "of which upstream p99 ms", ".3f"),
]


def table(r: Results, columns: list[tuple[str, str, str]]) -> list[str]:
    header = ["proxy", *(label for _, label, _ in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, label in r.labels.items():
        cells = [fmt(r.median(metric, key), spec) for metric, _, spec in columns]
        if all(c == "—" for c in cells):
            continue
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return lines


@dataclass
class Meta:
    """What the report says about the run itself."""

    quick: bool
    started: str
    elapsed: float
    versions: dict[str, str]
    commands: list[str]


def clean_commands(commands: list[str], tmp: Path) -> list[str]:
    """The distinct commands, with the temporary directory, interpreter and ports generalised."""
    seen: list[str] = []
    for cmd in commands:
        clean = cmd.replace(str(tmp), "$TMP").replace(sys.executable, "python")
        clean = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", clean)
        clean = re.sub(r"--port \d+", "--port PORT", clean)
        if clean not in seen:
            seen.append(clean)
    return seen


def quantiles(samples: list[float], n: int = 1000) -> list[float]:
    """``n + 1`` evenly spaced quantiles: enough for a CDF plot, small enough to keep."""
    if not samples:
        return []
    return [percentile(samples, 100 * i / n) for i in range(n + 1)]


def save_json(path: Path, r: Results, s: Settings, meta: Meta) -> None:
    doc = {
        "settings": s.__dict__,
        "meta": dataclasses.asdict(meta),
        "results": {
            **{k: v for k, v in dataclasses.asdict(r).items() if k != "latency_samples"},
            "latency_samples": {k: quantiles(v) for k, v in r.latency_samples.items()},
        },
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")


def load_json(path: Path) -> tuple[Results, Settings, Meta]:
    doc = json.loads(path.read_text())
    raw = doc["results"]
    hold = raw.pop("hold")
    r = Results(**raw)
    r.hold = clients.HoldResult(**hold) if hold else None
    return r, Settings(**doc["settings"]), Meta(**doc["meta"])


def write_results(out: Path, r: Results, s: Settings, meta: Meta) -> None:
    v = meta.versions
    quick, started, elapsed = meta.quick, meta.started, meta.elapsed
    lines = [
        "# fastproxy benchmark results",
        "",
        f"Written by `python -m bench.compare{' --quick' if quick else ''}` on {started} "
        f"({elapsed / 60:.1f} min). Medians of {s.runs} interleaved run(s); memory and the "
        "WebSocket hold are measured once. Ratios are fastproxy / nginx within each run, then "
        "the median. GB = 10^9 bytes, KB = 1000 bytes. See `bench/README.md` for the method.",
        "",
        "## Targets",
        "",
        "| target | fastproxy | nginx | measured | verdict |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {' | '.join(row)} |" for row in target_rows(r, s)]
    lines += ["", "## CPU", ""]
    lines += table(r, CPU_COLUMNS)
    lines += [
        "",
        "CPU is the proxy's worker processes' user + system time from /proc/PID/stat: the figure "
        'the targets use. "Core busy" is the proxy core\'s busy time from /proc/stat instead '
        "(the proxy is alone on that core): it adds interrupt and wake-up work the kernel does "
        "there and charges to no process. That work shrinks as the proxy nears saturation, so "
        "it weighs more on a proxy the load core could not saturate (utilisation below).",
    ]
    if r.values.get("http_cpu_share"):
        lines += [
            "",
            "Proxy utilisation during the wrk runs (CPU seconds per second): "
            + ", ".join(
                f"{r.labels[k]} {statistics.median(vals):.2f}"
                for k, vals in r.values["http_cpu_share"].items()
            )
            + ". Near 1.0 the proxy was the bottleneck; lower means the load core (wrk and the "
            "origin) was. A proxy below saturation batches less per wake-up, so its CPU per "
            "request is if anything overstated, and its ratio to fastproxy understated.",
        ]
    for key, why in r.unavailable.items():
        lines += ["", f"Not available: {key}: {why}."]
    lines += ["", "## Memory and latency", ""]
    lines += table(r, OTHER_COLUMNS)
    lines += [
        "",
        f"Memory: RSS of the proxy's worker processes with {s.idle} idle connections open, minus "
        "before, divided by their number (each connection made one request, or one WebSocket "
        f"echo, first). Latency: {s.latency_rate:.0f} requests/s to the proxy and "
        f"{s.latency_rate:.0f}/s directly to the origin, interleaved in the same "
        f"{s.latency_seconds:.0f} s window, on keep-alive connections; added = through it "
        "minus direct, per percentile. In the worker: fastproxy's own "
        "`fastproxy_request_duration_seconds` over the same window (its /metrics before and "
        "after), from the read that completed the request head to the response's last byte handed "
        "to the transport, upstream round trip included (`of which upstream`: "
        "`fastproxy_upstream_response_seconds`); percentiles interpolated within the buckets "
        "(100 µs, 250 µs, 500 µs, 1 ms, ...), as `histogram_quantile` does. What the client "
        "sees beyond it is the kernel's delivery both ways and the time before the event loop "
        "runs the worker's callback.",
    ]
    if r.notes:
        lines += ["", "Notes: " + "; ".join(f"{r.labels[k]}: {n}" for k, n in r.notes.items())]
    lines += ["", "Policy check (allowed path, denied path) on each proxy before measuring:", ""]
    lines += [f"- {r.labels[k]}: {c}" for k, c in r.policy.items()]

    lines += ["", f"## {s.hold} concurrent WebSockets, fastproxy with 2 workers", ""]
    h = r.hold
    if h is None:
        lines.append(f"Not completed: {r.hold_error or 'not run'}.")
    else:
        lat = h.echo_latencies
        lines += [
            f"- opened {h.opened} of {h.target} from {s.hold_sources} source addresses "
            f"(127.0.0.2 and up) in {h.open_seconds:.1f} s; {h.failed} failed",
            f"- held after {s.hold_seconds:.0f} s with messages on a rotating slice: {h.held}",
            f"- echo on every held connection: {h.echoed} answered, round trip p50 "
            f"{percentile(lat, 50) * 1e3:.2f} ms, p99 {percentile(lat, 99) * 1e3:.2f} ms",
            f"- a fresh connection after the hold echoed: {h.fresh_echo}",
            f"- worker RSS per held WebSocket: {h.measured.get('rss_per_ws', 0):.0f} B; open "
            f"descriptors per worker: {h.measured.get('fds_worker_0', 0):.0f} and "
            f"{h.measured.get('fds_worker_1', 0):.0f}",
        ]

    lines += ["", "## Metrics and access log", ""]
    acc = "exists" if r.access_log_switch else "does not exist"
    lines += [
        f"`admin = false` removes the admin listener but the worker still counts every request "
        f"(the counters live in shared files whether or not anything scrapes them), so the "
        f"end-to-end difference below is not the metrics' cost. `fastproxy run --access-log` "
        f"{acc}.",
        "",
    ]
    for key in ("fastproxy", "fastproxy-noadmin", "fastproxy-accesslog"):
        if key in r.labels:
            lines.append(f"- {r.labels[key]}: {fmt(r.median('http_us', key), '.1f')} µs/request")
    if r.micro:
        lines.append(
            f"- `python -m bench.micro` (in-process, warm caches): the metrics of a request "
            f"{r.micro['metrics_us']:.2f} µs (written straight to the multiprocess files: "
            f"{r.micro.get('metrics_direct_us', float('nan')):.2f} µs), one access record to a "
            f"file {r.micro['access_log_us']:.2f} µs"
        )

    lines += ["", "## Machine and versions", ""]
    lines += [f"- {k}: {val}" for k, val in v.items()]
    lines += [
        "- placement: every proxy pinned to core 1 with `taskset -c 1` (one worker each); "
        "origins, wrk and the Python clients on core 0; the 2-worker hold test on both cores",
        "",
        "## Settings",
        "",
        "```",
        json.dumps(s.__dict__, indent=1),
        "```",
        "",
        "## Exact commands",
        "",
        "Configs are rendered from `bench/configs/` into a temporary directory (`$TMP`).",
        "",
        "```",
    ]
    lines += meta.commands
    lines += [
        "```",
        "",
        "Plots: " + ", ".join(f"`{p}`" for p in plots.FILES) + ". Raw figures: `results.json` "
        "(`python -m bench.compare --report-only` rewrites this file and the plots from it).",
        "",
    ]
    (out / "RESULTS.md").write_text("\n".join(lines))


# ------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one short run (~5 minutes)")
    parser.add_argument("--out", type=Path, default=HERE, help="where RESULTS.md and plots go")
    parser.add_argument("--hold", type=int, help="WebSockets to hold (default 10000; 0 skips)")
    parser.add_argument(
        "--only", help="comma-separated target keys to run (nginx, haproxy, fastproxy, ...)"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite RESULTS.md and the plots from results.json in --out, measure nothing",
    )
    parser.add_argument(
        "--only-idle",
        action="store_true",
        help="measure only the memory per idle connection, print it, write nothing",
    )
    args = parser.parse_args(argv)
    if args.report_only:
        r, s, meta = load_json(args.out / "results.json")
        write_results(args.out, r, s, meta)
        plots.draw(args.out, r)
        return 0
    if os.environ.get("CI"):
        parser.error("benchmarks never run in CI")
    if shutil.which("wrk") is None or shutil.which("taskset") is None:
        parser.error("needs wrk and taskset (Debian: apt-get install wrk util-linux)")
    s = QUICK if args.quick else FULL
    if args.hold is not None:
        s = Settings(**{**s.__dict__, "hold": args.hold})
    only = set(args.only.split(",")) if args.only else None

    load_core, proxy_core, limit, all_cores = procs.place_runner()
    log(f"open-files limit {limit}; load core {load_core}, proxy core {proxy_core}")

    started_at = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    t0 = time.monotonic()
    help_text = procs.run([sys.executable, "-m", "fastproxy", "run", "--help"]).stdout
    with tempfile.TemporaryDirectory(prefix="fastproxy-bench-") as tmpdir:
        tmp = Path(tmpdir)
        bench = Bench(s, tmp, proxy_core, load_core)
        bench.all_cores = all_cores
        bench.nofile = limit
        bench.results.access_log_switch = "--access-log" in help_text
        try:
            bench.start_origins()

            def want(key: str) -> bool:
                return only is None or key in only

            if want("nginx"):
                bench.start_nginx()
            if want("haproxy"):
                bench.start_haproxy()
            # the shipped default: this environment's build (compiled when it could be) and
            # http_parser = "auto" (httptools, a test extra); then the plain-Python reference
            shipped = f"fastproxy ({SHIPPED_BUILD}, httptools: the default)"
            if want("fastproxy"):
                bench.start_fastproxy("fastproxy", shipped, parser="auto", with_tunnel=True)
            if want("fastproxy-h11"):
                bench.start_fastproxy("fastproxy-h11", "fastproxy (plain Python, h11)", env=PURE)
            if want("fastproxy-httptools"):
                bench.start_fastproxy(
                    "fastproxy-httptools",
                    "fastproxy (plain Python, httptools)",
                    parser="httptools",
                    env=PURE,
                    tests=frozenset({"http", "ws", "latency"}),
                )
            if want("fastproxy-compiled-h11") and SHIPPED_BUILD == "compiled":
                bench.start_fastproxy(
                    "fastproxy-compiled-h11",
                    "fastproxy (compiled, h11)",
                    tests=frozenset({"http", "ws"}),
                )
            if want("fastproxy-noadmin"):
                bench.start_fastproxy(
                    "fastproxy-noadmin",
                    f"{shipped}, admin = false",
                    parser="auto",
                    admin=False,
                    tests=frozenset({"http"}),
                )
            if want("fastproxy-accesslog"):
                if bench.results.access_log_switch:
                    bench.start_fastproxy(
                        "fastproxy-accesslog",
                        f"{shipped}, access log to a file",
                        parser="auto",
                        access_log=True,
                        tests=frozenset({"http"}),
                    )
                else:
                    bench.results.unavailable["fastproxy-accesslog"] = (
                        "`fastproxy run` has no --access-log switch"
                    )
            if want("relay"):
                bench.start_relay()
            if args.only_idle:
                log("memory per idle connection")
                for t in bench.each("idle"):
                    bench.measure_idle(t)
                return 0
            bench.run_all()
            bench.run_micro()
            bench.stop_all(keep=frozenset({"py-origin", "nginx-origin"}))
            if s.hold:
                bench.run_hold()
        finally:
            bench.stop_all()
        elapsed = time.monotonic() - t0
        args.out.mkdir(parents=True, exist_ok=True)
        meta = Meta(
            args.quick, started_at, elapsed, versions(), clean_commands(procs.COMMANDS, tmp)
        )
        save_json(args.out / "results.json", bench.results, s, meta)
        write_results(args.out, bench.results, s, meta)
    plots.draw(args.out, bench.results)
    log(f"wrote {args.out / 'RESULTS.md'} in {elapsed / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
