"""Which build runs (``fastproxy.accel``): the choice, its reasons, and that it holds.

The suite itself runs on both builds (the README's test command): here, whichever runs, the
modules loaded are the ones ``BUILD`` names, and ``decide`` is checked on package directories
made up for the purpose (file names are all ``PathFinder`` looks at).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastproxy
from fastproxy import accel

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def _package(tmp_path: Path, *, compiled: bool = True, manifest: bool = True) -> Path:
    package = tmp_path / "fastproxy"
    package.mkdir(parents=True)
    lines = []
    for name in accel.COMPILED:
        source = f"# {name}\n".encode()
        (package / f"{name}.py").write_bytes(source)
        if compiled:
            (package / f"{name}{SUFFIX}").write_bytes(b"")
        lines.append(f"{name} {hashlib.sha256(source).hexdigest()}")
    if compiled:
        (package / f"accelerated__mypyc{SUFFIX}").write_bytes(b"")
    if manifest:
        (package / "accel.manifest").write_text("\n".join(lines) + "\n")
    return package


def test_a_current_compiled_build_is_chosen(tmp_path: Path) -> None:
    build = accel.decide({}, _package(tmp_path))
    assert build.kind == "mypyc" and build.modules == accel.COMPILED
    assert build.describe() == f"compiled (mypyc: {len(accel.COMPILED)} modules)"


def test_pure_on_request_even_where_compiled(tmp_path: Path) -> None:
    build = accel.decide({"FASTPROXY_PURE": "1"}, _package(tmp_path))
    assert build.kind == "python" and build.reason == "FASTPROXY_PURE=1"
    # an empty value is unset, as for any switch of the environment
    assert accel.decide({"FASTPROXY_PURE": ""}, _package(tmp_path / "x")).kind == "mypyc"


def test_an_edited_source_is_never_run_compiled(tmp_path: Path) -> None:
    package = _package(tmp_path)
    (package / "exchange.py").write_text("# edited after the build\n")
    build = accel.decide({}, package)
    assert build.kind == "python"
    assert build.reason == "exchange.py changed since it was compiled; rebuild"


def test_no_manifest_is_plain_python(tmp_path: Path) -> None:
    assert accel.decide({}, _package(tmp_path, compiled=False, manifest=False)) == accel.Build(
        "python", (), "not compiled"
    )
    # extension modules without the manifest of their build are not trusted either
    assert accel.decide({}, _package(tmp_path / "y", manifest=False)).kind == "python"


def test_a_missing_extension_module_is_plain_python(tmp_path: Path) -> None:
    package = _package(tmp_path)
    (package / f"wsframe{SUFFIX}").unlink()
    build = accel.decide({}, package)
    assert build.kind == "python" and build.reason == "the compiled wsframe is missing; rebuild"
    (package / f"accelerated__mypyc{SUFFIX}").unlink()
    (package / f"wsframe{SUFFIX}").write_bytes(b"")
    assert "accelerated__mypyc" in accel.decide({}, package).reason


def test_the_modules_loaded_are_the_build_named() -> None:
    for name in accel.COMPILED:
        importlib.import_module(f"fastproxy.{name}")
    loaded = set(accel.loaded_compiled())
    if fastproxy.BUILD.kind == "mypyc":
        assert {f"fastproxy.{name}" for name in accel.COMPILED} <= loaded
    else:
        assert loaded == set()


def test_the_build_asked_for_is_the_build_that_runs() -> None:
    # CI installs with FASTPROXY_BUILD=compiled: a build that silently fell back to plain
    # Python would run the suite twice on the same code
    if os.environ.get("FASTPROXY_BUILD") == "compiled" and not os.environ.get("FASTPROXY_PURE"):
        assert fastproxy.BUILD.kind == "mypyc", fastproxy.BUILD
    if os.environ.get("FASTPROXY_PURE"):
        assert fastproxy.BUILD.kind == "python"


@pytest.mark.parametrize("pure", ["1", ""])
def test_version_says_which_build_runs(pure: str) -> None:
    env = {**os.environ, "FASTPROXY_PURE": pure}
    out = subprocess.run(
        [sys.executable, "-m", "fastproxy", "version"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.splitlines()
    expected = accel.decide(env).describe()
    assert out[1] == f"build {expected}"
    if pure:
        assert out[1] == "build plain Python (FASTPROXY_PURE=1)"
