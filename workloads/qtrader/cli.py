"""``qtrader``: the one command-line entry point.

Subcommands:
- ``marketdata``, ``inference``, ``execution``, ``portfolio``: run one workload (what a
  container runs);
- ``up``: the whole pipeline locally on an embedded NATS server, in paper mode, with the
  EmergencyStop control plane;
- ``ess trip | reset | status``: the local kill switch (the EmergencyStop of the running ``up``);
- ``policy apply | show``: publish a new TradingPolicy revision to the running ``up``, or show it;
- ``health``: one table of every workload's and dependency's health (the local stack, or
  ``--url`` for each workload's Service in a cluster); exit 0 OK, 1 DEGRADED, 2 CRITICAL;
- ``model train``: train the signal ensemble walk-forward, export it to ONNX with its model card
  (needs the ``train`` extra);
- ``backtest``: trade kline CSVs or a synthetic range with a model on the live code path (paper
  exchange, no NATS) and print the same figures as the model card;
- ``stress [--scenario NAME] [--scale F] [--report PATH]``: the stress scenarios, with a
  Markdown and JSON report;
- ``bench NAME``: run one benchmark (``halt``, ``limiter``, ``outbox``, ``pipeline``, ``pnl``,
  ``inference``, ``backtest``) and print its figures beside a baseline; ``bench all`` runs
  every one.

Arguments are checked before anything starts: a bad one prints what is wrong and exits with 2;
an invalid policy or EmergencyStop file prints ``FILE:LINE: problem`` and exits with 2 (too
large, not UTF-8, a duplicate key, a field that breaks a rule, a paper symbol the paper exchange
does not list), and so does every row of every ``up --replay`` file, read whole before anything
starts. ``ess``
and ``policy`` find the running stack through ``.qtrader/up.json`` in the current directory (or
``--nats-url``); without one they say so and exit with 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from qtrader.commands import local, research, tools, workers

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    **workers.RUNNERS,
    **local.RUNNERS,
    **research.RUNNERS,
    **tools.RUNNERS,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qtrader", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # In this order: it is the order ``qtrader --help`` lists them in.
    workers.add_commands(commands)
    local.add_up_ess_policy(commands)
    research.add_commands(commands)
    tools.add_bench(commands)
    local.add_health(commands)
    tools.add_stress(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    # Only ``bench`` or ``stress`` without the tooling takes arguments it does not know (it
    # answers what to install); for every other command this is parse_args's own error.
    if unknown and not getattr(args, "tool_missing", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
