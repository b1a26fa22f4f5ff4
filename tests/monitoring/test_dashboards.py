"""The Grafana dashboards: well-formed, covering what operators look at, shipped as ConfigMaps."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from promql_names import CHART, DASHBOARDS, dashboard_expressions, names_in
from test_alert_rules import documents, render, require_promtool

DASHBOARD_VALUES = {"enabled": True, "labelKey": "grafana_dashboard", "labelValue": "1"}
# What each dashboard must show, as metric names its queries must use.
MUST_USE = {
    "trading-overview.json": {
        "qtrader_portfolio_equity_usd",
        "qtrader_portfolio_realized_pnl_usd",
        "qtrader_portfolio_drawdown_ratio",
        "qtrader_portfolio_open_positions",
        "qtrader_portfolio_funding_usd",
        "qtrader_portfolio_transfers_usd",
        "qtrader_portfolio_fees_by_asset",
        "qtrader_wallet_difference_usd",
        "qtrader_health_status",
        "up",
    },
    "pipeline.json": {
        "qtrader_signals_emitted_total",
        "qtrader_signals_dropped_total",
        "qtrader_inference_duration_seconds_bucket",
        "qtrader_consumer_pending_messages",
    },
    "exchange.json": {
        "qtrader_ratelimit_used_share",
        "qtrader_exchange_requests_total",
        "qtrader_order_updates_total",
    },
    "ess.json": {
        "qtrader_trading_state",
        "qtrader_halt_revision_acks_total",
        "qtrader_signals_denied_total",
        "qtrader_orders_blocked_total",
    },
}
# Per-second panels of what is not an HTTP request must not say "req/s".
REQUEST_METRICS = ("qtrader_exchange_requests_total", "qtrader_ratelimit_acquisitions_total")


def panel_problems(panel: dict[str, Any]) -> list[str]:
    """What keeps a panel from being read at a glance: no description, no unit, a coloured stat
    without thresholds (Grafana's defaults turn any value past 80 red), req/s for non-requests."""
    if panel["type"] == "row":
        return []
    problems = []
    if not str(panel.get("description", "")).strip():
        problems.append("no description")
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    if not defaults.get("unit"):
        problems.append("no unit")
    # Grafana colours a stat's value unless colorMode is "none".
    coloured = panel["type"] == "stat" and panel.get("options", {}).get("colorMode") != "none"
    if coloured and not defaults.get("thresholds", {}).get("steps"):
        problems.append("a coloured stat without thresholds")
    exprs = " ".join(target["expr"] for target in panel.get("targets", []))
    if defaults.get("unit") == "reqps" and not any(m in exprs for m in REQUEST_METRICS):
        problems.append("req/s for something that is not a request")
    return problems


@pytest.mark.parametrize("name", sorted(MUST_USE))
def test_dashboard_when_loaded_then_well_formed_and_shows_what_it_must(name: str) -> None:
    path = DASHBOARDS / name
    board = json.loads(path.read_text())
    assert board["schemaVersion"] >= 39
    assert board["uid"].startswith("qtrader-")
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    used = set().union(*(names_in(e) for e in dashboard_expressions(path).values()))
    assert MUST_USE[name] <= used, MUST_USE[name] - used


@pytest.mark.parametrize("name", sorted(MUST_USE))
def test_dashboard_panels_when_loaded_then_described_with_units_and_thresholds(name: str) -> None:
    board = json.loads((DASHBOARDS / name).read_text())
    problems = {
        f"{panel['id']} {panel['title']}": found
        for panel in board["panels"]
        if (found := panel_problems(panel))
    }
    assert not problems, problems


def test_panel_problems_when_equity_stat_coloured_without_thresholds_then_found() -> None:
    """The check can fail: the Equity stat as it was (always red) and a req/s signal panel."""
    equity = {
        "type": "stat",
        "title": "Equity",
        "description": "",
        "fieldConfig": {"defaults": {"unit": "currencyUSD"}},
        "options": {"colorMode": "background"},
        "targets": [{"expr": "sum(qtrader_portfolio_equity_usd)"}],
    }
    signals = {
        "type": "timeseries",
        "title": "Signals/s",
        "description": "Signals per second.",
        "fieldConfig": {"defaults": {"unit": "reqps"}},
        "targets": [{"expr": "sum(rate(qtrader_signals_emitted_total[1m]))"}],
    }
    assert panel_problems(equity) == ["no description", "a coloured stat without thresholds"]
    assert panel_problems(signals) == ["req/s for something that is not a request"]


def test_dashboards_when_rendered_then_one_labelled_configmap_each(tmp_path: Path) -> None:
    rendered = render(CHART, {"dashboards": {**DASHBOARD_VALUES, "labelValue": "yes"}})
    maps = documents(rendered, "ConfigMap")
    dashboards = {}
    for config_map in maps:
        metadata = config_map["metadata"]
        assert isinstance(metadata, dict)
        if metadata["labels"].get("app.kubernetes.io/component") != "dashboards":
            continue
        assert metadata["labels"]["grafana_dashboard"] == "yes"
        data = config_map["data"]
        assert isinstance(data, dict)
        [(key, text)] = data.items()
        dashboards[key] = text
    assert set(dashboards) == set(MUST_USE)
    for key, text in dashboards.items():
        assert json.loads(text) == json.loads((DASHBOARDS / key).read_text())


def test_dashboards_when_disabled_then_no_configmaps() -> None:
    rendered = render(CHART, {"dashboards": {**DASHBOARD_VALUES, "enabled": False}})
    for config_map in documents(rendered, "ConfigMap"):
        metadata = config_map["metadata"]
        assert isinstance(metadata, dict)
        assert metadata["labels"].get("app.kubernetes.io/component") != "dashboards"


def grafana_to_promql(expr: str) -> str:
    """A panel's query as Prometheus receives it from Grafana (variables substituted)."""
    return (
        expr.replace("$__rate_interval", "1m").replace("$__range", "1h").replace("$namespace", ".*")
    )


def test_dashboard_queries_when_checked_by_promtool_then_parse(tmp_path: Path) -> None:
    """Every panel query is valid PromQL: promtool checks them as recording rules."""
    queries = [
        expr
        for path in sorted(DASHBOARDS.glob("*.json"))
        for where, expr in dashboard_expressions(path).items()
        if not where.startswith("variable ")  # label_values() is Grafana's, not PromQL
    ]
    assert len(queries) > 50
    rules = [
        {"record": f"dashboard:query_{index}", "expr": grafana_to_promql(expr)}
        for index, expr in enumerate(queries)
    ]
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run(
        [require_promtool(), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# Panels of a quantity with a known limit or target draw it as a line, so the eye finds a
# breach without reading a number: the rule's or the requirement's figure, not decoration.
LIMIT_LINES = {
    "exchange.json": {"Weight used (share of limit)": [0.8, 0.95]},
    "ess.json": {
        "Trading state per worker": [1, 2],  # REDUCING, HALTED
        "Halt latency (issued to in force), p50 / p99": [0.5, 1],
    },
    "pipeline.json": {
        "Signal decision latency": [0.25, 2],  # signal-flood's p50 and p99 bounds
        "NATS connection": [1],
        "Consumer lag": [100, 1000],  # 1000: the consumers' max ack pending
    },
}


@pytest.mark.parametrize("name", sorted(LIMIT_LINES))
def test_panels_with_a_limit_when_loaded_then_draw_it(name: str) -> None:
    panels = {p["title"]: p for p in json.loads((DASHBOARDS / name).read_text())["panels"]}
    for title, limits in LIMIT_LINES[name].items():
        defaults = panels[title]["fieldConfig"]["defaults"]
        drawn = [s["value"] for s in defaults["thresholds"]["steps"] if s["value"] is not None]
        assert drawn == limits, title
        assert defaults["custom"]["thresholdsStyle"]["mode"] != "off", title
