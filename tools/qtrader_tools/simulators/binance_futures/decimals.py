"""Decimal helpers shared by the simulator's modules: Binance's way of writing a number."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

USDT_STEP = Decimal("1e-8")  # balances, commissions, PnL and funding are kept to 8 places


def plain(value: Decimal) -> str:
    """A decimal as Binance writes it: no exponent, no trailing zeros."""
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


def to_step(value: Decimal) -> Decimal:
    """``value`` rounded half-up to 8 decimal places, as amounts are booked."""
    return value.quantize(USDT_STEP, ROUND_HALF_UP)
