"""Candle ranges for backtests and training: Binance kline files, or the synthetic market.

Both give ``{symbol: [Candle, ...]}`` with each symbol's candles in ascending open time, the
shape ``run_backtest`` and the training take. Several files of one symbol (consecutive months)
are joined; a candle that appears in two files, or files of different intervals, are refused
with a message naming them.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from qtrader.contracts.messages import Candle
from qtrader.instruments import paper_exchange_info
from qtrader.marketdata.csv_replay import infer_symbol_interval, read_klines
from qtrader.marketdata.synthetic import Regime, SyntheticConfig, SyntheticMarket

CandleSeries = dict[str, list[Candle]]

_UNIT_MS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def interval_ms(interval: str) -> int:
    """Milliseconds of a kline interval such as ``1m``, ``15m``, ``4h``, ``1d``."""
    match = re.fullmatch(r"(\d+)([smhdw])", interval)
    if match is None or int(match.group(1)) == 0:
        raise ValueError(f"not a kline interval: {interval!r}")
    return int(match.group(1)) * _UNIT_MS[match.group(2)]


def csv_series(paths: Sequence[Path]) -> CandleSeries:
    """The candles of Binance kline files (``.csv`` or ``.zip``), named ``SYMBOL-INTERVAL-...``."""
    if not paths:
        raise ValueError("no kline files given")
    by_symbol: CandleSeries = {}
    intervals: dict[str, list[str]] = {}
    for path in paths:
        symbol, interval = infer_symbol_interval(path)
        intervals.setdefault(interval, []).append(path.name)
        by_symbol.setdefault(symbol, []).extend(read_klines(path, symbol=symbol, interval=interval))
    if len(intervals) > 1:
        raise ValueError(f"kline files of different intervals cannot be mixed: {intervals}")
    for symbol, candles in by_symbol.items():
        candles.sort(key=lambda c: c.open_time_ms)
        for before, after in itertools.pairwise(candles):
            if after.open_time_ms == before.open_time_ms:
                raise ValueError(
                    f"{symbol}: the candle opening at {after.open_time_ms} is in two files"
                )
    return by_symbol


def file_digests(paths: Sequence[Path]) -> list[tuple[str, str]]:
    """(file name, sha256) of each file, for the model card."""
    return [(path.name, hashlib.sha256(path.read_bytes()).hexdigest()) for path in paths]


def synthetic_series(
    *,
    symbols: Sequence[str],
    candles: int,
    seed: int,
    regime: Regime = Regime.MIXED,
    interval: str = "1m",
) -> CandleSeries:
    """``candles`` candles per symbol from the seeded synthetic market (same seed, same data)."""
    if candles < 1:
        raise ValueError(f"candles must be >= 1, got {candles}")
    if not symbols or len(set(symbols)) != len(symbols):
        raise ValueError(f"symbols must be distinct and not empty, got {list(symbols)}")
    config = SyntheticConfig(symbols=tuple(symbols), seed=seed, regime=regime, interval=interval)
    market = SyntheticMarket(config, paper_exchange_info())
    series: CandleSeries = {symbol: [] for symbol in symbols}
    for candle in itertools.islice(market.candles(), candles * len(symbols)):
        series[candle.symbol].append(candle)
    return series


def series_interval(candles_by_symbol: Mapping[str, Sequence[Candle]]) -> str:
    """The one interval of every candle, or ``ValueError``."""
    intervals = {c.interval for candles in candles_by_symbol.values() for c in candles}
    if len(intervals) != 1:
        raise ValueError(f"candles must share one interval, got {sorted(intervals)}")
    return intervals.pop()


def time_range(candles_by_symbol: Mapping[str, Sequence[Candle]]) -> tuple[int, int]:
    """(first open time, last close time) over every symbol."""
    firsts = [candles[0].open_time_ms for candles in candles_by_symbol.values() if candles]
    lasts = [candles[-1].close_time_ms for candles in candles_by_symbol.values() if candles]
    if not firsts:
        raise ValueError("no candles")
    return min(firsts), max(lasts)
