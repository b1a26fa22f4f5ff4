"""One intent driven to a final state on a venue: attempts, unknown outcomes, partial fills.

An intent is sent as a limit IOC order priced at the policy's slippage bound around the price
the decision saw (a BUY's cap, a SELL's floor), so no fill is ever worse than the bound. What
an attempt that filled part of it leaves is sent again (a new attempt, its own client order
id) only while the current price is still inside the bound and only up to ``max_attempts``: a
remainder is never chased. An attempt that filled nothing is not sent again: the venue had
nothing inside the bound, and nothing newer says it has now (the next signal decides again on
a newer price). When the bound is passed, the remainder is given up and the intent ends
CANCELED (or EXPIRED when nothing filled) with the reason.

Every attempt is recorded before it is sent (a PENDING_NEW update on the ORDERS stream, with
the attempt's deterministic client order id) and every state change after it is published.
An attempt whose outcome is unknown (timeout, 503 "Unknown error", -1006/-1007, a reset after
sending) is looked up by its client order id until ``unknown_grace_s`` has passed; only if the
venue still does not know it is it sent again, with the same client order id, and only through
the halt gate. So one intent never has two live orders.

Each send holds the halt gate's lock from the check to the venue's answer (see ``halt.py``).
Under that lock, just before the venue call, the attempt is also admitted by the worker's
exposure book (``exposure.py``, through the ``admit`` callable): an intent past its time to live
ends EXPIRED with its age; an attempt that would take the position, with what other intents
have in flight, beyond a policy limit is cut to what fits or refused, and the intent ends with
the reason (``refused_by`` is the exposure book: nothing reached the venue). Its PENDING_NEW is
published there too, with the quantity admitted, so a PENDING_NEW on the ORDERS stream means
the attempt went to the venue (or was about to). The venue is given the intent's deadline (its
creation plus its time to live): an order still waiting for the rate limiter or a back-off when
it passes is not sent at all (``NotSent``) and the intent ends EXPIRED the same way.

An intent that was never sent (no PENDING_NEW for it on the ORDERS stream, ``was_sent``) and
that may not be sent now (halted, or past its time to live) is ended without asking the venue
anything: a halt stops every request for queued intents. Look-ups of attempts already sent
go on while halted (their fills must be known) and are counted.

Time is the injected ``Clock``'s (``clock.py``): an intent's age, the grace period of the
look-ups and the waits between them, the time updates are stamped with. Live it is the
machine's; in a backtest a simulated clock, on which the waits move time on instead of sleeping,
so the same driver runs there to its end without an event loop (``clock.drive``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

from prometheus_client import Counter

from qtrader.contracts.messages import (
    Build,
    Fill,
    OrderIntent,
    OrderStatus,
    OrderType,
    OrderUpdate,
    RefusedBy,
    Side,
    replaced,
    trusted,
    validated,
)
from qtrader.exchange.errors import Banned, ExchangeError, NotSent, OutcomeUnknown
from qtrader.exchange.venue import Venue, VenueOrder
from qtrader.execution.clock import SYSTEM_CLOCK, Clock
from qtrader.execution.decisions import attempt_client_order_id
from qtrader.execution.exposure import Admitted, ExposureReason, Refused
from qtrader.execution.halt import HaltGate

log = logging.getLogger(__name__)

ATTEMPTS_RECOVERED = Counter(
    "qtrader_order_attempts_recovered_total",
    "Attempts of a redelivered intent found already at the venue, so not sent again.",
)

HALTED_LOOKUPS = Counter(
    "qtrader_halted_lookups_total",
    "Order look-ups at the venue while the halt gate forbade sending the intent (only of "
    "attempts already sent: an intent never sent is ended without look-ups).",
)

_BPS = Decimal(10_000)
_BOUND_GRID = Decimal("1e-8")

PublishUpdate = Callable[[OrderUpdate], Awaitable[None]]
PublishFill = Callable[[Fill], Awaitable[None]]
MarkPrice = Callable[[str], Decimal | None]
# Admission of one attempt under the gate's lock: the quantity to send, or why none.
Admit = Callable[[OrderIntent], Admitted | Refused]
# Why an intent may no longer be sent at all (its time to live is over), or None.
Expiry = Callable[[OrderIntent], Refused | None]
# The wall-clock time (epoch ms) after which an intent's order must not leave for the venue.
Deadline = Callable[[OrderIntent], int]


@dataclass(frozen=True, kw_only=True)
class DriverSettings:
    max_attempts: int = 3  # the first send plus re-sends of a partly filled remainder
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


class _Unknown(Exception):
    """The outcome of sending ``order`` (as sent, maybe cut by the book) is unknown."""

    def __init__(self, order: OrderIntent, cause: OutcomeUnknown) -> None:
        super().__init__(str(cause))
        self.order = order
        self.cause = cause


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
        admit: Admit,
        expiry: Expiry,
        deadline: Deadline,
        was_sent: Callable[[str], bool],
        ended: Callable[[str], bool],
        on_error: Callable[[ExchangeError], Awaitable[None]] | None = None,
        settings: DriverSettings | None = None,
        clock: Clock = SYSTEM_CLOCK,
        validate_messages: bool = True,
    ) -> None:
        self._clock = clock
        # Off in a backtest: an update is made of a validated intent, the venue's fills and
        # sums of them, so it is valid, and validating it again is a large part of an order's
        # cost there (``messages.trusted`` builds the same message).
        self._build: Build = validated if validate_messages else trusted
        self._admit = admit
        self._expiry = expiry
        self._deadline = deadline
        self._was_sent = was_sent
        self._ended = ended
        self._on_error = on_error
        self._venue = venue
        self._gate = gate
        self._marks = marks
        self._publish_update = publish_update
        self._publish_fill = publish_fill
        self._worker_id = worker_id
        self._settings = settings or DriverSettings()

    async def execute(self, intent: OrderIntent, *, max_slippage_bps: int) -> OrderUpdate | None:
        """Drive ``intent`` to a final state and return its final (cumulative) update; None,
        publishing and asking nothing, for one that had its final update already (redelivered
        because its acknowledgement was lost: driven again, it would end twice)."""
        if self._ended(intent.intent_id):
            log.info("intent %s came again after its final update: nothing to do", intent.intent_id)
            return None
        bound = slippage_bound(intent.reference_price, intent.side, max_slippage_bps)
        progress = _Progress(filled=Decimal(0), notional=Decimal(0))
        why = ""
        first = 0
        sent_before = self._was_sent(intent.intent_id)
        if not sent_before:
            ended = await self._end_unsendable(intent, progress)
            if ended is not None:
                return ended
        if sent_before or self._maybe_sent_before(intent):
            try:
                first = await self._recover(intent, progress)
            except ExchangeError as exc:  # cannot tell what was sent: send nothing more
                return await self._report(
                    intent, progress, OrderStatus.UNKNOWN, _describe(exc), error=exc
                )
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
                    intent, progress, OrderStatus.REJECTED, str(exc), refused_by=RefusedBy.HALT_GATE
                )
            except ExchangeError as exc:
                if self._on_error is not None:
                    await self._on_error(exc)
                status = OrderStatus.REJECTED if progress.filled == 0 else OrderStatus.CANCELED
                return await self._report(intent, progress, status, _describe(exc), error=exc)
            if isinstance(result, Refused):
                return await self._report_refused(intent, progress, result)
            if result is None:
                return await self._report(
                    intent,
                    progress,
                    OrderStatus.UNKNOWN,
                    "outcome unknown: left for reconciliation",
                )
            filled_before = progress.filled
            await self._record_fills(result, progress)
            if progress.filled == filled_before:
                # The IOC met nothing inside the bound: the same order again at once, with no
                # newer price, would spend request weight for the same answer. The next signal
                # decides again on a newer price.
                why = f"attempt {attempt + 1} filled nothing ({result.status.value}); not re-sent"
                break
            # A partial fill is reported when an attempt filled something and left a remainder
            # (which the next attempt sends: the venue had liquidity at the price, and may have
            # more); a report per fill level keeps message ids (status and quantity) distinct.
            if progress.filled < intent.quantity:
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

    async def _end_unsendable(self, intent: OrderIntent, progress: _Progress) -> OrderUpdate | None:
        """End an intent never sent that may not be sent now, without a request to the venue:
        REJECTED while the gate forbids it, EXPIRED past its time to live."""
        verdict = self._gate.verdict(intent)
        if not verdict.allowed:
            why = f"trading is {verdict.state.value}: {verdict.why}; never sent, not looked up"
            return await self._report(
                intent, progress, OrderStatus.REJECTED, why, refused_by=RefusedBy.HALT_GATE
            )
        expired = self._expiry(intent)
        if expired is not None:
            return await self._report_refused(intent, progress, expired)
        return None

    async def _report_refused(
        self, intent: OrderIntent, progress: _Progress, refused: Refused
    ) -> OrderUpdate:
        """The exposure book refused the next attempt: the intent ends with what it filled."""
        if progress.filled > 0:
            status = OrderStatus.CANCELED
        elif refused.reason is ExposureReason.INTENT_EXPIRED:
            status = OrderStatus.EXPIRED
        else:
            status = OrderStatus.REJECTED
        why = f"{refused.reason.value}: {refused.detail}"
        return await self._report(intent, progress, status, why, refused_by=RefusedBy.EXPOSURE_BOOK)

    # --- a redelivered intent ----------------------------------------------------------------

    def _maybe_sent_before(self, intent: OrderIntent) -> bool:
        age_s = (self._clock.wall_ms() - intent.created_at_ms) / 1000
        return age_s > self._settings.recover_after_s

    async def _recover(self, intent: OrderIntent, progress: _Progress) -> int:
        """Account for the attempts the venue already has; the first one it lacks is next.

        Their fills are published again: fill ids are the exchange's, so the bus and the
        portfolio drop what they already have.
        """
        for attempt in range(self._settings.max_attempts):
            client_order_id = attempt_client_order_id(intent.client_order_id, attempt)
            self._count_halted_lookup(intent)
            found = await self._venue.lookup(intent.symbol, client_order_id)
            if found is None:
                return attempt
            log.info("intent %s: attempt %s already at the venue", intent.intent_id, attempt)
            ATTEMPTS_RECOVERED.inc()
            await self._record_fills(found, progress)
        return self._settings.max_attempts

    # --- one attempt -------------------------------------------------------------------------

    async def _attempt(self, order: OrderIntent) -> VenueOrder | Refused | None:
        """Send one attempt; resolve an unknown outcome; None if it stays unknown; Refused
        when the exposure book admits none of it."""
        self._check_gate(order)  # again under the lock in _send; this spares the admission
        for resend in range(self._settings.max_resends_unknown):
            try:
                return await self._send(order, announce=resend == 0)
            except _Unknown as unknown:
                order, exc = unknown.order, unknown.cause
                log.warning("order %s: %s; looking it up", order.client_order_id, exc)
                await self._publish_update(
                    self._update(
                        order, OrderStatus.UNKNOWN, order.quantity, reason=str(exc), error=exc
                    )
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

    async def _send(self, order: OrderIntent, *, announce: bool) -> VenueOrder | Refused:
        """Under the gate's lock: the gate, the PENDING_NEW of a first send, the exposure
        book's admission (which may cut the quantity), the venue call. An unknown outcome is
        raised as ``_Unknown`` carrying the order as sent (a re-send sends the same).

        The admission comes last, right before the venue call: publishing the PENDING_NEW
        awaits, and a price that moved meanwhile (a SELL fills at the market, above its floor)
        must be the one the order is valued at. The PENDING_NEW says what was asked; the
        final update says what was admitted and filled."""
        async with self._gate.lock:
            self._check_gate(order)
            if announce:
                await self._publish_update(
                    self._update(order, OrderStatus.PENDING_NEW, order.quantity)
                )
            verdict = self._admit(order)
            if isinstance(verdict, Refused):
                return verdict
            if verdict.quantity != order.quantity:
                log.info(
                    "order %s cut to %s: %s",
                    order.client_order_id,
                    verdict.quantity,
                    verdict.detail,
                )
                order = replaced(order, quantity=verdict.quantity)
            try:
                return await self._venue.place(order, not_after_ms=self._deadline(order))
            except OutcomeUnknown as exc:
                raise _Unknown(order, exc) from exc
            except NotSent as exc:  # its time to live ran out waiting for the rate limiter
                return Refused(ExposureReason.INTENT_EXPIRED, exc.message)

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
        clock = self._clock
        deadline = clock.monotonic_s() + self._settings.unknown_grace_s
        while True:
            absent = False
            try:
                self._count_halted_lookup(order)
                found = await self._venue.lookup(order.symbol, order.client_order_id)
                absent = found is None
            except ExchangeError as exc:
                log.warning("lookup of %s failed: %s", order.client_order_id, exc)
                found = None
            if found is not None or clock.monotonic_s() >= deadline:
                return found, absent
            await clock.sleep(self._settings.lookup_interval_s)

    def _count_halted_lookup(self, intent: OrderIntent) -> None:
        if not self._gate.verdict(intent).allowed:
            HALTED_LOOKUPS.inc()

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
        refused_by: RefusedBy | None = None,
        error: ExchangeError | None = None,
    ) -> OrderUpdate:
        update = self._update(
            intent,
            status,
            intent.quantity,
            progress=progress,
            reason=reason,
            error=error,
            refused_by=refused_by,
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
        error: ExchangeError | None = None,
        refused_by: RefusedBy | None = None,
    ) -> OrderUpdate:
        return self._build(
            OrderUpdate,
            client_order_id=order.client_order_id,
            intent_id=order.intent_id,
            symbol=order.symbol,
            side=order.side,
            status=status,
            quantity=quantity,
            filled_quantity=progress.filled if progress else Decimal(0),
            avg_price=progress.avg_price if progress else Decimal(0),
            exchange=self._venue.name,
            reason=reason[:256] if reason else None,
            error_kind=None if error is None else error.kind,
            refused_by=refused_by,
            worker_id=self._worker_id,
            ts_ms=self._event_ms(status, progress),
        )

    def _event_ms(self, status: OrderStatus, progress: _Progress | None) -> int:
        """When the change happened: a fill's time is the venue's (an order filled before a
        halt must not look as if it filled after the acknowledgement because it was reported
        later)."""
        filling = status in (OrderStatus.FILLED, OrderStatus.PARTIALLY_FILLED)
        if filling and progress is not None and progress.last_fill_ms is not None:
            return progress.last_fill_ms
        return self._clock.wall_ms()


def attempt_order(
    intent: OrderIntent, *, attempt: int, quantity: Decimal, bound: Decimal
) -> OrderIntent:
    """What attempt ``attempt`` sends for ``intent``: a LIMIT IOC for ``quantity`` at the
    slippage ``bound``, with the attempt's client order id (the intent's own for the first)."""
    return replaced(
        intent,
        client_order_id=attempt_client_order_id(intent.client_order_id, attempt),
        quantity=quantity,
        order_type=OrderType.LIMIT,
        limit_price=bound,
    )


def slippage_bound(reference: Decimal, side: Side, max_slippage_bps: int) -> Decimal:
    """The worst price the policy accepts: above the reference for a BUY, below for a SELL.

    Unrounded here; the venue puts it on the tick grid on the side that keeps it inside.
    """
    factor = (_BPS + side.sign * max_slippage_bps) / _BPS
    bound = reference * factor
    rounding = ROUND_FLOOR if side is Side.BUY else ROUND_CEILING
    return bound.quantize(_BOUND_GRID, rounding=rounding)


def _describe(exc: ExchangeError) -> str:
    code = f" ({exc.code})" if exc.code is not None else ""
    kind = "exchange ban" if isinstance(exc, Banned) else type(exc).__name__
    return f"{kind}{code}: {exc.message}"
