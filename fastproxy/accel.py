"""Which build runs: the per-request modules compiled with mypyc, or plain Python.

``setup.py`` compiles the modules of ``COMPILED`` with mypyc when it can and writes
``accel.manifest`` beside them: each module's name and the SHA-256 of the source it was built
from. Plain Python is the reference; the compiled modules are the same code, typed the same
way, and pass the same suite. ``fastproxy/__init__.py`` calls ``select()`` before any other
module of the package is imported. It keeps the compiled modules when

- the manifest is there and every listed source still has its hash (an edited checkout never
  runs a stale build), and
- ``FASTPROXY_PURE`` is unset or empty (``FASTPROXY_PURE=1`` runs plain Python on an
  accelerated install: to compare the two, or to rule the build out while debugging).

Otherwise it puts a finder first on ``sys.meta_path`` that loads the package's modules from
their ``.py`` sources, so no extension module of the package is ever imported.
``fastproxy.BUILD`` (what ``select`` returned) says which one runs and why; ``fastproxy version``
and ``fastproxy_build_info`` report it.

Stdlib only, and never compiled itself.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

#: the modules ``setup.py`` compiles: the per-request path that runs without the loop's own
#: objects (parsers, header rules, policy, the exchange state machine, WebSocket frames, timers)
COMPILED = (
    "headers",
    "policy",
    "http1",
    "http1_httptools",
    "wsframe",
    "wsrelay",
    "deadlines",
    "exchange",
)

PACKAGE_DIR = Path(__file__).resolve().parent
#: the environment variable that forces plain Python at run time
PURE_ENV = "FASTPROXY_PURE"
_EXTENSIONS = tuple(importlib.machinery.EXTENSION_SUFFIXES)


@dataclass(frozen=True)
class Build:
    """What runs: ``kind`` is ``"mypyc"`` or ``"python"``; ``reason`` says why plain Python."""

    kind: str
    modules: tuple[str, ...]
    reason: str

    def describe(self) -> str:
        if self.kind == "mypyc":
            return f"compiled (mypyc: {len(self.modules)} modules)"
        return f"plain Python ({self.reason})"


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Loads ``fastproxy.X`` from ``X.py`` even where a compiled ``X`` sits beside it."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.rpartition(".")
        if package != "fastproxy":
            return None
        source = PACKAGE_DIR / f"{name}.py"
        if not source.is_file():
            return None
        return importlib.util.spec_from_file_location(fullname, source)


def _read_manifest(package_dir: Path) -> dict[str, str] | None:
    try:
        text = (package_dir / "accel.manifest").read_text()
    except OSError:
        return None
    entries: dict[str, str] = {}
    for line in text.splitlines():
        name, _, digest = line.partition(" ")
        if name:
            entries[name] = digest
    return entries


def decide(environ: Mapping[str, str], package_dir: Path = PACKAGE_DIR) -> Build:
    """Which build the package in ``package_dir`` can run under ``environ``."""
    if environ.get(PURE_ENV):
        return Build("python", (), f"{PURE_ENV}={environ[PURE_ENV]}")
    manifest = _read_manifest(package_dir)
    if manifest is None:
        return Build("python", (), "not compiled")
    for name, digest in manifest.items():
        try:
            source = (package_dir / f"{name}.py").read_bytes()
        except OSError:
            return Build("python", (), f"{name}.py is missing")
        if hashlib.sha256(source).hexdigest() != digest:
            return Build("python", (), f"{name}.py changed since it was compiled; rebuild")
    for name in (*manifest, "accelerated__mypyc"):
        spec = importlib.machinery.PathFinder.find_spec(f"fastproxy.{name}", [str(package_dir)])
        if spec is None or not str(spec.origin).endswith(_EXTENSIONS):
            return Build("python", (), f"the compiled {name} is missing; rebuild")
    return Build("mypyc", tuple(manifest), "")


_selected: Build | None = None


def select() -> Build:
    """Decide once per process; with plain Python, make sure no compiled module loads."""
    global _selected
    if _selected is None:
        _selected = decide(os.environ)
        if _selected.kind == "python":
            sys.meta_path.insert(0, _SourceFinder())
    return _selected


def mypyc_attr(*attrs: str, **kwattrs: object) -> Callable[[Any], Any]:
    """``mypy_extensions.mypyc_attr`` where mypy is not installed: a class decorator that
    tells mypyc something and does nothing at run time (import it with a fallback to this)."""
    return lambda cls: cls


def loaded_compiled() -> list[str]:
    """The package's modules imported so far that are extension modules (for tests)."""
    found = []
    for name, module in list(sys.modules.items()):
        if name.startswith("fastproxy.") and str(getattr(module, "__file__", "")).endswith(
            _EXTENSIONS
        ):
            found.append(name)
    return sorted(found)
