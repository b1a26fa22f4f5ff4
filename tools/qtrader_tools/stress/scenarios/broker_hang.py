"""Broker hang: the nats-server frozen (SIGSTOP) for 5, 20 and 60 s (full length) while the
pipeline trades, then resumed (SIGCONT); see ``broker_outage`` for the run and the criteria."""

from __future__ import annotations

from qtrader_tools.stress.result import ScenarioResult
from qtrader_tools.stress.scenario import StressOptions
from qtrader_tools.stress.scenarios.broker_outage import BrokerFault, run_with


def run(options: StressOptions, result: ScenarioResult) -> None:
    run_with(options, result, BrokerFault.HANG)
