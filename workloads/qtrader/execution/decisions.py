"""The pre-trade decision: turn one signal into one order intent, or a denial saying why.

The strategy is "target position": LONG wants a long of about ``risk.max_position_usd`` notional,
SHORT the same short, FLAT nothing. The order is the difference between that target and the
current position. Because the order is derived from the position, a redelivered or repeated
signal after the fill asks for no change, which makes signals naturally idempotent.

The positions a decision sees (``DecisionContext.positions``) are the exposure book's projection:
fills plus everything in flight. The book re-checks every order at send time anyway
(``exposure.py``); the decision only sizes on the best view there is.

``decide`` is a pure function of its inputs (the caller passes the clock as ``now_ms`` and the
portfolio as a ``DecisionContext``), so a decision can be replayed and tested exactly. A denial
is an ordinary result carrying a ``DenialReason`` from a small fixed set (a metric label) and a
human-readable detail. The checks run in a fixed order and the first failing one wins; anything
unknown (price, equity) fails closed.

Choices worth knowing:

* The target quantity is sized at the slippage bound above the current price (the limit the
  order is sent at) and rounded toward zero to the step before subtracting, so the position
  after the order never exceeds ``max_position_usd`` at any price the order can fill at.
* An order that only reduces the position (same symbol, opposite side, not past zero) is marked
  ``reduce_only`` and is exempt from the exposure limits (open positions, position size,
  leverage, minimum notional): refusing to de-risk never makes a portfolio safer.
* In the REDUCING state an order that would flip the position through zero is cut down to
  closing it (the exposure-reducing half of what the signal asked), an order that would open or
  increase a position is denied with ``reducing_only``.
"""

from __future__ import annotations

import enum
import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, localcontext
from types import MappingProxyType
from typing import NamedTuple

from qtrader.contracts.messages import (
    Build,
    Direction,
    OrderIntent,
    OrderType,
    Side,
    Signal,
    TradingState,
    validated,
)
from qtrader.contracts.policy import TradingPolicySpec
from qtrader.instruments import ExchangeInfo, Instrument
from qtrader.money import EXACT as _EXACT

_ZERO = Decimal(0)
_INTENT_ID_MAX = 128
# Every client order id this system sends begins with it: what is ours at a venue.
CLIENT_ORDER_ID_PREFIX = "qt-"
_BPS = Decimal(10_000)
_NOTHING: Mapping[str, Decimal] = MappingProxyType({})


class DenialReason(enum.StrEnum):
    """Why a signal did not become an order; bounded, used as a metric label."""

    HALTED = "halted"
    BACKLOG_FULL = "backlog_full"
    DUPLICATE_INTENT = "duplicate_intent"  # decided before: the book already counts it
    SYMBOL_NOT_ALLOWED = "symbol_not_allowed"
    SIGNAL_EXPIRED = "signal_expired"
    LOW_CONFIDENCE = "low_confidence"
    NO_MARKET_PRICE = "no_market_price"
    STALE_MARKET_DATA = "stale_market_data"
    NO_EQUITY = "no_equity"
    NO_CHANGE = "no_change"
    REDUCING_ONLY = "reducing_only"
    MAX_OPEN_POSITIONS = "max_open_positions"
    MAX_POSITION_USD = "max_position_usd"
    MAX_LEVERAGE = "max_leverage"
    BELOW_MIN_QTY = "below_min_qty"
    BELOW_MIN_NOTIONAL = "below_min_notional"


@dataclass(frozen=True)
class Denial:
    reason: DenialReason
    detail: str


class DecisionContext(NamedTuple):
    """What the decision needs to know about the world, as the caller saw it at ``now_ms``.

    ``positions`` are signed quantities (absent means flat); ``marks`` the latest prices, which
    must cover every open position; ``equity`` None means unknown (the decision then fails
    closed). ``market_data_fresh`` says whether the signal symbol's price is recent enough,
    by the caller's own staleness rule. A named tuple, as ``_Order``: one is made for every
    decision, at a third of a frozen dataclass's cost.
    """

    trading_state: TradingState
    positions: Mapping[str, Decimal] = _NOTHING
    marks: Mapping[str, Decimal] = _NOTHING
    equity: Decimal | None = None
    market_data_fresh: bool = True
    # Intents decided and not yet final, and the bound on them (the policy's maxIntentBacklog):
    # at the bound nothing more is decided until sending catches up.
    intent_backlog: int = 0
    max_intent_backlog: int | None = None


class _Order(NamedTuple):
    """The order being decided: ``signed_qty`` > 0 buys; ``position_after`` is the result.

    A named tuple: as immutable as a frozen dataclass, and made several times faster (one per
    decision, and a backtest makes tens of thousands)."""

    instrument: Instrument
    price: Decimal
    current: Decimal
    signed_qty: Decimal
    reduce_only: bool

    @property
    def position_after(self) -> Decimal:
        return self.current + self.signed_qty

    @property
    def opens(self) -> bool:
        return self.current == 0 and self.signed_qty != 0


def client_order_id_for(intent_id: str) -> str:
    """The Binance ``newClientOrderId`` of an intent: deterministic, 35 chars of [a-z0-9-]."""
    return CLIENT_ORDER_ID_PREFIX + hashlib.sha256(intent_id.encode()).hexdigest()[:32]


def attempt_client_order_id(client_order_id: str, attempt: int) -> str:
    """The client order id of an intent's ``attempt``: the intent's own for the first, then
    ``<first 32 chars>-r<n>`` (at most 36 chars), deterministic so a restart reuses it."""
    if attempt == 0:
        return client_order_id
    return f"{client_order_id[:32]}-r{attempt}"


# How many intents (rounds) a trip that flattens sends at most per position: the first, then one
# for what each left open (a thin book, a price past the slippage bound); each is driven like any
# intent (a few IOC attempts). See ``execution.flattening``.
FLATTEN_ROUNDS = 10


def flatten_intent_id(latch_revision: int, symbol: str, round_: int = 0) -> str:
    """The intent that closes ``symbol``'s position for the trip of ``latch_revision`` (round 0)
    or what the round before left open: the same in every replica, so the stream keeps it once
    and one replica sends it."""
    first = f"flatten:{latch_revision}:{symbol}"
    return first if round_ == 0 else f"{first}:{round_}"


def flatten_round(intent_id: str, latch_revision: int, symbol: str) -> int | None:
    """Which round of the trip ``latch_revision``'s flattening of ``symbol`` ``intent_id`` is
    (0 to ``FLATTEN_ROUNDS - 1``), or None when it is not one (one spelling per round)."""
    first = flatten_intent_id(latch_revision, symbol)
    if intent_id == first:
        return 0
    head, separator, tail = intent_id.rpartition(":")
    if head != first or not separator or not (tail.isascii() and tail.isdigit()):
        return None
    round_ = int(tail)
    if str(round_) != tail or not 1 <= round_ < FLATTEN_ROUNDS:
        return None
    return round_


def intent_id_for(signal_id: str) -> str:
    """``sig-<signal_id>``, or ``sig-<sha256>`` when that would exceed the 128-char limit."""
    intent_id = f"sig-{signal_id}"
    if len(intent_id) <= _INTENT_ID_MAX:
        return intent_id
    return "sig-" + hashlib.sha256(signal_id.encode()).hexdigest()


def decide(
    *,
    signal: Signal,
    context: DecisionContext,
    policy: TradingPolicySpec,
    policy_revision: int,
    now_ms: int,
    exchange: ExchangeInfo,
    build: Build = validated,
) -> OrderIntent | Denial:
    """The order that moves the position toward ``signal``'s target, or why there is none.

    ``build`` makes the intent: validated, or ``messages.trusted`` where the signal and the
    prices are known valid (a backtest's), since every value of it is then valid by
    construction (a quantity on the step grid, a price of the market, ids of bounded parts)."""
    with localcontext(_EXACT):
        denial = _check_signal(signal, context, policy, now_ms, exchange)
        if denial is not None:
            return denial
        order = _plan(signal, context, policy, exchange)
        if isinstance(order, Denial):
            return order
        denial = _check_exposure(order, signal.symbol, context, policy)
        if denial is not None:
            return denial
        return _intent(order, signal, policy_revision=policy_revision, now_ms=now_ms, build=build)


# --- the checks, in order ---------------------------------------------------------------------


def _check_signal(
    signal: Signal,
    context: DecisionContext,
    policy: TradingPolicySpec,
    now_ms: int,
    exchange: ExchangeInfo,
) -> Denial | None:
    """The checks that need no order: state, symbol, age, confidence, price, equity."""
    symbol = signal.symbol
    if context.trading_state is TradingState.HALTED:
        return Denial(DenialReason.HALTED, "trading is halted")
    bound = context.max_intent_backlog
    if bound is not None and context.intent_backlog >= bound:
        return Denial(
            DenialReason.BACKLOG_FULL,
            f"{context.intent_backlog} intents decided and not final, at most {bound}",
        )
    if symbol not in policy.symbols:
        return Denial(DenialReason.SYMBOL_NOT_ALLOWED, f"{symbol} is not in the policy's symbols")
    if symbol not in exchange:
        return Denial(DenialReason.SYMBOL_NOT_ALLOWED, f"{symbol} is not listed by the exchange")
    age_ms = now_ms - signal.created_at_ms
    ttl_ms = _ttl_ms(policy.signals.ttl_seconds)
    if age_ms > ttl_ms:
        return Denial(DenialReason.SIGNAL_EXPIRED, f"signal is {age_ms} ms old, ttl {ttl_ms} ms")
    if signal.confidence < policy.risk.min_confidence:
        return Denial(
            DenialReason.LOW_CONFIDENCE,
            f"confidence {signal.confidence} < {policy.risk.min_confidence}",
        )
    mark = context.marks.get(symbol)
    if mark is None or mark <= 0:
        return Denial(DenialReason.NO_MARKET_PRICE, f"no price for {symbol}")
    if not context.market_data_fresh:
        return Denial(DenialReason.STALE_MARKET_DATA, f"the price of {symbol} is stale")
    if context.equity is None:
        return Denial(DenialReason.NO_EQUITY, "portfolio equity is unknown")
    return None


def _plan(
    signal: Signal, context: DecisionContext, policy: TradingPolicySpec, exchange: ExchangeInfo
) -> _Order | Denial:
    """The order toward the target, cut to a close in REDUCING; no_change / reducing_only."""
    instrument = exchange.instrument(signal.symbol)
    price = context.marks[signal.symbol]
    current = context.positions.get(signal.symbol, _ZERO)
    # Sized at the worst price the order may fill at (the slippage bound the order is priced
    # at), the price the exposure book values it at when it is sent: sized at the mark, a full
    # position would not fit at send time and would be cut.
    worst_price = price * (_BPS + policy.risk.max_slippage_bps) / _BPS
    target = _target_quantity(
        signal.direction, policy.risk.max_position_usd, worst_price, instrument
    )
    signed_qty = instrument.round_quantity(target - current)
    if signed_qty == 0:
        return Denial(DenialReason.NO_CHANGE, f"position {current} is already at target {target}")
    if context.trading_state is TradingState.REDUCING:
        if not _reduces(current, signed_qty):
            return Denial(
                DenialReason.REDUCING_ONLY,
                f"reducing only: an order of {signed_qty} would not reduce position {current}",
            )
        signed_qty = max(signed_qty, -current) if current > 0 else min(signed_qty, -current)
    reduce_only = _reduces(current, signed_qty) and abs(signed_qty) <= abs(current)
    return _Order(
        instrument=instrument,
        price=price,
        current=current,
        signed_qty=signed_qty,
        reduce_only=reduce_only,
    )


def _check_exposure(
    order: _Order, symbol: str, context: DecisionContext, policy: TradingPolicySpec
) -> Denial | None:
    """Limits on what the order adds; a reduce-only order is exempt from every one."""
    if order.reduce_only:
        return _check_min_qty(order)
    risk = policy.risk
    # Counted only for an order that opens a position: the only one the count can deny.
    if order.opens and (open_count := _open_count(context)) >= risk.max_open_positions:
        return Denial(
            DenialReason.MAX_OPEN_POSITIONS,
            f"{open_count} positions open, at most {risk.max_open_positions}",
        )
    notional_after = abs(order.position_after) * order.price
    if notional_after > risk.max_position_usd:
        return Denial(
            DenialReason.MAX_POSITION_USD,
            f"position notional {notional_after} > {risk.max_position_usd}",
        )
    denial = _check_leverage(order, symbol, context, risk.max_leverage)
    if denial is not None:
        return denial
    denial = _check_min_qty(order)
    if denial is not None:
        return denial
    notional = abs(order.signed_qty) * order.price
    if notional < order.instrument.min_notional:
        return Denial(
            DenialReason.BELOW_MIN_NOTIONAL,
            f"order notional {notional} < {order.instrument.min_notional}",
        )
    return None


def _check_leverage(
    order: _Order, symbol: str, context: DecisionContext, max_leverage: Decimal
) -> Denial | None:
    if context.equity is None:  # already denied by _check_signal; fail closed regardless
        return Denial(DenialReason.NO_EQUITY, "portfolio equity is unknown")
    gross = abs(order.position_after) * order.price
    for other, qty in context.positions.items():
        if other == symbol or qty == 0:
            continue
        mark = context.marks.get(other)
        if mark is None or mark <= 0:
            return Denial(DenialReason.NO_MARKET_PRICE, f"no price to value the {other} position")
        gross += abs(qty) * mark
    limit = max_leverage * context.equity
    if gross > limit:
        return Denial(
            DenialReason.MAX_LEVERAGE,
            f"gross notional {gross} > {max_leverage} x equity {context.equity}",
        )
    return None


def _open_count(context: DecisionContext) -> int:
    return sum(1 for qty in context.positions.values() if qty != 0)


def _check_min_qty(order: _Order) -> Denial | None:
    if abs(order.signed_qty) < order.instrument.min_qty:
        return Denial(
            DenialReason.BELOW_MIN_QTY,
            f"order quantity {abs(order.signed_qty)} < {order.instrument.min_qty}",
        )
    return None


# --- helpers ----------------------------------------------------------------------------------


def _target_quantity(
    direction: Direction, max_position_usd: Decimal, price: Decimal, instrument: Instrument
) -> Decimal:
    if direction is Direction.FLAT:
        return _ZERO
    size = instrument.round_quantity(max_position_usd / price)
    return size if direction is Direction.LONG else -size


@functools.lru_cache(maxsize=64)
def _ttl_ms(ttl_seconds: float) -> Decimal:
    """The policy's signal ttl in exact milliseconds (the float as written, not its binary
    value), once per value: a backtest asks for every signal."""
    with localcontext(_EXACT):
        return Decimal(repr(ttl_seconds)) * 1000


def _reduces(current: Decimal, signed_qty: Decimal) -> bool:
    """True when the order is on the opposite side of a non-flat position."""
    return current != 0 and (current > 0) != (signed_qty > 0)


def _intent(
    order: _Order, signal: Signal, *, policy_revision: int, now_ms: int, build: Build
) -> OrderIntent:
    intent_id = intent_id_for(signal.signal_id)
    return build(
        OrderIntent,
        intent_id=intent_id,
        client_order_id=client_order_id_for(intent_id),
        symbol=signal.symbol,
        side=Side.BUY if order.signed_qty > 0 else Side.SELL,
        quantity=abs(order.signed_qty),
        order_type=OrderType.MARKET,
        reduce_only=order.reduce_only,
        reference_price=order.price,
        signal_id=signal.signal_id,
        policy_revision=policy_revision,
        created_at_ms=now_ms,
    )
