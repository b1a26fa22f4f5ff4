"""A backtest on the live code path, without NATS: the same objects the workloads run, in a loop.

For each candle close time (every symbol's candle of one open time, a *step*):

1. marks: the execution core (``ExecutionCore.mark``) and the ledger (``Ledger.mark``) take the
   closes, as the execution and portfolio workloads do from the MARKET stream;
2. signals: ``SignalMaker`` (the inference service's code) pushes each candle into its symbol's
   ``FeatureWindow`` and makes the step's signals with one batched call of the model;
3. decisions and orders: the execution worker's own core (``execution.BacktestExecution``): the
   signals pass its bounded intake, every cycle of at most ``maxPerCycle`` goes through
   ``decide`` on its exposure book and fresh prices with the ledger's equity, and each intent is
   driven by the worker's order driver on the paper exchange (LIMIT IOC attempts at the
   policy's slippage bound, a partly filled remainder sent again while the price is inside
   it, the exposure book's admission, expiry, the halt gate); its fills are booked by the
   ``Ledger``;
4. risk: the portfolio's ``DrawdownEvaluator`` sees a snapshot; a drawdown alert halts trading
   for the rest of the run, as the operator trips the EmergencyStop on it (manual reset): a
   HALTED latch in the core's halt gate.

Time is the data's: a step happens at its candles' close (``close_time_ms + 1``), the core's
simulated clock is set to it, and it is the signals' ``created_at_ms`` and every decision's and
order's time; a signal is decided in the step that made it, as the live worker's cycles (every
0.25 s) do long before the next 1-minute candle.

No strategy logic lives here: direction and confidence, the intake, the checks and sizing, the
fill prices and fees, the accounting and the drawdown rule are the workloads' own code. What is
measured (hit rates, Sharpe, wins) is computed from what the run produced.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, localcontext

import numpy as np

from qtrader.backtest.data import interval_ms, series_interval
from qtrader.backtest.errors import BacktestError
from qtrader.backtest.execution import BacktestExecution
from qtrader.contracts.messages import Candle, Fill, OrderIntent, Signal
from qtrader.contracts.policy import TradingPolicySpec
from qtrader.inference.card import BacktestFigures
from qtrader.inference.onnx_model import CLASSES, Predictor
from qtrader.inference.signals import SignalMaker
from qtrader.instruments import ExchangeInfo, paper_exchange_info
from qtrader.money import EXACT_HALF_UP as _EXACT
from qtrader.money import PCT_STEP as _PCT
from qtrader.portfolio.ledger import Ledger
from qtrader.research.dataset import LABEL_HORIZON, label_future_returns, round_trip_cost_bps
from qtrader.research.evaluation import hit_counts
from qtrader.risk.evaluators import DrawdownEvaluator

_YEAR_MS = 365 * 86_400_000


@dataclass(frozen=True)
class ModelSchedule:
    """Which model trades when: ``(from_open_time_ms, model)`` entries in ascending time; the
    first entry applies from the start (a walk-forward run trades each fold with its models)."""

    entries: tuple[tuple[int, Predictor], ...]

    def __post_init__(self) -> None:
        if not self.entries:
            raise ValueError("a schedule needs at least one model")
        times = [start for start, _ in self.entries]
        if times != sorted(times) or len(set(times)) != len(times):
            raise ValueError(f"schedule times must be strictly ascending, got {times}")

    def at(self, open_time_ms: int) -> Predictor:
        current = self.entries[0][1]
        for start, model in self.entries:
            if start > open_time_ms:
                break
            current = model
        return current


@dataclass(frozen=True)
class EquityPoint:
    """Equity (exact, unrounded) after one ledger event: a mark or a fill at ``ts_ms`` (the
    step's time); ``step_end`` marks the last point of each step (the Sharpe ratio's series)."""

    ts_ms: int
    equity: Decimal
    step_end: bool = False


@dataclass(frozen=True, kw_only=True)
class BacktestResult:
    figures: BacktestFigures
    signals: tuple[Signal, ...]
    intents: tuple[OrderIntent, ...]
    fills: tuple[Fill, ...]
    equity_curve: tuple[EquityPoint, ...]
    final_marks: Mapping[str, Decimal]
    final_positions: Mapping[str, Decimal]
    dropped: Mapping[str, int]


@dataclass
class _Tally:
    """What the run produced, for the figures."""

    signals: list[Signal] = field(default_factory=list)
    intents: list[OrderIntent] = field(default_factory=list)
    fills: list[Fill] = field(default_factory=list)
    curve: list[EquityPoint] = field(default_factory=list)
    reducing_trades: int = 0
    wins: int = 0
    halted_at_ms: int | None = None


def run_backtest(
    candles_by_symbol: Mapping[str, Sequence[Candle]],
    model: Predictor | ModelSchedule,
    spec: TradingPolicySpec,
    *,
    exchange: ExchangeInfo | None = None,
    label_horizon: int = LABEL_HORIZON,
    halt_on_drawdown: bool = True,
    max_volume_share: Decimal | None = None,
) -> BacktestResult:
    """Trade ``candles_by_symbol`` (each symbol's candles in ascending open time) with
    ``model`` under ``spec``, on the paper exchange, from ``spec.paper.initialCapitalUsd``.

    ``label_horizon`` is the horizon of the labels the signals' hit rate is measured against
    (the model card's). ``halt_on_drawdown`` False lets a run continue past the policy's
    ``maxDrawdownPct`` (the live system would halt). ``max_volume_share``: the paper exchange
    fills at most this share of a candle's volume (None: unlimited liquidity).
    """
    info = exchange or paper_exchange_info()
    steps = _steps(candles_by_symbol, info)
    schedule = model if isinstance(model, ModelSchedule) else ModelSchedule(((0, model),))
    run = _Run(
        spec, info, schedule, halt_on_drawdown=halt_on_drawdown, max_volume_share=max_volume_share
    )
    for group in steps:
        run.step(group)
    return run.result(candles_by_symbol, label_horizon=label_horizon)


def _steps(
    candles_by_symbol: Mapping[str, Sequence[Candle]], info: ExchangeInfo
) -> list[list[Candle]]:
    """Every candle, grouped by open time, in time order (symbols sorted within a step)."""
    if not any(candles_by_symbol.values()):
        raise BacktestError("no candles to backtest")
    unlisted = [symbol for symbol in candles_by_symbol if symbol not in info]
    if unlisted:
        raise BacktestError(f"not listed by the paper exchange: {', '.join(sorted(unlisted))}")
    try:
        series_interval(candles_by_symbol)
    except ValueError as exc:
        raise BacktestError(str(exc)) from None
    for symbol, candles in candles_by_symbol.items():
        for candle in candles:
            if candle.symbol != symbol:
                raise BacktestError(f"a {candle.symbol} candle is in the {symbol} series")
        for before, after in itertools.pairwise(candles):
            if after.open_time_ms <= before.open_time_ms:
                raise BacktestError(f"{symbol}: candles must be in ascending open time")
    merged = sorted(
        (c for candles in candles_by_symbol.values() for c in candles),
        key=lambda c: (c.open_time_ms, c.symbol),
    )
    return [list(group) for _, group in itertools.groupby(merged, key=lambda c: c.open_time_ms)]


class _Run:
    def __init__(
        self,
        spec: TradingPolicySpec,
        info: ExchangeInfo,
        schedule: ModelSchedule,
        *,
        halt_on_drawdown: bool,
        max_volume_share: Decimal | None,
    ) -> None:
        self._spec = spec
        self._schedule = schedule
        self._halt_on_drawdown = halt_on_drawdown
        self._maker = SignalMaker()
        # Fill ids never repeat in a run: the ledger need not remember them (memory bounded).
        self._ledger = Ledger(
            initial_capital=spec.paper.initial_capital_usd, exchange=info, keep_fill_ids=False
        )
        self._drawdown = DrawdownEvaluator(spec.risk.max_drawdown_pct, source="backtest")
        self._marks: dict[str, Decimal] = {}
        self._candles: dict[str, Candle] = {}  # the step's candle per symbol
        self._steps = 0
        self._tally = _Tally()
        self._execution = BacktestExecution(
            spec,
            info,
            equity=lambda: self._ledger.equity,
            candle_of=self._candles.__getitem__,
            on_fill=self._book,
            on_intent=self._tally.intents.append,
            max_volume_share=max_volume_share,
        )

    def step(self, candles: list[Candle]) -> None:
        now_ms = max(c.close_time_ms for c in candles) + 1
        execution = self._execution
        execution.at(now_ms)
        self._candles.clear()
        for candle in candles:
            self._candles[candle.symbol] = candle
            execution.mark(candle.symbol, candle.close)
            self._ledger.mark(candle.symbol, candle.close)
            self._marks[candle.symbol] = candle.close
            self._record(now_ms)
        ready = [candle for candle in candles if self._maker.accept(candle)]
        if ready:
            model = self._schedule.at(candles[0].open_time_ms)
            batch = self._maker.make(ready, model, now_ms=now_ms)
            self._tally.signals.extend(batch.signals)
            for signal in batch.signals:
                execution.offer(signal)
        execution.decide_all()
        self._steps += 1
        self._evaluate_risk(now_ms)
        last = self._tally.curve[-1]
        self._tally.curve[-1] = EquityPoint(last.ts_ms, last.equity, step_end=True)

    def _record(self, now_ms: int) -> None:
        self._tally.curve.append(EquityPoint(now_ms, self._ledger.equity))

    def _book(self, fill: Fill) -> None:
        reducing, win = book_fill(self._ledger, fill)
        self._record(fill.ts_ms)
        self._tally.fills.append(fill)
        self._tally.reducing_trades += reducing
        self._tally.wins += win

    def _evaluate_risk(self, now_ms: int) -> None:
        if self._execution.halted or not self._halt_on_drawdown:
            return
        snapshot = self._ledger.snapshot(sequence=self._steps, ts_ms=now_ms)
        alert = self._drawdown.on_snapshot(snapshot)
        if alert is not None:
            self._execution.halt(alert.detail)
            self._tally.halted_at_ms = now_ms

    def result(
        self, candles_by_symbol: Mapping[str, Sequence[Candle]], *, label_horizon: int
    ) -> BacktestResult:
        tally, ledger, counts = self._tally, self._ledger, self._execution.counts
        snapshot = ledger.snapshot(sequence=self._steps, ts_ms=tally.curve[-1].ts_ms)
        interval = interval_ms(series_interval(candles_by_symbol))
        hits, directional = self._signal_hits(candles_by_symbol, label_horizon)
        with localcontext(_EXACT):
            return_pct = (
                (ledger.equity - ledger.initial_capital) / ledger.initial_capital * 100
            ).quantize(_PCT)
        figures = BacktestFigures(
            start_ms=min(c[0].open_time_ms for c in candles_by_symbol.values() if c),
            end_ms=max(c[-1].close_time_ms for c in candles_by_symbol.values() if c),
            steps=self._steps,
            periods_per_year=_YEAR_MS / interval,
            initial_capital=snapshot.initial_capital,
            final_equity=snapshot.equity,
            realized_pnl=snapshot.realized_pnl,
            unrealized_pnl=snapshot.unrealized_pnl,
            fees=snapshot.fees,
            return_pct=return_pct,
            max_drawdown_pct=snapshot.max_drawdown_pct,
            sharpe=sharpe_ratio(
                [ledger.initial_capital, *(p.equity for p in tally.curve if p.step_end)],
                _YEAR_MS / interval,
            ),
            signals=len(tally.signals),
            directional_signals=directional,
            signal_hit_rate=hits / directional if directional else None,
            orders=counts.orders,
            unfilled_orders=counts.unfilled,
            trades=len(tally.fills),
            reducing_trades=tally.reducing_trades,
            win_rate=tally.wins / tally.reducing_trades if tally.reducing_trades else None,
            denials=dict(sorted(counts.denials.items())),
            halted_at_ms=tally.halted_at_ms,
        )
        return BacktestResult(
            figures=figures,
            signals=tuple(tally.signals),
            intents=tuple(tally.intents),
            fills=tuple(tally.fills),
            equity_curve=tuple(tally.curve),
            final_marks=dict(self._marks),
            final_positions=dict(ledger.positions),
            dropped=dict(sorted(counts.dropped.items())),
        )

    def _signal_hits(
        self, candles_by_symbol: Mapping[str, Sequence[Candle]], horizon: int
    ) -> tuple[int, int]:
        """The card's hit rate on this run's signals: labels from the run's own candles, with
        the policy's round-trip cost; signals without ``horizon`` later candles are left out."""
        cost = round_trip_cost_bps(self._spec.paper)
        labels: dict[tuple[str, int], int] = {}
        for symbol, candles in candles_by_symbol.items():
            closes = np.array([float(c.close) for c in candles], dtype=np.float64)
            for candle, label in zip(
                candles, label_future_returns(closes, horizon=horizon, cost_bps=cost), strict=False
            ):
                labels[(symbol, candle.open_time_ms)] = int(label)
        judged = [
            (CLASSES.index(s.direction), s.confidence, labels[key])
            for s in self._tally.signals
            if (key := (s.symbol, s.candle_open_time_ms)) in labels
        ]
        if not judged:
            return 0, 0
        choice, confidence, truth = (np.array(column) for column in zip(*judged, strict=True))
        return hit_counts(choice, confidence, truth, threshold=self._spec.risk.min_confidence)


def book_fill(ledger: Ledger, fill: Fill) -> tuple[bool, bool]:
    """Book ``fill``; (it reduced a position, and that reduction earned more than its fee)."""
    position = ledger.quantity(fill.symbol)
    realized_before = ledger.realized_pnl
    ledger.apply_fill(fill)
    if position == 0 or (position > 0) == (fill.side.sign > 0):
        return False, False
    with localcontext(_EXACT):
        return True, ledger.realized_pnl - realized_before > fill.fee


class SharpeAccumulator:
    """The Sharpe ratio of an equity series fed one value at a time, in O(1) memory.

    Welford's running mean and variance of the per-period returns, in float64: both engines use
    it, so a streamed backtest and the per-candle one give the same figure bit for bit (it
    differs from numpy's two-pass ``std`` in the last digits only, ~1e-13 relative)."""

    def __init__(self) -> None:
        self._previous: float | None = None
        self._count = 0
        self._mean = 0.0
        self._m2 = 0.0

    def add(self, value: float) -> None:
        """The next equity, as a float (``float(equity)``, or ``Ledger.equity_float``)."""
        if self._previous is not None:
            change = value / self._previous - 1.0
            self._count += 1
            delta = change - self._mean
            self._mean += delta / self._count
            self._m2 += delta * (change - self._mean)
        self._previous = value

    def ratio(self, periods_per_year: float) -> float | None:
        """Annualised (risk-free rate 0); None with fewer than two returns or no variation."""
        if self._count < 2:
            return None
        deviation = math.sqrt(self._m2 / (self._count - 1))
        if deviation == 0.0 or not math.isfinite(deviation):
            return None
        return float(self._mean / deviation * math.sqrt(periods_per_year))


def sharpe_ratio(equity: Sequence[Decimal], periods_per_year: float) -> float | None:
    """Annualised Sharpe ratio of the per-period returns of ``equity`` (risk-free rate 0);
    None with fewer than two returns or when they never vary."""
    accumulator = SharpeAccumulator()
    for value in equity:
        accumulator.add(float(value))
    return accumulator.ratio(periods_per_year)
