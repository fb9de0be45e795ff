"""The dependency direction of docs/ARCHITECTURE.md, checked on the imports of each module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "fastproxy"

# module -> (fastproxy modules it may import, third-party top-level packages it may import)
ALLOWED: dict[str, tuple[set[str], set[str]]] = {
    "errors": (set(), set()),
    "policy": ({"errors"}, set()),
    "headers": (set(), set()),
    "config": ({"errors", "policy", "headers"}, set()),
    "accel": (set(), set()),
    "http1": ({"headers", "accel"}, {"h11", "mypy_extensions"}),
    "http1_httptools": ({"http1", "headers"}, {"httptools"}),
    "wsframe": (set(), set()),
    "wsrelay": ({"wsframe"}, set()),
    "metrics": ({"fastproxy"}, {"prometheus_client"}),
    "log": ({"errors"}, {"orjson"}),
    "admin": ({"metrics", "http1", "fastproxy"}, set()),
    "tls": ({"errors", "config"}, set()),
    "upstream": ({"errors", "config", "health", "http1", "tls"}, set()),
    "deadlines": (set(), set()),
    "runtime": ({"config", "policy"}, set()),
    "exchange": ({"config", "errors", "headers", "http1", "policy", "runtime", "wsrelay"}, set()),
    "health": ({"config"}, set()),
    "checker": ({"health", "config"}, set()),
    "control": ({"errors"}, set()),
    "worker": (
        {
            "admin",
            "config",
            "control",
            "deadlines",
            "errors",
            "exchange",
            "log",
            "headers",
            "http1",
            "http1_httptools",
            "metrics",
            "policy",
            "runtime",
            "tls",
            "upstream",
            "wsframe",
            "wsrelay",
        },
        {"uvloop", "orjson"},
    ),
    "systemd": ({"errors"}, set()),
    "master": (
        {
            "errors",
            "checker",
            "config",
            "control",
            "health",
            "log",
            "metrics",
            "runtime",
            "systemd",
            "tls",
            "worker",
        },
        set(),
    ),
    "demo": (set(), {"h11", "wsproto", "orjson", "uvloop"}),
    "policytest": ({"config", "errors", "exchange", "http1", "runtime"}, set()),
    "cli": (
        {
            "errors",
            "policytest",
            "config",
            "exchange",
            "http1",
            "log",
            "master",
            "policy",
            "runtime",
            "demo",
            "systemd",
            "tls",
            "fastproxy",
        },
        set(),
    ),
    "__init__": ({"accel"}, set()),
    "__main__": ({"cli"}, set()),
}
PURE = {
    "policy",
    "headers",
    "config",
    "http1",
    "http1_httptools",
    "wsframe",
    "wsrelay",
    "runtime",
    "exchange",
    "health",
}
IMPURE_STDLIB = {"asyncio", "socket", "time", "logging", "selectors", "threading"}
THIRD_PARTY = {
    "h11",
    "wsproto",
    "uvloop",
    "orjson",
    "prometheus_client",
    "httptools",
    "mypy_extensions",
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "fastproxy":
                names.update(f"fastproxy.{alias.name}" for alias in node.names)
            else:
                names.add(node.module)
    return names


def _modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py"))


def test_layering_every_module_is_in_the_table() -> None:
    assert set(_modules()) == set(ALLOWED)


@pytest.mark.parametrize("module", _modules())
def test_layering_imports_point_down(module: str) -> None:
    inner, outer = ALLOWED[module]
    for name in _imports(PACKAGE / f"{module}.py"):
        top = name.split(".")[0]
        if top == "fastproxy":
            target = name.split(".")[1] if "." in name else "fastproxy"
            if target in {"__version__", "BUILD"}:  # the package's own attributes
                target = "fastproxy"
            assert target in inner, f"{module} imports fastproxy.{target}"
        elif top in THIRD_PARTY:
            assert top in outer, f"{module} imports {top}"
        if module in PURE:
            assert top not in IMPURE_STDLIB, f"pure module {module} imports {top}"


#: what only the adapter may touch: the exchange acts through ExchangeIO and UpstreamConn
_IO_NAMES = {"transport", "loop", "metrics", "logger", "deadlines", "monotonic", "pool", "pools"}


def test_layering_exchange_names_no_transport_loop_clock_or_metrics() -> None:
    tree = ast.parse((PACKAGE / "exchange.py").read_text())
    names = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    names |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert not names & _IO_NAMES, sorted(names & _IO_NAMES)
