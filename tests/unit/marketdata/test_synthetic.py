"""The synthetic market: reproducible per seed, a crash of the configured size, exchange-shaped."""

from __future__ import annotations

import itertools
from decimal import Decimal

import pytest

from qtrader.contracts.messages import Candle
from qtrader.instruments import ExchangeInfo, paper_exchange_info
from qtrader.marketdata.synthetic import Regime, SyntheticConfig, SyntheticMarket

EXCHANGE = paper_exchange_info()
PAIR = ("BTCUSDT", "ETHUSDT")
CRASH = SyntheticConfig(symbols=PAIR, regime=Regime.CRASH)  # defaults: -18% after 120, over 5
SEEDS = range(10)


def _take(config: SyntheticConfig, steps: int, exchange: ExchangeInfo = EXCHANGE) -> list[Candle]:
    """``steps`` candles of every symbol in ``config``."""
    return list(
        itertools.islice(SyntheticMarket(config, exchange).candles(), steps * len(config.symbols))
    )


def _closes(candles: list[Candle], symbol: str) -> list[Decimal]:
    return [c.close for c in candles if c.symbol == symbol]


def _max_fall(closes: list[Decimal]) -> Decimal:
    """Largest peak-to-trough fall of ``closes``, as a fraction of the peak."""
    peak, fall = closes[0], Decimal(0)
    for close in closes:
        peak = max(peak, close)
        fall = max(fall, 1 - close / peak)
    return fall


@pytest.fixture(scope="module")
def every_symbol_every_regime() -> list[Candle]:
    """Three MIXED cycles (trend, mean reversion, crash) of every paper-exchange symbol."""
    config = SyntheticConfig(symbols=tuple(EXCHANGE.instruments), regime_length_candles=150)
    return _take(config, steps=450)


def test_candles_when_same_seed_then_identical_candles() -> None:
    config = SyntheticConfig(symbols=PAIR, seed=42)

    assert _take(config, steps=400) == _take(config, steps=400)


def test_candles_when_different_seed_then_different_candles() -> None:
    first = _take(SyntheticConfig(symbols=PAIR, seed=1), steps=50)
    second = _take(SyntheticConfig(symbols=PAIR, seed=2), steps=50)

    assert [c.close for c in first] != [c.close for c in second]


def test_candles_when_a_symbol_is_added_then_other_symbols_paths_do_not_change() -> None:
    alone = _take(SyntheticConfig(symbols=("BTCUSDT",)), steps=100)
    with_others = _take(SyntheticConfig(symbols=("SOLUSDT", "BTCUSDT", "ETHUSDT")), steps=100)

    assert [c for c in with_others if c.symbol == "BTCUSDT"] == alone


@pytest.mark.parametrize("seed", SEEDS)
def test_crash_regime_when_defaults_then_falls_at_least_15_pct_within_60_candles_around_it(
    seed: int,
) -> None:
    candles = _take(SyntheticConfig(symbols=PAIR, seed=seed, regime=Regime.CRASH), steps=200)
    start = CRASH.crash_after_candles - 30

    for symbol in PAIR:
        assert _max_fall(_closes(candles, symbol)[start : start + 60]) >= Decimal("0.15")


@pytest.mark.parametrize("seed", SEEDS)
def test_crash_regime_when_defaults_then_the_crash_candles_fall_15_to_20_pct(seed: int) -> None:
    candles = _take(SyntheticConfig(symbols=PAIR, seed=seed, regime=Regime.CRASH), steps=200)
    first, last = CRASH.crash_after_candles, CRASH.crash_after_candles + CRASH.crash_candles - 1

    for symbol in PAIR:
        series = [c for c in candles if c.symbol == symbol]
        fall = 1 - series[last].close / series[first].open
        assert Decimal("0.15") <= fall <= Decimal("0.20"), (symbol, fall)


def test_crash_regime_when_defaults_then_calm_before_the_crash_has_no_such_fall() -> None:
    candles = _take(CRASH, steps=200)

    for symbol in PAIR:
        assert _max_fall(_closes(candles, symbol)[: CRASH.crash_after_candles]) < Decimal("0.05")


def test_candles_when_any_symbol_and_regime_then_every_price_is_on_the_tick_grid(
    every_symbol_every_regime: list[Candle],
) -> None:
    off_grid = [
        (c.symbol, c.open_time_ms, price)
        for c in every_symbol_every_regime
        for price in (c.open, c.high, c.low, c.close)
        if price % EXCHANGE.instrument(c.symbol).tick_size != 0
    ]

    assert off_grid == []


def test_candles_when_any_symbol_and_regime_then_high_and_low_bound_open_and_close(
    every_symbol_every_regime: list[Candle],
) -> None:
    broken = [
        c
        for c in every_symbol_every_regime
        if c.high < max(c.open, c.close) or c.low > min(c.open, c.close)
    ]

    assert broken == []


def test_candles_when_stepping_then_each_open_is_the_previous_close_one_interval_later() -> None:
    btc = [c for c in _take(SyntheticConfig(symbols=PAIR), steps=100) if c.symbol == "BTCUSDT"]

    for previous, candle in itertools.pairwise(btc):
        assert candle.open == previous.close
        assert candle.open_time_ms == previous.close_time_ms + 1
