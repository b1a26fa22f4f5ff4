"""``qtrader stress`` as a person runs it: one scenario, its report files, its exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

QTRADER = str(Path(sys.executable).parent / "qtrader")


def test_one_scenario_writes_the_markdown_and_json_report(tmp_path: Path) -> None:
    report = tmp_path / "out" / "stress"
    done = subprocess.run(
        [
            QTRADER, "stress",
            "--scenario", "portfolio-replay",
            "--report", str(report),
            "--work-dir", str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    document = json.loads((tmp_path / "out" / "stress.json").read_text())
    assert document["passed"] is True
    [scenario] = document["scenarios"]
    assert scenario["name"] == "portfolio-replay"
    assert scenario["criteria"]
    assert all(c["passed"] for c in scenario["criteria"])
    assert "PASS portfolio-replay" in done.stdout
    assert (tmp_path / "out" / "stress.md").read_text().startswith("# Stress report: PASSED")
    assert (tmp_path / "work" / "stress.log").exists()  # the scenario's logs, not the terminal
    assert "INFO" not in done.stderr


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        (["--scale", "0"], "--scale must be above 0"),
        (["--scale", "many"], "--scale must be a number"),
        (["--scenario", "meteor-strike"], "invalid choice: 'meteor-strike'"),
    ],
)
def test_a_bad_argument_exits_2_saying_what_is_wrong(argument: list[str], message: str) -> None:
    done = subprocess.run(
        [QTRADER, "stress", *argument], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert message in done.stderr
