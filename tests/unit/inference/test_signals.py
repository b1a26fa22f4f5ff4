"""The signal-making code shared by the inference service and the backtest, and its batching."""

from __future__ import annotations

import itertools
from decimal import Decimal

import numpy as np
import pytest

from qtrader.contracts.messages import Candle, CandleSource
from qtrader.inference.features import WINDOW, FeatureWindow
from qtrader.inference.onnx_model import SignalModel, decide, default_model_path
from qtrader.inference.signals import CandleBatcher, SignalMaker, signal_id
from qtrader.instruments import paper_exchange_info
from qtrader.marketdata.synthetic import Regime, SyntheticConfig, SyntheticMarket

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")


@pytest.fixture(scope="module")
def model() -> SignalModel:
    return SignalModel.load(default_model_path())


def market(steps: int) -> list[list[Candle]]:
    """``steps`` groups of one candle per symbol, in time order."""
    config = SyntheticConfig(symbols=SYMBOLS, seed=4, regime=Regime.MIXED)
    candles = list(
        itertools.islice(SyntheticMarket(config, paper_exchange_info()).candles(), steps * 3)
    )
    return [candles[i : i + 3] for i in range(0, len(candles), 3)]


def test_maker_when_window_fills_then_accepts_from_the_window_th_candle() -> None:
    maker = SignalMaker()
    accepted = [maker.accept(group[0]) for group in market(WINDOW + 2)]
    assert accepted == [False] * (WINDOW - 1) + [True] * 3


def test_maker_when_candles_are_warm_up_then_they_fill_the_window_and_make_no_signal() -> None:
    # A warm-up candle is history fetched to fill windows, not news: no signal is made of it,
    # even of a redelivered one.
    maker = SignalMaker()
    steps = [group[0] for group in market(WINDOW + 2)]
    warm = [c.model_copy(update={"source": CandleSource.WARMUP}) for c in steps[: WINDOW + 1]]
    assert [maker.accept(c) for c in warm] == [False] * (WINDOW + 1)
    assert maker.accept(warm[-1]) is False
    assert maker.accept(steps[WINDOW + 1]) is True  # the first live candle: the window is full


def test_maker_when_newest_candle_redelivered_then_signals_again_and_older_not() -> None:
    maker = SignalMaker()
    steps = market(WINDOW + 2)
    for group in steps:
        maker.accept(group[0])
    assert maker.accept(steps[-1][0]) is True  # the newest again: its signal may be lost
    assert maker.accept(steps[-3][0]) is False  # older: nothing left to say


def test_maker_when_batch_made_then_each_signal_equals_its_single_row_prediction(
    model: SignalModel,
) -> None:
    maker = SignalMaker()
    windows = {symbol: FeatureWindow(symbol) for symbol in SYMBOLS}
    last: list[Candle] = []
    for group in market(WINDOW + 5):
        last = [c for c in group if maker.accept(c)]
        for candle in group:
            windows[candle.symbol].push(candle)
    batch = maker.make(last, model, now_ms=123)
    assert [s.symbol for s in batch.signals] == list(SYMBOLS)
    for signal, candle in zip(batch.signals, last, strict=True):
        alone = model.predict(windows[candle.symbol].inputs()).probabilities[0]
        direction, confidence = decide(alone)
        assert signal.direction is direction
        assert signal.confidence == pytest.approx(confidence, abs=1e-6)
        assert signal.signal_id == signal_id(model.version, candle)
        assert signal.price == candle.close
        assert signal.created_at_ms == 123
        assert signal.candle_open_time_ms == candle.open_time_ms
    np.testing.assert_allclose(batch.prediction.probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_a_live_candles_signal_is_as_old_as_the_candle_and_others_are_stamped_when_made(
    model: SignalModel,
) -> None:
    # A live candle made into a signal late (back-filled after an outage, held in an outbox,
    # read after a restart) must not look fresh to execution's TTL; a venue clock ahead of
    # ours must not make a signal from the future. Synthetic and replayed times are not ours.
    steps = market(WINDOW)
    closes = steps[-1][0].close_time_ms + 1
    for source, now_ms, stamped in [
        (CandleSource.LIVE, closes + 180_000, closes),  # made 3 minutes after the close
        (CandleSource.LIVE, closes + 40, closes),
        (CandleSource.LIVE, closes - 5_000, closes - 5_000),  # the venue's clock is ahead
        (CandleSource.SYNTHETIC, closes + 180_000, closes + 180_000),
        (CandleSource.REPLAY, closes + 180_000, closes + 180_000),
    ]:
        maker = SignalMaker()
        last = None
        for group in steps:
            last = group[0].model_copy(update={"source": source})
            maker.accept(last)
        assert last is not None
        [signal] = maker.make([last], model, now_ms=now_ms).signals
        assert signal.created_at_ms == stamped, (source, now_ms)


def test_maker_when_candle_is_not_its_windows_newest_then_raises(model: SignalModel) -> None:
    maker = SignalMaker()
    steps = market(WINDOW + 2)
    for group in steps:
        for candle in group:
            maker.accept(candle)
    with pytest.raises(ValueError, match="newest"):
        maker.make([steps[-2][0]], model, now_ms=0)
    with pytest.raises(ValueError, match="one candle per symbol"):
        maker.make([steps[-1][0], steps[-1][0]], model, now_ms=0)


def candle(symbol: str, minute: int) -> Candle:
    return Candle(
        symbol=symbol,
        interval="1m",
        open_time_ms=minute * 60_000,
        close_time_ms=minute * 60_000 + 59_999,
        open=Decimal(100),
        high=Decimal(101),
        low=Decimal(99),
        close=Decimal(100),
        volume=Decimal(1),
        source=CandleSource.REPLAY,
    )


def feed(batcher: CandleBatcher, candles: list[Candle]) -> list[list[tuple[str, int]]]:
    """Batches that came out, as (symbol, minute) lists."""
    out = []
    for c in candles:
        for batch in (batcher.complete_before(c), batcher.add(c)):
            if batch:
                out.append([(b.symbol, b.open_time_ms // 60_000) for b in batch])
    return out


def test_batcher_when_every_symbol_delivers_then_one_batch_per_close_time_without_timer() -> None:
    batcher = CandleBatcher()
    first = feed(batcher, [candle(s, 0) for s in SYMBOLS])
    # At the start nothing is expected yet: each candle goes alone.
    assert first == [[("BTCUSDT", 0)], [("ETHUSDT", 0)], [("SOLUSDT", 0)]]
    later = feed(batcher, [candle(s, m) for m in (1, 2) for s in SYMBOLS])
    assert later == [[(s, m) for s in SYMBOLS] for m in (1, 2)]
    assert batcher.pending == 0


def test_batcher_when_a_symbol_is_missing_then_the_timer_or_the_next_time_flushes() -> None:
    batcher = CandleBatcher()
    feed(batcher, [candle(s, m) for m in (0, 1) for s in SYMBOLS])
    assert feed(batcher, [candle("BTCUSDT", 2), candle("ETHUSDT", 2)]) == []
    assert batcher.pending == 2
    assert [(c.symbol, c.open_time_ms) for c in batcher.due()] == [
        ("BTCUSDT", 120_000),
        ("ETHUSDT", 120_000),
    ]
    # SOL skipped minute 2, so minute 3 does not wait for it.
    assert feed(batcher, [candle("BTCUSDT", 3), candle("ETHUSDT", 3)]) == [
        [("BTCUSDT", 3), ("ETHUSDT", 3)]
    ]


def test_batcher_when_newer_candle_arrives_then_pending_batch_completes_first() -> None:
    batcher = CandleBatcher()
    feed(batcher, [candle(s, m) for m in (0, 1) for s in SYMBOLS])
    out = feed(batcher, [candle("BTCUSDT", 2), candle("BTCUSDT", 3)])
    assert out[0] == [("BTCUSDT", 2)]


def test_batcher_when_add_skips_complete_before_then_raises() -> None:
    with pytest.raises(ValueError, match="complete_before"):
        CandleBatcher().add(candle("BTCUSDT", 0))


def test_the_live_feeds_default_warm_up_is_the_shipped_models_window() -> None:
    from qtrader.commands.workers import WARMUP_CANDLES

    assert WARMUP_CANDLES == WINDOW  # fewer: the first live candles make no signal
