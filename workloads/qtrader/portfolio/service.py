"""The portfolio role: fills and prices in, exact positions, PnL, equity and drawdown out.

Its state is derived, never stored: at every start it replays the FILLS stream from the first
message (the ledger ignores a fill id it has applied, so a redelivery counts once) and then
follows new fills. Prices come from the candles the MARKET stream stores, followed from the
worker's start on (an ordered consumer, not a subscription to the subject: a publish the stream
drops as a duplicate never becomes a mark, and a reconnect misses none). A snapshot is
published at start, after the fills it has not yet reported, and on price moves at most every
``snapshot_interval_s``.

Each snapshot also goes through the drawdown evaluator: a drawdown at or beyond the policy's
``risk.maxDrawdownPct`` publishes a ``drawdown`` risk alert (once per episode), which the
operator turns into an EmergencyStop trip when the stop's drawdown trigger is set.

It also serves the live viewers' event stream on its HTTP port (``/events``, a WebSocket, and
``/viewer/stats``): ESS transitions, orders, fills, risk alerts and snapshots (``qtrader.viewer``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge

from qtrader.bus.errors import BusUnavailable
from qtrader.contracts import subjects
from qtrader.contracts.messages import Candle, Fill, PortfolioSnapshot, RiskAlert
from qtrader.contracts.policy import TradingPolicySpec
from qtrader.health.contract import DependencyHealth, Status
from qtrader.instruments import paper_exchange_info
from qtrader.portfolio.ledger import Ledger
from qtrader.risk.evaluators import DrawdownEvaluator
from qtrader.runtime import Task, WorkerContext
from qtrader.viewer.app import attach_viewer
from qtrader.viewer.fanout import FanoutHub
from qtrader.viewer.feed import ViewerState, feed_viewers

log = logging.getLogger(__name__)

FILLS_APPLIED = Counter("qtrader_portfolio_fills_applied_total", "Fills applied to the ledger.")
EQUITY = Gauge("qtrader_portfolio_equity_usd", "Equity: capital + realized - fees + unrealized.")
REALIZED = Gauge("qtrader_portfolio_realized_pnl_usd", "Realized PnL before fees.")
UNREALIZED = Gauge("qtrader_portfolio_unrealized_pnl_usd", "Unrealized PnL at the latest marks.")
FEES = Gauge("qtrader_portfolio_fees_usd", "Fees paid since the first fill.")
DRAWDOWN = Gauge("qtrader_portfolio_drawdown_ratio", "Current drawdown from the equity peak (0-1).")
MAX_DRAWDOWN = Gauge("qtrader_portfolio_max_drawdown_ratio", "Worst peak-to-trough drawdown (0-1).")
DRAWDOWN_LIMIT = Gauge(
    "qtrader_portfolio_drawdown_limit_ratio",
    "The policy's risk.maxDrawdownPct as a ratio (0-1): what alerts compare the drawdown to.",
)
OPEN_POSITIONS = Gauge("qtrader_portfolio_open_positions", "Symbols with a non-zero position.")
SNAPSHOTS = Counter("qtrader_portfolio_snapshots_published_total", "Snapshots published.")
RISK_ALERTS = Counter(
    "qtrader_risk_alerts_published_total", "Risk alerts published, by kind.", ["kind"]
)


# Browser origins (comma-separated, e.g. https://console.example) allowed to open /events
# besides the portfolio's own host; "*" allows any.
VIEWER_ORIGINS_ENV = "QTRADER_VIEWER_ALLOWED_ORIGINS"


def viewer_origins(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


@dataclass(frozen=True, kw_only=True)
class PortfolioConfig:
    snapshot_interval_s: float = 0.5


class Portfolio:
    def __init__(self, context: WorkerContext, config: PortfolioConfig) -> None:
        self._context = context
        self._config = config
        self._ledger: Ledger | None = None
        self._sequence = 0
        self._dirty = asyncio.Event()
        self._last_publish_error = ""
        self._drawdown: DrawdownEvaluator | None = None
        self._pending_alert: RiskAlert | None = None
        self.viewers = FanoutHub()
        self._viewer_state = ViewerState()
        attach_viewer(
            context.app,
            self.viewers,
            state=self._viewer_present,
            allowed_origins=viewer_origins(os.environ.get(VIEWER_ORIGINS_ENV, "")),
        )
        context.monitor.add_check("ledger", self.check)
        context.policy.add_listener(
            lambda revision: DRAWDOWN_LIMIT.set(float(revision.spec.risk.max_drawdown_pct) / 100)
        )

    def tasks(self) -> dict[str, Task]:
        return {
            "portfolio": self._serve(),
            "viewer-feed": feed_viewers(self._context.bus, self.viewers, self._viewer_state),
        }

    async def _viewer_present(self) -> dict[str, Any]:
        """What a viewer connecting now is told first: latch, portfolio and this health."""
        report = await self._context.monitor.report()
        return {**self._viewer_state.present(), "health": report.model_dump(mode="json")}

    async def _serve(self) -> None:
        policy = await self._context.policy.wait()
        self._ledger = Ledger(
            initial_capital=policy.spec.paper.initial_capital_usd, exchange=paper_exchange_info()
        )
        self._watch_drawdown(policy.spec)
        self._context.policy.add_listener(lambda revision: self._watch_drawdown(revision.spec))
        bus = self._context.bus
        self._dirty.set()  # the first snapshot tells execution the equity it may use
        await asyncio.gather(
            bus.replay(
                subjects.FILLS,
                subjects.all_of(subjects.FILL_PREFIX),
                Fill,
                self._on_fill,
                label="portfolio-fills",
            ),
            # The stream, not the subject: a candle the stream did not store is no price.
            bus.replay(
                subjects.MARKET,
                subjects.all_of(subjects.CANDLE_PREFIX),
                Candle,
                self._on_candle,
                label="marks",
                # The last stored close of each symbol first: a restarted portfolio marks its
                # positions at once, not at the next candle (its staleness is not judged here).
                from_last=True,
            ),
            self._publish_loop(),
        )

    def _watch_drawdown(self, spec: TradingPolicySpec) -> None:
        limit = spec.risk.max_drawdown_pct
        if self._drawdown is None or self._drawdown.limit_pct != limit:
            source = f"portfolio/{self._context.options.worker_id}"
            self._drawdown = DrawdownEvaluator(limit, source=source)

    async def _on_fill(self, fill: Fill) -> None:
        assert self._ledger is not None
        if self._ledger.apply_fill(fill):
            FILLS_APPLIED.inc()
            self._dirty.set()

    async def _on_candle(self, candle: Candle) -> None:
        assert self._ledger is not None
        self._ledger.mark(candle.symbol, candle.close)
        self._dirty.set()

    async def _publish_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            await self._publish_snapshot()
            await asyncio.sleep(self._config.snapshot_interval_s)

    async def _publish_snapshot(self) -> None:
        ledger = self._ledger
        assert ledger is not None
        self._sequence += 1
        snapshot = ledger.snapshot(sequence=self._sequence, ts_ms=int(time.time() * 1000))
        _export(ledger)
        try:
            await self._context.bus.publish(subjects.PORTFOLIO_SNAPSHOT, snapshot)
        except BusUnavailable as exc:
            self._last_publish_error = str(exc)
            self._dirty.set()  # try again on the next round
            return
        self._last_publish_error = ""
        SNAPSHOTS.inc()
        await self._evaluate(snapshot)

    async def _evaluate(self, snapshot: PortfolioSnapshot) -> None:
        alert = self._pending_alert
        if alert is None and self._drawdown is not None:
            alert = self._drawdown.on_snapshot(snapshot)
        if alert is None:
            return
        subject = subjects.risk_alert_subject(alert.alert_kind.value)
        try:
            await self._context.bus.publish(subject, alert)
        except BusUnavailable as exc:
            log.warning("risk alert %s not published yet: %s", alert.alert_id, exc)
            self._pending_alert = alert  # the episode's one alert must not be lost
            self._dirty.set()
            return
        self._pending_alert = None
        RISK_ALERTS.labels(alert.alert_kind.value).inc()
        log.warning("risk alert %s: %s", alert.alert_id, alert.detail)

    async def check(self) -> DependencyHealth:
        if self._ledger is None:
            return DependencyHealth(
                name="ledger", status=Status.DEGRADED, detail="waiting for policy"
            )
        if self._last_publish_error:
            return DependencyHealth(
                name="ledger", status=Status.DEGRADED, detail=self._last_publish_error
            )
        return DependencyHealth(
            name="ledger",
            status=Status.OK,
            detail=f"{self._ledger.fills_applied} fills, equity {self._ledger.equity:.2f}",
        )


def _export(ledger: Ledger) -> None:
    EQUITY.set(float(ledger.equity))
    REALIZED.set(float(ledger.realized_pnl))
    UNREALIZED.set(float(ledger.unrealized_pnl))
    FEES.set(float(ledger.fees))
    DRAWDOWN.set(float(ledger.drawdown_pct) / 100)
    MAX_DRAWDOWN.set(float(ledger.max_drawdown_pct) / 100)
    OPEN_POSITIONS.set(ledger.open_positions)
