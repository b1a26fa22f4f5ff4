"""The execution role: signals become order intents, intents become orders on the exchange.

Two stages, each a durable consumer:
1. *decide*: a signal passes the policy's checks (``decisions.decide``, pure) and becomes an
   ``OrderIntent`` published to the ORDERS stream: the durable record of what will be sent.
2. *send*: an intent is sent to the exchange (paper here) only if the halt latch, read from the
   HALT bucket, allows it at that moment; the order's updates and fills are published.

Fail closed: no latch (never written, or unreadable) means HALTED; no portfolio equity means no
decision; stale prices mean no decision. Positions used for decisions are the fills seen so far
plus intents in flight, so two signals in a row cannot both open the same position.
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
    Fill,
    HaltLatch,
    OrderIntent,
    PortfolioSnapshot,
    Signal,
    TradingState,
)
from qtrader.execution.decisions import DecisionContext, Denial, decide
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
_STATE_VALUE = {TradingState.ACTIVE: 0, TradingState.REDUCING: 1, TradingState.HALTED: 2}


@dataclass(frozen=True, kw_only=True)
class ExecutionConfig:
    # A price older than this (wall clock since its candle arrived) is not trusted: a decision
    # without a trusted price is denied.
    max_price_age_s: float = 30.0


class Execution:
    def __init__(self, context: WorkerContext, config: ExecutionConfig) -> None:
        self._context = context
        self._config = config
        self._exchange_info: ExchangeInfo = paper_exchange_info()
        self._paper: PaperExchange | None = None
        self._latch: HaltLatch | None = None
        self._latch_error = "latch not read yet"
        self._positions: dict[str, Decimal] = {}
        self._in_flight: dict[str, tuple[str, Decimal]] = {}  # intent id -> (symbol, signed qty)
        self._seen_fills: set[str] = set()
        self._marks: dict[str, Decimal] = {}
        self._marked_at: dict[str, float] = {}
        self._equity: Decimal | None = None
        TRADING_STATE.set(2)
        context.monitor.add_check("halt-latch", self.check_latch)

    def tasks(self) -> dict[str, Task]:
        return {
            "latch": self._follow_latch(),
            "prices": self._context.bus.subscribe(
                subjects.all_of(subjects.CANDLE_PREFIX), Candle, self._on_candle, label="prices"
            ),
            "fills": self._context.bus.subscribe(
                subjects.all_of(subjects.FILL_PREFIX), Fill, self._on_fill, label="fills"
            ),
            "equity": self._context.bus.subscribe(
                subjects.PORTFOLIO_SNAPSHOT, PortfolioSnapshot, self._on_snapshot, label="equity"
            ),
            "decide": self._decide_loop(),
            "send": self._send_loop(),
        }

    # --- inputs ------------------------------------------------------------------------------

    async def _follow_latch(self) -> None:
        bus = self._context.bus
        while True:
            try:
                self._set_latch(
                    await bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch)
                )
                async for latch in bus.kv_watch(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch):
                    self._set_latch(latch)
            except BusUnavailable as exc:
                self._latch = None
                self._latch_error = f"latch unreadable: {exc}"
                TRADING_STATE.set(2)
            await asyncio.sleep(0.5)

    def _set_latch(self, latch: HaltLatch | None) -> None:
        self._latch = latch
        self._latch_error = "no latch has been written" if latch is None else ""
        TRADING_STATE.set(_STATE_VALUE[self.trading_state])
        if latch is not None:
            log.info("halt latch revision %d: %s", latch.revision, latch.state.value)

    @property
    def trading_state(self) -> TradingState:
        return self._latch.state if self._latch is not None else TradingState.HALTED

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
            trading_state=self.trading_state,
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
        state = self.trading_state
        if state is TradingState.HALTED or (
            state is TradingState.REDUCING and not intent.reduce_only
        ):
            ORDERS_BLOCKED.labels(state.value).inc()
            self._in_flight.pop(intent.intent_id, None)
            log.info("intent %s not sent: trading is %s", intent.intent_id, state.value)
            return
        paper = self._paper
        assert paper is not None  # created before the consumer starts
        execution = paper.submit(intent, now_ms=int(time.time() * 1000))
        ORDERS_SENT.labels("paper").inc()
        bus = self._context.bus
        for update in execution.updates:
            await bus.publish(subjects.order_update_subject(update.symbol), update)
            ORDER_UPDATES.labels(update.status.value).inc()
        for fill in execution.fills:
            await self._on_fill(fill)
            await bus.publish(subjects.fill_subject(fill.symbol), fill)
            FILLS.labels(fill.symbol).inc()
        self._in_flight.pop(intent.intent_id, None)

    async def check_latch(self) -> DependencyHealth:
        if self._latch is None:
            return DependencyHealth(
                name="halt-latch",
                status=Status.DEGRADED,
                detail=f"{self._latch_error}: not trading (fail closed)",
            )
        latch = self._latch
        status = Status.OK if latch.state is TradingState.ACTIVE else Status.DEGRADED
        detail = f"revision {latch.revision}: {latch.state.value}"
        return DependencyHealth(
            name="halt-latch",
            status=status,
            detail=detail + (f" ({latch.reason})" if latch.reason else ""),
        )
