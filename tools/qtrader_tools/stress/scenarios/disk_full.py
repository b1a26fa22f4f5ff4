"""Disk full: every worker's outbox on one small tmpfs that fills while NATS is down; see
``broker_outage`` for the run and the criteria."""

from __future__ import annotations

from qtrader_tools.stress.result import ScenarioResult
from qtrader_tools.stress.scenario import StressOptions
from qtrader_tools.stress.scenarios.broker_outage import run_disk_full


def run(options: StressOptions, result: ScenarioResult) -> None:
    run_disk_full(options, result)
