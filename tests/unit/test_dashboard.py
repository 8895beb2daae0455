"""The Grafana dashboard uses only metrics fedtoken exports: every PromQL
expression in deploy/grafana/fedtoken.json (panel targets and template
variables) names metrics of fedtoken.ops.metrics, with their _total, _bucket,
_count and _sum suffixes; the Prometheus scrape example points at the ops port."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedtoken.config import Settings
from fedtoken.ops import metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "fedtoken.json"
SCRAPE = ROOT / "deploy" / "prometheus" / "scrape.yml"

KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                      "and", "or", "unless", "offset", "inf", "nan"})
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a label_values() query) selects."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, regexes)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    text = GROUPING.sub("", text)
    label_values = re.fullmatch(r"\s*label_values\((.*),\s*[A-Za-z_]\w*\s*\)\s*", text)
    if label_values:
        text = label_values.group(1)
    names = set()
    for m in IDENT.finditer(text):
        word = m.group(0)
        following = text[m.end():].lstrip()
        if following.startswith("(") or word.lower() in KEYWORDS:
            continue  # a function or an operator keyword
        if text[max(0, m.start() - 1)] == "$":
            continue  # a Grafana variable
        names.add(word)
    return names


def expressions(node: Any) -> Iterator[str]:
    """Every PromQL string of the dashboard: targets' expr, query variables."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, str) and node.get("type") != "datasource":
                yield value
            else:
                yield from expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from expressions(item)


@pytest.fixture(scope="module")
def dashboard() -> Any:
    return json.loads(DASHBOARD.read_text())


def test_the_parser_finds_metric_names() -> None:
    assert metric_names('histogram_quantile(0.99, sum by (le, method) '
                        '(rate(fedtoken_rpc_duration_seconds_bucket{job=~"$job", '
                        'code!="OK"}[$__rate_interval])))') == {
        "fedtoken_rpc_duration_seconds_bucket"}
    assert metric_names("sum(rate(a_total[5m])) / sum(rate(b_count[5m])) > bool 0") == {
        "a_total", "b_count"}
    assert metric_names('label_values(up{job="x"}, instance)') == {"up"}
    assert metric_names("max by (instance) (g) == 1") == {"g"}


def test_every_expression_names_only_exported_metrics(dashboard: Any) -> None:
    exported = metrics.exported_names()
    exprs = list(expressions(dashboard))
    assert len(exprs) >= 20
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric found in {expr!r}"
        unknown = names - exported
        assert not unknown, f"{expr!r} names metrics fedtoken does not export: {unknown}"


def test_the_dashboard_shows_every_metric(dashboard: Any) -> None:
    used = {n for e in expressions(dashboard) for n in metric_names(e)}
    families = {name for name in metrics.METRICS
                if not any(n == name or n.startswith(name + "_") for n in used)}
    assert not families, f"metrics with no panel: {sorted(families)}"


def test_the_dashboard_is_a_grafana_dashboard(dashboard: Any) -> None:
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in dashboard["panels"]:
        assert {"h", "w", "x", "y"} <= set(p["gridPos"])
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        if p["type"] != "row":
            assert p["targets"], p["title"]
            assert p["datasource"]["uid"] == "${datasource}"
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("rpc rate", "latency", "verdicts by reason", "issued", "hsm sign",
                  "revocation", "audit queue", "jwks", "rotation", "rsa"):
        assert topic in titles, topic


def test_the_scrape_example_targets_the_ops_port() -> None:
    # No YAML library in the dependencies: the few lines that matter, as text.
    text = SCRAPE.read_text()
    live = [line.split("#", 1)[0].rstrip() for line in text.splitlines()]
    live = [line for line in live if line.strip()]
    assert live[0] == "scrape_configs:"
    assert "  - job_name: fedtoken" in live
    assert "    metrics_path: /metrics" in live
    defaults = Settings()
    assert f"          - {defaults.ops_host}:{defaults.ops_port}" in live
    assert "\t" not in text
