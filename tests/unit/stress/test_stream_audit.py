"""The stream audits of the broker-outage and ESS-lifecycle scenarios: each count must go up
when the streams show what it counts, so a 0 in a report means something."""

from __future__ import annotations

from decimal import Decimal

import pytest

from qtrader.contracts.messages import (
    AccountEntry,
    Candle,
    Direction,
    Fill,
    IncomeType,
    OrderIntent,
    OrderStatus,
    OrderUpdate,
    PortfolioSnapshot,
    PositionView,
    RefusedBy,
    Side,
    Signal,
)
from qtrader.execution.decisions import attempt_client_order_id, client_order_id_for
from qtrader_tools.candles import flat_candle
from qtrader_tools.exact import last_closes, ledger_mismatches
from qtrader_tools.stress.scenarios.broker_outage import recovered
from qtrader_tools.stress.scenarios.ess_lifecycle import (
    Cycle,
    filled_after_ack,
    first_fill_after_rearm_s,
    p99,
    refused_by_gate,
)
from qtrader_tools.stress.stream_audit import (
    audit_candles,
    audit_orders,
    audit_signals,
    fills_out_of_venue_order,
    interval_ms,
    legal_order,
)

T0 = 1_700_000_000_000
MINUTE = 60_000


def candle(index: int, symbol: str = "BTCUSDT", close: str = "100") -> Candle:
    return flat_candle(symbol, close, open_time_ms=T0 + index * MINUTE)


def signal(index: int, symbol: str = "BTCUSDT") -> Signal:
    return Signal(
        signal_id=f"m:{symbol}:{T0 + index * MINUTE}",
        symbol=symbol,
        direction=Direction.LONG,
        confidence=0.5,
        model_version="m",
        candle_open_time_ms=T0 + index * MINUTE,
        price=Decimal(100),
        created_at_ms=T0,
    )


# --- candles and signals ----------------------------------------------------------------------


def test_contiguous_candles_in_order_have_nothing_to_report() -> None:
    candles = [candle(i, s) for i in range(5) for s in ("BTCUSDT", "ETHUSDT")]
    audit = audit_candles(candles)
    assert audit.stored == {"BTCUSDT": 5, "ETHUSDT": 5}
    assert (audit.missing, audit.duplicates, audit.out_of_order) == (0, 0, 0)


def test_a_gap_a_repeat_and_a_step_back_are_each_counted() -> None:
    audit = audit_candles([candle(0), candle(1), candle(3), candle(3), candle(2)])
    assert audit.missing == 0  # 2 arrived, late
    assert audit.duplicates == 1
    assert audit.out_of_order == 1
    assert audit_candles([candle(0), candle(1), candle(4)]).missing == 2


def test_an_interval_that_is_not_one_is_refused() -> None:
    assert interval_ms("15m") == 15 * MINUTE
    with pytest.raises(ValueError, match="not a candle interval"):
        interval_ms("0m")
    with pytest.raises(ValueError, match="not a candle interval"):
        interval_ms("1y")


def test_one_signal_per_candle_from_the_first_full_window() -> None:
    candles = [candle(i) for i in range(6)]
    complete = audit_signals(candles, [signal(i) for i in range(2, 6)], window=3)
    assert (complete.expected, complete.missing, complete.unexplained) == (4, 0, 0)
    holes = audit_signals(candles, [signal(2), signal(4), signal(4), signal(1)], window=3)
    assert holes.missing == 2  # 3 and 5
    assert holes.unexplained == 1  # 1 is inside the warm-up
    assert holes.duplicates == 1
    assert holes.out_of_order == 1
    with pytest.raises(ValueError, match="window"):
        audit_signals(candles, [], window=0)


# --- orders and fills -------------------------------------------------------------------------


def intent(name: str, quantity: str = "0.010") -> OrderIntent:
    intent_id = f"sig-{name}"
    return OrderIntent(
        intent_id=intent_id,
        client_order_id=client_order_id_for(intent_id),
        symbol="BTCUSDT",
        side=Side.BUY,
        quantity=Decimal(quantity),
        reference_price=Decimal(100),
        policy_revision=1,
        created_at_ms=T0,
    )


def update(
    order: OrderIntent,
    status: OrderStatus,
    filled: str = "0",
    *,
    attempt: int | None = None,
    worker: str = "w1",
    ts_ms: int = T0,
    refused_by: RefusedBy | None = None,
) -> OrderUpdate:
    coid = order.client_order_id
    return OrderUpdate(
        client_order_id=coid if attempt is None else attempt_client_order_id(coid, attempt),
        intent_id=order.intent_id,
        symbol=order.symbol,
        side=order.side,
        status=status,
        quantity=order.quantity,
        filled_quantity=Decimal(filled),
        avg_price=Decimal(100) if Decimal(filled) else Decimal(0),
        exchange="paper",
        refused_by=refused_by,
        worker_id=worker,
        ts_ms=ts_ms,
    )


def fill(order: OrderIntent, quantity: str, *, attempt: int = 0, price: str = "100") -> Fill:
    coid = attempt_client_order_id(order.client_order_id, attempt)
    return Fill(
        fill_id=f"paper-{coid}-1",
        client_order_id=coid,
        symbol=order.symbol,
        side=order.side,
        quantity=Decimal(quantity),
        price=Decimal(price),
        fee=Decimal("0.0004"),
        ts_ms=T0,
    )


def test_fills_are_judged_in_the_venues_order_per_worker_and_symbol() -> None:
    first, second, other = intent("first"), intent("second"), intent("other")
    updates = [
        update(first, OrderStatus.PENDING_NEW),
        update(second, OrderStatus.PENDING_NEW),
        update(other, OrderStatus.PENDING_NEW, worker="w2"),
    ]
    a, b, c = fill(first, "0.010"), fill(second, "0.010"), fill(other, "0.010")
    trades = {a.fill_id: 1, b.fill_id: 2, c.fill_id: 3}
    assert fills_out_of_venue_order([a, b], updates, trades) == 0
    assert fills_out_of_venue_order([b, a], updates, trades) == 1
    assert fills_out_of_venue_order([b, a, a, b], updates, trades) == 1  # copies: the first
    # Another worker's trade may be recorded before an earlier one of this worker's; a fill
    # the venue did not make (a paper fill, another venue's) is not judged.
    assert fills_out_of_venue_order([c, a, b], updates, trades) == 0
    assert fills_out_of_venue_order([b, a], updates, {b.fill_id: 2}) == 0
    # An order whose outcome was unknown (any attempt of its intent) is recorded when a
    # look-up finds its fills.
    looked_up = [*updates, update(first, OrderStatus.UNKNOWN)]
    assert fills_out_of_venue_order([b, a], looked_up, trades) == 0


def test_an_intent_filled_over_two_attempts_is_in_order_with_its_fills() -> None:
    order = intent("a")
    updates = [
        update(order, OrderStatus.PENDING_NEW, attempt=0),
        update(order, OrderStatus.PARTIALLY_FILLED, "0.004"),
        update(order, OrderStatus.PENDING_NEW, attempt=1),
        update(order, OrderStatus.FILLED, "0.010"),
    ]
    fills = [fill(order, "0.004", attempt=0), fill(order, "0.006", attempt=1)]
    audit = audit_orders([order], updates, fills)
    assert audit.filled_intents == 1
    assert audit.without_final == audit.fill_mismatches == audit.illegal_order == 0
    assert audit.orphan_updates == audit.orphan_fills == audit.duplicates == 0


def test_what_goes_wrong_with_orders_is_counted() -> None:
    filled, open_, refused = intent("filled"), intent("open"), intent("refused")
    updates = [
        update(filled, OrderStatus.PENDING_NEW, attempt=0),
        update(filled, OrderStatus.FILLED, "0.010"),
        update(filled, OrderStatus.PENDING_NEW, attempt=0),  # repeated, and after the final
        update(open_, OrderStatus.PENDING_NEW, attempt=0),  # never finished
        update(refused, OrderStatus.REJECTED, refused_by=RefusedBy.HALT_GATE),
        update(intent("ghost"), OrderStatus.REJECTED),  # of an intent not in the stream
    ]
    fills = [fill(open_, "0.010"), fill(intent("stranger"), "0.010")]
    audit = audit_orders([filled, open_, refused], updates, fills)
    assert audit.without_final == 1
    assert audit.illegal_order == 2  # filled (a PENDING_NEW after its final), open (no final)
    assert audit.duplicates == 1
    assert audit.orphan_updates == 1
    assert audit.orphan_fills == 1
    assert audit.fill_mismatches == 2  # filled has no fill; open has one its updates deny


def test_a_retry_after_an_attempt_that_filled_nothing_is_legal() -> None:
    """The second "filled nothing" report has the first one's dedup id: the stream keeps one."""
    order = intent("retry")
    updates = [
        update(order, OrderStatus.PENDING_NEW, attempt=0),
        update(order, OrderStatus.PARTIALLY_FILLED, "0"),
        update(order, OrderStatus.PENDING_NEW, attempt=1),
        update(order, OrderStatus.PENDING_NEW, attempt=2),
        update(order, OrderStatus.EXPIRED),
    ]
    assert legal_order(updates)


def test_legal_order_wants_one_final_last_and_a_filled_quantity_that_never_shrinks() -> None:
    order = intent("x")
    pending = update(order, OrderStatus.PENDING_NEW, attempt=0)
    assert legal_order([pending, update(order, OrderStatus.EXPIRED)])
    assert not legal_order([pending])
    assert not legal_order([update(order, OrderStatus.FILLED, "0.010"), pending])
    assert not legal_order(
        [
            pending,
            update(order, OrderStatus.PARTIALLY_FILLED, "0.006"),
            update(order, OrderStatus.CANCELED, "0.004"),
        ]
    )
    assert not legal_order([pending, update(order, OrderStatus.FILLED, "0.004")])


# --- the ESS cycle's audit ----------------------------------------------------------------------


def test_a_fill_after_a_workers_ack_and_before_the_rearm_is_a_violation() -> None:
    order = intent("h")
    cycle = Cycle(number=1, trip_requested_ms=T0, acks_ms={"w1": T0 + 10}, rearm_ms=T0 + 2000)
    before = update(order, OrderStatus.FILLED, "0.010", ts_ms=T0 + 5)
    after = update(order, OrderStatus.FILLED, "0.010", ts_ms=T0 + 11)
    other_worker = update(order, OrderStatus.FILLED, "0.010", worker="w2", ts_ms=T0 + 11)
    rearmed = update(order, OrderStatus.FILLED, "0.010", ts_ms=T0 + 2001)
    assert filled_after_ack([before, rearmed], cycle) == 0
    assert filled_after_ack([before, after, rearmed], cycle) == 1
    assert filled_after_ack([other_worker], cycle) == 0  # w2 did not ack: not its window
    gate = update(order, OrderStatus.REJECTED, ts_ms=T0 + 50, refused_by=RefusedBy.HALT_GATE)
    assert refused_by_gate([gate, before], cycle) == 1
    assert first_fill_after_rearm_s([before, after, rearmed], cycle, T0 + 9000) == 0.001
    assert first_fill_after_rearm_s([before], cycle, T0 + 9000) is None


def test_p99_interpolates_between_ranks() -> None:
    assert p99([]) is None
    assert p99([1.0]) == 1.0
    assert p99([float(v) for v in range(101)]) == pytest.approx(99.0)


# --- the portfolio against the exact account ---------------------------------------------------


def snapshot(
    *, realized: str, fees: str, quantity: str, mark: str, fills: int
) -> PortfolioSnapshot:
    capital = Decimal(1000)
    unrealized = Decimal(0)
    equity = capital + Decimal(realized) - Decimal(fees) + unrealized
    return PortfolioSnapshot(
        sequence=1,
        ts_ms=T0,
        fills_applied=fills,
        initial_capital=capital,
        realized_pnl=Decimal(realized),
        unrealized_pnl=unrealized,
        fees=Decimal(fees),
        equity=equity,
        peak_equity=max(equity, capital),
        drawdown_pct=Decimal(0),
        max_drawdown_pct=Decimal(0),
        positions=(
            PositionView(
                symbol="BTCUSDT",
                quantity=Decimal(quantity),
                avg_entry_price=Decimal(0),
                mark_price=Decimal(mark),
                unrealized_pnl=Decimal(0),
                realized_pnl=Decimal(realized),
                fees=Decimal(fees),
            ),
        ),
    )


def test_the_snapshot_is_held_against_an_exact_account_of_the_fills() -> None:
    buy = intent("buy")
    sell = intent("sell").model_copy(update={"side": Side.SELL})
    fills = [fill(buy, "0.010", price="100"), fill(sell, "0.010", price="110")]
    marks = last_closes([candle(0, close="105"), candle(1, close="107")])
    assert marks == {"BTCUSDT": Decimal(107)}
    right = snapshot(realized="0.1", fees="0.0008", quantity="0", mark="107", fills=2)
    assert ledger_mismatches(right, fills, marks=marks, capital=Decimal(1000)) == []
    wrong = snapshot(realized="0.2", fees="0.0008", quantity="0.010", mark="107", fills=1)
    problems = ledger_mismatches(wrong, fills, marks=marks, capital=Decimal(1000))
    assert len(problems) == 4  # fills applied, realized, equity, the position
    assert ledger_mismatches(None, fills, marks=marks, capital=Decimal(1000)) != []


def test_the_snapshot_is_held_against_the_account_entries_too() -> None:
    buy = intent("buy")
    fills = [fill(buy, "0.010", price="100")]
    funding = AccountEntry(
        entry_id="FUNDING_FEE:1",
        income_type=IncomeType.FUNDING_FEE,
        symbol="BTCUSDT",
        asset="USDT",
        amount=Decimal("-0.25"),
        ts_ms=T0,
    )
    marks = {"BTCUSDT": Decimal(100)}
    left_out = snapshot(realized="0", fees="0.0004", quantity="0.010", mark="100", fills=1)
    problems = ledger_mismatches(
        left_out, fills, marks=marks, capital=Decimal(1000), entries=[funding]
    )
    assert any(p.startswith("entries applied 0 != 1") for p in problems), problems
    assert any(p.startswith("funding 0.00 != -0.25") for p in problems), problems
    assert any(p.startswith("equity") for p in problems), problems
    assert any(p.startswith("BTCUSDT funding") for p in problems), problems


def test_health_recovered_means_ok_again_or_as_before_the_outage() -> None:
    ok = {"nats": ("OK", "connected"), "outbox": ("OK", "empty")}
    degraded_model = {**ok, "model": ("DEGRADED", "no calibration")}
    assert recovered("inference", ok, ok)
    assert recovered("inference", degraded_model, degraded_model)
    assert not recovered("inference", degraded_model, ok)
    assert not recovered("execution", {**ok, "outbox": ("DEGRADED", "3 waiting")}, ok)
    ended = {**ok, "feed": ("DEGRADED", "synthetic ended after 600 candles")}
    assert recovered("marketdata", ended, ok)
    assert not recovered("marketdata", {**ok, "feed": ("CRITICAL", "stale")}, ok)
    assert not recovered("portfolio", {}, ok)  # no checks at all is no answer
