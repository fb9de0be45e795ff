"""Processes and /proc: ports, start and stop, CPU time, resident memory, pinning.

Everything here reads Linux's /proc; the runner needs Linux anyway (taskset, nginx, HAProxy).
"""

from __future__ import annotations

import contextlib
import os
import resource
import shlex
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

#: every command the runner started, in order, for RESULTS.md
COMMANDS: list[str] = []


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, all its threads, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def total_cpu(pids: Sequence[int]) -> float:
    return sum(cpu_seconds(p) for p in pids)


def oncpu_seconds(pid: int) -> float:
    """Time a process's threads spent on a CPU (user plus system), in nanosecond resolution.

    From ``/proc/PID/task/TID/schedstat``; ``cpu_seconds`` counts in clock ticks (10 ms), too
    coarse for a transfer that costs a few milliseconds.
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def total_oncpu(pids: Sequence[int]) -> float:
    return sum(oncpu_seconds(p) for p in pids)


def rss_bytes(pid: int) -> int:
    """Resident set size (anonymous and file-backed pages) of a process."""
    fields = Path(f"/proc/{pid}/statm").read_text().split()
    return int(fields[1]) * PAGE


def core_busy(core: int) -> float:
    """Seconds a CPU core spent busy (user, nice, system, irq, softirq; not idle, not steal).

    On the proxy's own core this adds the kernel's packet work done there (softirq), which
    ``cpu_seconds`` does not charge to any process.
    """
    name = f"cpu{core} "
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(name):
                v = [int(x) for x in line.split()[1:8]]
                return (v[0] + v[1] + v[2] + v[5] + v[6]) / CLK_TCK
    raise ValueError(f"no {name.strip()} in /proc/stat")


def total_rss(pids: Sequence[int]) -> int:
    return sum(rss_bytes(p) for p in pids)


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            out.extend(int(c) for c in (task / "children").read_text().split())
    return out


def wait_children(pid: int, count: int, timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = children(pid)
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise RuntimeError(f"process {pid} did not start {count} children")


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port}")


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing answered at {url}")


def raise_nofile(target: int = 65536) -> int:
    """Raise this process's open-files limit (children inherit it); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(target, soft)
    with contextlib.suppress(ValueError, OSError):
        # root may raise the hard limit too (up to fs.nr_open)
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
        return want
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def pin_self(cores: set[int]) -> None:
    os.sched_setaffinity(0, cores)


def taskset(core: int | None, argv: Sequence[str]) -> list[str]:
    """``argv`` under ``taskset -c core`` (taskset execs, so the pid stays the program's)."""
    if core is None:
        return list(argv)
    return ["taskset", "-c", str(core), *argv]


class Started:
    """A process the runner started; only these are ever signalled, by their own pid."""

    def __init__(
        self, name: str, argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None
    ) -> None:
        """``env``: variables set for the process on top of the runner's own."""
        self.name = name
        self.argv = list(argv)
        COMMANDS.append(
            " ".join(
                [*(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()), shlex.join(self.argv)]
            )
        )
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env} if env else None,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        self._log.close()


def run(
    argv: Sequence[str], timeout: float = 600.0, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, recorded for RESULTS.md; ``env`` as for ``Started``."""
    COMMANDS.append(
        " ".join([*(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()), shlex.join(argv)])
    )
    return subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **env} if env else None,
    )


def first_line(argv: Sequence[str]) -> str:
    """The first non-empty output line of a version command, or "not installed"."""
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    for line in (out.stdout + out.stderr).splitlines():
        if line.strip():
            return line.strip()
    return "unknown"


def place_runner(nofile: int = 65536) -> tuple[int | None, int | None, int, set[int]]:
    """Pin this runner to the first core it may use (the load core) and raise its open-files
    limit; return ``(load_core, proxy_core, limit, every core it could use)`` (no cores named
    on a single-core machine)."""
    cores = sorted(os.sched_getaffinity(0))
    load_core, proxy_core = (cores[0], cores[1]) if len(cores) >= 2 else (None, None)
    if load_core is not None:
        pin_self({load_core})
    return load_core, proxy_core, raise_nofile(nofile), set(cores)
