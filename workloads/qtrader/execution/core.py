"""The execution core: one worker's trading rules and state, the same live and in a backtest.

It holds the exposure book (``exposure.py``: positions and quantity in flight), the bounded
signal intake (``intake.py``), the latest prices, and the order driver (``orders.py``: attempts,
retries of a remainder, partial fills, unknown outcomes, the slippage bound) over a ``Venue``,
behind the halt gate (``halt.py``). It decides (``decisions.decide`` on the book's projection
and the fresh prices), admits every attempt at send time, and settles what the venue answers:
a fill goes into the book before anyone else sees it, an update right after it is published.

What differs between live and a backtest is injected, never branched on:

* the ``Clock``: live the machine's; in a backtest a ``SimulatedClock`` the backtest moves to
  each step's time, so ages, freshness, expiry and the driver's waits are the data's time;
* the ``Venue``: the paper exchange, or Binance through python-binance;
* where updates and fills go (``publish_update``, ``publish_fill``): the bus live, the
  backtest's ledger and counts in a backtest; and where the policy and the equity come from.

The live worker (``service.py``) is a shell of named tasks around it: the bus's streams feed
prices, fills, updates and signals in, intents go out to the ORDERS stream and come back to
``execute``. A backtest calls the same methods in time order and drives ``execute``'s coroutine
to its end at once (``clock.drive``): on the simulated clock and the paper exchange nothing in
it ever waits. The per-order rules therefore exist once, and what a backtest trades is what
the worker would have sent for the same signals, retries, expiries and halt gate included.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Protocol

from prometheus_client import Counter

from qtrader.contracts.messages import (
    Build,
    Fill,
    OrderIntent,
    OrderUpdate,
    Signal,
    trusted,
    validated,
)
from qtrader.contracts.policy import SignalThrottling, TradingPolicySpec
from qtrader.exchange.errors import ExchangeError
from qtrader.exchange.venue import Venue
from qtrader.execution.clock import Clock
from qtrader.execution.decisions import DecisionContext, Denial, DenialReason, decide
from qtrader.execution.exposure import (
    Admitted,
    ExposureBook,
    Refused,
    SendLimits,
    admit_order,
    intent_expired,
)
from qtrader.execution.halt import HaltGate
from qtrader.execution.intake import Dropped, SignalIntake, policy_ttl_ms
from qtrader.execution.orders import DriverSettings, OrderDriver

log = logging.getLogger(__name__)

ORDERS_REFUSED = Counter(
    "qtrader_orders_refused_total",
    "Order attempts the exposure book refused at send time (or intents expired), by reason.",
    ["reason"],
)
ORDERS_CUT = Counter(
    "qtrader_orders_cut_total",
    "Order attempts the exposure book cut to what the limits leave, by the binding limit.",
    ["reason"],
)

PublishUpdate = Callable[[OrderUpdate], Awaitable[None]]
PublishFill = Callable[[Fill], Awaitable[None]]


class PolicyInForce(Protocol):
    """The policy the core obeys: a ``PolicyRevision`` live, a fixed one in a backtest."""

    @property
    def spec(self) -> TradingPolicySpec: ...

    @property
    def revision(self) -> int: ...


@dataclass(frozen=True, kw_only=True)
class CoreSettings:
    # A price older than this (by the core's clock, since it was marked) is not trusted: a
    # decision without a trusted price is denied, and an unfilled remainder is not sent again.
    max_price_age_s: float = 30.0
    # An intent decided here and never seen sent is released this long after its time to live
    # (no sender may send it past it; this covers a PENDING_NEW still on its way back).
    unsent_grace_ms: int = 5_000
    driver: DriverSettings = field(default_factory=DriverSettings)
    # False where every signal and price is known valid and every fill comes from the paper
    # exchange (a backtest's): the intents and order updates made of them are valid without
    # validating them (``messages.trusted``), which is much of what an order costs there.
    validate_messages: bool = True


def intent_ttl_ms(spec: TradingPolicySpec) -> int:
    return max(1, int(spec.signals.intent_ttl_seconds * 1000))


class ExecutionCore:
    def __init__(
        self,
        *,
        gate: HaltGate,
        clock: Clock,
        policy: Callable[[], PolicyInForce | None],
        equity: Callable[[], Decimal | None],
        publish_update: PublishUpdate,
        publish_fill: PublishFill,
        worker_id: str,
        settings: CoreSettings | None = None,
        book: ExposureBook | None = None,
    ) -> None:
        self.gate = gate
        self.clock = clock
        self.book = book if book is not None else ExposureBook()
        self._policy = policy
        self._equity = equity
        self._publish_update_out = publish_update
        self._publish_fill_out = publish_fill
        self._worker_id = worker_id
        self._settings = settings or CoreSettings()
        self._build: Build = validated if self._settings.validate_messages else trusted
        self._marks: dict[str, Decimal] = {}
        self._marked_at: dict[str, float] = {}
        # No mark is older than this (a lower bound of ``_marked_at``): while it is fresh, all
        # are, and the prices need no filtering (decisions and admissions ask for every one).
        self._oldest_mark = math.inf
        self._intake: SignalIntake | None = None
        self._venue: Venue | None = None
        self._driver: OrderDriver | None = None
        # The intent ttl of the policy spec last asked about (asked several times per order).
        self._ttl_of: tuple[TradingPolicySpec | None, int] = (None, 0)

    # --- wiring -------------------------------------------------------------------------------

    def connect(
        self, venue: Venue, *, on_error: Callable[[ExchangeError], Awaitable[None]] | None = None
    ) -> None:
        """Trade on ``venue`` from now on (decisions need its instruments)."""
        self._venue = venue
        self._driver = OrderDriver(
            venue,
            self.gate,
            marks=self.fresh_mark,
            publish_update=self._publish_update,
            publish_fill=self._publish_fill,
            admit=self.admit,
            expiry=self.expiry,
            deadline=self.deadline,
            was_sent=self.book.was_sent,
            ended=self.book.ended,
            worker_id=self._worker_id,
            on_error=on_error,
            settings=self._settings.driver,
            clock=self.clock,
            validate_messages=self._settings.validate_messages,
        )

    @property
    def venue(self) -> Venue | None:
        return self._venue

    # --- prices -------------------------------------------------------------------------------

    def mark(self, symbol: str, price: Decimal) -> None:
        """The latest price of ``symbol``, trusted for ``max_price_age_s`` from now."""
        now = self.clock.monotonic_s()
        if symbol not in self._marks:
            self._oldest_mark = min(self._oldest_mark, now)
        self._marks[symbol] = price
        self._marked_at[symbol] = now

    def fresh_marks(self) -> Mapping[str, Decimal]:
        """The prices marked within ``max_price_age_s`` (a view: read it before anything is
        marked again)."""
        now = self.clock.monotonic_s()
        max_age = self._settings.max_price_age_s
        if now - self._oldest_mark <= max_age:
            return self._marks
        marked_at = self._marked_at
        fresh = {s: p for s, p in self._marks.items() if now - marked_at[s] <= max_age}
        if len(fresh) == len(self._marks):
            self._oldest_mark = min(marked_at.values())
        return fresh

    def fresh_mark(self, symbol: str) -> Decimal | None:
        return self.fresh_marks().get(symbol)

    def last_mark(self, symbol: str) -> Decimal | None:
        """The latest price of ``symbol``, however old (flattening on a trip values with it)."""
        return self._marks.get(symbol)

    # --- stage 1: signals to intents ----------------------------------------------------------

    def open_intake(self, throttling: SignalThrottling) -> SignalIntake:
        self._intake = SignalIntake.from_policy(throttling)
        return self._intake

    @property
    def intake(self) -> SignalIntake | None:
        return self._intake

    def offer(self, signal: Signal) -> list[Dropped]:
        """Queue ``signal`` in the intake; what it drops (the intake is open)."""
        assert self._intake is not None, "open_intake first"
        return self._intake.offer(signal, self.clock.wall_ms())

    def resize_intake(self, throttling: SignalThrottling) -> list[Dropped]:
        if self._intake is None:
            return []
        return self._intake.resize(
            throttling.queue_size, policy_ttl_ms(throttling), self.clock.wall_ms()
        )

    def take_cycle(self, limit: int | None = None) -> tuple[list[Signal], list[Dropped]]:
        """One decision cycle's signals (at most the policy's ``maxPerCycle``, and ``limit``,
        highest confidence first) and what expired meanwhile; first, intents lost on their
        way are released (``ExposureBook.release_unsendable``)."""
        assert self._intake is not None, "open_intake first"
        spec = self._spec()
        now_ms = self.clock.wall_ms()
        released = self.book.release_unsendable(
            now_ms=now_ms, ttl_ms=self._intent_ttl_ms(spec), grace_ms=self._settings.unsent_grace_ms
        )
        for intent_id in released:
            log.warning("intent %s never seen sent and past its ttl: released", intent_id)
        most = (
            spec.signals.max_per_cycle if limit is None else min(limit, spec.signals.max_per_cycle)
        )
        return self._intake.take(most, now_ms)

    def decide(self, signal: Signal) -> OrderIntent | Denial:
        """Decide ``signal`` now; an intent is counted in flight in the book at once."""
        policy = self._policy()
        assert policy is not None, "no decision without a policy"
        assert self._venue is not None, "connect a venue first"
        outcome = decide(
            signal=signal,
            context=self.decision_context(policy.spec),
            policy=policy.spec,
            policy_revision=policy.revision,
            now_ms=self.clock.wall_ms(),
            exchange=self._venue.exchange_info,
            build=self._build,
        )
        if isinstance(outcome, Denial):
            return outcome
        if self.book.knows(outcome.intent_id):
            # Decided before (a redelivered signal): the stream keeps the first intent only,
            # and the book already counts it.
            return Denial(DenialReason.DUPLICATE_INTENT, f"intent {outcome.intent_id} is known")
        self.book.reserve(
            intent_id=outcome.intent_id,
            client_order_id=outcome.client_order_id,
            symbol=outcome.symbol,
            signed_quantity=outcome.quantity * outcome.side.sign,
            created_at_ms=outcome.created_at_ms,
            local=True,
        )
        return outcome

    def forget(self, intent_id: str) -> None:
        """An intent decided here never left (its publication failed): nothing is in flight."""
        self.book.forget(intent_id)

    def decision_context(self, spec: TradingPolicySpec) -> DecisionContext:
        return DecisionContext(
            trading_state=self.gate.state()[0],
            positions=self.book.projected(),
            marks=self.fresh_marks(),
            equity=self._equity(),
            intent_backlog=self.book.backlog().size,
            max_intent_backlog=spec.signals.max_intent_backlog,
        )

    def backlog_oldest_age_s(self) -> float | None:
        oldest = self.book.backlog().oldest_created_ms
        return None if oldest is None else max(0, self.clock.wall_ms() - oldest) / 1000

    # --- stage 2: intents to orders -----------------------------------------------------------

    async def execute(self, intent: OrderIntent) -> OrderUpdate | None:
        """Drive ``intent`` to a final state on the venue; its final update (None: it had one
        already). One left UNKNOWN stays in flight in the book until ``resolve`` settles it."""
        assert self._driver is not None, "connect a venue first"
        spec = self._spec()
        return await self._driver.execute(intent, max_slippage_bps=spec.risk.max_slippage_bps)

    async def resolve(self, intent: OrderIntent) -> OrderUpdate | None:
        """Look an intent left UNKNOWN (``book.left_unknown``) up again, sending nothing; its
        final update once the venue can tell, else None. Publishing its fills may raise."""
        assert self._driver is not None, "connect a venue first"
        return await self._driver.resolve(intent)

    def admit(self, order: OrderIntent) -> Admitted | Refused:
        """The exposure book's send-time check of one attempt (under the gate's lock)."""
        spec, venue = self._spec(), self._venue
        assert venue is not None  # sending starts after the venue
        risk = spec.risk
        limits = SendLimits(
            max_position_usd=risk.max_position_usd,
            max_open_positions=risk.max_open_positions,
            max_leverage=risk.max_leverage,
            equity=self._equity(),
            marks=self.fresh_marks(),
            instrument=venue.exchange_info.instrument(order.symbol),
        )
        verdict = admit_order(
            self.book,
            order,
            limits=limits,
            now_ms=self.clock.wall_ms(),
            ttl_ms=self._intent_ttl_ms(spec),
        )
        if isinstance(verdict, Refused):
            ORDERS_REFUSED.labels(verdict.reason.value).inc()
        elif verdict.cut_by is not None:
            ORDERS_CUT.labels(verdict.cut_by.value).inc()
        return verdict

    def expiry(self, intent: OrderIntent) -> Refused | None:
        expired = intent_expired(
            created_at_ms=intent.created_at_ms,
            now_ms=self.clock.wall_ms(),
            ttl_ms=self._intent_ttl_ms(self._spec()),
        )
        if expired is not None:
            ORDERS_REFUSED.labels(expired.reason.value).inc()
        return expired

    def deadline(self, intent: OrderIntent) -> int:
        """The wall-clock time after which no order of ``intent`` may leave for the venue."""
        return intent.created_at_ms + self._intent_ttl_ms(self._spec())

    # --- settling -----------------------------------------------------------------------------

    async def _publish_update(self, update: OrderUpdate) -> None:
        """Publish, then apply to the book at once (a final update releases what did not fill
        now, not when the stream brings it back); the replay applies it again harmlessly."""
        await self._publish_update_out(update)
        self.book.apply_update(update)

    async def _publish_fill(self, fill: Fill) -> None:
        self.book.apply_fill(fill)  # position and the intent's release, one step
        await self._publish_fill_out(fill)

    def _intent_ttl_ms(self, spec: TradingPolicySpec) -> int:
        """``intent_ttl_ms(spec)``, computed once per policy spec in force."""
        cached, ttl_ms = self._ttl_of
        if cached is not spec:
            ttl_ms = intent_ttl_ms(spec)
            self._ttl_of = (spec, ttl_ms)
        return ttl_ms

    def _spec(self) -> TradingPolicySpec:
        policy = self._policy()
        assert policy is not None  # deciding and sending start after the first policy
        return policy.spec
