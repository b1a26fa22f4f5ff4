"""The positions a stop's status shows: each stack's newest portfolio snapshot, nothing else."""

from __future__ import annotations

from decimal import Decimal

from qtrader.contracts.messages import PortfolioSnapshot, PositionView
from qtrader.control.open_positions import OpenPositions, StackPositions


def _snapshot(*held: tuple[str, str], ts_ms: int, sequence: int) -> PortfolioSnapshot:
    return PortfolioSnapshot(
        sequence=sequence,
        ts_ms=ts_ms,
        fills_applied=len(held),
        initial_capital=Decimal(10_000),
        realized_pnl=Decimal(0),
        unrealized_pnl=Decimal(0),
        fees=Decimal(0),
        equity=Decimal(10_000),
        peak_equity=Decimal(10_000),
        drawdown_pct=Decimal(0),
        max_drawdown_pct=Decimal(0),
        positions=tuple(
            PositionView(
                symbol=symbol,
                quantity=Decimal(quantity),
                avg_entry_price=Decimal(100),
                mark_price=Decimal(100),
                unrealized_pnl=Decimal(0),
                realized_pnl=Decimal(0),
                fees=Decimal(0),
            )
            for symbol, quantity in held
        ),
    )


async def test_the_newest_snapshot_of_each_stack_counts_and_closed_positions_are_left_out() -> None:
    positions = OpenPositions()
    await positions.on_snapshot("a", _snapshot(("BTCUSDT", "0.5"), ts_ms=2, sequence=2))
    await positions.on_snapshot("a", _snapshot(("BTCUSDT", "0.9"), ts_ms=1, sequence=1))  # late
    await positions.on_snapshot(
        "b", _snapshot(("ETHUSDT", "0"), ("SOLUSDT", "-3"), ts_ms=5, sequence=9)
    )
    seen = positions.seen(["b", "a", "c"])
    assert seen.known == (
        StackPositions(stack="a", positions=(("BTCUSDT", Decimal("0.5")),), as_of_ms=2),
        StackPositions(stack="b", positions=(("SOLUSDT", Decimal(-3)),), as_of_ms=5),
    )
    assert seen.missing == ("c",)
    assert seen.open_count == 2
    positions.forget("a")
    assert positions.seen(["a"]).missing == ("a",)
