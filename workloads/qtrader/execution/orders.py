"""One intent driven to a final state on a venue: attempts, unknown outcomes, partial fills.

An intent is sent as a limit IOC order priced at the policy's slippage bound around the price
the decision saw (a BUY's cap, a SELL's floor), so no fill is ever worse than the bound. What
an attempt leaves unfilled is sent again (a new attempt, its own client order id) only while
the current price is still inside the bound and only up to ``max_attempts``: a remainder is
never chased. When the bound is passed, the remainder is given up and the intent ends
CANCELED (or EXPIRED when nothing filled) with the reason.

Every attempt is recorded before it is sent (a PENDING_NEW update on the ORDERS stream, with
the attempt's deterministic client order id) and every state change after it is published.
An attempt whose outcome is unknown (timeout, 503 "Unknown error", -1006/-1007, a reset after
sending) is looked up by its client order id until ``unknown_grace_s`` has passed; only if the
venue still does not know it is it sent again, with the same client order id, and only through
the halt gate. So one intent never has two live orders.

Each send holds the halt gate's lock from the check to the venue's answer (see ``halt.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

from prometheus_client import Counter

from qtrader.contracts.messages import (
    Fill,
    OrderIntent,
    OrderStatus,
    OrderType,
    OrderUpdate,
    Side,
)
from qtrader.exchange.errors import Banned, ExchangeError, OutcomeUnknown
from qtrader.exchange.venue import Venue, VenueOrder
from qtrader.execution.decisions import attempt_client_order_id
from qtrader.execution.halt import HaltGate

log = logging.getLogger(__name__)

ATTEMPTS_RECOVERED = Counter(
    "qtrader_order_attempts_recovered_total",
    "Attempts of a redelivered intent found already at the venue, so not sent again.",
)

_BPS = Decimal(10_000)
GATE_NAME = "halt-gate"  # the ``exchange`` of an update for an order the halt gate stopped

PublishUpdate = Callable[[OrderUpdate], Awaitable[None]]
PublishFill = Callable[[Fill], Awaitable[None]]
MarkPrice = Callable[[str], Decimal | None]


@dataclass(frozen=True, kw_only=True)
class DriverSettings:
    max_attempts: int = 3  # the first send plus re-sends of an unfilled remainder
    unknown_grace_s: float = 5.0  # look an unknown order up this long before sending it again
    lookup_interval_s: float = 0.25
    max_resends_unknown: int = 2  # sends of one attempt whose outcome stays unknown
    # An intent older than this may have been sent before (a redelivery after a crash or an
    # ack timeout): its attempts are looked up first and only the missing ones are sent.
    recover_after_s: float = 5.0


@dataclass
class _Progress:
    filled: Decimal
    notional: Decimal  # sum of fill quantity x price, for the average price
    last_fill_ms: int | None = None  # the venue's time of the latest fill

    @property
    def avg_price(self) -> Decimal:
        return self.notional / self.filled if self.filled else Decimal(0)


class Halted(Exception):
    """The gate refused the send: trading is halted (or reducing and the order adds risk)."""


class OrderDriver:
    def __init__(
        self,
        venue: Venue,
        gate: HaltGate,
        *,
        marks: MarkPrice,
        publish_update: PublishUpdate,
        publish_fill: PublishFill,
        worker_id: str,
        on_error: Callable[[ExchangeError], Awaitable[None]] | None = None,
        settings: DriverSettings | None = None,
    ) -> None:
        self._on_error = on_error
        self._venue = venue
        self._gate = gate
        self._marks = marks
        self._publish_update = publish_update
        self._publish_fill = publish_fill
        self._worker_id = worker_id
        self._settings = settings or DriverSettings()

    async def execute(self, intent: OrderIntent, *, max_slippage_bps: int) -> OrderUpdate:
        """Drive ``intent`` to a final state and return its final (cumulative) update."""
        bound = slippage_bound(intent.reference_price, intent.side, max_slippage_bps)
        progress = _Progress(filled=Decimal(0), notional=Decimal(0))
        why = ""
        first = 0
        if self._maybe_sent_before(intent):
            try:
                first = await self._recover(intent, progress)
            except ExchangeError as exc:  # cannot tell what was sent: send nothing more
                return await self._report(intent, progress, OrderStatus.UNKNOWN, _describe(exc))
        for attempt in range(first, self._settings.max_attempts):
            remaining = intent.quantity - progress.filled
            if remaining <= 0:
                break
            if attempt > 0 and not self._inside_bound(intent, bound):
                why = f"price left the slippage bound {bound}; remainder {remaining} not chased"
                break
            order = attempt_order(intent, attempt=attempt, quantity=remaining, bound=bound)
            try:
                result = await self._attempt(order)
            except Halted as exc:
                return await self._report(
                    intent, progress, OrderStatus.REJECTED, str(exc), exchange=GATE_NAME
                )
            except ExchangeError as exc:
                if self._on_error is not None:
                    await self._on_error(exc)
                status = OrderStatus.REJECTED if progress.filled == 0 else OrderStatus.CANCELED
                return await self._report(intent, progress, status, _describe(exc))
            if result is None:
                return await self._report(
                    intent,
                    progress,
                    OrderStatus.UNKNOWN,
                    "outcome unknown: left for reconciliation",
                )
            filled_before = progress.filled
            await self._record_fills(result, progress)
            # A partial fill is reported when an attempt filled something and left a remainder;
            # an attempt that filled nothing changes nothing to report (the next attempt's
            # PENDING_NEW shows the re-send), and a report per fill level keeps message ids
            # (status and filled quantity) distinct.
            if filled_before < progress.filled < intent.quantity:
                detail = f"attempt {attempt + 1}: {result.status.value}"
                await self._report(intent, progress, OrderStatus.PARTIALLY_FILLED, detail)
        if progress.filled >= intent.quantity:
            return await self._report(intent, progress, OrderStatus.FILLED, None)
        status = OrderStatus.CANCELED if progress.filled > 0 else OrderStatus.EXPIRED
        return await self._report(intent, progress, status, why or "attempts exhausted")

    async def resolve(self, intent: OrderIntent) -> OrderUpdate | None:
        """Settle an intent whose outcome was left UNKNOWN: look its attempts up again, publish
        their fills (fill ids are the exchange's, so what was published before counts once),
        report its final state. None while the venue still cannot tell (banned, unreachable):
        the caller asks again later. Nothing is ever sent from here."""
        progress = _Progress(filled=Decimal(0), notional=Decimal(0))
        try:
            await self._recover(intent, progress)
        except ExchangeError as exc:
            log.info("intent %s still unknown: %s", intent.intent_id, exc)
            return None
        if progress.filled >= intent.quantity:
            status = OrderStatus.FILLED
        else:
            status = OrderStatus.CANCELED if progress.filled > 0 else OrderStatus.EXPIRED
        why = None if status is OrderStatus.FILLED else "resolved by look-up: not all of it filled"
        return await self._report(intent, progress, status, why)

    # --- a redelivered intent ----------------------------------------------------------------

    def _maybe_sent_before(self, intent: OrderIntent) -> bool:
        age_s = time.time() - intent.created_at_ms / 1000
        return age_s > self._settings.recover_after_s

    async def _recover(self, intent: OrderIntent, progress: _Progress) -> int:
        """Account for the attempts the venue already has; the first one it lacks is next.

        Their fills are published again: fill ids are the exchange's, so the bus and the
        portfolio drop what they already have.
        """
        for attempt in range(self._settings.max_attempts):
            client_order_id = attempt_client_order_id(intent.client_order_id, attempt)
            found = await self._venue.lookup(intent.symbol, client_order_id)
            if found is None:
                return attempt
            log.info("intent %s: attempt %s already at the venue", intent.intent_id, attempt)
            ATTEMPTS_RECOVERED.inc()
            await self._record_fills(found, progress)
        return self._settings.max_attempts

    # --- one attempt -------------------------------------------------------------------------

    async def _attempt(self, order: OrderIntent) -> VenueOrder | None:
        """Send one attempt; resolve an unknown outcome; None if it stays unknown."""
        self._check_gate(order)  # again under the lock in _send; this spares a PENDING_NEW
        await self._publish_update(self._update(order, OrderStatus.PENDING_NEW, order.quantity))
        for _ in range(self._settings.max_resends_unknown):
            try:
                return await self._send(order)
            except OutcomeUnknown as exc:
                log.warning("order %s: %s; looking it up", order.client_order_id, exc)
                await self._publish_update(
                    self._update(order, OrderStatus.UNKNOWN, order.quantity, reason=str(exc))
                )
            found, absent = await self._look_up(order)
            if found is not None:
                return found
            if not absent:
                log.warning(
                    "order %s: the venue could not say whether it has it; not sending it again",
                    order.client_order_id,
                )
                return None
            log.warning(
                "order %s unknown to the venue after the grace period: sending it again",
                order.client_order_id,
            )
        return None

    async def _send(self, order: OrderIntent) -> VenueOrder:
        async with self._gate.lock:
            self._check_gate(order)
            return await self._venue.place(order)

    def _check_gate(self, order: OrderIntent) -> None:
        verdict = self._gate.verdict(order)
        if not verdict.allowed:
            raise Halted(f"trading is {verdict.state.value}: {verdict.why}")

    async def _look_up(self, order: OrderIntent) -> tuple[VenueOrder | None, bool]:
        """Ask the venue for ``order`` until it is found or the grace period ends.

        Returns ``(order, False)`` when found, ``(None, True)`` when the venue's last answer was
        that it does not know the order (the only case in which it may be sent again), and
        ``(None, False)`` when the last look failed: the venue could not tell, so sending again
        could book it twice.
        """
        deadline = time.monotonic() + self._settings.unknown_grace_s
        while True:
            absent = False
            try:
                found = await self._venue.lookup(order.symbol, order.client_order_id)
                absent = found is None
            except ExchangeError as exc:
                log.warning("lookup of %s failed: %s", order.client_order_id, exc)
                found = None
            if found is not None or time.monotonic() >= deadline:
                return found, absent
            await asyncio.sleep(self._settings.lookup_interval_s)

    # --- reporting ---------------------------------------------------------------------------

    async def _record_fills(self, result: VenueOrder, progress: _Progress) -> None:
        for fill in result.fills:
            progress.filled += fill.quantity
            progress.notional += fill.quantity * fill.price
            progress.last_fill_ms = max(fill.ts_ms, progress.last_fill_ms or 0)
            await self._publish_fill(fill)

    def _inside_bound(self, intent: OrderIntent, bound: Decimal) -> bool:
        mark = self._marks(intent.symbol)
        if mark is None:
            return False  # no trusted price: do not send more
        return mark <= bound if intent.side is Side.BUY else mark >= bound

    async def _report(
        self,
        intent: OrderIntent,
        progress: _Progress,
        status: OrderStatus,
        reason: str | None,
        *,
        exchange: str | None = None,
    ) -> OrderUpdate:
        update = self._update(
            intent, status, intent.quantity, progress=progress, reason=reason, exchange=exchange
        )
        await self._publish_update(update)
        return update

    def _update(
        self,
        order: OrderIntent,
        status: OrderStatus,
        quantity: Decimal,
        *,
        progress: _Progress | None = None,
        reason: str | None = None,
        exchange: str | None = None,
    ) -> OrderUpdate:
        return OrderUpdate(
            client_order_id=order.client_order_id,
            intent_id=order.intent_id,
            symbol=order.symbol,
            side=order.side,
            status=status,
            quantity=quantity,
            filled_quantity=progress.filled if progress else Decimal(0),
            avg_price=progress.avg_price if progress else Decimal(0),
            exchange=exchange or self._venue.name,
            reason=reason[:256] if reason else None,
            worker_id=self._worker_id,
            ts_ms=_event_ms(status, progress),
        )


def attempt_order(
    intent: OrderIntent, *, attempt: int, quantity: Decimal, bound: Decimal
) -> OrderIntent:
    """What attempt ``attempt`` sends for ``intent``: a LIMIT IOC for ``quantity`` at the
    slippage ``bound``, with the attempt's client order id (the intent's own for the first)."""
    return intent.model_copy(
        update={
            "client_order_id": attempt_client_order_id(intent.client_order_id, attempt),
            "quantity": quantity,
            "order_type": OrderType.LIMIT,
            "limit_price": bound,
        }
    )


def slippage_bound(reference: Decimal, side: Side, max_slippage_bps: int) -> Decimal:
    """The worst price the policy accepts: above the reference for a BUY, below for a SELL.

    Unrounded here; the venue puts it on the tick grid on the side that keeps it inside.
    """
    factor = (_BPS + side.sign * max_slippage_bps) / _BPS
    bound = reference * factor
    rounding = ROUND_FLOOR if side is Side.BUY else ROUND_CEILING
    return bound.quantize(Decimal("1e-8"), rounding=rounding)


def _event_ms(status: OrderStatus, progress: _Progress | None) -> int:
    """When the change happened: a fill's time is the venue's (an order filled before a halt
    must not look as if it filled after the acknowledgement because it was reported later)."""
    filling = status in (OrderStatus.FILLED, OrderStatus.PARTIALLY_FILLED)
    if filling and progress is not None and progress.last_fill_ms is not None:
        return progress.last_fill_ms
    return int(time.time() * 1000)


def _describe(exc: ExchangeError) -> str:
    code = f" ({exc.code})" if exc.code is not None else ""
    kind = "exchange ban" if isinstance(exc, Banned) else type(exc).__name__
    return f"{kind}{code}: {exc.message}"
