"""An independent, exact account of a fill stream (``Fraction``s), to check the portfolio by."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

from qtrader.contracts import subjects
from qtrader.contracts.messages import Fill, PortfolioSnapshot
from support.streams import read_all

CENT = Decimal("0.01")


def independent_portfolio(
    fills: list[Fill], marks: dict[str, Decimal]
) -> tuple[Fraction, Fraction, Fraction, dict[str, Fraction]]:
    """Realized PnL, fees, unrealized PnL and positions, by plain average-cost accounting."""
    quantity: dict[str, Fraction] = {}
    average: dict[str, Fraction] = {}
    realized = Fraction(0)
    fees = Fraction(0)
    for fill in fills:
        q = quantity.get(fill.symbol, Fraction(0))
        avg = average.get(fill.symbol, Fraction(0))
        delta = Fraction(fill.quantity) * fill.side.sign
        price = Fraction(fill.price)
        fees += Fraction(fill.fee)
        if q == 0 or (q > 0) == (delta > 0):
            average[fill.symbol] = (abs(q) * avg + abs(delta) * price) / (abs(q) + abs(delta))
            quantity[fill.symbol] = q + delta
            continue
        closed = min(abs(q), abs(delta))
        realized += closed * (price - avg) * (1 if q > 0 else -1)
        remaining = q + delta
        quantity[fill.symbol] = remaining
        if remaining != 0 and (remaining > 0) != (q > 0):
            average[fill.symbol] = price
    unrealized = sum(
        (q * (Fraction(marks[s]) - average[s]) for s, q in quantity.items() if q != 0),
        Fraction(0),
    )
    return realized, fees, unrealized, quantity


def cents(value: Fraction | Decimal) -> Decimal:
    """An exact value rounded to the cent (half-even, like Decimal's default)."""
    exact = Fraction(value)
    return (Decimal(exact.numerator) / Decimal(exact.denominator)).quantize(CENT)


async def last_snapshot(url: str) -> PortfolioSnapshot | None:
    """The newest snapshot stored (a restarted portfolio numbers its snapshots from 0 again)."""
    snapshots = await read_all(
        url,
        stream=subjects.PORTFOLIO.name,
        subject=subjects.PORTFOLIO_SNAPSHOT,
        message_type=PortfolioSnapshot,
    )
    return snapshots[-1] if snapshots else None
