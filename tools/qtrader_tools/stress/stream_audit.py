"""Audits of what the streams hold after a run: candles, signals, order intents, updates, fills.

Pure functions over the messages a scenario read back from the server, each returning counts
that a pass criterion compares with 0. Nothing here trusts the producers: a candle is missing
when its open time is absent between the first and the last stored for its symbol, a signal
when a candle past the model's warm-up has none, an order when an intent has no final update,
a fill when the updates say an intent filled more (or less) than the FILLS stream holds.

The natural id of each message (what a duplicate is) is what the system itself calls the same
event: a candle's symbol, interval and open time; a signal's id; an intent's id; an order
update's ``dedup_id`` (client order id, status, filled quantity); a fill's id.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal

from qtrader.contracts.messages import Candle, Fill, OrderIntent, OrderStatus, OrderUpdate, Signal
from qtrader.execution.exposure import stem_of

_UNIT_MS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_FINAL = frozenset(s for s in OrderStatus if s.is_final)
_FILLING = frozenset({OrderStatus.PARTIALLY_FILLED, OrderStatus.FILLED})
# Which status may follow which for one intent (its attempts' updates and its own, in stream
# order). None is the start: an intent recovered after a restart may begin past PENDING_NEW.
# PENDING_NEW may follow PENDING_NEW: an attempt that filled nothing is reported as
# PARTIALLY_FILLED at 0, and a second such report of the same intent has the same dedup id
# (client order id, status, filled quantity), so the stream keeps only the first.
_NEXT: dict[OrderStatus | None, frozenset[OrderStatus]] = {
    None: frozenset(OrderStatus),
    OrderStatus.PENDING_NEW: frozenset(OrderStatus),
    OrderStatus.NEW: _FINAL | {OrderStatus.PARTIALLY_FILLED, OrderStatus.UNKNOWN},
    OrderStatus.UNKNOWN: frozenset(OrderStatus) - {OrderStatus.PENDING_NEW},
    OrderStatus.PARTIALLY_FILLED: _FINAL | {OrderStatus.PENDING_NEW, OrderStatus.PARTIALLY_FILLED},
    **{final: frozenset() for final in _FINAL},  # nothing follows a final update
}


def interval_ms(interval: str) -> int:
    """``1m`` -> 60000; a ValueError names an interval that is not ``<n><s|m|h|d|w>``."""
    match = re.fullmatch(r"(\d+)([smhdw])", interval)
    if match is None or int(match.group(1)) == 0:
        raise ValueError(f"not a candle interval: {interval!r} (expected e.g. 1m, 15m, 1h)")
    return int(match.group(1)) * _UNIT_MS[match.group(2)]


def duplicates(ids: Iterable[str]) -> int:
    """How many entries repeat an id seen before."""
    counts = Counter(ids)
    return sum(n - 1 for n in counts.values())


def _descents(values: Sequence[int]) -> int:
    """Positions where a value is below the one before it (stream order broken)."""
    return sum(1 for before, after in itertools.pairwise(values) if after < before)


# --- candles and signals --------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class CandleAudit:
    stored: dict[str, int]  # candles per symbol, as stored
    missing: int  # open times absent between each symbol's first and last
    duplicates: int
    out_of_order: int  # a symbol's open time below the previous one in stream order


def audit_candles(candles: Sequence[Candle]) -> CandleAudit:
    by_symbol: dict[str, list[Candle]] = defaultdict(list)
    for candle in candles:
        by_symbol[candle.symbol].append(candle)
    missing = out_of_order = 0
    for symbol_candles in by_symbol.values():
        step = interval_ms(symbol_candles[0].interval)
        times = [c.open_time_ms for c in symbol_candles]
        unique = set(times)
        missing += (max(unique) - min(unique)) // step + 1 - len(unique)
        out_of_order += _descents(times)
    return CandleAudit(
        stored={s: len(c) for s, c in sorted(by_symbol.items())},
        missing=missing,
        duplicates=duplicates(c.dedup_id for c in candles),
        out_of_order=out_of_order,
    )


@dataclass(frozen=True, kw_only=True)
class SignalAudit:
    expected: int  # candles past the warm-up, one signal each
    stored: int
    missing: int  # such candles without a signal
    unexplained: int  # signals for no stored candle past the warm-up
    duplicates: int
    out_of_order: int  # a symbol's candle time below the previous one in stream order


def audit_signals(
    candles: Sequence[Candle], signals: Sequence[Signal], *, window: int
) -> SignalAudit:
    """One signal per candle from each symbol's ``window``-th on (the first full window)."""
    if window < 1:
        raise ValueError(f"window must be at least 1 candle, got {window}")
    expected: set[tuple[str, int]] = set()
    for symbol in {c.symbol for c in candles}:
        times = sorted({c.open_time_ms for c in candles if c.symbol == symbol})
        expected.update((symbol, t) for t in times[window - 1 :])
    made = {(s.symbol, s.candle_open_time_ms) for s in signals}
    by_symbol: dict[str, list[int]] = defaultdict(list)
    for signal in signals:
        by_symbol[signal.symbol].append(signal.candle_open_time_ms)
    return SignalAudit(
        expected=len(expected),
        stored=len(signals),
        missing=len(expected - made),
        unexplained=len(made - expected),
        duplicates=duplicates(s.signal_id for s in signals),
        out_of_order=sum(_descents(times) for times in by_symbol.values()),
    )


# --- orders and fills -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class OrderAudit:
    intents: int
    updates: int
    fills: int
    filled_intents: int  # intents whose final update is FILLED
    without_final: int  # intents with no final update
    orphan_updates: int  # updates of an intent the stream does not hold
    orphan_fills: int  # fills of no known order (attempt) of any intent
    fills_without_update: int  # fills whose client order id no order update carries
    extra_finals: int  # final updates of an intent beyond its first (one final per intent)
    fill_mismatches: int  # intents whose updates and fills disagree on the quantity filled
    illegal_order: int  # intents whose updates are not in a legal state order
    duplicates: int  # intents, updates and fills repeating a natural id


def audit_orders(
    intents: Sequence[OrderIntent], updates: Sequence[OrderUpdate], fills: Sequence[Fill]
) -> OrderAudit:
    """Every intent driven to one final state, its updates in order, its fills all there."""
    known = {i.intent_id for i in intents}
    by_intent: dict[str, list[OrderUpdate]] = defaultdict(list)
    for update in updates:
        by_intent[update.intent_id].append(update)
    owner = {i.client_order_id: i.intent_id for i in intents}
    updated = {u.client_order_id: u.intent_id for u in updates}  # attempts' own ids
    owner.update(updated)
    filled: dict[str, Decimal] = defaultdict(Decimal)
    orphan_fills = 0
    for fill in fills:
        intent_id = owner.get(fill.client_order_id)
        if intent_id is None or intent_id not in known:
            orphan_fills += 1
        else:
            filled[intent_id] += fill.quantity
    finals = {i: [u for u in us if u.status in _FINAL] for i, us in by_intent.items()}
    return OrderAudit(
        intents=len(intents),
        updates=len(updates),
        fills=len(fills),
        filled_intents=sum(
            1 for i in known if any(u.status is OrderStatus.FILLED for u in finals.get(i, []))
        ),
        without_final=sum(1 for i in known if not finals.get(i)),
        orphan_updates=sum(len(us) for i, us in by_intent.items() if i not in known),
        orphan_fills=orphan_fills,
        fills_without_update=sum(1 for f in fills if f.client_order_id not in updated),
        extra_finals=sum(max(0, len(us) - 1) for us in finals.values()),
        fill_mismatches=sum(
            1 for i in known if _reported_filled(by_intent.get(i, [])) != filled.get(i, Decimal(0))
        ),
        illegal_order=sum(1 for i in known if not legal_order(by_intent.get(i, []))),
        duplicates=duplicates(i.intent_id for i in intents)
        + duplicates(u.dedup_id for u in updates)
        + duplicates(f.fill_id for f in fills),
    )


def _reported_filled(updates: Sequence[OrderUpdate]) -> Decimal:
    """The quantity an intent's updates say it filled: the most any of them reports."""
    return max((u.filled_quantity for u in updates), default=Decimal(0))


def legal_order(updates: Sequence[OrderUpdate]) -> bool:
    """One intent's updates, in stream order: each status may follow the one before it, exactly
    one final update and last, and the quantity filled never goes down (partial, then final)."""
    previous: OrderStatus | None = None
    reported = Decimal(0)
    for update in updates:
        if update.status not in _NEXT[previous]:
            return False
        if update.status in _FILLING or update.status in _FINAL:
            if update.filled_quantity < reported:
                return False
            reported = update.filled_quantity
        if update.status is OrderStatus.FILLED and update.filled_quantity != update.quantity:
            return False
        previous = update.status
    return previous in _FINAL


def paper_fill_order(fills: Iterable[Fill]) -> dict[str, int]:
    """The paper exchange's order of its fills: their times (it stamps each with the worker's
    clock when it fills), for ``fills_out_of_venue_order``."""
    return {f.fill_id: f.ts_ms for f in fills}


def fills_out_of_venue_order(
    fills: Sequence[Fill], updates: Sequence[OrderUpdate], venue_order: Mapping[str, int]
) -> int:
    """Fills that FILLS holds after a later fill of the same worker and symbol at the venue.

    ``venue_order`` places each fill id in the venue's order: a Binance trade id, a paper fill's
    time (fills absent from it are not judged). A worker sends no order until the fills of the
    one before are recorded, so each worker's fills of a symbol reach FILLS in the venue's
    order, which is the order a ledger must apply them in to split realized and unrealized PnL
    as the venue does. Two workers' fills may interleave: the worker is the one whose
    PENDING_NEW the order carries. An order whose outcome was unknown (the venue could not say
    whether it booked it) is not judged: the worker goes on trading, and its fills are recorded
    when a look-up finds them, after those of the orders sent meanwhile.
    """
    sender = {
        u.client_order_id: u.worker_id for u in updates if u.status is OrderStatus.PENDING_NEW
    }
    unknown = {stem_of(u.client_order_id) for u in updates if u.status is OrderStatus.UNKNOWN}
    latest: dict[tuple[str, str], int] = {}
    seen: set[str] = set()
    late = 0
    for fill in fills:
        place = venue_order.get(fill.fill_id)
        if place is None or fill.fill_id in seen or stem_of(fill.client_order_id) in unknown:
            continue  # not judged; or a copy, where the first one counts
        seen.add(fill.fill_id)
        key = (sender.get(fill.client_order_id, ""), fill.symbol)
        if place < latest.get(key, place):
            late += 1
        else:
            latest[key] = place
    return late
