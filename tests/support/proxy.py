"""Run fastproxy as a real subprocess for the end-to-end tests.

``ProxyFactory`` writes a TOML config into a temporary directory, picks free loopback ports, starts
``python -m fastproxy run -c FILE`` with stdout and stderr in files beside it, and waits until
``GET /livez`` on the admin port answers 200. Stopping sends SIGTERM to the master by PID and
waits; a master that does not exit is killed by PID, together with the workers it had forked.

The default config is the Cobrowse preset on two listeners (``sdk``, ``agent``) in front of one
upstream, with one worker and a 2 s first-byte timeout (tests of the 504 path; other tests keep
upstream delays below it). ``overrides`` is deep-merged into it; ``extra`` is appended as TOML.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from support.client import ConnectionClosedError, build_request, http_request
from support.upstream import RecordingUpstream

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
FIRST_BYTE_TIMEOUT_S = 2.0
LISTENERS = ("sdk", "agent")

TomlTable = Mapping[str, object]


#: ports ``free_port`` has handed out in this process: the kernel may hand a port that was just
#: bound and closed to the next caller again, and two listeners of one config would then clash
_GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on right now (bind to 0, read it, close), and one not
    handed out before in this test process."""
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port
    raise AssertionError("no fresh loopback port after 1000 tries")


# -- a small TOML writer: tomllib reads, the standard library has no writer ----------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        items = (f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + ", ".join(items) + " }"
    raise TypeError(f"no TOML form for {value!r}")


def to_toml(document: TomlTable) -> str:
    """Serialise nested mappings as TOML tables (``[a.b]``), scalars and arrays as values."""
    lines: list[str] = []

    def emit(path: tuple[str, ...], table: TomlTable) -> None:
        scalars = [(k, v) for k, v in table.items() if not isinstance(v, Mapping)]
        tables = [(k, v) for k, v in table.items() if isinstance(v, Mapping)]
        if path and (scalars or not tables):
            lines.append("")
            lines.append("[" + ".".join(_toml_key(part) for part in path) + "]")
        lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in scalars)
        for key, sub in tables:
            assert isinstance(sub, Mapping)
            emit((*path, key), sub)

    emit((), document)
    return "\n".join(lines).lstrip("\n") + "\n"


def merge(base: TomlTable, overrides: TomlTable) -> dict[str, object]:
    """``base`` with ``overrides`` merged in, tables recursively; neither is changed."""
    merged: dict[str, object] = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        current = merged.get(key)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            merged[key] = merge(current, value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def default_config(
    servers: Sequence[str],
    *,
    first_byte_timeout_s: float = FIRST_BYTE_TIMEOUT_S,
    http_parser: str = "h11",
) -> dict[str, object]:
    """The preset on both listeners in front of ``servers``; binds are filled in at start."""
    return {
        "workers": 1,
        "http_parser": http_parser,
        "upstreams": {
            "cobrowse": {"servers": list(servers), "first_byte_timeout_s": first_byte_timeout_s}
        },
        "listeners": {
            "sdk": {"policy": "cobrowse-sdk", "upstream": "cobrowse"},
            "agent": {"policy": "cobrowse-agent", "upstream": "cobrowse"},
        },
        "admin": {},
    }


class ProxyStartError(Exception):
    """The proxy exited or did not become live in time; the message carries its output."""


@dataclass
class RunningProxy:
    """One fastproxy master process and what it was started with."""

    process: subprocess.Popen[bytes]
    config_path: Path
    config_text: str
    #: listener name -> port, plus ``"admin"``
    ports: dict[str, int]
    stdout_path: Path
    stderr_path: Path
    returncode: int | None = field(default=None)
    #: the document the config file was written from (binds filled in)
    document: dict[str, object] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def sdk_port(self) -> int:
        return self.ports["sdk"]

    @property
    def agent_port(self) -> int:
        return self.ports["agent"]

    @property
    def admin_port(self) -> int:
        return self.ports["admin"]

    def port(self, listener: str) -> int:
        return self.ports[listener]

    def worker_pids(self) -> list[int]:
        """The master's children, its workers (Linux ``/proc``; empty once it is gone)."""
        return _children(self.pid)

    def alive(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        """The proxy's stdout and stderr so far, for failure reports."""
        parts = [f"# config {self.config_path.name}\n{self.config_text}"]
        for path in (self.stdout_path, self.stderr_path):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace")
                parts.append(f"# {path.name} ({len(text)} chars)\n{text[-20000:]}")
        return "\n".join(parts)

    def wait_live(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Poll ``GET /livez`` on the admin port until it answers 200."""
        deadline = time.monotonic() + timeout
        request = build_request(
            "/livez", host=f"127.0.0.1:{self.admin_port}", headers=[("Connection", "close")]
        )
        while True:
            if not self.alive():
                raise ProxyStartError(
                    f"fastproxy exited with {self.process.returncode}\n{self.output()}"
                )
            with contextlib.suppress(OSError, ConnectionClosedError, ValueError):
                if http_request(self.admin_port, request, timeout=2.0).status == 200:
                    return
            if time.monotonic() > deadline:
                raise ProxyStartError(f"/livez not 200 after {timeout} s\n{self.output()}")
            time.sleep(0.1)

    def reload(self, document: TomlTable | None = None, *, text: str | None = None) -> None:
        """Write a new config file (a document, or raw text) and send SIGHUP to the master."""
        if document is not None:
            self.document = merge(document, {})
            text = to_toml(document)
        assert text is not None
        # written aside and renamed, as configuration management does: a reload never reads
        # a half-written file
        staged = self.config_path.with_suffix(".staged")
        staged.write_text(text)
        os.replace(staged, self.config_path)
        self.config_text = text
        self.process.send_signal(signal.SIGHUP)

    def messages(self) -> list[str]:
        """The ``msg`` of every JSON log line on stderr so far."""
        found = []
        with contextlib.suppress(OSError):
            for line in self.stderr_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict) and isinstance(record.get("msg"), str):
                        found.append(record["msg"])
        return found

    def wait_for_message(self, text: str, *, count: int = 1, timeout: float = 30.0) -> None:
        """Wait until ``count`` log messages contain ``text``."""
        deadline = time.monotonic() + timeout
        while sum(text in m for m in self.messages()) < count:
            if not self.alive():
                raise AssertionError(f"fastproxy exited waiting for {text!r}\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no log message {text!r} after {timeout} s\n{self.output()}")
            time.sleep(0.05)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM the master by PID and wait; SIGKILL it (and its workers) if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.returncode = self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                workers = _children(self.pid)
                self.process.kill()
                self.returncode = self.process.wait(timeout)
                for pid in workers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        else:
            self.returncode = self.process.returncode
        return self.returncode


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` (``VmRSS`` of ``/proc/<pid>/status``), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _children(pid: int) -> list[int]:
    """PIDs of the direct children of ``pid`` (Linux ``/proc``; empty elsewhere)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


class ProxyFactory:
    """Start proxies with a config written into ``directory``; ``stop_all()`` ends them."""

    def __init__(
        self, directory: Path, default_servers: Sequence[str] = (), http_parser: str = "h11"
    ) -> None:
        self.directory = directory
        self.default_servers = list(default_servers)
        #: the ``http_parser`` of every proxy this factory starts
        self.http_parser = http_parser
        self.started: list[RunningProxy] = []

    def __call__(
        self,
        *,
        servers: Sequence[str] | None = None,
        first_byte_timeout_s: float = FIRST_BYTE_TIMEOUT_S,
        overrides: TomlTable | None = None,
        extra: str = "",
        wait: bool = True,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> RunningProxy:
        """Start fastproxy and wait until it is live.

        ``servers`` replaces the upstream's server list (default: the recording upstream).
        ``overrides`` is deep-merged into the default document, e.g.
        ``{"listeners": {"sdk": {"limits": {"header_timeout_s": 1.0}}}}``; a listener it adds
        without a ``bind`` gets a free port. ``extra`` is TOML text appended as it is; ``args``
        are more options for ``fastproxy run``; ``env`` adds environment variables; ``prefix``
        is a command that runs fastproxy (``systemd-socket-activate ...``).
        """
        document = merge(
            default_config(
                self.default_servers if servers is None else servers,
                first_byte_timeout_s=first_byte_timeout_s,
                http_parser=self.http_parser,
            ),
            overrides or {},
        )
        ports = self._assign_ports(document)
        text = to_toml(document) + (("\n" + extra.strip() + "\n") if extra.strip() else "")
        index = len(self.started)
        config_path = self.directory / f"fastproxy-{index}.toml"
        config_path.write_text(text)
        metrics_dir = self.directory / f"metrics-{index}"
        metrics_dir.mkdir(exist_ok=True)
        env_extra = env
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]
        )
        env["PYTHONUNBUFFERED"] = "1"
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        env.update(env_extra or {})
        stdout_path = self.directory / f"fastproxy-{index}.stdout"
        stderr_path = self.directory / f"fastproxy-{index}.stderr"
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            process = subprocess.Popen(
                [
                    *prefix,
                    sys.executable,
                    "-m",
                    "fastproxy",
                    "run",
                    "-c",
                    str(config_path),
                    *args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=self.directory,
                env=env,
            )
        proxy = RunningProxy(
            process, config_path, text, ports, stdout_path, stderr_path, document=document
        )
        self.started.append(proxy)
        if wait:
            proxy.wait_live()
        return proxy

    @staticmethod
    def _assign_ports(document: dict[str, object]) -> dict[str, int]:
        ports: dict[str, int] = {}
        listeners = document.get("listeners", {})
        assert isinstance(listeners, dict)
        for name, listener in listeners.items():
            assert isinstance(listener, dict)
            if "bind" not in listener:
                listener["bind"] = f"127.0.0.1:{free_port()}"
            ports[name] = int(str(listener["bind"]).rsplit(":", 1)[1])
        admin = document.get("admin")
        if isinstance(admin, dict):
            admin.setdefault("bind", f"127.0.0.1:{free_port()}")
            ports["admin"] = int(str(admin["bind"]).rsplit(":", 1)[1])
        return ports

    def stop_all(self) -> None:
        for proxy in self.started:
            proxy.stop()

    def log_sections(self) -> list[tuple[str, str]]:
        """(title, text) pairs for a failure report, one per proxy started."""
        return [(f"fastproxy pid {p.pid}", p.output()) for p in self.started]


@dataclass(frozen=True)
class Stack:
    """A recording upstream and a proxy in front of it, as the ``preset`` fixture gives them."""

    upstream: RecordingUpstream
    proxy: RunningProxy
    factory: ProxyFactory

    def log_sections(self) -> list[tuple[str, str]]:
        return self.factory.log_sections()
