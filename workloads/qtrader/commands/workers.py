"""``qtrader marketdata|inference|execution|portfolio``: one workload, as its container runs it.

The options come from flags or, as in a cluster, from the environment the operator sets
(``QTRADER_NATS_URL``, ``QTRADER_HEALTH_PORT``, ``QTRADER_STACK``, ...). Each workload module is
imported only when its command runs, so a command never pays for the others' imports.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

from qtrader.commands.args import (
    Commands,
    existing_file,
    http_url,
    integer,
    nats_url,
    number,
    port,
    positive_decimal,
    redis_url,
    stack_id,
    whole,
)
from qtrader.contracts.policy import TradingPolicySpec
from qtrader.exchange.venue import Venue
from qtrader.marketdata.synthetic import INTERVAL_MS, Regime
from qtrader.runtime import WorkerOptions

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_OUTBOX_DIR = Path(tempfile.gettempdir()) / "qtrader-outbox"
# The shipped model's window (qtrader.inference.features.WINDOW, not imported: it loads numpy):
# with that many warm-up candles a fresh live stack decides from its first live candle.
WARMUP_CANDLES = 32


def add_commands(commands: Commands) -> None:
    marketdata = commands.add_parser("marketdata", help="run the market data workload")
    _worker_arguments(marketdata)
    market_arguments(marketdata)

    inference = commands.add_parser("inference", help="run the inference workload")
    _worker_arguments(inference)
    inference.add_argument(
        "--model",
        type=existing_file,
        help="model card NAME.json (or NAME.onnx for the card of that stem; default: the "
        "policy's model.ref)",
    )

    execution = commands.add_parser("execution", help="run the execution workload")
    _worker_arguments(execution)
    execution.add_argument(
        "--max-price-age",
        type=number("--max-price-age", minimum=0, inclusive=False),
        default=30.0,
        help="seconds after which a price is not trusted for a decision (default %(default)s)",
    )

    execution.add_argument(
        "--heartbeat-timeout",
        type=number("--heartbeat-timeout", minimum=0, inclusive=False),
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
        type=number("--wallet-grace", minimum=0),
        default=os.environ.get("QTRADER_WALLET_GRACE") or "60",
        help="how long the venue's wallet may differ from the ledger's over settled reads "
        "(testnet and live) before it is a wallet_reconciliation alert, which trips the "
        "EmergencyStop (env QTRADER_WALLET_GRACE; default 60)",
    )


def _worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nats-url",
        type=nats_url,
        default=os.environ.get("QTRADER_NATS_URL", DEFAULT_NATS_URL),
        help="NATS server URL (env QTRADER_NATS_URL; default %(default)s)",
    )
    parser.add_argument("--health-host", default=os.environ.get("QTRADER_HEALTH_HOST", "0.0.0.0"))
    parser.add_argument(
        "--health-port",
        type=port,
        default=int(os.environ.get("QTRADER_HEALTH_PORT", "8080")),
        help="port of /healthz, /readyz, /health and /metrics (env QTRADER_HEALTH_PORT)",
    )
    parser.add_argument("--worker-id", default=os.environ.get("QTRADER_WORKER_ID"))
    parser.add_argument(
        "--stack",
        type=stack_id,
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
        type=integer(minimum=1),
        default=100_000,
        help="messages the outbox holds before the worker stops taking work (default %(default)s)",
    )


def market_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("market data")
    group.add_argument("--source", choices=["synthetic", "replay", "live"], default="synthetic")
    group.add_argument(
        "--replay",
        type=existing_file,
        nargs="+",
        default=[],
        metavar="CSV",
        help="Binance kline CSV or ZIP files named SYMBOL-INTERVAL-... (implies --source replay)",
    )
    group.add_argument("--regime", choices=[r.value for r in Regime], default=Regime.MIXED.value)
    group.add_argument("--seed", type=whole, default=7)
    group.add_argument("--interval", choices=sorted(INTERVAL_MS), default="1m")
    group.add_argument("--start-price", type=positive_decimal, default=Decimal(100))
    group.add_argument(
        "--candles-per-second",
        type=number("--candles-per-second", minimum=0),
        default=5.0,
        help="candle steps per second for replay and synthetic data (0: as fast as possible)",
    )
    group.add_argument("--max-candles", type=whole, default=0, help="stop after N steps (0: never)")
    group.add_argument("--testnet", action="store_true", help="live mode: Binance futures testnet")
    group.add_argument(
        "--market-url",
        type=http_url,
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
    group.add_argument(
        "--warmup-candles",
        type=integer(minimum=0, maximum=1500),
        default=WARMUP_CANDLES,
        help="live mode: the last N closed klines fetched over REST for a symbol the stream "
        "holds none of, so inference decides from the first live candle; no signal is made of "
        "them (0: none; default %(default)s, the shipped model's window)",
    )


def _exchange_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "exchange (testnet and live mode)",
        "API keys come from QTRADER_BINANCE_SECRET_DIR (files api-key, api-secret) or "
        "QTRADER_BINANCE_API_KEY and QTRADER_BINANCE_API_SECRET; they are never logged.",
    )
    env = os.environ.get
    group.add_argument(
        "--exchange-url",
        type=http_url,
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
        type=number("--reconcile-interval", minimum=0),
        default=30.0,
        help="seconds between reads of the venue's positions, compared with the book (0: never; "
        "default %(default)s)",
    )
    group.add_argument(
        "--income-interval",
        type=number("--income-interval", minimum=0),
        default=env("QTRADER_INCOME_INTERVAL"),
        help="seconds between reads of the venue's income history (funding, transfers) for "
        "the portfolio's ledger, weight 30 each (0: never; default: the reconcile interval, "
        "but at least 5)",
    )
    group.add_argument(
        "--reconcile-grace",
        type=number("--reconcile-grace", minimum=0),
        default=60.0,
        help="how long a position difference may last before it is a reconciliation alert, "
        "which trips the EmergencyStop (default %(default)s)",
    )
    group.add_argument(
        "--redis-url",
        type=redis_url,
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
        type=number("--exchange-timeout", minimum=0, inclusive=False),
        default=5.0,
        help="seconds to wait for an exchange answer (default %(default)s)",
    )
    group.add_argument(
        "--unknown-grace",
        type=number("--unknown-grace", minimum=0, inclusive=False),
        default=5.0,
        help="seconds an order of unknown outcome is looked up before it is re-sent",
    )
    group.add_argument(
        "--cycle",
        type=number("--cycle", minimum=0, inclusive=False),
        default=0.25,
        help="the intake's cycle in seconds: at most the policy's maxPerCycle are decided in "
        "any such span; signals are decided as they arrive while that budget lasts",
    )
    group.add_argument(
        "--dead-man-countdown",
        type=number("--dead-man-countdown", minimum=5, inclusive=True),
        default=60.0,
        help="seconds after which the exchange cancels our open orders if not re-armed",
    )


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
        warmup_candles=args.warmup_candles,
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


RUNNERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "marketdata": _run_marketdata,
    "inference": _run_inference,
    "execution": _run_execution,
    "portfolio": _run_portfolio,
}
