"""The exposure book: the one owner of each symbol's position and quantity in flight.

An execution worker keeps exactly one ``ExposureBook``. Everything that asks "how much of this
symbol do we hold, or may soon hold?" reads it: decisions (``projected``), the send-time check
(``admit``), the paper exchange's reduce-only check (``position``), flattening on a trip. It is
synchronous and does no I/O, so every change is one step with nothing interleaved:

* a fill adds to the position *and* takes the same quantity off its intent's reservation in the
  same call (``apply_fill``). Counting a fill in the position while its intent still counted in
  flight sized decisions on both, and let positions reach twice their limit;
* an intent that ends with less than it asked releases the rest at once (``finish``); what the
  final update says was filled stays reserved only until those fills are seen, so a position
  never counts neither;
* an attempt is admitted (``admit``) against the position, the quantity other intents have in
  flight and the policy's limits at the attempt's limit price (for a SELL, whose fill can be
  above its floor, the current price when that is higher), and its reservation becomes what it
  sends, in the same call.

Reservations are keyed by intent id and matched to fills by the client order id stem (the first
32 characters, shared by all attempts of an intent). An intent is reserved when this worker
decides it (``local``: it counts in the intent backlog until it is final), when this worker
admits an attempt of it, or when another replica's PENDING_NEW for it is seen on the ORDERS
stream. A reservation whose outcome is UNKNOWN is kept whole until the venue tells.

The admission check is worst case per direction: a BUY is checked against the position plus
every other *buy* in flight (a sell in flight may not fill), a SELL symmetrically. A reduce-only
attempt is admitted only up to what the actual position, less other reducing orders in flight,
still lets it reduce; with nothing to reduce it is refused (a venue would answer -2022).
Refusals and cuts are results with an ``ExposureReason`` (a bounded metric label), never
exceptions. The attempts and verdicts are named tuples: immutable, and made for every attempt
sent (a backtest makes tens of thousands), where a frozen dataclass costs twice as much.

``PositionReconciler`` compares the book with the portfolio's snapshots: a difference that
persists longer than a grace period (snapshots trail fills) is reported by symbol.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import NamedTuple

from qtrader.contracts.messages import Fill, OrderIntent, OrderStatus, OrderUpdate
from qtrader.instruments import Instrument

_ZERO = Decimal(0)
_STEM = 32  # client order ids of one intent's attempts share their first 32 characters


class ExposureReason(enum.StrEnum):
    """Why an attempt was refused or cut at send time; bounded, a metric label."""

    INTENT_EXPIRED = "intent_expired"
    MAX_POSITION_USD = "max_position_usd"
    MAX_OPEN_POSITIONS = "max_open_positions"
    MAX_LEVERAGE = "max_leverage"
    NO_EQUITY = "no_equity"
    NO_MARKET_PRICE = "no_market_price"
    NOTHING_TO_REDUCE = "nothing_to_reduce"
    BELOW_MIN_QTY = "below_min_qty"
    BELOW_MIN_NOTIONAL = "below_min_notional"


class SendLimits(NamedTuple):
    """The policy's limits and the world as the worker sees it at the moment of sending.

    ``marks`` value the other symbols' exposure for the leverage check; ``equity`` None means
    unknown (refused: fail closed). Buying power is ``max_leverage x equity``: the leverage
    check is the buying-power check. A named tuple, as ``Attempt``: one is made per attempt.
    """

    max_position_usd: Decimal
    max_open_positions: int
    max_leverage: Decimal
    equity: Decimal | None
    marks: Mapping[str, Decimal]
    instrument: Instrument


class Attempt(NamedTuple):
    """One order about to be sent: ``side_sign`` +1 buys; ``limit_price`` values it (the
    highest price it may fill at as far as the sender can tell: see ``admit_order``)."""

    intent_id: str
    client_order_id: str
    symbol: str
    side_sign: int
    quantity: Decimal
    limit_price: Decimal
    reduce_only: bool


class Admitted(NamedTuple):
    """Send ``quantity``; ``cut_by`` says which limit made it smaller than asked, if any."""

    quantity: Decimal
    cut_by: ExposureReason | None = None
    detail: str = ""


class Refused(NamedTuple):
    reason: ExposureReason
    detail: str


class Backlog(NamedTuple):
    """Intents this worker decided that are not final yet."""

    size: int
    oldest_created_ms: int | None


_NO_BACKLOG = Backlog(size=0, oldest_created_ms=None)


@dataclass
class _Reservation:
    symbol: str
    stem: str  # of its client order ids
    sign: int
    requested: Decimal  # absolute quantity this intent may still add, fills included
    filled: Decimal  # fills seen for it
    created_at_ms: int
    local: bool  # decided by this worker: part of its backlog until final
    final_filled: Decimal | None = None  # what its final update says filled

    @property
    def outstanding(self) -> Decimal:
        ceiling = self.requested if self.final_filled is None else self.final_filled
        return max(_ZERO, ceiling - self.filled)

    @property
    def settled(self) -> bool:
        return self.final_filled is not None and self.filled >= self.final_filled


def stem_of(client_order_id: str) -> str:
    return client_order_id[:_STEM]


@dataclass
class ExposureBook:
    # False for a book whose intents are each decided once and whose fills each come once (a
    # backtest's): no fill ids or fills are kept, and an intent leaves no trace once it is
    # settled, so the book holds what is in flight and nothing that grows with the run.
    keep_history: bool = True
    _positions: dict[str, Decimal] = field(default_factory=dict)
    _reservations: dict[str, _Reservation] = field(default_factory=dict)  # by intent id
    _intent_of_stem: dict[str, str] = field(default_factory=dict)
    _filled_by_stem: dict[str, Decimal] = field(default_factory=dict)
    _fills_by_order: dict[str, list[Fill]] = field(default_factory=dict)
    _seen_fills: set[str] = field(default_factory=set)
    _sent: set[str] = field(default_factory=set)  # intents with a PENDING_NEW on ORDERS
    _finished: set[str] = field(default_factory=set)  # intents whose final update was seen
    # Intents whose latest update is UNKNOWN, any worker's: the venue has not said yet what
    # became of them (their reservations stay whole meanwhile).
    _unknown: set[str] = field(default_factory=set)
    # ``projected()`` as last computed; None once a position or a reservation changed. Every
    # decision reads it, and most change nothing (a denial), where computing it afresh walks
    # every reservation: at a full backlog that was a tenth of the execution worker's time.
    _projected: Mapping[str, Decimal] | None = None

    # --- reading ------------------------------------------------------------------------------

    def position(self, symbol: str) -> Decimal:
        return self._positions.get(symbol, _ZERO)

    def positions(self) -> dict[str, Decimal]:
        return {s: q for s, q in self._positions.items() if q != 0}

    def in_flight(self, symbol: str, *, excluding: str | None = None) -> Decimal:
        """The signed quantity other intents have in flight for ``symbol``."""
        return sum(
            (
                r.sign * r.outstanding
                for i, r in self._reservations.items()
                if r.symbol == symbol and i != excluding
            ),
            _ZERO,
        )

    def busy(self, symbol: str) -> bool:
        """Whether an intent for ``symbol`` may still fill or has fills the book has not had."""
        return any(r.symbol == symbol for r in self._reservations.values())

    @property
    def idle(self) -> bool:
        """Nothing in flight: no intent, this worker's or another's, may still fill."""
        return not self._reservations

    def position_range(self, symbol: str) -> tuple[Decimal, Decimal]:
        """Where the venue's position in ``symbol`` may be now: the book's position, moved by
        any part of what is in flight (fills the venue made that FILLS has not brought yet),
        buys up and sells down."""
        low = high = self.position(symbol)
        for r in self._reservations.values():
            if r.symbol == symbol and r.outstanding:
                if r.sign > 0:
                    high += r.outstanding
                else:
                    low -= r.outstanding
        return low, high

    def projected(self) -> Mapping[str, Decimal]:
        """Position plus everything in flight, per symbol: what decisions size on (read it at
        once: with nothing in flight it is the positions themselves, not a copy)."""
        if not self._reservations:
            return self._positions
        if self._projected is None:
            projected = dict(self._positions)
            for r in self._reservations.values():
                projected[r.symbol] = projected.get(r.symbol, _ZERO) + r.sign * r.outstanding
            self._projected = projected
        return self._projected

    def fills_of(self, client_order_id: str) -> tuple[Fill, ...]:
        return tuple(self._fills_by_order.get(client_order_id, ()))

    def was_sent(self, intent_id: str) -> bool:
        """Whether any worker recorded an attempt of this intent (PENDING_NEW) on ORDERS."""
        return intent_id in self._sent

    def backlog(self) -> Backlog:
        if not self._reservations:
            return _NO_BACKLOG
        pending = [
            r.created_at_ms
            for r in self._reservations.values()
            if r.local and r.final_filled is None
        ]
        return Backlog(size=len(pending), oldest_created_ms=min(pending, default=None))

    # --- changing -----------------------------------------------------------------------------

    def reserve(
        self,
        *,
        intent_id: str,
        client_order_id: str,
        symbol: str,
        signed_quantity: Decimal,
        created_at_ms: int,
        local: bool,
    ) -> None:
        """Count an intent in flight; a second reservation of the same intent changes nothing.

        Fills of its stem already applied (another replica's fill can arrive before its
        PENDING_NEW: two streams) count against it: they are in the position already."""
        if self._reserved(intent_id):
            return
        self._changed()
        stem = stem_of(client_order_id)
        filled = self._filled_by_stem.get(stem, _ZERO)
        self._reservations[intent_id] = _Reservation(
            symbol=symbol,
            stem=stem,
            sign=1 if signed_quantity > 0 else -1,
            requested=abs(signed_quantity),
            filled=filled,
            created_at_ms=created_at_ms,
            local=local,
        )
        self._intent_of_stem[stem] = intent_id

    def apply_fill(self, fill: Fill) -> bool:
        """Add a fill to its position and take it off its intent's reservation, in one step.
        False for a fill already applied (fill ids are the venue's)."""
        if self.keep_history:
            if fill.fill_id in self._seen_fills:
                return False
            self._seen_fills.add(fill.fill_id)
            self._fills_by_order.setdefault(fill.client_order_id, []).append(fill)
        self._changed()
        self._positions[fill.symbol] = self.position(fill.symbol) + fill.quantity * fill.side.sign
        stem = stem_of(fill.client_order_id)
        self._filled_by_stem[stem] = self._filled_by_stem.get(stem, _ZERO) + fill.quantity
        intent_id = self._intent_of_stem.get(stem)
        reservation = self._reservations.get(intent_id) if intent_id else None
        if intent_id is not None and reservation is not None:
            reservation.filled += fill.quantity
            self._drop_if_settled(intent_id)
        return True

    def apply_update(self, update: OrderUpdate) -> None:
        """An update from the ORDERS stream, of any worker: an attempt counts in flight from its
        PENDING_NEW; a final update ends the intent's reservation.

        This worker's own attempts too: one it decided is reserved already (nothing changes),
        but one of a predecessor with its worker id (killed between sending and its final
        update, replayed at start) is not, and may be booked at the venue."""
        if update.status is OrderStatus.PENDING_NEW:
            self._sent.add(update.intent_id)
            if self._reserved(update.intent_id):
                return  # this worker's own attempt, reserved when it was decided or admitted
            self.reserve(
                intent_id=update.intent_id,
                client_order_id=update.client_order_id,
                symbol=update.symbol,
                signed_quantity=update.quantity * update.side.sign,
                created_at_ms=update.ts_ms,
                local=False,
            )
        elif update.status.is_final:
            self.finish(update.intent_id, filled=update.filled_quantity)
        if update.status is OrderStatus.UNKNOWN and update.intent_id not in self._finished:
            self._unknown.add(update.intent_id)
        elif update.status is not OrderStatus.UNKNOWN:
            self._unknown.discard(update.intent_id)

    def finish(self, intent_id: str, *, filled: Decimal) -> None:
        """The intent is final having filled ``filled``: the rest is released now; the filled
        part stays reserved until its fills are applied."""
        reservation = self._reservations.get(intent_id)
        if reservation is None and not self.keep_history:
            return
        self._finished.add(intent_id)
        if reservation is None:
            return
        self._changed()
        reservation.final_filled = filled
        self._drop_if_settled(intent_id)

    def left_unknown(self, intent_id: str) -> bool:
        """Whether the intent's latest update (any worker's) left its outcome UNKNOWN: it is
        to be looked up at the venue, never sent again."""
        return intent_id in self._unknown

    @property
    def unknown_count(self) -> int:
        """How many intents the venue has not yet said the outcome of."""
        return len(self._unknown)

    def ended(self, intent_id: str) -> bool:
        """Whether the intent has had its final update (this worker's, or another's replayed):
        one that comes again (its acknowledgement lost) is not driven again."""
        return intent_id in self._finished

    def knows(self, intent_id: str) -> bool:
        """Whether the intent is in flight, was sent, or ended: deciding it again adds nothing
        (the stream keeps one message per intent id)."""
        return (
            intent_id in self._reservations
            or intent_id in self._sent
            or (intent_id in self._finished)
        )

    def release_unsendable(self, *, now_ms: int, ttl_ms: int, grace_ms: int) -> list[str]:
        """Release this worker's intents that nobody recorded as sent and that can no longer
        be sent (past their time to live by more than ``grace_ms``, the time a PENDING_NEW
        takes to come back): an intent lost on its way (never consumed, or dropped as a
        duplicate by the stream) must not hold the backlog and the exposure forever."""
        stale = [
            intent_id
            for intent_id, r in self._reservations.items()
            if r.local
            and r.final_filled is None
            and intent_id not in self._sent
            and now_ms - r.created_at_ms > ttl_ms + grace_ms
        ]
        for intent_id in stale:
            self._changed()
            del self._reservations[intent_id]
        return stale

    def forget(self, intent_id: str) -> None:
        """An intent that never left this worker (its publication failed)."""
        self._changed()
        self._reservations.pop(intent_id, None)

    def admit(self, attempt: Attempt, limits: SendLimits) -> Admitted | Refused:
        """Check ``attempt`` against the book and the limits; if admitted, its intent's
        reservation becomes what is sent (on top of what it already filled)."""
        verdict = self._check(attempt, limits)
        if isinstance(verdict, Admitted):
            self._finished.discard(attempt.intent_id)  # a redelivered intent sending its rest
            reservation = self._reservations.get(attempt.intent_id)
            if reservation is None:  # not decided here, nor seen on ORDERS: reserved now
                self.reserve(
                    intent_id=attempt.intent_id,
                    client_order_id=attempt.client_order_id,
                    symbol=attempt.symbol,
                    signed_quantity=attempt.side_sign * verdict.quantity,
                    created_at_ms=0,
                    local=False,
                )
                reservation = self._reservations[attempt.intent_id]
            self._changed()
            reservation.requested = reservation.filled + verdict.quantity
        return verdict

    # --- internals ----------------------------------------------------------------------------

    def _changed(self) -> None:
        """Called before any change of a position or a reservation: what was projected is
        not any more."""
        self._projected = None

    def _reserved(self, intent_id: str) -> bool:
        """Whether ``reserve`` would change nothing for this intent: in flight, or ended."""
        return intent_id in self._reservations or intent_id in self._finished

    def _drop_if_settled(self, intent_id: str) -> None:
        reservation = self._reservations[intent_id]
        if not reservation.settled:
            return
        del self._reservations[intent_id]
        if not self.keep_history:
            self._sent.discard(intent_id)
            self._finished.discard(intent_id)
            self._intent_of_stem.pop(reservation.stem, None)
            self._filled_by_stem.pop(reservation.stem, None)

    def _worst(self, symbol: str, sign: int, excluding: str | None) -> Decimal:
        """The position if every other order in flight on ``sign``'s side fills."""
        same_side = sum(
            (
                r.outstanding
                for i, r in self._reservations.items()
                if r.symbol == symbol and r.sign == sign and i != excluding
            ),
            _ZERO,
        )
        return self.position(symbol) + sign * same_side

    def _check(self, attempt: Attempt, limits: SendLimits) -> Admitted | Refused:
        if attempt.reduce_only:
            return self._check_reduce(attempt, limits.instrument)
        if limits.equity is None or limits.equity <= 0:
            return Refused(ExposureReason.NO_EQUITY, "equity unknown: nothing adds exposure")
        refused = self._check_open_positions(attempt, limits.max_open_positions)
        if refused is not None:
            return refused
        room = self._leverage_room(attempt, limits)
        if isinstance(room, Refused):
            return room
        cap_usd, binding = limits.max_position_usd, ExposureReason.MAX_POSITION_USD
        if room < cap_usd:
            cap_usd, binding = room, ExposureReason.MAX_LEVERAGE
        return self._size(attempt, limits.instrument, cap_usd, binding)

    def _size(
        self, attempt: Attempt, instrument: Instrument, cap_usd: Decimal, binding: ExposureReason
    ) -> Admitted | Refused:
        """The largest quantity up to the asked one keeping |worst position| x limit price
        within ``cap_usd``; refused when that is below the instrument's minimums."""
        worst = self._worst(attempt.symbol, attempt.side_sign, attempt.intent_id)
        # How far the position may move on this side before |position| x price passes the cap.
        headroom = cap_usd / attempt.limit_price - attempt.side_sign * worst
        allowed = min(attempt.quantity, instrument.round_quantity(max(headroom, _ZERO)))
        if allowed < instrument.min_qty:
            reason = binding if allowed < attempt.quantity else ExposureReason.BELOW_MIN_QTY
            return Refused(reason, self._size_detail(attempt, cap_usd))
        if allowed * attempt.limit_price < instrument.min_notional:
            reason = binding if allowed < attempt.quantity else ExposureReason.BELOW_MIN_NOTIONAL
            return Refused(reason, self._size_detail(attempt, cap_usd))
        if allowed < attempt.quantity:
            detail = self._size_detail(attempt, cap_usd)
            return Admitted(allowed, binding, f"cut to {allowed}: {detail}")
        return Admitted(allowed)

    def _size_detail(self, attempt: Attempt, cap_usd: Decimal) -> str:
        """Why an attempt was cut or refused (made only then: it is most of an admission's
        cost, and most attempts fit)."""
        return (
            f"position {self.position(attempt.symbol)}, in flight "
            f"{self.in_flight(attempt.symbol, excluding=attempt.intent_id)}, order "
            f"{attempt.side_sign * attempt.quantity} at {attempt.limit_price}: cap {cap_usd:.2f}"
        )

    def _check_open_positions(self, attempt: Attempt, max_open: int) -> Refused | None:
        # Answered without gathering the symbols when it is certain: the attempt's symbol is
        # open already, or there are fewer positions and intents than the limit.
        if self.position(attempt.symbol) != 0:
            return None
        if len(self._positions) + len(self._reservations) < max_open:
            return None
        symbols = {s for s, q in self._positions.items() if q != 0}
        symbols |= {
            r.symbol
            for i, r in self._reservations.items()
            if r.outstanding > 0 and i != attempt.intent_id
        }
        if attempt.symbol in symbols or len(symbols) < max_open:
            return None
        return Refused(
            ExposureReason.MAX_OPEN_POSITIONS,
            f"{len(symbols)} symbols open or in flight ({', '.join(sorted(symbols))}), "
            f"at most {max_open}",
        )

    def _leverage_room(self, attempt: Attempt, limits: SendLimits) -> Decimal | Refused:
        """What ``max_leverage x equity`` leaves for this symbol after the others' worst case
        (each other symbol's position if all its buys in flight fill, or all its sells)."""
        assert limits.equity is not None  # checked by the caller
        buys, sells = self._in_flight_by_side(excluding_symbol=attempt.symbol)
        gross = _ZERO
        for symbol in sorted(
            (self._positions.keys() | buys.keys() | sells.keys()) - {attempt.symbol}
        ):
            held = self.position(symbol)
            worst = max(abs(held + buys.get(symbol, _ZERO)), abs(held - sells.get(symbol, _ZERO)))
            if worst == 0:
                continue
            mark = limits.marks.get(symbol)
            if mark is None or mark <= 0:
                return Refused(ExposureReason.NO_MARKET_PRICE, f"no price to value {symbol}")
            gross += worst * mark
        return limits.max_leverage * limits.equity - gross

    def _in_flight_by_side(
        self, *, excluding_symbol: str
    ) -> tuple[dict[str, Decimal], dict[str, Decimal]]:
        """Per symbol, what its buys and its sells in flight add up to: ``_worst`` of every
        symbol in one pass over the reservations (summed in the same order)."""
        buys: dict[str, Decimal] = {}
        sells: dict[str, Decimal] = {}
        for r in self._reservations.values():
            if r.symbol != excluding_symbol:
                side = buys if r.sign > 0 else sells
                side[r.symbol] = side.get(r.symbol, _ZERO) + r.outstanding
        return buys, sells

    def _check_reduce(self, attempt: Attempt, instrument: Instrument) -> Admitted | Refused:
        # A SELL reduces a long by what the other sells in flight leave of it (BUY: mirrored);
        # on the wrong side of the position, or past it, there is nothing left to reduce.
        worst = self._worst(attempt.symbol, attempt.side_sign, attempt.intent_id)
        reducible = max(_ZERO, -attempt.side_sign * worst)
        if reducible <= 0:
            return Refused(ExposureReason.NOTHING_TO_REDUCE, self._reduce_detail(attempt))
        allowed = min(attempt.quantity, instrument.round_quantity(reducible))
        if allowed < instrument.min_qty:
            return Refused(ExposureReason.NOTHING_TO_REDUCE, self._reduce_detail(attempt))
        if allowed < attempt.quantity:
            detail = self._reduce_detail(attempt)
            return Admitted(
                allowed, ExposureReason.NOTHING_TO_REDUCE, f"cut to {allowed}: {detail}"
            )
        return Admitted(allowed)

    def _reduce_detail(self, attempt: Attempt) -> str:
        position = self.position(attempt.symbol)
        return f"position {position}, reduce-only {attempt.side_sign * attempt.quantity}"


def intent_expired(*, created_at_ms: int, now_ms: int, ttl_ms: int) -> Refused | None:
    """An intent older than its time to live is never sent."""
    age_ms = now_ms - created_at_ms
    if age_ms <= ttl_ms:
        return None
    return Refused(ExposureReason.INTENT_EXPIRED, f"intent is {age_ms} ms old, ttl {ttl_ms} ms")


def admit_order(
    book: ExposureBook, order: OrderIntent, *, limits: SendLimits, now_ms: int, ttl_ms: int
) -> Admitted | Refused:
    """The send-time check of one attempt: its intent's age first, then the book."""
    expired = intent_expired(created_at_ms=order.created_at_ms, now_ms=now_ms, ttl_ms=ttl_ms)
    if expired is not None:
        return expired
    # A BUY never fills above its limit, but a SELL fills at or *above* its floor (at the
    # market): valued at its floor, a short would be underestimated. So the worst of the
    # limit, the decision's price and the current mark.
    prices = [order.limit_price or order.reference_price, order.reference_price]
    mark = limits.marks.get(order.symbol)
    if mark is not None:
        prices.append(mark)
    attempt = Attempt(
        intent_id=order.intent_id,
        client_order_id=order.client_order_id,
        symbol=order.symbol,
        side_sign=order.side.sign,
        quantity=order.quantity,
        limit_price=max(prices),
        reduce_only=order.reduce_only,
    )
    return book.admit(attempt, limits)


# --- the book against the portfolio's ledger --------------------------------------------------


@dataclass(frozen=True)
class Mismatch:
    symbol: str
    book: Decimal
    other: Decimal  # the other account's position: the portfolio's ledger, or the venue
    for_s: float


class PositionReconciler:
    """Differences between the book and another account of the positions (the portfolio's
    snapshots, the venue's reads) that outlast a grace period.

    A snapshot trails the fills the book has applied, so a difference is normal for a moment;
    one that is seen in every snapshot for ``grace_s`` is not: two ledgers drifted apart.
    """

    def __init__(self, *, grace_s: float) -> None:
        self._grace_s = grace_s
        self._since: dict[str, float] = {}
        self._figures: dict[str, tuple[Decimal, Decimal]] = {}

    def observe(
        self, *, book: Mapping[str, Decimal], portfolio: Mapping[str, Decimal], now_s: float
    ) -> None:
        differing = {
            s: (book.get(s, _ZERO), portfolio.get(s, _ZERO))
            for s in set(book) | set(portfolio)
            if book.get(s, _ZERO) != portfolio.get(s, _ZERO)
        }
        self.observe_differences(differing, now_s=now_s)

    def observe_differences(
        self, differing: Mapping[str, tuple[Decimal, Decimal]], *, now_s: float
    ) -> None:
        """The symbols that differ now (the book's figure, the other's); any other agrees."""
        self._since = {s: self._since.get(s, now_s) for s in differing}
        self._figures = dict(differing)

    def persistent(self, now_s: float) -> list[Mismatch]:
        return [
            Mismatch(symbol, *self._figures[symbol], for_s=now_s - since)
            for symbol, since in sorted(self._since.items())
            if now_s - since >= self._grace_s
        ]


def venue_differences(
    venue: Mapping[str, Decimal],
    book: Mapping[str, Decimal],
    ranges: Sequence[Mapping[str, tuple[Decimal, Decimal]]],
) -> dict[str, tuple[Decimal, Decimal]]:
    """The symbols whose venue position lies outside every range the book allowed around the
    venue's read (``ranges``: the book's ``position_range`` before and after it), each with
    (the book's position, the venue's). A fill in flight widens a range, so only a position
    the book cannot explain (a manual trade, a fill never published) differs."""
    differing = {}
    for symbol in set(venue).union(book, *ranges):
        held = venue.get(symbol, _ZERO)
        bounds = [r.get(symbol, (_ZERO, _ZERO)) for r in ranges]
        if not any(low <= held <= high for low, high in bounds):
            differing[symbol] = (book.get(symbol, _ZERO), held)
    return differing
