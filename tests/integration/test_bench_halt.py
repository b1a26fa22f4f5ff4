"""``qtrader bench halt`` runs end to end and its correctness figures hold.

The benchmark is run as the installed console script, as a user runs it: it starts its own
nats-server, execution workers, portfolio, echo and feed processes, and must stop them all.
Only what must be true is checked (every trip acknowledged, no order filled after an
acknowledgement, a parsable last line); speed is measured by the benchmark, never asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

QTRADER = Path(sys.executable).parent / "qtrader"
KEYS = {"p50_ms", "p99_ms", "baseline_p99_ms", "orders_after_ack", "trips"}


def test_bench_halt_when_run_then_every_trip_acked_and_no_order_after_an_ack() -> None:
    completed = subprocess.run(
        [str(QTRADER), "bench", "halt", "--trips", "20"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert not KEYS - set(result), f"missing {KEYS - set(result)} in {result}"
    assert result["trips"] == 20
    assert result["orders_after_ack"] == 0
    assert result["p50_ms"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bench", "nope"], "choose from 'halt'"),
        (["bench", "halt", "--trips", "0"], "--trips: must be 1-100000, got 0"),
        (["bench", "halt", "--workers", "many"], "--workers: 'many' is not a whole number"),
    ],
)
def test_bench_when_bad_argument_then_exit_2_saying_what(args: list[str], message: str) -> None:
    completed = subprocess.run(
        [str(QTRADER), *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert completed.returncode == 2
    assert message in completed.stderr
