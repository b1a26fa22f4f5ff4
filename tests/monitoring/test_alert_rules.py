"""The alert rules: valid for Prometheus, firing (and silent) as meant, and deployed verbatim.

``promtool`` (Debian package ``prometheus``) checks ``charts/quantum-trader/rules/alerts.yaml``
and runs the cases in ``alerts_test.yaml`` on synthetic series. Without promtool the tests skip
on a developer's machine but fail when ``CI`` is set: CI must install it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from promql_names import ALERTS, CHART

HERE = Path(__file__).resolve().parent
_NOT_CI = {"", "0", "false", "no"}
GATE = '(.Capabilities.APIVersions.Has "monitoring.coreos.com/v1")'
MONITORING = {"enabled": True, "interval": "15s", "labels": {"release": "kube-prometheus"}}
REQUIRED_ALERTS = {
    "QtraderEmergencyStopTripped",
    "QtraderOperatorDown",
    "QtraderDrawdownNearLimit",
    "QtraderMarketDataStale",
    "QtraderConsumerLag",
    "QtraderRateLimitPressure",
    "QtraderRateLimited",
    "QtraderExchangeBan",
    "QtraderOutboxBacklog",
    "QtraderWorkloadNotReady",
    "QtraderWorkloadDown",
    "QtraderWorkloadAbsent",
    "QtraderMarketDataMissing",
    "QtraderMarketDataGap",
    "QtraderVenuePositionMismatch",
    "QtraderWalletMismatch",
    "QtraderDrawdownLimitReached",
}


def require_promtool() -> str:
    found = shutil.which("promtool")
    if found is not None:
        return found
    message = "promtool is not installed (Debian/Ubuntu: apt-get install -y prometheus)"
    if os.environ.get("CI", "").strip().lower() not in _NOT_CI:
        pytest.fail(f"{message}; CI is set, so the alert rule tests must not be skipped")
    pytest.skip(message)


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_promtool(), *args], capture_output=True, text=True, timeout=120, cwd=HERE
    )


def test_alert_rules_when_checked_by_promtool_then_valid() -> None:
    result = _promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_when_unit_tested_then_each_fires_and_stays_silent_as_meant() -> None:
    result = _promtool("test", "rules", "alerts_test.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_when_broken_then_promtool_test_fails(tmp_path: Path) -> None:
    """The check can fail: a threshold moved by mistake makes the cases fail."""
    text = ALERTS.read_text()
    assert "qtrader_outbox_oldest_age_seconds > 600\n" in text
    broken = text.replace(
        "qtrader_outbox_oldest_age_seconds > 600\n", "qtrader_outbox_oldest_age_seconds > 6000\n"
    )
    (tmp_path / "alerts.yaml").write_text(broken)
    cases = yaml.safe_load((HERE / "alerts_test.yaml").read_text())
    cases["rule_files"] = ["alerts.yaml"]
    (tmp_path / "cases.yaml").write_text(yaml.safe_dump(cases))
    result = subprocess.run(
        [require_promtool(), "test", "rules", "cases.yaml"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "QtraderOutboxStuck" in result.stdout + result.stderr


def _alerts() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def test_alert_rules_when_listed_then_every_required_alert_is_there() -> None:
    alerts = _alerts()
    assert alerts.keys() >= REQUIRED_ALERTS
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
    expressions = [" ".join(rule["expr"].split()) for rule in alerts.values()]
    assert len(set(expressions)) == len(expressions), "two alerts on one expression"


def runbook_problems(rule: dict[str, Any]) -> list[str]:
    """What keeps an alert from saying, in a line each, what it means (``summary``) and the
    first thing to do (``runbook``, with the command to run in backticks)."""
    annotations = rule.get("annotations", {})
    problems = []
    for key in ("summary", "runbook"):
        text = str(annotations.get(key, "")).strip()
        if not text:
            problems.append(f"no {key}")
        elif "\n" in text:
            problems.append(f"a {key} of more than one line")
    if annotations.get("runbook") and "`" not in annotations["runbook"]:
        problems.append("no command in the runbook")
    return problems


def test_alert_rules_when_listed_then_each_has_a_one_line_summary_and_runbook() -> None:
    """The PrometheusRule renders this file verbatim (tested below), so this holds for it too."""
    alerts = _alerts()
    problems = {name: found for name, rule in alerts.items() if (found := runbook_problems(rule))}
    assert not problems, problems


def test_runbook_problems_when_missing_multi_line_or_vague_then_found() -> None:
    """The check can fail."""
    assert runbook_problems({"annotations": {"summary": "Down"}}) == ["no runbook"]
    two_lines = {"summary": "Down\nreally", "runbook": "Look at `kubectl get pods`."}
    assert runbook_problems({"annotations": two_lines}) == ["a summary of more than one line"]
    vague = {"summary": "Down", "runbook": "Check the pod."}
    assert runbook_problems({"annotations": vague}) == ["no command in the runbook"]
    concrete = {"summary": "Down", "runbook": "Run `qtrader health`."}
    assert runbook_problems({"annotations": concrete}) == []


def test_alert_cases_when_listed_then_each_alert_fires_in_one_and_stays_silent_in_another() -> None:
    """alerts_test.yaml has, for every alert, a moment it must fire and one it must not."""
    cases = yaml.safe_load((HERE / "alerts_test.yaml").read_text())
    checks = [check for case in cases["tests"] for check in case["alert_rule_test"]]
    fires = {check["alertname"] for check in checks if check.get("exp_alerts")}
    silent = {check["alertname"] for check in checks if not check.get("exp_alerts")}
    assert set(_alerts()) - fires == set(), "alerts without a case that fires"
    assert set(_alerts()) - silent == set(), "alerts without a case that stays silent"


def render(chart: Path, values: dict[str, object]) -> dict[str, str]:
    """Real Helm rendering (helm-python-sdk); skipped without it, failed in CI."""
    try:
        import helm_python
    except ImportError:
        message = "helm-python-sdk is not installed (pip install helm-python-sdk)"
        if os.environ.get("CI", "").strip().lower() not in _NOT_CI:
            pytest.fail(f"{message}; CI is set, so the chart tests must not be skipped")
        pytest.skip(message)
    rendered: dict[str, str] = helm_python.Chart.load(str(chart)).render(
        values=values, name="qt", namespace="trading"
    )
    return rendered


def documents(rendered: dict[str, str], kind: str) -> list[dict[str, object]]:
    texts = [text for path, text in rendered.items() if path.endswith((".yaml", ".yml"))]
    docs = [d for text in texts for d in yaml.safe_load_all(text) if d]
    return [d for d in docs if d.get("kind") == kind]


def _with_monitoring_api(tmp_path: Path) -> Path:
    """A copy of the chart whose monitoring templates see the monitoring.coreos.com/v1 API.

    helm-python-sdk renders with Helm's default capabilities and offers no --api-versions, so
    the capability test (the only change) is replaced by true in the copy.
    """
    copy = tmp_path / "quantum-trader"
    shutil.copytree(CHART, copy)
    for template in (copy / "templates" / "monitoring").glob("*.yaml"):
        text = template.read_text()
        assert GATE in text, f"{template.name} is not gated on the monitoring API"
        template.write_text(text.replace(GATE, "true"))
    return copy


def test_prometheus_rule_when_rendered_then_groups_equal_the_rules_file(tmp_path: Path) -> None:
    rendered = render(_with_monitoring_api(tmp_path), {"monitoring": MONITORING})
    [rule] = documents(rendered, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text())  # type: ignore[comparison-overlap]
    metadata = rule["metadata"]
    assert isinstance(metadata, dict)
    assert metadata["labels"]["release"] == "kube-prometheus"
    monitors = {m["metadata"]["name"]: m["spec"] for m in documents(rendered, "PodMonitor")}
    assert set(monitors) == {"qt-quantum-trader-workloads", "qt-quantum-trader-operator"}
    workloads, operator = (
        monitors["qt-quantum-trader-workloads"],
        monitors["qt-quantum-trader-operator"],
    )
    assert workloads["podMetricsEndpoints"] == [
        {"port": "health", "path": "/metrics", "interval": "15s", "scheme": "http"}
    ]
    assert workloads["selector"]["matchLabels"]["app.kubernetes.io/managed-by"] == (
        "qtrader-operator"
    )
    # The operator's pods, on the port its Deployment names "metrics".
    assert operator["podMetricsEndpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "15s", "scheme": "http"}
    ]
    [deployment] = [
        d for d in documents(rendered, "Deployment") if d["metadata"]["name"].endswith("-operator")
    ]
    template = deployment["spec"]["template"]
    assert operator["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    (container,) = template["spec"]["containers"]
    assert "metrics" in {port["name"] for port in container["ports"]}


def test_monitoring_when_disabled_or_api_missing_then_nothing_rendered(tmp_path: Path) -> None:
    off = render(_with_monitoring_api(tmp_path), {"monitoring": {**MONITORING, "enabled": False}})
    no_api = render(CHART, {"monitoring": MONITORING})
    for rendered in (off, no_api):
        assert not documents(rendered, "PrometheusRule")
        assert not documents(rendered, "PodMonitor")
