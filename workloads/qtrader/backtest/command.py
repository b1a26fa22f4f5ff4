"""``qtrader backtest``: trade a candle range with a model on the live code path, print figures.

The run is the streamed engine (``backtest.streamed``): kline files are read a chunk at a time
as the run reaches them, so memory stays bounded whatever their length; its figures equal the
per-candle ``run_backtest``'s on the same candles.

Input problems (a model or card that does not load, an invalid policy, kline files that break
the format, symbols the policy or the paper exchange does not have) print one line saying what
is wrong and exit 2, like argument errors. A run that completes exits 0, whatever it earned.

Without ``--policy`` the run uses the model card's evaluation policy (so the default reproduces
how the card's backtests were run) for the data's symbols.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TextIO

from qtrader.backtest.bars import Bars, candle_bars
from qtrader.backtest.data import series_interval, synthetic_series
from qtrader.backtest.errors import BacktestError
from qtrader.backtest.policy import evaluation_policy, policy_for
from qtrader.backtest.prediction_process import KlineFiles
from qtrader.backtest.report import backtest_rows, format_rows
from qtrader.backtest.streamed import StreamedResult, run_streamed_backtest
from qtrader.contracts.policy import (
    PolicyError,
    TradingPolicySpec,
    load_policy_file,
    offline_listings,
)
from qtrader.inference.card import ModelCard
from qtrader.inference.onnx_model import ModelLoadError, SignalModel, default_model_path
from qtrader.marketdata.csv_replay import KlineFormatError, infer_symbol_interval, read_klines
from qtrader.marketdata.synthetic import Regime

DEFAULT_SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
DEFAULT_CANDLES = 2_000
DEFAULT_SEED = 7


class _InputError(Exception):
    """Something the user gave cannot be used; the message says what."""


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    try:
        model = _load_model(args.model)
        data = _load_data(args)
        spec = _policy(args.policy, model, data.symbols)
        result = run_streamed_backtest(
            data.bars,
            model,
            spec,
            label_horizon=_label_horizon(model),
            max_volume_share=args.max_volume_share,
            prediction_process=isinstance(data.bars, KlineFiles)
            and not args.one_process
            and len(os.sched_getaffinity(0)) > 1,
        )
    except _InputError as exc:
        print(f"qtrader backtest: {exc}", file=err)
        return 2
    except (BacktestError, KlineFormatError, OSError) as exc:
        # A bad row is found when the stream reaches it, after the run began.
        print(f"qtrader backtest: {exc}", file=err)
        return 2
    if args.json:
        document = _document(result, model, spec, data.source, args.max_volume_share)
        print(json.dumps(document), file=out)
    else:
        label = f"{data.source}, {data.interval} candles"
        print(_table(result, model, spec, label, args.max_volume_share), file=out)
    return 0


@dataclass(frozen=True)
class _Data:
    bars: Mapping[str, Iterable[Bars]] | KlineFiles
    source: str
    interval: str

    @property
    def symbols(self) -> tuple[str, ...]:
        return tuple(self.bars.files if isinstance(self.bars, KlineFiles) else self.bars)


def _load_model(path: Path | None) -> SignalModel:
    try:
        return SignalModel.load(path or default_model_path())
    except ModelLoadError as exc:
        raise _InputError(str(exc)) from None


def _load_data(args: argparse.Namespace) -> _Data:
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
            files = _csv_data(args.csv)
        except (KlineFormatError, ValueError, OSError) as exc:
            raise _InputError(str(exc)) from None
        source = "csv: " + ", ".join(path.name for path in args.csv)
        return _Data(files, source, files.interval)
    symbols: Sequence[str] = args.symbols or DEFAULT_SYMBOLS
    candles: int = args.candles or DEFAULT_CANDLES
    seed: int = DEFAULT_SEED if args.seed is None else args.seed
    regime = Regime(args.regime or Regime.MIXED.value)
    try:
        series = synthetic_series(symbols=symbols, candles=candles, seed=seed, regime=regime)
    except ValueError as exc:
        raise _InputError(str(exc)) from None
    source = f"synthetic: {regime.value}, seed {seed}, {candles} candles per symbol"
    bars = {symbol: candle_bars(series_candles) for symbol, series_candles in series.items()}
    return _Data(bars, source, series_interval(series))


def _csv_data(paths: Sequence[Path]) -> KlineFiles:
    """Each symbol's files (consecutive months, in name order) as one stream of chunks; the
    files are read as the backtest reaches them."""
    by_symbol: dict[str, list[Path]] = {}
    intervals: dict[str, list[str]] = {}
    for path in paths:
        symbol, interval = infer_symbol_interval(path)
        read_klines(path, symbol=symbol, interval=interval)  # checks the file now, reads nothing
        intervals.setdefault(interval, []).append(path.name)
        by_symbol.setdefault(symbol, []).append(path)
    if len(intervals) > 1:
        raise ValueError(f"kline files of different intervals cannot be mixed: {intervals}")
    (interval,) = intervals
    return KlineFiles(
        {symbol: tuple(sorted(files)) for symbol, files in by_symbol.items()}, interval
    )


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
    result: StreamedResult,
    model: SignalModel,
    spec: TradingPolicySpec,
    source: str,
    volume_share: Decimal | None,
) -> dict[str, object]:
    return {
        "model_version": model.version,
        "data": source,
        "symbols": list(spec.symbols),
        "min_confidence": spec.risk.min_confidence,
        "max_volume_share": None if volume_share is None else str(volume_share),
        "figures": result.figures.model_dump(mode="json"),
    }


def _table(
    result: StreamedResult,
    model: SignalModel,
    spec: TradingPolicySpec,
    source: str,
    volume_share: Decimal | None,
) -> str:
    liquidity = "unlimited" if volume_share is None else f"{volume_share} of each candle's volume"
    header = (
        f"qtrader backtest: model {model.version}, {source}\n"
        f"  symbols {', '.join(spec.symbols)}; paper exchange fee {spec.paper.fee_bps} bps, "
        f"slippage {spec.paper.slippage_bps} bps, liquidity {liquidity}; "
        f"min confidence {spec.risk.min_confidence}"
    )
    return header + "\n" + format_rows(backtest_rows(result.figures))
