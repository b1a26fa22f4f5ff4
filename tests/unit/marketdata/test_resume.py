"""Where a restarted marketdata resumes: the synthetic market continues the stored path exactly,
or from the last stored close when that path cannot be rebuilt; replayed rows already stored are
dropped."""

from __future__ import annotations

import itertools
from dataclasses import replace
from decimal import Decimal

from qtrader.contracts.messages import Candle
from qtrader.instruments import paper_exchange_info
from qtrader.marketdata.resume import StoredSpan, after_stored, synthetic_continuation
from qtrader.marketdata.synthetic import INTERVAL_MS, Regime, SyntheticConfig, SyntheticMarket

EXCHANGE = paper_exchange_info()
PAIR = ("BTCUSDT", "ETHUSDT")
CONFIG = SyntheticConfig(
    symbols=PAIR, seed=9, regime=Regime.MIXED, regime_length_candles=40, start_ms=1_700_000_040_000
)
STEP_MS = INTERVAL_MS[CONFIG.interval]


def _market(config: SyntheticConfig, steps: int) -> list[Candle]:
    candles = SyntheticMarket(config, EXCHANGE).candles()
    return list(itertools.islice(candles, steps * len(config.symbols)))


def _of(candles: list[Candle], symbol: str) -> list[Candle]:
    return [c for c in candles if c.symbol == symbol]


def _spans(candles: list[Candle], stored_steps: dict[str, int]) -> dict[str, StoredSpan]:
    """What a stream holding the first ``stored_steps[symbol]`` candles of each symbol says."""
    return {
        symbol: StoredSpan(first=_of(candles, symbol)[0], last=_of(candles, symbol)[steps - 1])
        for symbol, steps in stored_steps.items()
    }


def test_candles_when_started_at_a_later_step_then_equal_those_of_a_market_run_from_zero() -> None:
    uninterrupted = _market(CONFIG, steps=150)

    later = SyntheticMarket(CONFIG, EXCHANGE).candles(first_step=100)

    assert list(itertools.islice(later, 100)) == uninterrupted[200:]


def test_continuation_when_the_stored_path_is_this_seeds_then_equals_the_uninterrupted_run() -> (
    None
):
    uninterrupted = _market(CONFIG, steps=200)
    # Killed between the two symbols of step 117: BTC has it stored, ETH does not.
    spans = _spans(uninterrupted, {"BTCUSDT": 117, "ETHUSDT": 116})

    continuation = list(itertools.islice(synthetic_continuation(CONFIG, EXCHANGE, spans), 167))

    assert continuation == uninterrupted[233:]
    assert continuation[0].symbol == "ETHUSDT"
    assert continuation[0].open_time_ms == spans["BTCUSDT"].last.open_time_ms


def test_continuation_when_the_path_cannot_be_rebuilt_then_starts_at_the_last_stored_close() -> (
    None
):
    other_seed = _market(replace(CONFIG, seed=10), steps=60)
    spans = _spans(other_seed, {"BTCUSDT": 60, "ETHUSDT": 60})

    continuation = list(itertools.islice(synthetic_continuation(CONFIG, EXCHANGE, spans), 40))
    again = list(itertools.islice(synthetic_continuation(CONFIG, EXCHANGE, spans), 40))

    assert continuation == again  # the same seed and stored candle, the same continuation
    for symbol in PAIR:
        first, *_ = _of(continuation, symbol)
        last_stored = spans[symbol].last
        assert first.open_time_ms == last_stored.open_time_ms + STEP_MS
        assert first.open == last_stored.close
        times = [c.open_time_ms for c in _of(continuation, symbol)]
        assert times == [first.open_time_ms + i * STEP_MS for i in range(20)]


def test_continuation_when_a_symbol_has_nothing_stored_then_it_starts_with_the_others() -> None:
    uninterrupted = _market(CONFIG, steps=30)
    config = replace(CONFIG, symbols=(*PAIR, "SOLUSDT"), start_ms=CONFIG.start_ms + 10**9)
    spans = _spans(uninterrupted, {"BTCUSDT": 30, "ETHUSDT": 30})

    continuation = list(itertools.islice(synthetic_continuation(config, EXCHANGE, spans), 9))

    next_open = spans["BTCUSDT"].last.open_time_ms + STEP_MS
    assert [c.open_time_ms for c in continuation] == [next_open] * 3 + [next_open + STEP_MS] * 3 + [
        next_open + 2 * STEP_MS
    ] * 3
    assert [c.symbol for c in continuation[:3]] == ["BTCUSDT", "ETHUSDT", "SOLUSDT"]


def test_continuation_when_nothing_is_stored_then_the_configured_market() -> None:
    continuation = synthetic_continuation(CONFIG, EXCHANGE, {})

    assert list(itertools.islice(continuation, 60)) == _market(CONFIG, steps=30)


def test_after_stored_when_rows_at_or_before_the_last_stored_then_dropped() -> None:
    candles = _market(CONFIG, steps=10)
    spans = _spans(candles, {"BTCUSDT": 4})

    kept = list(after_stored(candles, spans))

    assert _of(kept, "BTCUSDT") == _of(candles, "BTCUSDT")[4:]
    assert _of(kept, "ETHUSDT") == _of(candles, "ETHUSDT")
    assert all(c.close > Decimal(0) for c in kept)
