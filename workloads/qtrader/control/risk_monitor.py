"""The automatic trips' eyes: the risk evaluators run over the live streams, per EmergencyStop.

The control plane that owns the EmergencyStops (the operator in a cluster, ``qtrader up``
locally) runs one ``RiskMonitor``. For every stop it holds one set of evaluators built from the
stop's ``spec.triggers``: flash crash (``flashCrashPct`` within ``flashCrashWindowSeconds``, on
candle closes), stale market data (``staleMarketDataSeconds`` without a candle for a symbol of
the policy in force), execution error rate (``executionErrorRate`` of the orders that ended in
the last ``ERROR_RATE_WINDOW_S`` seconds, once ``ERROR_RATE_MIN_ORDERS`` ended) and drawdown
(``drawdownPct``, on the portfolio's snapshots). A trigger left out runs no evaluator.

Each alert goes to the RISK stream like any other (the portfolio's drawdown alert at the
policy's limit, execution's exchange-ban alert), so one consumer turns all of them into trips
(``alert_trips`` decides which stops an alert trips). Running here, not in a workload, means the
stale-data check still works when the market-data workload is the thing that died.

The monitor also keeps the current figures a reset must respect (``holding``): the latest
drawdown, each symbol's staleness, and how long an exchange ban (from execution's ban alerts)
still runs. A control plane refuses a stop's reset while one of its trigger conditions holds
(see ``qtrader.control.ess``). Flash crash and error rate are episodes, not states that last,
so they hold nothing back once the stop is tripped.

Candles are the ones the MARKET stream stores, followed from the monitor's start on (an ordered
consumer): a publish the stream drops as a duplicate is no price to judge. Order updates and
snapshots come from core NATS subscriptions as they are published; a reconnect can miss a few.
The evaluators judge what they see, and staleness is judged by the arrival clock, so a silent feed
is noticed whatever was missed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

from qtrader.bus.errors import BusUnavailable
from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    Candle,
    OrderUpdate,
    PolicyRevision,
    PortfolioSnapshot,
    RiskAlert,
    RiskAlertKind,
)
from qtrader.control.ess_resource import EssTriggers
from qtrader.risk.evaluators import (
    DrawdownEvaluator,
    ErrorRateEvaluator,
    FlashCrashEvaluator,
    StaleDataEvaluator,
)

log = logging.getLogger(__name__)

# The error-rate trigger is one number in the EmergencyStop; the window it is measured over and
# the sample it needs are fixed here, so a single rejected order can never be a 100% error rate.
ERROR_RATE_WINDOW_S = 60
ERROR_RATE_MIN_ORDERS = 10
CHECK_INTERVAL_S = 1.0

Clock = Callable[[], float]


@dataclass
class _Evaluators:
    """One EmergencyStop's evaluators; ``None`` where its trigger is off."""

    triggers: EssTriggers | None
    source: str
    flash_crash: FlashCrashEvaluator | None = None
    stale: StaleDataEvaluator | None = None
    error_rate: ErrorRateEvaluator | None = None
    drawdown: DrawdownEvaluator | None = None
    stale_symbols: frozenset[str] = field(default_factory=frozenset)


def _build(triggers: EssTriggers | None, *, source: str) -> _Evaluators:
    evaluators = _Evaluators(triggers=triggers, source=source)
    if triggers is None:
        return evaluators
    if triggers.flash_crash_pct is not None:
        evaluators.flash_crash = FlashCrashEvaluator(
            Decimal(triggers.flash_crash_pct),
            triggers.flash_crash_window_seconds * 1000,
            source=source,
        )
    if triggers.execution_error_rate is not None:
        evaluators.error_rate = ErrorRateEvaluator(
            triggers.execution_error_rate,
            ERROR_RATE_WINDOW_S * 1000,
            ERROR_RATE_MIN_ORDERS,
            source=source,
        )
    if triggers.drawdown_pct is not None:
        evaluators.drawdown = DrawdownEvaluator(Decimal(triggers.drawdown_pct), source=source)
    return evaluators


def _stale_held(evaluators: _Evaluators, now_ms: int) -> list[str]:
    assert evaluators.stale is not None
    seconds = evaluators.triggers.stale_market_data_seconds if evaluators.triggers else None
    return [
        f"no {symbol} candle for {age} s, beyond the {seconds} s stale-data trigger"
        for symbol, age in evaluators.stale.stale(now_ms).items()
    ]


class RiskMonitor:
    """Evaluates every configured EmergencyStop's triggers and publishes the alerts."""

    def __init__(self, bus: Bus, *, source: str, clock: Clock = time.time) -> None:
        self._bus = bus
        self._source = source
        self._clock = clock
        self._stops: dict[str, _Evaluators] = {}
        self._pending: list[RiskAlert] = []
        self._drawdown: tuple[tuple[int, int], Decimal] | None = None  # (ts, seq), latest figure
        self._ban_until_ms = 0
        self._flushing = asyncio.Lock()  # handlers run concurrently; each alert goes out once
        self._symbols: frozenset[str] | None = None  # of the last policy that decoded

    @property
    def stops(self) -> frozenset[str]:
        return frozenset(self._stops)

    def configure(self, name: str, triggers: EssTriggers | None) -> None:
        """Evaluate stop ``name`` with these triggers; unchanged triggers keep their state."""
        current = self._stops.get(name)
        if current is not None and current.triggers == triggers:
            return
        self._stops[name] = _build(triggers, source=f"{self._source}/{name}")
        log.info("risk monitor: EmergencyStop %s triggers %s", name, triggers)

    def forget(self, name: str) -> None:
        self._stops.pop(name, None)

    async def run(self) -> None:
        """Follow the streams and check staleness until cancelled."""
        bus = self._bus
        await asyncio.gather(
            bus.replay(
                subjects.MARKET,
                subjects.all_of(subjects.CANDLE_PREFIX),
                Candle,
                self._on_candle,
                label="risk",
                from_now=True,
            ),
            bus.subscribe(
                subjects.all_of(subjects.ORDER_UPDATE_PREFIX),
                OrderUpdate,
                self._on_update,
                label="risk",
            ),
            bus.subscribe(
                subjects.PORTFOLIO_SNAPSHOT, PortfolioSnapshot, self._on_snapshot, label="risk"
            ),
            bus.subscribe(
                subjects.risk_alert_subject(RiskAlertKind.EXCHANGE_BAN.value),
                RiskAlert,
                self.on_ban,
                label="risk",
            ),
            self._check_forever(),
        )

    # --- inputs -----------------------------------------------------------------------------

    async def _on_candle(self, candle: Candle) -> None:
        now_ms = self._now_ms()
        for evaluators in self._stops.values():
            if evaluators.stale is not None:
                evaluators.stale.on_candle(candle.symbol, now_ms)
            if evaluators.flash_crash is not None:
                self._raise(evaluators.flash_crash.on_candle(candle))
        await self._flush()

    async def _on_update(self, update: OrderUpdate) -> None:
        for evaluators in self._stops.values():
            if evaluators.error_rate is not None:
                self._raise(evaluators.error_rate.on_update(update))
        await self._flush()

    async def _on_snapshot(self, snapshot: PortfolioSnapshot) -> None:
        order = (snapshot.ts_ms, snapshot.sequence)
        if self._drawdown is None or order > self._drawdown[0]:
            self._drawdown = (order, snapshot.drawdown_pct)
        for evaluators in self._stops.values():
            if evaluators.drawdown is not None:
                self._raise(evaluators.drawdown.on_snapshot(snapshot))
        await self._flush()

    async def on_ban(self, alert: RiskAlert) -> None:
        """Execution's ban alert: its ``value`` is the seconds the ban runs from ``ts_ms``."""
        until_ms = alert.ts_ms + int(alert.value * 1000)
        self._ban_until_ms = max(self._ban_until_ms, until_ms)

    def holding(self, name: str) -> str | None:
        """Which of stop ``name``'s trigger conditions still hold now, with the figures, joined
        by "; "; None when none does (or none is known yet)."""
        now_ms = self._now_ms()
        evaluators = self._stops.get(name)
        held = [] if evaluators is None else self._drawdown_held(evaluators)
        if evaluators is not None and evaluators.stale is not None:
            held += _stale_held(evaluators, now_ms)
        if self._ban_until_ms > now_ms:  # a ban trips every stop, so it holds every stop
            left_s = (self._ban_until_ms - now_ms) / 1000
            held.append(f"the exchange ban still runs for {left_s:.0f} s")
        return "; ".join(held) or None

    def _drawdown_held(self, evaluators: _Evaluators) -> list[str]:
        limit = evaluators.triggers.drawdown_pct if evaluators.triggers else None
        if limit is None or self._drawdown is None or self._drawdown[1] < Decimal(limit):
            return []
        return [f"drawdown {self._drawdown[1]}% still beyond the {limit}% trigger"]

    async def _check_forever(self) -> None:
        while True:
            await self.check_stale()
            await asyncio.sleep(CHECK_INTERVAL_S)

    async def check_stale(self) -> None:
        """Watch the policy's symbols (read each round: a new policy may add some), then alert
        on each that has had no candle for longer than a stop's ``staleMarketDataSeconds``."""
        symbols = await self._policy_symbols()
        now_ms = self._now_ms()
        for evaluators in self._stops.values():
            seconds = evaluators.triggers.stale_market_data_seconds if evaluators.triggers else None
            if seconds is None or symbols is None:
                continue
            self._watch_symbols(evaluators, seconds, symbols, now_ms)
            assert evaluators.stale is not None
            for alert in evaluators.stale.check(now_ms):
                self._raise(alert)
        await self._flush()

    def _watch_symbols(
        self, evaluators: _Evaluators, seconds: int, symbols: frozenset[str], now_ms: int
    ) -> None:
        """(Re)start the stale evaluator when the symbols change; their clocks start now."""
        if evaluators.stale is not None and evaluators.stale_symbols == symbols:
            return
        evaluators.stale = StaleDataEvaluator(
            seconds,
            symbols=sorted(symbols),
            start_ms=now_ms,
            source=evaluators.source,
        )
        evaluators.stale_symbols = symbols

    async def _policy_symbols(self) -> frozenset[str] | None:
        """The symbols of the policy in force; None when there is none or it cannot be read
        (nothing to watch yet: a stack with no policy trades nothing either). A value that
        does not decode leaves the last good policy's symbols watched: the workers keep
        trading under that policy."""
        try:
            revision = await self._bus.kv_get(
                subjects.POLICY_BUCKET, subjects.POLICY_KEY, PolicyRevision
            )
        except BusUnavailable as exc:
            log.warning("risk monitor cannot read the policy: %s", exc)
            return None
        if isinstance(revision, PolicyRevision):
            self._symbols = frozenset(revision.spec.symbols)
        elif revision is None:
            self._symbols = None
        return self._symbols

    # --- outputs ----------------------------------------------------------------------------

    def _raise(self, alert: RiskAlert | None) -> None:
        if alert is not None:
            self._pending.append(alert)

    async def _flush(self) -> None:
        """Publish what is pending; an alert that cannot be published yet is kept for the next
        round (an episode alerts once, so it must not be lost)."""
        async with self._flushing:
            await self._publish_pending()

    async def _publish_pending(self) -> None:
        while self._pending:
            alert = self._pending[0]
            try:
                await self._bus.publish(subjects.risk_alert_subject(alert.alert_kind.value), alert)
            except BusUnavailable as exc:
                log.warning("risk alert %s not published yet: %s", alert.alert_id, exc)
                return
            self._pending.pop(0)
            log.warning("risk alert %s: %s", alert.alert_id, alert.detail)

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)
