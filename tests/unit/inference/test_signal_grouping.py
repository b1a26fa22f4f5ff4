"""How inference sends its signals: grouped as the stream stored the candles they came from.

A candle pack delivered again must make the very same signal pack (the stream then drops it as a
repeat), so the grouping may depend on nothing but the stored messages. A signal whose candle is
in no group of this fetch (its window took it in a fetch whose handling failed) is not lost.
"""

from __future__ import annotations

from decimal import Decimal

from qtrader.contracts import subjects
from qtrader.contracts.messages import Candle, CandleSource, Direction, Pack, Signal
from qtrader.inference.service import _grouped_as_candles

T0 = 1_700_000_000_000


def _candle(symbol: str, minute: int) -> Candle:
    return Candle(
        symbol=symbol,
        interval="1m",
        open_time_ms=T0 + minute * 60_000,
        close_time_ms=T0 + minute * 60_000 + 59_999,
        open="1",
        high="1",
        low="1",
        close="1",
        volume="1",
        source=CandleSource.SYNTHETIC,
    )


def _signal(candle: Candle) -> Signal:
    return Signal(
        signal_id=f"v:{candle.symbol}:{candle.open_time_ms}",
        symbol=candle.symbol,
        direction=Direction.LONG,
        confidence=0.6,
        model_version="v",
        candle_open_time_ms=candle.open_time_ms,
        price=Decimal(1),
        created_at_ms=T0,
    )


def test_a_packs_signals_go_in_one_pack_and_a_lone_candles_alone() -> None:
    step = [_candle(s, 0) for s in ("BTCUSDT", "ETHUSDT", "SOLUSDT")]
    lone = [_candle("BTCUSDT", 1)]
    signals = [_signal(c) for c in reversed(step + lone)]  # made in another order
    outgoing = _grouped_as_candles([step, lone], signals)
    assert outgoing == [
        (subjects.SIGNAL_STEP, Pack(tuple(_signal(c) for c in step))),
        (subjects.signal_subject("BTCUSDT"), _signal(lone[0])),
    ]


def test_a_group_with_one_signal_sends_it_alone_and_one_with_none_sends_nothing() -> None:
    """A window not yet full makes no signal: the same group makes the same message again."""
    step = [_candle(s, 0) for s in ("BTCUSDT", "ETHUSDT")]
    quiet = [_candle(s, 1) for s in ("BTCUSDT", "ETHUSDT")]
    outgoing = _grouped_as_candles([step, quiet], [_signal(step[1])])
    assert outgoing == [(subjects.signal_subject("ETHUSDT"), _signal(step[1]))]


def test_a_signal_of_no_group_goes_alone_first() -> None:
    earlier = _candle("BTCUSDT", 0)
    step = [_candle(s, 1) for s in ("BTCUSDT", "ETHUSDT")]
    outgoing = _grouped_as_candles([step], [_signal(earlier), *map(_signal, step)])
    assert outgoing == [
        (subjects.signal_subject("BTCUSDT"), _signal(earlier)),
        (subjects.SIGNAL_STEP, Pack(tuple(map(_signal, step)))),
    ]
