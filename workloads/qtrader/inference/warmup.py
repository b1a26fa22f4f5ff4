"""The candles a restarted inference needs before its first signal, read from the MARKET stream.

A feature window holds the last ``WINDOW`` candles of a symbol. After a restart the durable
consumer delivers every candle after its ack floor (the candles acknowledged, whose signals are
published); the window must then hold what an uninterrupted run's would hold at that point: the
last ``WINDOW`` candles of the symbol at or before the ack floor. Taking later candles instead
would make the ones delivered again look old (a window ignores them) and lose their signals.

The stream interleaves every symbol, so the last ``WINDOW`` of one symbol lie somewhere before
the ack floor; the search reads backwards in growing steps until it has them or reaches the
stream's start. Each read asks the server for that symbol's messages only.
"""

from __future__ import annotations

from collections.abc import Iterable

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import Candle

_GROWTH = 4  # each miss looks this many times further back


async def candles_to_warm(
    bus: Bus, consumer: subjects.ConsumerSpec, symbols: Iterable[str], *, window: int
) -> list[Candle]:
    """The last ``window`` candles of each symbol that ``consumer`` has acknowledged, each
    symbol's oldest first; none when it has acknowledged nothing yet."""
    through = await bus.acked_through(consumer)
    if through == 0:
        return []
    symbols = tuple(symbols)
    candles: list[Candle] = []
    for symbol in symbols:
        candles += await _last_stored(
            bus, symbol, through=through, count=window, lookback=2 * window * len(symbols)
        )
    return candles


async def _last_stored(
    bus: Bus, symbol: str, *, through: int, count: int, lookback: int
) -> list[Candle]:
    """The last ``count`` candles of ``symbol`` with a stream sequence up to ``through``."""
    subject = subjects.candle_subject(symbol)
    while True:
        start = max(1, through - lookback + 1)
        found = await bus.stored_messages(
            subjects.MARKET, subject, Candle, from_sequence=start, to_sequence=through
        )
        if len(found) >= count or start == 1:
            return found[-count:]
        lookback *= _GROWTH
