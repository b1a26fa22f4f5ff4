"""The execution core as a backtest drives it: the candles' time, the paper exchange, a halt the
run trips itself.

Both engines (``engine.run_backtest`` and ``streamed.run_streamed_backtest``) trade through one
``BacktestExecution``: the live worker's ``ExecutionCore`` (exposure book, intake, ``decide``, the
order driver's attempts, retries of a partly filled remainder, expiry, slippage bound and halt
gate) on a ``SimulatedClock`` set to each step's time and a ``PaperVenue``. What the live worker
gets from its streams it gets here from the engine: prices (``mark``), signals (``offer``), the
portfolio's equity (the engine's ledger, read when the core asks), and the EmergencyStop, which
the engine trips on its drawdown rule (``halt``) with a latch the gate obeys as it obeys the
control plane's.

Each step decides its signals in cycles of at most ``maxPerCycle`` until the intake is empty,
and each intent is driven to its final state before the next signal is decided (the live send
stage running as fast as the paper exchange answers), so every decision sees the fills of the
ones before it. ``execute``'s coroutine is driven to its end at once (``clock.drive``): on the
simulated clock and the paper exchange nothing in it ever waits.

The gate's heartbeat timeout is infinite: the control plane is this run itself, never silent.
The book keeps no history (``ExposureBook(keep_history=False)``) and the paper exchange no
record of executions: intent ids and fill ids never repeat here, and nothing grows with the run.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

from qtrader.contracts.messages import (
    Candle,
    Fill,
    HaltLatch,
    OrderIntent,
    OrderUpdate,
    Signal,
    TradingState,
)
from qtrader.contracts.policy import TradingPolicySpec
from qtrader.execution.clock import SimulatedClock, drive
from qtrader.execution.core import CoreSettings, ExecutionCore
from qtrader.execution.decisions import Denial
from qtrader.execution.exposure import ExposureBook
from qtrader.execution.halt import HaltGate
from qtrader.execution.intake import Dropped
from qtrader.execution.paper import PaperExchange, PaperVenue
from qtrader.instruments import ExchangeInfo

WORKER_ID = "backtest"
_ACTIVE_REVISION = 1


@dataclass(frozen=True)
class _Policy:
    """The policy in force for the whole run (a backtest has one revision, 0)."""

    spec: TradingPolicySpec
    revision: int = 0


@dataclass
class ExecutionCounts:
    """What the core did with the run's signals."""

    orders: int = 0  # intents decided
    unfilled: int = 0  # intents that ended without a fill (the card's ``unfilled_orders``)
    denials: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)


class BacktestExecution:
    def __init__(
        self,
        spec: TradingPolicySpec,
        info: ExchangeInfo,
        *,
        equity: Callable[[], Decimal],
        candle_of: Callable[[str], Candle],
        on_fill: Callable[[Fill], None],
        on_intent: Callable[[OrderIntent], None] | None = None,
        on_update: Callable[[OrderUpdate], None] | None = None,
        max_volume_share: Decimal | None = None,
    ) -> None:
        """``equity``: the portfolio's, when the core asks; ``candle_of``: the step's candle of
        a symbol, which the paper exchange fills at (asked only when an order is sent for it);
        ``on_fill``: each fill, once it is in the core's book (the engine books it)."""
        self.clock = SimulatedClock()
        self.gate = HaltGate(heartbeat_timeout_s=math.inf, clock=self.clock.monotonic_s)
        self.gate.apply(
            HaltLatch(state=TradingState.ACTIVE, revision=_ACTIVE_REVISION, issued_at_ms=0)
        )
        self.gate.heartbeat()
        book = ExposureBook(keep_history=False)
        self._paper = PaperExchange(
            exchange=info,
            fee_bps=spec.paper.fee_bps,
            slippage_bps=spec.paper.slippage_bps,
            positions=book.position,
            keep_executions=False,
            validate_messages=False,
            max_volume_share=max_volume_share,
        )
        policy = _Policy(spec)
        self.core = ExecutionCore(
            gate=self.gate,
            clock=self.clock,
            policy=lambda: policy,
            equity=equity,
            publish_update=self._publish_update,
            publish_fill=self._publish_fill,
            worker_id=WORKER_ID,
            settings=CoreSettings(validate_messages=False),
            book=book,
        )
        self.core.connect(PaperVenue(self._paper, info, clock=self.clock))
        self.core.open_intake(spec.signals)
        self.counts = ExecutionCounts()
        self._candle_of = candle_of
        self._on_fill = on_fill
        self._on_intent = on_intent
        self._on_update = on_update
        self._halted = False

    def at(self, now_ms: int) -> None:
        """The step's time: the candles' close (``close_time_ms + 1``)."""
        self.clock.set(now_ms)

    def mark(self, symbol: str, close: Decimal) -> None:
        self.core.mark(symbol, close)

    def offer(self, signal: Signal) -> None:
        self._count_drops(self.core.offer(signal))

    @property
    def halted(self) -> bool:
        return self._halted

    def halt(self, why: str) -> None:
        """Trip the run's EmergencyStop: a HALTED latch, in force at once; nothing is sent
        from now on and every signal is denied ``halted``."""
        self.gate.apply(
            HaltLatch(
                state=TradingState.HALTED,
                revision=_ACTIVE_REVISION + 1,
                reason=why[:1024],
                issued_at_ms=self.clock.wall_ms(),
            )
        )
        self._halted = self.gate.state()[0] is TradingState.HALTED

    def decide_all(self) -> None:
        """Cycles of at most ``maxPerCycle`` signals until the intake is empty; each intent is
        sent and settled before the next signal is decided."""
        intake = self.core.intake
        assert intake is not None  # opened in __init__
        while len(intake):
            taken, dropped = self.core.take_cycle()
            self._count_drops(dropped)
            for signal in taken:
                self._decide(signal)

    def _decide(self, signal: Signal) -> None:
        outcome = self.core.decide(signal)
        if isinstance(outcome, Denial):
            self.counts.denials[outcome.reason.value] += 1
            return
        self.counts.orders += 1
        if self._on_intent is not None:
            self._on_intent(outcome)
        self._paper.on_candle(self._candle_of(outcome.symbol))
        final = drive(self.core.execute(outcome))
        assert final is not None, "a backtest drives each intent once"
        if final.filled_quantity == 0:
            self.counts.unfilled += 1

    async def _publish_update(self, update: OrderUpdate) -> None:
        if self._on_update is not None:
            self._on_update(update)

    async def _publish_fill(self, fill: Fill) -> None:
        self._on_fill(fill)

    def _count_drops(self, dropped: list[Dropped]) -> None:
        for drop in dropped:
            self.counts.dropped[drop.reason.value] += 1
