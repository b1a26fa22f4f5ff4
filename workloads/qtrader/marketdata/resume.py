"""Where a restarted marketdata resumes: right after the last candle the MARKET stream stores.

The stream is the only memory marketdata has, so at every start it reads, per symbol, the first
and the last candle stored (``read_stored``: the candle subjects read from either end of the
stream until every symbol is found, a step's pack or a lone candle alike; a message that is no
candle is passed over and counted) and continues after the last:

* replay and live (``after_stored``): every candle at or before a symbol's last stored open
  time is dropped, so a replay goes on at the next row of its file and never stores a row twice;
* synthetic (``synthetic_continuation``): the seeded path is rebuilt from the symbol's first
  stored candle (the run's start) through the last one, and continues from there, so the
  candles after a restart are exactly those an uninterrupted run of the same seed makes. The
  rebuilt candle must equal the stored one; when it does not (the history aged out of the
  stream, or the seed, regime or interval changed), the symbol continues from its last stored
  close and the next open time on a path seeded the same way (its regimes start over there):
  deterministic for the seed and that candle, never a jump in price or time.

A symbol with nothing stored starts with the others (at the earliest next open time of the
stored symbols), or at the configured start when nothing is stored at all.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import Candle, CandleSource
from qtrader.instruments import ExchangeInfo
from qtrader.marketdata.synthetic import INTERVAL_MS, SyntheticConfig, SyntheticMarket

log = logging.getLogger(__name__)

_FIRST_SPAN = 64  # stream messages read first from either end: a step or a few of them
_GROWTH = 4  # each further span this many times longer


@dataclass(frozen=True, kw_only=True)
class StoredSpan:
    """The first and the last candle the stream stores for one symbol."""

    first: Candle
    last: Candle


async def read_stored(bus: Bus, symbols: Iterable[str]) -> dict[str, StoredSpan]:
    """Each symbol's stored span; a symbol with nothing stored is left out."""
    wanted = set(symbols)
    last = await _newest(bus, wanted)
    first = await _oldest(bus, set(last))
    return {
        symbol: StoredSpan(first=first.get(symbol, last[symbol]), last=last[symbol])
        for symbol in sorted(last)
    }


async def _newest(bus: Bus, symbols: set[str]) -> dict[str, Candle]:
    """The last candle stored of each of ``symbols`` that has one: read backwards from the
    stream's end in growing spans (a step's pack holds every symbol, so usually one message;
    something that is no candle, poison, is passed over and counted)."""
    newest: dict[str, Candle] = {}
    end = await bus.last_sequence(subjects.MARKET)
    span = _FIRST_SPAN
    while end >= 1 and newest.keys() < symbols:
        start = max(1, end - span + 1)
        for candle in await _stored(bus, start, end):
            if candle.symbol in symbols:
                newest[candle.symbol] = candle  # oldest first: the last one wins
        end, span = start - 1, span * _GROWTH
    return newest


async def _oldest(bus: Bus, symbols: set[str]) -> dict[str, Candle]:
    """The first candle stored of each of ``symbols``: read forwards from the stream's start
    in growing spans until every one is found (usually the first step)."""
    oldest: dict[str, Candle] = {}
    start, span = 1, _FIRST_SPAN
    last = await bus.last_sequence(subjects.MARKET)
    while start <= last and oldest.keys() < symbols:
        end = start + span - 1
        for candle in await _stored(bus, start, end):
            oldest.setdefault(candle.symbol, candle)
        start, span = end + 1, span * _GROWTH
    return oldest


async def _stored(bus: Bus, start: int, end: int) -> list[Candle]:
    return await bus.stored_messages(
        subjects.MARKET,
        subjects.all_of(subjects.CANDLE_PREFIX),
        Candle,
        from_sequence=start,
        to_sequence=end,
    )


def is_after_stored(candle: Candle, spans: Mapping[str, StoredSpan]) -> bool:
    """Whether ``candle`` opens after the last stored candle of its symbol."""
    span = spans.get(candle.symbol)
    return span is None or candle.open_time_ms > span.last.open_time_ms


def after_stored(candles: Iterable[Candle], spans: Mapping[str, StoredSpan]) -> Iterator[Candle]:
    """``candles`` without those at or before their symbol's last stored open time."""
    return (candle for candle in candles if is_after_stored(candle, spans))


def synthetic_continuation(
    config: SyntheticConfig, exchange: ExchangeInfo, spans: Mapping[str, StoredSpan]
) -> Iterator[Candle]:
    """The market of ``config`` from after what ``spans`` say is stored, in time order.

    Rebuilding a path draws every step since the run's start (about 10 µs a step), so call
    this off the event loop.
    """
    interval_ms = INTERVAL_MS[config.interval]
    next_opens = [span.last.open_time_ms + interval_ms for span in spans.values()]
    fresh = replace(config, start_ms=min(next_opens, default=config.start_ms))
    order = {symbol: index for index, symbol in enumerate(config.symbols)}
    paths = [
        _continue_symbol(replace(fresh, symbols=(symbol,)), exchange, spans.get(symbol))
        for symbol in config.symbols
    ]
    return heapq.merge(*paths, key=lambda candle: (candle.open_time_ms, order[candle.symbol]))


def _continue_symbol(
    config: SyntheticConfig, exchange: ExchangeInfo, span: StoredSpan | None
) -> Iterator[Candle]:
    """One symbol's candles after its stored span (``config`` names that symbol only)."""
    if span is None:
        return SyntheticMarket(config, exchange).candles()
    rebuilt = _rebuilt(config, exchange, span)
    if rebuilt is not None:
        return rebuilt
    (symbol,) = config.symbols
    log.warning(
        "the stored %s candles are not this seed's path from %d (aged out or another seed): "
        "continuing from the last stored close %s at %d",
        symbol,
        span.first.open_time_ms,
        span.last.close,
        span.last.open_time_ms,
    )
    after_last = replace(config, start_ms=span.last.open_time_ms + INTERVAL_MS[config.interval])
    return SyntheticMarket(after_last, exchange, start_closes={symbol: span.last.close}).candles()


def _rebuilt(
    config: SyntheticConfig, exchange: ExchangeInfo, span: StoredSpan
) -> Iterator[Candle] | None:
    """The seeded path started at the first stored candle, after the last stored one; None
    when it does not reproduce the last stored candle."""
    if span.last.source is not CandleSource.SYNTHETIC or span.last.interval != config.interval:
        return None
    steps, misaligned = divmod(
        span.last.open_time_ms - span.first.open_time_ms, INTERVAL_MS[config.interval]
    )
    if misaligned:
        return None
    from_first = replace(config, start_ms=span.first.open_time_ms)
    candles = SyntheticMarket(from_first, exchange).candles(first_step=steps)
    if next(candles) != span.last:
        return None
    return candles
