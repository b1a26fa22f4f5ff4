"""The exposure invariant checker: positions replayed from the venue's trades against the limits."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

from qtrader_tools.stress.invariants import (
    ExposureLimits,
    VenueRejection,
    VenueTrade,
    ViolationKind,
    check_exposure,
    from_sim_records,
)

LIMITS = ExposureLimits(
    max_position_usd=Decimal(1000),
    max_open_positions=2,
    step_sizes={"BTCUSDT": Decimal("0.001"), "ETHUSDT": Decimal("0.01"), "SOLUSDT": Decimal(1)},
)


def _trade(n: int, symbol: str, side: str, qty: str, price: str) -> VenueTrade:
    return VenueTrade(
        trade_id=n,
        symbol=symbol,
        side=side,
        quantity=Decimal(qty),
        price=Decimal(price),
        time_ms=1_000 + n,
    )


def test_positions_within_the_limit_pass_and_the_worst_ratio_is_reported() -> None:
    trades = [
        _trade(1, "BTCUSDT", "BUY", "0.033", "30000"),
        _trade(2, "BTCUSDT", "SELL", "0.033", "30000"),
    ]
    report = check_exposure(trades=trades, limits=LIMITS)
    assert report.ok, report.summary()
    assert report.max_position_ratio == Decimal("0.99")
    assert report.final_positions == {"BTCUSDT": Decimal(0)}


def test_trades_are_replayed_in_the_venues_booking_order_when_its_clock_went_back() -> None:
    """The clock-skew test's venue: its clock set 20 s back between the second and third trade.
    In booking order the position never passes 0.033; by time it would open at 0.063."""
    booked = [("BUY", "0.033", 37_133), ("SELL", "0.064", 37_392), ("BUY", "0.063", 19_685)]
    trades = [
        replace(_trade(n, "BTCUSDT", side, qty, "30000"), time_ms=t)
        for n, (side, qty, t) in enumerate(booked, start=1)
    ]
    report = check_exposure(trades=trades, limits=LIMITS)
    assert report.ok, report.summary()
    assert report.final_positions == {"BTCUSDT": Decimal("0.032")}


def test_one_step_beyond_the_limit_is_tolerated_two_are_not() -> None:
    one_step = [_trade(1, "BTCUSDT", "BUY", "0.034", "30000")]  # 1020 <= 1000 + 30
    assert check_exposure(trades=one_step, limits=LIMITS).ok
    two_steps = [_trade(1, "BTCUSDT", "BUY", "0.035", "30000")]  # 1050 > 1030
    report = check_exposure(trades=two_steps, limits=LIMITS)
    assert [v.kind for v in report.violations] == [ViolationKind.MAX_POSITION_USD]
    assert report.violations[0].symbol == "BTCUSDT"


def test_a_flip_counted_twice_shows_as_a_position_of_twice_the_limit() -> None:
    trades = [
        _trade(1, "BTCUSDT", "BUY", "0.033", "30000"),
        _trade(2, "BTCUSDT", "BUY", "0.033", "30000"),  # sized on a stale position
    ]
    report = check_exposure(trades=trades, limits=LIMITS)
    assert not report.ok
    assert report.max_position_ratio == Decimal("1.98")


def test_trades_are_replayed_in_the_venues_order_not_the_given_one() -> None:
    trades = [
        _trade(2, "BTCUSDT", "SELL", "0.033", "30000"),
        _trade(1, "BTCUSDT", "BUY", "0.033", "30000"),
    ]
    assert check_exposure(trades=trades, limits=LIMITS).max_position_ratio == Decimal("0.99")


def test_a_reduction_after_the_market_rose_is_not_a_breach_but_is_reported() -> None:
    trades = [
        _trade(1, "BTCUSDT", "BUY", "0.033", "30000"),  # 990 at the order's price
        _trade(2, "BTCUSDT", "SELL", "0.001", "32000"),  # 0.032 left, 1024 at the new price
    ]
    report = check_exposure(trades=trades, limits=LIMITS)
    assert report.ok, report.summary()
    assert report.max_position_ratio == Decimal("0.99")
    assert report.max_held_ratio == Decimal("1.024")


def test_adding_after_the_market_rose_values_the_whole_position_at_the_new_price() -> None:
    trades = [
        _trade(1, "BTCUSDT", "BUY", "0.033", "30000"),
        _trade(2, "BTCUSDT", "BUY", "0.001", "31000"),  # 0.034 x 31000 = 1054 > 1000 + 31
    ]
    report = check_exposure(trades=trades, limits=LIMITS)
    assert [v.kind for v in report.violations] == [ViolationKind.MAX_POSITION_USD]
    assert report.max_position_ratio == Decimal("1.054")


def test_a_flip_is_judged_at_its_price_even_when_smaller_than_the_position_it_closed() -> None:
    trades = [
        _trade(1, "BTCUSDT", "BUY", "0.033", "30000"),
        _trade(2, "BTCUSDT", "SELL", "0.065", "33000"),  # short 0.032: 1056 > 1000 + 33
    ]
    report = check_exposure(trades=trades, limits=LIMITS)
    assert [v.kind for v in report.violations] == [ViolationKind.MAX_POSITION_USD]
    assert report.max_position_ratio == Decimal("1.056")


def test_more_open_positions_than_allowed_is_a_violation() -> None:
    trades = [
        _trade(1, "BTCUSDT", "BUY", "0.01", "30000"),
        _trade(2, "ETHUSDT", "BUY", "0.1", "2000"),
        _trade(3, "SOLUSDT", "SELL", "1", "100"),
    ]
    report = check_exposure(trades=trades, limits=LIMITS)
    assert [v.kind for v in report.violations] == [ViolationKind.MAX_OPEN_POSITIONS]
    assert report.max_open_positions == 3


def test_every_reduce_only_rejection_is_a_violation_other_codes_are_not() -> None:
    rejections = [VenueRejection(time_ms=5, code=-2022), VenueRejection(time_ms=6, code=-2019)]
    report = check_exposure(trades=[], rejections=rejections, limits=LIMITS)
    assert report.reduce_only_rejections == 1
    assert [v.kind for v in report.violations] == [ViolationKind.REDUCE_ONLY_REJECTED]


def test_the_simulators_records_are_read_in_their_admin_shapes() -> None:
    trades, rejections = from_sim_records(
        trades=[
            {
                "id": 7,
                "orderId": 3,
                "symbol": "BTCUSDT",
                "side": "SELL",
                "qty": "0.002",
                "price": "30010.5",
                "time": 1234,
            }
        ],
        orders=[{"orderId": 3, "reduceOnly": True}],
        log=[
            {"t_ms": 1, "code": None, "path": "/fapi/v1/order"},
            {"t_ms": 2, "code": -2022, "path": "/fapi/v1/order"},
        ],
    )
    assert trades == [
        VenueTrade(
            trade_id=7,
            symbol="BTCUSDT",
            side="SELL",
            quantity=Decimal("0.002"),
            price=Decimal("30010.5"),
            time_ms=1234,
            reduce_only=True,
        )
    ]
    assert trades[0].signed_quantity == Decimal("-0.002")
    assert rejections == [VenueRejection(time_ms=2, code=-2022, path="/fapi/v1/order")]
