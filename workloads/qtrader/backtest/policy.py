"""The policies backtests run under when none is given."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from qtrader.contracts.policy import PaperExchangeSettings, RiskLimits, TradingPolicySpec


def evaluation_policy(symbols: Sequence[str], *, min_confidence: float = 0.45) -> TradingPolicySpec:
    """The policy the model card's backtests run under (its ``minConfidence`` is also the hit
    rates' threshold): the shipped example's sizing and costs; every symbol may hold a
    position; a wider slippage bound than the default (100 bps), so the synthetic market's coarse
    ticks on low prices do not block fills (they are still paid); and a drawdown limit of 100 %,
    so no halt cuts a fold short."""
    return TradingPolicySpec(
        symbols=tuple(symbols),
        risk=RiskLimits(
            max_open_positions=len(symbols),
            max_position_usd=Decimal(1000),
            max_leverage=Decimal(3),
            max_drawdown_pct=Decimal(100),
            min_confidence=min_confidence,
            max_slippage_bps=100,
        ),
        paper=PaperExchangeSettings(
            initial_capital_usd=Decimal(10_000), fee_bps=Decimal(4), slippage_bps=Decimal(2)
        ),
    )


def policy_for(symbols: Sequence[str], template: TradingPolicySpec) -> TradingPolicySpec:
    """``template`` for other symbols, each of which may hold a position (validated again)."""
    data = template.model_dump()
    data["symbols"] = list(symbols)
    data["risk"]["max_open_positions"] = len(symbols)
    return TradingPolicySpec.model_validate(data)
