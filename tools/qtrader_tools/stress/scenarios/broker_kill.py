"""Broker kill: the nats-server killed (SIGKILL) while the pipeline trades, started again on
its store; see ``broker_outage`` for the run and the criteria."""

from __future__ import annotations

from qtrader_tools.stress.result import ScenarioResult
from qtrader_tools.stress.scenario import StressOptions
from qtrader_tools.stress.scenarios.broker_outage import BrokerFault, run_with


def run(options: StressOptions, result: ScenarioResult) -> None:
    run_with(options, result, BrokerFault.KILL)
