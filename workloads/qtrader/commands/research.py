"""``qtrader model train`` (the signal ensemble, needs the ``train`` extra) and ``qtrader
backtest`` (a model on the live code path, paper exchange, no NATS)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from qtrader.commands.args import Commands, existing_file, integer, symbol, volume_share, whole
from qtrader.marketdata.synthetic import Regime


def add_commands(commands: Commands) -> None:
    """``model train`` and ``backtest``."""
    model = commands.add_parser("model", help="train and export the signal model")
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    _train_arguments(model_commands)
    _backtest_command(commands)


def _train_arguments(actions: Commands) -> None:
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
    train.add_argument("--seed", type=whole, default=7, help="(default %(default)s)")
    train.add_argument("--epochs", type=integer(minimum=1, maximum=1000), help="default 12")
    train.add_argument(
        "--folds", type=integer(minimum=1, maximum=20), help="walk-forward folds (default 4)"
    )
    train.add_argument(
        "--csv",
        type=existing_file,
        nargs="+",
        default=[],
        metavar="FILE",
        help="Binance kline files SYMBOL-INTERVAL-...(.csv|.zip) instead of the synthetic market",
    )
    train.add_argument(
        "--symbols", type=symbol, nargs="+", help="synthetic market symbols (default: six)"
    )
    train.add_argument(
        "--candles",
        type=integer(minimum=100, maximum=1_000_000),
        help="synthetic candles per symbol (default 8000)",
    )


def _backtest_command(commands: Commands) -> None:
    backtest = commands.add_parser(
        "backtest",
        help="trade kline CSVs or a synthetic range with a model on the live code path (paper "
        "exchange, no NATS) and print the figures",
    )
    source = backtest.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--csv",
        type=existing_file,
        nargs="+",
        metavar="FILE",
        help="Binance kline files SYMBOL-INTERVAL-...(.csv|.zip)",
    )
    source.add_argument("--synthetic", action="store_true", help="the seeded synthetic market")
    backtest.add_argument(
        "--symbols", type=symbol, nargs="+", help="synthetic: symbols (default BTC, ETH, SOL)"
    )
    backtest.add_argument(
        "--candles",
        type=integer(minimum=1, maximum=1_000_000),
        help="synthetic: candles per symbol (default 2000)",
    )
    backtest.add_argument("--seed", type=whole, help="synthetic: seed (default 7)")
    backtest.add_argument(
        "--regime", choices=[r.value for r in Regime], help="synthetic: regime (default mixed)"
    )
    backtest.add_argument(
        "--policy",
        type=existing_file,
        help="TradingPolicy YAML (default: the model card's evaluation policy)",
    )
    backtest.add_argument(
        "--model",
        type=existing_file,
        help="model card NAME.json (or NAME.onnx; default: the packaged model)",
    )
    backtest.add_argument(
        "--max-volume-share",
        type=volume_share,
        metavar="SHARE",
        help="the paper exchange fills at most this share of each candle's volume, in (0, 1]; "
        "an order beyond it fills in part and its remainder is sent again (default: no limit)",
    )
    backtest.add_argument(
        "--one-process",
        action="store_true",
        help="--csv: read and predict in the trading process too (default: in a second "
        "process beside it when this machine has a second core; the results are the same)",
    )
    backtest.add_argument("--json", action="store_true", help="the figures as one JSON object")


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


RUNNERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "model": _run_model,
    "backtest": _run_backtest,
}
