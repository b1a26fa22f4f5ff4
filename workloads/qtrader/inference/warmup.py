"""What a restarted inference reads from the MARKET stream before it consumes: its windows' past
and the candles a dead worker was still handling.

A feature window holds the last ``WINDOW`` candles of a symbol. At a restart the durable consumer
stands at its ack floor: every candle through it is acknowledged, so its signal is published.
The window must hold what an uninterrupted run's would hold at that point, the last ``WINDOW``
candles of the symbol through the ack floor (``Warmup.window``). Later candles would not do:
the ones delivered again would then look old to the window, which ignores them, and their
signals would be lost.

Candles after the ack floor that the consumer had handed out already (to the worker that died)
come again only when their ack wait ends, after newer ones: the window would have moved past
them and their signals would be lost too. So they are read here (``Warmup.in_flight``) and
handled first; when the consumer redelivers them later they are old and make nothing twice.
A running worker whose connection died is in the same place: what the server handed out as
the connection went never arrived. It reads them (``read_in_flight``) before it goes on.

The stream interleaves every symbol, so the last ``WINDOW`` of one symbol lie somewhere before
the ack floor: the search reads backwards in growing steps until it has them or reaches the
stream's start. Each read asks the server for that symbol's messages only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from qtrader.bus.nats_bus import Bus, ConsumerPosition
from qtrader.contracts import subjects
from qtrader.contracts.messages import Candle

_GROWTH = 4  # each miss looks this many times further back


@dataclass(frozen=True, kw_only=True)
class Warmup:
    window: list[Candle]  # each symbol's last candles through the ack floor, oldest first
    in_flight: list[Candle]  # handed out after the ack floor, in stream order


async def read_warmup(
    bus: Bus, consumer: subjects.ConsumerSpec, symbols: Iterable[str], *, window: int
) -> Warmup:
    """What ``consumer`` (on the MARKET stream) had acknowledged and had in flight."""
    position = await bus.consumer_position(consumer)
    through = position.acked_through
    symbols = tuple(symbols)
    past: list[Candle] = []
    if through:
        for symbol in symbols:
            lookback = 2 * window * len(symbols)
            past += await _last_stored(
                bus, symbol, through=through, count=window, lookback=lookback
            )
    return Warmup(window=past, in_flight=await _handed_out(bus, consumer, position))


async def read_in_flight(bus: Bus, consumer: subjects.ConsumerSpec) -> list[Candle]:
    """The candles ``consumer`` handed out and has not had acknowledged, in stream order."""
    return await _handed_out(bus, consumer, await bus.consumer_position(consumer))


async def _handed_out(
    bus: Bus, consumer: subjects.ConsumerSpec, position: ConsumerPosition
) -> list[Candle]:
    if position.delivered_through <= position.acked_through:
        return []
    return await bus.stored_messages(
        subjects.MARKET,
        consumer.filter_subject,
        Candle,
        from_sequence=position.acked_through + 1,
        to_sequence=position.delivered_through,
    )


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
