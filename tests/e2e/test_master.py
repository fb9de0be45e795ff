"""The master as a real process: fork, heartbeat, respawn, boot failure, stop.

The master runs in a subprocess with stub workers (``Master(worker_target=...)``), so these tests
exercise supervision alone, without the proxy. Every wait polls with a generous deadline and no
test asserts how fast anything happened. Only processes started here are signalled, by pid, and
a pid counts as ours only while its command line names this test's script.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from fastproxy.config import Address, AdminConfig, Config, ListenerConfig
from fastproxy.master import BindError, Master
from fastproxy.policy import Action, Rule

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 30.0
POLL_S = 0.1

# The script the master runs in. argv: MODE WORKERS MARKER_DIR.
#   ok         heartbeat every 0.2 s, return on SIGTERM
#   boot-fail  raise before the first heartbeat
#   hang       the first worker to start beats twice and then stops beating; the others are ok
MASTER_SCRIPT = textwrap.dedent(
    """
    import os
    import resource
    import signal
    import sys
    import time

    from fastproxy import log
    from fastproxy.config import Address, AdminConfig, Config, ListenerConfig
    from fastproxy.master import Master
    from fastproxy.policy import Action, Rule

    mode, workers, marker_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGABRT must not leave core files


    def stub_worker(config, sockets, admin_socket, heartbeat_fd, generation):
        assert set(sockets) == {"web"}
        assert admin_socket is not None
        if mode == "boot-fail":
            raise RuntimeError("stub worker cannot boot")
        beats = None
        if mode == "hang":
            try:
                os.close(os.open(os.path.join(marker_dir, "hung"), os.O_CREAT | os.O_EXCL))
                beats = 2
            except FileExistsError:
                pass
        stopping = []
        signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
        while not stopping:
            if beats is None or beats > 0:
                os.write(heartbeat_fd, b".")
                beats = None if beats is None else beats - 1
            time.sleep(0.2)


    fallback = Rule(name="fallback", prefix=b"", action=Action.DENY)
    config = Config(
        source="<e2e>",
        workers=workers,
        listeners={
            "web": ListenerConfig(
                name="web",
                bind=Address("127.0.0.1", 0),
                policy="stub",
                rules=(),
                fallback=fallback,
                upstream="none",
            )
        },
        upstreams={},
        admin=AdminConfig(bind=Address("127.0.0.1", 0)),
        heartbeat_timeout_s=2.0,
        graceful_timeout_s=10.0,
    )
    log.setup("debug")
    sys.exit(Master(config, worker_target=stub_worker).run())
    """
)


class MasterProcess:
    """A master started from ``MASTER_SCRIPT``, its JSON log in a file."""

    def __init__(self, tmp_path: Path, mode: str, workers: int) -> None:
        self.script = tmp_path / "master_script.py"
        self.script.write_text(MASTER_SCRIPT)
        self.log_path = tmp_path / "master.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]
        )
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "metrics")
        with self.log_path.open("wb") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, str(self.script), mode, str(workers), str(tmp_path)],
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                cwd=tmp_path,
                env=env,
            )

    def records(self) -> list[dict[str, object]]:
        out = []
        for line in self.log_path.read_bytes().splitlines():
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a line still being written, or a traceback from a dying child
            if isinstance(record, dict):
                out.append(record)
        return out

    def messages(self) -> list[str]:
        return [str(record["msg"]) for record in self.records()]

    def started_pids(self) -> list[int]:
        """Worker pids in the order the master logged "worker <pid> started"."""
        pids = []
        for msg in self.messages():
            words = msg.split()
            if len(words) == 3 and words[0] == "worker" and words[2] == "started":
                pids.append(int(words[1]))
        return pids

    def is_ours(self, pid: int) -> bool:
        """True while ``pid`` is a live process running this test's script (master or worker)."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            return False
        return str(self.script).encode() in cmdline

    def live_workers(self) -> set[int]:
        return {pid for pid in self.started_pids() if self.is_ours(pid)}

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])
                pytest.fail(f"timed out waiting for {what}; master log tail:\n{tail}")
            time.sleep(POLL_S)

    def wait_exit(self, timeout: float = WAIT_S) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])
            pytest.fail(f"the master did not exit; log tail:\n{tail}")

    def wait_ready(self) -> None:
        self.wait_for("all workers ready", lambda: any("ready" in m for m in self.messages()))

    def cleanup(self) -> None:
        pids = self.started_pids()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in pids:
            if self.is_ours(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def start_master(tmp_path: Path) -> Iterator[Callable[[str, int], MasterProcess]]:
    started: list[MasterProcess] = []

    def start(mode: str, workers: int) -> MasterProcess:
        master = MasterProcess(tmp_path, mode, workers)
        started.append(master)
        return master

    yield start
    for master in started:
        master.cleanup()


def test_master_starts_workers_and_logs_ready(
    start_master: Callable[[str, int], MasterProcess],
) -> None:
    master = start_master("ok", 3)
    master.wait_ready()
    assert len(master.started_pids()) == 3
    assert master.live_workers() == set(master.started_pids())
    messages = master.messages()
    assert "all 3 workers ready" in messages
    assert any(m.startswith("listening on 127.0.0.1:") and "listener web" in m for m in messages)
    records = master.records()
    assert {"ts", "level", "pid", "logger", "msg"} <= set(records[0])

    master.proc.send_signal(signal.SIGHUP)
    master.wait_for("the reload warning", lambda: any("reload" in m for m in master.messages()))
    assert master.proc.poll() is None
    assert master.live_workers() == set(master.started_pids())

    master.proc.send_signal(signal.SIGTERM)
    assert master.wait_exit() == 0


def test_master_respawns_a_killed_worker(
    start_master: Callable[[str, int], MasterProcess],
) -> None:
    master = start_master("ok", 2)
    master.wait_ready()
    first = master.started_pids()
    victim = first[0]
    os.kill(victim, signal.SIGKILL)

    master.wait_for("a respawned worker", lambda: len(master.started_pids()) > len(first))
    master.wait_for("the killed worker to be reaped", lambda: not master.is_ours(victim))
    replacement = master.started_pids()[-1]
    assert replacement not in first
    assert master.proc.poll() is None
    warnings = [r for r in master.records() if r["level"] == "WARNING"]
    assert any(str(victim) in str(r["msg"]) and "SIGKILL" in str(r["msg"]) for r in warnings)
    master.wait_for("the replacement to run", lambda: master.is_ours(replacement))

    master.proc.send_signal(signal.SIGTERM)
    assert master.wait_exit() == 0
    assert master.live_workers() == set()


def test_master_stops_when_a_worker_fails_to_boot(
    start_master: Callable[[str, int], MasterProcess],
) -> None:
    master = start_master("boot-fail", 2)
    assert master.wait_exit() == 3
    assert any("failed to boot" in m for m in master.messages())
    assert any("stub worker cannot boot" in str(r.get("exc", "")) for r in master.records())
    assert master.started_pids()
    assert master.live_workers() == set()


def test_master_replaces_a_worker_that_stops_heartbeating(
    start_master: Callable[[str, int], MasterProcess],
) -> None:
    master = start_master("hang", 2)
    master.wait_ready()
    master.wait_for(
        "the heartbeat warning", lambda: any("no heartbeat" in m for m in master.messages())
    )
    hung = next(
        int(m.split()[1]) for m in master.messages() if "no heartbeat" in m and m[:7] == "worker "
    )
    master.wait_for("the hung worker to be killed", lambda: not master.is_ours(hung))
    master.wait_for("a replacement", lambda: len(master.started_pids()) >= 3)
    assert master.proc.poll() is None
    assert master.started_pids()[-1] != hung
    # the kill the master sent itself is named as such, not guessed to be out of memory
    master.wait_for(
        "the respawn line",
        lambda: any(
            m.startswith(f"worker {hung} killed for a missed heartbeat (none for 2 s; SIG")
            for m in master.messages()
        ),
    )
    assert not any("out of memory" in m for m in master.messages())

    master.proc.send_signal(signal.SIGTERM)
    assert master.wait_exit() == 0
    assert master.live_workers() == set()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT])
def test_master_stops_on_signal_and_leaves_no_worker(
    start_master: Callable[[str, int], MasterProcess], signum: signal.Signals
) -> None:
    master = start_master("ok", 3)
    master.wait_ready()
    pids = master.started_pids()
    assert len(pids) == 3

    master.proc.send_signal(signum)
    assert master.wait_exit() == 0
    assert master.live_workers() == set()
    assert not any(master.is_ours(pid) for pid in pids)
    assert any(signum.name in m for m in master.messages())


def _stub_config(port: int) -> Config:
    fallback = Rule(name="fallback", prefix=b"", action=Action.DENY)
    web = ListenerConfig(
        name="web",
        bind=Address("127.0.0.1", port),
        policy="stub",
        rules=(),
        fallback=fallback,
        upstream="none",
    )
    return Config(
        source="<e2e>",
        workers=1,
        listeners={"web": web},
        upstreams={},
        admin=AdminConfig(bind=Address("127.0.0.1", 0)),
    )


def _never_called(*args: object) -> None:
    raise AssertionError("no worker may start when a socket cannot be bound")


def test_master_bind_failure_names_listener_and_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BindError) as caught:
            Master(_stub_config(port), worker_target=_never_called).run()
    message = str(caught.value)
    assert message.startswith(f"listeners.web: cannot bind 127.0.0.1:{port}: ")
    assert "in use" in message
