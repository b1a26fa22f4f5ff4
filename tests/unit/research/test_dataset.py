"""Labels net of costs, example alignment and the walk-forward split (no future leaks)."""

from __future__ import annotations

import itertools
from decimal import Decimal

import numpy as np
import pytest

from qtrader.backtest.data import synthetic_series
from qtrader.contracts.messages import Candle, CandleSource, Direction
from qtrader.contracts.policy import PaperExchangeSettings
from qtrader.inference.features import WINDOW, inputs_from_arrays
from qtrader.inference.onnx_model import CLASSES
from qtrader.research.dataset import (
    examples_from_candles,
    label_future_returns,
    round_trip_cost_bps,
    symbol_examples,
    walk_forward_folds,
)

SHORT, FLAT, LONG = (CLASSES.index(d) for d in (Direction.SHORT, Direction.FLAT, Direction.LONG))
MINUTE = 60_000


def test_labels_when_returns_straddle_the_cost_then_only_net_winners_are_directional() -> None:
    # Horizon 1, cost 10 bps: +0.2 % is LONG, +0.05 % FLAT (the cost eats it), -0.2 % SHORT,
    # -0.05 % FLAT, +0.11 % LONG, 0 FLAT.
    returns = [0.002, 0.0005, -0.002, -0.0005, 0.0011, 0.0]
    close = np.cumprod([100.0, *(1 + r for r in returns)])
    labels = label_future_returns(close, horizon=1, cost_bps=10.0)
    assert labels.tolist() == [LONG, FLAT, SHORT, FLAT, LONG, FLAT]


def test_labels_when_horizon_is_three_then_each_close_is_judged_three_later() -> None:
    close = np.array([100.0, 90.0, 120.0, 101.0, 100.0, 99.0])
    labels = label_future_returns(close, horizon=3, cost_bps=12.0)
    # 100 -> 101 (+1 %), 90 -> 100 (+11 %), 120 -> 99 (-17.5 %)
    assert labels.tolist() == [LONG, LONG, SHORT]


def test_labels_when_cost_is_zero_then_any_move_is_directional() -> None:
    labels = label_future_returns(np.array([100.0, 100.01, 100.0, 100.0]), horizon=1, cost_bps=0)
    assert labels.tolist() == [LONG, SHORT, FLAT]


def test_labels_when_series_not_longer_than_horizon_then_none() -> None:
    assert label_future_returns(np.array([1.0, 2.0]), horizon=2, cost_bps=0).shape == (0,)


@pytest.mark.parametrize(("horizon", "cost"), [(0, 1.0), (1, -1.0)])
def test_labels_when_arguments_invalid_then_raises(horizon: int, cost: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        label_future_returns(np.array([1.0, 2.0, 3.0]), horizon=horizon, cost_bps=cost)


def test_round_trip_cost_is_twice_fee_plus_slippage() -> None:
    settings = PaperExchangeSettings(fee_bps=Decimal(4), slippage_bps=Decimal("2.5"))
    assert round_trip_cost_bps(settings) == 13.0


def candle(index: int, close: float, *, symbol: str = "BTCUSDT") -> Candle:
    price = Decimal(str(close))
    return Candle(
        symbol=symbol,
        interval="1m",
        open_time_ms=index * MINUTE,
        close_time_ms=index * MINUTE + MINUTE - 1,
        open=price,
        high=price + 1,
        low=price - 1,
        close=price,
        volume=Decimal(10 + index % 5),
        source=CandleSource.REPLAY,
    )


def test_symbol_examples_when_built_then_row_i_is_the_window_ending_at_its_candle() -> None:
    closes = [100 + (i * 7 % 13) - 6 + i * 0.1 for i in range(WINDOW + 20)]
    candles = [candle(i, c) for i, c in enumerate(closes)]
    horizon = 4
    examples = symbol_examples(candles, horizon=horizon, cost_bps=8.0)
    assert len(examples) == len(candles) - (WINDOW - 1) - horizon
    # The first example is decided at candle WINDOW - 1 and labelled by candle WINDOW - 1 + 4.
    assert examples.open_time_ms[0] == (WINDOW - 1) * MINUTE
    assert examples.label_end_ms[0] == candles[WINDOW - 1 + horizon].close_time_ms
    column = np.array(closes)
    expected = label_future_returns(column, horizon=horizon, cost_bps=8.0)[WINDOW - 1 :]
    np.testing.assert_array_equal(examples.labels, expected)
    inputs = inputs_from_arrays(column, column + 1, column - 1, column, [c.volume for c in candles])
    np.testing.assert_array_equal(examples.inputs.features, inputs.features[: len(examples)])
    np.testing.assert_array_equal(examples.inputs.sequence, inputs.sequence[: len(examples)])
    assert set(examples.symbols.tolist()) == {"BTCUSDT"}


def test_walk_forward_when_split_then_folds_are_consecutive_and_cover_the_end() -> None:
    folds = walk_forward_folds(
        start_ms=0, end_ms=1000 * MINUTE, interval_ms=MINUTE, folds=4, initial_train_fraction=0.4
    )
    assert [f.index for f in folds] == [0, 1, 2, 3]
    assert folds[0].test_from_ms == 400 * MINUTE
    assert [f.test_to_ms - f.test_from_ms for f in folds[:-1]] == [150 * MINUTE] * 3
    for before, after in itertools.pairwise(folds):
        assert before.test_to_ms == after.test_from_ms
    assert folds[-1].test_to_ms == 1000 * MINUTE


@pytest.mark.parametrize(("folds", "fraction"), [(0, 0.4), (3, 0.0), (3, 1.0), (2000, 0.5)])
def test_walk_forward_when_impossible_then_raises(folds: int, fraction: float) -> None:
    with pytest.raises(ValueError, match=r"folds|initial_train_fraction"):
        walk_forward_folds(
            start_ms=0,
            end_ms=1000 * MINUTE,
            interval_ms=MINUTE,
            folds=folds,
            initial_train_fraction=fraction,
        )


def test_walk_forward_when_trained_then_no_training_label_reaches_into_its_fold() -> None:
    series = synthetic_series(symbols=("BTCUSDT", "ETHUSDT"), candles=600, seed=2)
    examples = examples_from_candles(series, horizon=5, cost_bps=12.0)
    folds = walk_forward_folds(
        start_ms=min(c[0].open_time_ms for c in series.values()),
        end_ms=max(c[-1].close_time_ms for c in series.values()) + 1,
        interval_ms=MINUTE,
        folds=3,
        initial_train_fraction=0.4,
    )
    tested = 0
    for fold in folds:
        train = examples.take(fold.train_rows(examples))
        test = examples.take(fold.test_rows(examples))
        assert len(train) > 0
        assert len(test) > 0
        # Every price a training label used closed before the fold's first candle opened.
        assert int(train.label_end_ms.max()) < fold.test_from_ms
        assert int(test.open_time_ms.min()) >= fold.test_from_ms
        assert int(test.open_time_ms.max()) < fold.test_to_ms
        # The embargo drops the examples whose labels straddle the boundary, and no more.
        straddling = (examples.open_time_ms < fold.test_from_ms) & ~fold.train_rows(examples)
        assert set(examples.label_end_ms[straddling] >= fold.test_from_ms) == {True}
        tested += len(test)
    # Folds do not overlap, and together hold every example after the first stretch.
    assert tested == int(np.sum(examples.open_time_ms >= folds[0].test_from_ms))
