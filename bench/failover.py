"""Failover: one of two upstream servers killed under steady load, then restored.

    python -m bench.failover [--rate 400] [--down 20] [--only checks,passive] [--out bench]

Starts two origins (``python -m bench.failover --origin PORT TAG``: a tiny uvloop server whose
every answer is a 200 with its tag as the body, so each response tells which server sent it)
and fastproxy (two workers, one upstream with both servers, the sdk listener's preset policy),
then, from this process, a steady paced load: ``--connections`` keep-alive connections sending
``--rate`` requests a second in all. After ``--warmup`` seconds origin B is killed (SIGKILL: no
FIN, no goodbye), ``--down`` seconds later it is started again on the same port, and the load
goes on for ``--after`` seconds. Meanwhile admin ``/metrics`` is polled every 50 ms for
``fastproxy_upstream_up`` of B.

Reported, per configuration (``checks``: health checks on with their defaults; ``passive``:
``health = false``, passive marks only):

- requests sent, and failed (a status other than 200, or a connection error) while B was down
  and in all;
- time from the kill until ``fastproxy_upstream_up`` of B read 0 (marked down);
- time from the restart until B answered a request again (traffic back), and until the metric
  read 1;
- the connect failures the proxy retried on A (``fastproxy_upstream_errors_total``).

Writes ``FAILOVER.md`` and ``failover.json`` into ``--out`` and the table to stdout. Never part
of the test suite (refuses to run when ``CI`` is set).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import signal
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import uvloop

from bench import procs
from bench.procs import Started

CONFIG = """\
workers = 2

[upstreams.pair]
servers = ["127.0.0.1:{a}", "127.0.0.1:{b}"]
{health}

[listeners.sdk]
bind = "127.0.0.1:{port}"
policy = "cobrowse-sdk"
upstream = "pair"

[listeners.sdk.limits]
max_connections_per_client = 0

[admin]
bind = "127.0.0.1:{admin}"
"""
HEALTH = {"checks": "", "passive": "health = false", "before": ""}
TARGET = b"/api/1/devices/x"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- the origin -------------------------------------------------------------------------------


class _Origin(asyncio.Protocol):
    """Answers every request head with a 200 whose body is the tag (requests have no body)."""

    def __init__(self, response: bytes) -> None:
        self.response = response
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        count = self.buf.count(b"\r\n\r\n")
        if count and self.transport is not None:
            self.buf = self.buf[self.buf.rfind(b"\r\n\r\n") + 4 :]
            self.transport.write(self.response * count)


def run_origin(port: int, tag: str) -> None:
    body = tag.encode()
    response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Origin(response), "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    uvloop.run(serve())


# -- the load ---------------------------------------------------------------------------------


@dataclass
class Sample:
    #: seconds since the load started
    at: float
    #: 200, another status, or 0 for a connection error
    status: int
    #: which origin answered ("" when none did)
    origin: str


async def _client(port: int, interval: float, stop: float, t0: float, out: list[Sample]) -> None:
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    request = b"GET %s HTTP/1.1\r\nHost: bench\r\n\r\n" % TARGET
    next_at = time.monotonic()
    while time.monotonic() < stop:
        now = time.monotonic()
        if next_at > now:
            await asyncio.sleep(next_at - now)
        next_at += interval
        sent = time.monotonic() - t0
        try:
            if writer is None or reader is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            status = int(head.split(b" ", 2)[1])
            length = 0
            close = False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
                elif name.strip().lower() == b"connection" and b"close" in value.lower():
                    close = True
            body = await reader.readexactly(length)
            out.append(Sample(sent, status, body.decode() if status == 200 else ""))
            if close:
                writer.close()
                reader = writer = None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            out.append(Sample(sent, 0, ""))
            if writer is not None:
                writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


def _metric(admin: int, name: str, *labels: str) -> float | None:
    """The sum of the samples of ``name`` whose labels include every one of ``labels``."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=2) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and all(label in line for label in labels)
    ]
    return sum(values) if values else None


# -- one run ----------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    sent: int = 0
    failed_total: int = 0
    failed_while_down: int = 0
    failed_statuses: dict[str, int] = field(default_factory=dict)
    marked_down_s: float | None = None
    traffic_back_s: float | None = None
    metric_up_s: float | None = None
    retried_connects: float | None = None
    b_share_before: float = 0.0
    b_share_after: float = 0.0


@dataclass
class Settings:
    rate: int
    connections: int
    warmup: float
    down: float
    after: float


def one_run(name: str, s: Settings, workdir: Path, source: Path | None = None) -> Row:
    """One configuration; ``source``: run fastproxy from that source tree instead."""
    row = Row(name)
    a_port, b_port = procs.free_port(), procs.free_port()
    port, admin = procs.free_port(), procs.free_port()
    config = workdir / f"fastproxy-{name}.toml"
    config.write_text(
        CONFIG.format(a=a_port, b=b_port, port=port, admin=admin, health=HEALTH[name])
    )
    me = [sys.executable, "-m", "bench.failover", "--origin"]
    env_dir = workdir / f"metrics-{name}"
    env_dir.mkdir(exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(env_dir)
    origin_a = Started("origin-a", [*me, str(a_port), "A"], workdir / "origin-a.log")
    origin_b = Started("origin-b", [*me, str(b_port), "B"], workdir / "origin-b.log")
    python = [sys.executable]
    if source is not None:
        # -P: the current directory (this tree) is not put before PYTHONPATH (that one)
        python = [sys.executable, "-P"]
        os.environ["PYTHONPATH"] = str(source)
    try:
        proxy = Started(
            "fastproxy",
            [*python, "-m", "fastproxy", "run", "-c", str(config)],
            workdir / f"fastproxy-{name}.log",
        )
    finally:
        os.environ.pop("PYTHONPATH", None)
    restarted: Started | None = None
    try:
        procs.wait_port(a_port)
        procs.wait_port(b_port)
        procs.wait_http(f"http://127.0.0.1:{admin}/livez")
        b_label = f'server="127.0.0.1:{b_port}"'
        total = s.warmup + s.down + s.after
        samples: list[Sample] = []
        polls: list[tuple[float, float | None]] = []

        async def load() -> None:
            t0 = time.monotonic()
            stop = t0 + total
            interval = s.connections / s.rate
            clients = [
                asyncio.ensure_future(_client(port, interval, stop, t0, samples))
                for _ in range(s.connections)
            ]
            loop = asyncio.get_running_loop()
            nonlocal restarted
            killed_at = s.warmup
            back_at = s.warmup + s.down
            killed = False
            while time.monotonic() < stop:
                at = time.monotonic() - t0
                if not killed and at >= killed_at:
                    origin_b.stop(signal.SIGKILL)
                    killed = True
                    log(f"{name}: origin B killed at {at:.2f} s")
                if restarted is None and at >= back_at:
                    restarted = Started("origin-b", [*me, str(b_port), "B"], workdir / "b2.log")
                    log(f"{name}: origin B restarted at {at:.2f} s")
                value = await loop.run_in_executor(
                    None, _metric, admin, "fastproxy_upstream_up", b_label
                )
                polls.append((time.monotonic() - t0, value))
                await asyncio.sleep(0.05)
            await asyncio.gather(*clients)

        uvloop.run(load())
        kill, back = s.warmup, s.warmup + s.down
        row.sent = len(samples)
        for sample in samples:
            if sample.status != 200:
                row.failed_total += 1
                key = str(sample.status) if sample.status else "connection error"
                row.failed_statuses[key] = row.failed_statuses.get(key, 0) + 1
                if kill <= sample.at < back:
                    row.failed_while_down += 1
        row.marked_down_s = next((t - kill for t, v in polls if t >= kill and v == 0.0), None)
        row.metric_up_s = next((t - back for t, v in polls if t >= back and v == 1.0), None)
        ordered = sorted(samples, key=lambda x: x.at)
        row.traffic_back_s = next(
            (x.at - back for x in ordered if x.at >= back and x.origin == "B"), None
        )
        before = [x for x in samples if x.at < kill and x.status == 200]
        settled = back + (row.traffic_back_s or 0.0) + 2.0
        after = [x for x in samples if x.at >= settled and x.status == 200]
        row.b_share_before = sum(x.origin == "B" for x in before) / max(1, len(before))
        row.b_share_after = sum(x.origin == "B" for x in after) / max(1, len(after))
        row.retried_connects = _metric(
            admin, "fastproxy_upstream_errors_total", 'kind="upstream_failed"'
        )
        log(f"{name}: {row}")
        return row
    finally:
        proxy.stop()
        for started in (origin_a, origin_b, restarted):
            if started is not None:
                started.stop()


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


def report(rows: list[Row], s: Settings, out: Path) -> str:
    lines = [
        "# Failover: one of two upstream servers killed under load",
        "",
        f"Written by `python -m bench.failover` on {datetime.date.today().isoformat()}: "
        f"{s.rate} requests/s over {s.connections} keep-alive connections through fastproxy "
        f"(2 workers) to two origins; origin B killed (SIGKILL) after {s.warmup:g} s, started "
        f"again on the same port {s.down:g} s later, load for {s.after:g} s more. "
        "`checks`: health checks on, defaults (`GET /up` every 2 s, timeout 1 s, rise 1, "
        "fall 2); `passive`: `health = false` (passive marks only, `down_for_s = 10`).",
        "",
        "| configuration | requests | failed while B down | failed in all | marked down after "
        "| traffic back after restart | metric 1 after restart | connect failures (retried) "
        "| B's share before / after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        failed = ", ".join(f"{v} x {k}" for k, v in sorted(r.failed_statuses.items())) or "none"
        lines.append(
            f"| {r.name} | {r.sent} | {r.failed_while_down} | {r.failed_total} ({failed}) | "
            f"{_seconds(r.marked_down_s)} | {_seconds(r.traffic_back_s)} | "
            f"{_seconds(r.metric_up_s)} | {r.retried_connects or 0:.0f} | "
            f"{r.b_share_before:.0%} / {r.b_share_after:.0%} |"
        )
    lines += [
        "",
        "`before` (with `--baseline DIR`): the same run against fastproxy as it was before "
        "upstream health (the source tree in DIR, no `health` key): passive marks per worker "
        'only, no retry on another server, no `fastproxy_upstream_up` (so no "marked down" '
        "reading).",
        "",
        "With `passive` the metric reads 1 again whenever a mark expires (every `down_for_s`) "
        "while B is still dead: the next connect to it fails, is retried on A and marks it "
        "again; that is why traffic comes back only when the last mark expires.",
        "",
        '"Marked down after" is read from admin `/metrics` polled every 50 ms; the first '
        "failed connect marks the server down in the worker that saw it at once, before the "
        "master's table reaches the others. Failed connects are tried again on the other server, "
        "so they cost the client a connect attempt (on loopback, a refused connect: well under "
        "a millisecond), not an error.",
        "",
    ]
    text = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "FAILOVER.md").write_text(text)
    (out / "failover.json").write_text(
        json.dumps(
            {"settings": dataclasses.asdict(s), "rows": [dataclasses.asdict(r) for r in rows]},
            indent=2,
        )
        + "\n"
    )
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--origin", nargs=2, metavar=("PORT", "TAG"), help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=int, default=400)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--down", type=float, default=20.0)
    parser.add_argument("--after", type=float, default=15.0)
    parser.add_argument("--only", default="checks,passive")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a source tree of fastproxy before upstream health: adds a 'before' row",
    )
    args = parser.parse_args(argv)
    if args.origin:
        with contextlib.suppress(KeyboardInterrupt):
            run_origin(int(args.origin[0]), args.origin[1])
        return 0
    if os.environ.get("CI"):
        print("bench.failover does not run in CI", file=sys.stderr)
        return 2
    settings = Settings(args.rate, args.connections, args.warmup, args.down, args.after)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastproxy-failover-") as tmp:
        if args.baseline is not None:
            rows.append(one_run("before", settings, Path(tmp), args.baseline.resolve()))
        for name in args.only.split(","):
            rows.append(one_run(name, settings, Path(tmp)))
    print(report(rows, settings, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
