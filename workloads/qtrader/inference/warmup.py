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

The stream interleaves every symbol (a step's candles in one pack, or one by one), so the last
``WINDOW`` of a symbol lie somewhere before the ack floor: the search reads the consumer's
subjects backwards in growing spans until every symbol has them or it reaches the stream's start.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from qtrader.bus.nats_bus import Bus, ConsumerPosition
from qtrader.contracts import subjects
from qtrader.contracts.messages import Candle

_GROWTH = 4  # each miss looks this many times further back


@dataclass(frozen=True, kw_only=True)
class Warmup:
    window: list[Candle]  # each symbol's last candles through the ack floor, oldest first
    # Handed out after the ack floor, in stream order, as stored (a pack's candles together).
    in_flight: list[list[Candle]]


async def read_warmup(
    bus: Bus, consumer: subjects.ConsumerSpec, symbols: Iterable[str], *, window: int
) -> Warmup:
    """What ``consumer`` (on the MARKET stream) had acknowledged and had in flight."""
    position = await bus.consumer_position(consumer)
    through = position.acked_through
    past: list[Candle] = []
    if through:
        past = await _last_stored(
            bus, consumer.filter_subject, tuple(symbols), through=through, count=window
        )
    return Warmup(window=past, in_flight=await _handed_out(bus, consumer, position))


async def read_in_flight(bus: Bus, consumer: subjects.ConsumerSpec) -> list[list[Candle]]:
    """The candles ``consumer`` handed out and has not had acknowledged, in stream order."""
    return await _handed_out(bus, consumer, await bus.consumer_position(consumer))


async def _handed_out(
    bus: Bus, consumer: subjects.ConsumerSpec, position: ConsumerPosition
) -> list[list[Candle]]:
    if position.delivered_through <= position.acked_through:
        return []
    return await bus.stored_groups(
        subjects.MARKET,
        consumer.filter_subject,
        Candle,
        from_sequence=position.acked_through + 1,
        to_sequence=position.delivered_through,
    )


async def _last_stored(
    bus: Bus, subject: str, symbols: tuple[str, ...], *, through: int, count: int
) -> list[Candle]:
    """The last ``count`` candles of each of ``symbols`` stored on ``subject`` with a stream
    sequence up to ``through``, each symbol's oldest first.

    Read backwards in growing spans, each span once: a step in one pack holds every symbol, so
    ``count`` messages usually do; candles stored one by one need ``count`` per symbol."""
    found: list[Candle] = []
    end, span = through, count
    while True:
        start = max(1, end - span + 1)
        found[:0] = await bus.stored_messages(
            subjects.MARKET, subject, Candle, from_sequence=start, to_sequence=end
        )
        held = Counter(candle.symbol for candle in found)
        if start == 1 or all(held[symbol] >= count for symbol in symbols):
            break
        end, span = start - 1, span * _GROWTH
    wanted = set(symbols)
    kept: dict[str, list[Candle]] = {symbol: [] for symbol in symbols}
    for candle in found:
        if candle.symbol in wanted:
            kept[candle.symbol].append(candle)
    return [candle for symbol in symbols for candle in kept[symbol][-count:]]
