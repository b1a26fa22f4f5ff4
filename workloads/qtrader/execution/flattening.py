"""Closing every position when a trip asks for it (``flattenOnTrip``), round after round.

A trip that flattens sends, per open position, a reduce-only intent for all of it (round 0) as
the latch arrives. That order is a LIMIT IOC inside the policy's slippage bound around the last
mark (``orders.attempt_order``): on a thin book it fills in part, and in a fast market the price
may have left the bound before it arrives, so one order can leave part or all of a position
open, exactly when a stop was asked to close it. So, while the trip is in force, each later
round sends what the one before left, priced at the newest mark, once nothing for the symbol is
in flight any more (the round before ended and its fills are in the book), up to
``FLATTEN_ROUNDS`` orders per position within ``FLATTEN_WITHIN_S`` of the trip. What is still
open after that is reported (``unfinished``: the worker's ``/health`` is DEGRADED and
``qtrader_flatten_unfinished_positions`` counts it), never left silently.

Every replica runs this on the same streams, so they choose the same round for a symbol and
make the same intent id: the stream keeps one intent per id and one replica sends it (the halt
gate lets exactly these through: ``decisions.flatten_round``). A round is the next one nobody
recorded an attempt or an end of (``ExposureBook.knows``); until the sender's first update is
read back, the same round is published again, which the stream drops as a duplicate.
"""

from __future__ import annotations

from decimal import Decimal
from typing import NamedTuple

from qtrader.contracts.messages import HaltLatch, OrderIntent, OrderType, Side
from qtrader.execution.decisions import FLATTEN_ROUNDS, client_order_id_for, flatten_intent_id
from qtrader.execution.exposure import ExposureBook

# A flattening latch older than this is not acted on: a worker starting while an old trip is
# in force does not send from positions it is still reading; the trip's own workers did.
FLATTEN_WITHIN_S = 60.0
FLATTEN_ROUND_S = 1.0  # how often the remainders of a flattening trip are looked at


class Due(NamedTuple):
    """One order a flattening trip needs now: ``position`` of ``symbol`` to close."""

    symbol: str
    position: Decimal
    round_: int


class Flattening:
    """What a flattening trip still has to close, and what it could not (one per worker)."""

    def __init__(self, book: ExposureBook) -> None:
        self._book = book
        self._revision: int | None = None  # the trip ``unfinished`` is about
        # Positions left open when their rounds were spent or the trip too old to act on.
        self.unfinished: dict[str, Decimal] = {}

    def first_round(self, latch: HaltLatch) -> list[Due]:
        """Every open position as the trip arrives (fills not read yet are the next rounds')."""
        self._follow(latch)
        return [Due(s, q, 0) for s, q in sorted(self._book.positions().items())]

    def next_rounds(self, latch: HaltLatch, *, now_ms: int) -> list[Due]:
        """The rounds due now for the flattening trip ``latch``; what cannot be closed any more
        goes to ``unfinished``."""
        self._follow(latch)
        too_old = now_ms - latch.issued_at_ms > FLATTEN_WITHIN_S * 1000
        due: list[Due] = []
        for symbol, position in sorted(self._book.positions().items()):
            if too_old:  # open, whatever is still in flight (an order left UNKNOWN, say)
                self.unfinished[symbol] = position
            elif self._book.busy(symbol):
                continue  # what is in flight may still fill: the rest is known after it
            elif (round_ := self._next_round(latch.revision, symbol)) is None:
                self.unfinished[symbol] = position
            else:
                due.append(Due(symbol, position, round_))
        for symbol in list(self.unfinished):
            if self._book.position(symbol) == 0:  # closed after all (a late fill, by hand)
                del self.unfinished[symbol]
        return due

    def clear(self) -> None:
        """No trip asks to flatten now."""
        self._revision, self.unfinished = None, {}

    def _follow(self, latch: HaltLatch) -> None:
        if latch.revision != self._revision:
            self._revision, self.unfinished = latch.revision, {}

    def _next_round(self, revision: int, symbol: str) -> int | None:
        """The first round nobody recorded an attempt or an end of; None when all are spent."""
        for round_ in range(FLATTEN_ROUNDS):
            if not self._book.knows(flatten_intent_id(revision, symbol, round_)):
                return round_
        return None


def flatten_intent(
    latch: HaltLatch, due: Due, mark: Decimal, policy_revision: int, *, now_ms: int
) -> OrderIntent:
    """The reduce-only intent of round ``due.round_`` that closes ``due.position``."""
    intent_id = flatten_intent_id(latch.revision, due.symbol, due.round_)
    return OrderIntent(
        intent_id=intent_id,
        client_order_id=client_order_id_for(intent_id),
        symbol=due.symbol,
        side=Side.SELL if due.position > 0 else Side.BUY,
        quantity=abs(due.position),
        order_type=OrderType.MARKET,
        reduce_only=True,
        reference_price=mark,
        policy_revision=policy_revision,
        created_at_ms=now_ms,
    )
