"""Stress verdicts and reports: a criterion that was not measured fails, an error fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qtrader_tools.stress.result import Criterion, ScenarioResult, report_paths, write_report


@pytest.mark.parametrize(
    ("value", "comparison", "limit", "passed"),
    [
        (0, "==", 0, True),
        (1, "==", 0, False),
        (2.0, "<=", 2.5, True),
        (2.6, "<=", 2.5, False),
        (5, ">", 0, True),
        (0, ">", 0, False),
        (None, "==", 0, False),  # not measured: never a pass
        (float("nan"), "<=", 1.0, False),
    ],
)
def test_a_criterion_passes_only_on_a_measured_value_that_meets_its_rule(
    value: float | None, comparison: str, limit: float, passed: bool
) -> None:
    criterion = Criterion(name="x", value=value, comparison=comparison, limit=limit)
    assert criterion.passed is passed


def test_a_scenario_passes_only_with_criteria_all_met_and_no_error() -> None:
    result = ScenarioResult(name="s", title="t", scale=0.1)
    assert not result.passed  # nothing checked is nothing shown
    assert result.failures() == ["no criterion was checked"]
    result.check("lost", 0, "==", 0)
    assert result.passed
    result.error = "RuntimeError: boom"
    assert not result.passed
    assert result.failures()[0] == "error: RuntimeError: boom"


def test_the_report_is_markdown_and_json_with_every_criterion(tmp_path: Path) -> None:
    good = ScenarioResult(name="good", title="passes", scale=1.0, figures={"events": 10})
    good.check("lost", 0, "==", 0)
    bad = ScenarioResult(name="bad", title="fails", scale=1.0)
    bad.check("latency p99", 3.2, "<=", 2.0, "s")
    write_report([good, bad], tmp_path / "report.md", context={"scale": 1.0})
    markdown, json_path = report_paths(tmp_path / "report.md")
    assert (markdown.name, json_path.name) == ("report.md", "report.json")
    document = json.loads(json_path.read_text())
    assert document["passed"] is False
    assert [s["passed"] for s in document["scenarios"]] == [True, False]
    assert document["scenarios"][1]["criteria"][0] == {
        "name": "latency p99",
        "value": 3.2,
        "comparison": "<=",
        "limit": 2.0,
        "unit": "s",
        "passed": False,
    }
    text = markdown.read_text()
    assert text.startswith("# Stress report: FAILED")
    assert "| latency p99 | 3.2 s | <= 2 s | FAIL |" in text
    assert "- events: 10" in text
