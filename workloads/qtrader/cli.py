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
import asyncio
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path

from qtrader.contracts import subjects
from qtrader.contracts.policy import (
    PolicyError,
    TradingPolicy,
    TradingPolicySpec,
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
from qtrader.exchange.venue import Venue
from qtrader.marketdata.csv_replay import (
    KlineFormatError,
    infer_symbol_interval,
    validate_replay_files,
)
from qtrader.marketdata.synthetic import INTERVAL_MS, Regime
from qtrader.runtime import WorkerOptions

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_OUTBOX_DIR = Path(tempfile.gettempdir()) / "qtrader-outbox"
DEFAULT_ESS_FILE = Path("examples") / "emergencystop.yaml"


# --- argument types: each says what is wrong ----------------------------------------------------


def _number(kind: str, *, minimum: float, inclusive: bool = True) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < minimum or (not inclusive and value == minimum):
            bound = ">=" if inclusive else ">"
            raise argparse.ArgumentTypeError(f"{kind} must be {bound} {minimum:g}, got {text}")
        return value

    return parse


def _integer(*, minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"{minimum}-{maximum}" if maximum is not None else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return parse


_port = _integer(minimum=1, maximum=65535)
_whole = _integer(minimum=0)


def _positive_decimal(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value.is_finite() or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _volume_share(text: str) -> Decimal:
    value = _positive_decimal(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be at most 1 (a candle's whole volume), got {text}")
    return value


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def _nats_url(text: str) -> str:
    if not text.startswith(("nats://", "tls://", "ws://", "wss://")):
        raise argparse.ArgumentTypeError(f"NATS URL must start with nats:// or tls://, got {text}")
    return text


def _stack_id(text: str) -> str | None:
    if not text:
        return None
    try:
        return subjects.check_stack(text)
    except subjects.InvalidStack as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _http_url(text: str) -> str:
    if not re.fullmatch(r"https?://[^\s/]+(/[^\s]*)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an http(s) URL")
    return text.rstrip("/")


def _redis_url(text: str) -> str:
    if not re.fullmatch(r"rediss?://\S+", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a redis:// URL")
    return text


def _resource_name(text: str) -> str:
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", text) or len(text) > 63:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a resource name (lowercase letters, digits and '-', at most 63)"
        )
    return text


def _reason(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("a reason is required when tripping")
    if len(text) > 1024:
        raise argparse.ArgumentTypeError(f"at most 1024 characters, got {len(text)}")
    return text


# --- parser ------------------------------------------------------------------------------------


def _worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nats-url",
        type=_nats_url,
        default=os.environ.get("QTRADER_NATS_URL", DEFAULT_NATS_URL),
        help="NATS server URL (env QTRADER_NATS_URL; default %(default)s)",
    )
    parser.add_argument("--health-host", default=os.environ.get("QTRADER_HEALTH_HOST", "0.0.0.0"))
    parser.add_argument(
        "--health-port",
        type=_port,
        default=int(os.environ.get("QTRADER_HEALTH_PORT", "8080")),
        help="port of /healthz, /readyz, /health and /metrics (env QTRADER_HEALTH_PORT)",
    )
    parser.add_argument("--worker-id", default=os.environ.get("QTRADER_WORKER_ID"))
    parser.add_argument(
        "--stack",
        type=_stack_id,
        default=os.environ.get("QTRADER_STACK", ""),  # a string default is parsed as well
        help="the TradingPolicy's stack, <namespace>.<policy>, whose NATS names this worker "
        "uses (env QTRADER_STACK, set by the operator; default: none, as in local mode)",
    )
    parser.add_argument(
        "--outbox-dir",
        type=Path,
        default=Path(os.environ.get("QTRADER_OUTBOX_DIR", DEFAULT_OUTBOX_DIR)),
        help="where publishes wait while NATS is unreachable (env QTRADER_OUTBOX_DIR; "
        "default %(default)s; a volume in a cluster)",
    )
    parser.add_argument(
        "--outbox-capacity",
        type=_integer(minimum=1),
        default=100_000,
        help="messages the outbox holds before the worker stops taking work (default %(default)s)",
    )


def _market_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("market data")
    group.add_argument("--source", choices=["synthetic", "replay", "live"], default="synthetic")
    group.add_argument(
        "--replay",
        type=_existing_file,
        nargs="+",
        default=[],
        metavar="CSV",
        help="Binance kline CSV or ZIP files named SYMBOL-INTERVAL-... (implies --source replay)",
    )
    group.add_argument("--regime", choices=[r.value for r in Regime], default=Regime.MIXED.value)
    group.add_argument("--seed", type=_whole, default=7)
    group.add_argument("--interval", choices=sorted(INTERVAL_MS), default="1m")
    group.add_argument("--start-price", type=_positive_decimal, default=Decimal(100))
    group.add_argument(
        "--candles-per-second",
        type=_number("--candles-per-second", minimum=0),
        default=5.0,
        help="candle steps per second for replay and synthetic data (0: as fast as possible)",
    )
    group.add_argument(
        "--max-candles", type=_whole, default=0, help="stop after N steps (0: never)"
    )
    group.add_argument("--testnet", action="store_true", help="live mode: Binance futures testnet")
    group.add_argument(
        "--market-url",
        type=_http_url,
        default=os.environ.get("QTRADER_BINANCE_URL"),
        help="live mode: Binance futures REST base URL for backfills (env QTRADER_BINANCE_URL; "
        "default: Binance, by --testnet)",
    )
    group.add_argument(
        "--stream-url",
        default=os.environ.get("QTRADER_BINANCE_STREAM_URL"),
        help="live mode: the futures websocket base, e.g. wss://fstream.binance.com/ (env "
        "QTRADER_BINANCE_STREAM_URL; default: Binance's, or --market-url's host over ws)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qtrader", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    marketdata = commands.add_parser("marketdata", help="run the market data workload")
    _worker_arguments(marketdata)
    _market_arguments(marketdata)

    inference = commands.add_parser("inference", help="run the inference workload")
    _worker_arguments(inference)
    inference.add_argument(
        "--model",
        type=_existing_file,
        help="model card NAME.json (or NAME.onnx for the card of that stem; default: the "
        "policy's model.ref)",
    )

    execution = commands.add_parser("execution", help="run the execution workload")
    _worker_arguments(execution)
    execution.add_argument(
        "--max-price-age",
        type=_number("--max-price-age", minimum=0, inclusive=False),
        default=30.0,
        help="seconds after which a price is not trusted for a decision (default %(default)s)",
    )

    execution.add_argument(
        "--heartbeat-timeout",
        type=_number("--heartbeat-timeout", minimum=0, inclusive=False),
        default=10.0,
        help="halt without a control-plane heartbeat for this long (default %(default)s s)",
    )
    _exchange_arguments(execution)

    portfolio = commands.add_parser("portfolio", help="run the portfolio workload")
    _worker_arguments(portfolio)
    portfolio.add_argument(
        "--skip-fill",
        dest="skip_fills",
        metavar="SEQUENCE",
        type=int,
        action="append",
        default=[],
        help="a person's decision: pass over the fill at this FILLS stream sequence if the "
        "ledger refuses it (the portfolio's /health names it when it stops there); repeatable",
    )
    portfolio.add_argument(
        "--wallet-grace",
        type=_number("--wallet-grace", minimum=0),
        default=60.0,
        help="how long the venue's wallet may differ from the ledger's over settled reads "
        "(testnet and live) before it is a wallet_reconciliation alert, which trips the "
        "EmergencyStop (default %(default)s)",
    )

    up = commands.add_parser("up", help="run the whole pipeline locally (paper mode)")
    up.add_argument("--policy", type=_existing_file, required=True, help="TradingPolicy YAML")
    up.add_argument(
        "--duration",
        type=_number("--duration", minimum=0, inclusive=False),
        help="stop by itself after this many seconds and print the final report",
    )
    up.add_argument("--data-dir", type=Path, help="keep NATS data and logs here (default: temp)")
    up.add_argument("--report", type=Path, help="also write the final report as JSON to this file")
    up.add_argument(
        "--ess",
        type=_existing_file,
        help=f"EmergencyStop YAML (default: {DEFAULT_ESS_FILE} when it exists here, else a "
        "built-in armed stop with a 300 s cooldown)",
    )
    _market_arguments(up)
    _ess_commands(commands)
    _policy_commands(commands)

    model = commands.add_parser("model", help="train and export the signal model")
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    _train_arguments(model_commands)
    _backtest_command(commands)
    _bench_commands(commands)
    _health_command(commands)
    _stress_command(commands)
    return parser


def _symbol(text: str) -> str:
    if not re.fullmatch(r"[A-Z0-9]{2,20}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a symbol (like BTCUSDT)")
    return text


def _train_arguments(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    train = actions.add_parser(
        "train",
        help="train the ensemble (MLP + temporal convolution) walk-forward on generated data or "
        "kline CSVs, export it to ONNX with its model card",
    )
    train.add_argument(
        "--output",
        type=Path,
        required=True,
        help="the card to write, NAME.json; the members NAME.mlp.onnx and NAME.tcn.onnx go "
        "beside it",
    )
    train.add_argument("--seed", type=_whole, default=7, help="(default %(default)s)")
    train.add_argument("--epochs", type=_integer(minimum=1, maximum=1000), help="default 12")
    train.add_argument(
        "--folds", type=_integer(minimum=1, maximum=20), help="walk-forward folds (default 4)"
    )
    train.add_argument(
        "--csv",
        type=_existing_file,
        nargs="+",
        default=[],
        metavar="FILE",
        help="Binance kline files SYMBOL-INTERVAL-...(.csv|.zip) instead of the synthetic market",
    )
    train.add_argument(
        "--symbols", type=_symbol, nargs="+", help="synthetic market symbols (default: six)"
    )
    train.add_argument(
        "--candles",
        type=_integer(minimum=100, maximum=1_000_000),
        help="synthetic candles per symbol (default 8000)",
    )


def _backtest_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    backtest = commands.add_parser(
        "backtest",
        help="trade kline CSVs or a synthetic range with a model on the live code path (paper "
        "exchange, no NATS) and print the figures",
    )
    source = backtest.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--csv",
        type=_existing_file,
        nargs="+",
        metavar="FILE",
        help="Binance kline files SYMBOL-INTERVAL-...(.csv|.zip)",
    )
    source.add_argument("--synthetic", action="store_true", help="the seeded synthetic market")
    backtest.add_argument(
        "--symbols", type=_symbol, nargs="+", help="synthetic: symbols (default BTC, ETH, SOL)"
    )
    backtest.add_argument(
        "--candles",
        type=_integer(minimum=1, maximum=1_000_000),
        help="synthetic: candles per symbol (default 2000)",
    )
    backtest.add_argument("--seed", type=_whole, help="synthetic: seed (default 7)")
    backtest.add_argument(
        "--regime", choices=[r.value for r in Regime], help="synthetic: regime (default mixed)"
    )
    backtest.add_argument(
        "--policy",
        type=_existing_file,
        help="TradingPolicy YAML (default: the model card's evaluation policy)",
    )
    backtest.add_argument(
        "--model",
        type=_existing_file,
        help="model card NAME.json (or NAME.onnx; default: the packaged model)",
    )
    backtest.add_argument(
        "--max-volume-share",
        type=_volume_share,
        metavar="SHARE",
        help="the paper exchange fills at most this share of each candle's volume, in (0, 1]; "
        "an order beyond it fills in part and its remainder is sent again (default: no limit)",
    )
    backtest.add_argument("--json", action="store_true", help="the figures as one JSON object")


def _stress_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from qtrader.stress import runner

    stress = commands.add_parser(
        "stress", help="run the stress scenarios; print and report each pass criterion"
    )
    runner.add_arguments(stress)


def _exchange_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "exchange (testnet and live mode)",
        "API keys come from QTRADER_BINANCE_SECRET_DIR (files api-key, api-secret) or "
        "QTRADER_BINANCE_API_KEY and QTRADER_BINANCE_API_SECRET; they are never logged.",
    )
    env = os.environ.get
    group.add_argument(
        "--exchange-url",
        type=_http_url,
        default=env("QTRADER_BINANCE_URL"),
        help="Binance futures REST base URL (default: by the policy's mode, testnet or live)",
    )
    group.add_argument(
        "--no-user-stream",
        dest="user_stream",
        action="store_false",
        help="read every filled order's trades over REST (weight 5 each) instead of from the "
        "user-data stream (REST stays the fallback either way)",
    )
    group.add_argument(
        "--reconcile-interval",
        type=_number("--reconcile-interval", minimum=0),
        default=30.0,
        help="seconds between reads of the venue's positions, compared with the book (0: never; "
        "default %(default)s)",
    )
    group.add_argument(
        "--income-interval",
        type=_number("--income-interval", minimum=0),
        default=env("QTRADER_INCOME_INTERVAL"),
        help="seconds between reads of the venue's income history (funding, transfers) for "
        "the portfolio's ledger, weight 30 each (0: never; default: the reconcile interval, "
        "but at least 5)",
    )
    group.add_argument(
        "--reconcile-grace",
        type=_number("--reconcile-grace", minimum=0),
        default=60.0,
        help="how long a position difference may last before it is a reconciliation alert, "
        "which trips the EmergencyStop (default %(default)s)",
    )
    group.add_argument(
        "--redis-url",
        type=_redis_url,
        default=env("QTRADER_REDIS_URL"),
        help="Redis shared by all execution replicas for the rate limiter (default: none, "
        "an in-process limiter, DEGRADED with more than one replica)",
    )
    group.add_argument(
        "--egress-id",
        default=env("QTRADER_EGRESS_ID", "egress-default"),
        help="name of the egress IP whose request-weight budget this replica shares",
    )
    group.add_argument(
        "--exchange-timeout",
        type=_number("--exchange-timeout", minimum=0, inclusive=False),
        default=5.0,
        help="seconds to wait for an exchange answer (default %(default)s)",
    )
    group.add_argument(
        "--unknown-grace",
        type=_number("--unknown-grace", minimum=0, inclusive=False),
        default=5.0,
        help="seconds an order of unknown outcome is looked up before it is re-sent",
    )
    group.add_argument(
        "--cycle",
        type=_number("--cycle", minimum=0, inclusive=False),
        default=0.25,
        help="seconds per intake cycle; each decides at most the policy's maxPerCycle",
    )
    group.add_argument(
        "--dead-man-countdown",
        type=_number("--dead-man-countdown", minimum=5, inclusive=True),
        default=60.0,
        help="seconds after which the exchange cancels our open orders if not re-armed",
    )


def _stack_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nats-url",
        type=_nats_url,
        help="the stack's NATS server (default: from .qtrader/up.json, written by qtrader up)",
    )


def _ess_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ess = commands.add_parser("ess", help="the kill switch of the running local stack")
    actions = ess.add_subparsers(dest="ess_command", required=True, metavar="ACTION")
    trip = actions.add_parser("trip", help="stop trading (patches spec.tripped to true)")
    trip.add_argument("--reason", type=_reason, required=True, help="why (required)")
    trip.add_argument("--mode", choices=[m.value for m in EssMode], help="default: the spec's")
    reset = actions.add_parser("reset", help="allow trading again (patches spec.tripped to false)")
    status = actions.add_parser("status", help="show the EmergencyStop, its latch and its acks")
    status.add_argument("--json", action="store_true", help="the resource as JSON")
    for action in (trip, reset, status):
        action.add_argument(
            "--name", type=_resource_name, help="EmergencyStop name (default: the stack's, main)"
        )
        _stack_arguments(action)
    for action in (trip, reset):
        action.add_argument(
            "--wait",
            type=_number("--wait", minimum=0, inclusive=False),
            default=3.0,
            help="seconds to wait for the control plane's answer (default %(default)s)",
        )


def _policy_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    policy = commands.add_parser("policy", help="the TradingPolicy of the running local stack")
    actions = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    apply = actions.add_parser("apply", help="validate a TradingPolicy file and publish it live")
    apply.add_argument("file", type=Path, metavar="FILE")
    apply.add_argument(
        "--exchange-url",
        type=_http_url,
        default=os.environ.get("QTRADER_BINANCE_URL"),
        help="a testnet or live policy's symbols are checked against this venue's exchangeInfo "
        "(default: by the policy's mode, testnet or live)",
    )
    show = actions.add_parser("show", help="print the policy revision in force as YAML")
    for action in (apply, show):
        _stack_arguments(action)


def _bench_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """One subcommand per benchmark: an unknown NAME exits 2 with the list of names."""
    bench = commands.add_parser(
        "bench", help="run a benchmark; it prints its figures beside a baseline from the same run"
    )
    names = bench.add_subparsers(dest="bench_name", required=True, metavar="NAME")
    halt = names.add_parser(
        "halt", help="trip -> every execution worker acknowledged, vs a NATS fan-out round trip"
    )
    halt.add_argument(
        "--trips",
        type=_integer(minimum=1, maximum=100_000),
        default=200,
        help="trips measured (default %(default)s), and as many baseline rounds",
    )
    halt.add_argument(
        "--workers",
        type=_integer(minimum=1, maximum=16),
        default=4,
        help="execution worker processes (default %(default)s), and as many echo processes",
    )
    _bench_json(halt)
    limiter = names.add_parser(
        "limiter",
        help="rate limiter: Redis-shared vs in-process acquire, and a two-process flood against "
        "the local Binance simulator vs one raw client",
    )
    limiter.add_argument(
        "--requests",
        type=_integer(minimum=100, maximum=1_000_000),
        default=5000,
        help="HTTP requests sent by each of the 2 flood processes (default %(default)s)",
    )
    limiter.add_argument(
        "--duration",
        type=_bench_duration,
        default=3.0,
        help="seconds each rate is timed: the two acquire loops and the raw client "
        "(default %(default)s)",
    )
    limiter.add_argument(
        "--json",
        type=_json_output,
        metavar="PATH",
        help="also write the figures (the last line's JSON object) to this file",
    )
    outbox = names.add_parser(
        "outbox",
        help="disk outbox: buffering vs raw SQLite inserts, replay vs raw JetStream publishes, "
        "and N events across a broker outage (none lost, none duplicated, in order)",
    )
    outbox.add_argument(
        "--events",
        type=_integer(minimum=100, maximum=1_000_000),
        default=20_000,
        help="events published in each phase (default %(default)s)",
    )
    outbox.add_argument(
        "--outage",
        type=_bench_seconds("--outage"),
        default=2.0,
        help="seconds the broker stays down in the end-to-end run (default %(default)s)",
    )
    outbox.add_argument(
        "--json",
        type=_json_output,
        metavar="PATH",
        help="also write the figures (the last line's JSON object) to this file",
    )
    _suite_bench_commands(names)


def _bench_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        type=_json_output,
        metavar="PATH",
        help="also write the figures (the last line's JSON object) to this file",
    )


def _suite_bench_commands(names: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``pipeline``, ``pnl``, ``inference`` and ``all`` (every benchmark in turn)."""
    pipeline = names.add_parser(
        "pipeline",
        help="candles -> signals -> order decisions through real worker processes, per second, "
        "vs raw nats-py JetStream publish and pull-consume",
    )
    pipeline.add_argument(
        "--candles",
        type=_integer(minimum=10, maximum=100_000),
        default=1000,
        help="steps in the throughput run, one candle per symbol each (default %(default)s)",
    )
    pipeline.add_argument(
        "--symbols",
        type=_integer(minimum=1, maximum=20),
        default=4,
        help="symbols, the paper exchange's first N of its 20 (default %(default)s)",
    )
    _bench_json(pipeline)
    pnl = names.add_parser(
        "pnl", help="PnL replay of N fills through the Decimal ledger vs the same in floats"
    )
    pnl.add_argument(
        "--fills",
        type=_integer(minimum=1000, maximum=10_000_000),
        default=1_000_000,
        help="fills replayed (default %(default)s)",
    )
    pnl.add_argument("--seed", type=_whole, default=7, help="of the fill tape (default 7)")
    _bench_json(pnl)
    inference = names.add_parser(
        "inference", help="onnxruntime vs torch eager: single-sample p50/p99, batch throughput"
    )
    inference.add_argument(
        "--samples",
        type=_integer(minimum=10, maximum=1_000_000),
        default=2000,
        help="single-sample predictions timed (default %(default)s)",
    )
    inference.add_argument(
        "--batch",
        type=_integer(minimum=1, maximum=4096),
        default=64,
        help="rows per batch in the throughput run (default %(default)s)",
    )
    _bench_json(inference)
    backtest = names.add_parser(
        "backtest",
        help="the streamed backtest in candles/s beside the vectorised floor, the per-candle "
        "engine and backtrader (if installed); growth with candles and symbols",
    )
    backtest.add_argument(
        "--candles",
        type=_integer(minimum=1000, maximum=1_000_000),
        default=50_000,
        help="1m candles per symbol (default %(default)s)",
    )
    backtest.add_argument(
        "--symbols",
        type=_integer(minimum=1, maximum=16),
        default=4,
        help="symbols, the paper exchange's first N (default %(default)s)",
    )
    backtest.add_argument(
        "--repeats", type=_integer(minimum=1, maximum=20), default=3, help="(default 3)"
    )
    backtest.add_argument(
        "--no-growth", action="store_true", help="skip the growth tables and the memory runs"
    )
    _bench_json(backtest)
    every = names.add_parser(
        "all", help="every benchmark in turn, a summary table, all figures in one JSON object"
    )
    every.add_argument("--quick", action="store_true", help="small sizes (about 2 minutes)")
    _bench_json(every)


def _health_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``qtrader health``: exit 0 all OK, 1 any DEGRADED, 2 any CRITICAL (or unreachable)."""
    health = commands.add_parser(
        "health",
        help="one table of every workload's and dependency's health; exit 0 OK, 1 DEGRADED, "
        "2 CRITICAL",
    )
    health.add_argument(
        "--url",
        type=_http_url,
        action="append",
        default=[],
        metavar="URL",
        help="a workload's base or /health URL (repeat for each; e.g. a cluster Service); "
        "default: the local stack's workloads from .qtrader/up.json",
    )
    health.add_argument(
        "--nats-url",
        type=_nats_url,
        help="also probe this NATS server (default with the local stack: the stack's server)",
    )
    health.add_argument(
        "--timeout",
        type=_bench_seconds("--timeout"),
        default=3.0,
        help="seconds to wait for each answer (default %(default)s)",
    )
    health.add_argument("--json", action="store_true", help="the rows as JSON")


def _bench_seconds(flag: str) -> Callable[[str], float]:
    """A finite number of seconds in (0, 600]."""
    positive = _number(flag, minimum=0, inclusive=False)

    def parse(text: str) -> float:
        value = positive(text)
        if value > 600:  # also infinity
            raise argparse.ArgumentTypeError(f"{flag} must be <= 600, got {text}")
        if not value <= 600:  # NaN compares false to everything, so passed the checks above
            raise argparse.ArgumentTypeError(f"{text!r} is not a number")
        return value

    return parse


_bench_duration = _bench_seconds("--duration")


def _json_output(text: str) -> Path:
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a file")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {path.parent}")
    return path


# --- commands ----------------------------------------------------------------------------------


def _options(args: argparse.Namespace) -> WorkerOptions:
    identity = {"worker_id": args.worker_id} if args.worker_id else {}
    return WorkerOptions(
        nats_url=args.nats_url,
        health_host=args.health_host,
        health_port=args.health_port,
        outbox_dir=args.outbox_dir,
        outbox_capacity=args.outbox_capacity,
        stack=args.stack,
        **identity,
    )


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


def _run_marketdata(args: argparse.Namespace) -> int:
    from qtrader.marketdata.service import MarketData, MarketDataConfig, Source
    from qtrader.runtime import run_worker

    source = Source.REPLAY if args.replay else Source(args.source)
    if source is Source.REPLAY and not args.replay:
        raise SystemExit("qtrader marketdata: --source replay needs --replay FILE [FILE ...]")
    config = MarketDataConfig(
        source=source,
        replay_files=tuple(args.replay),
        regime=Regime(args.regime),
        seed=args.seed,
        interval=args.interval,
        start_price=args.start_price,
        candles_per_second=args.candles_per_second,
        max_candles=args.max_candles,
        testnet=args.testnet,
        rest_url=args.market_url,
        stream_url=args.stream_url,
    )
    return run_worker("marketdata", _options(args), lambda ctx: MarketData(ctx, config))


def _run_inference(args: argparse.Namespace) -> int:
    from qtrader.inference.service import Inference, InferenceConfig
    from qtrader.runtime import run_worker

    config = InferenceConfig(model_path=args.model)
    return run_worker("inference", _options(args), lambda ctx: Inference(ctx, config))


def _run_execution(args: argparse.Namespace) -> int:
    from qtrader.execution.orders import DriverSettings
    from qtrader.execution.service import Execution, ExecutionConfig
    from qtrader.runtime import run_worker

    countdown_s: float = args.dead_man_countdown
    config = ExecutionConfig(
        max_price_age_s=args.max_price_age,
        heartbeat_timeout_s=args.heartbeat_timeout,
        cycle_s=args.cycle,
        dead_man_countdown_ms=int(countdown_s * 1000),
        dead_man_refresh_s=countdown_s / 4,
        driver=DriverSettings(unknown_grace_s=args.unknown_grace),
        exchange_factory=_binance_factory(args),
        venue_reconcile_s=args.reconcile_interval,
        venue_mismatch_grace_s=args.reconcile_grace,
        income_read_s=args.income_interval,
    )
    return run_worker("execution", _options(args), lambda ctx: Execution(ctx, config))


def _binance_factory(args: argparse.Namespace) -> Callable[[TradingPolicySpec], Venue]:
    """Builds the Binance venue when the policy's mode asks for it (keys read only then)."""

    def build(spec: TradingPolicySpec) -> Venue:
        from qtrader.exchange.binance import BinanceFutures, BinanceSettings
        from qtrader.exchange.credentials import load_credentials
        from qtrader.exchange.listing import BASE_URLS

        settings = BinanceSettings(
            base_url=args.exchange_url or BASE_URLS[spec.mode],
            credentials=load_credentials(os.environ),
            egress_id=args.egress_id,
            redis_url=args.redis_url,
            replicas=max(1, spec.workloads.execution.replicas),
            timeout_s=args.exchange_timeout,
            user_stream=args.user_stream,
        )
        return BinanceFutures(settings)

    return build


def _run_portfolio(args: argparse.Namespace) -> int:
    from qtrader.portfolio.service import Portfolio, PortfolioConfig
    from qtrader.runtime import run_worker

    config = PortfolioConfig(
        skip_fills=frozenset(args.skip_fills), wallet_grace_s=args.wallet_grace
    )
    return run_worker("portfolio", _options(args), lambda ctx: Portfolio(ctx, config))


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


def _run_model(args: argparse.Namespace) -> int:
    try:
        from qtrader.training.train_command import run_train
    except ImportError as exc:
        print(
            f"qtrader model train needs the training extra (pip install -e '.[train]'): {exc}",
            file=sys.stderr,
        )
        return 2
    return run_train(args)


def _run_backtest(args: argparse.Namespace) -> int:
    from qtrader.backtest.command import run

    return run(args)


def _run_ess(args: argparse.Namespace) -> int:
    from qtrader.local.commands import run_ess

    return run_ess(args)


def _run_policy(args: argparse.Namespace) -> int:
    from qtrader.local.commands import run_policy

    return run_policy(args)


def _run_bench(args: argparse.Namespace) -> int:
    # argparse refused any other NAME; each benchmark is imported only when it runs.
    if args.bench_name == "limiter":
        from qtrader.benchmarks import limiter

        return limiter.run(requests=args.requests, duration_s=args.duration, json_path=args.json)
    if args.bench_name == "outbox":
        from qtrader.benchmarks import outbox

        return outbox.run(events=args.events, outage_s=args.outage, json_path=args.json)
    if args.bench_name in ("pipeline", "pnl", "inference", "backtest", "all"):
        return _run_suite_bench(args)
    from qtrader.benchmarks import halt

    return halt.run(trips=args.trips, workers=args.workers, json_path=args.json)


def _run_suite_bench(args: argparse.Namespace) -> int:
    if args.bench_name == "pipeline":
        from qtrader.benchmarks import pipeline

        return pipeline.run(candles=args.candles, symbols=args.symbols, json_path=args.json)
    if args.bench_name == "pnl":
        from qtrader.benchmarks import pnl

        return pnl.run(fills=args.fills, seed=args.seed, json_path=args.json)
    if args.bench_name == "inference":
        try:
            from qtrader.benchmarks import inference  # type: ignore[attr-defined,unused-ignore]
        except ImportError as exc:
            print(f"qtrader bench inference: not available: {exc}", file=sys.stderr)
            return 1
        code: int = inference.run(samples=args.samples, batch=args.batch, json_path=args.json)
        return code
    if args.bench_name == "backtest":
        from qtrader.benchmarks import backtest

        return backtest.run(
            candles=args.candles,
            symbols=args.symbols,
            repeats=args.repeats,
            growth=not args.no_growth,
            json_path=args.json,
        )
    from qtrader.benchmarks import suite

    return suite.run(json_path=args.json, quick=args.quick)


def _run_stress(args: argparse.Namespace) -> int:
    from qtrader.stress import runner

    return runner.run(args)


def _run_health(args: argparse.Namespace) -> int:
    from qtrader.local.health import run_health

    return run_health(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "marketdata": _run_marketdata,
    "inference": _run_inference,
    "execution": _run_execution,
    "portfolio": _run_portfolio,
    "up": _run_up,
    "ess": _run_ess,
    "policy": _run_policy,
    "model": _run_model,
    "backtest": _run_backtest,
    "bench": _run_bench,
    "health": _run_health,
    "stress": _run_stress,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
