"""A window warmed with a symbol's last ``WINDOW`` stored candles is the uninterrupted one: the
next candles give the same model inputs, bit for bit (what a restarted inference relies on)."""

from __future__ import annotations

import itertools

import numpy as np

from qtrader.contracts.messages import Candle
from qtrader.inference.features import WINDOW, FeatureWindow
from qtrader.instruments import paper_exchange_info
from qtrader.marketdata.synthetic import Regime, SyntheticConfig, SyntheticMarket


def _candles(steps: int) -> list[Candle]:
    config = SyntheticConfig(symbols=("ETHUSDT",), seed=23, regime=Regime.MIXED)
    return list(itertools.islice(SyntheticMarket(config, paper_exchange_info()).candles(), steps))


def test_window_when_warmed_with_the_last_window_candles_then_inputs_equal_bit_for_bit() -> None:
    candles = _candles(120)
    restart_at = 77
    uninterrupted, warmed = FeatureWindow(), FeatureWindow()
    for candle in candles[:restart_at]:
        uninterrupted.push(candle)
    for candle in candles[restart_at - WINDOW : restart_at]:
        warmed.push(candle)

    for candle in candles[restart_at:]:
        assert uninterrupted.push(candle)
        assert warmed.push(candle)
        whole, resumed = uninterrupted.inputs(), warmed.inputs()
        assert np.array_equal(whole.features, resumed.features)
        assert np.array_equal(whole.sequence, resumed.sequence)


def test_window_when_a_candle_in_flight_comes_again_after_the_restart_then_ignored() -> None:
    candles = _candles(40)
    window = FeatureWindow()
    for candle in candles:
        window.push(candle)

    assert not window.push(candles[35])  # the consumer's late redelivery: nothing moves
    assert window.last_open_time_ms == candles[-1].open_time_ms
