"""The automatic trip evaluators: pure, synchronous checks that turn events into risk alerts.

Each evaluator is fed one kind of event (portfolio snapshots, candles, order updates) and returns
a ``RiskAlert`` when its trigger fires; the operator turns the alert into an EmergencyStop trip
(``trip_for_alert``). No I/O and no clock of their own: time is the events' own timestamps, or
``now_ms`` where only a clock can tell (staleness), so a replay gives the same alerts.

Episodes: an evaluator alerts once when its condition becomes true and stays quiet while it holds;
it re-arms when the condition is seen false again. The ``alert_id`` names the episode by its kind,
its symbol and the event time at which it started, so evaluating the same events again (a restart
replaying the stream) gives the same id and JetStream drops the repeat.

Prices and percentages are ``Decimal`` and every comparison is exact (products, never rounded
quotients); only the figures shown in an alert are rounded.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal, localcontext

from qtrader.contracts.messages import (
    Candle,
    OrderStatus,
    OrderUpdate,
    PortfolioSnapshot,
    RiskAlert,
    RiskAlertKind,
)
from qtrader.money import EXACT as _EXACT

DEFAULT_SOURCE = "risk-evaluator"

_HUNDRED = Decimal(100)
_SHOWN = Decimal("1e-4")  # the precision of the figures an alert shows
_DETAIL_MAX = 1024  # RiskAlert.detail's bound


def _check_percent(name: str, value: Decimal) -> Decimal:
    if not isinstance(value, Decimal) or not value.is_finite():
        raise ValueError(f"{name} must be a finite Decimal, got {value!r}")
    if not Decimal(0) < value <= _HUNDRED:
        raise ValueError(f"{name} must be greater than 0 and at most 100, got {value}")
    return value


def _check_positive_int(name: str, value: int, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _shown(value: Decimal) -> Decimal:
    with localcontext(_EXACT):
        return value.quantize(_SHOWN)


def _alert(
    kind: RiskAlertKind,
    *,
    episode: str,
    source: str,
    symbol: str | None,
    value: Decimal,
    threshold: Decimal,
    detail: str,
    ts_ms: int,
) -> RiskAlert:
    return RiskAlert(
        alert_id=f"{kind.value}:{symbol or 'all'}:{episode}",
        alert_kind=kind,
        source=source,
        symbol=symbol,
        value=value,
        threshold=threshold,
        detail=detail[:_DETAIL_MAX],
        ts_ms=ts_ms,
    )


# --- drawdown ---------------------------------------------------------------------------------


class DrawdownEvaluator:
    """Alerts when the portfolio's drawdown from its equity peak reaches ``limit_pct`` percent.

    The figure is the snapshot's ``drawdown_pct``: the ledger computes it exactly from the
    unrounded peak and equity (``peak_equity`` and ``equity`` in the snapshot are rounded for
    display) and rounds only the result, so it is the best figure the snapshot carries. A
    snapshot older than the last one (by ``ts_ms``, then ``sequence``: the sequence restarts
    with the portfolio service) is ignored, so a late redelivery cannot re-arm an episode.
    """

    def __init__(self, limit_pct: Decimal, *, source: str = DEFAULT_SOURCE) -> None:
        self.limit_pct = _check_percent("limit_pct", limit_pct)
        self.source = source
        self._last: tuple[int, int] | None = None
        self._episode_start_ms: int | None = None

    @property
    def in_episode(self) -> bool:
        return self._episode_start_ms is not None

    def on_snapshot(self, snapshot: PortfolioSnapshot) -> RiskAlert | None:
        order = (snapshot.ts_ms, snapshot.sequence)
        if self._last is not None and order <= self._last:
            return None
        self._last = order
        if snapshot.drawdown_pct < self.limit_pct:
            self._episode_start_ms = None  # recovered: the next breach is a new episode
            return None
        if self._episode_start_ms is not None:
            return None
        self._episode_start_ms = snapshot.ts_ms
        return _alert(
            RiskAlertKind.DRAWDOWN,
            episode=f"{snapshot.ts_ms}:{snapshot.sequence}",
            source=self.source,
            symbol=None,
            value=snapshot.drawdown_pct,
            threshold=self.limit_pct,
            detail=(
                f"drawdown {snapshot.drawdown_pct}% from peak equity {snapshot.peak_equity} "
                f"to {snapshot.equity} reached the {self.limit_pct}% limit "
                f"(snapshot {snapshot.sequence})"
            ),
            ts_ms=snapshot.ts_ms,
        )


# --- flash crash ------------------------------------------------------------------------------


@dataclass
class _PriceWindow:
    """One symbol's closes inside the window, as two monotonic deques of (close_time, price):
    ``highs`` decreasing (front is the window's max), ``lows`` increasing (front is its min).
    Each holds at most the window's candle count, whatever the stream's length."""

    highs: deque[tuple[int, Decimal]] = field(default_factory=deque)
    lows: deque[tuple[int, Decimal]] = field(default_factory=deque)
    last_ms: int = -1
    episode_start_ms: int | None = None

    def evict_before(self, start_ms: int) -> None:
        for side in (self.highs, self.lows):
            while side and side[0][0] < start_ms:
                side.popleft()

    def push(self, at_ms: int, price: Decimal) -> None:
        while self.highs and self.highs[-1][1] <= price:
            self.highs.pop()
        self.highs.append((at_ms, price))
        while self.lows and self.lows[-1][1] >= price:
            self.lows.pop()
        self.lows.append((at_ms, price))


@dataclass(frozen=True)
class _Move:
    pct: Decimal  # exact
    direction: str  # "drop" or "spike"
    reference: Decimal  # the window's high (drop) or low (spike)
    reference_ms: int


class FlashCrashEvaluator:
    """Alerts when a symbol's close moves by ``move_pct`` percent or more within ``window_ms``.

    The move is measured from an earlier close in the window to the new one, relative to the
    earlier: a drop from the window's highest close, or a spike from its lowest. "Within the
    window" means close times at most ``window_ms`` apart. Closes of closed candles only: a wick
    that recovers inside one candle is not seen, so the candle interval should be well below the
    window (1 s candles for a 60 s window).

    Per symbol, candles must come in close-time order: a candle whose close time is not after
    the last accepted one (a duplicate or a late redelivery) is ignored. That keeps the window a
    pair of monotonic deques (bounded by the window's candle count) and the verdicts a function
    of the accepted sequence.
    """

    def __init__(self, move_pct: Decimal, window_ms: int, *, source: str = DEFAULT_SOURCE) -> None:
        self.move_pct = _check_percent("move_pct", move_pct)
        self.window_ms = _check_positive_int("window_ms", window_ms)
        self.source = source
        self._windows: dict[str, _PriceWindow] = {}

    def window_size(self, symbol: str) -> int:
        """How many closes are kept for ``symbol`` (the larger of the two deques)."""
        window = self._windows.get(symbol)
        return 0 if window is None else max(len(window.highs), len(window.lows))

    def on_candle(self, candle: Candle) -> RiskAlert | None:
        window = self._windows.setdefault(candle.symbol, _PriceWindow())
        at_ms = candle.close_time_ms
        if at_ms <= window.last_ms:
            return None
        window.last_ms = at_ms
        window.evict_before(at_ms - self.window_ms)
        move = self._largest_move(window, candle.close)
        window.push(at_ms, candle.close)
        if move is None:
            window.episode_start_ms = None
            return None
        if window.episode_start_ms is not None:
            return None
        window.episode_start_ms = at_ms
        return self._alert(candle, move)

    def _largest_move(self, window: _PriceWindow, price: Decimal) -> _Move | None:
        """The larger of the drop and the spike to ``price``, if it reaches the threshold."""
        best: _Move | None = None
        with localcontext(_EXACT):
            if window.highs:
                high_ms, high = window.highs[0]
                if (high - price) * _HUNDRED >= self.move_pct * high:
                    best = _Move((high - price) * _HUNDRED / high, "drop", high, high_ms)
            if window.lows:
                low_ms, low = window.lows[0]
                if (price - low) * _HUNDRED >= self.move_pct * low:
                    spike = _Move((price - low) * _HUNDRED / low, "spike", low, low_ms)
                    if best is None or spike.pct > best.pct:
                        best = spike
        return best

    def _alert(self, candle: Candle, move: _Move) -> RiskAlert:
        seconds = Decimal(candle.close_time_ms - move.reference_ms) / 1000
        return _alert(
            RiskAlertKind.FLASH_CRASH,
            episode=str(candle.close_time_ms),
            source=self.source,
            symbol=candle.symbol,
            value=_shown(move.pct),
            threshold=self.move_pct,
            detail=(
                f"{candle.symbol} {move.direction} of {_shown(move.pct)}% in {seconds} s: "
                f"{move.reference} at {move.reference_ms} to {candle.close} at "
                f"{candle.close_time_ms} (threshold {self.move_pct}% within "
                f"{self.window_ms} ms)"
            ),
            ts_ms=candle.close_time_ms,
        )


# --- stale market data ------------------------------------------------------------------------


class StaleDataEvaluator:
    """Alerts per symbol whose last candle arrived more than ``max_age_s`` seconds ago.

    Which symbols are watched: every symbol given at construction (its clock starts at
    ``start_ms``, so a feed that never delivers goes stale too) and every symbol seen once
    since. A symbol is stale when ``now_ms - last_seen_ms > max_age_s * 1000``: exactly
    ``max_age_s`` is still fresh, so a feed that delivers exactly every ``max_age_s`` does not
    flap. One alert per episode; a candle for the symbol ends the episode.

    ``on_candle`` takes the arrival time (``now_ms``), not the candle's own time: staleness is
    about the feed, and a replayed old candle that arrives now proves the feed is alive.
    """

    def __init__(
        self,
        max_age_s: float,
        *,
        symbols: Iterable[str] = (),
        start_ms: int | None = None,
        source: str = DEFAULT_SOURCE,
    ) -> None:
        if isinstance(max_age_s, bool) or not isinstance(max_age_s, int | float):
            raise ValueError(f"max_age_s must be a number of seconds, got {max_age_s!r}")
        if not math.isfinite(max_age_s) or max_age_s <= 0:
            raise ValueError(f"max_age_s must be a finite number above 0, got {max_age_s!r}")
        self.max_age_s = max_age_s
        self.source = source
        self._threshold = Decimal(str(max_age_s))
        self._max_age_ms = self._threshold * 1000  # exact, so the boundary is exact
        self._last_seen: dict[str, int] = {}
        self._alerted: set[str] = set()
        expected = list(symbols)
        if expected:
            if start_ms is None:
                raise ValueError("start_ms is required with symbols: their clocks start then")
            start = _check_positive_int("start_ms", start_ms, minimum=0)
            self._last_seen = dict.fromkeys(expected, start)

    @property
    def watched(self) -> frozenset[str]:
        return frozenset(self._last_seen)

    def on_candle(self, symbol: str, now_ms: int) -> None:
        """Record that a candle for ``symbol`` arrived at ``now_ms``."""
        if now_ms >= self._last_seen.get(symbol, now_ms):
            self._last_seen[symbol] = now_ms
            self._alerted.discard(symbol)

    def stale(self, now_ms: int) -> dict[str, Decimal]:
        """Each watched symbol stale at ``now_ms``, with the seconds since its last candle."""
        return {
            symbol: Decimal(now_ms - last_ms) / 1000
            for symbol, last_ms in sorted(self._last_seen.items())
            if now_ms - last_ms > self._max_age_ms
        }

    def check(self, now_ms: int) -> list[RiskAlert]:
        """An alert for each watched symbol that went stale since the last check (sorted)."""
        alerts = []
        for symbol, last_ms in sorted(self._last_seen.items()):
            if symbol in self._alerted or now_ms - last_ms <= self._max_age_ms:
                continue
            self._alerted.add(symbol)
            age_s = Decimal(now_ms - last_ms) / 1000
            alerts.append(
                _alert(
                    RiskAlertKind.STALE_MARKET_DATA,
                    episode=str(last_ms),
                    source=self.source,
                    symbol=symbol,
                    value=age_s,
                    threshold=self._threshold,
                    detail=(
                        f"no {symbol} candle for {age_s} s (last at {last_ms}, "
                        f"now {now_ms}; limit {self._threshold} s)"
                    ),
                    ts_ms=now_ms,
                )
            )
        return alerts


# --- execution error rate ---------------------------------------------------------------------


def is_execution_error(update: OrderUpdate) -> bool:
    """Whether a final update counts as an error: the venue rejected the order, or an exchange
    error ended it. Refusals by the halt gate or the exposure book are not errors: no venue saw
    them, and a risk check doing its job must not trip the stop."""
    if update.refused_before_venue:
        return False
    return update.status is OrderStatus.REJECTED or update.error_kind is not None


class ErrorRateEvaluator:
    """Alerts when more than ``max_rate`` of the orders that ended within ``window_ms`` ended
    in an error, once at least ``min_orders`` orders ended in the window.

    Only final updates count (FILLED, CANCELED, REJECTED, EXPIRED), each order once (by client
    order id: a redelivered final update is ignored), and refusals before any venue (the halt
    gate's, the exposure book's) not at all. UNKNOWN is not final: the order is still being
    resolved. The window ends at the latest final update's time, so no clock is needed; an
    update older than the window is ignored.
    Memory is bounded by the orders that ended within the window.
    """

    def __init__(
        self,
        max_rate: float,
        window_ms: int,
        min_orders: int,
        *,
        source: str = DEFAULT_SOURCE,
    ) -> None:
        if isinstance(max_rate, bool) or not isinstance(max_rate, int | float):
            raise ValueError(f"max_rate must be a number, got {max_rate!r}")
        if not math.isfinite(max_rate) or not 0 < max_rate <= 1:
            raise ValueError(f"max_rate must be above 0 and at most 1, got {max_rate!r}")
        self.max_rate = max_rate
        self.window_ms = _check_positive_int("window_ms", window_ms)
        self.min_orders = _check_positive_int("min_orders", min_orders)
        self.source = source
        self._threshold = Decimal(str(max_rate))
        self._finals: dict[str, bool] = {}  # client order id -> ended in error
        self._by_time: list[tuple[int, str]] = []  # heap of (ts, client order id)
        self._errors = 0
        self._latest_ms = -1
        self._episode_start_ms: int | None = None

    @property
    def counts(self) -> tuple[int, int]:
        """(errors, final orders) in the window."""
        return self._errors, len(self._finals)

    def on_update(self, update: OrderUpdate) -> RiskAlert | None:
        if not update.status.is_final or update.refused_before_venue:
            return None
        if update.client_order_id in self._finals:
            return None
        if update.ts_ms < self._latest_ms - self.window_ms:
            return None  # ended before the window: late, and long since counted or evicted
        error = is_execution_error(update)
        self._finals[update.client_order_id] = error
        self._errors += error
        heapq.heappush(self._by_time, (update.ts_ms, update.client_order_id))
        self._latest_ms = max(self._latest_ms, update.ts_ms)
        self._evict(self._latest_ms - self.window_ms)
        return self._verdict(update)

    def _evict(self, start_ms: int) -> None:
        while self._by_time and self._by_time[0][0] < start_ms:
            _, client_order_id = heapq.heappop(self._by_time)
            self._errors -= self._finals.pop(client_order_id)

    def _verdict(self, update: OrderUpdate) -> RiskAlert | None:
        errors, finals = self.counts
        # errors / finals > max_rate, compared exactly.
        breached = finals >= self.min_orders and errors > self._threshold * finals
        if not breached:
            self._episode_start_ms = None
            return None
        if self._episode_start_ms is not None:
            return None
        self._episode_start_ms = self._latest_ms
        with localcontext(_EXACT):
            rate = Decimal(errors) / Decimal(finals)
        return _alert(
            RiskAlertKind.EXECUTION_ERROR_RATE,
            episode=f"{self._latest_ms}:{update.client_order_id}",
            source=self.source,
            symbol=None,
            value=_shown(rate),
            threshold=self._threshold,
            detail=(
                f"{errors} of {finals} orders ended in an error within {self.window_ms} ms "
                f"(rate {_shown(rate)} above {self._threshold}); latest "
                f"{update.client_order_id} {update.status.value}: {update.reason or ''}"
            ),
            ts_ms=self._latest_ms,
        )
