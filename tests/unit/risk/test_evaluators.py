"""The trip evaluators: hand-checked examples, and properties against brute-force references.

The references share no code with the evaluators: the flash crash one scans every pair of
closes in the window (O(n²)), the error-rate one recounts the window from scratch with
``fractions.Fraction`` at every update.
"""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
from itertools import count

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qtrader.contracts.messages import (
    Candle,
    ErrorKind,
    Fill,
    OrderStatus,
    OrderUpdate,
    PortfolioSnapshot,
    RefusedBy,
    RiskAlert,
    RiskAlertKind,
    Side,
)
from qtrader.instruments import paper_exchange_info
from qtrader.portfolio.ledger import Ledger
from qtrader.risk import (
    DrawdownEvaluator,
    ErrorRateEvaluator,
    FlashCrashEvaluator,
    StaleDataEvaluator,
    is_execution_error,
)
from qtrader_tools.candles import flat_candle

SECOND = 1000


def candle(at_s: float, close: str | Decimal, *, symbol: str = "BTCUSDT") -> Candle:
    """A 1 s candle that opens at ``at_s`` seconds (so it closes 999 ms later)."""
    return flat_candle(symbol, close, open_time_ms=int(at_s * SECOND), interval="1s")


def snapshot(drawdown: str, *, ts_ms: int, sequence: int = 1) -> PortfolioSnapshot:
    peak = Decimal(10_000)
    dd = Decimal(drawdown)
    equity = peak * (1 - dd / 100)
    return PortfolioSnapshot(
        sequence=sequence,
        ts_ms=ts_ms,
        fills_applied=0,
        initial_capital=peak,
        realized_pnl=Decimal(0),
        unrealized_pnl=equity - peak,
        fees=Decimal(0),
        equity=equity,
        peak_equity=peak,
        drawdown_pct=dd,
        max_drawdown_pct=dd,
        positions=(),
    )


_ids = count(1)


def update(
    status: OrderStatus,
    *,
    ts_ms: int,
    refused_by: RefusedBy | None = None,
    error_kind: ErrorKind | None = None,
    reason: str | None = None,
    client_order_id: str | None = None,
) -> OrderUpdate:
    n = next(_ids)
    return OrderUpdate(
        client_order_id=client_order_id or f"c-{n}",
        intent_id=f"i-{n}",
        symbol="BTCUSDT",
        side=Side.BUY,
        status=status,
        quantity=Decimal("0.010"),
        filled_quantity=Decimal("0.010") if status is OrderStatus.FILLED else Decimal(0),
        avg_price=Decimal(60_000) if status is OrderStatus.FILLED else Decimal(0),
        exchange="paper",
        refused_by=refused_by,
        error_kind=error_kind,
        reason=reason,
        ts_ms=ts_ms,
    )


def feed(evaluator: FlashCrashEvaluator, candles: list[Candle]) -> list[RiskAlert]:
    return [a for c in candles if (a := evaluator.on_candle(c)) is not None]


def linear(start_s: int, seconds: int, start: Decimal, end: Decimal) -> list[Candle]:
    """One candle a second from ``start`` to ``end`` in ``seconds`` equal steps."""
    step = (end - start) / seconds
    return [candle(start_s + i, start + step * i) for i in range(seconds + 1)]


# --- drawdown ---------------------------------------------------------------------------------


def test_drawdown_when_limit_reached_then_one_alert_with_figures() -> None:
    evaluator = DrawdownEvaluator(Decimal(3))
    assert evaluator.on_snapshot(snapshot("2.999999", ts_ms=1_000, sequence=1)) is None
    alert = evaluator.on_snapshot(snapshot("3", ts_ms=2_000, sequence=2))
    assert alert is not None
    assert alert.alert_kind is RiskAlertKind.DRAWDOWN
    assert (alert.value, alert.threshold) == (Decimal(3), Decimal(3))
    assert alert.symbol is None
    assert alert.ts_ms == 2_000
    assert "peak equity 10000" in alert.detail
    assert "9700" in alert.detail
    assert alert.alert_id == "drawdown:all:2000:2"


def test_drawdown_when_breach_persists_then_no_second_alert_until_recovery() -> None:
    evaluator = DrawdownEvaluator(Decimal(3))
    verdicts = [
        evaluator.on_snapshot(snapshot(dd, ts_ms=i * 1_000, sequence=i))
        for i, dd in enumerate(["4", "5", "3.5", "2.9", "3.1"], start=1)
    ]
    alerted = [v is not None for v in verdicts]
    assert alerted == [True, False, False, False, True]
    first, second = verdicts[0], verdicts[4]
    assert first is not None
    assert second is not None
    assert first.alert_id != second.alert_id


def test_drawdown_when_same_stream_replayed_then_same_alert_ids() -> None:
    stream = [snapshot(dd, ts_ms=i, sequence=i) for i, dd in enumerate(["1", "4", "0", "6"], 1)]
    ids = []
    for _ in range(2):
        evaluator = DrawdownEvaluator(Decimal(3))
        ids.append([a.alert_id for s in stream if (a := evaluator.on_snapshot(s)) is not None])
    assert ids[0] == ids[1]
    assert len(ids[0]) == 2


def test_drawdown_when_late_snapshot_redelivered_then_ignored() -> None:
    evaluator = DrawdownEvaluator(Decimal(3))
    assert evaluator.on_snapshot(snapshot("4", ts_ms=2_000, sequence=2)) is not None
    # An older snapshot (before the breach) must not re-arm the episode.
    assert evaluator.on_snapshot(snapshot("0", ts_ms=1_000, sequence=1)) is None
    assert evaluator.on_snapshot(snapshot("4", ts_ms=3_000, sequence=3)) is None
    assert evaluator.in_episode


def test_drawdown_from_a_real_ledger_when_mark_falls_then_alert() -> None:
    ledger = Ledger(initial_capital=Decimal(10_000), exchange=paper_exchange_info())
    fill = Fill(
        fill_id="f-1",
        client_order_id="c-1",
        symbol="BTCUSDT",
        side=Side.BUY,
        quantity=Decimal("1.000"),
        price=Decimal("60000.0"),
        fee=Decimal(0),
        ts_ms=1,
    )
    assert ledger.apply_fill(fill)
    evaluator = DrawdownEvaluator(Decimal(3))
    ledger.mark("BTCUSDT", Decimal("60100.0"))  # peak 10,100
    assert evaluator.on_snapshot(ledger.snapshot(sequence=1, ts_ms=10)) is None
    ledger.mark("BTCUSDT", Decimal("59800.0"))  # 9,800: 2.97% below the peak
    assert evaluator.on_snapshot(ledger.snapshot(sequence=2, ts_ms=20)) is None
    ledger.mark("BTCUSDT", Decimal("59700.0"))  # 9,700: 3.96% below the peak
    alert = evaluator.on_snapshot(ledger.snapshot(sequence=3, ts_ms=30))
    assert alert is not None
    assert alert.value == ledger.snapshot(sequence=3, ts_ms=30).drawdown_pct
    assert alert.value > Decimal("3.96")


@pytest.mark.parametrize("limit", [Decimal(0), Decimal(-1), Decimal(101), Decimal("NaN")])
def test_drawdown_when_limit_out_of_range_then_clear_error(limit: Decimal) -> None:
    with pytest.raises(ValueError, match="limit_pct"):
        DrawdownEvaluator(limit)


@given(st.lists(st.integers(min_value=0, max_value=60), max_size=40))
def test_drawdown_alerts_exactly_on_each_breach_after_a_recovery(tenths: list[int]) -> None:
    evaluator = DrawdownEvaluator(Decimal(3))
    drawdowns = [Decimal(t) / 10 for t in tenths]
    alerted = [
        evaluator.on_snapshot(snapshot(str(dd), ts_ms=i, sequence=i)) is not None
        for i, dd in enumerate(drawdowns)
    ]
    breached = [dd >= 3 for dd in drawdowns]
    assert alerted == [b and (i == 0 or not breached[i - 1]) for i, b in enumerate(breached)]


# --- flash crash ------------------------------------------------------------------------------


def test_flash_crash_when_15pct_drop_within_60s_then_alert() -> None:
    evaluator = FlashCrashEvaluator(Decimal(10), 60 * SECOND)
    steady = [candle(i, "60000") for i in range(30)]
    crash = linear(30, 60, Decimal(60_000), Decimal(51_000))  # -15% over 60 s
    alerts = feed(evaluator, steady + crash)
    assert len(alerts) == 1
    (alert,) = alerts
    assert alert.alert_kind is RiskAlertKind.FLASH_CRASH
    assert alert.symbol == "BTCUSDT"
    assert alert.threshold == Decimal(10)
    assert alert.value >= Decimal(10)
    assert "drop" in alert.detail
    assert "60000" in alert.detail
    assert alert.alert_id == f"flash_crash:BTCUSDT:{alert.ts_ms}"


def test_flash_crash_when_9pct_drop_then_no_alert() -> None:
    evaluator = FlashCrashEvaluator(Decimal(10), 60 * SECOND)
    assert feed(evaluator, linear(0, 30, Decimal(60_000), Decimal(54_600))) == []


def test_flash_crash_when_exactly_the_threshold_then_alert() -> None:
    evaluator = FlashCrashEvaluator(Decimal(10), 60 * SECOND)
    alerts = feed(evaluator, [candle(0, "100"), candle(60, "90")])  # 60 s apart: inside
    assert [a.value for a in alerts] == [Decimal("10.0000")]


def test_flash_crash_when_slow_20pct_drift_over_10_minutes_then_no_alert() -> None:
    evaluator = FlashCrashEvaluator(Decimal(10), 60 * SECOND)
    assert feed(evaluator, linear(0, 600, Decimal(60_000), Decimal(48_000))) == []
    assert evaluator.window_size("BTCUSDT") <= 61


def test_flash_crash_when_spike_beyond_threshold_then_alert() -> None:
    evaluator = FlashCrashEvaluator(Decimal(10), 60 * SECOND)
    alerts = feed(evaluator, [candle(0, "100"), candle(5, "111")])
    assert len(alerts) == 1
    assert "spike" in alerts[0].detail


def test_flash_crash_when_crash_persists_then_one_alert_then_rearms() -> None:
    evaluator = FlashCrashEvaluator(Decimal(10), 10 * SECOND)
    first = [candle(0, "100"), candle(1, "80")] + [candle(t, "80") for t in range(2, 20)]
    # A slow recovery (under 10% in any 10 s) after the old high left, then a new crash.
    recovery = [candle(t, Decimal(80) + Decimal(t - 20) / 2) for t in range(20, 61)]
    second = [candle(61, "85")]
    alerts = feed(evaluator, first + recovery + second)
    assert [a.ts_ms for a in alerts] == [1 * SECOND + 999, 61 * SECOND + 999]
    assert all("drop" in a.detail for a in alerts)
    assert len({a.alert_id for a in alerts}) == 2


def test_flash_crash_symbols_are_independent() -> None:
    evaluator = FlashCrashEvaluator(Decimal(10), 60 * SECOND)
    candles = [
        candle(0, "100", symbol="BTCUSDT"),
        candle(0, "50", symbol="ETHUSDT"),
        candle(1, "99", symbol="BTCUSDT"),
        candle(1, "40", symbol="ETHUSDT"),
    ]
    assert [a.symbol for a in feed(evaluator, candles)] == ["ETHUSDT"]


def test_flash_crash_when_duplicate_or_late_candle_then_ignored() -> None:
    evaluator = FlashCrashEvaluator(Decimal(10), 60 * SECOND)
    assert evaluator.on_candle(candle(10, "100")) is None
    assert evaluator.on_candle(candle(10, "50")) is None  # same close time: a duplicate
    assert evaluator.on_candle(candle(5, "50")) is None  # late
    assert evaluator.window_size("BTCUSDT") == 1
    assert evaluator.on_candle(candle(11, "99")) is None


@pytest.mark.parametrize(
    ("move", "window"), [(Decimal(0), 1), (Decimal(101), 1), (Decimal(10), 0), (Decimal(10), -5)]
)
def test_flash_crash_when_bad_settings_then_clear_error(move: Decimal, window: int) -> None:
    with pytest.raises(ValueError, match=r"move_pct|window_ms"):
        FlashCrashEvaluator(move, window)


def _reference_flash_crash(
    points: list[tuple[int, int]], move_pct: Decimal, window_ms: int
) -> tuple[list[bool], list[int]]:
    """Per input candle: alerted or not, and the candles inside the window (O(n²) scan)."""
    accepted: list[tuple[int, Fraction]] = []
    alerts: list[bool] = []
    in_window: list[int] = []
    previous = False
    threshold = Fraction(move_pct)
    for at_ms, cents in points:
        if accepted and at_ms <= accepted[-1][0]:
            alerts.append(False)
            in_window.append(-1)
            continue
        price = Fraction(cents, 100)
        earlier = [p for t, p in accepted if at_ms - t <= window_ms]
        condition = any(abs(price - p) * 100 >= threshold * p for p in earlier)
        alerts.append(condition and not previous)
        previous = condition
        accepted.append((at_ms, price))
        in_window.append(len(earlier) + 1)
    return alerts, in_window


@settings(max_examples=300)
@given(
    steps=st.lists(
        # (seconds since the previous candle: 0 is a duplicate, below 0 a late one; price)
        st.tuples(st.integers(-2, 12), st.integers(9_000, 11_000)),
        min_size=1,
        max_size=80,
    ),
    move_pct=st.sampled_from([Decimal(1), Decimal("2.5"), Decimal(5), Decimal(10)]),
    window_s=st.integers(1, 60),
)
def test_flash_crash_alerts_iff_brute_force_scan_finds_a_move(
    steps: list[tuple[int, int]], move_pct: Decimal, window_s: int
) -> None:
    points = []
    at_s = 1_000
    for gap, cents in steps:
        at_s += gap
        points.append((at_s * SECOND, cents))
    window_ms = window_s * SECOND
    expected, in_window = _reference_flash_crash(points, move_pct, window_ms)
    evaluator = FlashCrashEvaluator(move_pct, window_ms)
    for (at_ms, cents), should_alert, kept in zip(points, expected, in_window, strict=True):
        alert = evaluator.on_candle(candle(at_ms / SECOND, Decimal(cents) / 100))
        assert (alert is not None) == should_alert, (at_ms, cents)
        if kept >= 0:  # accepted: memory bounded by the window's candle count
            assert evaluator.window_size("BTCUSDT") <= kept


# --- stale market data ------------------------------------------------------------------------


def test_stale_when_no_candle_for_max_age_then_alert_not_before() -> None:
    evaluator = StaleDataEvaluator(5.0)
    evaluator.on_candle("BTCUSDT", 1_000)
    assert evaluator.check(3_000) == []
    assert evaluator.check(6_000) == []  # exactly 5 s old: still fresh
    (alert,) = evaluator.check(6_001)
    assert alert.alert_kind is RiskAlertKind.STALE_MARKET_DATA
    assert alert.symbol == "BTCUSDT"
    assert (alert.value, alert.threshold) == (Decimal("5.001"), Decimal("5.0"))
    assert alert.alert_id == "stale_market_data:BTCUSDT:1000"
    assert alert.ts_ms == 6_001


def test_stale_once_per_episode_and_rearmed_by_a_candle() -> None:
    evaluator = StaleDataEvaluator(2)
    evaluator.on_candle("BTCUSDT", 0)
    assert len(evaluator.check(2_500)) == 1
    assert evaluator.check(10_000) == []
    evaluator.on_candle("BTCUSDT", 11_000)
    assert evaluator.check(12_000) == []
    (again,) = evaluator.check(13_001)
    assert again.alert_id == "stale_market_data:BTCUSDT:11000"


def test_stale_watches_seen_symbols_separately() -> None:
    evaluator = StaleDataEvaluator(1)
    evaluator.on_candle("BTCUSDT", 0)
    evaluator.on_candle("ETHUSDT", 0)
    evaluator.on_candle("ETHUSDT", 1_500)
    assert [a.symbol for a in evaluator.check(2_000)] == ["BTCUSDT"]
    assert evaluator.check(1_000) == []  # an earlier "now" does not undo anything


def test_stale_when_expected_symbol_never_delivers_then_alert_from_start() -> None:
    evaluator = StaleDataEvaluator(3, symbols=["BTCUSDT"], start_ms=10_000)
    assert evaluator.watched == {"BTCUSDT"}
    assert evaluator.check(13_000) == []
    (alert,) = evaluator.check(13_001)
    assert alert.symbol == "BTCUSDT"
    assert evaluator.check(1_000_000) == []  # unseen symbols are not watched


def test_stale_when_late_arrival_time_then_last_seen_kept() -> None:
    evaluator = StaleDataEvaluator(1)
    evaluator.on_candle("BTCUSDT", 5_000)
    evaluator.on_candle("BTCUSDT", 1_000)  # an out-of-order call cannot age the feed
    assert evaluator.check(6_000) == []


@pytest.mark.parametrize("age", [0, -1, float("nan"), float("inf"), True])
def test_stale_when_bad_max_age_then_clear_error(age: float) -> None:
    with pytest.raises(ValueError, match="max_age_s"):
        StaleDataEvaluator(age)


def test_stale_when_symbols_without_start_then_clear_error() -> None:
    with pytest.raises(ValueError, match="start_ms"):
        StaleDataEvaluator(1, symbols=["BTCUSDT"])


# --- execution error rate ---------------------------------------------------------------------


def test_error_rate_when_enough_orders_fail_then_alert() -> None:
    evaluator = ErrorRateEvaluator(0.5, 60 * SECOND, 4)
    verdicts = [
        evaluator.on_update(update(OrderStatus.FILLED, ts_ms=1_000)),
        evaluator.on_update(update(OrderStatus.REJECTED, ts_ms=2_000, reason="Rejected: x")),
        evaluator.on_update(update(OrderStatus.REJECTED, ts_ms=3_000, reason="Rejected: y")),
        evaluator.on_update(update(OrderStatus.REJECTED, ts_ms=4_000, reason="Transient: z")),
    ]
    assert verdicts[:3] == [None, None, None]  # 2 of 3 errors, but fewer than 4 orders
    alert = verdicts[3]
    assert alert is not None
    assert alert.alert_kind is RiskAlertKind.EXECUTION_ERROR_RATE
    assert (alert.value, alert.threshold) == (Decimal("0.7500"), Decimal("0.5"))
    assert "3 of 4 orders" in alert.detail
    assert alert.ts_ms == 4_000


def test_error_rate_when_too_few_orders_then_no_alert() -> None:
    evaluator = ErrorRateEvaluator(0.1, 60 * SECOND, 5)
    for i in range(4):
        assert evaluator.on_update(update(OrderStatus.REJECTED, ts_ms=i)) is None
    assert evaluator.counts == (4, 4)


def test_error_rate_at_exactly_max_rate_then_no_alert() -> None:
    evaluator = ErrorRateEvaluator(0.5, 60 * SECOND, 2)
    assert evaluator.on_update(update(OrderStatus.FILLED, ts_ms=1)) is None
    assert evaluator.on_update(update(OrderStatus.REJECTED, ts_ms=2)) is None  # 1/2 = 0.5


def test_error_rate_ignores_gate_refusals_non_finals_and_repeats() -> None:
    evaluator = ErrorRateEvaluator(0.5, 60 * SECOND, 2)
    gated = update(
        OrderStatus.REJECTED, ts_ms=1, refused_by=RefusedBy.HALT_GATE, reason="trading is HALTED"
    )
    assert evaluator.on_update(gated) is None
    assert evaluator.on_update(update(OrderStatus.UNKNOWN, ts_ms=2)) is None
    assert evaluator.on_update(update(OrderStatus.PENDING_NEW, ts_ms=2)) is None
    rejected = update(OrderStatus.REJECTED, ts_ms=3, client_order_id="c-same")
    assert evaluator.on_update(rejected) is None
    assert evaluator.on_update(rejected) is None  # redelivered: counted once
    assert evaluator.counts == (1, 1)


def test_error_rate_ignores_exposure_book_refusals() -> None:
    """The book refuses before the venue sees the order (nothing to reduce while other sells are
    in flight, a limit): our own risk check, not an execution error. Counting them tripped the
    stop in a normal paper run (10 of 48 "errors" were book refusals)."""
    evaluator = ErrorRateEvaluator(0.2, 60 * SECOND, 2)
    for i in range(5):
        refused = update(
            OrderStatus.REJECTED,
            ts_ms=i,
            client_order_id=f"c-book-{i}",
            refused_by=RefusedBy.EXPOSURE_BOOK,
            reason="nothing_to_reduce: position 28.752, reduce-only -0.148",
        )
        assert evaluator.on_update(refused) is None
    assert evaluator.counts == (0, 0)


def test_error_rate_counts_canceled_after_exchange_error_but_not_slippage() -> None:
    exchange_error = update(OrderStatus.CANCELED, ts_ms=1, error_kind=ErrorKind.OUTCOME_UNKNOWN)
    banned = update(OrderStatus.CANCELED, ts_ms=1, error_kind=ErrorKind.BANNED)
    bound = update(OrderStatus.CANCELED, ts_ms=1, reason="price left the slippage bound 1")
    exhausted = update(OrderStatus.EXPIRED, ts_ms=1, reason="attempts exhausted")
    filled = update(OrderStatus.FILLED, ts_ms=1)
    assert is_execution_error(exchange_error)
    assert is_execution_error(banned)
    assert not any(is_execution_error(u) for u in (bound, exhausted, filled))


def test_error_rate_window_slides_and_rearms() -> None:
    evaluator = ErrorRateEvaluator(0.5, 10 * SECOND, 2)
    assert evaluator.on_update(update(OrderStatus.REJECTED, ts_ms=0)) is None
    first = evaluator.on_update(update(OrderStatus.REJECTED, ts_ms=1_000))
    assert first is not None
    assert evaluator.on_update(update(OrderStatus.REJECTED, ts_ms=2_000)) is None  # same episode
    # 20 s later the errors have left the window; fills end the episode.
    assert evaluator.on_update(update(OrderStatus.FILLED, ts_ms=20_000)) is None
    assert evaluator.on_update(update(OrderStatus.FILLED, ts_ms=21_000)) is None
    assert evaluator.counts == (0, 2)
    assert evaluator.on_update(update(OrderStatus.REJECTED, ts_ms=22_000)) is None  # 1/3
    second = evaluator.on_update(update(OrderStatus.REJECTED, ts_ms=23_000))  # 2/4: not above
    assert second is None
    third = evaluator.on_update(update(OrderStatus.REJECTED, ts_ms=24_000))  # 3/5
    assert third is not None
    assert third.alert_id != first.alert_id


def test_error_rate_when_update_older_than_window_then_ignored() -> None:
    evaluator = ErrorRateEvaluator(0.5, 10 * SECOND, 1)
    assert evaluator.on_update(update(OrderStatus.FILLED, ts_ms=50_000)) is None
    assert evaluator.on_update(update(OrderStatus.REJECTED, ts_ms=30_000)) is None
    assert evaluator.counts == (0, 1)


@pytest.mark.parametrize(
    ("rate", "window", "minimum"),
    [(0.0, 1, 1), (1.5, 1, 1), (float("nan"), 1, 1), (0.5, 0, 1), (0.5, 1, 0)],
)
def test_error_rate_when_bad_settings_then_clear_error(
    rate: float, window: int, minimum: int
) -> None:
    with pytest.raises(ValueError, match=r"max_rate|window_ms|min_orders"):
        ErrorRateEvaluator(rate, window, minimum)


@settings(max_examples=200)
@given(
    events=st.lists(
        st.tuples(
            st.integers(0, 3_000),  # gap to the previous update, ms
            st.sampled_from(["filled", "rejected", "gate", "unknown"]),
        ),
        max_size=60,
    ),
    max_rate=st.sampled_from([0.1, 0.25, 0.5, 0.75]),
    minimum=st.integers(1, 6),
)
def test_error_rate_alerts_iff_recount_of_window_breaches(
    events: list[tuple[int, str]], max_rate: float, minimum: int
) -> None:
    window_ms = 5 * SECOND
    evaluator = ErrorRateEvaluator(max_rate, window_ms, minimum)
    counted: list[tuple[int, bool]] = []
    previous = False
    now = 0
    for gap, what in events:
        now += gap
        status = {"filled": OrderStatus.FILLED, "unknown": OrderStatus.UNKNOWN}.get(
            what, OrderStatus.REJECTED
        )
        refused_by = RefusedBy.HALT_GATE if what == "gate" else None
        alert = evaluator.on_update(update(status, ts_ms=now, refused_by=refused_by))
        if what in ("gate", "unknown"):
            assert alert is None
            continue
        counted.append((now, what == "rejected"))
        window = [error for at, error in counted if at >= now - window_ms]
        rate = Fraction(sum(window), len(window))
        breached = len(window) >= minimum and rate > Fraction(str(max_rate))
        assert (alert is not None) == (breached and not previous)
        previous = breached
        assert evaluator.counts == (sum(window), len(window))
