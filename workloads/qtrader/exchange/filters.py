"""An order made to fit the symbol's filters before it is sent, or refused with a clear reason.

Quantities are rounded down to the step (never larger than decided). A limit price is rounded
to the tick on the side that keeps it inside the decided bound: a BUY's cap rounds down, a
SELL's floor rounds up. What still breaks a filter after rounding (below the minimum quantity or
notional) raises ``FilterViolation`` here, so an off-grid or too-small order never reaches
Binance (-1111, -4014, -4023, -4164 are the exchange's own answers to those).
"""

from __future__ import annotations

from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

from qtrader.contracts.messages import OrderIntent, OrderType, Side
from qtrader.exchange.errors import FilterViolation
from qtrader.instruments import Instrument


def prepare_order(order: OrderIntent, instrument: Instrument) -> OrderIntent:
    quantity = instrument.round_quantity(order.quantity)
    if quantity < instrument.min_qty or quantity <= 0:
        raise FilterViolation(
            f"{order.symbol}: quantity {order.quantity} rounds to {quantity}, "
            f"below the minimum {instrument.min_qty}"
        )
    price = order.reference_price
    limit_price = order.limit_price
    if order.order_type is OrderType.LIMIT and limit_price is not None:
        limit_price = _limit_on_tick(limit_price, order.side, instrument.tick_size)
        price = limit_price
    notional = quantity * price
    if not order.reduce_only and notional < instrument.min_notional:
        raise FilterViolation(
            f"{order.symbol}: notional {notional} below the minimum {instrument.min_notional}"
        )
    return order.model_copy(update={"quantity": quantity, "limit_price": limit_price})


def _limit_on_tick(price: Decimal, side: Side, tick: Decimal) -> Decimal:
    rounding = ROUND_FLOOR if side is Side.BUY else ROUND_CEILING
    ticks = (price / tick).to_integral_value(rounding=rounding)
    if ticks < 1:
        raise FilterViolation(f"limit price {price} is below one tick ({tick})")
    return (ticks * tick).quantize(tick)
