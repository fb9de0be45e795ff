"""Reloads with long-lived WebSockets: nginx, HAProxy and fastproxy, each the way it reloads.

    python -m bench.reload [--websockets 1000] [--reloads 10] [--only KEYS] [--out bench]

Starts the same origins as ``bench.compare`` and, one at a time, each proxy with the same policy
as there (the sdk listener's policy of the Cobrowse preset; one worker pinned to the proxy core),
plus one extra route (``/api/1/extra/``, forwarded to the Python origin) that the reloads remove
and add back. For each proxy, in one run:

1. ``--websockets`` WebSockets through the proxy to the echo origin, one echo on each;
2. keep-alive HTTP load (``wrk -t1 -c8``) against an allowed API path for the whole phase;
3. ``--reloads`` reloads, one a second: the configuration file is rewritten with the extra route
   removed (odd reloads) or added back (even ones; the last reload adds it) and the proxy is told
   the way its packaging does: ``nginx -s reload`` (SIGHUP to the nginx master); HAProxy in
   master-worker mode (``-W``), ``haproxy -c`` then SIGUSR2 to the master (what the Debian unit's
   ``ExecReload`` does: the master re-executes itself, passes the listening sockets to the new
   worker and asks the old one to finish, ``-sf``); fastproxy: SIGHUP to the master. After each
   one, fresh connections poll the extra route until it answers the new way;
4. after a settle of ``--settle`` seconds: the WebSockets still open and answering an echo, the
   HTTP requests that failed during the phase (wrk's status >= 400 and socket errors), the
   proxy's processes (master and all descendants) and their total RSS and PSS (``/proc``) now
   against before the reloads, and whether the extra route is in force.

Two more rows, unless ``--only`` leaves them out: nginx with ``worker_shutdown_timeout`` and
HAProxy with ``hard-stop-after`` (``--bound`` seconds), the knobs that bound how long old
processes live; by default (the first rows) neither is set, as packaged. Each proxy's phase is
capped at ``--cap`` seconds. Writes ``RELOAD.md`` and ``reload.json`` into ``--out`` and the table
to stdout. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

from bench import compare, procs
from bench.clients import WsConn
from bench.compare import Bench, log
from bench.procs import Started

HERE = Path(__file__).resolve().parent
API_PATH = compare.SMALL_PATH
WS_PATH = compare.WS_PATH
DENIED_PATH = compare.DENIED_PATH
EXTRA_PREFIX = "/api/1/extra/"
EXTRA_PATH = EXTRA_PREFIX + "x"
KEYS = ("nginx", "nginx-bounded", "haproxy", "haproxy-bounded", "fastproxy")
MB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    websockets: int
    reloads: int
    interval: float
    settle: float
    lead_in: float
    wrk_connections: int
    echo_timeout: float
    cap: float
    bound: int


@dataclass
class Row:
    """One proxy's phase."""

    key: str
    label: str
    reload_command: str
    error: str = ""
    ws_opened: int = 0
    ws_open_after: int = 0
    ws_echoed_after: int = 0
    fresh_ws_echo: bool = False
    http_requests: int = 0
    http_status_errors: int = 0
    http_socket_errors: dict[str, int] = field(default_factory=dict)
    http_failed: int = 0
    #: per reload: milliseconds until a fresh connection saw the new route state, None: not seen
    applied_ms: list[float | None] = field(default_factory=list)
    procs_before: int = 0
    procs_after: int = 0
    #: pid -> command line, of every proxy process before and after
    cmdlines_before: dict[int, str] = field(default_factory=dict)
    cmdlines_after: dict[int, str] = field(default_factory=dict)
    rss_before: int = 0
    rss_after: int = 0
    pss_before: int = 0
    pss_after: int = 0
    extra_route_after: int = 0
    denied_after: int = 0
    elapsed: float = 0.0


# ------------------------------------------------------------------------ configurations


def edit(text: str, old: str, new: str) -> str:
    """``text`` with the one occurrence of ``old`` replaced: a template change fails loudly."""
    if text.count(old) != 1:
        raise ValueError(f"expected one {old!r} in a rendered configuration")
    return text.replace(old, new)


def nginx_variants(base: str, bound: int | None) -> tuple[str, str]:
    """(without the extra route, with it), from the rendered ``nginx-proxy.conf``."""
    if bound is not None:
        base = edit(
            base,
            "worker_processes 1;\n",
            f"worker_processes 1;\nworker_shutdown_timeout {bound}s;\n",
        )
    deny = "        location / { return 403; }\n"
    extra = f"        location {EXTRA_PREFIX} {{ proxy_pass http://py; }}\n"
    return base, edit(base, deny, extra + deny)


def haproxy_variants(base: str, bound: int | None) -> tuple[str, str]:
    """(without, with) from the rendered ``haproxy.cfg``."""
    if bound is not None:
        base = edit(base, "    nbthread 1\n", f"    nbthread 1\n    hard-stop-after {bound}s\n")
    deny = "    http-request deny deny_status 403 unless devices or sessions or sockets\n"
    use = "    use_backend py if upload or sockets\n"
    added = edit(
        edit(
            base, deny, f"    acl extra path_beg {EXTRA_PREFIX}\n" + deny.rstrip() + " or extra\n"
        ),
        use,
        use.rstrip() + " or extra\n",
    )
    return base, added


def fastproxy_variants(base: str) -> tuple[str, str]:
    """(without, with) from the rendered ``fastproxy.toml``: one more rule of the policy."""
    rule = (
        "\n[policies.bench-sdk.rules.extra]\n"
        f'prefix = "{EXTRA_PREFIX}"\naction = "forward"\nupstream = "py"\n'
    )
    return base, base + rule


def write_atomically(path: Path, text: str) -> None:
    """What an operator's editor or deployment tool does: a new file renamed over the old."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    tmp.replace(path)


# ------------------------------------------------------------------------ processes


def family(pid: int) -> list[int]:
    """``pid`` and all its descendants that are still there."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        if not Path(f"/proc/{p}").exists():
            continue
        out.append(p)
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            todo.extend(procs.children(p))
    return out


def cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        return raw.replace(b"\0", b" ").decode(errors="replace").strip()
    return "?"


def pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages divided among the processes that map them."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def memory(pids: list[int]) -> tuple[int, int]:
    rss = pss = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            rss += procs.rss_bytes(pid)
            pss += pss_bytes(pid)
    return rss, pss


def status(url: str, timeout: float = 1.0) -> int:
    """The status of a GET on a fresh connection; -1 when there was no answer."""
    request = urllib.request.Request(url, headers={"Connection": "close"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            code: int = resp.status
            return code
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return -1


WRK_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def parse_wrk(text: str, row: Row) -> None:
    found = re.search(r"(\d+) requests in ([\d.]+)", text)
    if found is None:
        raise RuntimeError(f"no summary from wrk: {text}")
    row.http_requests = int(found.group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    row.http_status_errors = int(bad.group(1)) if bad else 0
    errs = WRK_ERRORS.search(text)
    names = ("connect", "read", "write", "timeout")
    row.http_socket_errors = {n: int(errs.group(i + 1)) if errs else 0 for i, n in enumerate(names)}
    row.http_failed = row.http_status_errors + sum(row.http_socket_errors.values())


# ------------------------------------------------------------------------ one proxy


@dataclass
class Proxy:
    """A proxy as an operator runs it: a master, a configuration file, a way to reload."""

    key: str
    label: str
    argv: list[str]
    conf: Path
    variants: tuple[str, str]
    port: int
    reload: Callable[[Started], None]
    reload_command: str
    proc: Started | None = None


class Runner:
    def __init__(self, bench: Bench, s: Settings) -> None:
        self.bench = bench
        self.s = s
        self.rows: list[Row] = []
        self.unavailable: dict[str, str] = {}

    # ---------------------------------------------------------------- the proxies

    def nginx(self, key: str, bound: int | None) -> Proxy | None:
        nginx = self.bench.nginx
        if nginx is None:
            self.unavailable[key] = "nginx is not installed"
            return None
        port = procs.free_port()
        conf = compare.render(
            "nginx-proxy.conf",
            self.bench.tmp / f"{key}.conf",
            TMP=self.bench.tmp,
            PORT=port,
            ORIGIN=self.bench.origin_port,
            PY=self.bench.py_port,
        )
        # the pid file and error log of one instance must not be the other's
        base = conf.read_text().replace("nginx-proxy.", f"{key}.")
        version = procs.first_line([nginx, "-v"]).split("/")[-1]
        label = f"nginx {version}" + (f", worker_shutdown_timeout {bound}s" if bound else "")

        def reload(proc: Started) -> None:
            out = procs.run([nginx, "-c", str(conf), "-s", "reload"], timeout=30)
            if out.returncode != 0:
                raise RuntimeError(f"nginx -s reload failed: {out.stderr.strip()}")

        return Proxy(
            key,
            label,
            [nginx, "-c", str(conf)],
            conf,
            nginx_variants(base, bound),
            port,
            reload,
            "nginx -c FILE -s reload (SIGHUP to the master)",
        )

    def haproxy(self, key: str, bound: int | None) -> Proxy | None:
        haproxy = self.bench.haproxy
        if haproxy is None:
            self.unavailable[key] = "HAProxy is not installed"
            return None
        port = procs.free_port()
        conf = compare.render(
            "haproxy.cfg",
            self.bench.tmp / f"{key}.cfg",
            PORT=port,
            ORIGIN=self.bench.origin_port,
            PY=self.bench.py_port,
            MAXCONN=max(1000, (self.bench.nofile - 200) // 2),
        )
        version = procs.first_line([haproxy, "-v"]).split()[2]
        label = f"HAProxy {version}" + (f", hard-stop-after {bound}s" if bound else "")

        def reload(proc: Started) -> None:
            check = procs.run([haproxy, "-c", "-q", "-f", str(conf)], timeout=30)
            if check.returncode != 0:
                raise RuntimeError(f"haproxy -c failed: {check.stdout}{check.stderr}")
            os.kill(proc.pid, signal.SIGUSR2)

        return Proxy(
            key,
            label,
            # -W: master-worker mode, -db: the master stays in the foreground
            [haproxy, "-W", "-db", "-f", str(conf)],
            conf,
            haproxy_variants(conf.read_text(), bound),
            port,
            reload,
            "haproxy -c -q -f FILE, then SIGUSR2 to the master (-W)",
        )

    def fastproxy(self, key: str) -> Proxy | None:
        conf, port, _tunnel = self.bench.fastproxy_config(
            key, workers=1, parser="h11", admin=True, per_client=0
        )
        check = procs.run([sys.executable, "-m", "fastproxy", "check", "-c", str(conf)])
        if check.returncode != 0:
            self.unavailable[key] = (check.stdout + check.stderr).strip()
            return None
        version = procs.first_line([sys.executable, "-m", "fastproxy", "version"])

        def reload(proc: Started) -> None:
            os.kill(proc.pid, signal.SIGHUP)

        argv = [sys.executable, "-m", "fastproxy", "run", "-c", str(conf), "--log-level", "info"]
        return Proxy(
            key,
            f"{version} (h11)",
            argv,
            conf,
            fastproxy_variants(conf.read_text()),
            port,
            reload,
            "SIGHUP to the master",
        )

    def start(self, p: Proxy) -> Started:
        write_atomically(p.conf, p.variants[1])
        proc = self.bench.start(p.key, p.argv, self.bench.proxy_core)
        procs.wait_children(proc.pid, 1)
        url = f"http://127.0.0.1:{p.port}"
        procs.wait_http(url + API_PATH)
        Bench.policy_check(url, True)
        if status(url + EXTRA_PATH) != 200:
            raise RuntimeError(f"{p.label}: the extra route is not in force at the start")
        return proc

    def role(self, proc: Started, pid: int) -> str:
        """A process's command line for the report, the master marked, no machine paths."""
        text = cmdline(pid).replace(str(self.bench.tmp), "$TMP").replace(sys.executable, "python")
        return f"(master) {text}" if pid == proc.pid else text

    def stop(self, proc: Started) -> None:
        """SIGTERM to the master, then any descendant left behind is killed by its pid."""
        left = family(proc.pid)
        proc.stop()
        self.bench.started.remove(proc)
        time.sleep(0.2)
        for pid in left:
            if Path(f"/proc/{pid}").exists() and pid != proc.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    # ---------------------------------------------------------------- the phase

    def run_one(self, p: Proxy) -> Row:
        row = Row(p.key, p.label, p.reload_command)
        log(f"{p.label}")
        proc = self.start(p)
        t0 = time.monotonic()
        try:
            uvloop.run(asyncio.wait_for(self.phase(p, proc, row), self.s.cap))
        except TimeoutError:
            row.error = f"phase cut at the cap ({self.s.cap:.0f} s)"
        except Exception as err:  # reported in its row; the other proxies still run
            row.error = f"{type(err).__name__}: {err}"
        finally:
            row.elapsed = time.monotonic() - t0
            self.stop(proc)
        if row.error:
            log(f"  {p.label}: {row.error}")
        return row

    async def phase(self, p: Proxy, proc: Started, row: Row) -> None:
        s = self.s
        url = f"http://127.0.0.1:{p.port}"
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(64)

        async def open_one() -> WsConn | None:
            async with sem:
                try:
                    _t, conn = await loop.create_connection(
                        lambda: WsConn(WS_PATH), "127.0.0.1", p.port
                    )
                except OSError:
                    return None
            return conn if await conn.opened else None

        async def echo(c: WsConn) -> bool:
            async with sem:
                try:
                    await c.echo(b"still there?", s.echo_timeout)
                    return True
                except (TimeoutError, ConnectionError, AssertionError):
                    return False

        got = await asyncio.gather(*(open_one() for _ in range(s.websockets)))
        conns = [c for c in got if c is not None]
        wrk: subprocess.Popen[str] | None = None
        try:
            row.ws_opened = sum(await asyncio.gather(*(echo(c) for c in conns)))
            log(f"  {row.ws_opened} of {s.websockets} WebSockets open and echoing")
            if row.ws_opened < s.websockets:
                raise RuntimeError(f"only {row.ws_opened} of {s.websockets} WebSockets echoed")
            pids = family(proc.pid)
            row.procs_before = len(pids)
            row.cmdlines_before = {pid: self.role(proc, pid) for pid in pids}
            row.rss_before, row.pss_before = memory(pids)

            seconds = s.lead_in + s.reloads * s.interval + s.settle
            argv = procs.taskset(
                self.bench.load_core,
                [
                    "wrk",
                    "-t1",
                    f"-c{s.wrk_connections}",
                    f"-d{seconds:.0f}s",
                    f"{url}{API_PATH}",
                ],
            )
            procs.COMMANDS.append(shlex.join(argv))
            wrk = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            await asyncio.sleep(s.lead_in)
            for k in range(1, s.reloads + 1):
                start = time.monotonic()
                added = k % 2 == 0
                write_atomically(p.conf, p.variants[1 if added else 0])
                p.reload(proc)
                want = 200 if added else 403
                applied: float | None = None
                while time.monotonic() - start < s.interval * 0.9:
                    if status(url + EXTRA_PATH, 0.5) == want:
                        applied = (time.monotonic() - start) * 1e3
                        break
                    await asyncio.sleep(0.01)
                row.applied_ms.append(applied)
                await asyncio.sleep(max(0.0, start + s.interval - time.monotonic()))
            out, _err = await loop.run_in_executor(None, lambda: wrk_output(wrk))
            parse_wrk(out, row)

            pids = family(proc.pid)
            row.procs_after = len(pids)
            row.cmdlines_after = {pid: self.role(proc, pid) for pid in pids}
            row.rss_after, row.pss_after = memory(pids)
            row.extra_route_after = status(url + EXTRA_PATH)
            row.denied_after = status(url + DENIED_PATH)
            open_after = [c for c in conns if c.is_open]
            row.ws_open_after = len(open_after)
            row.ws_echoed_after = sum(await asyncio.gather(*(echo(c) for c in open_after)))
            fresh = await open_one()
            if fresh is not None:
                row.fresh_ws_echo = await echo(fresh)
                fresh.close()
            applied_ok = [a for a in row.applied_ms if a is not None]
            log(
                f"  after {s.reloads} reloads: {row.ws_echoed_after} WebSockets echoing "
                f"({row.ws_open_after} open), {row.http_failed} of {row.http_requests} "
                f"requests failed, processes {row.procs_before} -> {row.procs_after}, RSS "
                f"{row.rss_before / MB:.1f} -> {row.rss_after / MB:.1f} MB, extra route "
                f"{row.extra_route_after}, {len(applied_ok)}/{s.reloads} reloads seen"
            )
        finally:
            if wrk is not None and wrk.poll() is None:
                wrk.kill()
                wrk.wait()
            for c in conns:
                c.close()
            await asyncio.sleep(0.5)

    def run(self, keys: list[str]) -> None:
        makers: dict[str, Callable[[], Proxy | None]] = {
            "nginx": lambda: self.nginx("nginx", None),
            "nginx-bounded": lambda: self.nginx("nginx-bounded", self.s.bound),
            "haproxy": lambda: self.haproxy("haproxy", None),
            "haproxy-bounded": lambda: self.haproxy("haproxy-bounded", self.s.bound),
            "fastproxy": lambda: self.fastproxy("fastproxy"),
        }
        for key in keys:
            p = makers[key]()
            if p is not None:
                self.rows.append(self.run_one(p))


def wrk_output(wrk: subprocess.Popen[str]) -> tuple[str, str]:
    out, err = wrk.communicate(timeout=60)
    if wrk.returncode != 0:
        raise RuntimeError(f"wrk failed: {out} {err}")
    return out, err


# ------------------------------------------------------------------------ report


def applied_text(row: Row) -> str:
    seen = [a for a in row.applied_ms if a is not None]
    if not seen:
        return f"0 of {len(row.applied_ms)}"
    return f"{len(seen)} of {len(row.applied_ms)} (max {max(seen):.0f} ms)"


def table(rows: list[Row], s: Settings) -> list[str]:
    lines = [
        f"| proxy | WebSockets open / echoing after (of {s.websockets}) | HTTP failed / requests "
        "| extra processes (before → after) | RSS MB before → after | PSS MB before → after "
        "| reloads seen in force within 1 s | added route after the last reload "
        "| a new WebSocket after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.error and not r.procs_after:
            lines.append(f"| {r.label} | failed: {r.error} | | | | | | | |")
            continue
        errs = {k: v for k, v in r.http_socket_errors.items() if v}
        detail = ", ".join(
            [f"{r.http_status_errors} status >= 400"] * bool(r.http_status_errors)
            + [f"{v} {k}" for k, v in errs.items()]
        )
        failed = f"{r.http_failed} / {r.http_requests}" + (f" ({detail})" if detail else "")
        extra = r.procs_after - r.procs_before
        route = {200: "yes (200)", 403: "no (403)"}.get(
            r.extra_route_after, f"no ({r.extra_route_after})"
        )
        lines.append(
            f"| {r.label} | {r.ws_open_after} / {r.ws_echoed_after} | {failed} | "
            f"{extra:+d} ({r.procs_before} → {r.procs_after}) | "
            f"{r.rss_before / MB:.1f} → {r.rss_after / MB:.1f} | "
            f"{r.pss_before / MB:.1f} → {r.pss_after / MB:.1f} | {applied_text(r)} | {route} | "
            f"{'echoes' if r.fresh_ws_echo else 'no echo'} |"
        )
    return lines


def report(
    rows: list[Row], s: Settings, meta: dict[str, object], unavailable: dict[str, str]
) -> str:
    versions = meta["versions"]
    commands = meta["commands"]
    assert isinstance(versions, dict) and isinstance(commands, list)
    lines = [
        "# Reloads with long-lived WebSockets",
        "",
        f"Written by `{meta['command']}` on {meta['date']} ({meta['elapsed_min']:.1f} min).",
        "",
        f"Each proxy with one worker (nginx `worker_processes 1`, HAProxy `nbthread 1`, fastproxy "
        f"`workers = 1`) pinned to its own core, the policy of `bench.compare`, and an extra route "
        f"`{EXTRA_PREFIX}` forwarded to the Python origin. {s.websockets} WebSockets through it "
        f"to the echo origin (one echo each), then `wrk -t1 -c{s.wrk_connections}` on "
        f"`{API_PATH}` for {s.lead_in + s.reloads * s.interval + s.settle:.0f} s, during which "
        f"{s.reloads} reloads, {s.interval:.0f} s apart, alternately remove the extra route (odd "
        f"reloads) and add it back (even ones, the last included); {s.settle:.0f} s after the "
        "last one: the WebSockets still open, and answering one more echo within "
        f"{s.echo_timeout:.0f} s; the HTTP requests that failed meanwhile; the proxy's processes "
        "and their memory against before the reloads; the extra route's answer.",
        "",
        *table(rows, s),
        "",
        "Every WebSocket is opened before the first reload, so one old nginx or HAProxy worker "
        "(the first one) holds them all; the workers of the later reloads held only wrk's "
        "keep-alive connections, which they closed when told to stop (the `read` errors), and "
        "exited. Clients that open WebSockets between reloads would keep one old worker per "
        "reload alive (not measured here). The bounded rows lose every WebSocket when the "
        "bound expires after the first reload.",
        "",
        "## How each proxy is reloaded",
        "",
    ]
    for r in rows:
        lines.append(f"- {r.label}: {r.reload_command}")
    lines += [
        "",
        "The configuration file is rewritten (a new file renamed over it) before each "
        "reload. nginx and HAProxy run with their packaged defaults: neither "
        "`worker_shutdown_timeout` (nginx) nor `hard-stop-after` (HAProxy) is set unless the "
        "row says so. Without them an old worker keeps serving the connections it holds (a "
        "WebSocket stays on the configuration it was opened under) until they close; with them "
        "it is killed after that many seconds, and its WebSockets with it. fastproxy has no old "
        "processes: its master validates the file and sends it to the live worker, which swaps "
        "its routing tables between requests.",
        "",
        "## Reading the columns",
        "",
        "- **WebSockets open / echoing**: connections the client still sees open, and those of "
        "them that answered one more message.",
        "- **HTTP failed**: wrk's non-2xx/3xx answers (status >= 400) plus its socket errors "
        "(`read`: the proxy closed a connection with a request outstanding, or reset it; "
        "`connect`: refused; `timeout`: no answer within 2 s). wrk reconnects after each error "
        "and counts no retry; a client that retries idempotent requests on a closed keep-alive "
        "connection would hide the `read` ones.",
        "- **extra processes**: the proxy's master and all its descendants after the settle, "
        "minus before the reloads.",
        "- **RSS** sums every process's resident set (pages shared between a master and its "
        "workers count in each); **PSS** divides shared pages among the processes that map "
        "them.",
        "- **reloads seen in force**: after each reload, fresh connections asked for the extra "
        "route every 10 ms until it answered the new way (200 after an add, 403 after a "
        "removal); the time is from the start of the reload command.",
        "",
        "## Processes after the reloads",
        "",
    ]
    for r in rows:
        if r.cmdlines_after:
            names = sorted(r.cmdlines_after.values())
            counts = {n: names.count(n) for n in dict.fromkeys(names)}
            shown = "; ".join(f"{c} x `{n}`" if c > 1 else f"`{n}`" for n, c in counts.items())
            new_pids = len(set(r.cmdlines_after) - set(r.cmdlines_before))
            gone = len(set(r.cmdlines_before) - set(r.cmdlines_after))
            same = "same pids as before" if not new_pids and not gone else ""
            change = same or f"{new_pids} new, {gone} gone since before the reloads"
            lines.append(f"- {r.label} ({change}): {shown}")
    for r in rows:
        if r.error:
            lines.append(f"- {r.label}: error: {r.error}")
    for k, why in unavailable.items():
        lines.append(f"- not available: {k}: {why}")
    lines += ["", "## Machine and versions", ""]
    lines += [f"- {k}: {v}" for k, v in versions.items()]
    lines += [
        "- placement: every proxy pinned to core 1 with `taskset -c 1`; origins, wrk and the "
        "clients on core 0",
        "",
        "## Settings",
        "",
        "```",
        json.dumps(dataclasses.asdict(s), indent=1),
        "```",
        "",
        "## Exact commands",
        "",
        "Configs are `bench/configs/` rendered into a temporary directory (`$TMP`) as by "
        "`bench.compare`, with the extra route (and a row's knob) added.",
        "",
        "```",
        *commands,
        "```",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.reload",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--websockets", type=int, default=1000, help="WebSockets held")
    parser.add_argument("--reloads", type=int, default=10, help="reloads, one a second")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds after the last reload")
    parser.add_argument("--cap", type=float, default=120.0, help="seconds per proxy at most")
    parser.add_argument(
        "--bound", type=int, default=5, help="seconds of the knob rows' old-process bound"
    )
    parser.add_argument("--only", help=f"comma-separated rows ({', '.join(KEYS)})")
    parser.add_argument("--out", type=Path, default=HERE, help="where RELOAD.md and reload.json go")
    args = parser.parse_args(argv)
    if os.environ.get("CI"):
        parser.error("benchmarks never run in CI")
    if shutil.which("wrk") is None or shutil.which("taskset") is None:
        parser.error("needs wrk and taskset (Debian: apt-get install wrk util-linux)")
    keys = [k for k in KEYS if not args.only or k in args.only.split(",")]
    s = Settings(
        websockets=args.websockets,
        reloads=args.reloads,
        interval=1.0,
        settle=args.settle,
        lead_in=1.0,
        wrk_connections=8,
        echo_timeout=5.0,
        cap=args.cap,
        bound=args.bound,
    )

    load_core, proxy_core, limit, _cores = procs.place_runner()
    log(f"open-files limit {limit}; load core {load_core}, proxy core {proxy_core}")
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    t0 = time.monotonic()
    bench_settings = dataclasses.replace(compare.QUICK, large_bytes=1 << 20)
    with tempfile.TemporaryDirectory(prefix="fastproxy-reload-") as tmpdir:
        tmp = Path(tmpdir)
        bench = Bench(bench_settings, tmp, proxy_core, load_core)
        bench.nofile = limit
        runner = Runner(bench, s)
        try:
            bench.start_origins()
            runner.run(keys)
        finally:
            bench.stop_all()
        commands = compare.clean_commands(procs.COMMANDS, tmp)
    elapsed = time.monotonic() - t0
    command = " ".join(["python -m bench.reload", *(argv if argv is not None else sys.argv[1:])])
    meta: dict[str, object] = {
        "command": command,
        "date": date,
        "elapsed_min": elapsed / 60,
        "versions": compare.versions(),
        "commands": commands,
    }
    text = report(runner.rows, s, meta, runner.unavailable)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "RELOAD.md").write_text(text)
    doc = {
        "settings": dataclasses.asdict(s),
        "meta": meta,
        "rows": [dataclasses.asdict(r) for r in runner.rows],
        "unavailable": runner.unavailable,
        "median_applied_ms": {
            r.key: statistics.median(a)
            if (a := [x for x in r.applied_ms if x is not None])
            else None
            for r in runner.rows
        },
    }
    (args.out / "reload.json").write_text(json.dumps(doc, indent=1) + "\n")
    print("\n".join(table(runner.rows, s)))
    log(f"wrote {args.out / 'RELOAD.md'} in {elapsed / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
