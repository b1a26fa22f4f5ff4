"""The local stack's commands: ``qtrader up`` (the whole pipeline on this machine), ``ess`` and
``policy`` (its kill switch and its TradingPolicy, found through ``.qtrader/up.json``), and
``health`` (every workload's health, local or in a cluster).

Files are checked before anything starts: a policy or EmergencyStop that does not load, or an
``up --replay`` file with a bad row, prints ``FILE:LINE: problem`` and exits with 2.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from qtrader.commands.args import (
    Commands,
    existing_file,
    http_url,
    nats_url,
    number,
    reason,
    resource_name,
    short_seconds,
)
from qtrader.commands.workers import market_arguments
from qtrader.contracts.policy import (
    PolicyError,
    TradingPolicy,
    load_policy_file,
    offline_listings,
)
from qtrader.control.ess_resource import (
    EmergencyStop,
    EmergencyStopError,
    default_emergency_stop,
    load_emergency_stop_file,
)
from qtrader.control.ess_status import EssMode
from qtrader.marketdata.csv_replay import (
    KlineFormatError,
    infer_symbol_interval,
    validate_replay_files,
)

DEFAULT_ESS_FILE = Path("examples") / "emergencystop.yaml"


def add_up_ess_policy(commands: Commands) -> None:
    """``up``, then ``ess`` and ``policy``, which reach the stack it runs."""
    up = commands.add_parser("up", help="run the whole pipeline locally (paper mode)")
    up.add_argument("--policy", type=existing_file, required=True, help="TradingPolicy YAML")
    up.add_argument(
        "--duration",
        type=number("--duration", minimum=0, inclusive=False),
        help="stop by itself after this many seconds and print the final report",
    )
    up.add_argument("--data-dir", type=Path, help="keep NATS data and logs here (default: temp)")
    up.add_argument("--report", type=Path, help="also write the final report as JSON to this file")
    up.add_argument(
        "--ess",
        type=existing_file,
        help=f"EmergencyStop YAML (default: {DEFAULT_ESS_FILE} when it exists here, else a "
        "built-in armed stop with a 300 s cooldown)",
    )
    market_arguments(up)
    _ess_commands(commands)
    _policy_commands(commands)


def _stack_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nats-url",
        type=nats_url,
        help="the stack's NATS server (default: from .qtrader/up.json, written by qtrader up)",
    )


def _ess_commands(commands: Commands) -> None:
    ess = commands.add_parser("ess", help="the kill switch of the running local stack")
    actions = ess.add_subparsers(dest="ess_command", required=True, metavar="ACTION")
    trip = actions.add_parser("trip", help="stop trading (patches spec.tripped to true)")
    trip.add_argument("--reason", type=reason, required=True, help="why (required)")
    trip.add_argument("--mode", choices=[m.value for m in EssMode], help="default: the spec's")
    reset = actions.add_parser("reset", help="allow trading again (patches spec.tripped to false)")
    status = actions.add_parser("status", help="show the EmergencyStop, its latch and its acks")
    status.add_argument("--json", action="store_true", help="the resource as JSON")
    for action in (trip, reset, status):
        action.add_argument(
            "--name", type=resource_name, help="EmergencyStop name (default: the stack's, main)"
        )
        _stack_arguments(action)
    for action in (trip, reset):
        action.add_argument(
            "--wait",
            type=number("--wait", minimum=0, inclusive=False),
            default=3.0,
            help="seconds to wait for the control plane's answer (default %(default)s)",
        )


def _policy_commands(commands: Commands) -> None:
    policy = commands.add_parser("policy", help="the TradingPolicy of the running local stack")
    actions = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    apply = actions.add_parser("apply", help="validate a TradingPolicy file and publish it live")
    apply.add_argument("file", type=Path, metavar="FILE")
    apply.add_argument(
        "--exchange-url",
        type=http_url,
        default=os.environ.get("QTRADER_BINANCE_URL"),
        help="a testnet or live policy's symbols are checked against this venue's exchangeInfo "
        "(default: by the policy's mode, testnet or live)",
    )
    show = actions.add_parser("show", help="print the policy revision in force as YAML")
    for action in (apply, show):
        _stack_arguments(action)


def add_health(commands: Commands) -> None:
    """``qtrader health``: exit 0 all OK, 1 any DEGRADED, 2 any CRITICAL (or unreachable)."""
    health = commands.add_parser(
        "health",
        help="one table of every workload's and dependency's health; exit 0 OK, 1 DEGRADED, "
        "2 CRITICAL",
    )
    health.add_argument(
        "--url",
        type=http_url,
        action="append",
        default=[],
        metavar="URL",
        help="a workload's base or /health URL (repeat for each; e.g. a cluster Service); "
        "default: the local stack's workloads from .qtrader/up.json",
    )
    health.add_argument(
        "--nats-url",
        type=nats_url,
        help="also probe this NATS server (default with the local stack: the stack's server)",
    )
    health.add_argument(
        "--timeout",
        type=short_seconds("--timeout"),
        default=3.0,
        help="seconds to wait for each answer (default %(default)s)",
    )
    health.add_argument("--json", action="store_true", help="the rows as JSON")


def _market_config_args(args: argparse.Namespace) -> tuple[str, ...]:
    """The market-data options of ``up``, passed on to the marketdata process as they came."""
    source = "replay" if args.replay else args.source
    forwarded = [
        "--source", source,
        "--regime", args.regime,
        "--seed", str(args.seed),
        "--interval", args.interval,
        "--start-price", str(args.start_price),
        "--candles-per-second", str(args.candles_per_second),
        "--max-candles", str(args.max_candles),
    ]  # fmt: skip
    if args.replay:
        forwarded += ["--replay", *(str(p.resolve()) for p in args.replay)]
    if args.testnet:
        forwarded.append("--testnet")
    return tuple(forwarded)


def _emergency_stop(path: Path | None, policy: TradingPolicy) -> EmergencyStop:
    """The --ess file, else examples/emergencystop.yaml here, else the CRD's defaults (said so)."""
    if path is None and DEFAULT_ESS_FILE.is_file():
        path = DEFAULT_ESS_FILE
    if path is not None:
        return load_emergency_stop_file(path)
    name = policy.spec.emergency_stop_ref
    print(
        f"qtrader up: no --ess file and no {DEFAULT_ESS_FILE} here: using a built-in "
        f"EmergencyStop {name!r} (armed, mode Halted, cooldownSeconds 300, requireManualReset)",
        file=sys.stderr,
    )
    return default_emergency_stop(name)


def _check_replay_files(paths: Sequence[Path], policy: TradingPolicy) -> None:
    """Every row of every --replay file, read before anything starts (file, line, problem)."""
    if not paths:
        return
    for path in paths:
        symbol, _ = infer_symbol_interval(path)
        if symbol not in policy.spec.symbols:
            raise ValueError(
                f"{path}: replays {symbol}, which the policy does not trade "
                f"(spec.symbols: {', '.join(policy.spec.symbols)})"
            )
    validate_replay_files(paths)


def _run_up(args: argparse.Namespace) -> int:
    from qtrader.local.stack import LocalStack, StackConfig

    try:
        policy = load_policy_file(args.policy, listings=offline_listings())
        ess = _emergency_stop(args.ess, policy)
        _check_replay_files(args.replay, policy)
    except (PolicyError, EmergencyStopError, KlineFormatError, ValueError, OSError) as exc:
        print(f"qtrader up: {exc}", file=sys.stderr)
        return 2
    if ess.name != policy.spec.emergency_stop_ref:
        print(
            f"qtrader up: the policy obeys EmergencyStop {policy.spec.emergency_stop_ref!r} "
            f"(spec.emergencyStopRef) but the EmergencyStop file defines {ess.name!r}",
            file=sys.stderr,
        )
        return 2
    config = StackConfig(
        policy=policy,
        ess=ess,
        marketdata_args=_market_config_args(args),
        duration_s=args.duration,
        data_dir=args.data_dir,
        report_path=args.report,
    )
    return asyncio.run(LocalStack(config).run(sys.stdout))


def _run_ess(args: argparse.Namespace) -> int:
    from qtrader.local.commands import run_ess

    return run_ess(args)


def _run_policy(args: argparse.Namespace) -> int:
    from qtrader.local.commands import run_policy

    return run_policy(args)


def _run_health(args: argparse.Namespace) -> int:
    from qtrader.local.health import run_health

    return run_health(args)


RUNNERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "up": _run_up,
    "ess": _run_ess,
    "policy": _run_policy,
    "health": _run_health,
}
