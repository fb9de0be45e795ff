"""Rough CPU cost per proxied request: fastproxy (one worker) beside nginx (one worker).

Never run in CI. Needs ``wrk`` and, for the comparison and the origin, ``nginx`` (Debian:
``apt-get install wrk nginx-light``). Without nginx the origin is fastproxy's demo upstream and
only fastproxy is measured.

    python bench/cpu_per_request.py [--seconds 10] [--connections 32] [--path /api/1/devices/x]

For each proxy it runs wrk for the given time against the sdk policy's allowed path, reads the
proxy worker's user+system CPU time from /proc before and after, and prints CPU microseconds per
request. The load generator and the origin share the machine, so treat the figures as rough;
the CPU per request is the number that survives a noisy machine, requests/s is not.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out.extend(int(c) for c in text)
    return out


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing answered at {url}")


def run_wrk(url: str, seconds: int, connections: int) -> tuple[int, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    if "Non-2xx" in out:
        raise SystemExit(f"non-2xx answers from {url}:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return requests, rps


def measure(name: str, url: str, pids: list[int], seconds: int, connections: int) -> str:
    run_wrk(url, 2, connections)  # warm up: connections, pools, caches
    before = sum(cpu_seconds(p) for p in pids)
    requests, rps = run_wrk(url, seconds, connections)
    after = sum(cpu_seconds(p) for p in pids)
    us = (after - before) / requests * 1e6
    return f"| {name} | {requests} | {rps:.0f} | {us:.1f} |"


NGINX_ORIGIN = """
worker_processes 1; daemon off; pid {tmp}/origin.pid; error_log {tmp}/origin.err;
events {{ worker_connections 4096; }}
http {{ access_log off;
  server {{ listen 127.0.0.1:{port}; keepalive_requests 1000000; root {tmp}/www; }} }}
"""
NGINX_PROXY = """
worker_processes 1; daemon off; pid {tmp}/proxy.pid; error_log {tmp}/proxy.err;
events {{ worker_connections 4096; }}
http {{ access_log off;
  upstream origin {{ server 127.0.0.1:{origin}; keepalive 32; }}
  server {{ listen 127.0.0.1:{port}; keepalive_requests 1000000;
    location ~ ^/(api/1/devices|api/1/sessions)(/|$) {{
      proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection ""; }}
    location /sockets/1/ {{ proxy_pass http://origin; proxy_http_version 1.1; }}
    location / {{ return 403; }} }} }}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--path", default="/api/1/devices/x")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed")
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    procs: list[subprocess.Popen[bytes]] = []
    rows = ["| proxy | requests | requests/s | CPU µs per request |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)  # nginx workers run as an unprivileged user
        origin = free_port()
        body = Path(tmp, "www", *args.path.strip("/").split("/"))
        body.parent.mkdir(parents=True)
        for parent in body.parents:
            if str(parent).startswith(tmp):
                parent.chmod(0o755)
        body.write_text('{"ok":true}')
        try:
            if nginx:
                conf = Path(tmp, "origin.conf")
                conf.write_text(NGINX_ORIGIN.format(tmp=tmp, port=origin))
                procs.append(subprocess.Popen([nginx, "-c", str(conf)]))
            else:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "fastproxy.demo", "--port", str(origin)]
                    )
                )
            wait_http(f"http://127.0.0.1:{origin}{args.path}")

            port, admin = free_port(), free_port()
            conf = Path(tmp, "fastproxy.toml")
            conf.write_text(
                f'workers = 1\n[upstreams.origin]\nservers = ["127.0.0.1:{origin}"]\n'
                f'[listeners.sdk]\nbind = "127.0.0.1:{port}"\npolicy = "cobrowse-sdk"\n'
                f'upstream = "origin"\n[admin]\nbind = "127.0.0.1:{admin}"\n'
            )
            master = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fastproxy",
                    "run",
                    "-c",
                    str(conf),
                    "--log-level",
                    "warning",
                ]
            )
            procs.append(master)
            wait_http(f"http://127.0.0.1:{admin}/livez")
            url = f"http://127.0.0.1:{port}{args.path}"
            rows.append(
                measure(
                    "fastproxy (h11)", url, children(master.pid), args.seconds, args.connections
                )
            )

            if nginx:
                port = free_port()
                conf = Path(tmp, "proxy.conf")
                conf.write_text(NGINX_PROXY.format(tmp=tmp, port=port, origin=origin))
                proxy = subprocess.Popen([nginx, "-c", str(conf)])
                procs.append(proxy)
                wait_http(f"http://127.0.0.1:{port}{args.path}")
                url = f"http://127.0.0.1:{port}{args.path}"
                rows.append(
                    measure("nginx", url, children(proxy.pid), args.seconds, args.connections)
                )
        finally:
            for proc in reversed(procs):
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
