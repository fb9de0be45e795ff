"""deploy/prometheus and deploy/grafana: the alert rules pass promtool's checks and unit tests,
and every PromQL expression in the rules and the dashboard names only the metric families of
SPEC 9 (the table below is the one list of them; ``fastproxy/metrics.py`` is checked against it).

promtool comes from Debian's ``prometheus`` package (``.ci/run`` installs it); without it these
tests fail, they never skip.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "fastproxy.json"
METRICS_PY = ROOT / "fastproxy" / "metrics.py"

#: The metric families of SPEC 9 (issue table): name -> type. Dashboards and alerts may use
#: these, a histogram's ``_bucket``/``_sum``/``_count`` series, and Prometheus's own ``up``.
FAMILIES: dict[str, str] = {
    "fastproxy_requests_total": "counter",
    "fastproxy_request_duration_seconds": "histogram",
    "fastproxy_upstream_response_seconds": "histogram",
    "fastproxy_received_bytes_total": "counter",
    "fastproxy_sent_bytes_total": "counter",
    "fastproxy_active_connections": "gauge",
    "fastproxy_active_websockets": "gauge",
    "fastproxy_websocket_duration_seconds": "histogram",
    "fastproxy_websocket_closes_total": "counter",
    "fastproxy_upstream_up": "gauge",
    "fastproxy_upstream_errors_total": "counter",
    "fastproxy_reloads_total": "counter",
    "fastproxy_config_last_reload_successful": "gauge",
    "fastproxy_worker_restarts_total": "counter",
    "fastproxy_tls_certificate_not_after_seconds": "gauge",
    "fastproxy_build_info": "gauge",
}


def allowed_names() -> frozenset[str]:
    names = {"up"}
    for family, kind in FAMILIES.items():
        names.add(family)
        if kind == "histogram":
            names.update(family + suffix for suffix in ("_bucket", "_sum", "_count"))
    return frozenset(names)


# -- PromQL: the metric names an expression selects -------------------------------------------

_GRAFANA_DURATIONS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
_VARIABLE = re.compile(r"\$\{?(\w+)(?::\w+)?\}?")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE
)
_IDENT = re.compile(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "inf", "nan"}
    | {"group_left", "group_right", "atan2"}
)


def substitute_variables(expr: str) -> str:
    """Grafana's variables replaced by values PromQL parses: durations, or a regex for labels."""
    return _VARIABLE.sub(lambda m: _GRAFANA_DURATIONS.get(m[1], ".+"), expr)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (label values, functions and keywords are not)."""
    text = _STRING.sub('""', substitute_variables(expr))
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _GROUPING.sub("", text)
    names = set()
    for match in _IDENT.finditer(text):
        name, call = match[1], match[2]
        if call is None and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def test_metric_names_extracts_selectors_only() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (listener, le) (rate(fastproxy_request_duration_seconds"
        '_bucket{job=~"$job", code="up"}[$__rate_interval]))) > 2 and on (job) up == 0 '
        "unless absent(fastproxy_build_info) or time() - 14 * 86400 < 1e3"
    )
    assert metric_names(expr) == {
        "fastproxy_request_duration_seconds_bucket",
        "up",
        "fastproxy_build_info",
    }
    assert metric_names('{__name__="x"}') == set()
    assert metric_names("fastproxy_requests_totl") == {"fastproxy_requests_totl"}


# -- the expressions of the rules and the dashboard --------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and annotation of the dashboard."""
    board = dashboard()
    found = [
        (f"panel {panel['title']!r} {target['refId']}", target["expr"])
        for panel in _panels(board["panels"])
        for target in panel.get("targets", [])
    ]
    found += [
        (f"annotation {annotation['name']!r}", annotation["expr"])
        for annotation in board.get("annotations", {}).get("list", [])
        if "expr" in annotation
    ]
    return found


_LABEL_VALUES = re.compile(r"label_values\((.*),\s*\w+\)\s*$")


def variable_selectors() -> list[tuple[str, str]]:
    """(where, selector) of the dashboard's ``label_values(SELECTOR, label)`` variables."""
    found = []
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = _LABEL_VALUES.fullmatch(text)
        assert match, f"variable {variable['name']}: expected label_values(...), got {text!r}"
        found.append((f"variable {variable['name']!r}", match[1]))
    return found


def test_every_expression_names_existing_families() -> None:
    allowed = allowed_names()
    expressions = [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
    expressions += dashboard_expressions() + variable_selectors()
    assert len(expressions) > 30
    unknown = {
        where: sorted(metric_names(expr) - allowed)
        for where, expr in expressions
        if metric_names(expr) - allowed
    }
    assert not unknown, f"metric names outside SPEC 9's families: {unknown}"
    for where, expr in expressions:
        assert metric_names(expr), f"{where}: selects no metric: {expr!r}"


def test_dashboard_covers_the_issue_panels() -> None:
    used = set().union(*(metric_names(expr) for _, expr in dashboard_expressions()))
    for name in (
        "fastproxy_requests_total",
        "fastproxy_request_duration_seconds_bucket",
        "fastproxy_upstream_up",
        "fastproxy_active_websockets",
        "fastproxy_websocket_closes_total",
        "fastproxy_reloads_total",
        "fastproxy_worker_restarts_total",
        "fastproxy_tls_certificate_not_after_seconds",
    ):
        assert name in used, f"the dashboard has no panel on {name}"
    heatmaps = [p for p in _panels(dashboard()["panels"]) if p["type"] == "heatmap"]
    assert heatmaps, "no latency heatmap"
    assert all(t.get("format") == "heatmap" for p in heatmaps for t in p["targets"])


def test_dashboard_datasource_is_a_variable() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in _panels(board["panels"]) if p["type"] != "row"]
    sources = [p.get("datasource") for p in panels]
    sources += [t.get("datasource") for p in panels for t in p["targets"]]
    assert sources
    assert all(s == {"type": "prometheus", "uid": "${datasource}"} for s in sources), sources


def _defined_in_metrics_py() -> set[str]:
    """Family names as ``fastproxy/metrics.py`` writes them (a counter's without ``_total``)."""
    return set(re.findall(r'"(fastproxy_[a-z_]+)"', METRICS_PY.read_text()))


def test_families_match_metrics_py() -> None:
    defined = _defined_in_metrics_py()
    missing = []
    for family in FAMILIES:
        spellings = {family, family.removesuffix("_total")}
        if not spellings & defined:
            missing.append(family)
    assert not missing, f"families of SPEC 9 that fastproxy/metrics.py does not define: {missing}"


# -- promtool ----------------------------------------------------------------------------------


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is required (Debian package prometheus; .ci/run installs it)"
    return path


def run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", "alerts.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_test_rules() -> None:
    result = run_promtool("test", "rules", "alerts_test.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_test_rules_fails_on_a_changed_threshold(tmp_path: Path) -> None:
    text = (PROMETHEUS / "alerts.yml").read_text()
    changed = text.replace("< 14 * 86400", "< 7 * 86400")
    assert changed != text
    (tmp_path / "alerts.yml").write_text(changed)
    shutil.copy(PROMETHEUS / "alerts_test.yml", tmp_path)
    result = run_promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "FastproxyCertificateExpiringSoon" in result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_silent() -> None:
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    firing: set[str] = set()
    silent: set[str] = set()
    for group in tests:
        for case in group.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else silent).add(case["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - firing == set(), "alerts never shown firing"
    assert names - silent == set(), "alerts never shown silent"


def test_alerts_have_for_severity_and_runbook() -> None:
    for rule in alert_rules():
        assert "for" in rule, rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), rule["alert"]


def test_dashboard_expressions_parse(tmp_path: Path) -> None:
    """promtool parses every dashboard expression (as a recording rule of a scratch file)."""
    rules = [
        {"record": f"dashboard:expression_{index}", "expr": substitute_variables(expr)}
        for index, (_, expr) in enumerate(dashboard_expressions())
    ]
    (tmp_path / "dashboard.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    result = run_promtool("check", "rules", "dashboard.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("bad", ["rate(fastproxy_requests_total[5m]", "sum by (le (x)"])
def test_promtool_refuses_bad_promql(tmp_path: Path, bad: str) -> None:
    """The parse check above can fail: promtool refuses a broken expression."""
    (tmp_path / "bad.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "g", "rules": [{"record": "x:y", "expr": bad}]}]})
    )
    assert run_promtool("check", "rules", "bad.yml", cwd=tmp_path).returncode != 0
