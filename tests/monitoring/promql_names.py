"""Metric names in the chart's PromQL (alert rules and Grafana dashboards) and in /metrics text.

A small tokenizer, not a PromQL parser: it removes what cannot be a metric name (strings, label
matchers, range and subquery brackets, grouping label lists, Grafana variables, numbers), then
every remaining identifier not followed by ``(`` and not a keyword is a metric name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "quantum-trader"
ALERTS = CHART / "rules" / "alerts.yaml"
DASHBOARDS = CHART / "dashboards"

_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan", "atan2",
}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$\w+")
_NUMBER = re.compile(
    r"(?<![\w:])(?:(?:\d+(?:ms|[smhdwy]))+(?![\w:])|0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)"
)
_IDENT = re.compile(r"(?<![\w:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_LABEL_VALUES = re.compile(r"label_values\(\s*(?:([^,()]+?)\s*,)?\s*\w+\s*\)")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    text = _STRING.sub(" ", expr)
    text = _GRAFANA_VAR.sub(" ", text)
    text = _MATCHERS.sub(" ", text)
    text = _BRACKETS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue  # a function or an aggregation operator, or a keyword
        names.add(name)
    return names


def template_query_names(query: str) -> set[str]:
    """Metric names in a Grafana variable query (``label_values(metric, label)`` or PromQL)."""
    found = _LABEL_VALUES.search(query)
    if found:
        return metric_names(found.group(1)) if found.group(1) else set()
    return metric_names(query)


def alert_expressions(path: Path = ALERTS) -> dict[str, str]:
    """``alert or record name -> expr`` of every rule in a Prometheus rules file."""
    document = yaml.safe_load(path.read_text())
    rules = [rule for group in document["groups"] for rule in group["rules"]]
    return {rule.get("alert") or rule["record"]: rule["expr"] for rule in rules}


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    flat = []
    for panel in panels:
        flat.append(panel)
        flat += _panels(panel.get("panels", []))  # rows keep collapsed panels inside
    return flat


def dashboard_expressions(path: Path) -> dict[str, str]:
    """``"panel title / refId" -> expr`` of every PromQL query in a Grafana dashboard JSON."""
    board = json.loads(path.read_text())
    exprs = {}
    for panel in _panels(board.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                exprs[f"{panel['title']} / {target['refId']}"] = target["expr"]
    for variable in board.get("templating", {}).get("list", []):
        query = variable.get("query")
        if variable.get("type") == "query" and query:
            text = query["query"] if isinstance(query, dict) else query
            exprs[f"variable {variable['name']}"] = f"label_values:{text}"
    return exprs


def names_in(expr: str) -> set[str]:
    if expr.startswith("label_values:"):
        return template_query_names(expr.removeprefix("label_values:"))
    return metric_names(expr)


def exported_names(exposition: str) -> set[str]:
    """Names a /metrics page offers: every sample, and every ``# TYPE`` family with its samples'
    names even before it has a sample (a labelled counter nobody incremented yet)."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind == "counter" and not name.endswith("_total"):
                names.add(name + "_total")
            if kind in ("histogram", "summary"):
                names.update(name + suffix for suffix in HISTOGRAM_SUFFIXES)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names
