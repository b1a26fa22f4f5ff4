"""The integration tests' invariant checker (``support.invariants.judge``) can fail: each
violation it exists for, planted in otherwise honest records, fails it with a message naming it.

The honest records: a buy of 0.020 BTC at 30,000 and a sell of 0.010 at 30,100 under a 1,000 USD
limit, and the portfolio snapshot worked out by hand (not by the checker's own account):
realized 0.010 x 100 = 1.00, fees 0.24 + 0.1204 = 0.3604, 0.010 BTC left marked at the stored
close 30,100 over an average of 30,000: unrealized 1.00, equity 10,001.6396.
"""

from __future__ import annotations

import dataclasses
from decimal import Decimal

from qtrader.contracts.messages import (
    Fill,
    OrderIntent,
    OrderStatus,
    OrderUpdate,
    PortfolioSnapshot,
    PositionView,
    Side,
)
from qtrader.contracts.policy import TradingPolicySpec
from qtrader.exchange.binance import binance_fill_id
from qtrader.execution.decisions import attempt_client_order_id, client_order_id_for
from qtrader_tools.stress.invariants import VenueRejection, VenueTrade
from support.invariants import Check, TradingRecords, VenueRecords, judge

T0 = 1_700_000_000_000
SPEC = TradingPolicySpec.model_validate(
    {"symbols": ["BTCUSDT"], "risk": {"maxPositionUsd": "1000", "maxOpenPositions": 1}}
)


def intent(name: str, side: Side, quantity: str) -> OrderIntent:
    return OrderIntent(
        intent_id=name,
        client_order_id=client_order_id_for(name),
        symbol="BTCUSDT",
        side=side,
        quantity=Decimal(quantity),
        reference_price=Decimal(30_000),
        policy_revision=1,
        created_at_ms=T0,
    )


def updates(order: OrderIntent, price: str) -> list[OrderUpdate]:
    """The attempt's PENDING_NEW (its own client order id), then the intent's FILLED."""
    attempt = attempt_client_order_id(order.client_order_id, 0)
    common = {
        "intent_id": order.intent_id,
        "symbol": order.symbol,
        "side": order.side,
        "quantity": order.quantity,
        "exchange": "paper",
        "ts_ms": T0,
    }
    return [
        OrderUpdate(
            client_order_id=attempt,
            status=OrderStatus.PENDING_NEW,
            filled_quantity=Decimal(0),
            avg_price=Decimal(0),
            **common,
        ),
        OrderUpdate(
            client_order_id=order.client_order_id,
            status=OrderStatus.FILLED,
            filled_quantity=order.quantity,
            avg_price=Decimal(price),
            **common,
        ),
    ]


def fill(order: OrderIntent, price: str, fee: str, ts_ms: int) -> Fill:
    attempt = attempt_client_order_id(order.client_order_id, 0)
    return Fill(
        fill_id=f"paper-{attempt}",
        client_order_id=attempt,
        symbol="BTCUSDT",
        side=order.side,
        quantity=order.quantity,
        price=Decimal(price),
        fee=Decimal(fee),
        ts_ms=ts_ms,
    )


BUY = intent("buy", Side.BUY, "0.020")
SELL = intent("sell", Side.SELL, "0.010")
FILLS = [fill(BUY, "30000", "0.24", T0), fill(SELL, "30100", "0.1204", T0 + 1)]


def snapshot(*, realized: str = "1.00", equity: str = "10001.6396") -> PortfolioSnapshot:
    return PortfolioSnapshot(
        sequence=3,
        ts_ms=T0 + 2,
        fills_applied=2,
        initial_capital=Decimal(10_000),
        realized_pnl=Decimal(realized),
        unrealized_pnl=Decimal("1.00"),
        fees=Decimal("0.3604"),
        equity=Decimal(equity),
        peak_equity=Decimal(equity),
        drawdown_pct=Decimal(0),
        max_drawdown_pct=Decimal(0),
        positions=(
            PositionView(
                symbol="BTCUSDT",
                quantity=Decimal("0.010"),
                avg_entry_price=Decimal(30_000),
                mark_price=Decimal(30_100),
                unrealized_pnl=Decimal("1.00"),
                realized_pnl=Decimal(realized),
                fees=Decimal("0.3604"),
            ),
        ),
    )


def records(**changes: object) -> TradingRecords:
    honest: dict[str, object] = {
        "spec": SPEC,
        "fills": FILLS,
        "intents": [BUY, SELL],
        "updates": updates(BUY, "30000") + updates(SELL, "30100"),
        "closes": {"BTCUSDT": frozenset({Decimal(30_000), Decimal(30_100)})},
        "snapshot": snapshot(),
    }
    return TradingRecords(**(honest | changes))  # type: ignore[arg-type]


def test_honest_records_pass() -> None:
    report = judge(records())
    assert report.ok, report.summary()
    assert report.exposure[0].trades == 2


def test_a_position_beyond_its_limit_fails() -> None:
    more = intent("more", Side.BUY, "0.030")  # 0.040 BTC: 1,200 USD > 1,000 + one step (30)
    report = judge(
        records(
            intents=[BUY, SELL, more],
            updates=[*records().updates, *updates(more, "30000")],
            fills=[*FILLS, fill(more, "30000", "0.36", T0 + 5)],
            snapshot=None,
        )
    )
    assert not report.ok
    assert "VIOLATION: exposure:" in report.summary()
    assert "max_position_usd" in report.summary()
    assert "BTCUSDT position 0.040 worth 1200.000" in report.summary()


def test_a_fill_stored_twice_fails() -> None:
    report = judge(records(fills=[*FILLS, FILLS[1]]))
    assert not report.ok
    assert "VIOLATION: fills repeating a fill id on FILLS: 1" in report.summary()


def test_a_snapshot_off_by_one_cent_fails() -> None:
    report = judge(records(snapshot=snapshot(realized="1.01", equity="10001.6496")))
    assert not report.ok
    summary = report.summary()
    assert "VIOLATION: portfolio vs exact account of FILLS: realized 1.01 != 1.00" in summary
    assert "VIOLATION: portfolio vs exact account of FILLS: equity 10001.65 != 10001.64" in summary


def test_a_second_final_update_and_a_fill_of_no_update_fail() -> None:
    stray = fill(intent("stray", Side.SELL, "0.010"), "30100", "0", T0 + 3)
    extra_final = updates(SELL, "30100")[1].model_copy(update={"status": OrderStatus.CANCELED})
    report = judge(
        records(updates=[*records().updates, extra_final], fills=[*FILLS, stray], snapshot=None)
    )
    assert "final updates beyond an intent's first: 1" in report.summary()
    assert "fills without an order update of their client order id: 1" in report.summary()


def test_a_portfolio_behind_the_fills_and_a_mark_no_candle_gave_fail() -> None:
    behind = snapshot().model_copy(update={"fills_applied": 1})
    assert "applied 1 fills, FILLS holds 2" in judge(records(snapshot=behind)).summary()
    report = judge(records(closes={"BTCUSDT": frozenset({Decimal(29_000)})}))
    assert "BTCUSDT marked at 30100, neither a stored close" in report.summary()


def test_on_the_binance_server_its_own_trades_and_refusals_are_judged() -> None:
    trade = VenueTrade(
        trade_id=1,
        symbol="BTCUSDT",
        side="BUY",
        quantity=Decimal("0.050"),
        price=Decimal(30_000),
        time_ms=T0,
    )
    venue = VenueRecords(
        base_url="http://sim",
        trades=(trade,),
        rejections=(VenueRejection(time_ms=T0, code=-2022),),
        step_sizes={"BTCUSDT": Decimal("0.001")},
    )
    summary = judge(records(venues=[venue])).summary()
    assert "max_position_usd" in summary
    assert "1 reduce-only rejections" in summary


def test_on_the_binance_server_fills_out_of_its_order_fail() -> None:
    """The worker's fills of the buy (trade 1) and the sell (trade 2) on FILLS the other way
    round: positions the venue never held, and a ledger splitting PnL otherwise."""
    made = [
        f.model_copy(update={"fill_id": binance_fill_id("BTCUSDT", n)})
        for n, f in enumerate(FILLS, start=1)
    ]
    trades = tuple(
        VenueTrade(
            trade_id=n,
            symbol="BTCUSDT",
            side=f.side.value,
            quantity=f.quantity,
            price=f.price,
            time_ms=f.ts_ms,
        )
        for n, f in enumerate(made, start=1)
    )
    venue = VenueRecords(
        base_url="http://sim", trades=trades, rejections=(), step_sizes={"BTCUSDT": Decimal(1)}
    )
    assert judge(records(fills=made, venues=[venue])).ok
    report = judge(records(fills=made[::-1], venues=[venue]))
    assert [p.check for p in report.problems] == [Check.ORDERS], report.summary()
    assert "after a later fill of their worker at the venue: 1" in report.summary()


def test_in_paper_mode_fills_out_of_their_time_order_fail() -> None:
    """FILLS is the paper exchange's only record: its fills must be there in the order the
    exchange made them, which their times give."""
    report = judge(records(fills=FILLS[::-1]))
    assert Check.ORDERS in {p.check for p in report.problems}, report.summary()
    assert "after a later fill of their worker at the venue: 1" in report.summary()


def test_an_exempt_check_is_noted_and_not_judged() -> None:
    report = judge(records(fills=[*FILLS, FILLS[1]]), skip=frozenset({Check.DUPLICATES}))
    assert report.ok, report.summary()
    assert "note: duplicates not judged (exempt)" in report.summary()


def test_on_the_binance_server_a_trade_of_ours_missing_from_fills_fails() -> None:
    """A fill the venue made that never reached FILLS (an order left unknown by a worker that
    was killed, never resolved): the portfolio never had it. A trade of an order placed by
    hand (no client order id of ours) is not one."""
    made = [
        f.model_copy(update={"fill_id": binance_fill_id("BTCUSDT", n)})
        for n, f in enumerate(FILLS, start=1)
    ]
    trades = tuple(
        VenueTrade(
            trade_id=n,
            symbol="BTCUSDT",
            side=f.side.value,
            quantity=f.quantity,
            price=f.price,
            time_ms=f.ts_ms,
            client_order_id=f.client_order_id,
        )
        for n, f in enumerate(made, start=1)
    )
    by_hand = dataclasses.replace(trades[0], trade_id=99, client_order_id="web_a1b2c3")
    venue = VenueRecords(
        base_url="http://sim",
        trades=(*trades, by_hand),
        rejections=(),
        step_sizes={"BTCUSDT": Decimal(1)},
    )
    assert judge(records(fills=made, venues=[venue])).ok
    report = judge(records(fills=made[:1], venues=[venue]), skip=frozenset({Check.LEDGER}))
    assert [p.check for p in report.problems] == [Check.ORDERS], report.summary()
    assert "trades of our orders at the venue missing from FILLS: 1" in report.summary()
