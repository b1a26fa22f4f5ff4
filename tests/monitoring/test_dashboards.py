"""The Grafana dashboards: well-formed, covering what operators look at, shipped as ConfigMaps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from promql_names import CHART, DASHBOARDS, dashboard_expressions, names_in
from test_alert_rules import documents, render

DASHBOARD_VALUES = {"enabled": True, "labelKey": "grafana_dashboard", "labelValue": "1"}
# What each dashboard must show, as metric names its queries must use.
MUST_USE = {
    "trading-overview.json": {
        "qtrader_portfolio_equity_usd",
        "qtrader_portfolio_realized_pnl_usd",
        "qtrader_portfolio_drawdown_ratio",
        "qtrader_portfolio_open_positions",
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
    "ess.json": {"qtrader_trading_state", "qtrader_halt_acks_total"},
}


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
