"""Orders, validation, fills, trades, positions and the countdown dead-man's switch.

The market is one admin-set price per symbol, with unlimited liquidity unless a partial-fill
setting says otherwise:

* MARKET fills at the price; a LIMIT order crosses if BUY price >= price (SELL <=) and then fills
  at the price (taker). IOC's unfilled rest and an FOK that cannot fill completely are EXPIRED;
  GTC's rest stays on the book and fills at its own limit price (maker) when an admin price change
  crosses it.
* ``partial[symbol] = (ratio, count)``: the next ``count`` taker orders that cross fill only
  ``ratio`` of their quantity, rounded down to the step. A ratio of 0 is the order that meets
  no liquidity at all: an IOC (or MARKET) order then expires with nothing filled.

Validation answers with Binance's codes. The precision rule (Binance documents none): a price or
quantity with more decimal places than the filter's ``tickSize``/``stepSize`` string *as listed*
(``"0.0010"`` allows 4) is -1111; within that precision but off the grid it is -4014/-4023. That
mirrors Binance, whose ``pricePrecision`` usually equals the listed tick's decimals while the grid
can be coarser (UNIUSDT: 4 decimals, tick 0.001). Quantity below ``minQty`` is -4004, above
``maxQty`` -4005 (MARKET orders use MARKET_LOT_SIZE).

``newClientOrderId`` must be unique among the *open* orders of the account and symbol (-4116);
reusing one after the first order is final is accepted as a new order, as on Binance. Positions
are one-way (BOTH) and kept per API key and symbol; ``reduceOnly`` is checked against them.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from qtrader.instruments import ExchangeInfo, Instrument

from . import errors, events
from .config import BNB_SYMBOL, SimConfig
from .decimals import plain, to_step
from .klines import MarketHistory
from .ledger import Income, IncomeType, Ledger

CLIENT_ID = re.compile(r"^[\.A-Z\:/a-z0-9_-]{1,36}$")
_NUMBER = re.compile(r"^([0-9]{1,20})(\.[0-9]{1,20})?$")
_USDT = Decimal("1e-8")
BNB_DISCOUNT = Decimal("0.9")  # Binance: 10% off futures fees paid in BNB
Listener = Callable[[str, dict[str, Any]], None]  # (api key, user-data event)
_ZERO = Decimal(0)


class Status(enum.StrEnum):
    NEW = "NEW"
    PARTIALLY_FILLED = "PARTIALLY_FILLED"
    FILLED = "FILLED"
    CANCELED = "CANCELED"
    EXPIRED = "EXPIRED"


_OPEN = (Status.NEW, Status.PARTIALLY_FILLED)


@dataclass
class Order:
    order_id: int
    symbol: str
    client_order_id: str
    api_key: str
    side: str
    type: str
    time_in_force: str
    orig_qty: Decimal
    price: Decimal  # 0 for MARKET
    reduce_only: bool
    time_ms: int
    status: Status = Status.NEW
    executed_qty: Decimal = _ZERO
    cum_quote: Decimal = _ZERO
    update_time_ms: int = 0

    @property
    def is_open(self) -> bool:
        return self.status in _OPEN

    @property
    def remaining(self) -> Decimal:
        return self.orig_qty - self.executed_qty

    @property
    def signed(self) -> int:
        return 1 if self.side == "BUY" else -1

    def as_binance(self) -> dict[str, Any]:
        avg = self.cum_quote / self.executed_qty if self.executed_qty else _ZERO
        return {
            "orderId": self.order_id,
            "symbol": self.symbol,
            "status": self.status.value,
            "clientOrderId": self.client_order_id,
            "price": plain(self.price),
            "avgPrice": plain(avg.quantize(_USDT, ROUND_HALF_UP)),
            "origQty": plain(self.orig_qty),
            "executedQty": plain(self.executed_qty),
            "cumQty": plain(self.executed_qty),
            "cumQuote": plain(self.cum_quote),
            "timeInForce": self.time_in_force,
            "type": self.type,
            "origType": self.type,
            "reduceOnly": self.reduce_only,
            "closePosition": False,
            "side": self.side,
            "positionSide": "BOTH",
            "stopPrice": "0",
            "workingType": "CONTRACT_PRICE",
            "priceProtect": False,
            "priceMatch": "NONE",
            "selfTradePreventionMode": "NONE",
            "goodTillDate": 0,
            "time": self.time_ms,
            "updateTime": self.update_time_ms,
        }

    def acknowledged(self) -> dict[str, Any]:
        """The ACK answer: the order as accepted, before any matching."""
        body = self.as_binance()
        body.update(status="NEW", executedQty="0", cumQty="0", cumQuote="0", avgPrice="0")
        body["updateTime"] = self.time_ms
        return body


@dataclass(frozen=True, kw_only=True)
class Trade:
    trade_id: int
    order_id: int
    symbol: str
    api_key: str
    side: str
    price: Decimal
    qty: Decimal
    commission: Decimal
    maker: bool
    time_ms: int
    commission_asset: str = "USDT"
    realized_pnl: Decimal = _ZERO

    def as_binance(self) -> dict[str, Any]:
        return {
            "id": self.trade_id,
            "orderId": self.order_id,
            "symbol": self.symbol,
            "side": self.side,
            "positionSide": "BOTH",
            "price": plain(self.price),
            "qty": plain(self.qty),
            "quoteQty": plain(self.price * self.qty),
            "commission": plain(self.commission),
            "commissionAsset": self.commission_asset,
            "realizedPnl": plain(self.realized_pnl),
            "marginAsset": "USDT",
            "buyer": self.side == "BUY",
            "maker": self.maker,
            "time": self.time_ms,
        }


@dataclass
class Position:
    """A one-way position with an exact cost basis.

    ``cost`` is the signed sum of quantity x price of what is open (negative when short), so the
    unrealized PnL ``amount x mark - cost`` is exact. Reducing by ``q`` releases ``q/|amount|``
    of the cost (rounded to 8 places; all of it when the position closes), and the realized PnL
    is the fill's proceeds minus what was released: a round trip realizes exactly the sum of
    its fills' proceeds, whatever rounding happened on the way.
    """

    amount: Decimal = _ZERO  # signed: long > 0
    cost: Decimal = _ZERO

    @property
    def entry_price(self) -> Decimal:
        return to_step(self.cost / self.amount) if self.amount else _ZERO

    def unrealized(self, mark: Decimal) -> Decimal:
        return self.amount * mark - self.cost

    def apply(self, signed_qty: Decimal, price: Decimal) -> Decimal:
        """Book a fill; returns the PnL it realized."""
        realized = _ZERO
        if self.amount and (signed_qty > 0) != (self.amount > 0):
            closing = min(abs(signed_qty), abs(self.amount))
            whole = closing == abs(self.amount)
            released = self.cost if whole else to_step(self.cost * closing / abs(self.amount))
            closed = closing if signed_qty > 0 else -closing
            realized = -(closed * price) - released
            self.amount += closed
            self.cost -= released
            signed_qty -= closed
        if signed_qty:
            self.amount += signed_qty
            self.cost += signed_qty * price
        return realized


@dataclass
class Partial:
    ratio: Decimal
    count: int


@dataclass(frozen=True)
class _Grid:
    """The raw filter values the parsed ``Instrument`` does not keep."""

    price_decimals: int
    qty_decimals: int
    min_price: Decimal
    max_price: Decimal
    max_qty: Decimal
    market_min_qty: Decimal
    market_max_qty: Decimal
    market_step: Decimal


@dataclass
class Venue:
    """The matching engine and account state; every method runs without awaiting."""

    document: Mapping[str, Any]
    config: SimConfig
    prices: dict[str, Decimal] = field(default_factory=dict)
    partial: dict[str, Partial] = field(default_factory=dict)
    orders: dict[str, list[Order]] = field(default_factory=dict)  # per symbol, by orderId
    trades: list[Trade] = field(default_factory=list)
    positions: dict[tuple[str, str], Position] = field(default_factory=dict)
    countdowns: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    _trade_ids: dict[str, int] = field(default_factory=dict)
    # Indexes, so a long stress run stays linear: open orders per (api key, symbol) by orderId,
    # and the newest order per (api key, symbol, clientOrderId).
    _open: dict[tuple[str, str], dict[int, Order]] = field(default_factory=dict)
    _by_client_id: dict[tuple[str, str, str], Order] = field(default_factory=dict)
    # The notional each open order reserves, and its sum per api key (for the margin check).
    _reserved: dict[tuple[str, int], Decimal] = field(default_factory=dict)
    _reserved_total: dict[str, Decimal] = field(default_factory=dict)
    # Accounting: the market's start on the server clock, the ledger, and who hears events.
    start_ms: int = 0
    listener: Listener | None = None
    ledger: Ledger = field(default_factory=Ledger)

    def __post_init__(self) -> None:
        self.info = ExchangeInfo.from_binance(self.document)
        self._grids = {raw["symbol"]: _grid(raw) for raw in self.document.get("symbols", [])}
        self.history = MarketHistory(self.start_ms)
        self.sync_prices(self.start_ms)
        self.fee_burn = set(self.config.fee_burn)
        self.funding_rates = dict(self.config.funding_rates)
        interval = self.config.funding_interval_ms
        self.next_funding_ms = self.start_ms - self.start_ms % interval + interval

    def sync_prices(self, now_ms: int) -> None:
        """Record each symbol's price in the history (after start-up or a config change)."""
        for symbol in sorted(self._grids):
            self.history.record_price(symbol, self.price(symbol), now_ms)

    # --- prices and liquidity ---------------------------------------------------------------

    def price(self, symbol: str) -> Decimal:
        return self.prices.get(symbol, self.config.price_for(symbol))

    def set_price(self, symbol: str, price: Decimal, now_ms: int) -> list[Order]:
        """Move the market; resting orders it crosses fill at their own price. Returns them."""
        self._instrument(symbol)
        if price <= 0:
            raise errors.rejected(errors.PRICE_NOT_POSITIVE)
        self.prices[symbol] = price
        self.history.record_price(symbol, price, now_ms)
        resting = [o for (_, s), book in self._open.items() if s == symbol for o in book.values()]
        filled = []
        for order in sorted(resting, key=lambda o: o.order_id):
            if self._crosses(order, price):
                self._fill_resting(order, now_ms)
                self._settle(order)
                filled.append(order)
        return filled

    def set_partial(self, symbol: str, ratio: Decimal, count: int) -> None:
        self._instrument(symbol)
        if not (_ZERO <= ratio <= 1) or count < 0:
            raise ValueError("partial needs 0 <= ratio <= 1 and count >= 0")
        self.partial[symbol] = Partial(ratio, count)

    # --- orders --------------------------------------------------------------------------------

    def place(self, api_key: str, params: Mapping[str, str], now_ms: int) -> tuple[Order, bool]:
        """Validate, book and match a new order; returns it and whether RESULT was asked for."""
        symbol = self._symbol(params)
        instrument = self._instrument(symbol)
        grid = self._grids[symbol]
        side = _one_of(params, "side", ("BUY", "SELL"), errors.INVALID_SIDE)
        order_type = _one_of(params, "type", ("MARKET", "LIMIT"), errors.INVALID_ORDER_TYPE)
        quantity = _decimal(params, "quantity")
        if order_type == "LIMIT":
            price = _decimal(params, "price")
            tif = _one_of(params, "timeInForce", ("GTC", "IOC", "FOK"), errors.INVALID_TIF)
        else:
            for name in ("price", "timeInForce"):
                if name in params:
                    raise errors.not_required(name)
            price, tif = _ZERO, "GTC"
        order_id = self._next_order_id(symbol)
        client_id = params.get("newClientOrderId") or f"sim-auto-{symbol}-{order_id}"[:36]
        if not CLIENT_ID.match(client_id):
            raise errors.rejected(errors.CLIENT_ID_INVALID)
        resp_type = params.get("newOrderRespType", "ACK")
        if resp_type not in ("ACK", "RESULT"):
            raise errors.rejected(errors.INVALID_RESP_TYPE)
        reduce_only = _boolean(params, "reduceOnly")
        if order_type == "LIMIT":
            _check_price(price, instrument, grid)
        _check_quantity(quantity, order_type, instrument, grid)
        previous = self._by_client_id.get((api_key, symbol, client_id))
        if previous is not None and previous.is_open:
            raise errors.rejected(errors.CLIENT_ID_DUPLICATE)
        signed = quantity if side == "BUY" else -quantity
        if reduce_only:
            self._check_reduces(api_key, symbol, signed)
        notional = quantity * (price if order_type == "LIMIT" else self.price(symbol))
        if not reduce_only:
            if notional < instrument.min_notional:
                raise errors.bad_request(
                    -4164,
                    f"Order's notional must be no smaller than {plain(instrument.min_notional)} "
                    "(unless you choose reduce only).",
                )
            if notional / self.config.leverage > self.available_balance(api_key):
                raise errors.rejected(errors.MARGIN_INSUFFICIENT)
        order = Order(
            order_id=order_id,
            symbol=symbol,
            client_order_id=client_id,
            api_key=api_key,
            side=side,
            type=order_type,
            time_in_force=tif,
            orig_qty=quantity,
            price=price,
            reduce_only=reduce_only,
            time_ms=now_ms,
            update_time_ms=now_ms,
        )
        self.orders.setdefault(symbol, []).append(order)
        self._by_client_id[(api_key, symbol, client_id)] = order
        self._open.setdefault((api_key, symbol), {})[order_id] = order
        self._order_event(order, "NEW", now_ms)
        self._take(order, now_ms)
        self._settle(order)
        return order, resp_type == "RESULT"

    def query(self, api_key: str, params: Mapping[str, str]) -> Order:
        order = self._find(api_key, params)
        if order is None:
            raise errors.rejected(errors.NO_SUCH_ORDER)
        return order

    def cancel(self, api_key: str, params: Mapping[str, str], now_ms: int) -> Order:
        order = self._find(api_key, params)
        if order is None or not order.is_open:
            raise errors.rejected(errors.CANCEL_REJECTED)
        self._close(order, Status.CANCELED, now_ms)
        return order

    def open_orders(self, api_key: str, symbol: str | None) -> list[Order]:
        if symbol is not None:
            return list(self._open.get((api_key, self.require_symbol(symbol)), {}).values())
        return [
            o
            for (key, _), book in sorted(self._open.items())
            if key == api_key
            for o in book.values()
        ]

    def cancel_all(self, api_key: str, symbol: str, now_ms: int) -> list[Order]:
        cancelled = list(self._open.get((api_key, symbol), {}).values())
        for order in cancelled:
            self._close(order, Status.CANCELED, now_ms)
        return cancelled

    def user_trades(self, api_key: str, params: Mapping[str, str]) -> list[Trade]:
        symbol = self._symbol(params)
        order_id = _optional_int(params, "orderId")
        from_id = _optional_int(params, "fromId")
        limit = _optional_int(params, "limit") or 500
        if not 1 <= limit <= 1000:
            raise errors.invalid_value("limit")
        found = [
            t
            for t in self.trades
            if t.api_key == api_key
            and t.symbol == symbol
            and (order_id is None or t.order_id == order_id)
            and (from_id is None or t.trade_id >= from_id)
        ]
        return found[:limit] if from_id is not None else found[-limit:]

    # --- countdown cancel-all ------------------------------------------------------------------

    def set_countdown(self, api_key: str, params: Mapping[str, str], now_ms: int) -> dict[str, str]:
        symbol = self._symbol(params)
        countdown = _optional_int(params, "countdownTime")
        if countdown is None:
            raise errors.mandatory("countdownTime")
        if countdown < 0:
            raise errors.invalid_value("countdownTime")
        if countdown == 0:
            self.countdowns.pop((api_key, symbol), None)
        else:
            self.countdowns[(api_key, symbol)] = (now_ms + countdown, countdown)
        return {"symbol": symbol, "countdownTime": str(countdown)}

    def expire_countdowns(self, now_ms: int) -> list[Order]:
        """Cancel the open orders of every countdown that ran out unrefreshed."""
        cancelled = []
        for (api_key, symbol), (deadline, _) in list(self.countdowns.items()):
            if now_ms >= deadline:
                del self.countdowns[(api_key, symbol)]
                cancelled += self.cancel_all(api_key, symbol, now_ms)
        return cancelled

    # --- account -------------------------------------------------------------------------------

    def wallet(self, api_key: str, asset: str = "USDT") -> Decimal:
        """The start-up balance of ``asset`` plus everything booked to it."""
        start = {"USDT": self.config.balance, "BNB": self.config.bnb_balance}.get(asset, _ZERO)
        return start + self.ledger.total(api_key, asset)

    def wallet_balance(self, api_key: str) -> Decimal:
        return self.wallet(api_key, "USDT")

    def used_margin(self, api_key: str) -> Decimal:
        leverage = self.config.leverage
        positions = sum(
            (
                abs(p.amount) * self.price(symbol)
                for (key, symbol), p in self.positions.items()
                if key == api_key
            ),
            _ZERO,
        )
        return (positions + self._reserved_total.get(api_key, _ZERO)) / leverage

    def available_balance(self, api_key: str) -> Decimal:
        return self.wallet_balance(api_key) + self.unrealized(api_key) - self.used_margin(api_key)

    def unrealized(self, api_key: str) -> Decimal:
        return sum(
            (
                p.unrealized(self.price(symbol))
                for (key, symbol), p in self.positions.items()
                if key == api_key
            ),
            _ZERO,
        )

    def transfer(
        self, api_key: str, asset: str, amount: Decimal, now_ms: int, *, income_delay_ms: int = 0
    ) -> Income:
        """An admin deposit (amount > 0) or withdrawal into the futures wallet; its income row
        shows ``income_delay_ms`` after it (0: at once)."""
        if api_key not in self.config.api_keys:
            raise ValueError(f"unknown api key {api_key!r}")
        if asset not in ("USDT", "BNB") or amount == 0:
            raise ValueError("transfer needs asset USDT or BNB and a non-zero amount")
        if amount != to_step(amount) or self.wallet(api_key, asset) + amount < 0:
            raise ValueError("transfer amount has more than 8 decimals or exceeds the wallet")
        entry = self.ledger.book(
            api_key=api_key,
            income_type=IncomeType.TRANSFER,
            amount=amount,
            asset=asset,
            time_ms=now_ms,
            info="DEPOSIT" if amount > 0 else "WITHDRAW",
            listed_from_ms=now_ms + income_delay_ms,
        )
        balance = events.balance(asset, self.wallet(api_key, asset), amount)
        self._account_event(api_key, entry.info, now_ms, [balance], [])
        return entry

    def set_funding_rate(self, symbol: str, rate: Decimal) -> None:
        self._instrument(symbol)
        self.funding_rates[symbol] = rate

    def settle_funding(self, funding_ms: int, symbol: str | None = None) -> list[Income]:
        """Charge funding on every open position (of ``symbol`` only, if given) at the mark
        price: ``-amount x mark x rate``, so longs pay a positive rate and shorts receive it."""
        booked = []
        for (api_key, held), position in sorted(self.positions.items()):
            rate = self.funding_rates.get(held, _ZERO)
            if position.amount == 0 or rate == 0 or symbol not in (None, held):
                continue
            amount = to_step(-position.amount * self.price(held) * rate)
            if amount == 0:
                continue
            entry = self.ledger.book(
                api_key=api_key,
                income_type=IncomeType.FUNDING_FEE,
                amount=amount,
                asset="USDT",
                time_ms=funding_ms,
                symbol=held,
            )
            balance = events.balance("USDT", self.wallet_balance(api_key))
            self._account_event(api_key, "FUNDING_FEE", funding_ms, [balance], [])
            booked.append(entry)
        return booked

    def funding_due(self, now_ms: int) -> list[Income]:
        """Settle every scheduled funding time (multiples of the interval) up to ``now_ms``."""
        booked = []
        while self.next_funding_ms <= now_ms:
            booked += self.settle_funding(self.next_funding_ms)
            self.next_funding_ms += self.config.funding_interval_ms
        return booked

    def set_fee_burn(self, api_key: str, enabled: bool) -> None:
        """Pay commissions in BNB (when the BNB wallet covers them), like Binance's BNB burn."""
        if enabled:
            self.fee_burn.add(api_key)
        else:
            self.fee_burn.discard(api_key)

    def book_notional(self, api_key: str, symbol: str) -> tuple[Decimal, Decimal]:
        """The open BUY and SELL notional of the account's orders on ``symbol``."""
        book = self._open.get((api_key, symbol), {}).values()
        bids = sum((o.remaining * o.price for o in book if o.side == "BUY"), _ZERO)
        asks = sum((o.remaining * o.price for o in book if o.side == "SELL"), _ZERO)
        return bids, asks

    def position_view(self, api_key: str, symbol: str) -> events.PositionView:
        position = self.positions.get((api_key, symbol), Position())
        return events.PositionView(
            symbol=symbol,
            amount=position.amount,
            entry_price=position.entry_price,
            realized=self.ledger.realized(api_key, symbol),
            unrealized=position.unrealized(self.price(symbol)),
        )

    # --- internals -----------------------------------------------------------------------------

    def require_symbol(self, symbol: str | None) -> str:
        """A listed symbol, else Binance's error for a missing (-1102) or unknown (-1121) one."""
        if not symbol:
            raise errors.mandatory("symbol")
        self._instrument(symbol)
        return symbol

    def _symbol(self, params: Mapping[str, str]) -> str:
        return self.require_symbol(params.get("symbol"))

    def _instrument(self, symbol: str) -> Instrument:
        if symbol not in self.info or symbol not in self._grids:
            raise errors.rejected(errors.INVALID_SYMBOL)
        return self.info.instrument(symbol)

    def _find(self, api_key: str, params: Mapping[str, str]) -> Order | None:
        symbol = self._symbol(params)
        order_id = _optional_int(params, "orderId")
        client_id = params.get("origClientOrderId")
        if order_id is None and not client_id:
            raise errors.bad_request(
                -1102,
                "Param 'orderId' or 'origClientOrderId' must be sent, but both were empty/null!",
            )
        if order_id is not None:
            orders = self.orders.get(symbol, [])
            order = orders[order_id - 1] if 0 < order_id <= len(orders) else None
        else:
            order = self._by_client_id.get((api_key, symbol, str(client_id)))
        if order is None or order.api_key != api_key:
            return None
        if client_id and order.client_order_id != client_id:
            return None
        return order

    def _next_order_id(self, symbol: str) -> int:
        return len(self.orders.get(symbol, [])) + 1

    def _check_reduces(self, api_key: str, symbol: str, signed: Decimal) -> None:
        held = self.positions.get((api_key, symbol), Position()).amount
        reduces = held != 0 and (signed > 0) != (held > 0) and abs(signed) <= abs(held)
        if not reduces:
            raise errors.rejected(errors.REDUCE_ONLY_REJECTED)

    def _crosses(self, order: Order, price: Decimal) -> bool:
        if order.type == "MARKET":
            return True
        return order.price >= price if order.side == "BUY" else order.price <= price

    def _take(self, order: Order, now_ms: int) -> None:
        """Match an arriving order against the market as taker."""
        market = self.price(order.symbol)
        if self._crosses(order, market):
            quantity = order.remaining
            setting = self.partial.get(order.symbol)
            if setting is not None and setting.count > 0:
                setting.count -= 1
                step = self._instrument(order.symbol).step_size
                quantity = (quantity * setting.ratio / step).to_integral_value(ROUND_DOWN) * step
            if order.time_in_force == "FOK" and quantity < order.remaining:
                quantity = _ZERO
            if quantity > 0:
                self._fill(order, quantity, market, maker=False, now_ms=now_ms)
        if order.remaining == 0:
            order.status = Status.FILLED
        elif order.type == "MARKET" or order.time_in_force in ("IOC", "FOK"):
            self._close(order, Status.EXPIRED, now_ms)

    def _fill_resting(self, order: Order, now_ms: int) -> None:
        quantity = order.remaining
        if order.reduce_only:  # never let a resting reduce-only order open or flip a position
            held = self.positions.get((order.api_key, order.symbol), Position()).amount
            reducing = held != 0 and (held > 0) != (order.side == "BUY")
            quantity = min(quantity, abs(held)) if reducing else _ZERO
        if quantity > 0:
            self._fill(order, quantity, order.price, maker=True, now_ms=now_ms)
        if order.remaining == 0:
            order.status = Status.FILLED
        elif quantity == 0 or order.reduce_only:
            self._close(order, Status.EXPIRED, now_ms)

    def _fill(
        self, order: Order, qty: Decimal, price: Decimal, *, maker: bool, now_ms: int
    ) -> None:
        commission, asset = self._commission(order.api_key, qty * price, maker=maker)
        position = self.positions.setdefault((order.api_key, order.symbol), Position())
        realized = position.apply(qty * order.signed, price)
        trade_id = self._trade_ids.get(order.symbol, 0) + 1
        self._trade_ids[order.symbol] = trade_id
        trade = Trade(
            trade_id=trade_id,
            order_id=order.order_id,
            symbol=order.symbol,
            api_key=order.api_key,
            side=order.side,
            price=price,
            qty=qty,
            commission=commission,
            maker=maker,
            time_ms=now_ms,
            commission_asset=asset,
            realized_pnl=realized,
        )
        self.trades.append(trade)
        self.history.record_trade(trade)
        order.executed_qty += qty
        order.cum_quote += qty * price
        order.status = Status.FILLED if order.remaining == 0 else Status.PARTIALLY_FILLED
        order.update_time_ms = now_ms
        self._book_trade(trade)
        self._settle(order)
        self._order_event(order, "TRADE", now_ms, trade)
        balances = [events.balance("USDT", self.wallet_balance(order.api_key))]
        if asset != "USDT":
            balances.append(events.balance(asset, self.wallet(order.api_key, asset)))
        view = events.position(self.position_view(order.api_key, order.symbol))
        self._account_event(order.api_key, "ORDER", now_ms, balances, [view])

    def _commission(self, api_key: str, notional: Decimal, *, maker: bool) -> tuple[Decimal, str]:
        """The fee and its asset: BNB at a 10% discount for a BNB-burn account that can pay."""
        fee = notional * (self.config.maker_fee if maker else self.config.taker_fee)
        if api_key in self.fee_burn:
            in_bnb = to_step(fee * BNB_DISCOUNT / self.price(BNB_SYMBOL))
            if in_bnb <= self.wallet(api_key, "BNB"):
                return in_bnb, "BNB"
        return to_step(fee), "USDT"

    def _book_trade(self, trade: Trade) -> None:
        booked = (
            (IncomeType.REALIZED_PNL, trade.realized_pnl, "USDT"),
            (IncomeType.COMMISSION, -trade.commission, trade.commission_asset),
        )
        for income_type, amount, asset in booked:
            if amount:
                self.ledger.book(
                    api_key=trade.api_key,
                    income_type=income_type,
                    amount=amount,
                    asset=asset,
                    time_ms=trade.time_ms,
                    symbol=trade.symbol,
                    trade_id=str(trade.trade_id),
                )

    def _close(self, order: Order, status: Status, now_ms: int) -> None:
        order.status = status
        order.update_time_ms = now_ms
        self._settle(order)
        self._order_event(order, status.value, now_ms)

    def _order_event(
        self, order: Order, execution: str, now_ms: int, trade: Trade | None = None
    ) -> None:
        if self.listener is None:
            return
        notional = self.book_notional(order.api_key, order.symbol)
        event = events.order_update(
            order, execution=execution, now_ms=now_ms, trade=trade, book_notional=notional
        )
        self.listener(order.api_key, event)

    def _account_event(
        self,
        api_key: str,
        reason: str,
        now_ms: int,
        balances: list[dict[str, str]],
        positions: list[dict[str, str]],
    ) -> None:
        if self.listener is not None:
            event = events.account_update(
                reason=reason, now_ms=now_ms, balances=balances, positions=positions
            )
            self.listener(api_key, event)

    def _settle(self, order: Order) -> None:
        """Bring the indexes up to date after ``order`` was booked, filled or closed."""
        if not order.is_open:
            self._open.get((order.api_key, order.symbol), {}).pop(order.order_id, None)
        reserves = order.is_open and not order.reduce_only
        new = order.remaining * order.price if reserves else _ZERO
        old = self._reserved.pop((order.symbol, order.order_id), _ZERO)
        if new:
            self._reserved[(order.symbol, order.order_id)] = new
        if new != old:
            total = self._reserved_total.get(order.api_key, _ZERO)
            self._reserved_total[order.api_key] = total + new - old


def _grid(raw: Mapping[str, Any]) -> _Grid:
    filters = {f["filterType"]: f for f in raw.get("filters", [])}
    price_filter, lot = filters["PRICE_FILTER"], filters["LOT_SIZE"]
    market = filters.get("MARKET_LOT_SIZE", lot)
    return _Grid(
        price_decimals=_decimals(price_filter["tickSize"]),
        qty_decimals=_decimals(lot["stepSize"]),
        min_price=Decimal(price_filter.get("minPrice", "0")),
        max_price=Decimal(price_filter.get("maxPrice", "0")),
        max_qty=Decimal(lot.get("maxQty", "0")),
        market_min_qty=Decimal(market["minQty"]),
        market_max_qty=Decimal(market.get("maxQty", "0")),
        market_step=Decimal(market["stepSize"]),
    )


def _decimals(listed: str) -> int:
    """Decimal places of a filter value as written: ``"0.0010"`` -> 4, ``"1"`` -> 0."""
    return len(listed.partition(".")[2])


def _check_price(price: Decimal, instrument: Instrument, grid: _Grid) -> None:
    if price <= 0:
        raise errors.rejected(errors.PRICE_NOT_POSITIVE)
    if _places(price) > grid.price_decimals:
        raise errors.rejected(errors.BAD_PRECISION)
    if grid.min_price and price < grid.min_price:
        raise errors.rejected(errors.PRICE_BELOW_MIN)
    if grid.max_price and price > grid.max_price:
        raise errors.rejected(errors.PRICE_ABOVE_MAX)
    if (price - grid.min_price) % instrument.tick_size != 0:
        raise errors.rejected(errors.PRICE_OFF_TICK)


def _check_quantity(qty: Decimal, order_type: str, instrument: Instrument, grid: _Grid) -> None:
    if qty <= 0:
        raise errors.rejected(errors.QTY_NOT_POSITIVE)
    if _places(qty) > grid.qty_decimals:
        raise errors.rejected(errors.BAD_PRECISION)
    market = order_type == "MARKET"
    min_qty = grid.market_min_qty if market else instrument.min_qty
    max_qty = grid.market_max_qty if market else grid.max_qty
    step = grid.market_step if market else instrument.step_size
    if qty < min_qty:
        raise errors.rejected(errors.QTY_BELOW_MIN)
    if max_qty and qty > max_qty:
        raise errors.rejected(errors.QTY_ABOVE_MAX)
    if (qty - min_qty) % step != 0:
        raise errors.rejected(errors.QTY_OFF_STEP)


def _places(value: Decimal) -> int:
    exponent = value.normalize().as_tuple().exponent
    assert isinstance(exponent, int)
    return max(0, -exponent)


def _one_of(
    params: Mapping[str, str], name: str, allowed: tuple[str, ...], error: tuple[int, str]
) -> str:
    value = params.get(name)
    if not value:
        raise errors.mandatory(name)
    if value not in allowed:
        raise errors.rejected(error)
    return value


def _decimal(params: Mapping[str, str], name: str) -> Decimal:
    value = params.get(name)
    if not value:
        raise errors.mandatory(name)
    if not _NUMBER.match(value):
        raise errors.illegal_chars(name)
    try:
        return Decimal(value)
    except InvalidOperation:
        raise errors.illegal_chars(name) from None


def _boolean(params: Mapping[str, str], name: str) -> bool:
    value = params.get(name, "false").lower()
    if value not in ("true", "false"):
        raise errors.invalid_value(name)
    return value == "true"


def _optional_int(params: Mapping[str, str], name: str) -> int | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    if not value.lstrip("-").isdigit():
        raise errors.invalid_value(name)
    return int(value)
