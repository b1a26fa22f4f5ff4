"""One valid message of every wire type, for the poison tests to mutate and to publish."""

from __future__ import annotations

from decimal import Decimal

from qtrader.contracts.messages import (
    Candle,
    CandleSource,
    ControlHeartbeat,
    Direction,
    Fill,
    HaltAck,
    HaltLatch,
    Message,
    OrderIntent,
    OrderStatus,
    OrderUpdate,
    PolicyRevision,
    PortfolioSnapshot,
    PositionView,
    RiskAlert,
    RiskAlertKind,
    Side,
    Signal,
    TradingState,
)
from qtrader.contracts.policy import TradingPolicySpec
from qtrader.control.ess_resource import EmergencyStopSpec
from qtrader.local.control_plane import EssRecord

T0 = 1_764_000_000_000


def sample_messages() -> list[Message]:
    """A valid instance of each message type, its Decimals and optional fields filled in."""
    position = PositionView(
        symbol="BTCUSDT",
        quantity=Decimal("-0.002"),
        avg_entry_price=Decimal("50000.123456789012345678901234"),
        mark_price=Decimal("50010.1"),
        unrealized_pnl=Decimal("-0.02"),
        realized_pnl=Decimal("1.5"),
        fees=Decimal("0.04"),
    )
    return [
        Candle(
            symbol="BTCUSDT",
            interval="1m",
            open_time_ms=T0,
            close_time_ms=T0 + 59_999,
            open=Decimal("50000.1"),
            high=Decimal("50010.5"),
            low=Decimal("49990"),
            close=Decimal("50005.2"),
            volume=Decimal("12.345"),
            trades=42,
            source=CandleSource.SYNTHETIC,
        ),
        Signal(
            signal_id="s-1",
            symbol="BTCUSDT",
            direction=Direction.LONG,
            confidence=0.8,
            model_version="m1",
            candle_open_time_ms=T0,
            price=Decimal("50005.2"),
            created_at_ms=T0,
        ),
        OrderIntent(
            intent_id="i-1",
            client_order_id="qt-i-1",
            symbol="BTCUSDT",
            side=Side.BUY,
            quantity=Decimal("0.002"),
            limit_price=Decimal("50100"),
            reference_price=Decimal("50005.2"),
            signal_id="s-1",
            policy_revision=1,
            created_at_ms=T0,
        ),
        OrderUpdate(
            client_order_id="qt-i-1",
            intent_id="i-1",
            symbol="BTCUSDT",
            side=Side.BUY,
            status=OrderStatus.FILLED,
            quantity=Decimal("0.002"),
            filled_quantity=Decimal("0.002"),
            avg_price=Decimal("50005.25"),
            exchange="paper",
            ts_ms=T0,
        ),
        Fill(
            fill_id="f-1",
            client_order_id="qt-i-1",
            symbol="BTCUSDT",
            side=Side.BUY,
            quantity=Decimal("0.002"),
            price=Decimal("50005.2"),
            fee=Decimal("0.04"),
            ts_ms=T0,
        ),
        PortfolioSnapshot(
            sequence=1,
            ts_ms=T0,
            fills_applied=1,
            initial_capital=Decimal(10_000),
            realized_pnl=Decimal("1.5"),
            unrealized_pnl=Decimal("-0.02"),
            fees=Decimal("0.04"),
            equity=Decimal("10001.44"),
            peak_equity=Decimal("10002"),
            drawdown_pct=Decimal("0.005599"),
            max_drawdown_pct=Decimal("0.01"),
            positions=(position,),
        ),
        RiskAlert(
            alert_id="a-1",
            alert_kind=RiskAlertKind.FLASH_CRASH,
            source="test",
            symbol="BTCUSDT",
            value=Decimal("-16.5"),
            threshold=Decimal("15"),
            detail="a test alert",
            ts_ms=T0,
        ),
        HaltLatch(state=TradingState.ACTIVE, revision=1, issued_at_ms=T0),
        HaltAck(worker_id="w-1", revision=1, state=TradingState.ACTIVE, ts_ms=T0),
        ControlHeartbeat(issued_by="test", latch_revision=1, ts_ms=T0),
        PolicyRevision(
            name="p",
            revision=1,
            published_at_ms=T0,
            spec=TradingPolicySpec(symbols=("BTCUSDT",)),
        ),
        EssRecord(name="main", generation=1, spec=EmergencyStopSpec()),
    ]
