"""Compile lab: the CPU per request of fastproxy compiled in several ways, side by side in one run.

    python -m bench.lab [--quick] [--out bench] [--only KEYS] [--tree NAME=PATH ...]

Builds each variant into a directory of its own (a copy of the ``fastproxy`` package, compiled
there in place with ``setup_lab.py build_ext --inplace``):

1. ``pure``: the package as it is (the reference);
2. ``mypyc-pure``: mypyc over the pure modules (headers, policy, the two HTTP/1 legs, the
   WebSocket frame and relay modules, deadlines);
3. ``mypyc-exchange``: those plus the exchange state machine;
4. ``mypyc-max``: those plus the worker's protocol adapters and what they call per request
   (worker, upstream, runtime, metrics, log, errors, health); a module mypyc refuses, or whose
   compiled form does not import, is dropped and the rest rebuilt (the report names it and why);
5. ``cython-adapters``: Cython in pure-Python mode over the protocol adapters (worker, upstream
   and the two HTTP/1 legs), the ``.py`` files unchanged;
6. ``cython-max``: Cython over the modules variant 4 compiled, for a like-for-like comparison;

plus ``--tree NAME=PATH``: another checkout's package run as it is (``PATH/fastproxy``). A variant
that fails to build is skipped with the last lines of its build output.

Each variant is then checked: which of its modules are extension modules (imported in a
subprocess with the same environment as the proxy), which ``.so`` files the running worker has
mapped, and the compare runner's policy check (allowed path 200, denied 403). Measured per
variant and parser (h11, httptools) exactly as ``bench.compare`` measures CPU per small request
(``wrk`` on the load core, one worker pinned to the proxy core, user + system time from /proc),
with nginx in the same run as the ratio base, runs interleaved; and once per variant and parser,
the Python-visible function calls per request, by the measurement of
``tests/perf/test_call_budget.py`` run in a subprocess against the variant's package (functions
compiled to C make no Python calls, so this counts what is left in the interpreter). Writes
``LAB.md`` and ``lab.json`` into ``--out``. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import importlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import compare, procs
from bench.compare import Bench, log

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PACKAGE = ROOT / "fastproxy"
PARSERS = ("h11", "httptools")

PURE_MODULES = ("headers", "policy", "http1", "http1_httptools", "wsframe", "wsrelay", "deadlines")
EXCHANGE_MODULES = (*PURE_MODULES, "exchange")
MAX_MODULES = (
    *EXCHANGE_MODULES,
    "worker",
    "upstream",
    "runtime",
    "metrics",
    "log",
    "errors",
    "health",
)
ADAPTER_MODULES = ("worker", "upstream", "http1_httptools", "http1")

#: the mypy configuration mypyc type-checks the copy with (as pyproject's, without strictness)
MYPY_INI = """[mypy]
python_version = 3.11

[mypy-httptools,httptools.*,prometheus_client.*]
ignore_missing_imports = True
"""
SETUP_MYPYC = """from setuptools import setup
from mypyc.build import mypycify

MODULES = {modules!r}
setup(
    name="fastproxy-lab",
    packages=[],
    py_modules=[],
    ext_modules=mypycify([f"fastproxy/{{m}}.py" for m in MODULES], opt_level="3"),
)
"""
SETUP_CYTHON = """from setuptools import setup
from Cython.Build import cythonize

MODULES = {modules!r}
setup(
    name="fastproxy-lab",
    packages=[],
    py_modules=[],
    ext_modules=cythonize(
        [f"fastproxy/{{m}}.py" for m in MODULES],
        compiler_directives={{"language_level": "3"}},
        quiet=True,
    ),
)
"""
#: run in a variant's environment: how each module loads, and what its classes became
LOAD_CHECK = """
import importlib, importlib.machinery, json, sys
out = {"file": None, "modules": {}, "classes": {}, "error": ""}
import fastproxy
out["file"] = fastproxy.__file__
for name in sys.argv[1:]:
    try:
        mod = importlib.import_module("fastproxy." + name)
    except Exception as err:
        out["modules"][name] = "import failed: " + type(err).__name__ + ": " + str(err)
        continue
    ext = isinstance(mod.__loader__, importlib.machinery.ExtensionFileLoader)
    out["modules"][name] = "extension" if ext else "python"
    if ext:
        for cname, cls in vars(mod).items():
            if not isinstance(cls, type) or cls.__module__ != mod.__name__:
                continue
            method = next((v for k, v in vars(cls).items() if callable(v)
                           and not k.startswith("__")), None)
            out["classes"][name + "." + cname] = {
                "bases": [b.__module__ + "." + b.__qualname__ for b in cls.__bases__],
                "method": type(method).__name__ if method is not None else "",
                "instance_dict": any("__dict__" in vars(k) for k in cls.__mro__),
                "native": "__mypyc_attrs__" in vars(cls),
            }
try:
    import fastproxy.cli
except Exception as err:
    out["error"] = "fastproxy.cli: " + type(err).__name__ + ": " + str(err)
print(json.dumps(out))
"""
ERROR_LINE = re.compile(r"^(?:build/)?fastproxy/(\w+)\.py:\d+(?::\d+)?:(?: error:)? (.*)$")


@dataclass
class Variant:
    key: str
    label: str
    #: ``none`` (the package as is), ``mypyc``, ``cython``, or ``tree`` (another checkout)
    tool: str
    modules: tuple[str, ...] = ()
    #: drop a module the compiler refuses (or that fails to import) and rebuild the rest
    drop_failing: bool = False
    tree: Path | None = None


@dataclass
class Built:
    key: str
    ok: bool
    path: str = ""
    seconds: float = 0.0
    so_bytes: int = 0
    compiled: list[str] = field(default_factory=list)
    #: module -> why the compiler or the import refused it
    dropped: dict[str, str] = field(default_factory=dict)
    error: str = ""
    load: dict[str, Any] = field(default_factory=dict)
    mapped: dict[str, list[str]] = field(default_factory=dict)
    calls: dict[str, dict[str, float]] = field(default_factory=dict)
    calls_error: dict[str, str] = field(default_factory=dict)
    command: str = ""
    #: the build was made by an earlier run (``--builds``) from the same sources
    reused: bool = False


def variants(trees: list[tuple[str, Path]]) -> list[Variant]:
    out = [
        Variant("pure", "pure Python (reference)", "none"),
        Variant("mypyc-pure", "mypyc: pure modules", "mypyc", PURE_MODULES),
        Variant("mypyc-exchange", "mypyc: pure modules + exchange", "mypyc", EXCHANGE_MODULES),
        Variant("mypyc-max", "mypyc: all that compiles", "mypyc", MAX_MODULES, drop_failing=True),
        Variant("cython-adapters", "Cython: protocol adapters", "cython", ADAPTER_MODULES),
        Variant("cython-max", "Cython: what mypyc-max compiled", "cython", MAX_MODULES),
    ]
    out += [Variant(name, f"tree {name}", "tree", tree=path) for name, path in trees]
    return out


def env_of(path: Path, *extra: Path) -> dict[str, str]:
    """The environment that makes ``python -m fastproxy`` import the package under ``path``:
    ``PYTHONSAFEPATH`` keeps the working directory (this checkout) off ``sys.path``."""
    return {
        "PYTHONPATH": os.pathsep.join(str(p) for p in (path, *extra)),
        "PYTHONSAFEPATH": "1",
    }


def tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def so_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*.so") if "build" not in p.relative_to(path).parts)


def load_check(path: Path, modules: list[str]) -> dict[str, Any]:
    """``LOAD_CHECK`` in a subprocess with the proxy's environment; ``error``: what broke the
    import of the package itself or of its command line."""
    out = subprocess.run(
        [sys.executable, "-c", LOAD_CHECK, *modules],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **env_of(path)},
    )
    if out.returncode != 0:
        return {"file": None, "modules": {}, "classes": {}, "error": tail(out.stderr, 6)}
    got: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return got


def compile_once(v: Variant, dest: Path, modules: tuple[str, ...]) -> tuple[bool, str, float]:
    template = SETUP_MYPYC if v.tool == "mypyc" else SETUP_CYTHON
    (dest / "setup_lab.py").write_text(template.format(modules=list(modules)))
    (dest / "mypy.ini").write_text(MYPY_INI)
    for old in so_files(dest):
        old.unlink()
    shutil.rmtree(dest / "build", ignore_errors=True)
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "setup_lab.py", "build_ext", "--inplace", "-j", "2"],
        cwd=dest,
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    return out.returncode == 0, out.stdout + out.stderr, time.monotonic() - start


def refused(output: str, modules: tuple[str, ...]) -> dict[str, str]:
    """The modules a failed build's messages name as in error, with the first message each."""
    found: dict[str, str] = {}
    lines = output.splitlines()
    for i, line in enumerate(lines):
        m = ERROR_LINE.match(line.strip())
        if m is None or m.group(1) not in modules or m.group(1) in found:
            continue
        text = m.group(2).strip()
        if not text and i + 1 < len(lines):  # Cython: position line, then the message
            text = lines[i + 1].strip()
        if "warning" in line.split(m.group(1), 1)[1][:20] or text.startswith("Warning"):
            continue
        found[m.group(1)] = line.strip()[:240]
    return found


def digest(v: Variant, modules: tuple[str, ...]) -> str:
    """What a build depends on: the package's sources, the tool and its version, the modules."""
    h = hashlib.sha256(f"{v.tool} {modules} {sys.version}".encode())
    tool = {"mypyc": "mypy", "cython": "Cython"}.get(v.tool)
    if tool:
        h.update(importlib.metadata.version(tool).encode())
    for path in sorted(PACKAGE.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".so", ".c"):
            h.update(str(path.relative_to(PACKAGE)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


#: appended to a variant's copy of ``fastproxy/accel.py``: the package's own choice runs compiled
#: modules only beside the manifest its ``setup.py`` writes (one mypyc library, named sources);
#: a lab variant runs whatever its own build made, mypyc or Cython
LAB_SELECT = """

def select() -> Build:
    \"\"\"The compile lab's copy: run the extension modules this copy was built with.\"\"\"
    global BUILD
    BUILD = Build("lab", (), "")
    return BUILD
"""


def run_what_was_built(dest: Path) -> None:
    accel = dest / "fastproxy" / "accel.py"
    if accel.exists() and LAB_SELECT not in accel.read_text():
        with accel.open("a") as f:
            f.write(LAB_SELECT)


def build(v: Variant, dest: Path, max_compiled: list[str] | None) -> Built:
    """Copy the package into ``dest`` and compile the variant's modules there in place; reuse
    the build already in ``dest`` if it was made from the same sources the same way."""
    modules = tuple(max_compiled) if v.key == "cython-max" and max_compiled else v.modules
    stamp = dest / "lab-build.json"
    key = digest(v, modules)
    if v.tool != "tree" and stamp.exists():
        kept = json.loads(stamp.read_text())
        if kept.get("digest") == key:
            log(f"  {v.key}: reusing the build in {dest}")
            run_what_was_built(dest)
            reused = dataclasses.replace(Built(**kept["built"]), reused=True)
            reused.load = load_check(dest, list(MAX_MODULES))  # what loads now, not then
            return reused
    b = build_anew(v, dest, modules)
    if b.ok and v.tool != "tree":
        stamp.write_text(json.dumps({"digest": key, "built": dataclasses.asdict(b)}))
    return b


def build_anew(v: Variant, dest: Path, modules: tuple[str, ...]) -> Built:
    if v.tool == "tree":
        assert v.tree is not None
        b = Built(v.key, (v.tree / "fastproxy" / "__init__.py").exists(), path=str(v.tree))
        if not b.ok:
            b.error = f"{v.tree}/fastproxy is not a package"
        else:
            b.load = load_check(v.tree, list(MAX_MODULES))
            b.compiled = [m for m, how in b.load["modules"].items() if how == "extension"]
        b.so_bytes = sum(p.stat().st_size for p in so_files(v.tree / "fastproxy"))
        return b
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    shutil.copytree(
        PACKAGE,
        dest / "fastproxy",
        ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c", "accel.manifest"),
    )
    run_what_was_built(dest)
    b = Built(v.key, True, path=str(dest))
    if v.tool == "none":
        b.load = load_check(dest, list(MAX_MODULES))
        return b
    call = "mypycify(FILES, opt_level='3')" if v.tool == "mypyc" else "cythonize(FILES)"
    b.command = (
        f"cd $TMP/variants/{v.key} && python setup_lab.py build_ext --inplace -j 2"
        f"  # setup(ext_modules={call})"
    )
    for _attempt in range(6):
        ok, output, seconds = compile_once(v, dest, modules)
        b.seconds = seconds
        if ok:
            load = load_check(dest, list(modules))
            bad = {m: how for m, how in load["modules"].items() if how.startswith("import failed")}
            if not bad and not load["error"]:
                b.compiled, b.load = list(modules), load
                b.so_bytes = sum(p.stat().st_size for p in so_files(dest))
                return b
            if not v.drop_failing or not bad:
                why = "\n".join(f"{m}: {how}" for m, how in bad.items()) or load["error"]
                b.ok, b.error = False, f"the compiled package does not import:\n{why}"
                return b
        else:
            bad = refused(output, modules)
            if not v.drop_failing or not bad:
                b.ok, b.error = False, tail(output)
                return b
        b.dropped.update(bad)
        modules = tuple(m for m in modules if m not in bad)
        log(f"  {v.key}: dropped {', '.join(bad)}; rebuilding with {len(modules)} modules")
    b.ok, b.error = False, "gave up after six builds"
    return b


def worker_mapped(pids: list[int], path: str) -> list[str]:
    """The ``.so`` files under ``path`` that the running workers have mapped."""
    found: set[str] = set()
    for pid in pids:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            name = line.split()[-1] if len(line.split()) >= 6 else ""
            if name.startswith(path) and ".so" in name:
                found.add(Path(name).name.split(".")[0])
    return sorted(found)


def count_calls(b: Built, parser: str) -> None:
    """The call budget test's measurement, in a subprocess importing the variant's package."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.lab", "--count-calls", parser],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, **env_of(Path(b.path), ROOT)},
    )
    try:
        b.calls[parser] = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        # the interpreter's path says nothing about the variant and names the machine
        b.calls_error[parser] = tail(out.stderr or out.stdout, 4).replace(sys.executable, "python")


def counted_calls(parser: str) -> dict[str, float]:
    """Run ``tests/perf/test_call_budget.py``'s scenario here (this process imports the package
    under test from ``PYTHONPATH``); the fixture's metrics setup is repeated by hand."""
    import prometheus_client
    import uvloop

    budget = importlib.import_module("tests.perf.test_call_budget")
    from fastproxy import metrics

    with tempfile.TemporaryDirectory(prefix="fastproxy-lab-calls-") as tmp:
        os.environ[metrics.ENV] = str(Path(tmp) / "metrics")
        metrics.prepare_multiproc_dir()
        # as the test's fixture: one WorkerState per process, kept out of the global registry
        setattr(prometheus_client.REGISTRY, "register", lambda collector: None)  # noqa: B010
        loop = uvloop.new_event_loop()
        try:
            counts = loop.run_until_complete(budget.scenario(parser))
        finally:
            loop.close()
    n: int = budget.MEASURED
    return {
        "calls": (counts.own_calls + counts.calls_out) / n,
        "own_calls": counts.own_calls / n,
        "calls_out": counts.calls_out / n,
        "c_calls": counts.c_calls / n,
    }


# ------------------------------------------------------------------------ report


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def machine() -> dict[str, str]:
    out = compare.versions()
    for tool, argv in (
        ("mypy", [sys.executable, "-m", "mypy", "--version"]),
        ("cython", [sys.executable, "-m", "cython", "--version"]),
        ("gcc", ["gcc", "--version"]),
    ):
        out[tool] = procs.first_line(argv)
    out["cores"] = str(os.cpu_count())
    out["platform"] = platform.platform()
    return {k: v for k, v in out.items() if k not in ("haproxy",)}


def write_lab(out: Path, doc: dict[str, Any]) -> None:
    built: dict[str, Built] = {k: Built(**v) for k, v in doc["built"].items()}
    labels: dict[str, str] = doc["labels"]
    values: dict[str, dict[str, list[float]]] = doc["values"]
    runs = doc["runs"]

    def median(metric: str, key: str) -> float | None:
        got = values.get(metric, {}).get(key)
        return statistics.median(got) if got else None

    def us_cell(key: str) -> str:
        got = values.get("http_us", {}).get(key, [])
        if len(got) < 2:
            return fmt(median("http_us", key), ".1f")
        return f"{statistics.median(got):.1f} ({min(got):.0f} to {max(got):.0f})"

    def ratio(key: str) -> float | None:
        a, b = values.get("http_us", {}).get(key, []), values.get("http_us", {}).get("nginx", [])
        pairs = [x / y for x, y in zip(a, b, strict=False) if y]
        return statistics.median(pairs) if pairs else None

    lines = [
        "# Compile lab: CPU per small request by how fastproxy is compiled",
        "",
        f"Written by `{doc['command']}` on {doc['started']} ({doc['elapsed'] / 60:.1f} min). "
        f"Medians of {runs} interleaved run(s) of `wrk -t1 -c32 -d{doc['http_seconds']}s` "
        "on an allowed path (as `bench/compare.py`); CPU is the one worker's user + system "
        "time from /proc, the worker pinned to the proxy core. Ratios are to nginx within each "
        "run, then the median. See the module docstring of `bench/lab.py` for the method.",
        "",
        "| variant | parser | compiled modules | CPU µs / request | ratio to nginx | requests/s "
        "| Python calls / request | C calls seen | build s | .so size |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    if "nginx" in labels:
        lines.append(
            f"| {labels['nginx']} | — | — | {us_cell('nginx')} | 1.00 "
            f"| {fmt(median('http_rps', 'nginx'), '.0f')} | — | — | — | — |"
        )
    for key, b in built.items():
        label = doc["variant_labels"][key]
        if not b.ok:
            lines.append(f"| {label} | — | not built | — | — | — | — | — | — | — |")
            continue
        for parser in PARSERS:
            tk = f"{key}-{parser}"
            calls = b.calls.get(parser)
            compiled = str(len(b.compiled))
            if tk not in labels:
                why = doc["unavailable"].get(tk, "not measured")
                lines.append(f"| {label} | {parser} | {compiled} | {why} | | | | | | |")
                continue
            lines.append(
                f"| {label} | {parser} | {compiled} | {us_cell(tk)} "
                f"| {fmt(ratio(tk), '.2f')} | {fmt(median('http_rps', tk), '.0f')} "
                f"| {fmt(calls['calls'] if calls else None, '.0f')} "
                f"| {fmt(calls['c_calls'] if calls else None, '.0f')} "
                f"| {b.seconds:.0f} | {b.so_bytes / 1e6:.2f} MB |"
            )
    lines += [
        "",
        "CPU µs / request: the median, with the lowest and highest run in brackets when "
        "there were several. "
        "Python calls / request: `tests/perf/test_call_budget.py`'s count (function calls into "
        "fastproxy and the parser libraries, plus calls from them into other Python code) run "
        "against the variant's package. Code compiled to C makes no Python frames, so compiled "
        "functions and the C calls they make are not seen: the figure is the work left in the "
        "interpreter. Build s: wall time of `setup_lab.py build_ext --inplace -j 2` on this "
        "machine (busy with other work meanwhile: a rough figure; a build reused from an "
        "earlier run with `--builds` keeps its first time). .so size: every extension "
        "file the variant built (mypyc: one shared library plus a small shim per module; "
        "the shared library holds every compiled module's code, and a module's shim is "
        "mapped only when the module was imported through the import system).",
        "",
    ]
    lines += conclusion(built, labels, median, ratio)
    lines += ["", "## Variants", ""]
    for key, b in built.items():
        label = doc["variant_labels"][key]
        head = f"- **{label}** (`{key}`)"
        if not b.ok:
            lines += [
                f"{head}: **not built**:",
                "",
                "  ```",
                *("  " + x for x in b.error.splitlines()),
                "  ```",
            ]
            continue
        what = ", ".join(b.compiled) if b.compiled else "nothing compiled"
        lines.append(
            f"{head}: {what}" + (" (build reused from an earlier run)." if b.reused else ".")
        )
        for module, why in b.dropped.items():
            lines.append(f"  - dropped `{module}`: `{why}`")
        if b.load.get("file"):
            lines.append(f"  - the package imported from `{b.load['file']}`")
        mods = b.load.get("modules", {})
        if mods:
            ext = [m for m, how in mods.items() if how == "extension"]
            lines.append(f"  - extension modules when imported: {', '.join(ext) or 'none'}")
        for parser, mapped in b.mapped.items():
            lines.append(
                f"  - .so files the running {parser} worker mapped: {', '.join(mapped) or 'none'}"
            )
        for parser, why in b.calls_error.items():
            lines.append(f"  - calls per request ({parser}) not counted: `{why.splitlines()[-1]}`")
        protocols = {
            name: c
            for name, c in b.load.get("classes", {}).items()
            if any("asyncio" in base for base in c["bases"])
        }
        for name, c in protocols.items():
            lines.append(
                f"  - `{name}` (base {', '.join(c['bases'])}): "
                + ("a mypyc native class" if c.get("native") else "a Python class")
                + ", methods are "
                f"`{c['method']}` objects, instances "
                + ("keep a `__dict__`" if c["instance_dict"] else "have no `__dict__`")
            )
    lines += ["", "Policy check on every row before measuring:", ""]
    lines += [f"- {labels[k]}: {c}" for k, c in doc["policy"].items()]
    lines += ["", "## Machine and versions", ""]
    lines += [f"- {k}: {v}" for k, v in doc["machine"].items()]
    lines += [
        "",
        "## Commands",
        "",
        "Each variant is a copy of `fastproxy/` in `$TMP/<variant>/`, compiled there; the proxy "
        "runs with `PYTHONPATH=$TMP/<variant> PYTHONSAFEPATH=1` (the copy wins over the "
        "installed package, and the working directory is kept off `sys.path`).",
        "",
        "```",
        *doc["commands"],
        "```",
        "",
    ]
    (out / "LAB.md").write_text("\n".join(lines))


def conclusion(
    built: dict[str, Built], labels: dict[str, str], median: Any, ratio: Any
) -> list[str]:
    lines = ["## Conclusion (from the numbers above)", ""]
    for parser in PARSERS:
        base = median("http_us", f"pure-{parser}")
        rows = [
            (median("http_us", f"{k}-{parser}"), k)
            for k, b in built.items()
            if b.ok and median("http_us", f"{k}-{parser}") is not None
        ]
        if base is None or not rows:
            continue
        best_us, best = min(rows)
        parts = []
        for us, k in rows:
            if k == "pure":
                continue
            parts.append(f"{k} {us:.1f} µs ({(us - base) / base * 100:+.0f}%)")
        r = ratio(f"{best}-{parser}")
        lines.append(
            f"- {parser}: pure Python {base:.1f} µs per request; "
            + "; ".join(parts)
            + f". Lowest: {best} at {best_us:.1f} µs"
            + (f", {r:.2f} times nginx." if r is not None else ".")
        )
    costs = [
        f"{k} {b.seconds:.0f} s and {b.so_bytes / 1e6:.1f} MB"
        for k, b in built.items()
        if b.ok and b.so_bytes
    ]
    if costs:
        lines.append("- Build time and size of the extension files: " + "; ".join(costs) + ".")
    return lines


# ------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lab", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one short run per row")
    parser.add_argument("--out", type=Path, default=HERE, help="where LAB.md and lab.json go")
    parser.add_argument("--runs", type=int, help="interleaved runs (default 3, --quick 1)")
    parser.add_argument("--only", help="comma-separated variant keys (pure, mypyc-pure, ...)")
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="add a variant running PATH/fastproxy as it is (another checkout)",
    )
    parser.add_argument("--builds", type=Path, help="build here and keep (default: a temp dir)")
    parser.add_argument(
        "--build-only", action="store_true", help="build (into --builds) and stop; no measuring"
    )
    parser.add_argument("--count-calls", choices=PARSERS, help=argparse.SUPPRESS)
    parser.add_argument("--report-only", action="store_true", help="rewrite LAB.md from lab.json")
    args = parser.parse_args(argv)
    if args.count_calls:
        print(json.dumps(counted_calls(args.count_calls)))
        return 0
    if args.report_only:
        write_lab(args.out, json.loads((args.out / "lab.json").read_text()))
        return 0
    if os.environ.get("CI"):
        parser.error("benchmarks never run in CI")
    if shutil.which("wrk") is None or shutil.which("taskset") is None:
        parser.error("needs wrk and taskset (Debian: apt-get install wrk util-linux)")
    trees: list[tuple[str, Path]] = []
    for spec in args.tree:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            parser.error(f"--tree {spec!r}: expected NAME=PATH")
        trees.append((name, Path(path).resolve()))
    chosen = variants(trees)
    if args.only:
        keys = set(args.only.split(","))
        chosen = [v for v in chosen if v.key in keys or v.tool == "tree"]
    s = compare.QUICK if args.quick else compare.FULL
    s = dataclasses.replace(s, runs=args.runs or s.runs)

    started_at = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fastproxy-lab-") as tmpdir:
        tmp = Path(tmpdir)
        builds = args.builds.resolve() if args.builds else tmp / "variants"
        builds.mkdir(parents=True, exist_ok=True)
        built: dict[str, Built] = {}
        max_compiled: list[str] | None = None
        for v in chosen:
            log(f"building {v.key}")
            b = build(v, builds / v.key, max_compiled)
            if v.key == "mypyc-max" and b.ok:
                max_compiled = b.compiled
            built[v.key] = b
            log(
                f"  {v.key}: "
                + (
                    f"{len(b.compiled)} modules in {b.seconds:.0f} s, {b.so_bytes / 1e6:.2f} MB"
                    if b.ok
                    else "FAILED: " + b.error.splitlines()[-1]
                )
            )
        if args.build_only:
            return 0
        for b in built.values():
            if b.ok:
                for parser_name in PARSERS:
                    count_calls(b, parser_name)
                log(f"  {b.key}: calls per request {json.dumps(b.calls)}")

        load_core, proxy_core, limit, _cores = procs.place_runner()
        bench = Bench(s, tmp, proxy_core, load_core)
        bench.nofile = limit
        try:
            bench.start_origins()
            bench.start_nginx()
            for v in chosen:
                b = built[v.key]
                if not b.ok:
                    continue
                for parser_name in PARSERS:
                    key = f"{v.key}-{parser_name}"
                    if bench.start_fastproxy(
                        key,
                        f"{v.label}, {parser_name}",
                        parser=parser_name,
                        tests=frozenset({"http"}),
                        env=env_of(Path(b.path)),
                    ):
                        b.mapped[parser_name] = worker_mapped(bench.targets[-1].workers(), b.path)
            for run in range(s.runs):
                log(f"run {run + 1} of {s.runs}: CPU per small request")
                for t in bench.each("http"):
                    bench.measure_http(t)
        finally:
            bench.stop_all()
        elapsed = time.monotonic() - t0
        r = bench.results
        cmd = "python -m bench.lab" + (" --quick" if args.quick else "")
        cmd += f" --runs {args.runs}" if args.runs else ""
        cmd += " --builds DIR" if args.builds else ""
        cmd += "".join(f" --tree {name}=PATH" for name, _ in trees)
        # the report names no path of this machine: the builds and each --tree by placeholder
        places = [(str(builds), "$TMP/variants"), *((str(path), "PATH") for _, path in trees)]

        def placeless(text: str) -> str:
            for place, name in places:
                text = text.replace(place, name)
            return text

        commands = [placeless(c) for c in compare.clean_commands(procs.COMMANDS, tmp)]
        doc = {
            "command": cmd,
            "started": started_at,
            "elapsed": elapsed,
            "runs": s.runs,
            "http_seconds": s.http_seconds,
            "labels": r.labels,
            "variant_labels": {v.key: v.label for v in chosen},
            "values": r.values,
            "unavailable": r.unavailable,
            "policy": r.policy,
            "built": json.loads(
                placeless(json.dumps({k: dataclasses.asdict(b) for k, b in built.items()}))
            ),
            "machine": machine(),
            "commands": [
                *(b.command for b in built.values() if b.command),
                *commands,
            ],
        }
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "lab.json").write_text(json.dumps(doc, indent=1) + "\n")
        write_lab(args.out, doc)
    log(f"wrote {args.out / 'LAB.md'} in {elapsed / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
