"""Flat candles (open = high = low = close), the market a test, a stress scenario or a benchmark
feeds when only the price and the time matter."""

from __future__ import annotations

from decimal import Decimal

from qtrader.contracts.messages import Candle, CandleSource
from qtrader.marketdata.synthetic import INTERVAL_MS


def flat_candle(
    symbol: str,
    price: Decimal | str | int,
    *,
    open_time_ms: int,
    interval: str = "1m",
    volume: Decimal = Decimal(1),
    source: CandleSource = CandleSource.SYNTHETIC,
) -> Candle:
    """The closed ``interval`` candle of ``symbol`` opening at ``open_time_ms``, at ``price``."""
    close = Decimal(price)
    return Candle(
        symbol=symbol,
        interval=interval,
        open_time_ms=open_time_ms,
        close_time_ms=open_time_ms + INTERVAL_MS[interval] - 1,
        open=close,
        high=close,
        low=close,
        close=close,
        volume=volume,
        source=source,
    )
