"""The exposure book: one owner of position and quantity in flight, changed in single steps."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from qtrader.contracts.messages import Fill, OrderIntent, OrderStatus, OrderType, OrderUpdate, Side
from qtrader.execution.decisions import attempt_client_order_id, client_order_id_for
from qtrader.execution.exposure import (
    Admitted,
    Attempt,
    ExposureBook,
    ExposureReason,
    PositionReconciler,
    Refused,
    SendLimits,
    admit_order,
    intent_expired,
    venue_differences,
)
from qtrader.instruments import Instrument

BTC = Instrument(
    symbol="BTCUSDT",
    tick_size=Decimal("0.1"),
    step_size=Decimal("0.001"),
    min_qty=Decimal("0.001"),
    min_notional=Decimal(5),
)
PRICE = Decimal(30000)
LIMITS = SendLimits(
    max_position_usd=Decimal(1000),
    max_open_positions=2,
    max_leverage=Decimal(3),
    equity=Decimal(10_000),
    marks={"BTCUSDT": PRICE, "ETHUSDT": Decimal(2000), "SOLUSDT": Decimal(100)},
    instrument=BTC,
)


def _cid(intent_id: str) -> str:
    return client_order_id_for(intent_id)


def _reserve(book: ExposureBook, intent_id: str, qty: str, symbol: str = "BTCUSDT") -> None:
    book.reserve(
        intent_id=intent_id,
        client_order_id=_cid(intent_id),
        symbol=symbol,
        signed_quantity=Decimal(qty),
        created_at_ms=1_000,
        local=True,
    )


def _fill(
    intent_id: str, qty: str, *, n: int = 0, attempt: int = 0, symbol: str = "BTCUSDT"
) -> Fill:
    quantity = Decimal(qty)
    return Fill(
        fill_id=f"f-{intent_id}-{attempt}-{n}",
        client_order_id=attempt_client_order_id(_cid(intent_id), attempt),
        symbol=symbol,
        side=Side.BUY if quantity > 0 else Side.SELL,
        quantity=abs(quantity),
        price=PRICE,
        fee=Decimal(0),
        ts_ms=1_000,
    )


def _attempt(intent_id: str, qty: str, *, reduce_only: bool = False, attempt: int = 0) -> Attempt:
    quantity = Decimal(qty)
    return Attempt(
        intent_id=intent_id,
        client_order_id=attempt_client_order_id(_cid(intent_id), attempt),
        symbol="BTCUSDT",
        side_sign=1 if quantity > 0 else -1,
        quantity=abs(quantity),
        limit_price=PRICE,
        reduce_only=reduce_only,
    )


def test_a_fill_moves_quantity_from_in_flight_to_position_in_one_step() -> None:
    book = ExposureBook()
    _reserve(book, "a", "0.03")
    book.apply_fill(_fill("a", "0.01"))
    assert book.position("BTCUSDT") == Decimal("0.01")
    assert book.in_flight("BTCUSDT") == Decimal("0.02")
    assert book.projected() == {"BTCUSDT": Decimal("0.03")}  # never 0.04: counted once


def test_a_fill_seen_twice_counts_once() -> None:
    book = ExposureBook()
    _reserve(book, "a", "0.03")
    assert book.apply_fill(_fill("a", "0.03"))
    assert not book.apply_fill(_fill("a", "0.03"))
    assert book.projected() == {"BTCUSDT": Decimal("0.03")}


def test_an_intent_ending_unfilled_releases_its_reservation_at_once() -> None:
    book = ExposureBook()
    _reserve(book, "a", "0.03")
    book.finish("a", filled=Decimal(0))
    assert book.in_flight("BTCUSDT") == 0
    assert book.backlog().size == 0


def test_a_final_update_before_its_fills_keeps_the_filled_part_in_flight_until_they_come() -> None:
    book = ExposureBook()
    _reserve(book, "a", "0.03")
    book.finish("a", filled=Decimal("0.02"))  # another replica's update, its fills not seen yet
    assert book.projected() == {"BTCUSDT": Decimal("0.02")}
    book.apply_fill(_fill("a", "0.02", attempt=1))  # a later attempt's fill, same stem
    assert book.projected() == {"BTCUSDT": Decimal("0.02")}
    assert book.in_flight("BTCUSDT") == 0


def test_another_replicas_pending_new_counts_in_flight_until_final_and_filled() -> None:
    book = ExposureBook()
    update = OrderUpdate(
        client_order_id=_cid("b"),
        intent_id="b",
        symbol="BTCUSDT",
        side=Side.SELL,
        status=OrderStatus.PENDING_NEW,
        quantity=Decimal("0.03"),
        filled_quantity=Decimal(0),
        avg_price=Decimal(0),
        exchange="binance",
        worker_id="other",
        ts_ms=1_000,
    )
    book.apply_update(update)
    assert book.was_sent("b")
    assert book.in_flight("BTCUSDT") == Decimal("-0.03")
    assert book.backlog().size == 0  # not decided here
    final = update.model_copy(
        update={"status": OrderStatus.FILLED, "filled_quantity": Decimal("0.03")}
    )
    book.apply_update(final)
    assert book.in_flight("BTCUSDT") == Decimal("-0.03")
    book.apply_fill(_fill("b", "-0.03"))
    assert book.in_flight("BTCUSDT") == 0
    assert book.position("BTCUSDT") == Decimal("-0.03")


def test_another_replicas_fill_seen_before_its_pending_new_is_counted_once() -> None:
    book = ExposureBook()
    book.apply_fill(_fill("b", "0.033"))  # FILLS and ORDERS are two streams: any order
    update = OrderUpdate(
        client_order_id=_cid("b"),
        intent_id="b",
        symbol="BTCUSDT",
        side=Side.BUY,
        status=OrderStatus.PENDING_NEW,
        quantity=Decimal("0.033"),
        filled_quantity=Decimal(0),
        avg_price=Decimal(0),
        exchange="binance",
        worker_id="other",
        ts_ms=1_000,
    )
    book.apply_update(update)
    assert book.projected() == {"BTCUSDT": Decimal("0.033")}


def test_an_intent_never_seen_sent_is_released_once_past_its_ttl_and_the_grace() -> None:
    book = ExposureBook()
    _reserve(book, "a", "0.03")  # created at 1,000
    assert book.release_unsendable(now_ms=7_000, ttl_ms=5_000, grace_ms=1_000) == []
    assert book.release_unsendable(now_ms=7_001, ttl_ms=5_000, grace_ms=1_000) == ["a"]
    assert book.backlog().size == 0
    assert book.in_flight("BTCUSDT") == 0


def test_an_order_is_cut_to_what_the_limit_leaves_at_its_limit_price() -> None:
    book = ExposureBook()
    _reserve(book, "a", "0.02")  # in flight, same side
    verdict = book.admit(_attempt("b", "0.033"), LIMITS)
    assert verdict == Admitted(Decimal("0.013"), ExposureReason.MAX_POSITION_USD, verdict.detail)
    assert book.in_flight("BTCUSDT") == Decimal("0.033")


def test_an_order_with_no_room_left_is_refused_with_the_limit_as_reason() -> None:
    book = ExposureBook()
    book.apply_fill(_fill("a", "0.033"))
    verdict = book.admit(_attempt("b", "0.01"), LIMITS)
    assert isinstance(verdict, Refused)
    assert verdict.reason is ExposureReason.MAX_POSITION_USD
    assert book.in_flight("BTCUSDT") == 0


def test_a_flip_sized_on_a_position_that_never_came_is_cut_to_the_limit() -> None:
    book = ExposureBook()
    _reserve(book, "a", "0.033")
    book.finish("a", filled=Decimal(0))  # the long never happened (IOC expired, 408, 502)
    verdict = book.admit(_attempt("b", "-0.066"), LIMITS)  # decided on +0.033
    assert isinstance(verdict, Admitted)
    assert verdict.quantity == Decimal("0.033")


def test_a_reduce_only_order_with_nothing_to_reduce_is_refused_not_sent() -> None:
    book = ExposureBook()
    verdict = book.admit(_attempt("b", "-0.033", reduce_only=True), LIMITS)
    assert verdict == Refused(ExposureReason.NOTHING_TO_REDUCE, verdict.detail)


def test_a_reduce_only_order_is_cut_to_the_position_less_other_reductions_in_flight() -> None:
    book = ExposureBook()
    book.apply_fill(_fill("a", "0.03"))
    _reserve(book, "c", "-0.01")
    verdict = book.admit(_attempt("b", "-0.03", reduce_only=True), LIMITS)
    assert isinstance(verdict, Admitted)
    assert verdict.quantity == Decimal("0.02")


def test_a_new_symbol_beyond_max_open_positions_is_refused() -> None:
    book = ExposureBook()
    book.apply_fill(_fill("e", "0.1", symbol="ETHUSDT"))
    _reserve(book, "s", "1", symbol="SOLUSDT")
    verdict = book.admit(_attempt("b", "0.01"), LIMITS)
    assert isinstance(verdict, Refused)
    assert verdict.reason is ExposureReason.MAX_OPEN_POSITIONS


def test_leverage_counts_the_other_symbols_worst_case() -> None:
    book = ExposureBook()
    _reserve(book, "s", "295", symbol="SOLUSDT")  # 29,500 of 30,000 buying power
    verdict = book.admit(_attempt("b", "0.033"), LIMITS)
    assert isinstance(verdict, Admitted)
    assert verdict.cut_by is ExposureReason.MAX_LEVERAGE
    assert verdict.quantity == Decimal("0.016")  # 500 of room at 30,000
    poorer = LIMITS._replace(equity=Decimal(9_830))
    verdict = book.admit(_attempt("c", "0.033"), poorer)
    assert isinstance(verdict, Refused)


def test_unknown_equity_refuses_anything_that_adds_exposure() -> None:
    book = ExposureBook()
    verdict = book.admit(_attempt("b", "0.01"), LIMITS._replace(equity=None))
    assert isinstance(verdict, Refused)
    assert verdict.reason is ExposureReason.NO_EQUITY


def test_an_intent_past_its_ttl_is_expired_with_its_age() -> None:
    assert intent_expired(created_at_ms=0, now_ms=5_000, ttl_ms=5_000) is None
    refused = intent_expired(created_at_ms=0, now_ms=5_001, ttl_ms=5_000)
    assert refused is not None
    assert refused.reason is ExposureReason.INTENT_EXPIRED
    assert "5001 ms old" in refused.detail


def test_the_backlog_counts_local_intents_until_final() -> None:
    book = ExposureBook()
    _reserve(book, "a", "0.01")
    book.reserve(
        intent_id="b",
        client_order_id=_cid("b"),
        symbol="BTCUSDT",
        signed_quantity=Decimal("0.01"),
        created_at_ms=500,
        local=True,
    )
    assert (book.backlog().size, book.backlog().oldest_created_ms) == (2, 500)
    book.finish("b", filled=Decimal("0.01"))  # final, fills pending: out of the backlog
    assert (book.backlog().size, book.backlog().oldest_created_ms) == (1, 1_000)


def test_a_difference_with_the_portfolio_is_reported_only_once_it_outlasts_the_grace() -> None:
    reconciler = PositionReconciler(grace_s=5)
    book = {"BTCUSDT": Decimal("0.03")}
    reconciler.observe(book=book, portfolio={}, now_s=0)
    assert reconciler.persistent(4.9) == []
    reconciler.observe(book=book, portfolio={}, now_s=5)
    [mismatch] = reconciler.persistent(5)
    assert (mismatch.symbol, mismatch.book, mismatch.other) == ("BTCUSDT", Decimal("0.03"), 0)
    reconciler.observe(book=book, portfolio=book, now_s=6)
    assert reconciler.persistent(100) == []


# --- random sequences -------------------------------------------------------------------------

_STEP = Decimal("0.001")
_op = st.tuples(
    st.sampled_from(["admit", "fill", "finish", "reduce"]),
    st.integers(min_value=0, max_value=5),  # which intent
    st.integers(min_value=1, max_value=80),  # quantity in steps
    st.booleans(),  # side
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, max_size=60))
def test_random_sequences_never_let_worst_case_exposure_pass_the_limit(
    ops: list[tuple[str, int, int, bool]],
) -> None:
    """Whatever admits, fills (never more than admitted) and finishes come in whatever order,
    the position plus every same-side quantity in flight stays within the limit, and releases
    are exact: once every intent is final and filled, nothing is in flight."""
    book = ExposureBook()
    admitted: dict[str, tuple[int, Decimal]] = {}  # intent -> (sign, admitted qty not filled)
    fills = 0
    limit_qty = LIMITS.max_position_usd / PRICE
    for op, n, steps, buy in ops:
        intent_id, qty = f"i{n}", steps * _STEP
        sign = 1 if buy else -1
        if op in ("admit", "reduce") and intent_id not in admitted:
            verdict = book.admit(
                _attempt(intent_id, str(sign * qty), reduce_only=op == "reduce"), LIMITS
            )
            if isinstance(verdict, Admitted):
                admitted[intent_id] = (sign, verdict.quantity)
        elif op == "fill" and intent_id in admitted and admitted[intent_id][1] > 0:
            sign, open_qty = admitted[intent_id]
            part = min(open_qty, qty)
            fills += 1
            book.apply_fill(_fill(intent_id, str(sign * part), n=fills))
            admitted[intent_id] = (sign, open_qty - part)
        elif op == "finish" and intent_id in admitted:
            book.finish(intent_id, filled=_filled(book, intent_id))
            del admitted[intent_id]
        for side in (1, -1):
            worst = book.position("BTCUSDT") + side * sum(
                (q for s, q in admitted.values() if s == side), Decimal(0)
            )
            assert abs(worst) <= limit_qty or abs(worst) <= abs(book.position("BTCUSDT"))
    for intent_id in list(admitted):
        book.finish(intent_id, filled=_filled(book, intent_id))
    assert book.in_flight("BTCUSDT") == 0
    assert book.projected().get("BTCUSDT", Decimal(0)) == book.position("BTCUSDT")


def _filled(book: ExposureBook, intent_id: str) -> Decimal:
    """What the fills applied so far filled of ``intent_id``, over all its attempts."""
    cids = (attempt_client_order_id(_cid(intent_id), n) for n in range(3))
    return sum((f.quantity for cid in cids for f in book.fills_of(cid)), Decimal(0))


def test_a_sell_is_valued_at_the_market_when_that_is_above_its_floor() -> None:
    """A SELL fills at or above its limit: valued at its floor, a short would be
    underestimated (a -0.010 leftover plus a full short reached 1.01x the limit)."""
    book = ExposureBook()
    book.apply_fill(_fill("a", "-0.001"))
    order = OrderIntent(
        intent_id="b",
        client_order_id=_cid("b"),
        symbol="BTCUSDT",
        side=Side.SELL,
        quantity=Decimal("0.033"),
        order_type=OrderType.LIMIT,
        limit_price=Decimal(29_700),  # the 100 bps floor
        reference_price=PRICE,
        policy_revision=1,
        created_at_ms=1_000,
    )
    verdict = admit_order(book, order, limits=LIMITS, now_ms=1_500, ttl_ms=5_000)
    assert isinstance(verdict, Admitted)
    assert verdict.quantity == Decimal("0.032")  # 0.033 fits at 29,700, not at 30,000


def test_an_order_past_its_ttl_is_refused_before_the_book_is_asked() -> None:
    order = OrderIntent(
        intent_id="b",
        client_order_id=_cid("b"),
        symbol="BTCUSDT",
        side=Side.BUY,
        quantity=Decimal("0.01"),
        reference_price=PRICE,
        policy_revision=1,
        created_at_ms=1_000,
    )
    verdict = admit_order(ExposureBook(), order, limits=LIMITS, now_ms=6_001, ttl_ms=5_000)
    assert isinstance(verdict, Refused)
    assert verdict.reason is ExposureReason.INTENT_EXPIRED


# --- the venue's positions against the book ----------------------------------------------------


def test_the_venue_may_hold_the_book_plus_any_part_of_what_is_in_flight_each_way() -> None:
    book = ExposureBook()
    _reserve(book, "a", "0.03")
    book.apply_fill(_fill("a", "0.01"))
    _reserve(book, "b", "-0.02")
    assert book.position_range("BTCUSDT") == (Decimal("-0.01"), Decimal("0.03"))
    assert book.position_range("ETHUSDT") == (Decimal(0), Decimal(0))


def test_a_venue_position_inside_either_range_agrees_and_one_outside_both_differs() -> None:
    book = {"BTCUSDT": Decimal("0.01")}
    before = {"BTCUSDT": (Decimal("0.01"), Decimal("0.03"))}  # a buy in flight at the read
    after = {"BTCUSDT": (Decimal("0.01"), Decimal("0.01"))}  # its fill applied since
    assert venue_differences({"BTCUSDT": Decimal("0.03")}, book, [before, after]) == {}
    outside = venue_differences({"BTCUSDT": Decimal("0.035")}, book, [before, after])
    assert outside == {"BTCUSDT": (Decimal("0.01"), Decimal("0.035"))}
    # A position only the venue knows (a manual trade), and one only the book knows.
    assert venue_differences({"ETHUSDT": Decimal("1")}, {}, [{}, {}]) == {
        "ETHUSDT": (Decimal(0), Decimal("1"))
    }
    assert venue_differences({}, book, [after, after]) == {"BTCUSDT": (Decimal("0.01"), Decimal(0))}


def test_a_killed_predecessors_pending_new_replayed_at_start_counts_in_flight_until_final() -> None:
    """A worker killed between sending and its final update: its successor (the same worker
    id) replays the PENDING_NEW and must count the order in flight, or it could send another
    on top of one that may be booked."""
    successor = ExposureBook()
    update = OrderUpdate(
        client_order_id=_cid("p"),
        intent_id="p",
        symbol="BTCUSDT",
        side=Side.BUY,
        status=OrderStatus.PENDING_NEW,
        quantity=Decimal("0.02"),
        filled_quantity=Decimal(0),
        avg_price=Decimal(0),
        exchange="binance",
        worker_id="me",
        ts_ms=1_000,
    )
    successor.apply_update(update)
    assert successor.in_flight("BTCUSDT") == Decimal("0.02")
    final = update.model_copy(update={"status": OrderStatus.EXPIRED})
    successor.apply_update(final)
    assert successor.in_flight("BTCUSDT") == 0


_any_op = st.tuples(
    st.sampled_from(["reserve", "admit", "fill", "finish", "forget", "release", "other"]),
    st.integers(min_value=0, max_value=5),  # which intent
    st.integers(min_value=1, max_value=80),  # quantity in steps
    st.booleans(),  # side
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_any_op, max_size=60))
def test_projected_read_after_every_change_is_the_position_plus_what_is_in_flight(
    ops: list[tuple[str, int, int, bool]],
) -> None:
    """Decisions read ``projected()`` once per signal and the book keeps it until something
    changes: read after every kind of change, in any order, it must equal what the position
    and the reservations say now (summed by ``in_flight``, its own walk)."""
    book = ExposureBook()
    fills = 0
    for op, n, steps, buy in ops:
        intent_id, qty = f"i{n}", (1 if buy else -1) * steps * _STEP
        if op == "reserve":
            _reserve(book, intent_id, str(qty))
        elif op == "admit":
            book.admit(_attempt(intent_id, str(qty)), LIMITS)
        elif op == "fill":
            fills += 1
            book.apply_fill(_fill(intent_id, str(qty), n=fills))
        elif op == "finish":
            book.finish(intent_id, filled=_filled(book, intent_id))
        elif op == "forget":
            book.forget(intent_id)
        elif op == "release":
            book.release_unsendable(now_ms=1_000 + steps * 100, ttl_ms=2_000, grace_ms=500)
        else:  # another replica's attempt, seen on ORDERS
            book.apply_update(_pending_new(f"o{n}", qty))
        projected = book.projected()
        assert projected.get("BTCUSDT", Decimal(0)) == book.position("BTCUSDT") + book.in_flight(
            "BTCUSDT"
        )


def _pending_new(intent_id: str, quantity: Decimal) -> OrderUpdate:
    return OrderUpdate(
        intent_id=intent_id,
        client_order_id=attempt_client_order_id(_cid(intent_id), 0),
        symbol="BTCUSDT",
        side=Side.BUY if quantity > 0 else Side.SELL,
        quantity=abs(quantity),
        status=OrderStatus.PENDING_NEW,
        filled_quantity=Decimal(0),
        avg_price=Decimal(0),
        exchange="binance",
        worker_id="other",
        ts_ms=1_000,
    )


def test_an_intent_is_left_unknown_until_a_later_update_of_any_worker_says_more() -> None:
    """What the worker an intent comes to asks: look it up (its latest update is UNKNOWN) or
    drive it. A replay of an UNKNOWN after the final update (this worker's own updates are
    applied at once, then again as the stream brings them back) leaves it ended."""
    book = ExposureBook()
    sent = _pending_new("i-1", Decimal("0.01"))
    book.apply_update(sent)
    assert not book.left_unknown("i-1")
    unknown = sent.model_copy(update={"status": OrderStatus.UNKNOWN})
    book.apply_update(unknown)
    assert book.left_unknown("i-1")
    assert book.unknown_count == 1
    partial = sent.model_copy(
        update={"status": OrderStatus.PARTIALLY_FILLED, "filled_quantity": Decimal("0.004")}
    )
    book.apply_update(partial)  # the venue answered after all: driven on by its sender
    assert not book.left_unknown("i-1")
    book.apply_update(unknown.model_copy(update={"filled_quantity": Decimal("0.004")}))
    assert book.left_unknown("i-1")
    final = partial.model_copy(update={"status": OrderStatus.CANCELED})
    book.apply_update(final)
    assert not book.left_unknown("i-1")
    assert book.unknown_count == 0
    book.apply_update(unknown)  # replayed after the final one
    assert not book.left_unknown("i-1")
    assert book.unknown_count == 0
