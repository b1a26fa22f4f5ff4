"""``qtrader up`` as a newcomer runs it: the bounded run, its report, and its refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
QTRADER = str(Path(sys.executable).parent / "qtrader")


def _run(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [QTRADER, *args], capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, check=False
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_when_bounded_then_trades_prints_report_and_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    report_path = tmp_path / "report.json"
    result = _run(
        "up",
        "--policy", "examples/policy.yaml",
        "--duration", "25",
        "--candles-per-second", "20",
        "--data-dir", str(tmp_path / "run"),
        "--report", str(report_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Final report" in result.stdout
    # Without a terminal: the title names the policy's real mode, each line every health.
    assert result.stdout.startswith("Quantum Trader (paper) policy ")
    plain = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert plain, result.stdout
    assert "health marketdata " in plain[-1]
    assert " execution " in plain[-1].partition("health ")[2]
    report = json.loads(report_path.read_text())
    assert report["candles"] > 0
    assert report["signals"] > 0
    assert report["fills"] > 0
    # One fill per attempt on paper; an attempt the exposure book cut to the limits leaves a
    # remainder (a second attempt, or the intent ends CANCELED with what it filled).
    filled, canceled = report["orders"]["FILLED"], report["orders"].get("CANCELED", 0)
    assert filled <= report["fills"] <= 3 * (filled + canceled)
    assert report["portfolio"]["fills_applied"] == report["fills"]
    # The income line: paper books no funding or transfers, its fees are all in USDT.
    (income,) = [line for line in result.stdout.splitlines() if line.startswith("  funding ")]
    fees = {a["asset"]: Decimal(a["amount"]) for a in report["portfolio"]["fees_by_asset"]}
    usdt = fees["USDT"].quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)  # half away from 0
    assert income.endswith(f"fees by asset {usdt:,.2f} USDT"), income
    assert "transfers -" in income
    assert report["down"] == []
    assert set(report["restarts"].values()) == {0}
    assert {r: h["status"] for r, h in report["health"].items()} == dict.fromkeys(
        ("marketdata", "inference", "execution", "portfolio"), "OK"
    )
    assert report["processes"], "the report names the processes it started"
    for role, pid in report["processes"].items():
        assert not _alive(pid), f"{role} (pid {pid}) still running after qtrader up returned"


def test_up_when_interrupted_then_stops_everything_and_exits_0(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    command = [QTRADER, "up", "--policy", "examples/policy.yaml", "--report", str(report_path)]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    try:
        title = process.stdout.readline()  # printed once, before the first summary line
        assert title.startswith("Quantum Trader (paper)"), title
        first_line = process.stdout.readline()  # the summary has started: everything is up
        assert "candles" in first_line
        time.sleep(3)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:  # a failed check above: no process left behind
            process.kill()
            process.communicate()
    assert process.returncode == 0, stdout + stderr
    assert "Final report" in stdout
    report = json.loads(report_path.read_text())
    assert report["down"] == []
    assert set(report["restarts"].values()) == {0}
    for role, pid in report["processes"].items():
        assert not _alive(pid), f"{role} (pid {pid}) still running after Ctrl-C"


def test_up_when_policy_file_missing_then_says_so_and_exits_2() -> None:
    result = _run("up", "--policy", "no-such-policy.yaml", "--duration", "1")
    assert result.returncode == 2
    assert "no such file: no-such-policy.yaml" in result.stderr


def test_up_when_policy_invalid_then_names_the_field_and_exits_2(tmp_path: Path) -> None:
    text = (
        (ROOT / "examples/policy.yaml").read_text().replace("maxPerCycle: 10", "maxPerCycle: 500")
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    result = _run("up", "--policy", str(bad), "--duration", "1")
    assert result.returncode == 2
    assert "maxPerCycle (500) exceeds signals.queueSize (100)" in result.stderr


def test_up_when_policy_has_unknown_field_then_rejects_it(tmp_path: Path) -> None:
    text = (ROOT / "examples/policy.yaml").read_text().replace("maxLeverage:", "maxLeverge:")
    bad = tmp_path / "typo.yaml"
    bad.write_text(text)
    result = _run("up", "--policy", str(bad), "--duration", "1")
    assert result.returncode == 2
    assert "spec.risk.maxLeverge: Extra inputs are not permitted" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--duration", "-5"), "--duration must be > 0, got -5"),
        (("--duration", "soon"), "'soon' is not a number"),
        (("--candles-per-second", "-1"), "--candles-per-second must be >= 0, got -1"),
        (("--regime", "sideways"), "invalid choice: 'sideways'"),
        (("--replay", "missing.csv"), "no such file: missing.csv"),
    ],
)
def test_up_when_argument_bad_then_says_what_is_wrong_and_exits_2(
    args: tuple[str, ...], message: str
) -> None:
    result = _run("up", "--policy", "examples/policy.yaml", *args)
    assert result.returncode == 2
    assert message in result.stderr
