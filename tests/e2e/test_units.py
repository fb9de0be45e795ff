"""The systemd units in ``systemd/``: ``systemd-analyze verify`` accepts them without a word, the
service's sandbox scores at most ``MAX_EXPOSURE``, and the socket units name one listener each.

The tools come from the ``systemd`` package (``.ci/run`` installs it); a missing tool fails the
tests instead of skipping them. ``verify`` checks that ExecStart= is executable, so it runs on a
copy whose ``/opt/fastproxy/bin/fastproxy`` is replaced by the console script of this
environment; nothing else in the units changes.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
SERVICE = UNITS / "fastproxy.service"
SOCKETS = {name: UNITS / f"fastproxy-{name}.socket" for name in ("sdk", "agent", "admin")}
INSTALLED = "/opt/fastproxy/bin/fastproxy"
#: systemd-analyze security's overall exposure, 0 (locked down) to 10; nginx's unit scores 9.6
MAX_EXPOSURE = 1.5


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: install the systemd package (.ci/run does)"
    return path


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def _unit(path: Path) -> configparser.ConfigParser:
    # strict=False: a unit may repeat a key (ExecReload=, SystemCallFilter=); the last one wins.
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(path)
    return parser


def test_units_verify_without_a_word(tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze")
    console_script = Path(sys.executable).with_name("fastproxy")
    assert console_script.is_file(), "pip install -e . provides the fastproxy console script"
    assert Path("/bin/kill").is_file(), "ExecReload= runs /bin/kill (Debian: procps)"
    service = SERVICE.read_text()
    assert INSTALLED in service
    (tmp_path / SERVICE.name).write_text(service.replace(INSTALLED, str(console_script)))
    for path in SOCKETS.values():
        shutil.copy(path, tmp_path / path.name)
    units = [str(tmp_path / path.name) for path in (*SOCKETS.values(), SERVICE)]
    result = _run(analyze, "verify", *units, cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_units_service_exposure_is_low() -> None:
    analyze = _tool("systemd-analyze")
    result = _run(analyze, "security", "--offline=yes", str(SERVICE))
    assert result.returncode == 0, result.stdout + result.stderr
    found = re.search(r"Overall exposure level for fastproxy\.service: (\d+\.\d)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found[1]) <= MAX_EXPOSURE, result.stdout


def test_units_one_socket_unit_per_listener_named_after_it() -> None:
    for name, path in SOCKETS.items():
        socket_section = _unit(path)["Socket"]
        assert socket_section["FileDescriptorName"] == name
        assert socket_section["Service"] == "fastproxy.service"
        assert len(re.findall(r"^ListenStream=", path.read_text(), re.MULTILINE)) == 1


def test_units_stop_timeout_outlasts_the_graceful_drain() -> None:
    from fastproxy.config import load_config

    service = _unit(SERVICE)["Service"]
    timeout = service["TimeoutStopSec"]
    assert timeout.endswith("s")
    assert float(timeout[:-1]) > load_config(None).graceful_timeout_s
    assert service["KillMode"] == "mixed"
