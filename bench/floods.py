"""Adversarial input shapes: a proxy's CPU per MB of each, and whether it stalls other clients.

    python -m bench.floods [--mb 4] [--cap 60] [--runs 3] [--only KEYS] [--label before]

Starts the same origins and proxies as ``bench.compare`` (same policy, one worker pinned to the
proxy core), then sends each proxy, on one connection, about ``--mb`` MB of each shape below:

1. ``plain``: a POST with a Content-Length body to the upload sink (the reference);
2. ``chunked-1``: the same POST with a chunked body of one-byte chunks (``1\\r\\nx\\r\\n``...);
3. ``chunk-ext``: one-byte chunks, each with a long chunk extension (``--ext-bytes``);
4. ``crlf``: empty lines (``\\r\\n``) before a request line; the proxy may close the connection
   at some point: measured until it does, the bytes sent until then reported;
5. ``pipelined``: small GETs (about 1 KB each, a few thousand) pipelined on one connection;
6. ``ws-tiny``: a WebSocket through the proxy to the echo origin, carrying masked frames of two
   bytes of payload each (the echoes are read back);
7. ``ws-cont``: the same, as one message of continuation frames of two bytes each;
8. ``resp-chunked-1``: the response side: the origin answers a GET with a chunked body of
   one-byte chunks (``--mb`` MB of it), read to its end by the client.

For each: the proxy workers' CPU time (on-CPU time of all their threads, from
``/proc/PID/task/TID/schedstat``) before and after, per MB of input (MB = 10^6 bytes; for
``resp-chunked-1`` the input is the upstream's body), and as a multiple of ``plain`` on the same
proxy. Meanwhile a probe, a GET of a small file on a second connection to the same worker, is
sent every 50 ms from the start of the flood until it ends (at least ``--probes`` of them): its
latency shows whether the flood freezes the worker for everyone else. Every shape is bounded by
its bytes and by ``--cap`` seconds of wall time ("> cap" then); a worker still busy afterwards
is restarted before the next shape. Writes ``FLOODS.md`` and ``floods.json`` into ``--out``.
Never part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import compare, procs, wsframes
from bench.clients import ResponseReader
from bench.compare import Bench, Target, log

HERE = Path(__file__).resolve().parent
MB = 1e6
PROBE_PATH = compare.SMALL_PATH
UPLOAD_PATH = compare.UPLOAD_PATH
WS_PATH = compare.WS_PATH
TARGET_KEYS = ("nginx", "haproxy", "fastproxy", "fastproxy-httptools")
SEND_PIECE = 64 * 1024
#: a shape whose flood took longer than this (seconds) is not run again
LONG_RUN = 10.0


@dataclass(frozen=True)
class Settings:
    bytes: int
    cap: float
    runs: int
    probes: int
    probe_interval: float
    ext_bytes: int
    settle: float


@dataclass
class Outcome:
    """What one flood did, seen from the client."""

    #: bytes the client wrote (socket buffers included)
    sent: int = 0
    #: bytes the client read back
    received: int = 0
    #: bytes the figures are divided by: what the proxy was given to read
    input_bytes: int = 0
    #: "complete", "closed" (by the proxy, before the shape's end) or "cap"
    end: str = ""
    #: what the proxy answered, for the report
    detail: str = ""
    wall: float = 0.0


@dataclass
class Measure:
    """One run of one shape on one proxy."""

    outcome: Outcome
    cpu: float  # on-CPU seconds of the workers, the probes' estimated cost taken off
    cpu_ticks: float  # user + system from /proc/PID/stat (10 ms ticks), probes included
    core_busy: float
    probes: list[float]  # seconds, every probe
    probes_in_flood: int
    probe_timeouts: int
    restarted: bool


@dataclass
class Results:
    labels: dict[str, str] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    #: target key -> CPU seconds of one probe request on an idle worker
    probe_cost: dict[str, float] = field(default_factory=dict)
    #: target key -> probe latencies with no flood (seconds)
    idle_probes: dict[str, list[float]] = field(default_factory=dict)
    #: shape key -> target key -> runs
    runs: dict[str, dict[str, list[Measure]]] = field(default_factory=dict)


# ------------------------------------------------------------------------ client side


class Deadline:
    def __init__(self, at: float) -> None:
        self.at = at

    def left(self) -> float:
        return self.at - time.monotonic()

    def passed(self) -> bool:
        return self.left() <= 0


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # a small send buffer: "sent" stays close to what the proxy has taken
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 128 * 1024)
    return sock


def send_bounded(sock: socket.socket, data: bytes, deadline: Deadline, out: Outcome) -> str:
    """Write ``data`` in pieces until done, the peer closes, or the deadline; return which."""
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        left = deadline.left()
        if left <= 0:
            return "cap"
        sock.settimeout(min(left, 1.0))
        try:
            n = sock.send(view[pos : pos + SEND_PIECE])
        except TimeoutError:
            continue
        except OSError:
            return "closed"
        pos += n
        out.sent += n
    return "complete"


class Reader(threading.Thread):
    """Reads one connection in the background until ``done(data)`` says so, EOF or deadline."""

    def __init__(
        self, sock: socket.socket, deadline: Deadline, done: Callable[[bytes], bool]
    ) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.deadline = deadline
        self.done = done
        self.received = 0
        self.first = b""  # the first few KB, for the report
        self.finished = False  # ``done`` said so
        self.eof = False
        self.error = ""

    def run(self) -> None:
        buf = bytearray(256 * 1024)
        view = memoryview(buf)
        while not self.deadline.passed():
            try:
                n = self.sock.recv_into(view)
            except TimeoutError:
                continue
            except OSError as err:
                self.error = type(err).__name__
                self.eof = True
                return
            if not n:
                self.eof = True
                return
            self.received += n
            data = bytes(view[:n])
            if len(self.first) < 4096:
                self.first += data[: 4096 - len(self.first)]
            if self.done(data):
                self.finished = True
                return


def status_of(first: bytes) -> str:
    """The status line's code and, for a sink answer, what it received."""
    if not first.startswith(b"HTTP/1."):
        return "no response" if not first else "not HTTP"
    code = first[9:12].decode(errors="replace")
    at = first.find(b'{"received":')
    if at >= 0:
        end = first.find(b"}", at)
        return f"{code}, sink got {int(first[at + 12 : end]):,} B"
    return code


def flood(
    port: int,
    setup: bytes,
    setup_done: Callable[[bytes], bool] | None,
    payload: bytes,
    done: Callable[[bytes], bool],
    start: Callable[[], None],
    cap: float,
    input_bytes: int | None = None,
) -> Outcome:
    """One connection: ``setup`` (not measured; its answer read until ``setup_done``), then
    ``start()``, then ``payload`` written while a reader waits for ``done``."""
    out = Outcome()
    with connect(port) as sock:
        if setup:
            sock.sendall(setup)
            got = b""
            sock.settimeout(10)
            while setup_done is not None and not setup_done(got):
                more = sock.recv(65536)
                if not more:
                    raise ConnectionError(f"port {port} closed during the setup: {got[:200]!r}")
                got += more
        sock.settimeout(1.0)
        start()
        t0 = time.monotonic()
        deadline = Deadline(t0 + cap)
        reader = Reader(sock, deadline, done)
        reader.start()
        sent = send_bounded(sock, payload, deadline, out)
        if sent == "complete":
            with contextlib.suppress(OSError):
                reader.join(max(0.0, deadline.left()))
        out.wall = time.monotonic() - t0
        cut = reader.is_alive()  # neither done nor closed by the proxy: the cap
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        reader.join(5)
        out.received = reader.received
        out.input_bytes = out.sent if input_bytes is None else input_bytes
        if reader.finished:
            out.end = "complete"
        elif cut and sent != "closed":
            out.end = "cap"
        else:
            out.end = "closed"
        out.detail = status_of(reader.first)
        if reader.eof and not reader.first:
            out.detail = f"closed without an answer ({reader.error or 'EOF'})"
        if out.sent < len(payload):
            out.detail += f", after {out.sent / MB:.2f} of {len(payload) / MB:.2f} MB sent"
    return out


def one_response() -> Callable[[bytes], bool]:
    reader = ResponseReader()
    return lambda data: reader.feed(data) > 0


def count_responses(n: int) -> Callable[[bytes], bool]:
    reader = ResponseReader()
    seen = [0]

    def done(data: bytes) -> bool:
        seen[0] += reader.feed(data)
        return seen[0] >= n

    return done


def count_bytes(n: int) -> Callable[[bytes], bool]:
    seen = [0]

    def done(data: bytes) -> bool:
        seen[0] += len(data)
        return seen[0] >= n

    return done


class ChunkedEnd:
    """Finds the end of one chunked response, in linear time (whatever the chunk sizes)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.in_head = True
        self.body = 0  # decoded body bytes

    def __call__(self, data: bytes) -> bool:
        buf = self.buf
        buf += data
        pos = 0
        if self.in_head:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            if b"chunked" not in bytes(buf[:end]).lower():
                raise ValueError(f"not a chunked response: {bytes(buf[:end])!r}")
            pos = end + 4
            self.in_head = False
        try:
            while True:
                line_end = buf.find(b"\r\n", pos)
                if line_end < 0:
                    return False
                size = int(bytes(buf[pos:line_end]).split(b";", 1)[0], 16)
                if size == 0:
                    return buf.find(b"\r\n\r\n", line_end) >= 0 or buf[line_end:] == b"\r\n\r\n"
                if len(buf) < line_end + 2 + size + 2:
                    return False
                self.body += size
                pos = line_end + 2 + size + 2
        finally:
            del buf[:pos]


# ------------------------------------------------------------------------ the shapes


def post_head(extra: str) -> bytes:
    return (
        f"POST {UPLOAD_PATH} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/octet-stream\r\n"
        f"{extra}\r\n"
    ).encode()


def shape_plain(port: int, s: Settings, start: Callable[[], None]) -> Outcome:
    length = s.bytes - len(post_head(f"Content-Length: {s.bytes}\r\n"))
    data = post_head(f"Content-Length: {length}\r\n") + bytes(length)
    return flood(port, b"", None, data, one_response(), start, s.cap)


def _chunked(port: int, s: Settings, start: Callable[[], None], unit: bytes) -> Outcome:
    head = post_head("Transfer-Encoding: chunked\r\n")
    n = (s.bytes - len(head) - 5) // len(unit)
    return flood(port, b"", None, head + unit * n + b"0\r\n\r\n", one_response(), start, s.cap)


def shape_chunked_1(port: int, s: Settings, start: Callable[[], None]) -> Outcome:
    return _chunked(port, s, start, b"1\r\nx\r\n")


def shape_chunk_ext(port: int, s: Settings, start: Callable[[], None]) -> Outcome:
    ext = b";e=" + b"v" * max(0, s.ext_bytes - 3)
    return _chunked(port, s, start, b"1" + ext + b"\r\nx\r\n")


def shape_crlf(port: int, s: Settings, start: Callable[[], None]) -> Outcome:
    request = compare_get(PROBE_PATH)
    lines = b"\r\n" * ((s.bytes - len(request)) // 2)
    return flood(port, b"", None, lines + request, one_response(), start, s.cap)


def compare_get(path: str, pad: int = 0) -> bytes:
    extra = f"X-Pad: {'p' * pad}\r\n" if pad else ""
    return (
        f"GET {path} HTTP/1.1\r\nHost: bench\r\nUser-Agent: bench-floods\r\n"
        f"Accept: application/json\r\n{extra}\r\n"
    ).encode()


def shape_pipelined(port: int, s: Settings, start: Callable[[], None]) -> Outcome:
    base = len(compare_get(PROBE_PATH, 1))
    request = compare_get(PROBE_PATH, 1000 - base + 1)  # 1000 bytes each
    n = s.bytes // len(request)
    out = flood(port, b"", None, request * n, count_responses(n), start, s.cap)
    if out.end == "complete":
        out.detail = f"{n:,} answers"
    return out


def ws_handshake() -> bytes:
    return wsframes.client_handshake(WS_PATH, "bench", wsframes.new_key())


def switched(got: bytes) -> bool:
    if b"\r\n\r\n" not in got:
        return False
    if not got.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"no WebSocket upgrade: {got[:200]!r}")
    return True


def ws_detail(out: Outcome, frames: int) -> Outcome:
    if out.end == "complete":
        out.detail = f"{frames:,} frames echoed"
    elif out.detail.startswith("not HTTP"):
        out.detail = f"{out.received // 4:,} of {frames:,} frames echoed"
    return out


def shape_ws_tiny(port: int, s: Settings, start: Callable[[], None]) -> Outcome:
    frame = wsframes.frame(wsframes.BINARY, b"ab", masked=True)
    n = s.bytes // len(frame)
    # each echo is an unmasked frame of 2 + 2 bytes
    out = flood(port, ws_handshake(), switched, frame * n, count_bytes(4 * n), start, s.cap)
    return ws_detail(out, n)


def shape_ws_cont(port: int, s: Settings, start: Callable[[], None]) -> Outcome:
    first = wsframes.frame(wsframes.BINARY, b"ab", masked=True, fin=False)
    middle = wsframes.frame(0, b"ab", masked=True, fin=False)
    last = wsframes.frame(0, b"ab", masked=True, fin=True)
    n = s.bytes // len(middle)
    data = first + middle * (n - 2) + last
    out = flood(port, ws_handshake(), switched, data, count_bytes(4 * n), start, s.cap)
    return ws_detail(out, n)


def shape_resp_chunked_1(port: int, s: Settings, start: Callable[[], None]) -> Outcome:
    n = (s.bytes - 5) // 6
    request = compare_get(f"{UPLOAD_PATH}?chunks={n}")
    end = ChunkedEnd()
    out = flood(port, b"", None, request, end, start, s.cap, input_bytes=6 * n + 5)
    if out.end == "complete":
        out.detail = f"{out.detail}, {end.body:,} B of body"
    return out


@dataclass(frozen=True)
class Shape:
    key: str
    label: str
    run: Callable[[int, Settings, Callable[[], None]], Outcome]


SHAPES = [
    Shape("plain", "plain Content-Length body (reference)", shape_plain),
    Shape("chunked-1", "chunked, 1-byte chunks", shape_chunked_1),
    Shape("chunk-ext", "chunked, 1-byte chunks with long extensions", shape_chunk_ext),
    Shape("crlf", "empty lines before a request line", shape_crlf),
    Shape("pipelined", "pipelined GETs of 1000 bytes", shape_pipelined),
    Shape("ws-tiny", "WebSocket, masked frames of 2 bytes", shape_ws_tiny),
    Shape("ws-cont", "WebSocket, one message of 2-byte continuation frames", shape_ws_cont),
    Shape("resp-chunked-1", "response: chunked, 1-byte chunks", shape_resp_chunked_1),
]


# ------------------------------------------------------------------------ probes


class Prober(threading.Thread):
    """GETs on a second keep-alive connection, ``interval`` apart, until stopped (and at least
    ``minimum`` of them); records each one's latency and whether the flood was still on."""

    def __init__(self, port: int, minimum: int, interval: float, timeout: float) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.minimum = minimum
        self.interval = interval
        self.timeout = timeout
        self.flooding = threading.Event()
        self.flooding.set()
        self.latencies: list[float] = []
        self.in_flood = 0
        self.timeouts = 0
        self.sock: socket.socket | None = None
        self.request = compare_get(PROBE_PATH)

    def connect(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.probe()  # a warm connection: the first request's own costs are not measured

    def probe(self) -> float:
        if self.sock is None:
            self.connect()
        sock = self.sock
        assert sock is not None
        reader = ResponseReader()
        t0 = time.perf_counter()
        sock.settimeout(self.timeout)
        try:
            sock.sendall(self.request)
            while True:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("probe connection closed")
                if reader.feed(data):
                    break
        except OSError:
            sock.close()
            self.sock = None
            raise
        if reader.statuses[-1] != 200:
            raise RuntimeError(f"probe answered {reader.statuses[-1]} on port {self.port}")
        return time.perf_counter() - t0

    def run(self) -> None:
        while self.flooding.is_set() or len(self.latencies) < self.minimum:
            during = self.flooding.is_set()
            t0 = time.perf_counter()
            try:
                lat = self.probe()
            except OSError:
                lat = time.perf_counter() - t0
                self.timeouts += 1
            self.latencies.append(lat)
            self.in_flood += during
            time.sleep(self.interval)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


# ------------------------------------------------------------------------ the runner


class Runner:
    def __init__(self, bench: Bench, s: Settings) -> None:
        self.bench = bench
        self.s = s
        self.results = Results()

    def targets(self, only: set[str] | None) -> list[Target]:
        return [
            t
            for t in self.bench.targets
            if t.key in TARGET_KEYS and (only is None or t.key in only)
        ]

    def settle(self, t: Target) -> bool:
        """Wait until the workers idle (< 2% of a core over 0.5 s); False if they stay busy."""
        deadline = time.monotonic() + self.s.settle
        while time.monotonic() < deadline:
            pids = t.workers()
            before = procs.total_oncpu(pids)
            time.sleep(0.5)
            if procs.total_oncpu(pids) - before < 0.01:
                return True
        return False

    def restart(self, t: Target) -> None:
        """A fresh proxy process; a worker that outlives its master is killed by its pid."""
        old = t.workers()
        log(f"  restarting {t.label}: its workers are still busy")
        t.handle.restart()
        for pid in old:
            if pid in t.workers():
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def idle_probes(self, t: Target) -> None:
        prober = Prober(t.port, 0, self.s.probe_interval, 10)
        prober.connect()
        n = 200
        pids = t.workers()
        before = procs.total_oncpu(pids)
        for _ in range(n):
            prober.probe()
        self.results.probe_cost[t.key] = (procs.total_oncpu(pids) - before) / n
        self.results.idle_probes[t.key] = [prober.probe() for _ in range(self.s.probes)]
        for _ in range(self.s.probes):
            time.sleep(self.s.probe_interval)
            self.results.idle_probes[t.key].append(prober.probe())
        prober.close()

    def measure(self, t: Target, shape: Shape) -> Measure:
        restarted = False
        if not self.settle(t):
            self.restart(t)
            restarted = True
        pids = t.workers()
        core = self.bench.proxy_core
        prober = Prober(t.port, self.s.probes, self.s.probe_interval, self.s.cap + 10)
        prober.connect()
        marks: dict[str, float] = {}
        cpu = ticks = busy = 0.0

        def start() -> None:
            marks["cpu"] = procs.total_oncpu(pids)
            marks["ticks"] = procs.total_cpu(pids)
            marks["core"] = procs.core_busy(core) if core is not None else 0.0
            prober.start()

        try:
            outcome = shape.run(t.port, self.s, start)
        finally:
            if "cpu" in marks:
                prober.flooding.clear()
                cpu = procs.total_oncpu(pids) - marks["cpu"]
                ticks = procs.total_cpu(pids) - marks["ticks"]
                busy = procs.core_busy(core) - marks["core"] if core is not None else float("nan")
                prober.join(self.s.cap + 60)
            prober.close()
        # the probes sent while the CPU was being counted
        cpu -= self.results.probe_cost.get(t.key, 0.0) * prober.in_flood
        return Measure(
            outcome=outcome,
            cpu=max(cpu, 0.0),
            cpu_ticks=ticks,
            core_busy=busy,
            probes=prober.latencies,
            probes_in_flood=prober.in_flood,
            probe_timeouts=prober.timeouts,
            restarted=restarted,
        )

    def run(self, only: set[str] | None, shapes: list[Shape]) -> None:
        for t in self.targets(only):
            self.results.labels[t.key] = t.label
            log(f"{t.label}")
            self.idle_probes(t)
            for shape in shapes:
                runs = self.results.runs.setdefault(shape.key, {}).setdefault(t.key, [])
                for i in range(self.s.runs):
                    m = self.measure(t, shape)
                    runs.append(m)
                    o = m.outcome
                    log(
                        f"  {shape.key} run {i + 1}: {o.end} ({o.detail}) in {o.wall:.2f} s, "
                        f"{o.input_bytes / MB:.2f} MB in, CPU {m.cpu:.3f} s = "
                        f"{m.cpu / (o.input_bytes / MB) * 1e3 if o.input_bytes else 0:.1f} ms/MB,"
                        f" probe max {max(m.probes) * 1e3:.1f} ms "
                        f"({m.probes_in_flood} in the flood)"
                    )
                    if o.end == "cap" or o.wall > LONG_RUN:
                        break  # a long run is its own figure: no need to wait again
            if not self.settle(t):
                self.restart(t)


# ------------------------------------------------------------------------ report


def median_cpu_per_mb(ms: list[Measure]) -> float | None:
    values = [m.cpu / (m.outcome.input_bytes / MB) for m in ms if m.outcome.input_bytes]
    return statistics.median(values) if values else None


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def cell_cpu(ms: list[Measure], plain: float | None) -> tuple[str, str]:
    """(CPU ms/MB, x plain), with ">" when a run was cut at the cap (a lower bound then)."""
    per_mb = median_cpu_per_mb(ms)
    capped = any(m.outcome.end == "cap" for m in ms)
    mark = "> " if capped else ""
    ratio = per_mb / plain if per_mb is not None and plain else None
    return f"{mark}{fmt(per_mb and per_mb * 1e3, '.1f')}", f"{mark}{fmt(ratio, '.1f')}"


def outcome_text(ms: list[Measure], cap: float) -> str:
    o = ms[-1].outcome
    if o.end == "cap":
        return f"**> cap** ({cap:.0f} s), {o.sent / MB:.2f} MB sent"
    if o.end == "closed":
        return f"closed by the proxy after {o.sent / MB:.2f} MB sent; {o.detail}"
    return o.detail


def report(r: Results, s: Settings, meta: dict[str, object]) -> str:
    cap = s.cap
    keys = [k for k in TARGET_KEYS if k in r.labels]
    lines = [
        f"# Flood shapes: proxy CPU per MB and probe latency{meta['title_suffix']}",
        "",
        f"Written by `{meta['command']}` on {meta['date']} ({meta['elapsed_min']:.1f} min).",
        "",
        f"Each shape is about {s.bytes / MB:g} MB sent by one client on one connection to a proxy "
        "with one worker pinned to its own core; the proxy forwards it to the origin (the upload "
        "sink, the WebSocket echo, or the small-file origin for the GETs). CPU is the worker "
        "processes' on-CPU time (user + system, /proc/PID/task/TID/schedstat) from the start of "
        "the flood to its end, minus the estimated cost of the probe requests sent meanwhile; "
        "per MB of input (MB = 10^6 bytes; for the response shape, the upstream's chunked body). "
        f"Median of {s.runs} run(s), one when a flood took over {LONG_RUN:.0f} s. "
        f'"> cap": the flood was cut after {cap:.0f} s of wall '
        "time, and the figure divides the CPU spent until then by the bytes sent until then (a "
        "lower bound: not all of them had been processed).",
        "",
        "## CPU ms per MB (x plain body on the same proxy)",
        "",
        "| shape | " + " | ".join(r.labels[k] for k in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for shape in SHAPES:
        per = r.runs.get(shape.key, {})
        if not per:
            continue
        cells = []
        for k in keys:
            plain = median_cpu_per_mb(r.runs.get("plain", {}).get(k, []))
            if k not in per:
                cells.append("—")
                continue
            per_mb, ratio = cell_cpu(per[k], plain)
            cells.append(f"{per_mb} ({ratio}x)")
        lines.append(f"| {shape.key} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Every shape on every proxy",
        "",
        "| shape | proxy | outcome | input MB | wall s | CPU s | CPU ms/MB | x plain | "
        "probe p50 ms | probe p99 ms | probe max ms | probes (in flood) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in SHAPES:
        for k in keys:
            ms = r.runs.get(shape.key, {}).get(k)
            if not ms:
                continue
            plain = median_cpu_per_mb(r.runs.get("plain", {}).get(k, []))
            cpu_mb, ratio = cell_cpu(ms, plain)
            probes = [p for m in ms for p in m.probes]
            in_flood = sum(m.probes_in_flood for m in ms)
            timeouts = sum(m.probe_timeouts for m in ms)
            wall = statistics.median(m.outcome.wall for m in ms)
            cpu = statistics.median(m.cpu for m in ms)
            capped = ms[-1].outcome.end == "cap"
            mark = "> " if capped else ""
            restarted = " (worker restarted before)" if any(m.restarted for m in ms) else ""
            lines.append(
                f"| {shape.key} | {r.labels[k]} | {outcome_text(ms, cap)}{restarted} | "
                f"{statistics.median(m.outcome.input_bytes for m in ms) / MB:.2f} | "
                f"{mark}{wall:.2f} | {mark}{cpu:.3f} | {cpu_mb} | {ratio} | "
                f"{compare.percentile(probes, 50) * 1e3:.1f} | "
                f"{compare.percentile(probes, 99) * 1e3:.1f} | {max(probes) * 1e3:.1f} | "
                f"{len(probes)} ({in_flood}){f', {timeouts} failed' if timeouts else ''} |"
            )
    lines += [
        "",
        "Shapes: " + "; ".join(f"`{sh.key}`: {sh.label}" for sh in SHAPES) + f". Chunk "
        f"extensions are {s.ext_bytes} bytes (`;e=vvv...`). The WebSocket shapes read every "
        "echo back; `pipelined` reads every answer.",
        "",
        f"Probe: `GET {PROBE_PATH}` on a second, already open keep-alive connection to the same "
        f"worker, one every {s.probe_interval * 1e3:.0f} ms (after the previous answer) from the "
        f"start of the flood until its end, and at least {s.probes} in all (so the fast shapes' "
        'probes mostly ran after the flood: "in flood" counts those sent while it was on). '
        "p99 and max over all runs' probes. With no flood:",
        "",
    ]
    for k in keys:
        idle = r.idle_probes.get(k, [])
        if idle:
            lines.append(
                f"- {r.labels[k]}: probe p50 {compare.percentile(idle, 50) * 1e3:.2f} ms, max "
                f"{max(idle) * 1e3:.2f} ms; one probe costs "
                f"{r.probe_cost.get(k, 0) * 1e6:.0f} µs of worker CPU (taken off the figures, "
                "for the probes sent during a flood)"
            )
    for k, why in r.unavailable.items():
        lines.append(f"- not available: {k}: {why}")
    versions = meta["versions"]
    commands = meta["commands"]
    assert isinstance(versions, dict) and isinstance(commands, list)
    lines += ["", "## Machine and versions", ""]
    lines += [f"- {k}: {v}" for k, v in versions.items()]
    lines += [
        "- placement: every proxy pinned to core 1 with `taskset -c 1` (one worker, one thread); "
        "origins, clients and probes on core 0",
        "",
        "## Settings",
        "",
        "```",
        json.dumps(dataclasses.asdict(s), indent=1),
        "```",
        "",
        "## Exact commands",
        "",
        "Configs are `bench/configs/` rendered into a temporary directory (`$TMP`), as by "
        "`bench.compare`.",
        "",
        "```",
        *commands,
        "```",
        "",
    ]
    return "\n".join(lines)


def save_json(path: Path, r: Results, s: Settings, meta: dict[str, object]) -> None:
    doc = {"settings": dataclasses.asdict(s), "meta": meta, "results": dataclasses.asdict(r)}
    path.write_text(json.dumps(doc, indent=1) + "\n")


# ------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.floods",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--mb", type=float, default=4.0, help="MB (10^6 bytes) per shape")
    parser.add_argument("--cap", type=float, default=60.0, help="wall seconds per flood at most")
    parser.add_argument("--runs", type=int, default=3, help="runs per shape (median)")
    parser.add_argument("--probes", type=int, default=20, help="probes per flood at least")
    parser.add_argument("--ext-bytes", type=int, default=1000, help="chunk extension length")
    parser.add_argument(
        "--only", help="comma-separated proxies (nginx, haproxy, fastproxy, fastproxy-httptools)"
    )
    parser.add_argument("--shapes", help="comma-separated shapes (default: all)")
    parser.add_argument("--label", default="", help='a word for the title, e.g. "before"')
    parser.add_argument("--out", type=Path, default=HERE, help="where FLOODS.md and floods.json go")
    args = parser.parse_args(argv)
    if os.environ.get("CI"):
        parser.error("benchmarks never run in CI")
    if shutil.which("taskset") is None:
        parser.error("needs taskset (Debian: apt-get install util-linux)")
    s = Settings(
        bytes=int(args.mb * MB),
        cap=args.cap,
        runs=args.runs,
        probes=args.probes,
        probe_interval=0.05,
        ext_bytes=args.ext_bytes,
        settle=20.0,
    )
    only = set(args.only.split(",")) if args.only else None
    wanted = set(args.shapes.split(",")) if args.shapes else None
    shapes = [sh for sh in SHAPES if wanted is None or sh.key in wanted]
    if wanted is not None and "plain" not in wanted:
        log("without the plain shape there is no ratio to it")

    load_core, proxy_core, limit, _cores = procs.place_runner()
    log(f"load core {load_core}, proxy core {proxy_core}")
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    t0 = time.monotonic()
    # the compare runner's processes, with a small file for its unused download path
    bench_settings = dataclasses.replace(compare.QUICK, large_bytes=1 << 20)
    with tempfile.TemporaryDirectory(prefix="fastproxy-floods-") as tmpdir:
        tmp = Path(tmpdir)
        bench = Bench(bench_settings, tmp, proxy_core, load_core)
        bench.nofile = limit
        runner = Runner(bench, s)
        try:
            bench.start_origins()
            for key in TARGET_KEYS:
                if only is not None and key not in only:
                    continue
                if key == "nginx":
                    bench.start_nginx()
                elif key == "haproxy":
                    bench.start_haproxy()
                elif key == "fastproxy":
                    bench.start_fastproxy(key, "fastproxy (h11)")
                else:
                    bench.start_fastproxy(key, "fastproxy (httptools)", parser="httptools")
            runner.results.unavailable.update(bench.results.unavailable)
            runner.run(only, shapes)
        finally:
            bench.stop_all()
        commands = compare.clean_commands(procs.COMMANDS, tmp)
    elapsed = time.monotonic() - t0
    command = " ".join(["python -m bench.floods", *(argv if argv is not None else sys.argv[1:])])
    meta: dict[str, object] = {
        "title_suffix": f" ({args.label})" if args.label else "",
        "label": args.label,
        "command": command,
        "date": date,
        "elapsed_min": elapsed / 60,
        "versions": compare.versions(),
        "commands": commands,
    }
    text = report(runner.results, s, meta)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "FLOODS.md").write_text(text)
    save_json(args.out / "floods.json", runner.results, s, meta)
    print(text)
    log(f"wrote {args.out / 'FLOODS.md'} in {elapsed / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
