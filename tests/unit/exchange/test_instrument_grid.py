"""Rounding onto an instrument's grid: toward zero, exactly, written with the grid's exponent.

Every quantity decided, admitted and filled goes through ``Instrument.round_quantity``, so the
reference here is arithmetic on fractions, not another rounding of Decimals.
"""

from __future__ import annotations

import math
from decimal import Decimal, localcontext
from fractions import Fraction

from hypothesis import example, given
from hypothesis import strategies as st

from qtrader.instruments import Instrument

# Powers of ten (the listed steps and ticks) and grids that are not (the slow path).
GRIDS = [Decimal(g) for g in ("1E-8", "0.001", "0.01", "1", "1E+1", "0.0010", "0.5", "0.025", "5")]


def _instrument(grid: Decimal) -> Instrument:
    return Instrument(
        symbol="XUSDT", tick_size=grid, step_size=grid, min_qty=grid, min_notional=Decimal(5)
    )


def _reference(value: Decimal, grid: Decimal) -> Fraction:
    return math.trunc(Fraction(value) / Fraction(grid)) * Fraction(grid)


values = st.decimals(
    min_value=Decimal("-1E+9"), max_value=Decimal("1E+9"), allow_nan=False, places=40
) | st.decimals(min_value=Decimal(-100), max_value=Decimal(100), allow_nan=False, places=3)


@given(value=values, grid=st.sampled_from(GRIDS))
# A quotient of more digits than the 60-digit precision: 16.99...9 must stay 16, not round to
# 17 before the truncation (0.017 would be more than asked).
@example(value=Decimal("0.0" + "16" + "9" * 70), grid=Decimal("0.001"))
@example(value=Decimal("0.0" + "16" + "9" * 70), grid=Decimal("0.0010"))
@example(value=Decimal("-0.0" + "49" + "9" * 70), grid=Decimal("0.025"))
def test_rounding_onto_the_grid_is_exactly_toward_zero_with_the_grids_exponent(
    value: Decimal, grid: Decimal
) -> None:
    instrument = _instrument(grid)
    for rounded in (instrument.round_quantity(value), instrument.round_price(value)):
        assert Fraction(rounded) == _reference(value, grid)
        assert rounded.as_tuple().exponent == grid.as_tuple().exponent
        assert abs(rounded) <= abs(value)


def test_rounding_ignores_the_callers_context() -> None:
    instrument = _instrument(Decimal("0.025"))
    value = Decimal("0.0" + "49" + "9" * 70)
    with localcontext() as context:
        context.prec = 5  # a caller's narrow context must not round the quotient up
        assert instrument.round_quantity(value) == Decimal("0.025")
