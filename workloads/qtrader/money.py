"""Money arithmetic: the Decimal contexts and the precisions figures are published at.

Money and percentages are computed in a 60-digit context: far more digits than any sum of
price x quantity needs, so the arithmetic is exact in practice and the one rounding is the one
applied to what is published. The traps are Decimal's defaults (InvalidOperation,
DivisionByZero, Overflow), written out so that no reader has to know them.

- ``EXACT`` rounds ties to even (Decimal's default): the ledger, the paper exchange, the risk
  evaluators and execution's decisions.
- ``EXACT_HALF_UP`` rounds ties away from zero: the backtest's figures, rounded as a snapshot
  rounds them.
- ``EXACT_DOWN`` rounds toward zero: a quantity cut down to its step is never rounded up.

Use a context through ``decimal.localcontext`` or its own methods (``EXACT.add(a, b)``); never
make one the thread's current context, which would change every Decimal operation after it.
"""

from __future__ import annotations

from decimal import (
    ROUND_DOWN,
    ROUND_HALF_EVEN,
    ROUND_HALF_UP,
    Context,
    Decimal,
    DivisionByZero,
    InvalidOperation,
    Overflow,
)

PRECISION = 60
_TRAPS = [InvalidOperation, DivisionByZero, Overflow]

EXACT = Context(prec=PRECISION, rounding=ROUND_HALF_EVEN, traps=_TRAPS)
EXACT_HALF_UP = Context(prec=PRECISION, rounding=ROUND_HALF_UP, traps=_TRAPS)
EXACT_DOWN = Context(prec=PRECISION, rounding=ROUND_DOWN, traps=_TRAPS)

USDT_STEP = Decimal("1e-8")  # money in a snapshot: balances, PnL, fees, equity
PCT_STEP = Decimal("1e-6")  # percentages in a snapshot: drawdowns, returns


def published(value: Decimal, step: Decimal, *, context: Context = EXACT) -> Decimal:
    """``value`` as a snapshot publishes it: half up to ``step``, and a zero is plain 0 (never
    "-0E-8" on the wire). ``context`` bounds the digits (the ledger's amounts may be wider)."""
    rounded = value.quantize(step, rounding=ROUND_HALF_UP, context=context)
    return rounded.copy_abs() if rounded.is_zero() else rounded
