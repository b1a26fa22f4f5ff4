"""The execution role: signals become order intents, intents become orders on the exchange.

Two stages, each a durable consumer:
1. *decide*: a signal passes the policy's checks (``decisions.decide``, pure) and becomes an
   ``OrderIntent`` published to the ORDERS stream: the durable record of what will be sent.
2. *send*: an intent is driven to a final state on the venue (``orders.OrderDriver``: the paper
   exchange, or Binance through python-binance in testnet and live mode), each send only if the
   halt latch, read from the HALT bucket, allows it at that moment; every order update and fill
   is published.

Signals pass a bounded intake first (``intake.SignalIntake``, the policy's queue size): when it
is full the lowest-confidence signal is dropped, expired signals are dropped, and each cycle
decides at most the policy's ``maxPerCycle``; every drop is counted by reason. The confidence
of every signal decided or dropped, and each decision's delay since the signal was created, are
histograms, so what a flood throws away and how long the rest waits can be read from outside.

While trading is allowed, the venue's own dead-man's switch (Binance's countdown cancel-all) is
re-armed periodically, so resting orders are cancelled by the exchange if this worker dies. An
exchange ban (418) stops order flow, makes ``/health`` CRITICAL and raises an ``exchange_ban``
risk alert, which the operator turns into an EmergencyStop trip.

Fail closed: no latch (never written, or unreadable), a latch value in the bucket that does not
decode (``/health`` CRITICAL, until a valid one is written) or no control-plane heartbeat within
the timeout means HALTED (``halt.HaltGate``); no portfolio equity means no decision; stale prices
mean no decision. A new latch revision, by the fast broadcast or the KV watch, is put in force,
open orders are cancelled when it halts, and only then is it acknowledged on CONTROL_HALT_ACK.

The rules and the state are the execution core's (``core.ExecutionCore``: the exposure book,
the intake, the prices, ``decide``, the order driver), which a backtest drives too; this module
is its shell: the named tasks that feed it from the streams and publish what it makes, the halt
latch and its acknowledgements, the venue's dead-man's switch and reconciliation, the metrics
and ``/health``. It runs on the machine's clock (``clock.SYSTEM_CLOCK``).

Positions have one owner, the worker's ``exposure.ExposureBook``: the fills of the FILLS stream
(every replica's, from the start) and the quantity each intent has in flight, changed in single
steps (a fill and its intent's release together; an intent that ends with less than it asked
releases the rest at once). Decisions size on the book's projection (fills plus in flight), so
two signals in a row cannot both open the same position; every attempt is admitted again by the
book at send time, under the halt gate's lock, at its limit price and against every limit, and
is cut or refused with a counted reason. Replicas share the intent queue, so an intent this
worker decided may be sent by another: it stays in flight until its final update is on the
ORDERS stream (from whichever worker) and the fills that update reports are in the book; an
attempt another replica recorded (PENDING_NEW) counts in flight here the same way. The paper
exchange reads its positions from the book; the portfolio's snapshots are compared with it, and
a difference that outlasts ``position_mismatch_grace_s`` makes ``/health`` DEGRADED.

In testnet and live mode it also reads the venue's income history every ``income_read_s`` and
publishes what the venue booked that no fill carries (funding, transfers, other income) as
account entries on FILLS, for the portfolio's ledger (``account_entries``). The paper venue
books no funding and no transfers: nothing to read there.

Staleness is bounded: an intent older than the policy's ``signals.intentTtlSeconds`` is never
sent (it ends EXPIRED with its age), and at most ``signals.maxIntentBacklog`` intents decided
here may be short of final (beyond it decisions are denied as ``backlog_full``); ``/health`` is
DEGRADED while the backlog is at its bound or its oldest intent is past the time to live.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

from prometheus_client import Counter, Gauge, Histogram

from qtrader.bus.errors import BusUnavailable, NotYet
from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    Candle,
    ControlHeartbeat,
    Fill,
    HaltAck,
    HaltLatch,
    OrderIntent,
    OrderStatus,
    OrderUpdate,
    PortfolioSnapshot,
    RefusedBy,
    RiskAlert,
    RiskAlertKind,
    Signal,
    TradingState,
    Undecodable,
)
from qtrader.contracts.policy import TradingMode, TradingPolicySpec
from qtrader.exchange.errors import Banned, ExchangeError
from qtrader.exchange.limiter import CostNeverFits
from qtrader.exchange.venue import AccountReader, IncomeReader, Venue, VenueOrder
from qtrader.execution.account_entries import AccountEntries, IncomeSettings
from qtrader.execution.clock import SYSTEM_CLOCK
from qtrader.execution.core import CoreSettings, ExecutionCore
from qtrader.execution.decisions import Denial
from qtrader.execution.exposure import Mismatch, PositionReconciler, venue_differences
from qtrader.execution.flattening import (
    FLATTEN_ROUND_S,
    FLATTEN_WITHIN_S,
    Due,
    Flattening,
    flatten_intent,
)
from qtrader.execution.halt import HaltGate
from qtrader.execution.intake import DecisionBudget, Dropped
from qtrader.execution.orders import DriverSettings
from qtrader.execution.paper import PaperExchange, PaperVenue
from qtrader.execution.venue_account import SettledReader, SettledReads, Unsettled
from qtrader.health.contract import DependencyHealth, Status
from qtrader.instruments import paper_exchange_info
from qtrader.runtime import Task, WorkerContext

log = logging.getLogger(__name__)

SIGNALS_DENIED = Counter(
    "qtrader_signals_denied_total", "Signals that did not become an order, by reason.", ["reason"]
)
INTENTS = Counter("qtrader_order_intents_total", "Order intents published.", ["side"])
INTENTS_UNPUBLISHED = Counter(
    "qtrader_order_intents_unpublished_total",
    "Intents decided but dropped because they could not be published (NATS down and the "
    "outbox full or failing).",
)
ORDERS_SENT = Counter("qtrader_orders_sent_total", "Orders sent to the exchange.", ["exchange"])
VENUE_START_RETRY_S = 5.0  # how soon a venue that could not start is asked again
RESOLVE_EVERY_S = 5.0  # how soon an intent left UNKNOWN comes again to be looked up
FILL_RETRY_S = 0.5  # how often a fill neither NATS nor the outbox took is tried again
FILLS_UNRECORDED = Gauge(
    "qtrader_fills_unrecorded",
    "Fills made at the venue that are not yet on FILLS nor in the outbox: while one waits, no "
    "order is sent.",
)
UNRESOLVED = Gauge(
    "qtrader_orders_unknown",
    "Intents whose outcome is still unknown, any worker's (each looked up again every few "
    "seconds by the worker it comes to).",
)
FLATTEN_INTENTS = Counter(
    "qtrader_flatten_intents_total",
    "Reduce-only intents published to close a position on a trip that flattens.",
)
FLATTEN_UNFINISHED = Gauge(
    "qtrader_flatten_unfinished_positions",
    "Positions the flattening trip in force left open after its last order (or too old to "
    "act on): the trip asked to close them and this worker could not.",
)
ORDERS_BLOCKED = Counter(
    "qtrader_orders_blocked_total", "Intents not sent because the latch forbade it.", ["state"]
)
SIGNALS_DROPPED = Counter(
    "qtrader_signals_dropped_total", "Signals dropped by the bounded intake, by reason.", ["reason"]
)
SIGNAL_QUEUE_DEPTH = Gauge("qtrader_signal_queue_depth", "Signals waiting in the intake.")
SIGNAL_QUEUE_CAPACITY = Gauge("qtrader_signal_queue_capacity", "The intake's bound (policy).")
SIGNAL_QUEUE_HIGH_WATER = Gauge(
    "qtrader_signal_queue_high_water", "The deepest the intake has been since the worker started."
)
SIGNAL_DECISION_LATENCY = Histogram(
    "qtrader_signal_decision_latency_seconds",
    "From a signal's created_at_ms (a live candle's close, else when it was made) to its decision "
    "here: an intent or a denial.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 5.0, 10.0, 30.0),
)
SIGNAL_CONFIDENCE = Histogram(
    # Not qtrader_signal_confidence: that is inference's, of the signals it emits.
    "qtrader_signal_intake_confidence",
    "Confidence of the signals leaving the intake, by outcome: decided, or the drop reason "
    "(which confidences a flood throws away).",
    ["outcome"],
    buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
)
EXCHANGE_ERRORS = Counter(
    "qtrader_exchange_errors_total", "Failed exchange requests, by error type.", ["type"]
)
DEAD_MAN_ARMED = Counter(
    "qtrader_dead_man_refreshes_total", "Times the exchange-side countdown cancel-all was re-armed."
)
ORDER_UPDATES = Counter("qtrader_order_updates_total", "Order state changes.", ["status"])
FILLS = Counter("qtrader_fills_total", "Fills received from the exchange.", ["symbol"])
TRADING_STATE = Gauge(
    "qtrader_trading_state",
    "The halt latch as this worker obeys it: 0 ACTIVE, 1 REDUCING, 2 HALTED (or unreadable).",
)
# The halt alert must tell the EmergencyStop's halt from a worker failing safe on its own (no
# heartbeat, a value that does not decode, no latch readable), which other alerts report.
HALT_LATCH_STATE = Gauge(
    "qtrader_halt_latch_state",
    "The last valid halt latch this worker put in force, as the control plane wrote it: 0 ACTIVE, "
    "1 REDUCING, 2 HALTED, -1 none (qtrader_trading_state is what orders obey).",
)
HALT_ACKS = Counter(
    "qtrader_halt_acks_total", "Answers on CONTROL_HALT_ACK (new latch revisions and presence)."
)
# Heartbeat answers repeat the revision in force every few seconds and drown a real one in
# qtrader_halt_acks_total: this counts only the first acknowledgement of each revision.
HALT_REVISION_ACKS = Counter(
    "qtrader_halt_revision_acks_total",
    "Latch revisions this worker acknowledged for the first time, by the latch's state.",
    ["state"],
)
HALT_APPLY_SECONDS = Histogram(
    "qtrader_halt_apply_seconds",
    "From a latch being issued by the control plane to this worker having it in force (open "
    "orders cancelled when it halts), per new revision.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
LATCHES_REFUSED = Counter(
    "qtrader_halt_latch_refused_total",
    "Halt latch values in the bucket that did not decode; each halted this worker until a "
    "valid one was written.",
)
INTENT_BACKLOG = Gauge(
    "qtrader_intent_backlog", "Intents this worker decided that are not final yet."
)
INTENT_BACKLOG_OLDEST = Gauge(
    "qtrader_intent_backlog_oldest_age_seconds",
    "Age of the oldest intent this worker decided that is not final yet (0 when none).",
)
WALLET_READS = Counter(
    "qtrader_venue_account_reads_total",
    "Reads of the venue's account for the wallet reconciliation, by outcome: settled (published "
    "for the portfolio to compare) or unsettled (something in flight or moving: not compared).",
    ["outcome"],
)
VENUE_POSITION_MISMATCH = Gauge(
    "qtrader_venue_position_mismatch",
    "1 while the venue's position in a symbol differs from the exposure book (beyond what is in "
    "flight) for longer than the grace period: a manual trade or a fill never published.",
    ["symbol"],
)
VENUE_RECONCILIATIONS = Counter(
    "qtrader_venue_reconciliations_total",
    "Reads of the venue's positions compared with the book, by outcome.",
    ["outcome"],
)
POSITION_MISMATCH = Gauge(
    "qtrader_position_mismatch",
    "1 while the exposure book and the portfolio's snapshots disagree on a symbol's position "
    "for longer than the grace period.",
    ["symbol"],
)
# Each read of the venue's income costs 30 of the 2,400 weight a minute: at most one every 5 s
# (6 a second) unless asked for explicitly (income_read_s), however often positions are read.
MIN_INCOME_READ_S = 5.0
_INTENTS_TOGETHER = 64  # a cycle's intents published together, at most
HEARTBEAT_AGE = Gauge(
    "qtrader_control_heartbeat_age_seconds", "Seconds since the control plane's last heartbeat."
)


@dataclass(frozen=True, kw_only=True)
class ExecutionConfig:
    # A price older than this (wall clock since its candle arrived) is not trusted: a decision
    # without a trusted price is denied.
    max_price_age_s: float = 30.0
    # Without a control-plane heartbeat for this long the worker halts itself.
    heartbeat_timeout_s: float = 10.0
    # One intake cycle: every cycle, at most the policy's maxPerCycle signals are decided.
    cycle_s: float = 0.25
    # The exchange cancels our open orders if the countdown is not re-armed in time.
    dead_man_countdown_ms: int = 60_000
    dead_man_refresh_s: float = 15.0
    venue_refresh_s: float = 3600.0
    # The portfolio's snapshots trail the fills; a position difference with them that lasts
    # longer than this is reported (health DEGRADED, qtrader_position_mismatch).
    position_mismatch_grace_s: float = 10.0
    # Testnet and live: the venue's positions are read this often (0: never) and compared with
    # the book; a difference the orders in flight cannot explain that lasts the grace (a manual
    # trade, a fill never published) is a reconciliation risk alert.
    venue_reconcile_s: float = 30.0
    venue_mismatch_grace_s: float = 60.0
    # Testnet and live: the venue's income history (weight 30) is read this often for account
    # entries; None: every venue_reconcile_s, but not more often than MIN_INCOME_READ_S. 0:
    # never.
    income_read_s: float | None = None
    driver: DriverSettings = field(default_factory=DriverSettings)
    # Builds the venue for testnet and live mode (Binance); None means paper mode only.
    exchange_factory: Callable[[TradingPolicySpec], Venue] | None = None


class Execution:
    def __init__(self, context: WorkerContext, config: ExecutionConfig) -> None:
        self._context = context
        self._config = config
        self._venue: Venue | None = None
        # Why the venue has not started yet (its last answer at start); None: not tried yet.
        self._venue_start_error: ExchangeError | None = None
        self._paper: PaperExchange | None = None  # the venue in paper mode; fed prices
        self._venue_ready = asyncio.Event()
        self._signals_arrived = asyncio.Event()  # set by the intake, cleared by the decide loop
        self._ban_alerted_until = 0.0
        self._clock = SYSTEM_CLOCK
        self._gate = HaltGate(
            heartbeat_timeout_s=config.heartbeat_timeout_s, clock=self._clock.monotonic_s
        )
        self._acked_revision = -1
        self._started_at_ms = self._clock.wall_ms()
        self._equity: Decimal | None = None
        # The rules and the state: the exposure book (the one owner of positions and quantity
        # in flight), the intake, the prices, the order driver. This class is its shell.
        self._core = ExecutionCore(
            gate=self._gate,
            clock=self._clock,
            policy=lambda: context.policy.current,
            equity=lambda: self._equity,
            publish_update=self._publish_update,
            publish_fill=self._publish_fill,
            worker_id=context.options.worker_id,
            settings=CoreSettings(max_price_age_s=config.max_price_age_s, driver=config.driver),
        )
        self._book = self._core.book
        self._flattening = Flattening(self._book)
        self._reconciler = PositionReconciler(grace_s=config.position_mismatch_grace_s)
        self._mismatch_reported: set[str] = set()
        self._venue_reconciler = PositionReconciler(grace_s=config.venue_mismatch_grace_s)
        self._venue_alerted: set[str] = set()  # symbols alerted in their current episode
        self._venue_read: str | None = None  # what the last read of the venue's account said
        self._venue_unreadable = False  # the last read failed
        self._entries: AccountEntries | None = None  # testnet and live, once the venue is up
        self._settled_reads: SettledReads | None = None  # likewise, with the income loop
        # Held while an order is with the venue (sending, resolving), and by ``drain`` on a stop.
        self._sending = asyncio.Lock()
        self._fills_caught_up = asyncio.Event()
        self._updates_caught_up = asyncio.Event()
        TRADING_STATE.set_function(lambda: self._gate.state()[0].restriction)
        HEARTBEAT_AGE.set_function(lambda: self._gate.heartbeat_age_s() or 0.0)
        HALT_LATCH_STATE.set_function(
            lambda: -1 if self._gate.latch is None else self._gate.latch.state.restriction
        )
        INTENT_BACKLOG.set_function(lambda: self._book.backlog().size)
        FLATTEN_UNFINISHED.set_function(lambda: len(self._flattening.unfinished))
        UNRESOLVED.set_function(lambda: self._book.unknown_count)
        INTENT_BACKLOG_OLDEST.set_function(lambda: self._core.backlog_oldest_age_s() or 0.0)
        # Every state's series from 0: increase() over a series that first appears at 1 is 0,
        # so a worker's first acknowledgement of a state would never show on the ESS dashboard.
        for state in TradingState:
            HALT_REVISION_ACKS.labels(state.value)
        context.monitor.add_check("halt-latch", self.check_latch)
        context.monitor.add_check("intent-backlog", self.check_backlog)
        context.monitor.add_check("flatten", self.check_flatten)
        context.monitor.add_check("positions", self.check_positions)
        context.monitor.add_check("venue-positions", self.check_venue_positions)
        context.monitor.add_check("exchange", self.check_exchange)
        context.monitor.add_check("rate-limiter", self.check_limiter)
        context.monitor.add_check("account-entries", self.check_account_entries)
        context.monitor.add_check("venue-account", self.check_venue_account)

    def tasks(self) -> dict[str, Task]:
        bus = self._context.bus
        return {
            "latch": self._follow_latch(),
            "halt-broadcast": bus.subscribe(
                subjects.CONTROL_HALT, HaltLatch, self._apply_latch, label="halt"
            ),
            "heartbeat": bus.subscribe(
                subjects.CONTROL_HEARTBEAT, ControlHeartbeat, self._on_heartbeat, label="heartbeat"
            ),
            # The stream, not the subject: a candle the stream did not store is no price.
            "prices": self._context.bus.replay(
                subjects.MARKET,
                subjects.all_of(subjects.CANDLE_PREFIX),
                Candle,
                self._on_candle,
                label="prices",
                from_now=True,
            ),
            # The whole fill history, then new fills: positions survive a restart, and an intent
            # sent before a crash is recognised by its fills (see PaperVenue.lookup).
            "fills": self._context.bus.replay(
                subjects.FILLS,
                subjects.all_of(subjects.FILL_PREFIX),
                Fill,
                self._on_fill,
                label="execution-fills",
                caught_up=self._fills_caught_up,
            ),
            "order-updates": self._context.bus.replay(
                subjects.ORDERS,
                subjects.all_of(subjects.ORDER_UPDATE_PREFIX),
                OrderUpdate,
                self._on_update,
                label="execution-updates",
                caught_up=self._updates_caught_up,
            ),
            "equity": self._follow_equity(),
            "intake": self._intake_loop(),
            "decide": self._decide_loop(),
            "send": self._send_loop(),
            "dead-man": self._dead_man_loop(),
            "flatten": self._flatten_loop(),
            "venue-refresh": self._refresh_loop(),
            "venue-reconcile": self._venue_reconcile_loop(),
            "account-entries": self._account_entries_loop(),
        }

    # --- inputs ------------------------------------------------------------------------------

    async def _follow_latch(self) -> None:
        """The bucket's latch, in order: the only reader that may refuse a value that does not
        decode and lift that refusal (one task, so a stale read cannot lift a newer refusal)."""
        bus = self._context.bus
        while True:
            try:
                latch = await bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch)
                await self._apply_stored(latch)
                async for latch in bus.kv_watch(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch):
                    await self._apply_stored(latch)
            except BusUnavailable as exc:
                log.warning("halt latch unreadable (%s): halted until it can be read", exc)
                self._gate.forget()
            await asyncio.sleep(0.5)

    async def _apply_stored(self, stored: HaltLatch | Undecodable | None) -> None:
        if isinstance(stored, Undecodable):
            await self._refuse_latch(stored)
        elif stored is None:  # never written, or deleted: no latch, so halted
            async with self._gate.lock:
                self._gate.forget()
                self._gate.trust()  # the value refused is gone; "no latch" now says why
        else:
            await self._apply_latch(stored, from_bucket=True)

    async def _refuse_latch(self, bad: Undecodable) -> None:
        """A value that does not decode may have been a halt: halt now, as a halt would."""
        why = f"halt latch revision {bad.stored_revision} in the bucket does not decode: {bad.why}"
        async with self._gate.lock:
            trusted, new = self._gate.refused is None, self._gate.refused != why
            self._gate.refuse(why)
            if trusted:
                await self._cancel_open_orders()
        if new:  # the watch and a re-read after a reconnect may both deliver one revision
            LATCHES_REFUSED.inc()
            log.error("%s: halted until a valid latch is written", why)

    async def _apply_latch(self, latch: HaltLatch, *, from_bucket: bool = False) -> None:
        """Put a latch in force, cancel open orders if it halts, then acknowledge it; a latch
        read from the bucket also lifts the refusal of an earlier value that did not decode."""
        async with self._gate.lock:
            changed = self._gate.apply(latch)
            if from_bucket and self._gate.trust():
                log.warning("halt latch readable again: revision %d", latch.revision)
            cancelled = 0
            if changed and latch.state is TradingState.HALTED:
                cancelled = await self._cancel_open_orders()
        if changed and latch.issued_at_ms >= self._started_at_ms:
            # A latch issued before this worker started was not waiting for it: its age is
            # the worker's start-up, not how fast a halt takes effect.
            HALT_APPLY_SECONDS.observe(max(0, self._clock.wall_ms() - latch.issued_at_ms) / 1000)
        if changed:
            log.info("halt latch revision %d in force: %s", latch.revision, latch.state.value)
        if latch.revision > self._acked_revision or changed:
            await self._acknowledge(latch, cancelled)
        if changed and latch.flatten:
            await self._flatten(latch)

    async def _flatten(self, latch: HaltLatch) -> None:
        """The trip asked to close every position: one reduce-only intent per open position,
        priced from the last mark (round 0; what it leaves open, later rounds close, see
        ``_flatten_loop``). Positions are the fills seen so far; one another replica has not
        yet published is closed by a later round."""
        age_s = (self._clock.wall_ms() - latch.issued_at_ms) / 1000
        if age_s > FLATTEN_WITHIN_S or not self._fills_caught_up.is_set():
            # A worker starting while an old flattening trip is in force does not flatten
            # again from positions it has not finished reading; the trip's live workers did.
            log.info("flatten of latch %d left to the workers that saw the trip", latch.revision)
            return
        await self._publish_flatten(latch, self._flattening.first_round(latch))

    async def _flatten_loop(self) -> None:
        """Every FLATTEN_ROUND_S while a trip that flattens is in force: an order for what the
        one before left open, until every position is closed or its rounds are spent
        (``execution.flattening``)."""
        while True:
            await asyncio.sleep(FLATTEN_ROUND_S)
            latch = self._gate.latch
            if latch is None or not latch.flatten or latch.state is TradingState.ACTIVE:
                self._flattening.clear()
                continue
            if not (self._fills_caught_up.is_set() and self._updates_caught_up.is_set()):
                continue
            now_ms = self._clock.wall_ms()
            await self._publish_flatten(latch, self._flattening.next_rounds(latch, now_ms=now_ms))

    async def _publish_flatten(self, latch: HaltLatch, due: list[Due]) -> None:
        policy = self._context.policy.current
        if due and policy is None:
            log.error("flatten asked by latch %d, but no policy is in force", latch.revision)
            return
        for each in due:
            mark = self._core.last_mark(each.symbol)
            if mark is None or policy is None:
                log.error("flatten: no price for %s; its position %s stays", *each[:2])
                continue
            now_ms = self._clock.wall_ms()
            intent = flatten_intent(latch, each, mark, policy.revision, now_ms=now_ms)
            if not self._gate.verdict(intent).allowed:
                continue  # failing safe (no heartbeat): sent, it would only spend its round
            try:
                await self._context.bus.publish(subjects.order_intent_subject(each.symbol), intent)
            except BusUnavailable as exc:
                log.error("flatten: the %s intent was not published: %s", each.symbol, exc)
                continue
            FLATTEN_INTENTS.inc()
            log.warning(
                "flatten: closing %s %s (latch %d, round %d)",
                each.symbol,
                each.position,
                latch.revision,
                each.round_,
            )

    async def _cancel_open_orders(self) -> int:
        """Cancel what rests on the venue; a failure is logged, the halt stands regardless
        (nothing new is sent, and the venue's dead-man countdown cancels what remains)."""
        venue, policy = self._venue, self._context.policy.current
        if venue is None or policy is None:
            return 0
        try:
            return await venue.cancel_all(policy.spec.symbols)
        except ExchangeError as exc:
            await self._on_exchange_error(exc)
            log.error("halt: cancelling open orders failed: %s", exc)
            return 0

    async def _acknowledge(self, latch: HaltLatch, cancelled: int) -> None:
        ack = HaltAck(
            worker_id=self._context.options.worker_id,
            revision=latch.revision,
            # What it obeys, not what the latch says: a refused bucket value or a missing
            # heartbeat halts it whatever its last latch was (the control plane shows this).
            state=self._gate.state()[0],
            open_orders_cancelled=cancelled,
            ts_ms=self._clock.wall_ms(),
        )
        try:
            await self._context.bus.broadcast(subjects.CONTROL_HALT_ACK, ack)
        except BusUnavailable as exc:
            log.warning(
                "halt revision %d in force but not acknowledged yet: %s", latch.revision, exc
            )
            return
        if latch.revision > self._acked_revision:
            HALT_REVISION_ACKS.labels(latch.state.value).inc()
        self._acked_revision = latch.revision
        HALT_ACKS.inc()

    async def _on_heartbeat(self, heartbeat: ControlHeartbeat) -> None:
        """Note the control plane is alive and answer with the latch in force (presence)."""
        self._gate.heartbeat()
        if heartbeat.latch_revision > self._acked_revision:
            await self._follow_up(heartbeat.latch_revision)
        latch = self._gate.latch
        if latch is not None:
            await self._acknowledge(latch, 0)

    async def _follow_up(self, revision: int) -> None:
        """The control plane has a newer latch than this worker: read it now."""
        try:
            latch = await self._context.bus.kv_get(
                subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch
            )
        except BusUnavailable:
            return
        # One that does not decode is left to _follow_latch, which sees the bucket in order.
        if isinstance(latch, HaltLatch) and latch.revision >= revision:
            await self._apply_latch(latch)

    async def _on_candle(self, candle: Candle) -> None:
        self._core.mark(candle.symbol, candle.close)
        if self._paper is not None:
            self._paper.on_candle(candle)

    async def _on_fill(self, fill: Fill) -> None:
        """Every replica's fill, once: into the book with its intent's release, in one step.
        (The paper exchange, standing for the one account all replicas trade, reads the book.)"""
        self._book.apply_fill(fill)

    async def _on_update(self, update: OrderUpdate) -> None:
        """An update from any worker: an attempt recorded, or an intent final."""
        self._book.apply_update(update)

    async def _follow_equity(self) -> None:
        bus = self._context.bus
        while self._equity is None:
            try:
                last = await bus.last_message(
                    subjects.PORTFOLIO, subjects.PORTFOLIO_SNAPSHOT, PortfolioSnapshot
                )
            except BusUnavailable:
                last = None
            if isinstance(last, PortfolioSnapshot):  # one that does not decode: the next one
                await self._on_snapshot(last)
            break
        await bus.subscribe(
            subjects.PORTFOLIO_SNAPSHOT, PortfolioSnapshot, self._on_snapshot, label="equity"
        )

    async def _on_snapshot(self, snapshot: PortfolioSnapshot) -> None:
        self._equity = snapshot.equity
        self._reconciler.observe(
            book=self._book.positions(),
            portfolio={p.symbol: p.quantity for p in snapshot.positions},
            now_s=self._clock.monotonic_s(),
        )
        self._show_mismatches()

    def _show_mismatches(self) -> list[Mismatch]:
        """The differences that outlasted the grace, also set on the gauge (every symbol
        ever reported is set, so one that agrees again reads 0)."""
        mismatches = self._reconciler.persistent(self._clock.monotonic_s())
        persistent = {m.symbol for m in mismatches}
        for symbol in self._mismatch_reported | persistent:
            POSITION_MISMATCH.labels(symbol).set(int(symbol in persistent))
        self._mismatch_reported |= persistent
        return mismatches

    # --- stage 1: decide ---------------------------------------------------------------------

    async def _intake_loop(self) -> None:
        """Signals from the durable consumer into the bounded intake (acked once queued)."""
        policy = await self._context.policy.wait()
        intake = self._core.open_intake(policy.spec.signals)
        SIGNAL_QUEUE_CAPACITY.set(policy.spec.signals.queue_size)
        # Bound to the intake itself: a truth test would take an empty intake (it has a length)
        # for none, and show a high-water mark of 0 once the queue has drained.
        SIGNAL_QUEUE_DEPTH.set_function(lambda: len(intake))
        SIGNAL_QUEUE_HIGH_WATER.set_function(lambda: intake.high_water)
        self._context.policy.add_listener(lambda revision: self._resize_intake(revision.spec))
        await self._context.bus.consume_batches(
            subjects.EXECUTION_SIGNALS, Signal, self._offer_together
        )

    async def _offer_together(self, signals: list[Signal]) -> None:
        """A fetch's signals into the intake, then the decide loop woken: signals that come
        together (a step's, published at once) are ranked in one cycle."""
        for signal in signals:
            self._count_drops(self._core.offer(signal))  # the intake is open before the consumer
        self._signals_arrived.set()

    def _resize_intake(self, spec: TradingPolicySpec) -> None:
        if self._core.intake is not None:
            SIGNAL_QUEUE_CAPACITY.set(spec.signals.queue_size)
            self._count_drops(self._core.resize_intake(spec.signals))

    @staticmethod
    def _count_drops(dropped: list[Dropped]) -> None:
        for drop in dropped:
            SIGNALS_DROPPED.labels(drop.reason.value).inc()
            SIGNAL_CONFIDENCE.labels(drop.reason.value).observe(drop.signal.confidence)

    async def _decide_loop(self) -> None:
        """Cycles of signals, highest confidence first, at most the policy's maxPerCycle
        decided in any ``cycle_s`` (what bounds the decisions a second). A cycle starts as
        soon as signals arrive while that budget lasts, so a signal at a light pace waits for
        no tick (nor does the part of a step that came in a later fetch); and at least every
        ``cycle_s`` regardless, for what a cycle does besides (expiry, the book's release of
        unsendable intents)."""
        await self._context.policy.wait()
        # Signals waiting at start are not denied as halted merely because the worker just woke.
        await self._gate_known()
        budget = DecisionBudget(self._config.cycle_s)
        while True:
            await self._next_cycle(budget)
            policy = self._context.policy.current
            if self._core.intake is None or policy is None:
                continue
            left = budget.left(policy.spec.signals.max_per_cycle, self._clock.monotonic_s())
            signals, dropped = self._core.take_cycle(limit=left)
            self._count_drops(dropped)
            budget.spend(len(signals), self._clock.monotonic_s())
            await self._decide_cycle(signals)

    async def _next_cycle(self, budget: DecisionBudget) -> None:
        """Wait for signals (unless some are queued already) or ``cycle_s``, whichever comes
        first; then, if maxPerCycle were decided within the last ``cycle_s``, until the oldest
        of them is ``cycle_s`` old."""
        intake = self._core.intake
        if intake is None or not len(intake):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._signals_arrived.wait(), self._config.cycle_s)
        self._signals_arrived.clear()
        policy = self._context.policy.current
        if policy is not None:
            now = self._clock.monotonic_s()
            wait_s = budget.wait_s(policy.spec.signals.max_per_cycle, now)
            if wait_s > 0:
                await asyncio.sleep(wait_s)

    async def _decide_cycle(self, signals: list[Signal]) -> None:
        """Decide a cycle's signals in order, and publish their intents together (one round
        trip to the broker for all, not one each), ``_INTENTS_TOGETHER`` at a time so that the
        first leave before a long cycle is decided to its end."""
        await self._venue_ready.wait()
        for start in range(0, len(signals), _INTENTS_TOGETHER):
            chunk = signals[start : start + _INTENTS_TOGETHER]
            intents = [intent for intent in map(self._decision, chunk) if intent is not None]
            if intents:
                await self._publish_intents(intents)

    def _decision(self, signal: Signal) -> OrderIntent | None:
        """The intent ``signal`` makes (in the book's flight already), or None: denied."""
        now_ms = self._clock.wall_ms()
        outcome = self._core.decide(signal)
        SIGNAL_DECISION_LATENCY.observe(max(0, now_ms - signal.created_at_ms) / 1000)
        SIGNAL_CONFIDENCE.labels("decided").observe(signal.confidence)
        if isinstance(outcome, Denial):
            SIGNALS_DENIED.labels(outcome.reason.value).inc()
            return None
        return outcome

    async def _publish_intents(self, intents: list[OrderIntent]) -> None:
        items = [(subjects.order_intent_subject(intent.symbol), intent) for intent in intents]
        results = await self._context.bus.publish_many(items)
        for intent, result in zip(intents, results, strict=True):
            if isinstance(result, BusUnavailable):
                # NATS down and the outbox full or its disk failing: the intent is dropped,
                # never sent (it is not on the stream); a later signal decides again from the
                # book.
                self._core.forget(intent.intent_id)
                INTENTS_UNPUBLISHED.inc()
                log.warning("intent %s not published, dropped: %s", intent.intent_id, result)
            else:
                INTENTS.labels(intent.side.value).inc()

    # --- stage 2: send -----------------------------------------------------------------------

    async def _send_loop(self) -> None:
        policy = await self._context.policy.wait()
        # Positions and past orders (which intents were sent) known before any send.
        await self._fills_caught_up.wait()
        await self._updates_caught_up.wait()
        venue = self._make_venue(policy.spec)
        leftovers = await self._start_venue(venue, policy.spec.symbols)
        if leftovers:
            log.warning("%d of our orders open at start: cancelling them", len(leftovers))
            await venue.cancel_all(sorted({order.symbol for order in leftovers}))
        self._venue = venue
        self._core.connect(venue, on_error=self._on_exchange_error)
        self._venue_ready.set()
        await self._gate_known()
        if self._gate.state()[0] is not TradingState.HALTED:  # armed before the first order
            await self._arm_dead_man(venue, policy.spec.symbols)
        try:
            await self._context.bus.consume(
                subjects.EXECUTION_INTENTS, OrderIntent, self._on_intent
            )
        finally:
            await venue.close()

    async def _start_venue(self, venue: Venue, symbols: Sequence[str]) -> list[VenueOrder]:
        """``venue.start`` until it answers. Banned, nothing is asked before the ban ends (on
        Binance a request during a ban lengthens it), and the ban is a trip input as at any
        time; unreachable, it is asked again every VENUE_START_RETRY_S. Meanwhile /health says
        why. Exiting instead would leave it to restarts, which ask at once, ban or not."""
        while True:
            try:
                return await venue.start(symbols)
            except ExchangeError as exc:
                self._venue_start_error = exc
                await self._on_exchange_error(exc)
                wait_s = VENUE_START_RETRY_S
                if isinstance(exc, Banned):
                    wait_s = max(wait_s, exc.retry_at - self._clock.wall_ms() / 1000)
                log.warning("the venue cannot start (%s): asking again in %.1f s", exc, wait_s)
                await asyncio.sleep(wait_s)

    async def _gate_known(self) -> None:
        """Wait (at most the heartbeat timeout) for a latch and a first heartbeat, so signals
        and intents waiting at start are not all denied or refused as halted merely because the
        worker just woke."""
        deadline = self._clock.monotonic_s() + self._config.heartbeat_timeout_s
        while self._gate.latch is None or self._gate.heartbeat_age_s() is None:
            if self._clock.monotonic_s() >= deadline:
                return
            await asyncio.sleep(0.05)

    def _make_venue(self, spec: TradingPolicySpec) -> Venue:
        if spec.mode is TradingMode.PAPER:
            info = paper_exchange_info()
            self._paper = PaperExchange(
                exchange=info,
                fee_bps=spec.paper.fee_bps,
                slippage_bps=spec.paper.slippage_bps,
                positions=self._book.position,
            )
            return PaperVenue(self._paper, info, history=self._book.fills_of, clock=self._clock)
        if self._config.exchange_factory is None:
            raise RuntimeError(f"mode {spec.mode.value} needs the Binance settings (see --help)")
        return self._config.exchange_factory(spec)

    async def drain(self) -> None:
        """On a stop: wait for the order in flight to end (its fills and final update
        published: cut off, its fill would reach the portfolio only when an execution worker
        runs again), then hold the lock, so the next intent waits unacknowledged until the
        tasks are cancelled and is delivered to whichever worker runs next."""
        await self._sending.acquire()
        log.info("stopping with no order in flight")

    async def _on_intent(self, intent: OrderIntent) -> None:
        """Drive an intent to its end, or, if its outcome was left UNKNOWN (by this worker or
        any other: a killed one, one stopped for good), look it up again. Until the venue tells,
        the intent stays unacknowledged on the server and comes again in RESOLVE_EVERY_S, to
        whichever worker runs then: nothing depends on the memory of the one that sent it."""
        async with self._sending:
            if self._book.left_unknown(intent.intent_id):
                final = await self._core.resolve(intent)
                if final is not None:
                    log.info("intent %s resolved by look-up: %s", intent.intent_id, final.status)
            else:
                final = await self._execute(intent)
                if final is None:  # it came again after its final update
                    return
        if final is None or final.status is OrderStatus.UNKNOWN:
            raise NotYet(f"intent {intent.intent_id}: outcome unknown", delay_s=RESOLVE_EVERY_S)

    async def _execute(self, intent: OrderIntent) -> OrderUpdate | None:
        final = await self._core.execute(intent)  # connected before the consumer starts
        if final is None:  # it came again after its final update
            return None
        if final.refused_by is RefusedBy.HALT_GATE:
            ORDERS_BLOCKED.labels(self._gate.state()[0].value).inc()
            log.info("intent %s not sent: %s", intent.intent_id, final.reason)
        elif final.refused_by is RefusedBy.EXPOSURE_BOOK:
            log.info("intent %s ended by the exposure book: %s", intent.intent_id, final.reason)
        else:
            ORDERS_SENT.labels(final.exchange).inc()
        return final

    async def _publish_update(self, update: OrderUpdate) -> None:
        """The core's updates to the ORDERS stream (it applies each to the book next)."""
        await self._context.bus.publish(subjects.order_update_subject(update.symbol), update)
        ORDER_UPDATES.labels(update.status.value).inc()

    async def _publish_fill(self, fill: Fill) -> None:
        """The core's fills (in its book already) to the FILLS stream, tried again until they
        are recorded there or in the outbox: nothing else is sent meanwhile (the send stage
        holds its lock).

        A fill is the venue's fact, not a wish that may be dropped. Handed back to the broker
        with its intent (NATS unreachable and the outbox full), it would reach FILLS only when
        the intent came again, after the fills of the orders sent meanwhile: FILLS, the paper
        exchange's only record, would show positions the venue never held (three times the
        limit, seen), and a ledger applying them in that order splits realized and unrealized
        PnL otherwise than the venue."""
        subject = subjects.fill_subject(fill.symbol)
        waiting_since: float | None = None
        try:
            while True:
                try:
                    await self._context.bus.publish(subject, fill)
                    break
                except BusUnavailable as exc:
                    if waiting_since is None:
                        waiting_since = self._clock.monotonic_s()
                        FILLS_UNRECORDED.inc()
                        log.warning(
                            "fill %s not recorded (%s): sending nothing until it is",
                            fill.fill_id,
                            exc,
                        )
                    await asyncio.sleep(FILL_RETRY_S)
        finally:
            if waiting_since is not None:
                FILLS_UNRECORDED.dec()
        if waiting_since is not None:
            waited_s = self._clock.monotonic_s() - waiting_since
            log.info("fill %s recorded after %.1f s", fill.fill_id, waited_s)
        FILLS.labels(fill.symbol).inc()

    async def _on_exchange_error(self, exc: ExchangeError) -> None:
        EXCHANGE_ERRORS.labels(type(exc).__name__).inc()
        if isinstance(exc, Banned) and exc.retry_at > self._ban_alerted_until:
            await self._raise_ban_alert(exc)

    async def _raise_ban_alert(self, ban: Banned) -> None:
        """A 418 is an EmergencyStop trip input: the operator halts everything on it."""
        now_ms = self._clock.wall_ms()
        alert = RiskAlert(
            alert_id=f"exchange-ban-{self._context.options.worker_id}-{int(ban.retry_at)}",
            alert_kind=RiskAlertKind.EXCHANGE_BAN,
            source=f"execution/{self._context.options.worker_id}",
            value=Decimal(int(ban.retry_at * 1000) - now_ms) / 1000,
            threshold=Decimal(0),
            detail=f"exchange banned this IP for {ban.retry_at - now_ms / 1000:.0f} s: {ban}"[
                :1024
            ],
            ts_ms=now_ms,
        )
        await self._context.bus.publish(subjects.risk_alert_subject(alert.alert_kind.value), alert)
        self._ban_alerted_until = ban.retry_at
        log.error("exchange ban: order flow stopped, risk alert %s raised", alert.alert_id)

    async def _venue_reconcile_loop(self) -> None:
        """Every ``venue_reconcile_s`` (first at start): the venue's positions against the book.
        Paper mode has nothing to compare: the paper exchange keeps no account of its own."""
        await self._venue_ready.wait()
        venue = self._venue
        if not isinstance(venue, AccountReader) or self._config.venue_reconcile_s <= 0:
            await asyncio.Event().wait()  # nothing to do; the task stays up with the others
            return
        while True:
            await self._reconcile_venue_once(venue)
            await asyncio.sleep(self._config.venue_reconcile_s)

    async def _reconcile_venue_once(self, venue: AccountReader) -> None:
        before = self._position_ranges()
        try:
            positions, wallet = await venue.account()
        except ExchangeError as exc:
            await self._on_exchange_error(exc)
            VENUE_RECONCILIATIONS.labels("unreadable").inc()
            self._venue_read, self._venue_unreadable = f"not readable: {exc}", True
            return
        differing = venue_differences(
            {p.symbol: p.quantity for p in positions},
            self._book.positions(),
            [before, self._position_ranges()],
        )
        now_s = self._clock.monotonic_s()
        self._venue_reconciler.observe_differences(differing, now_s=now_s)
        VENUE_RECONCILIATIONS.labels("differs" if differing else "agrees").inc()
        self._venue_read = f"{len(positions)} positions, wallet {wallet} USDT"
        self._venue_unreadable = False
        for mismatch in self._show_venue_mismatches():
            if mismatch.symbol not in self._venue_alerted:
                await self._raise_reconciliation_alert(mismatch)
                self._venue_alerted.add(mismatch.symbol)
        self._venue_alerted &= set(differing)  # agreeing again ends the episode

    def _in_flight(self) -> str | None:
        """What may still move the venue's account without being on FILLS yet; None: nothing."""
        if not self._book.idle or self._sending.locked():
            return "orders in flight"
        if self._book.unknown_count:
            return "orders with an unknown outcome"
        if self._context.bus.outbox_depth():
            return "messages waiting in the outbox"
        return None

    async def _income_round(self, venue: IncomeReader, entries: AccountEntries) -> None:
        """One read of the venue's income and, when nothing is in flight, a settled read of
        the account around it for the portfolio's wallet reconciliation (``venue_account``):
        the income read both needs is made once, so the wallet costs two account reads (10
        weight) per income interval, not another income read (30)."""
        busy = self._in_flight()
        first = None
        if busy is None and isinstance(venue, AccountReader):
            try:
                first = await venue.account()
            except ExchangeError as exc:
                await self._on_exchange_error(exc)
                busy = f"the account not readable: {exc}"
        read_ok = await self._read_income_once(venue, entries)
        if first is None or not read_ok:
            self._unsettled(busy or "the income not read")
            return
        assert isinstance(venue, AccountReader)  # ``first`` was read from it
        reader = SettledReader(
            bus=self._context.bus,
            quiet=self._in_flight,
            source=f"execution/{self._context.options.worker_id}",
            now_ms=self._clock.wall_ms,
        )
        read = await reader.publish(venue, first)
        if isinstance(read, Unsettled):
            self._unsettled(read.why)
            return
        WALLET_READS.labels("settled").inc()
        if self._settled_reads is not None:
            self._settled_reads.settled()

    def _unsettled(self, why: str) -> None:
        WALLET_READS.labels("unsettled").inc()
        if self._settled_reads is not None:
            self._settled_reads.unsettled(why)
        log.debug("venue account not settled: %s", why)

    def _income_read_s(self) -> float:
        chosen = self._config.income_read_s
        if chosen is not None:
            return chosen
        reconcile_s = self._config.venue_reconcile_s
        return 0.0 if reconcile_s <= 0 else max(reconcile_s, MIN_INCOME_READ_S)

    async def _account_entries_loop(self) -> None:
        """Every ``income_read_s`` (first at start): the venue's income into account entries.
        The paper venue books no funding and no transfers: nothing to read."""
        await self._venue_ready.wait()
        venue, interval_s = self._venue, self._income_read_s()
        if not isinstance(venue, IncomeReader) or interval_s <= 0:
            await asyncio.Event().wait()  # nothing to do; the task stays up with the others
            return
        entries = AccountEntries(self._context.bus, IncomeSettings(interval_s=interval_s))
        while True:
            try:
                await entries.start()
                break
            except BusUnavailable as exc:
                log.warning("account entries: FILLS not readable yet (%s), trying again", exc)
                await asyncio.sleep(0.5)
        self._entries = entries
        self._settled_reads = SettledReads()
        while True:
            await self._income_round(venue, entries)
            await asyncio.sleep(interval_s)

    async def _read_income_once(self, venue: IncomeReader, entries: AccountEntries) -> bool:
        """The venue's income into account entries; False when it could not be read."""
        try:
            await entries.read_once(venue)
            return True
        except ExchangeError as exc:
            await self._on_exchange_error(exc)
            entries.unreadable(f"the venue: {exc}")
            log.warning("account entries: the venue's income not readable: %s", exc)
        except BusUnavailable as exc:  # what is not published yet is read again next time
            entries.unreadable(f"NATS: {exc}")
            log.warning("account entries: not published yet: %s", exc)
        except CostNeverFits as exc:  # the venue's weight limit is below one read's weight
            entries.unreadable(f"the venue's limits admit no read of its income: {exc}")
            log.error("account entries: the venue's income cannot be read: %s", exc)
        return False

    async def check_flatten(self) -> DependencyHealth:
        """What a trip that flattens has closed: DEGRADED while it has left a position open
        that this worker can no longer close (its rounds spent, or the trip too old to act on)."""
        latch = self._gate.latch
        if latch is None or not latch.flatten or latch.state is TradingState.ACTIVE:
            return DependencyHealth(name="flatten", status=Status.OK, detail="no trip to flatten")
        unfinished = self._flattening.unfinished
        if unfinished:
            detail = f"latch {latch.revision} asked to flatten; still open: {_listed(unfinished)}"
            return DependencyHealth(name="flatten", status=Status.DEGRADED, detail=detail)
        open_now = self._book.positions()
        detail = f"latch {latch.revision}: " + (
            f"closing {_listed(open_now)}" if open_now else "every position closed"
        )
        return DependencyHealth(name="flatten", status=Status.OK, detail=detail)

    async def check_account_entries(self) -> DependencyHealth:
        entries = self._entries
        if entries is not None:
            return entries.health()
        if isinstance(self._venue, PaperVenue):
            detail = "the paper venue books no funding or transfers"
        elif self._income_read_s() <= 0:
            detail = "income reads are off (--income-interval 0): funding is not booked"
        else:
            return self._not_reading_yet("account-entries")
        return DependencyHealth(name="account-entries", status=Status.OK, detail=detail)

    def _not_reading_yet(self, name: str) -> DependencyHealth:
        """A reader of the venue's account that has not begun: nothing it would book or compare
        is (a venue banned at start can keep it so for minutes)."""
        detail = "waiting for the venue to start" if self._venue is None else "starting"
        return DependencyHealth(name=name, status=Status.DEGRADED, detail=detail)

    async def check_venue_account(self) -> DependencyHealth:
        """Whether settled reads, which the portfolio compares its wallet with, are being made:
        DEGRADED after many rounds without one (``venue_account.SettledReads``)."""
        reads = self._settled_reads
        if reads is not None:
            return reads.health()
        if isinstance(self._venue, PaperVenue):
            detail = "the paper venue has no account to compare"
        elif self._income_read_s() <= 0:
            detail = "income reads are off (--income-interval 0): the wallet is not compared"
        else:
            return self._not_reading_yet("venue-account")
        return DependencyHealth(name="venue-account", status=Status.OK, detail=detail)

    def _position_ranges(self) -> dict[str, tuple[Decimal, Decimal]]:
        policy = self._context.policy.current
        symbols = set(self._book.positions()) | set(policy.spec.symbols if policy else ())
        return {symbol: self._book.position_range(symbol) for symbol in symbols}

    def _show_venue_mismatches(self) -> list[Mismatch]:
        mismatches = self._venue_reconciler.persistent(self._clock.monotonic_s())
        persistent = {m.symbol for m in mismatches}
        for symbol in self._venue_alerted | persistent:
            VENUE_POSITION_MISMATCH.labels(symbol).set(int(symbol in persistent))
        return mismatches

    async def _raise_reconciliation_alert(self, mismatch: Mismatch) -> None:
        """A position the book cannot explain: every limit was judged on a wrong position."""
        now_ms = self._clock.wall_ms()
        worker = self._context.options.worker_id
        alert = RiskAlert(
            alert_id=f"reconciliation-{worker}-{mismatch.symbol}-{now_ms}",
            alert_kind=RiskAlertKind.RECONCILIATION,
            source=f"execution/{worker}",
            symbol=mismatch.symbol,
            value=mismatch.other,
            threshold=mismatch.book,
            detail=(
                f"the venue holds {mismatch.other} {mismatch.symbol}, the book "
                f"{mismatch.book}, for {mismatch.for_s:.0f} s (a manual trade, or a fill "
                "never published)"
            )[:1024],
            ts_ms=now_ms,
        )
        await self._context.bus.publish(subjects.risk_alert_subject(alert.alert_kind.value), alert)
        log.error("reconciliation: %s", alert.detail)

    async def check_venue_positions(self) -> DependencyHealth:
        """DEGRADED while the venue holds a position the book cannot explain, or its account
        could not be read last time; OK when it agrees (or there is no venue account)."""
        mismatches = self._show_venue_mismatches()
        if mismatches:
            detail = "; ".join(
                f"{m.symbol}: venue {m.other}, book {m.book} for {m.for_s:.0f} s"
                for m in mismatches
            )
            return DependencyHealth(
                name="venue-positions", status=Status.DEGRADED, detail=detail[:512]
            )
        read = self._venue_read
        if self._venue_unreadable:
            detail = f"the venue's account: {read}"
            return DependencyHealth(name="venue-positions", status=Status.DEGRADED, detail=detail)
        return DependencyHealth(
            name="venue-positions",
            status=Status.OK,
            detail=f"agrees with the book: {read}" if read else "nothing compared yet",
        )

    async def _refresh_loop(self) -> None:
        """Reload the venue's instruments and limits now and then (they change at Binance)."""
        await self._venue_ready.wait()
        while True:
            await asyncio.sleep(self._config.venue_refresh_s)
            if self._venue is None:
                continue
            try:
                await self._venue.refresh()
            except ExchangeError as exc:
                await self._on_exchange_error(exc)
                log.warning("could not reload the exchange's instruments: %s", exc)

    async def _dead_man_loop(self) -> None:
        """Re-arm the venue's countdown cancel-all while trading is allowed: at once when
        trading starts or resumes, then every ``dead_man_refresh_s``."""
        await self._venue_ready.wait()
        refresh_s = self._config.dead_man_refresh_s
        armed_at: float | None = None
        while True:
            venue, policy = self._venue, self._context.policy.current
            trading = self._gate.state()[0] is not TradingState.HALTED
            due = armed_at is None or self._clock.monotonic_s() - armed_at >= refresh_s
            if venue is not None and policy is not None and trading and due:
                if await self._arm_dead_man(venue, policy.spec.symbols):
                    armed_at = self._clock.monotonic_s()
            elif not trading:
                armed_at = None
            await asyncio.sleep(min(1.0, refresh_s))

    async def _arm_dead_man(self, venue: Venue, symbols: tuple[str, ...]) -> bool:
        try:
            await venue.arm_dead_man(symbols, self._config.dead_man_countdown_ms)
        except ExchangeError as exc:
            await self._on_exchange_error(exc)
            log.warning("could not re-arm the exchange's countdown cancel-all: %s", exc)
            return False
        DEAD_MAN_ARMED.inc()
        return True

    async def check_limiter(self) -> DependencyHealth:
        if self._venue is None:
            return DependencyHealth(
                name="rate-limiter", status=Status.DEGRADED, detail="no venue yet"
            )
        return self._venue.limiter_health()

    async def check_exchange(self) -> DependencyHealth:
        if self._venue is None:
            return self._venue_not_started()
        health = self._venue.health()
        unresolved = self._book.unknown_count
        if unresolved and health.status is Status.OK:
            return DependencyHealth(
                name="exchange",
                status=Status.DEGRADED,
                detail=f"{unresolved} orders with an unknown outcome, looked up "
                f"every {RESOLVE_EVERY_S:g} s",
            )
        return health

    def _venue_not_started(self) -> DependencyHealth:
        failed = self._venue_start_error
        if failed is None:
            return DependencyHealth(
                name="exchange", status=Status.DEGRADED, detail="not connected yet"
            )
        if isinstance(failed, Banned):
            until = datetime.fromtimestamp(failed.retry_at, UTC).isoformat(timespec="seconds")
            detail = f"not started: banned until {until}, nothing asked before: {failed}"
        else:
            detail = f"not started: {failed}; asked again every {VENUE_START_RETRY_S:g} s"
        return DependencyHealth(name="exchange", status=Status.CRITICAL, detail=detail[:300])

    async def check_backlog(self) -> DependencyHealth:
        """DEGRADED while the decided-not-final intents are at their bound or the oldest is
        past its time to live: sending is falling behind deciding."""
        policy = self._context.policy.current
        backlog = self._book.backlog()
        age_s = self._core.backlog_oldest_age_s()
        detail = f"{backlog.size} intents decided and not final" + (
            f", oldest {age_s:.1f} s" if age_s is not None else ""
        )
        if policy is None:
            return DependencyHealth(name="intent-backlog", status=Status.OK, detail=detail)
        bound = policy.spec.signals.max_intent_backlog
        ttl_s = policy.spec.signals.intent_ttl_seconds
        full = backlog.size >= bound
        stale = age_s is not None and age_s > ttl_s
        if full or stale:
            why = f" (bound {bound}, ttl {ttl_s:g} s): sending is behind deciding"
            return DependencyHealth(
                name="intent-backlog", status=Status.DEGRADED, detail=detail + why
            )
        return DependencyHealth(name="intent-backlog", status=Status.OK, detail=detail)

    async def check_positions(self) -> DependencyHealth:
        """DEGRADED while the book and the portfolio's ledger disagree beyond the grace."""
        mismatches = self._show_mismatches()
        if not mismatches:
            return DependencyHealth(
                name="positions", status=Status.OK, detail="the portfolio agrees with the book"
            )
        detail = "; ".join(
            f"{m.symbol}: execution {m.book}, portfolio {m.other} for {m.for_s:.0f} s"
            for m in mismatches
        )
        return DependencyHealth(name="positions", status=Status.DEGRADED, detail=detail[:512])

    async def check_latch(self) -> DependencyHealth:
        refused = self._gate.refused
        if refused is not None:
            return DependencyHealth(
                name="halt-latch", status=Status.CRITICAL, detail=f"HALTED: {refused}"
            )
        state, why = self._gate.state()
        latch = self._gate.latch
        revision = f"revision {latch.revision}" if latch else "no latch"
        if state is TradingState.ACTIVE:
            return DependencyHealth(
                name="halt-latch", status=Status.OK, detail=f"{revision}: ACTIVE"
            )
        return DependencyHealth(
            name="halt-latch",
            status=Status.DEGRADED,
            detail=f"{revision}: {state.value}, not trading" + (f" ({why})" if why else ""),
        )


def _listed(positions: dict[str, Decimal]) -> str:
    return ", ".join(f"{symbol} {quantity}" for symbol, quantity in sorted(positions.items()))
