"""Flattening round by round: what each round sends, when it waits, and what it reports."""

from __future__ import annotations

from decimal import Decimal

from qtrader.contracts.messages import (
    Fill,
    HaltLatch,
    OrderStatus,
    OrderUpdate,
    Side,
    TradingState,
)
from qtrader.execution.decisions import FLATTEN_ROUNDS, client_order_id_for, flatten_intent_id
from qtrader.execution.exposure import ExposureBook
from qtrader.execution.flattening import FLATTEN_WITHIN_S, Due, Flattening, flatten_intent

SYMBOL = "BTCUSDT"
ISSUED_MS = 1_700_000_000_000
LATCH = HaltLatch(state=TradingState.HALTED, revision=7, issued_at_ms=ISSUED_MS, flatten=True)


def _fill(intent_id: str, signed: str, n: int = 0) -> Fill:
    quantity = Decimal(signed)
    return Fill(
        fill_id=f"f-{intent_id}-{n}",
        client_order_id=client_order_id_for(intent_id),
        symbol=SYMBOL,
        side=Side.BUY if quantity > 0 else Side.SELL,
        quantity=abs(quantity),
        price=Decimal(30_000),
        fee=Decimal(0),
        ts_ms=1,
    )


def _update(intent_id: str, status: OrderStatus, quantity: str, filled: str) -> OrderUpdate:
    return OrderUpdate(
        intent_id=intent_id,
        client_order_id=client_order_id_for(intent_id),
        worker_id="w",
        symbol=SYMBOL,
        side=Side.SELL,
        status=status,
        quantity=Decimal(quantity),
        filled_quantity=Decimal(filled),
        avg_price=Decimal(30_000) if Decimal(filled) else Decimal(0),
        exchange="binance",
        ts_ms=1,
    )


def _long_book(quantity: str = "0.03") -> ExposureBook:
    book = ExposureBook()
    book.apply_fill(_fill("opening", quantity))
    return book


def _round_ends(book: ExposureBook, round_: int, quantity: str, filled: str) -> None:
    """Round ``round_`` sent (PENDING_NEW), filled ``filled`` of ``quantity``, then final."""
    intent_id = flatten_intent_id(LATCH.revision, SYMBOL, round_)
    book.apply_update(_update(intent_id, OrderStatus.PENDING_NEW, quantity, "0"))
    if Decimal(filled):
        book.apply_fill(_fill(intent_id, f"-{filled}"))
    status = OrderStatus.FILLED if filled == quantity else OrderStatus.EXPIRED
    book.apply_update(_update(intent_id, status, quantity, filled))


def test_each_round_closes_what_the_one_before_left_once_it_has_ended() -> None:
    book = _long_book()
    flattening = Flattening(book)
    assert flattening.first_round(LATCH) == [Due(SYMBOL, Decimal("0.03"), 0)]
    # Round 0 not read back yet: the same round again (the stream drops the duplicate).
    assert flattening.next_rounds(LATCH, now_ms=ISSUED_MS) == [Due(SYMBOL, Decimal("0.03"), 0)]
    intent_id = flatten_intent_id(LATCH.revision, SYMBOL, 0)
    book.apply_update(_update(intent_id, OrderStatus.PENDING_NEW, "0.03", "0"))
    assert flattening.next_rounds(LATCH, now_ms=ISSUED_MS) == []  # in flight: wait for it
    book.apply_fill(_fill(intent_id, "-0.02"))
    book.apply_update(_update(intent_id, OrderStatus.CANCELED, "0.03", "0.02"))
    assert flattening.next_rounds(LATCH, now_ms=ISSUED_MS) == [Due(SYMBOL, Decimal("0.01"), 1)]
    _round_ends(book, 1, "0.01", "0.01")
    assert flattening.next_rounds(LATCH, now_ms=ISSUED_MS) == []
    assert flattening.unfinished == {}


def test_a_round_waits_while_its_fills_are_not_in_the_book() -> None:
    book = _long_book()
    flattening = Flattening(book)
    intent_id = flatten_intent_id(LATCH.revision, SYMBOL, 0)
    book.apply_update(_update(intent_id, OrderStatus.PENDING_NEW, "0.03", "0"))
    book.apply_update(_update(intent_id, OrderStatus.FILLED, "0.03", "0.03"))  # fills to come
    assert flattening.next_rounds(LATCH, now_ms=ISSUED_MS) == []
    book.apply_fill(_fill(intent_id, "-0.03"))
    assert flattening.next_rounds(LATCH, now_ms=ISSUED_MS) == []  # closed: nothing more


def test_when_every_round_is_spent_the_position_left_is_unfinished_until_it_closes() -> None:
    book = _long_book()
    flattening = Flattening(book)
    for round_ in range(FLATTEN_ROUNDS):
        [due] = flattening.next_rounds(LATCH, now_ms=ISSUED_MS)
        assert due.round_ == round_
        _round_ends(book, round_, "0.03", "0")
    assert flattening.next_rounds(LATCH, now_ms=ISSUED_MS) == []
    assert flattening.unfinished == {SYMBOL: Decimal("0.03")}
    book.apply_fill(_fill("by-hand", "-0.03"))
    flattening.next_rounds(LATCH, now_ms=ISSUED_MS)
    assert flattening.unfinished == {}


def test_a_trip_too_old_to_act_on_sends_nothing_and_reports_what_is_open() -> None:
    flattening = Flattening(_long_book())
    too_late = ISSUED_MS + int(FLATTEN_WITHIN_S * 1000) + 1
    assert flattening.next_rounds(LATCH, now_ms=too_late) == []
    assert flattening.unfinished == {SYMBOL: Decimal("0.03")}


def test_a_position_still_in_flight_when_the_trip_is_too_old_is_reported() -> None:
    book = _long_book()
    flattening = Flattening(book)
    intent_id = flatten_intent_id(LATCH.revision, SYMBOL, 0)
    book.apply_update(_update(intent_id, OrderStatus.PENDING_NEW, "0.03", "0"))
    book.apply_update(_update(intent_id, OrderStatus.UNKNOWN, "0.03", "0"))  # its sender gone
    assert flattening.next_rounds(LATCH, now_ms=ISSUED_MS) == []  # waits for it
    assert flattening.unfinished == {}
    too_late = ISSUED_MS + int(FLATTEN_WITHIN_S * 1000) + 1
    assert flattening.next_rounds(LATCH, now_ms=too_late) == []
    assert flattening.unfinished == {SYMBOL: Decimal("0.03")}


def test_a_newer_trip_or_none_forgets_what_the_last_one_left() -> None:
    flattening = Flattening(_long_book())
    too_late = ISSUED_MS + int(FLATTEN_WITHIN_S * 1000) + 1
    flattening.next_rounds(LATCH, now_ms=too_late)
    newer = LATCH.model_copy(update={"revision": 8, "issued_at_ms": too_late})
    assert flattening.next_rounds(newer, now_ms=too_late) == [Due(SYMBOL, Decimal("0.03"), 0)]
    assert flattening.unfinished == {}
    flattening.next_rounds(LATCH, now_ms=too_late)
    flattening.clear()
    assert flattening.unfinished == {}


def test_the_intent_of_a_round_is_reduce_only_against_the_position() -> None:
    intent = flatten_intent(
        LATCH, Due(SYMBOL, Decimal("-0.01"), 3), Decimal(29_000), 4, now_ms=ISSUED_MS
    )
    assert intent.intent_id == flatten_intent_id(7, SYMBOL, 3) == "flatten:7:BTCUSDT:3"
    assert intent.client_order_id == client_order_id_for(intent.intent_id)
    assert (intent.side, intent.quantity, intent.reduce_only) == (Side.BUY, Decimal("0.01"), True)
    assert (intent.reference_price, intent.policy_revision) == (Decimal(29_000), 4)
