"""``qtrader bench outbox`` runs end to end at a tiny scale and its correctness figures hold.

Run as the installed console script, as a user runs it: it starts its own nats-server, stops it
twice (the buffering phase, then a mid-stream outage) and restarts it on the same store. Checked:
the exit code, nothing lost, nothing duplicated, everything in publish order (end to end and for
the replayed events), the outage really sent events to the outbox, every rate present and
positive, the same object in the ``--json`` file. Speed is measured by the benchmark, never
asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

QTRADER = Path(sys.executable).parent / "qtrader"
EVENTS = 2000
RATES = (
    "sqlite_full_per_s",
    "sqlite_normal_per_s",
    "buffer_full_per_s",
    "buffer_normal_per_s",
    "jetstream_per_s",
    "passthrough_per_s",
    "replay_full_per_s",
    "replay_normal_per_s",
    "e2e_per_s",
    "buffer_full_vs_sqlite",
    "buffer_normal_vs_sqlite",
    "replay_full_vs_jetstream",
    "replay_normal_vs_jetstream",
    "passthrough_vs_jetstream",
)


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(QTRADER), "bench", "outbox", *args],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def last_json(completed: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def test_bench_outbox_when_run_across_an_outage_then_nothing_lost_or_doubled_and_in_order(
    tmp_path: Path,
) -> None:
    output = tmp_path / "figures.json"

    completed = bench("--events", str(EVENTS), "--outage", "0.5", "--json", str(output))

    assert completed.returncode == 0, completed.stderr[-4000:]
    result = last_json(completed)
    assert result["benchmark"] == "outbox"
    assert (result["events"], result["outage_s"]) == (EVENTS, 0.5)
    assert (result["received"], result["lost"], result["duplicated"]) == (EVENTS, 0, 0)
    assert result["in_order"] is True
    assert (result["replay_lost"], result["replay_duplicated"]) == (0, 0)
    assert result["replay_in_order"] is True
    # The outage really happened mid-stream: events went to disk, others came after the restart.
    assert 0 < result["e2e_kept"] <= EVENTS
    assert result["e2e_max_depth"] > 0
    assert result["e2e_after_restart"] >= EVENTS // 5
    assert result["e2e_drain_s"] > 0
    for key in RATES:
        assert result[key] > 0, (key, result[key])
    assert json.loads(output.read_text()) == result
    assert "raw SQLite insert, FULL" in completed.stdout  # the table precedes the JSON


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--events", "5"], "--events: must be 100-1000000, got 5"),
        (["--events", "many"], "--events: 'many' is not a whole number"),
        (["--outage", "0"], "--outage: --outage must be > 0, got 0"),
        (["--outage", "601"], "--outage: --outage must be <= 600, got 601"),
        (["--outage", "nan"], "--outage: 'nan' is not a number"),
        (["--json", "/no/such/dir/out.json"], "--json: no such directory: /no/such/dir"),
    ],
)
def test_bench_outbox_when_bad_argument_then_exit_2_saying_what(
    args: list[str], message: str
) -> None:
    completed = bench(*args)
    assert completed.returncode == 2
    assert message in completed.stderr
