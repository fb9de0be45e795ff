"""TLS termination beside nginx and HAProxy: handshakes, keep-alive requests, idle memory.

    python -m bench.tls [--handshakes 2000] [--seconds 10] [--idle 2000] [--runs 3]
                        [--key ec|rsa] [--tls 1.3|1.2] [--only KEYS] [--out bench]

One certificate (made at start with ``openssl``: ECDSA P-256 by default, RSA 2048 with
``--key rsa``) and one protocol version (``--tls``, pinned on the client) for every proxy. Each
proxy runs one worker pinned to the proxy core, with the allowed API path of the Cobrowse sdk
policy on a TLS port and on a plain-HTTP twin port of the same process; the origin is the
compare runner's (nginx serving a small file when installed). The runner is pinned to the load
core and is the client. For every proxy and every run (interleaved, so drift hits all alike):

- CPU per full handshake: ``--handshakes`` new connections, each a full handshake (a fresh
  client session) and a close; the proxy's CPU time from /proc divided by their number;
- CPU per resumed handshake: the same with the session of an earlier connection (a TLS 1.3
  ticket or a TLS 1.2 session), counting how many the server really resumed;
- CPU per request on a TLS keep-alive connection, and the same on the plain twin port:
  ``wrk -t1 -c50`` for ``--seconds`` against the allowed path;

once per proxy, on a fresh process: resident memory per idle TLS connection (``--idle``
connections, each after one request, kept open). Writes ``TLS.md`` and ``tls.json`` into
``--out`` and the table to stdout. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shutil
import socket
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import clients, compare, procs
from bench.compare import Bench, Handle, log, render

HERE = Path(__file__).resolve().parent
PATH = "/api/1/devices/x"
TARGET_KEYS = ("nginx", "haproxy", "fastproxy", "fastproxy-httptools")
REQUEST = b"GET " + PATH.encode() + b" HTTP/1.1\r\nHost: localhost\r\n\r\n"


@dataclass(frozen=True)
class Settings:
    handshakes: int
    seconds: int
    idle: int
    runs: int
    key: str
    tls: str


@dataclass
class Row:
    key: str
    label: str
    full_us: list[float] = field(default_factory=list)
    resumed_us: list[float] = field(default_factory=list)
    resumed_share: list[float] = field(default_factory=list)
    tls_req_us: list[float] = field(default_factory=list)
    plain_req_us: list[float] = field(default_factory=list)
    idle_bytes: float | None = None


@dataclass
class Proxy:
    key: str
    label: str
    handle: Handle
    plain: int


def make_certificate(tmp: Path, kind: str) -> tuple[Path, Path, Path]:
    """A self-signed certificate for ``localhost`` and 127.0.0.1: (cert, key, cert+key PEM)."""
    cert, key = tmp / "tls.crt", tmp / "tls.key"
    newkey = ["-newkey", "rsa:2048"] if kind == "rsa" else ["-newkey", "ec", "-pkeyopt"]
    if kind != "rsa":
        newkey.append("ec_paramgen_curve:prime256v1")
    done = procs.run(
        [
            "openssl",
            "req",
            "-x509",
            *newkey,
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ]
    )
    if done.returncode != 0:
        raise RuntimeError(f"openssl req failed: {done.stderr.strip()}")
    pem = tmp / "tls.pem"
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    for path in (cert, key, pem):
        path.chmod(0o644)  # nginx workers run unprivileged
    return cert, key, pem


def client_context(cert: Path, version: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cert))
    pinned = ssl.TLSVersion.TLSv1_3 if version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.minimum_version = ctx.maximum_version = pinned
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def read_response(conn: ssl.SSLSocket) -> None:
    """Read one small 200 response whole (it carries Content-Length)."""
    status, length, body = clients._read_head(conn)
    if status != 200:
        raise RuntimeError(f"unexpected status {status}")
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed mid-body")
        body += chunk


def handshake(ctx: ssl.SSLContext, port: int, session: ssl.SSLSession | None) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="localhost", session=session)


def session_for(ctx: ssl.SSLContext, port: int) -> ssl.SSLSession:
    """A resumable session: after one request, so that TLS 1.3 tickets have arrived."""
    with handshake(ctx, port, None) as conn:
        conn.sendall(REQUEST)
        read_response(conn)
        session = conn.session
    if session is None:
        raise RuntimeError("the server gave no session to resume")
    return session


def handshakes(
    proxy: Proxy, ctx: ssl.SSLContext, count: int, *, resume: bool
) -> tuple[float, float]:
    """Proxy CPU microseconds per handshake, and the share the server resumed."""
    session = session_for(ctx, proxy.handle.port) if resume else None
    pids = proxy.handle.workers()
    resumed = 0
    before = procs.total_cpu(pids)
    for _ in range(count):
        conn = handshake(ctx, proxy.handle.port, session)
        resumed += bool(conn.session_reused)
        conn.close()
    time.sleep(0.5)  # the proxy's side of the closes
    spent = procs.total_cpu(pids) - before
    return spent / count * 1e6, resumed / count


def wrk_requests(proxy: Proxy, port: int, scheme: str, seconds: int) -> float:
    """Proxy CPU microseconds per request over ``seconds`` of ``wrk -t1 -c50``."""
    pids = proxy.handle.workers()
    url = f"{scheme}://localhost:{port}{PATH}"
    before = procs.total_cpu(pids)
    done = procs.run(["wrk", "-t1", "-c50", f"-d{seconds}s", url], timeout=seconds + 60)
    spent = procs.total_cpu(pids) - before
    found = re.search(r"(\d+) requests in", done.stdout)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"wrk failed: {done.stdout} {done.stderr}")
    if "Non-2xx" in done.stdout or "Socket errors" in done.stdout:
        raise RuntimeError(f"wrk saw errors against {proxy.label}: {done.stdout}")
    return spent / int(found.group(1)) * 1e6


def idle_memory(proxy: Proxy, ctx: ssl.SSLContext, count: int) -> float:
    """Resident bytes per idle TLS connection (after one request each), on a fresh process."""
    proxy.handle.restart(plain_http=False)
    session_for(ctx, proxy.handle.port)  # answering: its lazily built state exists
    pids = proxy.handle.workers()
    time.sleep(1.0)
    before = procs.total_rss(pids)
    held = []
    try:
        for _ in range(count):
            conn = handshake(ctx, proxy.handle.port, None)
            conn.sendall(REQUEST)
            read_response(conn)
            held.append(conn)
        time.sleep(1.0)
        after = procs.total_rss(pids)
    finally:
        for conn in held:
            conn.close()
    return (after - before) / count


class Runner:
    def __init__(self, bench: Bench, s: Settings, cert: Path, key: Path, pem: Path) -> None:
        self.bench = bench
        self.s = s
        self.cert, self.key, self.pem = cert, key, pem
        self.proxies: list[Proxy] = []
        self.rows: dict[str, Row] = {}
        self.unavailable: dict[str, str] = {}

    def add(
        self, key: str, label: str, argv: list[str], port: int, plain: int, forks: bool
    ) -> None:
        handle = Handle(self.bench, key, argv, port, forks=forks)
        procs.wait_port(plain)
        proxy = Proxy(key, label, handle, plain)
        ctx = client_context(self.cert, self.s.tls)
        session_for(ctx, port)  # the TLS port answers the allowed path
        self.proxies.append(proxy)
        self.rows[key] = Row(key, label)
        log(f"started {label}: TLS on {port}, plain on {plain}")

    def start_nginx(self) -> None:
        nginx = self.bench.nginx
        if nginx is None:
            self.unavailable["nginx"] = "nginx is not installed"
            return
        port, plain = procs.free_port(), procs.free_port()
        tmp = self.bench.tmp
        protocols = "TLSv1.2 TLSv1.3"
        conf = render(
            "nginx-tls.conf",
            tmp / "nginx-tls.conf",
            TMP=tmp,
            CERT=self.cert,
            KEY=self.key,
            PROTOCOLS=protocols,
            ORIGIN=self.bench.origin_port,
            PORT=port,
            PLAIN=plain,
        )
        version = procs.first_line([nginx, "-v"]).rpartition("/")[2]
        self.add("nginx", f"nginx {version}", [nginx, "-c", str(conf)], port, plain, True)

    def start_haproxy(self) -> None:
        haproxy = self.bench.haproxy
        if haproxy is None:
            self.unavailable["haproxy"] = "HAProxy is not installed"
            return
        port, plain = procs.free_port(), procs.free_port()
        conf = render(
            "haproxy-tls.cfg",
            self.bench.tmp / "haproxy-tls.cfg",
            PEM=self.pem,
            MIN_VER="TLSv1.2",
            ORIGIN=self.bench.origin_port,
            PORT=port,
            PLAIN=plain,
            MAXCONN=max(1000, (self.bench.nofile - 200) // 2),
        )
        version = procs.first_line([haproxy, "-v"]).split()[2]
        argv = [haproxy, "-db", "-f", str(conf)]
        self.add("haproxy", f"HAProxy {version}", argv, port, plain, False)

    def start_fastproxy(self, key: str, parser: str) -> None:
        port, plain = procs.free_port(), procs.free_port()
        conf = render(
            "fastproxy-tls.toml",
            self.bench.tmp / f"{key}-tls.toml",
            PARSER=parser,
            ORIGIN=self.bench.origin_port,
            CERT=self.cert,
            KEY=self.key,
            MIN_VER="1.2",
            PORT=port,
            PLAIN=plain,
        )
        check = procs.run([sys.executable, "-m", "fastproxy", "check", "-c", str(conf)])
        if check.returncode != 0:
            why = (check.stdout + check.stderr).strip().splitlines()
            self.unavailable[key] = (why[-1] if why else "refused").replace(
                str(self.bench.tmp), "$TMP"
            )
            log(f"{key}: not available: {self.unavailable[key]}")
            return
        argv = [sys.executable, "-m", "fastproxy", "run", "-c", str(conf), "--log-level", "warning"]
        self.add(key, f"fastproxy ({parser})", argv, port, plain, True)

    def measure(self) -> None:
        s = self.s
        ctx = client_context(self.cert, s.tls)
        steps: list[tuple[str, Callable[[Proxy, Row], None]]] = [
            ("full handshakes", lambda p, r: self._handshakes(p, r, ctx, resume=False)),
            ("resumed handshakes", lambda p, r: self._handshakes(p, r, ctx, resume=True)),
            (
                "TLS keep-alive requests",
                lambda p, r: r.tls_req_us.append(
                    wrk_requests(p, p.handle.port, "https", s.seconds)
                ),
            ),
            (
                "plain keep-alive requests",
                lambda p, r: r.plain_req_us.append(wrk_requests(p, p.plain, "http", s.seconds)),
            ),
        ]
        for run in range(1, s.runs + 1):
            for name, step in steps:
                for proxy in self.proxies:
                    log(f"run {run}/{s.runs}: {name}: {proxy.label}")
                    step(proxy, self.rows[proxy.key])
        for proxy in self.proxies:
            log(f"idle TLS connections: {proxy.label}")
            self.rows[proxy.key].idle_bytes = idle_memory(proxy, ctx, s.idle)

    def _handshakes(self, proxy: Proxy, row: Row, ctx: ssl.SSLContext, *, resume: bool) -> None:
        cost, share = handshakes(proxy, ctx, self.s.handshakes, resume=resume)
        if resume:
            row.resumed_us.append(cost)
            row.resumed_share.append(share)
        else:
            row.full_us.append(cost)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return ""
    return f" ({value / base:.2f}x)"


def table(rows: list[Row]) -> list[str]:
    nginx = next((r for r in rows if r.key == "nginx"), None)

    def col(row: Row, values: list[float], spec: str, base: list[float] | None) -> str:
        value = median(values)
        return fmt(value, spec) + ratio(value, median(base) if base is not None else None)

    lines = [
        "| proxy | CPU per full handshake (µs) | CPU per resumed handshake (µs), resumed "
        "| CPU per TLS request (µs) | CPU per plain request (µs) | TLS/plain "
        "| RSS per idle TLS connection (KB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        tls_req, plain_req = median(row.tls_req_us), median(row.plain_req_us)
        share = median(row.resumed_share)
        idle = row.idle_bytes / 1000 if row.idle_bytes is not None else None
        base_idle = nginx.idle_bytes / 1000 if nginx and nginx.idle_bytes is not None else None
        lines.append(
            f"| {row.label} "
            f"| {col(row, row.full_us, '.0f', nginx.full_us if nginx else None)} "
            f"| {col(row, row.resumed_us, '.0f', nginx.resumed_us if nginx else None)}, "
            f"{fmt(share * 100 if share is not None else None, '.0f')}% "
            f"| {col(row, row.tls_req_us, '.1f', nginx.tls_req_us if nginx else None)} "
            f"| {col(row, row.plain_req_us, '.1f', nginx.plain_req_us if nginx else None)} "
            f"| {fmt(tls_req / plain_req if tls_req and plain_req else None, '.2f')} "
            f"| {fmt(idle, '.1f')}{ratio(idle, base_idle)} |"
        )
    return lines


def write(out: Path, runner: Runner, s: Settings, date: str, elapsed: float) -> list[str]:
    rows = list(runner.rows.values())
    openssl = procs.first_line(["openssl", "version"])
    lines = [
        f"# TLS termination, side by side ({date})",
        "",
        "Written by `python -m bench.tls`; the module docstring says what each figure is. Ratios "
        "in brackets are to nginx in the same run. Medians of "
        f"{s.runs} interleaved runs; {s.handshakes} handshakes per figure, "
        f"`wrk -t1 -c50` for {s.seconds} s per request figure, {s.idle} idle connections.",
        "",
        f"Certificate: {'RSA 2048' if s.key == 'rsa' else 'ECDSA P-256'}, self-signed; protocol: "
        f"TLS {s.tls} (pinned on the client); {openssl}; Python {sys.version.split()[0]} "
        f"({ssl.OPENSSL_VERSION}); one worker per proxy on its own core. {elapsed / 60:.0f} min.",
        "",
        *table(rows),
        "",
    ]
    for key, why in runner.unavailable.items():
        lines.append(f"- {key}: not measured: {why}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "TLS.md").write_text("\n".join(lines) + "\n")
    data = {
        "date": date,
        "settings": dataclasses.asdict(s),
        "rows": [dataclasses.asdict(r) for r in rows],
        "unavailable": runner.unavailable,
    }
    (out / "tls.json").write_text(json.dumps(data, indent=1) + "\n")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tls",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--handshakes", type=int, default=2000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--key", choices=("ec", "rsa"), default="ec")
    parser.add_argument("--tls", choices=("1.3", "1.2"), default="1.3")
    parser.add_argument("--only", help="comma-separated proxies: " + ", ".join(TARGET_KEYS))
    parser.add_argument("--out", type=Path, default=HERE, help="where TLS.md and tls.json go")
    args = parser.parse_args(argv)
    if os.environ.get("CI"):
        parser.error("benchmarks never run in CI")
    for tool in ("taskset", "wrk", "openssl"):
        if shutil.which(tool) is None:
            parser.error(f"needs {tool}")
    s = Settings(args.handshakes, args.seconds, args.idle, args.runs, args.key, args.tls)
    only = set(args.only.split(",")) if args.only else None
    load_core, proxy_core, limit, _cores = procs.place_runner()
    log(f"load core {load_core}, proxy core {proxy_core}")
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    t0 = time.monotonic()
    bench_settings = dataclasses.replace(compare.QUICK, large_bytes=1 << 20)
    with tempfile.TemporaryDirectory(prefix="fastproxy-tls-") as tmpdir:
        tmp = Path(tmpdir)
        tmp.chmod(0o755)
        bench = Bench(bench_settings, tmp, proxy_core, load_core)
        bench.nofile = limit
        cert, key, pem = make_certificate(tmp, s.key)
        runner = Runner(bench, s, cert, key, pem)
        try:
            bench.start_origins()
            for target in TARGET_KEYS:
                if only is not None and target not in only:
                    continue
                if target == "nginx":
                    runner.start_nginx()
                elif target == "haproxy":
                    runner.start_haproxy()
                elif target == "fastproxy":
                    runner.start_fastproxy(target, "h11")
                else:
                    runner.start_fastproxy(target, "httptools")
            runner.measure()
        finally:
            bench.stop_all()
        lines = write(args.out, runner, s, date, time.monotonic() - t0)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
