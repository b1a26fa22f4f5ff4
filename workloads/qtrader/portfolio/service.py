"""The portfolio role: fills, account entries and prices in; exact positions, PnL, funding,
equity and drawdown out.

Its state is derived from the FILLS stream: our fills and the account entries execution reads
from the venue's income (funding, transfers, other income: ``AccountEntry``), both read by one
ordered consumer in the stream's order. It is checkpointed: every ``checkpoint_interval_s``
(when the stream moved it) it writes its exact ledger and the FILLS sequence that covers to the
CHECKPOINTS stream; at start it restores the newest usable checkpoint
(``portfolio.checkpoints``) and replays FILLS after that sequence only, so its start time is
bounded and FILLS' retention never loses a position. The ledger ignores a fill id or an entry id
it has applied, so a redelivery counts once.

A fill or an entry the ledger cannot apply (``BookingRefused``: its id applied before with other
content) is never skipped: the portfolio stops there. ``/health`` goes CRITICAL naming it, its
FILLS sequence and why; a ``ledger`` risk alert is published and
``qtrader_portfolio_ledger_stuck`` is 1; nothing later is applied (the order matters) and no
checkpoint goes past it, so a restart stops at the same message. A person decides: fix the
stream's producer, or restart the portfolio with ``--skip-fill SEQUENCE`` to pass over exactly
that message (only if the ledger refuses it; recorded in every later checkpoint). A message that
does not decode at all is another matter: the bus refuses and counts it
(``qtrader_messages_rejected_total``), as for every consumer.

Prices come from the candles the MARKET stream stores, followed from the
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
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from prometheus_client import Counter, Gauge
from pydantic import ValidationError

from qtrader.bus.errors import BusUnavailable
from qtrader.bus.nats_bus import Route
from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    AccountEntry,
    Candle,
    Fill,
    PortfolioSnapshot,
    RiskAlert,
    RiskAlertKind,
    VenueAccount,
)
from qtrader.contracts.policy import TradingPolicySpec
from qtrader.health.contract import REFRESH_INTERVAL_S, DependencyHealth, Status
from qtrader.instruments import paper_exchange_info
from qtrader.portfolio.checkpoints import Start, start_from_checkpoint
from qtrader.portfolio.ledger import BookingRefused, Ledger
from qtrader.portfolio.wallet_check import WalletCheck
from qtrader.risk.evaluators import DrawdownEvaluator
from qtrader.runtime import Task, WorkerContext
from qtrader.viewer.app import attach_viewer
from qtrader.viewer.fanout import FanoutHub
from qtrader.viewer.feed import ViewerState, feed_viewers

log = logging.getLogger(__name__)

FILLS_APPLIED = Counter("qtrader_portfolio_fills_applied_total", "Fills applied to the ledger.")
ENTRIES_APPLIED = Counter(
    "qtrader_portfolio_entries_applied_total",
    "Account entries (funding, transfers, other income the venue booked) applied to the ledger.",
)
EQUITY = Gauge(
    "qtrader_portfolio_equity_usd",
    "Equity: capital + realized - fees + funding + transfers + other income + unrealized.",
)
REALIZED = Gauge("qtrader_portfolio_realized_pnl_usd", "Realized PnL before fees.")
UNREALIZED = Gauge("qtrader_portfolio_unrealized_pnl_usd", "Unrealized PnL at the latest marks.")
FEES = Gauge("qtrader_portfolio_fees_usd", "Fees paid since the first fill.")
FUNDING = Gauge("qtrader_portfolio_funding_usd", "Funding booked in USDT (positive: received).")
TRANSFERS = Gauge("qtrader_portfolio_transfers_usd", "Net USDT transferred into the account.")
OTHER_INCOME = Gauge(
    "qtrader_portfolio_other_income_usd",
    "Other USDT income the venue booked (rebates, bonuses; negative: costs).",
)
FEES_BY_ASSET = Gauge(
    "qtrader_portfolio_fees_by_asset",
    "Commissions paid, in the units of the asset they were paid in (USDT, BNB).",
    ["asset"],
)
DRAWDOWN = Gauge("qtrader_portfolio_drawdown_ratio", "Current drawdown from the equity peak (0-1).")
MAX_DRAWDOWN = Gauge("qtrader_portfolio_max_drawdown_ratio", "Worst peak-to-trough drawdown (0-1).")
DRAWDOWN_LIMIT = Gauge(
    "qtrader_portfolio_drawdown_limit_ratio",
    "The policy's risk.maxDrawdownPct as a ratio (0-1): what alerts compare the drawdown to.",
)
OPEN_POSITIONS = Gauge("qtrader_portfolio_open_positions", "Symbols with a non-zero position.")
SNAPSHOTS = Counter("qtrader_portfolio_snapshots_published_total", "Snapshots published.")
FILLS_REFUSED = Counter(
    "qtrader_portfolio_fills_refused_total",
    "Fills the ledger could not apply; the portfolio stops at the first (see ledger_stuck).",
)
ENTRIES_REFUSED = Counter(
    "qtrader_portfolio_entries_refused_total",
    "Account entries the ledger could not apply; the portfolio stops at the first.",
)
LEDGER_STUCK = Gauge(
    "qtrader_portfolio_ledger_stuck",
    "1 while the portfolio is stopped at a fill or an account entry its ledger cannot apply, "
    "until a person acts.",
)
FILLS_SKIPPED = Counter(
    "qtrader_portfolio_fills_skipped_total",
    "Refused fills or account entries passed over on a person's --skip-fill.",
)
UNVALUED_FEES = Gauge(
    "qtrader_portfolio_unvalued_fee_assets",
    "Assets holding fees of unknown USDT value (equity leaves them out: it is incomplete).",
)
UNVALUED_INCOME = Gauge(
    "qtrader_portfolio_unvalued_income_assets",
    "Assets holding funding or income of unknown USDT value (equity leaves them out).",
)
CHECKPOINTS_WRITTEN = Counter(
    "qtrader_portfolio_checkpoints_total", "Checkpoints of the exact ledger written."
)
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
    # How often at most the exact ledger is checkpointed, when fills moved it (seconds): what a
    # restart replays is at most this much of FILLS.
    checkpoint_interval_s: float = 5.0
    # FILLS sequences a person decided to pass over if the ledger refuses them (--skip-fill).
    skip_fills: frozenset[int] = frozenset()
    # How long the wallet must keep differing from the venue's over settled reads before it is a
    # wallet_reconciliation alert (``portfolio.wallet_check``); testnet and live only.
    wallet_grace_s: float = 60.0


@dataclass(frozen=True, kw_only=True)
class Booking:
    """One message of FILLS for the ledger: a fill or an account entry, and how to apply it."""

    noun: str  # "fill", "account entry"
    ident: str  # its fill id or entry id
    symbol: str | None
    apply: Callable[[], bool]  # the ledger's apply: False for a repeat; raises when refused
    applied: Counter
    refused: Counter

    def __str__(self) -> str:
        return f"{self.noun} {self.ident}"


@dataclass(frozen=True, kw_only=True)
class StuckAt:
    """The fill or account entry the portfolio stopped at."""

    what: str  # "fill <id>", "account entry <id>"
    sequence: int
    reason: str

    def __str__(self) -> str:
        return (
            f"stopped at FILLS sequence {self.sequence}: {self.what} cannot be applied "
            f"({self.reason}); nothing later is applied until a person acts (fix its "
            f"producer, or restart the portfolio with --skip-fill {self.sequence})"
        )


class Portfolio:
    def __init__(self, context: WorkerContext, config: PortfolioConfig) -> None:
        self._context = context
        self._config = config
        self._ledger: Ledger | None = None
        self._sequence = 0
        self._dirty = asyncio.Event()
        self._last_publish_error = ""
        self._drawdown: DrawdownEvaluator | None = None
        self._pending_alerts: list[RiskAlert] = []
        self._fills_through = 0  # FILLS sequence of the last fill the ledger has accounted for
        self._checkpointed = -1  # ... as of the last checkpoint written (none yet)
        self._skipped: tuple[int, ...] = ()
        self._stuck: StuckAt | None = None
        self._start_note = ""
        self._fell_back = False
        self._checkpoint_error = ""
        self._wallet = WalletCheck(
            grace_s=config.wallet_grace_s, source=f"portfolio/{context.options.worker_id}"
        )
        self.viewers = FanoutHub()
        self._viewer_state = ViewerState()
        attach_viewer(
            context.app,
            self.viewers,
            state=self._viewer_present,
            allowed_origins=viewer_origins(os.environ.get(VIEWER_ORIGINS_ENV, "")),
        )
        context.monitor.add_check("ledger", self.check)
        context.monitor.add_check("wallet", self.check_wallet)
        context.policy.add_listener(
            lambda revision: DRAWDOWN_LIMIT.set(float(revision.spec.risk.max_drawdown_pct) / 100)
        )

    def tasks(self) -> dict[str, Task]:
        return {
            "portfolio": self._serve(),
            "viewer-feed": feed_viewers(self._context.bus, self.viewers, self._viewer_state),
        }

    async def _start(self, initial_capital: Decimal) -> Start:
        """The ledger from the newest usable checkpoint; while NATS cannot answer (it may have
        just come back), tried again, never a crash: nothing is applied before it."""
        while True:
            try:
                return await start_from_checkpoint(
                    self._context.bus,
                    initial_capital=initial_capital,
                    exchange=paper_exchange_info(),
                )
            except BusUnavailable as exc:
                log.warning("checkpoints not readable yet, trying again: %s", exc)
                await asyncio.sleep(0.5)

    async def _viewer_present(self) -> dict[str, Any]:
        """What a viewer connecting now is told first: latch, portfolio, stops, every worker's
        health (this one's as of now), and the policy this stack runs."""
        report = await self._context.monitor.report()
        # This worker's own report as of now: just started, it may not have heard its own yet.
        own = report.to_message(
            worker_id=self._context.options.worker_id,
            interval_s=REFRESH_INTERVAL_S,
            ts_ms=int(time.time() * 1000),
        )
        self._viewer_state.note(own)
        revision = self._context.policy.current
        policy = None
        if revision is not None:
            mode = revision.spec.mode.value
            policy = {"name": revision.name, "revision": revision.revision, "mode": mode}
        return {
            **self._viewer_state.present(),
            "health": report.model_dump(mode="json"),
            "policy": policy,
        }

    async def _serve(self) -> None:
        policy = await self._context.policy.wait()
        start = await self._start(policy.spec.paper.initial_capital_usd)
        self._fills_through, self._skipped = start.fills_through, start.skipped
        self._start_note, self._fell_back = start.note, start.fell_back
        self._ledger = start.ledger
        self._watch_drawdown(policy.spec)
        self._context.policy.add_listener(lambda revision: self._watch_drawdown(revision.spec))
        bus = self._context.bus
        self._dirty.set()  # the first snapshot tells execution the equity it may use
        await asyncio.gather(
            bus.replay_after(
                subjects.FILLS,
                [
                    Route(
                        subject=subjects.all_of(subjects.FILL_PREFIX),
                        message_type=Fill,
                        handler=self._on_fill,
                    ),
                    Route(
                        subject=subjects.ACCOUNT_ENTRY,
                        message_type=AccountEntry,
                        handler=self._on_entry,
                    ),
                ],
                label="portfolio-fills",
                after_sequence=start.fills_through,
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
            bus.subscribe(
                subjects.VENUE_ACCOUNT, VenueAccount, self._on_venue_account, label="wallet"
            ),
            self._publish_loop(),
            self._checkpoint_loop(),
        )

    def _watch_drawdown(self, spec: TradingPolicySpec) -> None:
        limit = spec.risk.max_drawdown_pct
        if self._drawdown is None or self._drawdown.limit_pct != limit:
            source = f"portfolio/{self._context.options.worker_id}"
            self._drawdown = DrawdownEvaluator(limit, source=source)

    async def _on_fill(self, fill: Fill, sequence: int) -> None:
        ledger = self._ledger
        assert ledger is not None
        booking = Booking(
            noun="fill",
            ident=fill.fill_id,
            symbol=fill.symbol,
            apply=lambda: ledger.apply_fill(fill),
            applied=FILLS_APPLIED,
            refused=FILLS_REFUSED,
        )
        self._book(booking, sequence)

    async def _on_entry(self, entry: AccountEntry, sequence: int) -> None:
        ledger = self._ledger
        assert ledger is not None
        booking = Booking(
            noun="account entry",
            ident=entry.entry_id,
            symbol=entry.symbol,
            apply=lambda: ledger.apply_entry(entry),
            applied=ENTRIES_APPLIED,
            refused=ENTRIES_REFUSED,
        )
        self._book(booking, sequence)

    def _book(self, booking: Booking, sequence: int) -> None:
        if self._stuck is not None:
            return  # nothing after the stuck one: FILLS applies in the stream's order or not at all
        try:
            applied = booking.apply()
        except Exception as exc:  # BookingRefused, or a bug: either way it is not booked
            reason = exc.reason if isinstance(exc, BookingRefused) else repr(exc)
            if sequence not in self._config.skip_fills:
                self._stop_at(booking, sequence, reason)
                return
            log.warning("%s at FILLS sequence %d passed over (--skip-fill): %s",
                        booking, sequence, reason)  # fmt: skip
            FILLS_SKIPPED.inc()
            self._skipped = (*self._skipped, sequence)
            applied = False
        self._fills_through = sequence  # same step as the ledger: a checkpoint sees both or none
        if applied:
            booking.applied.inc()
            self._dirty.set()
        assert self._ledger is not None
        self._raise(self._wallet.reached(self._ledger, sequence))

    async def _on_venue_account(self, read: VenueAccount) -> None:
        """A settled read of the venue's account: compared once the ledger is as of its FILLS
        sequence (at once if it is already; never if it is past it or stuck before it)."""
        if self._stuck is None:
            self._raise(self._wallet.offer(read, self._ledger, self._fills_through))

    def _raise(self, alert: RiskAlert | None) -> None:
        if alert is not None:
            self._pending_alerts.append(alert)
            self._dirty.set()  # the publish loop sends it

    def _stop_at(self, booking: Booking, sequence: int, reason: str) -> None:
        self._stuck = StuckAt(what=str(booking), sequence=sequence, reason=reason)
        booking.refused.inc()
        LEDGER_STUCK.set(1)
        log.error("portfolio %s", self._stuck)
        source = f"portfolio/{self._context.options.worker_id}"
        self._pending_alerts.append(
            RiskAlert(
                alert_id=f"ledger:{source}:{sequence}:{booking.ident}"[:128],
                alert_kind=RiskAlertKind.LEDGER,
                source=source,
                symbol=booking.symbol,
                value=Decimal(sequence),
                threshold=Decimal(0),
                detail=str(self._stuck)[:1024],
                ts_ms=int(time.time() * 1000),
            )
        )
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
        snapshot = ledger.snapshot(
            sequence=self._sequence,
            ts_ms=int(time.time() * 1000),
            fills_through=self._fills_through,
        )
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
        if self._drawdown is not None:
            alert = self._drawdown.on_snapshot(snapshot)
            if alert is not None:
                self._pending_alerts.append(alert)
        while self._pending_alerts:
            alert = self._pending_alerts[0]
            subject = subjects.risk_alert_subject(alert.alert_kind.value)
            try:
                await self._context.bus.publish(subject, alert)
            except BusUnavailable as exc:
                log.warning("risk alert %s not published yet: %s", alert.alert_id, exc)
                self._dirty.set()  # an episode's one alert must not be lost: the next round
                return
            self._pending_alerts.pop(0)
            RISK_ALERTS.labels(alert.alert_kind.value).inc()
            log.warning("risk alert %s: %s", alert.alert_id, alert.detail)

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.checkpoint_interval_s)
            await self._write_checkpoint()

    async def _write_checkpoint(self) -> None:
        ledger = self._ledger
        assert ledger is not None
        if self._fills_through == self._checkpointed:
            return  # nothing new to cover
        covered = self._fills_through
        try:
            checkpoint = ledger.checkpoint(
                fills_through=covered,
                ts_ms=int(time.time() * 1000),
                source=f"portfolio/{self._context.options.worker_id}",
                skipped=self._skipped,
            )
            await self._context.bus.publish(subjects.PORTFOLIO_CHECKPOINT, checkpoint)
        except (BusUnavailable, ValidationError) as exc:
            # ValidationError: a figure beyond the wire's bounds; the next round tries again.
            self._checkpoint_error = f"checkpoint through FILLS sequence {covered}: {exc!r}"
            log.warning("portfolio %s", self._checkpoint_error)
            return
        self._checkpointed = covered
        self._checkpoint_error = ""
        self._fell_back = False  # a checkpoint of its own: the next start needs no fallback
        CHECKPOINTS_WRITTEN.inc()

    async def check(self) -> DependencyHealth:
        ledger = self._ledger
        if ledger is None:
            return _ledger_health(Status.DEGRADED, "waiting for policy")
        if self._stuck is not None:
            return _ledger_health(Status.CRITICAL, str(self._stuck))
        problems = [p for p in (self._last_publish_error, self._checkpoint_error) if p]
        if ledger.unvalued_fees:
            unvalued = ", ".join(f"{a} {v}" for a, v in ledger.unvalued_fees.items())
            problems.append(f"equity incomplete: fees of unknown USDT value ({unvalued})")
        if ledger.unvalued_income:
            unvalued = ", ".join(f"{a} {v}" for a, v in ledger.unvalued_income.items())
            problems.append(f"equity incomplete: income of unknown USDT value ({unvalued})")
        if self._fell_back:
            problems.append("a newer checkpoint could not be used (no checkpoint of its own yet)")
        started = f"start: {self._start_note}"
        if problems:
            return _ledger_health(Status.DEGRADED, "; ".join([*problems, started]))
        return _ledger_health(
            Status.OK,
            f"{ledger.fills_applied} fills and {ledger.entries_applied} account entries through "
            f"FILLS sequence {self._fills_through}, equity {ledger.equity:.2f}; {started}",
        )

    async def check_wallet(self) -> DependencyHealth:
        """DEGRADED while the venue's wallet differs from the ledger's beyond the grace."""
        return self._wallet.health()


def _ledger_health(status: Status, detail: str) -> DependencyHealth:
    return DependencyHealth(name="ledger", status=status, detail=detail)


def _export(ledger: Ledger) -> None:
    EQUITY.set(float(ledger.equity))
    REALIZED.set(float(ledger.realized_pnl))
    UNREALIZED.set(float(ledger.unrealized_pnl))
    FEES.set(float(ledger.fees))
    FUNDING.set(float(ledger.funding))
    TRANSFERS.set(float(ledger.transfers))
    OTHER_INCOME.set(float(ledger.other_income))
    for asset, amount in ledger.fees_by_asset.items():
        FEES_BY_ASSET.labels(asset).set(float(amount))
    DRAWDOWN.set(float(ledger.drawdown_pct) / 100)
    MAX_DRAWDOWN.set(float(ledger.max_drawdown_pct) / 100)
    OPEN_POSITIONS.set(ledger.open_positions)
    UNVALUED_FEES.set(len(ledger.unvalued_fees))
    UNVALUED_INCOME.set(len(ledger.unvalued_income))
