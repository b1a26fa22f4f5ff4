"""The paper exchange: fills MARKET orders at the latest candle close, with slippage and fees.

It answers like an exchange, never like a library: a bad order comes back as an ``OrderUpdate``
with status REJECTED and a bounded ``reason`` (``PaperRejectReason``), not as an exception, so the
execution service handles paper and Binance rejections on one path.

Pricing, chosen to never flatter a strategy:

* the fill price is the latest close moved against the taker by ``slippage_bps`` and then put on
  the tick grid adversely (a BUY rounds up, a SELL rounds down), floored at one tick;
* the fee is ``fill notional x fee_bps / 10_000``, rounded half up to 1e-8 USDT;
* the minimum-notional check uses the latest close, as Binance uses the last price for MARKET
  orders; reduce-only orders are exempt, as on Binance;
* liquidity is unlimited unless ``max_volume_share`` is given: then the orders on one candle
  fill at most that share of its volume together, and what an order finds no liquidity for
  expires (an IOC filled in part ends EXPIRED with its executed quantity, as on Binance).

Idempotency: a ``client_order_id`` is an order's identity. Submitting one that was seen before
(filled or rejected) creates nothing and returns the original execution again, with the same
fill ids, so a redelivered intent can never trade twice. The record of seen ids grows for the
life of the process, one small entry per order; a caller whose ids never repeat (a backtest)
can turn it off (``keep_executions=False``), and one whose intents were validated already can
have the fills and updates built without validating them again (``validate_messages=False``).

The exchange needs the account's net position per symbol only to enforce ``reduce_only`` like
Binance (an order that would open, increase or flip a position is rejected). In an execution
worker it reads them from the worker's exposure book (``positions``), the one owner of
positions there, so the two can never drift; standing alone (a backtest) it keeps its own from
its fills. All arithmetic runs in a private ``Decimal`` context, so results never depend on the
caller's global context.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Decimal, localcontext
from typing import NamedTuple

from qtrader.contracts.messages import (
    Build,
    Candle,
    Fill,
    OrderIntent,
    OrderStatus,
    OrderType,
    OrderUpdate,
    Side,
    trusted,
    validated,
)
from qtrader.exchange.errors import NotSent, Rejected
from qtrader.exchange.venue import VenueOrder
from qtrader.execution.clock import SYSTEM_CLOCK, Clock
from qtrader.health.contract import DependencyHealth, Status
from qtrader.instruments import ExchangeInfo, Instrument
from qtrader.money import EXACT as _EXACT
from qtrader.money import USDT_STEP as _USDT

EXCHANGE_NAME = "paper"
_BPS = Decimal(10_000)
_ZERO = Decimal(0)


class PaperRejectReason(enum.StrEnum):
    """Why the paper exchange rejected an order; the ``reason`` of the REJECTED update."""

    UNKNOWN_SYMBOL = "unknown_symbol"
    UNSUPPORTED_ORDER_TYPE = "unsupported_order_type"
    QUANTITY_OFF_STEP = "quantity_off_step"
    BELOW_MIN_QTY = "below_min_qty"
    NO_MARKET_PRICE = "no_market_price"
    REDUCE_ONLY_REJECTED = "reduce_only_rejected"
    BELOW_MIN_NOTIONAL = "below_min_notional"


class PaperExecution(NamedTuple):
    """What one ``submit`` produced: the order's final update and its fills (maybe none). A
    named tuple: one is made for every order."""

    final: OrderUpdate
    fills: tuple[Fill, ...]

    @property
    def updates(self) -> tuple[OrderUpdate, ...]:
        """The order's updates in order: NEW then the final one, or a rejection alone. The NEW
        is made when asked for: the venue reports only the final state, and an order costs
        less without it."""
        final = self.final
        if final.status is OrderStatus.REJECTED:
            return (final,)
        new = final.model_copy(
            update={
                "status": OrderStatus.NEW,
                "filled_quantity": _ZERO,
                "avg_price": _ZERO,
                "reason": None,
            }
        )
        return (new, final)


class PaperExchange:
    """A synchronous, deterministic exchange simulator for MARKET orders."""

    def __init__(
        self,
        *,
        exchange: ExchangeInfo,
        fee_bps: Decimal,
        slippage_bps: Decimal,
        positions: Callable[[str], Decimal] | None = None,
        keep_executions: bool = True,
        validate_messages: bool = True,
        max_volume_share: Decimal | None = None,
    ) -> None:
        if not fee_bps.is_finite() or fee_bps < 0:
            raise ValueError(f"fee_bps must be >= 0: {fee_bps}")
        if not slippage_bps.is_finite() or not 0 <= slippage_bps < _BPS:
            raise ValueError(f"slippage_bps must be in [0, 10000): {slippage_bps}")
        if max_volume_share is not None and not 0 < max_volume_share <= 1:
            raise ValueError(f"max_volume_share must be in (0, 1]: {max_volume_share}")
        # The liquidity of a candle: at most this share of its volume fills, over all orders
        # on it (None: no limit). What an order finds beyond it expires unfilled, as an IOC's
        # remainder does on an exchange: a partial fill.
        self._volume_share = max_volume_share
        self._taken: dict[str, tuple[int, Decimal]] = {}  # (candle open time, quantity filled)
        self._exchange = exchange
        self._fee_bps = fee_bps
        self._slippage_bps = slippage_bps
        self._closes: dict[str, Candle] = {}
        self._positions: dict[str, Decimal] = {}  # its own, when no ``positions`` source is given
        self._position_source = positions
        self._orders: dict[str, PaperExecution] = {}
        # A backtest, whose client order ids never repeat, keeps none: the record would grow
        # with the run, and the garbage collector walks it again and again.
        self._keep_executions = keep_executions
        # Off in a backtest: its intents were validated by ``decide`` and its closes checked
        # when read, so the fills and updates made of them are valid (``messages.trusted``).
        self._build: Build = validated
        if not validate_messages:
            self._build = trusted

    def on_candle(self, candle: Candle) -> None:
        """Remember ``candle``'s close as the symbol's price; an older candle is ignored."""
        latest = self._closes.get(candle.symbol)
        if latest is None or candle.open_time_ms >= latest.open_time_ms:
            self._closes[candle.symbol] = candle

    def latest_price(self, symbol: str) -> Decimal | None:
        candle = self._closes.get(symbol)
        return candle.close if candle else None

    def position(self, symbol: str) -> Decimal:
        """The account's signed net quantity of ``symbol``: from the source given, else what
        this exchange has filled."""
        if self._position_source is not None:
            return self._position_source(symbol)
        return self._positions.get(symbol, _ZERO)

    @property
    def open_orders(self) -> tuple[OrderUpdate, ...]:
        """Orders resting on the book: always none, MARKET orders fill or reject at once."""
        return ()

    def cancel_all(self, symbol: str | None = None) -> int:
        """Cancel resting orders (of ``symbol``, or all); returns how many: 0 for MARKET only."""
        return 0

    def execution(self, client_order_id: str) -> PaperExecution | None:
        """What the order with this client id did, or None if it was never submitted (or
        executions are not kept)."""
        return self._orders.get(client_order_id)

    def submit(self, intent: OrderIntent, *, now_ms: int) -> PaperExecution:
        """Execute ``intent`` now; a repeated ``client_order_id`` executes nothing.

        The repeat returns the first execution unchanged (same updates, same fill ids), so a
        caller that failed to publish them can publish them again and the bus drops what it
        already has: the order itself exists once.
        """
        seen = self._orders.get(intent.client_order_id)
        if seen is not None:
            return seen
        with localcontext(_EXACT):
            execution = self._execute(intent, now_ms)
        if self._keep_executions:
            self._orders[intent.client_order_id] = execution
        return execution

    # --- internals ----------------------------------------------------------------------------

    def _execute(self, intent: OrderIntent, now_ms: int) -> PaperExecution:
        reason = self._reject_reason(intent)
        if reason is not None:
            return PaperExecution(final=_rejected(intent, reason, now_ms), fills=())
        instrument = self._exchange.instrument(intent.symbol)
        candle = self._closes[intent.symbol]
        price = _fill_price(candle.close, intent.side, self._slippage_bps, instrument)
        build = self._build
        if not _within_limit(intent, price):
            expired = _update(
                build, intent, OrderStatus.EXPIRED, now_ms, reason="price beyond the limit"
            )
            return PaperExecution(final=expired, fills=())
        quantity = self._fillable(intent, candle, instrument)
        if quantity == 0:
            expired = _update(
                build, intent, OrderStatus.EXPIRED, now_ms, reason="no liquidity left"
            )
            return PaperExecution(final=expired, fills=())
        fill = build(
            Fill,
            fill_id=f"{EXCHANGE_NAME}-{intent.client_order_id}-1",
            client_order_id=intent.client_order_id,
            symbol=intent.symbol,
            side=intent.side,
            quantity=quantity,
            price=price,
            fee=_fee(quantity * price, self._fee_bps),
            reduce_only=intent.reduce_only,
            ts_ms=now_ms,
        )
        if self._position_source is None:  # else the source learns of the fill from its caller
            self._positions[intent.symbol] = self.position(intent.symbol) + (
                intent.side.sign * quantity
            )
        # An IOC whose remainder found no liquidity: filled in part, the rest expired.
        status, why = OrderStatus.FILLED, None
        if quantity < intent.quantity:
            status, why = OrderStatus.EXPIRED, "no liquidity left for the rest"
        done = _update(
            build, intent, status, now_ms,
            filled_quantity=quantity, avg_price=price, reason=why,
        )  # fmt: skip
        return PaperExecution(final=done, fills=(fill,))

    def _fillable(self, intent: OrderIntent, candle: Candle, instrument: Instrument) -> Decimal:
        """What of ``intent`` the candle's liquidity leaves (all of it without a limit), on the
        step grid; taken from it."""
        share = self._volume_share
        if share is None:
            return intent.quantity
        opened, taken = self._taken.get(intent.symbol, (candle.open_time_ms, _ZERO))
        if opened != candle.open_time_ms:  # a newer candle: its own liquidity
            taken = _ZERO
        left = candle.volume * share - taken
        quantity = intent.quantity
        if left < quantity:  # what is left is never negative: each take fits in it
            quantity = instrument.round_quantity(left)
        self._taken[intent.symbol] = (candle.open_time_ms, taken + quantity)
        return quantity

    def _reject_reason(self, intent: OrderIntent) -> PaperRejectReason | None:
        if intent.symbol not in self._exchange:
            return PaperRejectReason.UNKNOWN_SYMBOL
        if intent.order_type is OrderType.LIMIT and intent.limit_price is None:
            return PaperRejectReason.UNSUPPORTED_ORDER_TYPE
        instrument = self._exchange.instrument(intent.symbol)
        if intent.quantity % instrument.step_size != 0:
            return PaperRejectReason.QUANTITY_OFF_STEP
        if intent.quantity < instrument.min_qty:
            return PaperRejectReason.BELOW_MIN_QTY
        close = self.latest_price(intent.symbol)
        if close is None:
            return PaperRejectReason.NO_MARKET_PRICE
        if intent.reduce_only:
            return self._reduce_only_reason(intent)
        if intent.quantity * close < instrument.min_notional:
            return PaperRejectReason.BELOW_MIN_NOTIONAL
        return None

    def _reduce_only_reason(self, intent: OrderIntent) -> PaperRejectReason | None:
        position = self.position(intent.symbol)
        reduces = position != 0 and (position > 0) != (intent.side is Side.BUY)
        if not reduces or intent.quantity > abs(position):
            return PaperRejectReason.REDUCE_ONLY_REJECTED
        return None


def _within_limit(intent: OrderIntent, price: Decimal) -> bool:
    """A LIMIT order is IOC here: it fills only at its limit or better, else it expires."""
    limit = intent.limit_price
    if intent.order_type is not OrderType.LIMIT or limit is None:
        return True
    return price <= limit if intent.side is Side.BUY else price >= limit


def _fill_price(close: Decimal, side: Side, slippage_bps: Decimal, inst: Instrument) -> Decimal:
    """``close`` moved against the taker by the slippage, on the tick grid, adversely."""
    moved = close * (_BPS + side.sign * slippage_bps) / _BPS
    rounding = ROUND_CEILING if side is Side.BUY else ROUND_FLOOR
    ticks = (moved / inst.tick_size).to_integral_value(rounding=rounding)
    return (max(ticks, Decimal(1)) * inst.tick_size).quantize(inst.tick_size)


def _fee(notional: Decimal, fee_bps: Decimal) -> Decimal:
    return (notional * fee_bps / _BPS).quantize(_USDT, rounding=ROUND_HALF_UP)


def _update(
    build: Build,
    intent: OrderIntent,
    status: OrderStatus,
    now_ms: int,
    *,
    filled_quantity: Decimal = _ZERO,
    avg_price: Decimal = _ZERO,
    reason: str | None = None,
) -> OrderUpdate:
    return build(
        OrderUpdate,
        client_order_id=intent.client_order_id,
        intent_id=intent.intent_id,
        symbol=intent.symbol,
        side=intent.side,
        status=status,
        quantity=intent.quantity,
        filled_quantity=filled_quantity,
        avg_price=avg_price,
        exchange=EXCHANGE_NAME,
        reason=reason,
        ts_ms=now_ms,
    )


def _rejected(intent: OrderIntent, reason: PaperRejectReason, now_ms: int) -> OrderUpdate:
    return _update(validated, intent, OrderStatus.REJECTED, now_ms, reason=reason.value)


class PaperVenue:
    """The paper exchange behind the ``Venue`` interface the Binance adapter also implements."""

    name = EXCHANGE_NAME

    def __init__(
        self,
        paper: PaperExchange,
        exchange_info: ExchangeInfo,
        *,
        history: Callable[[str], tuple[Fill, ...]] = lambda client_order_id: (),
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._paper = paper
        self._exchange_info = exchange_info
        self._history = history
        self._clock = clock  # a backtest's: its orders fill at the candles' time

    @property
    def exchange_info(self) -> ExchangeInfo:
        return self._exchange_info

    async def start(self, symbols: Sequence[str]) -> list[VenueOrder]:
        return []  # nothing outlives the process: MARKET and IOC orders never rest

    async def place(self, order: OrderIntent, *, not_after_ms: int | None = None) -> VenueOrder:
        now_ms = self._clock.wall_ms()
        if not_after_ms is not None and now_ms > not_after_ms:
            raise NotSent(
                f"paper exchange: not sent, its deadline passed {now_ms - not_after_ms} ms ago"
            )
        execution = self._paper.submit(order, now_ms=now_ms)
        if execution.final.status is OrderStatus.REJECTED:
            raise Rejected(f"paper exchange: {execution.final.reason}")
        return _venue_order(execution)

    async def lookup(self, symbol: str, client_order_id: str) -> VenueOrder | None:
        """This run's order, or one a previous run filled (known from the FILLS stream)."""
        execution = self._paper.execution(client_order_id)
        if execution is not None:
            return _venue_order(execution)
        fills = self._history(client_order_id)
        if not fills:
            return None
        quantity = sum((f.quantity for f in fills), Decimal(0))
        notional = sum((f.quantity * f.price for f in fills), Decimal(0))
        return VenueOrder(
            client_order_id=client_order_id,
            order_id=client_order_id,
            symbol=symbol,
            status=OrderStatus.FILLED,
            executed_qty=quantity,
            avg_price=notional / quantity,
            fills=fills,
        )

    async def cancel_all(self, symbols: Sequence[str]) -> int:
        return sum(self._paper.cancel_all(symbol) for symbol in symbols)

    async def arm_dead_man(self, symbols: Sequence[str], countdown_ms: int) -> None:
        return None  # nothing rests on the paper exchange, so nothing to cancel

    async def refresh(self) -> None:
        return None  # the paper listing ships with the package

    def health(self) -> DependencyHealth:
        return DependencyHealth(name="exchange", status=Status.OK, detail="paper exchange")

    def limiter_health(self) -> DependencyHealth:
        return DependencyHealth(
            name="rate-limiter", status=Status.OK, detail="not needed: paper exchange"
        )

    async def close(self) -> None:
        return None


def _venue_order(execution: PaperExecution) -> VenueOrder:
    final = execution.final
    return VenueOrder(
        client_order_id=final.client_order_id,
        order_id=final.client_order_id,
        symbol=final.symbol,
        status=final.status,
        executed_qty=final.filled_quantity,
        avg_price=final.avg_price,
        fills=execution.fills,
    )
