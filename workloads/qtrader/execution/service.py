"""The execution role: signals become order intents, intents become orders on the exchange.

Two stages, each a durable consumer:
1. *decide*: a signal passes the policy's checks (``decisions.decide``, pure) and becomes an
   ``OrderIntent`` published to the ORDERS stream: the durable record of what will be sent.
2. *send*: an intent is sent to the exchange (paper here) only if the halt latch, read from the
   HALT bucket, allows it at that moment; the order's updates and fills are published.

Fail closed: no latch (never written, or unreadable) or no control-plane heartbeat within the
timeout means HALTED (``halt.HaltGate``); no portfolio equity means no decision; stale prices
mean no decision. A new latch revision, by the fast broadcast or the KV watch, is put in force,
open orders are cancelled when it halts, and only then is it acknowledged on CONTROL_HALT_ACK.
Positions used for decisions are the fills seen so far plus intents in flight, so two signals
in a row cannot both open the same position.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from decimal import Decimal

from prometheus_client import Counter, Gauge

from qtrader.bus.errors import BusUnavailable
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
    Signal,
    TradingState,
)
from qtrader.execution.decisions import DecisionContext, Denial, decide
from qtrader.execution.halt import HaltGate
from qtrader.execution.paper import PaperExchange
from qtrader.health.contract import DependencyHealth, Status
from qtrader.instruments import ExchangeInfo, paper_exchange_info
from qtrader.runtime import Task, WorkerContext

log = logging.getLogger(__name__)

SIGNALS_DENIED = Counter(
    "qtrader_signals_denied_total", "Signals that did not become an order, by reason.", ["reason"]
)
INTENTS = Counter("qtrader_order_intents_total", "Order intents published.", ["side"])
ORDERS_SENT = Counter("qtrader_orders_sent_total", "Orders sent to the exchange.", ["exchange"])
ORDERS_BLOCKED = Counter(
    "qtrader_orders_blocked_total", "Intents not sent because the latch forbade it.", ["state"]
)
ORDER_UPDATES = Counter("qtrader_order_updates_total", "Order state changes.", ["status"])
FILLS = Counter("qtrader_fills_total", "Fills received from the exchange.", ["symbol"])
TRADING_STATE = Gauge(
    "qtrader_trading_state",
    "The halt latch as this worker obeys it: 0 ACTIVE, 1 REDUCING, 2 HALTED (or unreadable).",
)
HALT_ACKS = Counter(
    "qtrader_halt_acks_total", "Answers on CONTROL_HALT_ACK (new latch revisions and presence)."
)
HEARTBEAT_AGE = Gauge(
    "qtrader_control_heartbeat_age_seconds", "Seconds since the control plane's last heartbeat."
)
_STATE_VALUE = {TradingState.ACTIVE: 0, TradingState.REDUCING: 1, TradingState.HALTED: 2}


@dataclass(frozen=True, kw_only=True)
class ExecutionConfig:
    # A price older than this (wall clock since its candle arrived) is not trusted: a decision
    # without a trusted price is denied.
    max_price_age_s: float = 30.0
    # Without a control-plane heartbeat for this long the worker halts itself.
    heartbeat_timeout_s: float = 10.0


class Execution:
    def __init__(self, context: WorkerContext, config: ExecutionConfig) -> None:
        self._context = context
        self._config = config
        self._exchange_info: ExchangeInfo = paper_exchange_info()
        self._paper: PaperExchange | None = None
        self._gate = HaltGate(heartbeat_timeout_s=config.heartbeat_timeout_s)
        self._acked_revision = -1
        self._positions: dict[str, Decimal] = {}
        self._in_flight: dict[str, tuple[str, Decimal]] = {}  # intent id -> (symbol, signed qty)
        self._seen_fills: set[str] = set()
        self._marks: dict[str, Decimal] = {}
        self._marked_at: dict[str, float] = {}
        self._equity: Decimal | None = None
        TRADING_STATE.set_function(lambda: _STATE_VALUE[self._gate.state()[0]])
        HEARTBEAT_AGE.set_function(lambda: self._gate.heartbeat_age_s() or 0.0)
        context.monitor.add_check("halt-latch", self.check_latch)

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
            "prices": self._context.bus.subscribe(
                subjects.all_of(subjects.CANDLE_PREFIX), Candle, self._on_candle, label="prices"
            ),
            "fills": self._context.bus.subscribe(
                subjects.all_of(subjects.FILL_PREFIX), Fill, self._on_fill, label="fills"
            ),
            "equity": self._follow_equity(),
            "decide": self._decide_loop(),
            "send": self._send_loop(),
        }

    # --- inputs ------------------------------------------------------------------------------

    async def _follow_latch(self) -> None:
        bus = self._context.bus
        while True:
            try:
                latch = await bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch)
                if latch is not None:
                    await self._apply_latch(latch)
                async for latch in bus.kv_watch(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch):
                    await self._apply_latch(latch)
            except BusUnavailable as exc:
                log.warning("halt latch unreadable (%s): halted until it can be read", exc)
                self._gate.forget()
            await asyncio.sleep(0.5)

    async def _apply_latch(self, latch: HaltLatch) -> None:
        """Put a latch in force, cancel open orders if it halts, then acknowledge it."""
        async with self._gate.lock:
            changed = self._gate.apply(latch)
            cancelled = 0
            if changed and latch.state is TradingState.HALTED and self._paper is not None:
                cancelled = self._paper.cancel_all()
        if changed:
            log.info("halt latch revision %d in force: %s", latch.revision, latch.state.value)
        if latch.revision > self._acked_revision or changed:
            await self._acknowledge(latch, cancelled)

    async def _acknowledge(self, latch: HaltLatch, cancelled: int) -> None:
        ack = HaltAck(
            worker_id=self._context.options.worker_id,
            revision=latch.revision,
            state=latch.state,
            open_orders_cancelled=cancelled,
            ts_ms=int(time.time() * 1000),
        )
        try:
            await self._context.bus.broadcast(subjects.CONTROL_HALT_ACK, ack)
        except BusUnavailable as exc:
            log.warning(
                "halt revision %d in force but not acknowledged yet: %s", latch.revision, exc
            )
            return
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
        if latch is not None and latch.revision >= revision:
            await self._apply_latch(latch)

    async def _on_candle(self, candle: Candle) -> None:
        self._marks[candle.symbol] = candle.close
        self._marked_at[candle.symbol] = time.monotonic()
        if self._paper is not None:
            self._paper.on_candle(candle)

    async def _on_fill(self, fill: Fill) -> None:
        if fill.fill_id in self._seen_fills:
            return
        self._seen_fills.add(fill.fill_id)
        signed = fill.quantity * fill.side.sign
        self._positions[fill.symbol] = self._positions.get(fill.symbol, Decimal(0)) + signed

    async def _follow_equity(self) -> None:
        bus = self._context.bus
        while self._equity is None:
            try:
                last = await bus.last_message(
                    subjects.PORTFOLIO, subjects.PORTFOLIO_SNAPSHOT, PortfolioSnapshot
                )
            except BusUnavailable:
                last = None
            if last is not None:
                await self._on_snapshot(last)
            break
        await bus.subscribe(
            subjects.PORTFOLIO_SNAPSHOT, PortfolioSnapshot, self._on_snapshot, label="equity"
        )

    async def _on_snapshot(self, snapshot: PortfolioSnapshot) -> None:
        self._equity = snapshot.equity

    # --- stage 1: decide ---------------------------------------------------------------------

    async def _decide_loop(self) -> None:
        await self._context.policy.wait()
        await self._context.bus.consume(subjects.EXECUTION_SIGNALS, Signal, self._on_signal)

    async def _on_signal(self, signal: Signal) -> None:
        policy = self._context.policy.current
        assert policy is not None  # the consumer starts after the first policy
        outcome = decide(
            signal=signal,
            context=self._decision_context(),
            policy=policy.spec,
            policy_revision=policy.revision,
            now_ms=int(time.time() * 1000),
            exchange=self._exchange_info,
        )
        if isinstance(outcome, Denial):
            SIGNALS_DENIED.labels(outcome.reason.value).inc()
            return
        self._in_flight[outcome.intent_id] = (outcome.symbol, outcome.quantity * outcome.side.sign)
        try:
            await self._context.bus.publish(subjects.order_intent_subject(outcome.symbol), outcome)
        except BusUnavailable:
            del self._in_flight[outcome.intent_id]
            raise
        INTENTS.labels(outcome.side.value).inc()

    def _decision_context(self) -> DecisionContext:
        positions = dict(self._positions)
        for symbol, quantity in self._in_flight.values():
            positions[symbol] = positions.get(symbol, Decimal(0)) + quantity
        return DecisionContext(
            trading_state=self._gate.state()[0],
            positions=positions,
            marks=self._fresh_marks(),
            equity=self._equity,
        )

    def _fresh_marks(self) -> dict[str, Decimal]:
        now = time.monotonic()
        max_age = self._config.max_price_age_s
        return {s: p for s, p in self._marks.items() if now - self._marked_at[s] <= max_age}

    # --- stage 2: send -----------------------------------------------------------------------

    async def _send_loop(self) -> None:
        policy = await self._context.policy.wait()
        paper = policy.spec.paper
        self._paper = PaperExchange(
            exchange=self._exchange_info, fee_bps=paper.fee_bps, slippage_bps=paper.slippage_bps
        )
        await self._context.bus.consume(subjects.EXECUTION_INTENTS, OrderIntent, self._on_intent)

    async def _on_intent(self, intent: OrderIntent) -> None:
        paper = self._paper
        assert paper is not None  # created before the consumer starts
        async with self._gate.lock:  # no latch change between this check and the send
            verdict = self._gate.verdict(intent)
            if verdict.allowed:
                execution = paper.submit(intent, now_ms=int(time.time() * 1000))
        if not verdict.allowed:
            await self._refuse(intent, f"trading is {verdict.state.value}: {verdict.why}")
            return
        ORDERS_SENT.labels("paper").inc()
        bus = self._context.bus
        worker = {"worker_id": self._context.options.worker_id}
        for update in execution.updates:
            update = update.model_copy(update=worker)
            await bus.publish(subjects.order_update_subject(update.symbol), update)
            ORDER_UPDATES.labels(update.status.value).inc()
        for fill in execution.fills:
            await self._on_fill(fill)
            await bus.publish(subjects.fill_subject(fill.symbol), fill)
            FILLS.labels(fill.symbol).inc()
        self._in_flight.pop(intent.intent_id, None)

    async def _refuse(self, intent: OrderIntent, reason: str) -> None:
        """An intent the gate stopped: never sent, recorded as REJECTED for the audit trail."""
        update = OrderUpdate(
            client_order_id=intent.client_order_id,
            intent_id=intent.intent_id,
            symbol=intent.symbol,
            side=intent.side,
            status=OrderStatus.REJECTED,
            quantity=intent.quantity,
            filled_quantity=Decimal(0),
            avg_price=Decimal(0),
            exchange="halt-gate",
            reason=reason[:256],
            worker_id=self._context.options.worker_id,
            ts_ms=int(time.time() * 1000),
        )
        await self._context.bus.publish(subjects.order_update_subject(intent.symbol), update)
        ORDERS_BLOCKED.labels(self._gate.state()[0].value).inc()
        ORDER_UPDATES.labels(update.status.value).inc()
        self._in_flight.pop(intent.intent_id, None)
        log.info("intent %s not sent: %s", intent.intent_id, reason)

    async def check_latch(self) -> DependencyHealth:
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
