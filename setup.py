"""fastproxy's build: plain Python always, the per-request modules also compiled with mypyc.

Everything else about the package is declared in ``pyproject.toml``; this file only adds the
optional extension modules, as aiohttp and msgspec do:

- ``pip install .`` compiles ``fastproxy.accel.COMPILED`` with mypyc when it can. Without a C
  compiler (or Python headers) the build says why on stderr and installs plain Python, which
  is the reference and behaves the same;
- ``FASTPROXY_BUILD=pure pip install .`` skips the compiler;
- ``FASTPROXY_BUILD=compiled pip install .`` fails instead of falling back (CI, packagers).

Next to the extension modules the build writes ``fastproxy/accel.manifest``: the SHA-256 of
every compiled module's source. At import, ``fastproxy.accel`` runs the compiled modules only
when the sources still match, so an edited checkout never runs a stale build.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
MODE = os.environ.get("FASTPROXY_BUILD", "auto")


def compiled_modules() -> list[str]:
    """``fastproxy.accel.COMPILED``, read without importing the package."""
    namespace: dict[str, object] = {}
    source = (HERE / "fastproxy" / "accel.py").read_text()
    start = source.index("COMPILED = (")
    end = source.index(")", start) + 1
    exec(source[start:end], namespace)  # noqa: S102  # a tuple of literals from our own file
    modules = namespace["COMPILED"]
    assert isinstance(modules, tuple)
    return [str(m) for m in modules]


def say(message: str) -> None:
    print(f"fastproxy build: {message}", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """Build the extensions; on failure fall back to plain Python unless compiling is required."""

    def run(self) -> None:
        if not self.extensions:
            return
        try:
            super().run()
        except Exception as exc:  # the compiler's errors come as several distutils types
            if MODE == "compiled":
                raise
            say(f"compiling failed ({exc}); installing plain Python")
            self._forget_outputs()
            return
        self._write_manifest()

    def _outputs_dir(self) -> Path:
        first = self.extensions[0].name
        return Path(self.get_ext_fullpath(first)).parent

    def _forget_outputs(self) -> None:
        """A partial build must not leave extension modules that would shadow the sources."""
        for ext in self.extensions:
            Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)

    def _write_manifest(self) -> None:
        lines = [
            f"{name} {hashlib.sha256((HERE / 'fastproxy' / f'{name}.py').read_bytes()).hexdigest()}"
            for name in compiled_modules()
        ]
        path = self._outputs_dir() / "accel.manifest"
        path.write_text("\n".join(lines) + "\n")
        say(f"compiled {len(lines)} modules with mypyc")


def extensions() -> list[object]:
    if MODE == "pure":
        say("FASTPROXY_BUILD=pure: plain Python")
        return []
    try:
        from mypyc.build import mypycify
    except ImportError as exc:
        if MODE == "compiled":
            raise
        say(f"mypyc is not available ({exc}); installing plain Python")
        return []
    paths = [f"fastproxy/{name}.py" for name in compiled_modules()]
    try:
        # one shared library inside the package (fastproxy/accelerated__mypyc*.so), not a
        # hash-named module at the top of site-packages
        exts = mypycify(paths, opt_level="3", group_name="fastproxy.accelerated")
    except (Exception, SystemExit) as exc:  # mypy reports type errors with SystemExit
        if MODE == "compiled":
            raise
        say(f"mypyc failed ({exc}); installing plain Python")
        return []
    return list(exts)


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
