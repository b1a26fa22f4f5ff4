"""The income line of ``qtrader up``'s summary and final report."""

from __future__ import annotations

from decimal import Decimal

from qtrader.contracts.messages import AssetAmount, PortfolioSnapshot, SignedAssetAmount
from qtrader.local.observer import income_line


def test_income_line_when_funding_transfers_and_bnb_fees_then_each_asset_in_its_own_units() -> None:
    snapshot = PortfolioSnapshot(
        sequence=1,
        ts_ms=1,
        fills_applied=2,
        initial_capital=Decimal(10_000),
        realized_pnl=Decimal(0),
        unrealized_pnl=Decimal(0),
        fees=Decimal("0.228"),
        equity=Decimal(10_000),
        peak_equity=Decimal(10_000),
        drawdown_pct=Decimal(0),
        max_drawdown_pct=Decimal(0),
        positions=(),
        funding=Decimal("-0.025"),
        transfers=Decimal("1149.495"),
        other_income=Decimal("0.004"),
        fees_by_asset=(
            AssetAmount(asset="BNB", amount=Decimal("0.00018")),
            AssetAmount(asset="USDT", amount=Decimal("0.12")),
        ),
        transfers_by_asset=(
            SignedAssetAmount(asset="BNB", amount=Decimal("-0.5")),
            SignedAssetAmount(asset="USDT", amount=Decimal("1149.495")),
        ),
    )
    assert income_line(snapshot) == (
        "funding -0.03   transfers -0.50000000 BNB, +1,149.50 USDT   other income +0.00   "
        "fees by asset 0.00018000 BNB, 0.12 USDT"
    )
