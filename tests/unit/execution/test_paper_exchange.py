"""The paper exchange: adverse fill prices, fees, rejections and idempotent resubmission."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

import pytest

from qtrader.contracts.messages import (
    Candle,
    OrderIntent,
    OrderStatus,
    OrderType,
    Side,
)
from qtrader.execution.paper import PaperExchange, PaperExecution, PaperRejectReason
from qtrader.instruments import ExchangeInfo, paper_exchange_info
from qtrader_tools.candles import flat_candle

EXCHANGE = paper_exchange_info()
NOW = 1_700_000_100_000


def candle(symbol: str, close: str, *, open_time_ms: int = 1_700_000_000_000) -> Candle:
    return flat_candle(symbol, close, open_time_ms=open_time_ms)


def intent(
    side: Side,
    quantity: str,
    *,
    symbol: str = "BTCUSDT",
    client_order_id: str = "qt-1",
    reduce_only: bool = False,
    order_type: OrderType = OrderType.MARKET,
) -> OrderIntent:
    return OrderIntent(
        intent_id=f"sig-{client_order_id}",
        client_order_id=client_order_id,
        symbol=symbol,
        side=side,
        quantity=Decimal(quantity),
        order_type=order_type,
        limit_price=Decimal(1) if order_type is OrderType.LIMIT else None,
        reduce_only=reduce_only,
        reference_price=Decimal(1),
        policy_revision=1,
        created_at_ms=NOW,
    )


def make_exchange(fee_bps: str = "4", slippage_bps: str = "2") -> PaperExchange:
    paper = PaperExchange(
        exchange=EXCHANGE, fee_bps=Decimal(fee_bps), slippage_bps=Decimal(slippage_bps)
    )
    paper.on_candle(candle("BTCUSDT", "60000.0"))
    return paper


def test_submit_when_buy_then_pays_slippage_rounded_up_to_tick() -> None:
    execution = make_exchange().submit(intent(Side.BUY, "0.010"), now_ms=NOW)
    (fill,) = execution.fills
    assert fill.price == Decimal("60012.0")  # 60000 x 1.0002 = 60012.0, on the tick already
    execution = make_exchange(slippage_bps="1.5").submit(intent(Side.BUY, "0.010"), now_ms=NOW)
    assert execution.fills[0].price == Decimal("60009.0")  # 60009.0 exactly
    execution = make_exchange(slippage_bps="1.51").submit(intent(Side.BUY, "0.010"), now_ms=NOW)
    assert execution.fills[0].price == Decimal("60009.1")  # 60009.06 rounded up


def test_submit_when_sell_then_receives_slippage_rounded_down_to_tick() -> None:
    execution = make_exchange(slippage_bps="1.51").submit(intent(Side.SELL, "0.010"), now_ms=NOW)
    assert execution.fills[0].price == Decimal("59990.9")  # 59990.94 rounded down


def test_submit_when_filled_then_fee_is_notional_times_bps_rounded_half_up() -> None:
    paper = make_exchange(fee_bps="4", slippage_bps="0")
    paper.on_candle(candle("TRXUSDT", "0.12345"))
    # 100 x 0.12345 = 12.345 notional; x 4 / 10_000 = 0.004938 exactly.
    (fill,) = paper.submit(intent(Side.BUY, "100", symbol="TRXUSDT"), now_ms=NOW).fills
    assert fill.fee == Decimal("0.004938")
    # 50 x 0.12345 = 6.1725; x 0.5 / 10_000 = 0.000308625: the half rounds up (not to even).
    half = make_exchange(fee_bps="0.5", slippage_bps="0")
    half.on_candle(candle("TRXUSDT", "0.12345"))
    (fill,) = half.submit(intent(Side.BUY, "50", symbol="TRXUSDT"), now_ms=NOW).fills
    assert fill.fee == Decimal("0.00030863")


def test_submit_when_filled_then_updates_are_new_then_filled_with_deterministic_fill_id() -> None:
    execution = make_exchange().submit(intent(Side.BUY, "0.010"), now_ms=NOW)
    assert [u.status for u in execution.updates] == [OrderStatus.NEW, OrderStatus.FILLED]
    assert all(u.exchange == "paper" and u.ts_ms == NOW for u in execution.updates)
    assert execution.final.filled_quantity == Decimal("0.010")
    assert execution.final.avg_price == execution.fills[0].price
    assert execution.fills[0].fill_id == "paper-qt-1-1"
    assert execution.fills[0].client_order_id == "qt-1"


def test_submit_when_same_client_order_id_twice_then_no_second_order() -> None:
    paper = make_exchange()
    first = paper.submit(intent(Side.BUY, "0.010"), now_ms=NOW)
    again = paper.submit(intent(Side.BUY, "0.010"), now_ms=NOW + 5_000)
    assert again == first  # the same fill ids: republishing them is dropped by the bus
    assert paper.position("BTCUSDT") == Decimal("0.010")


@pytest.mark.parametrize("limit", ["60012.0", "60011.9"])  # fills / expires
def test_submit_when_backtest_settings_then_same_execution_and_none_remembered(
    limit: str,
) -> None:
    """Neither keeping no executions nor building its messages unvalidated changes an answer."""
    order = intent(Side.BUY, "0.010", order_type=OrderType.LIMIT).model_copy(
        update={"limit_price": Decimal(limit)}
    )
    paper = PaperExchange(
        exchange=EXCHANGE,
        fee_bps=Decimal(4),
        slippage_bps=Decimal(2),
        keep_executions=False,
        validate_messages=False,
    )
    paper.on_candle(candle("BTCUSDT", "60000.0"))
    execution = paper.submit(order, now_ms=NOW)
    expected = make_exchange().submit(order, now_ms=NOW)
    assert execution == expected
    assert [m.encode() for m in (*execution.updates, *execution.fills)] == [
        m.encode() for m in (*expected.updates, *expected.fills)
    ]
    assert paper.execution("qt-1") is None
    assert paper.position("BTCUSDT") == expected_position(expected)


def expected_position(execution: PaperExecution) -> Decimal:
    return sum((f.quantity for f in execution.fills), Decimal(0))


def test_submit_when_rejected_then_resubmission_returns_the_same_rejection() -> None:
    paper = PaperExchange(exchange=EXCHANGE, fee_bps=Decimal(4), slippage_bps=Decimal(2))
    first = paper.submit(intent(Side.BUY, "0.010"), now_ms=NOW)
    paper.on_candle(candle("BTCUSDT", "60000.0"))
    again = paper.submit(intent(Side.BUY, "0.010"), now_ms=NOW + 1)
    assert again == first


@pytest.mark.parametrize(
    ("side", "limit", "filled"),
    [
        (Side.BUY, "60012.0", True),  # the fill price (close + 2 bps) is exactly the cap
        (Side.BUY, "60011.9", False),  # one tick under it: nothing at the limit or better
        (Side.SELL, "59988.0", True),
        (Side.SELL, "59988.1", False),
    ],
)
def test_limit_order_when_fill_price_beyond_limit_then_expires_unfilled(
    side: Side, limit: str, filled: bool
) -> None:
    order = intent(side, "0.010", order_type=OrderType.LIMIT).model_copy(
        update={"limit_price": Decimal(limit)}
    )
    execution = make_exchange().submit(order, now_ms=NOW)
    assert execution.final.status is (OrderStatus.FILLED if filled else OrderStatus.EXPIRED)
    assert len(execution.fills) == (1 if filled else 0)


@pytest.mark.parametrize(
    ("order", "reason"),
    [
        (intent(Side.BUY, "1", symbol="NOPEUSDT"), PaperRejectReason.UNKNOWN_SYMBOL),
        (intent(Side.BUY, "1", symbol="ETHUSDT"), PaperRejectReason.NO_MARKET_PRICE),
        (intent(Side.BUY, "0.0015"), PaperRejectReason.QUANTITY_OFF_STEP),
        (intent(Side.BUY, "0.001"), PaperRejectReason.BELOW_MIN_NOTIONAL),  # 60 < 100 USDT
        (intent(Side.SELL, "0.010", reduce_only=True), PaperRejectReason.REDUCE_ONLY_REJECTED),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_submit_when_order_invalid_then_rejected_with_reason_and_no_fill(
    order: OrderIntent, reason: PaperRejectReason
) -> None:
    execution = make_exchange().submit(order, now_ms=NOW)
    assert execution.fills == ()
    (update,) = execution.updates
    assert update.status is OrderStatus.REJECTED
    assert update.reason == reason
    assert update.filled_quantity == 0


def test_submit_when_below_min_qty_then_rejected() -> None:
    btc = EXCHANGE.instrument("BTCUSDT")
    listing = ExchangeInfo(instruments={"BTCUSDT": replace(btc, min_qty=Decimal("0.005"))})
    paper = PaperExchange(exchange=listing, fee_bps=Decimal(4), slippage_bps=Decimal(2))
    paper.on_candle(candle("BTCUSDT", "60000.0"))
    (update,) = paper.submit(intent(Side.BUY, "0.004"), now_ms=NOW).updates
    assert update.reason == PaperRejectReason.BELOW_MIN_QTY


def test_submit_when_reduce_only_below_min_notional_then_fills() -> None:
    paper = make_exchange()
    paper.submit(intent(Side.BUY, "0.010", client_order_id="open"), now_ms=NOW)
    close = intent(Side.SELL, "0.001", client_order_id="close", reduce_only=True)
    execution = paper.submit(close, now_ms=NOW)
    assert execution.final.status is OrderStatus.FILLED
    assert execution.fills[0].reduce_only is True
    assert paper.position("BTCUSDT") == Decimal("0.009")


def test_submit_when_reduce_only_would_flip_then_rejected() -> None:
    paper = make_exchange()
    paper.submit(intent(Side.BUY, "0.010", client_order_id="open"), now_ms=NOW)
    flip = intent(Side.SELL, "0.020", client_order_id="flip", reduce_only=True)
    assert paper.submit(flip, now_ms=NOW).final.reason == PaperRejectReason.REDUCE_ONLY_REJECTED


def test_on_candle_when_older_candle_arrives_then_latest_close_is_kept() -> None:
    paper = make_exchange()
    paper.on_candle(candle("BTCUSDT", "61000.0", open_time_ms=1_700_000_060_000))
    paper.on_candle(candle("BTCUSDT", "50000.0", open_time_ms=1_600_000_000_000))
    assert paper.latest_price("BTCUSDT") == Decimal("61000.0")


def test_submit_when_slippage_would_push_price_below_one_tick_then_floors_at_one_tick() -> None:
    paper = PaperExchange(exchange=EXCHANGE, fee_bps=Decimal(0), slippage_bps=Decimal(50))
    paper.on_candle(candle("TRXUSDT", "0.00001"))
    paper.submit(intent(Side.BUY, "600000", symbol="TRXUSDT", client_order_id="a"), now_ms=NOW)
    sell = intent(Side.SELL, "500000", symbol="TRXUSDT", client_order_id="b")
    assert paper.submit(sell, now_ms=NOW).fills[0].price == Decimal("0.00001")


def test_open_orders_and_cancel_all_when_market_only_then_nothing_rests() -> None:
    paper = make_exchange()
    paper.submit(intent(Side.BUY, "0.010"), now_ms=NOW)
    assert paper.open_orders == ()
    assert paper.cancel_all("BTCUSDT") == 0
    assert paper.cancel_all(None) == 0


@pytest.mark.parametrize(
    ("fee_bps", "slippage_bps"), [("-1", "0"), ("0", "-1"), ("0", "10000"), ("NaN", "0")]
)
def test_constructor_when_bps_out_of_range_then_raises(fee_bps: str, slippage_bps: str) -> None:
    with pytest.raises(ValueError, match="bps"):
        PaperExchange(
            exchange=EXCHANGE, fee_bps=Decimal(fee_bps), slippage_bps=Decimal(slippage_bps)
        )


def test_reduce_only_is_checked_against_the_positions_source_when_given() -> None:
    """In a worker the paper exchange reads the account's positions from the exposure book,
    the one owner of positions there; it keeps none of its own."""
    book = {"BTCUSDT": Decimal("0.010")}
    paper = PaperExchange(
        exchange=EXCHANGE,
        fee_bps=Decimal(4),
        slippage_bps=Decimal(2),
        positions=lambda symbol: book.get(symbol, Decimal(0)),
    )
    paper.on_candle(candle("BTCUSDT", "60000.0"))
    closing = paper.submit(intent(Side.SELL, "0.010", reduce_only=True), now_ms=NOW)
    assert closing.final.status is OrderStatus.FILLED
    assert paper.position("BTCUSDT") == Decimal("0.010")  # the source learns of fills itself
    beyond = paper.submit(
        intent(Side.SELL, "0.020", reduce_only=True, client_order_id="qt-2"), now_ms=NOW
    )
    assert beyond.final.status is OrderStatus.REJECTED
