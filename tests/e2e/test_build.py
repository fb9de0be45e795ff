"""``pip install`` of fastproxy on a machine that cannot compile: plain Python, never a failure.

Each test builds a wheel from a copy of this checkout with pip and this environment's setuptools
and mypy (``--no-build-isolation``: no download), with ``CC=false`` standing in for a machine
without a C compiler, and reads what the wheel holds. The compiled build itself is what the
README's test command installs; ``tests/unit/test_accel.py`` checks the suite runs on it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from support.proxy import REPO_ROOT

from fastproxy import accel


def _wheel(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    source = tmp_path / "src"
    shutil.copytree(
        REPO_ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git",
            "tests",
            "bench",
            "deploy",
            "docs",
            "build",
            "*.egg-info",
            "__pycache__",
            "*.so",
            "accel.manifest",
            ".*cache",
            ".hypothesis",
        ),
    )
    out = tmp_path / "wheels"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-v",
            "--no-build-isolation",
            "--no-deps",
            "--no-index",
            "-w",
            str(out),
            str(source),
        ],
        env={**os.environ, "CC": "false", "LDSHARED": "false", **env},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    names: list[str] = []
    for wheel in out.glob("*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            names += archive.namelist()
    return done, names


def test_no_compiler_installs_plain_python(tmp_path: Path) -> None:
    done, names = _wheel(tmp_path, FASTPROXY_BUILD="auto")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "fastproxy build: compiling failed" in done.stdout + done.stderr
    assert "fastproxy/exchange.py" in names and "fastproxy/accel.py" in names
    assert not [n for n in names if n.endswith(".so") or n.endswith("accel.manifest")], names
    assert all(f"fastproxy/{name}.py" in names for name in accel.COMPILED)


def test_a_compiled_build_that_cannot_compile_fails(tmp_path: Path) -> None:
    done, names = _wheel(tmp_path, FASTPROXY_BUILD="compiled")
    assert done.returncode != 0
    assert names == []


def test_a_pure_build_does_not_try(tmp_path: Path) -> None:
    done, names = _wheel(tmp_path, FASTPROXY_BUILD="pure")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "FASTPROXY_BUILD=pure: plain Python" in done.stdout + done.stderr
    assert "compiling failed" not in done.stdout + done.stderr
    assert "fastproxy/exchange.py" in names
    assert not [n for n in names if n.endswith(".so")], names
