"""The PromQL name tokenizer the metric-name check relies on (it must neither miss nor invent)."""

from __future__ import annotations

import pytest
from promql_names import exported_names, metric_names, template_query_names


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("qtrader_outbox_depth > 0", {"qtrader_outbox_depth"}),
        (
            'sum by (namespace, pod) (increase(qtrader_exchange_requests_total{outcome="banned"}'
            "[5m])) > 0",
            {"qtrader_exchange_requests_total"},
        ),
        (
            "histogram_quantile(0.99, sum by (le) "
            '(rate(qtrader_inference_duration_seconds_bucket{namespace=~"$namespace"}'
            "[$__rate_interval])))",
            {"qtrader_inference_duration_seconds_bucket"},
        ),
        (
            "qtrader_portfolio_drawdown_ratio / on (pod) group_left (rule) "
            "qtrader_portfolio_drawdown_limit_ratio >= 0.8",
            {"qtrader_portfolio_drawdown_ratio", "qtrader_portfolio_drawdown_limit_ratio"},
        ),
        (
            "qtrader_a > 1e3 and qtrader_b offset 5m unless qtrader_c",
            {"qtrader_a", "qtrader_b", "qtrader_c"},
        ),
        ('label_replace(up, "dst", "$1", "src", "(.*)")', {"up"}),
        ("sum(changes(qtrader_trading_state[$__range]))", {"qtrader_trading_state"}),
        ("vector(1) + time()", set()),
    ],
)
def test_metric_names_when_promql_then_only_the_selected_series(
    expr: str, expected: set[str]
) -> None:
    assert metric_names(expr) == expected


def test_template_query_names_when_label_values_then_only_the_metric() -> None:
    assert template_query_names("label_values(qtrader_health_status, namespace)") == {
        "qtrader_health_status"
    }
    assert template_query_names("label_values(namespace)") == set()


def test_exported_names_when_family_has_no_sample_yet_then_type_line_counts() -> None:
    text = "\n".join(
        [
            "# HELP qtrader_order_updates_total Order state changes.",
            "# TYPE qtrader_order_updates_total counter",
            "# HELP qtrader_ratelimit_pauses Pauses.",
            "# TYPE qtrader_ratelimit_pauses counter",
            "# HELP qtrader_wait_seconds Wait.",
            "# TYPE qtrader_wait_seconds histogram",
            'qtrader_health_status{service="execution"} 0.0',
            "qtrader_outbox_depth 3.0",
        ]
    )
    names = exported_names(text)
    assert {
        "qtrader_order_updates_total",
        "qtrader_ratelimit_pauses_total",
        "qtrader_wait_seconds_bucket",
        "qtrader_wait_seconds_count",
        "qtrader_health_status",
        "qtrader_outbox_depth",
    } <= names
    assert "qtrader_signals_dropped_total" not in names
