"""What a new user runs first: the README's Quick start command, and the commands whose output is
piped into ``head`` (a closed pipe ends them quietly, without a traceback).

The Quick start test runs the README's own command, read from the README, on the README's ports
(8080, 8081, 9901 and 8000 on 127.0.0.1, as a new user gets them) with nothing else in front of
it; it fails with a clear message when one of them is taken. Only the process the test started
is signalled, by pid; waits poll with generous deadlines.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.client import get

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

README = Path(__file__).resolve().parents[2] / "README.md"
#: where a new user's ``fastproxy demo`` listens: sdk, agent, admin, demo upstream
README_PORTS = (8080, 8081, 9901, 8000)
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 60.0


def quick_start_commands() -> list[str]:
    """The lines of the first shell block under "Quick start", comments removed."""
    text = README.read_text()
    section = text[text.index("## Quick start") :]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None, "no shell block under Quick start"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_quick_start_starts_in_a_venv_and_runs_the_demo() -> None:
    commands = quick_start_commands()
    assert commands[0] == "python3 -m venv .venv && . .venv/bin/activate"
    assert commands[1] == "pip install . && fastproxy demo"


def _busy(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_readme_first_command_serves_through_the_sdk_listener(tmp_path: Path) -> None:
    # the command after "pip install . &&", run from the environment the suite installed into
    command = shlex.split(quick_start_commands()[1].split("&&")[-1])
    assert command[0] == "fastproxy"
    executable = Path(sys.executable).parent / "fastproxy"
    busy = [port for port in README_PORTS if _busy(port)]
    assert not busy, f"the README's command needs 127.0.0.1 ports {busy}, which are in use"
    output = tmp_path / "demo.out"
    with output.open("wb") as out:
        process = subprocess.Popen(
            [str(executable), *command[1:]], stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                response = get(8080, "/api/1/devices/abc?x=1")
                if response.status != 502:  # the demo upstream may still be starting
                    break
            except OSError:
                pass
            assert process.poll() is None, output.read_text()
            assert time.monotonic() < deadline, output.read_text()
            time.sleep(0.2)
        assert response.status == 200, (response, output.read_text())
        echoed = response.json()  # the demo upstream's echo of what reached it
        assert (echoed["method"], echoed["path"], echoed["query"]) == (
            "GET",
            "/api/1/devices/abc",
            "x=1",
        )
        assert get(8080, "/admin").status == 403
        spa = get(8081, "/some/page?q=1")
        assert spa.status == 200
        assert b"single-page app index" in spa.body
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            code = process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
    assert code == 0, output.read_text()
    text = output.read_text()
    assert "Traceback" not in text
    assert not any(_busy(port) for port in README_PORTS), "fastproxy demo left a listener open"


@pytest.mark.parametrize(
    "argv",
    [
        ["version"],
        ["dump-config"],
        ["check"],
        ["explain", "--listener", "sdk", "GET /api/1/devices"],
        ["test", str(README.parent / "deploy" / "cobrowse-cases.toml")],
        ["--help"],
    ],
)
def test_output_into_a_closed_pipe_ends_quietly(argv: list[str]) -> None:
    # `fastproxy version | head -1`, made certain: the reading end is closed before the start
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "fastproxy", *argv],
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert result.stderr == b"", result.stderr.decode()
    assert result.returncode in (0, 1)
