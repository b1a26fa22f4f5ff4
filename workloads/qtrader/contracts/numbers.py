"""Bounded decimal types: every Decimal of a message or a resource file is one of these.

A Decimal travels as a JSON string, and ``Decimal`` accepts far more than any market produces:
``"1e999"`` passed a bare ``gt=0`` and then broke every quantize and snapshot downstream
(``InvalidOperation``), and ``"1e-999"`` is a price no grid rounding survives. So each kind of
number has one named type here, with its range and its decimal places, and the models of
``contracts`` use only these. NaN and Infinity are refused by every one of them (pydantic's
Decimal refuses non-finite values; ``allow_inf_nan=False`` says so where a reader looks).

Two kinds of precision:
- *quoted* values (prices, quantities, volumes, fees as the exchange states them) sit on an
  exchange grid: ``QUOTED_PLACES`` decimal places are far more than any Binance tick or step
  (at most 8) yet keep a price at least 1e-12, which our sizing can divide by;
- *computed* values (averages, PnL, equity, percentages) are results of our own arithmetic in
  contexts of up to 60 significant digits (an average entry price ``cost / quantity`` at full
  precision), so they may carry up to ``COMPUTED_PLACES`` decimal places, still refusing
  ``1e-999``.

The upper bounds are far beyond any real figure and far inside what the 60-digit contexts of the
ledger and the decisions compute without rounding or overflow.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated

from pydantic import Field

QUOTED_PLACES = 12
COMPUTED_PLACES = 80

MAX_PRICE = Decimal("1e12")  # USDT per unit
MAX_QUANTITY = Decimal("1e15")  # units of an instrument (meme coins trade in billions)
MAX_VOLUME = Decimal("1e18")  # units traded in one candle
MAX_MONEY = Decimal("1e15")  # USDT: capital, PnL, equity, fees, limits
MAX_PERCENT = Decimal("1e6")  # a drawdown past 100 % (negative equity) stays representable
MAX_FIGURE = Decimal("1e15")  # a risk figure: a percentage, a rate, seconds, a price

# A price quoted by the market or the exchange, on the instrument's tick grid.
Price = Annotated[
    Decimal,
    Field(gt=0, le=MAX_PRICE, decimal_places=QUOTED_PLACES, allow_inf_nan=False),
]
# A price we computed (an average), or zero where there is none yet (no fill, no mark).
AveragePrice = Annotated[
    Decimal,
    Field(ge=0, le=MAX_PRICE, decimal_places=COMPUTED_PLACES, allow_inf_nan=False),
]
# An order or fill quantity: positive, on the instrument's step grid.
Quantity = Annotated[
    Decimal,
    Field(gt=0, le=MAX_QUANTITY, decimal_places=QUOTED_PLACES, allow_inf_nan=False),
]
# How much of an order has filled so far (zero before the first fill).
FilledQuantity = Annotated[
    Decimal,
    Field(ge=0, le=MAX_QUANTITY, decimal_places=QUOTED_PLACES, allow_inf_nan=False),
]
# A position: positive long, negative short.
SignedQuantity = Annotated[
    Decimal,
    Field(ge=-MAX_QUANTITY, le=MAX_QUANTITY, decimal_places=QUOTED_PLACES, allow_inf_nan=False),
]
Volume = Annotated[
    Decimal,
    Field(ge=0, le=MAX_VOLUME, decimal_places=QUOTED_PLACES, allow_inf_nan=False),
]
# USDT amounts that may be negative (PnL, equity).
Money = Annotated[
    Decimal,
    Field(ge=-MAX_MONEY, le=MAX_MONEY, decimal_places=COMPUTED_PLACES, allow_inf_nan=False),
]
# USDT amounts that cannot be negative (fees paid, capital, limits may be zero).
NonNegativeMoney = Annotated[
    Decimal,
    Field(ge=0, le=MAX_MONEY, decimal_places=COMPUTED_PLACES, allow_inf_nan=False),
]
PositiveMoney = Annotated[
    Decimal,
    Field(gt=0, le=MAX_MONEY, decimal_places=COMPUTED_PLACES, allow_inf_nan=False),
]
Percent = Annotated[
    Decimal,
    Field(ge=0, le=MAX_PERCENT, decimal_places=COMPUTED_PLACES, allow_inf_nan=False),
]
# A risk alert's value or threshold: a percentage, a rate, a count, seconds or a price.
Figure = Annotated[
    Decimal,
    Field(ge=-MAX_FIGURE, le=MAX_FIGURE, decimal_places=COMPUTED_PLACES, allow_inf_nan=False),
]
# A probability-like float (model confidence); JSON has no NaN, a string "nan" must not pass.
UnitFloat = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
