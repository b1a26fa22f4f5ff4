"""``qtrader backtest``: trade a candle range with a model on the live code path, print figures.

Input problems (a model or card that does not load, an invalid policy, kline files that break
the format, symbols the policy or the paper exchange does not have) print one line saying what
is wrong and exit 2, like argument errors. A run that completes exits 0, whatever it earned.

Without ``--policy`` the run uses the model card's evaluation policy (so the default reproduces
how the card's backtests were run) for the data's symbols.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from qtrader.backtest.data import CandleSeries, csv_series, series_interval, synthetic_series
from qtrader.backtest.engine import BacktestError, BacktestResult, run_backtest
from qtrader.backtest.policy import evaluation_policy, policy_for
from qtrader.backtest.report import backtest_rows, format_rows
from qtrader.contracts.policy import (
    PolicyError,
    TradingPolicySpec,
    load_policy_file,
    offline_listings,
)
from qtrader.inference.card import ModelCard
from qtrader.inference.onnx_model import ModelLoadError, SignalModel, default_model_path
from qtrader.marketdata.csv_replay import KlineFormatError
from qtrader.marketdata.synthetic import Regime

DEFAULT_SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
DEFAULT_CANDLES = 2_000
DEFAULT_SEED = 7


class _InputError(Exception):
    """Something the user gave cannot be used; the message says what."""


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    try:
        model = _load_model(args.model)
        series, source = _load_data(args)
        spec = _policy(args.policy, model, tuple(series))
        result = run_backtest(series, model, spec, label_horizon=_label_horizon(model))
    except _InputError as exc:
        print(f"qtrader backtest: {exc}", file=err)
        return 2
    except BacktestError as exc:
        print(f"qtrader backtest: {exc}", file=err)
        return 2
    if args.json:
        print(json.dumps(_document(result, model, spec, source)), file=out)
    else:
        print(_table(result, model, spec, f"{source}, {series_interval(series)} candles"), file=out)
    return 0


def _load_model(path: Path | None) -> SignalModel:
    try:
        return SignalModel.load(path or default_model_path())
    except ModelLoadError as exc:
        raise _InputError(str(exc)) from None


def _load_data(args: argparse.Namespace) -> tuple[CandleSeries, str]:
    synthetic_only = {
        "--symbols": args.symbols,
        "--candles": args.candles,
        "--seed": args.seed,
        "--regime": args.regime,
    }
    if args.csv:
        given = [flag for flag, value in synthetic_only.items() if value is not None]
        if given:
            raise _InputError(f"{', '.join(given)} apply to --synthetic data, not to --csv files")
        try:
            series = csv_series(args.csv)
        except (KlineFormatError, ValueError, OSError) as exc:
            raise _InputError(str(exc)) from None
        return series, "csv: " + ", ".join(path.name for path in args.csv)
    symbols: Sequence[str] = args.symbols or DEFAULT_SYMBOLS
    candles: int = args.candles or DEFAULT_CANDLES
    seed: int = DEFAULT_SEED if args.seed is None else args.seed
    regime = Regime(args.regime or Regime.MIXED.value)
    try:
        series = synthetic_series(symbols=symbols, candles=candles, seed=seed, regime=regime)
    except ValueError as exc:
        raise _InputError(str(exc)) from None
    return series, f"synthetic: {regime.value}, seed {seed}, {candles} candles per symbol"


def _policy(path: Path | None, model: SignalModel, symbols: tuple[str, ...]) -> TradingPolicySpec:
    if path is None:
        card = model.card
        template = (
            card.evaluation.policy if isinstance(card, ModelCard) else evaluation_policy(symbols)
        )
        try:
            return policy_for(symbols, template)
        except ValueError as exc:
            raise _InputError(
                f"the card's evaluation policy does not fit the data: {exc}"
            ) from None
    try:
        spec = load_policy_file(path, listings=offline_listings()).spec
    except PolicyError as exc:
        raise _InputError(str(exc)) from None
    missing = [symbol for symbol in symbols if symbol not in spec.symbols]
    if missing:
        raise _InputError(
            f"the data has {', '.join(missing)}, which the policy {path} does not trade "
            f"(its symbols: {', '.join(spec.symbols)})"
        )
    return spec


def _label_horizon(model: SignalModel) -> int:
    card = model.card
    if isinstance(card, ModelCard):
        return card.training.label_horizon_candles
    return card.training_data.label_horizon_candles


def _document(
    result: BacktestResult, model: SignalModel, spec: TradingPolicySpec, source: str
) -> dict[str, object]:
    return {
        "model_version": model.version,
        "data": source,
        "symbols": list(spec.symbols),
        "min_confidence": spec.risk.min_confidence,
        "figures": result.figures.model_dump(mode="json"),
    }


def _table(result: BacktestResult, model: SignalModel, spec: TradingPolicySpec, source: str) -> str:
    header = (
        f"qtrader backtest: model {model.version}, {source}\n"
        f"  symbols {', '.join(spec.symbols)}; paper exchange fee {spec.paper.fee_bps} bps, "
        f"slippage {spec.paper.slippage_bps} bps; min confidence {spec.risk.min_confidence}"
    )
    return header + "\n" + format_rows(backtest_rows(result.figures))
