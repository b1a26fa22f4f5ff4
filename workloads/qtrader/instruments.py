"""Instruments and their trading filters, parsed from Binance's exchangeInfo format.

The paper exchange ships its own exchangeInfo document (``data/paper_exchange_info.json``) in
exactly the format of ``GET /fapi/v1/exchangeInfo``, so the paper and the Binance paths share this
one parser, the same rounding and the same checks. Rounding is always toward zero with
``Decimal``: an order is never made larger than what was decided, and an off-grid price or
quantity never reaches an exchange.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal
from importlib import resources
from typing import Any

from qtrader.money import EXACT_DOWN


class InstrumentError(ValueError):
    """An exchangeInfo document that lacks a filter this system relies on."""


@dataclass(frozen=True, kw_only=True)
class Instrument:
    symbol: str
    tick_size: Decimal
    step_size: Decimal
    min_qty: Decimal
    min_notional: Decimal

    def round_price(self, price: Decimal) -> Decimal:
        """``price`` toward zero onto the tick grid."""
        return _toward_zero(price, self.tick_size, power_of_ten=self._tick_power_of_ten)

    def round_quantity(self, quantity: Decimal) -> Decimal:
        """``quantity`` (signed) toward zero onto the step grid: never more than asked."""
        return _toward_zero(quantity, self.step_size, power_of_ten=self._step_power_of_ten)

    @functools.cached_property
    def _tick_power_of_ten(self) -> bool:
        return _power_of_ten(self.tick_size)

    @functools.cached_property
    def _step_power_of_ten(self) -> bool:
        return _power_of_ten(self.step_size)


def _toward_zero(value: Decimal, grid: Decimal, *, power_of_ten: bool) -> Decimal:
    """``value`` rounded toward zero to a multiple of ``grid``, written with ``grid``'s
    exponent (``0.016`` for a grid of ``0.001``), never across a grid line.

    The arithmetic runs in ``EXACT_DOWN`` whatever the caller's context: a division rounding to
    nearest would make 17 of a quotient of more digits than the precision (``16.99...9``)
    before the truncation, a multiple above ``value``. On a grid that is a power of ten (every
    listed step and tick so far) one ``quantize`` truncates to the same number, at a third of
    the cost (a backtest rounds a few times per decision).
    """
    if power_of_ten:
        return value.quantize(grid, context=EXACT_DOWN)
    units = EXACT_DOWN.divide(value, grid).to_integral_value(
        rounding=ROUND_DOWN, context=EXACT_DOWN
    )
    return EXACT_DOWN.quantize(EXACT_DOWN.multiply(units, grid), grid)


def _power_of_ten(grid: Decimal) -> bool:
    """``1E<n>`` as written: ``0.001`` is, ``0.0010`` is not (its multiples have 4 places)."""
    return grid.as_tuple().digits == (1,)


@dataclass(frozen=True)
class ExchangeInfo:
    instruments: Mapping[str, Instrument]

    def __contains__(self, symbol: object) -> bool:
        return symbol in self.instruments

    def instrument(self, symbol: str) -> Instrument:
        try:
            return self.instruments[symbol]
        except KeyError:
            raise InstrumentError(f"symbol {symbol} is not listed by the exchange") from None

    def unlisted(self, symbols: tuple[str, ...] | list[str]) -> list[str]:
        return [s for s in symbols if s not in self.instruments]

    @classmethod
    def from_binance(cls, document: Mapping[str, Any]) -> ExchangeInfo:
        instruments = {}
        for raw in document.get("symbols", []):
            if raw.get("status", "TRADING") != "TRADING":
                continue
            instrument = _parse_symbol(raw)
            instruments[instrument.symbol] = instrument
        return cls(instruments=instruments)


def _parse_symbol(raw: Mapping[str, Any]) -> Instrument:
    symbol = raw["symbol"]
    filters = {f["filterType"]: f for f in raw.get("filters", [])}
    try:
        price_filter = filters["PRICE_FILTER"]
        lot_size = filters["LOT_SIZE"]
    except KeyError as exc:
        raise InstrumentError(f"{symbol}: exchangeInfo lacks the {exc.args[0]} filter") from None
    notional = filters.get("MIN_NOTIONAL", {}).get("notional", "0")
    return Instrument(
        symbol=symbol,
        tick_size=Decimal(price_filter["tickSize"]).normalize(),
        step_size=Decimal(lot_size["stepSize"]).normalize(),
        min_qty=Decimal(lot_size["minQty"]),
        min_notional=Decimal(notional),
    )


def paper_exchange_info() -> ExchangeInfo:
    """The paper exchange's listing: the instruments it trades and their filters."""
    text = resources.files("qtrader").joinpath("data/paper_exchange_info.json").read_text()
    return ExchangeInfo.from_binance(json.loads(text))
