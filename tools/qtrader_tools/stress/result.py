"""What a stress scenario returns: figures and pass criteria, and the report built from them.

A criterion is a measured value, a comparison and a limit (``orders after halt == 0``,
``p99 decision latency <= 250 ms``). A value that could not be measured (``None``) never passes:
a scenario that did not get as far as measuring something has not shown it. A scenario that
raised has ``error`` set and fails whatever its criteria say.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

Comparison = Literal["<=", "<", "==", ">=", ">"]
Number = int | float

_COMPARE: dict[str, Callable[[Number, Number], bool]] = {
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
    ">=": operator.ge,
    ">": operator.gt,
}


@dataclass(frozen=True, kw_only=True)
class Criterion:
    name: str
    value: Number | None
    comparison: Comparison
    limit: Number
    unit: str = ""

    @property
    def passed(self) -> bool:
        if self.value is None or (isinstance(self.value, float) and math.isnan(self.value)):
            return False
        return _COMPARE[self.comparison](self.value, self.limit)

    def describe(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        shown = "not measured" if self.value is None else f"{_show(self.value)}{unit}"
        rule = f"{self.comparison} {_show(self.limit)}{unit}"
        return f"{self.name}: {shown} (must be {rule}) {'PASS' if self.passed else 'FAIL'}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "comparison": self.comparison,
            "limit": self.limit,
            "unit": self.unit,
            "passed": self.passed,
        }


@dataclass(kw_only=True)
class ScenarioResult:
    """One scenario's outcome. ``figures`` are everything measured, criteria or not."""

    name: str
    title: str
    scale: float
    duration_s: float = 0.0
    criteria: list[Criterion] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.criteria) and all(c.passed for c in self.criteria)

    def check(
        self, name: str, value: Number | None, comparison: Comparison, limit: Number, unit: str = ""
    ) -> Criterion:
        criterion = Criterion(name=name, value=value, comparison=comparison, limit=limit, unit=unit)
        self.criteria.append(criterion)
        return criterion

    def failures(self) -> list[str]:
        """One line per failed criterion (and the error), for an assertion message."""
        lines = [c.describe() for c in self.criteria if not c.passed]
        if self.error is not None:
            lines.insert(0, f"error: {self.error}")
        if not self.criteria and self.error is None:
            lines.append("no criterion was checked")
        return lines

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "passed": self.passed,
            "scale": self.scale,
            "duration_s": round(self.duration_s, 3),
            "criteria": [c.as_dict() for c in self.criteria],
            "figures": self.figures,
            "notes": self.notes,
            "error": self.error,
        }


def _show(value: Number) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


# --- the report ---------------------------------------------------------------------------------


def report_paths(base: Path) -> tuple[Path, Path]:
    """``PATH.md`` and ``PATH.json`` for ``--report PATH`` (a trailing .md/.json is dropped)."""
    if base.suffix in (".md", ".json"):
        base = base.with_suffix("")
    return base.with_name(base.name + ".md"), base.with_name(base.name + ".json")


def write_report(results: Sequence[ScenarioResult], base: Path, *, context: dict[str, Any]) -> None:
    markdown, json_path = report_paths(base)
    markdown.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "passed": all(r.passed for r in results) and bool(results),
        "context": context,
        "scenarios": [r.as_dict() for r in results],
    }
    json_path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    with markdown.open("w") as out:
        write_markdown(results, out, context=context)


def write_markdown(
    results: Sequence[ScenarioResult], out: TextIO, *, context: dict[str, Any]
) -> None:
    verdict = "PASSED" if results and all(r.passed for r in results) else "FAILED"
    out.write(f"# Stress report: {verdict}\n\n")
    for key, value in context.items():
        out.write(f"- {key}: {value}\n")
    out.write("\n| scenario | result | duration |\n| --- | --- | --- |\n")
    for result in results:
        mark = "pass" if result.passed else "FAIL"
        out.write(f"| {result.name} | {mark} | {result.duration_s:.1f} s |\n")
    for result in results:
        out.write(f"\n## {result.name}: {result.title}\n\n")
        if result.error is not None:
            out.write(f"**Error:** {result.error}\n\n")
        out.write("| criterion | measured | rule | result |\n| --- | --- | --- | --- |\n")
        for c in result.criteria:
            unit = f" {c.unit}" if c.unit else ""
            shown = "not measured" if c.value is None else f"{_show(c.value)}{unit}"
            mark = "pass" if c.passed else "FAIL"
            out.write(f"| {c.name} | {shown} | {c.comparison} {_show(c.limit)}{unit} | {mark} |\n")
        if result.figures:
            out.write("\nFigures:\n\n")
            for key, value in result.figures.items():
                out.write(f"- {key}: {_show(value) if isinstance(value, int | float) else value}\n")
        for note in result.notes:
            out.write(f"\n{note}\n")
