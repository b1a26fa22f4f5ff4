"""Feature computation: the live rolling window and the batch training path agree."""

from __future__ import annotations

import itertools
from decimal import Decimal

import numpy as np
import pytest

from qtrader.contracts.messages import Candle
from qtrader.inference.features import (
    FEATURE_NAMES,
    SEQUENCE_FEATURE_NAMES,
    WINDOW,
    FeatureWindow,
    ModelInputs,
    WindowNotReadyError,
    features_from_arrays,
    inputs_from_arrays,
    windows_inputs,
)
from qtrader.instruments import paper_exchange_info
from qtrader.marketdata.synthetic import Regime, SyntheticConfig, SyntheticMarket
from qtrader_tools.candles import flat_candle


def synthetic_candles(count: int, *, symbol: str = "BTCUSDT") -> list[Candle]:
    config = SyntheticConfig(symbols=(symbol,), seed=11, regime=Regime.MIXED)
    market = SyntheticMarket(config, paper_exchange_info())
    return list(itertools.islice(market.candles(), count))


def columns(candles: list[Candle]) -> list[np.ndarray]:
    return [
        np.array([float(getattr(c, name)) for c in candles])
        for name in ("open", "high", "low", "close", "volume")
    ]


def test_feature_window_when_fed_candles_then_matches_batch_features() -> None:
    candles = synthetic_candles(WINDOW + 60)
    batch = features_from_arrays(*columns(candles))
    window = FeatureWindow()
    live = []
    for candle in candles:
        window.push(candle)
        if window.ready:
            live.append(window.features())
    assert batch.shape == (len(candles) - WINDOW + 1, len(FEATURE_NAMES))
    # Same function on same-shaped windows: the numbers are identical, not merely close.
    np.testing.assert_array_equal(np.stack(live), batch)


def test_feature_window_when_fewer_than_window_candles_then_not_ready() -> None:
    window = FeatureWindow()
    for candle in synthetic_candles(WINDOW - 1):
        window.push(candle)
    assert not window.ready
    with pytest.raises(WindowNotReadyError):
        window.features()


def test_feature_window_when_window_candles_pushed_then_ready_with_float32_vector() -> None:
    window = FeatureWindow()
    for candle in synthetic_candles(WINDOW):
        window.push(candle)
    features = window.features()
    assert window.ready
    assert features.dtype == np.float32
    assert features.shape == (len(FEATURE_NAMES),)
    assert np.all(np.isfinite(features))


def test_feature_window_when_candle_repeated_then_it_is_ignored() -> None:
    candles = synthetic_candles(WINDOW + 1)
    window = FeatureWindow()
    for candle in candles[:WINDOW]:
        window.push(candle)
    before = window.features()
    assert window.push(candles[WINDOW - 1]) is False
    np.testing.assert_array_equal(window.features(), before)


def test_feature_window_when_older_candle_arrives_then_it_is_ignored() -> None:
    candles = synthetic_candles(WINDOW + 1)
    window = FeatureWindow()
    for candle in candles[:WINDOW]:
        window.push(candle)
    assert window.push(candles[3]) is False
    assert window.push(candles[WINDOW]) is True
    assert window.last_open_time_ms == candles[WINDOW].open_time_ms


def test_feature_window_when_another_symbol_pushed_then_raises() -> None:
    window = FeatureWindow()
    window.push(synthetic_candles(1, symbol="BTCUSDT")[0])
    with pytest.raises(ValueError, match="ETHUSDT"):
        window.push(synthetic_candles(2, symbol="ETHUSDT")[1])


def test_features_when_prices_and_volumes_rescaled_then_unchanged() -> None:
    o, h, low, c, v = columns(synthetic_candles(WINDOW + 20))
    original = features_from_arrays(o, h, low, c, v)
    rescaled = features_from_arrays(o * 1000, h * 1000, low * 1000, c * 1000, v * 0.01)
    np.testing.assert_allclose(rescaled, original, rtol=1e-4, atol=1e-6)


def test_features_when_market_is_completely_flat_then_finite() -> None:
    flat = np.full(WINDOW, 50.0)
    features = features_from_arrays(flat, flat, flat, flat, np.zeros(WINDOW))
    assert features.shape == (1, len(FEATURE_NAMES))
    assert np.all(np.isfinite(features))


def test_features_from_arrays_when_series_shorter_than_window_then_no_rows() -> None:
    short = columns(synthetic_candles(WINDOW - 1))
    assert features_from_arrays(*short).shape == (0, len(FEATURE_NAMES))


def test_features_from_arrays_when_columns_differ_in_length_then_raises() -> None:
    o, h, low, c, v = columns(synthetic_candles(WINDOW))
    with pytest.raises(ValueError, match="one length"):
        features_from_arrays(o, h, low, c[:-1], v)


def test_features_from_arrays_when_a_price_is_not_positive_then_raises() -> None:
    o, h, low, c, v = columns(synthetic_candles(WINDOW))
    c[5] = 0.0
    with pytest.raises(ValueError, match="positive"):
        features_from_arrays(o, h, low, c, v)


def test_feature_window_when_fed_candles_then_sequence_matches_batch_inputs() -> None:
    candles = synthetic_candles(WINDOW + 40)
    batch = inputs_from_arrays(*columns(candles))
    window = FeatureWindow()
    live = []
    for candle in candles:
        window.push(candle)
        if window.ready:
            live.append(window.inputs())
    stacked = ModelInputs.stack(live)
    assert batch.sequence.shape == (len(candles) - WINDOW + 1, WINDOW, len(SEQUENCE_FEATURE_NAMES))
    # The same function on same-shaped windows: identical, not merely close.
    np.testing.assert_array_equal(stacked.sequence, batch.sequence)
    np.testing.assert_array_equal(stacked.features, batch.features)
    np.testing.assert_array_equal(window.sequence(), batch.sequence[-1])


def test_windows_inputs_of_several_symbols_equal_each_window_alone_bit_for_bit() -> None:
    """Inference computes a close time's windows in one pass; each row must be exactly what
    the window alone gives (a flat window among them: its ratios take their defaults)."""
    windows = []
    for symbol, count in (("BTCUSDT", WINDOW + 7), ("ETHUSDT", WINDOW), ("SOLUSDT", WINDOW + 90)):
        window = FeatureWindow()
        for candle in synthetic_candles(count, symbol=symbol):
            window.push(candle)
        windows.append(window)
    flat = FeatureWindow()
    for index in range(WINDOW):
        flat.push(flat_candle("XRPUSDT", Decimal("0.5"), open_time_ms=index * 60_000))
    windows.append(flat)
    together = windows_inputs(windows)
    alone = ModelInputs.stack([window.inputs() for window in windows])
    np.testing.assert_array_equal(together.features, alone.features)
    np.testing.assert_array_equal(together.sequence, alone.sequence)
    assert len({row.tobytes() for row in together.features}) == len(windows)  # four distinct


def test_windows_inputs_when_one_window_is_not_full_then_raises() -> None:
    full, short = FeatureWindow(), FeatureWindow()
    for candle in synthetic_candles(WINDOW):
        full.push(candle)
    for candle in synthetic_candles(WINDOW - 1, symbol="ETHUSDT"):
        short.push(candle)
    with pytest.raises(WindowNotReadyError, match="ETHUSDT"):
        windows_inputs([full, short])


def test_sequence_when_inspected_then_each_column_is_what_its_name_says() -> None:
    candles = synthetic_candles(WINDOW)
    o, h, low, c, v = columns(candles)
    sequence = inputs_from_arrays(o, h, low, c, v).sequence[0].astype(np.float64)
    np.testing.assert_allclose(sequence[:, 0], np.log(c / o), atol=1e-6)
    np.testing.assert_allclose(sequence[:, 1], np.log(h / low), atol=1e-6)
    np.testing.assert_allclose(sequence[:, 2], np.log(c / c[-1]), atol=1e-6)
    np.testing.assert_allclose(sequence[:, 3], (v - v.mean()) / v.std(), atol=1e-5)
    assert sequence[-1, 2] == 0.0


def test_sequence_when_prices_and_volumes_rescaled_then_unchanged() -> None:
    o, h, low, c, v = columns(synthetic_candles(WINDOW + 5))
    original = inputs_from_arrays(o, h, low, c, v).sequence
    rescaled = inputs_from_arrays(o * 1000, h * 1000, low * 1000, c * 1000, v * 0.01).sequence
    np.testing.assert_allclose(rescaled, original, rtol=1e-4, atol=1e-6)


def test_sequence_when_market_is_completely_flat_then_finite() -> None:
    flat = np.full(WINDOW, 50.0)
    sequence = inputs_from_arrays(flat, flat, flat, flat, np.zeros(WINDOW)).sequence
    assert np.all(np.isfinite(sequence))
    assert np.all(sequence == 0.0)
