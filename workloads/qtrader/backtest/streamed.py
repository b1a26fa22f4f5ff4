"""The backtest at research speed: the same trading as ``engine.run_backtest``, streamed.

``run_backtest`` pushes one candle at a time through the inference service's ``SignalMaker``
(one feature window and one model call per step). Here the candles come in chunks of column
arrays (``bars.Bars``) and each chunk is handled in two parts:

1. vectorised: every symbol's model inputs for the whole chunk (``inputs_from_arrays``, the
   training path, on the chunk plus the last ``WINDOW - 1`` candles carried from the previous
   chunk), one ``predict`` of the ensemble over all of them (one ``session.run`` per member),
   and the one decision rule (``decide_batch``). The inputs equal the live ``FeatureWindow``'s
   bit for bit: both call ``_window_features`` and ``_window_sequence`` on contiguous windows of
   one shape, and onnxruntime gives each row the same output whatever the batch around it (a
   test holds both to it). This part is ``blocks.predicted_blocks``; with
   ``prediction_process`` it runs in a process of its own beside the trading
   (``prediction_process``: a thread was tried, but the reading's and the features' Python
   took the GIL from the trading, and the wall time did not fall);
2. sequential, in time order, step by step: marks, the step's signals into the execution
   worker's own core (``execution.BacktestExecution``: its intake, ``decide``, the order
   driver's attempts on the paper exchange, retries of a remainder, admission, expiry and halt
   gate), fills into the ``Ledger``, the ``DrawdownEvaluator``: what ``run_backtest`` uses, in
   the same order.

What makes the sequential part cheap without changing what it computes:

* a signal below ``minConfidence`` is not built as a ``Signal``, only counted with its step's
  others from the chunk's arrays (unless ``on_signal`` wants each one): ``decide`` would deny
  it with ``low_confidence`` (``halted`` once halted) and nothing else can happen to it,
  provided the intake never overflows; a step offers at most one signal per symbol and takes
  them all, so that holds whenever ``queueSize`` >= the number of symbols, which is checked
  (otherwise every signal goes through the intake, as in ``run_backtest``);
* messages made of values known to be valid are built unvalidated (``messages.trusted``,
  equal to the validated ones): the signals (checked closes, a probability), the candles the
  paper exchange gets (texts the reader checked), the intents ``decide`` makes of them, and the
  order updates, fills made of those (the core's ``validate_messages=False``);
* neither the paper exchange nor the exposure book nor the ledger keeps a record of past
  orders or fills (ids never repeat in a run), so nothing grows with the run;
* a mark of a symbol without a position cannot move equity, peak or drawdown, so the ledger
  gets it only when that symbol is about to trade (or at the end); the paper exchange gets a
  symbol's candle only when an order for it is sent;
* nor can a mark with the very ``Decimal`` the ledger was last marked with for that symbol
  (only a mark moves the ledger's mark, and every fill settles equity and drawdown), and rows
  with the same close text share one ``Decimal`` (``Bars.close_decimals``): a close that
  repeats the last one (most of them once a price sits on its tick) is not marked again;
* a portfolio snapshot for the drawdown rule is built only once the ledger's maximum drawdown
  is within rounding of the limit (the current drawdown is never above the maximum);
* nothing grows with the run: counts, the running Sharpe ratio and, per symbol, the last
  ``WINDOW - 1`` candles and the last ``label_horizon`` predictions (for the hit rate). Signals,
  order updates and fills go to the optional ``on_signal`` / ``on_update`` / ``on_fill``
  callbacks instead of a list;
* the objects made before the run (modules, the model) are frozen out of the garbage
  collector's full collections while it runs (``gc.freeze``), which would otherwise walk them
  again and again between the run's own short-lived objects;
* the step loop reads each event's symbol, bars, row and close from one tuple, and in the
  core a decision's context and an attempt's limits are named tuples, the intent ttl is
  computed once per policy spec, and the open-positions count only for an order that opens.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal, localcontext
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

from qtrader.backtest.bars import Bars
from qtrader.backtest.blocks import NO_SIGNAL, Block, ChunkPredictions, predicted_blocks
from qtrader.backtest.data import interval_ms
from qtrader.backtest.engine import SharpeAccumulator, book_fill
from qtrader.backtest.errors import BacktestError
from qtrader.backtest.execution import BacktestExecution
from qtrader.backtest.prediction_process import KlineFiles, PredictionProcess
from qtrader.contracts.messages import Candle, Fill, OrderUpdate, Signal, trusted
from qtrader.contracts.policy import TradingPolicySpec
from qtrader.execution.decisions import DenialReason
from qtrader.inference.card import BacktestFigures
from qtrader.inference.onnx_model import CLASSES, Predictor, SignalModel
from qtrader.inference.signals import signal_id
from qtrader.instruments import ExchangeInfo, paper_exchange_info
from qtrader.money import EXACT_HALF_UP as _EXACT
from qtrader.money import PCT_STEP as _PCT
from qtrader.portfolio.ledger import Ledger
from qtrader.research.dataset import LABEL_HORIZON, label_future_returns, round_trip_cost_bps
from qtrader.research.evaluation import hit_counts
from qtrader.risk.evaluators import DrawdownEvaluator

_HALF_PCT_STEP = Decimal("0.0000005")  # snapshots round the drawdown half up to 1e-6
_YEAR_MS = 365 * 86_400_000

_Int64s = NDArray[np.int64]
_Float64s = NDArray[np.float64]


@dataclass(frozen=True, kw_only=True)
class StreamedResult:
    figures: BacktestFigures
    final_marks: Mapping[str, Decimal]
    final_positions: Mapping[str, Decimal]
    dropped: Mapping[str, int]


def run_streamed_backtest(
    bars: Mapping[str, Iterable[Bars]] | KlineFiles,
    model: Predictor,
    spec: TradingPolicySpec,
    *,
    exchange: ExchangeInfo | None = None,
    label_horizon: int = LABEL_HORIZON,
    halt_on_drawdown: bool = True,
    on_signal: Callable[[Signal], None] | None = None,
    on_fill: Callable[[Fill], None] | None = None,
    on_update: Callable[[OrderUpdate], None] | None = None,
    max_volume_share: Decimal | None = None,
    prediction_process: bool = False,
) -> StreamedResult:
    """Trade each symbol's chunks (ascending open time) as ``run_backtest`` trades the same
    candles; the figures are equal to its figures. ``on_signal``, ``on_fill``, ``on_update``
    see every signal, fill and order update the run makes; ``max_volume_share`` limits the
    paper exchange's liquidity (see ``run_backtest``).

    With ``prediction_process`` (kline files and a ``SignalModel`` only) part 1 runs in a
    process of its own beside the trading (``prediction_process``); the results are the same.
    """
    symbols = tuple(bars.files if isinstance(bars, KlineFiles) else bars)
    info = exchange or paper_exchange_info()
    unlisted = sorted(symbol for symbol in symbols if symbol not in info)
    if unlisted:
        raise BacktestError(f"not listed by the paper exchange: {', '.join(unlisted)}")
    with _predictions(bars, model, in_process=prediction_process) as blocks:
        labels = _Labels(
            symbols, horizon=label_horizon, cost_bps=round_trip_cost_bps(spec.paper),
            threshold=spec.risk.min_confidence,
        )  # fmt: skip
        trader = _Trader(
            spec, info, model, symbols=symbols, halt_on_drawdown=halt_on_drawdown,
            on_signal=on_signal, on_fill=on_fill, on_update=on_update,
            max_volume_share=max_volume_share,
        )  # fmt: skip
        with _older_objects_frozen():
            for block, predictions in blocks:
                labels.add(block, predictions)
                trader.trade(block, predictions)
    return trader.result(labels)


@contextmanager
def _predictions(
    bars: Mapping[str, Iterable[Bars]] | KlineFiles, model: Predictor, *, in_process: bool
) -> Iterator[Iterator[tuple[Block, ChunkPredictions]]]:
    """The blocks and their signals: made here, or by a prediction process started now (the
    first ones made here while it starts up)."""
    if not in_process:
        yield predicted_blocks(bars.bars() if isinstance(bars, KlineFiles) else bars, model)
        return
    if not isinstance(bars, KlineFiles) or not isinstance(model, SignalModel):
        raise TypeError("a prediction process needs kline files and a saved model")
    with PredictionProcess(bars, model.path) as process:
        yield _handed_over(predicted_blocks(process.files.bars(), model), process)


def _handed_over(
    here: Iterator[tuple[Block, ChunkPredictions]], process: PredictionProcess
) -> Iterator[tuple[Block, ChunkPredictions]]:
    """The blocks made here until the process has its first one ready (it takes a few tenths
    of a second to start), then the process's, from the first one not made here: the same
    blocks, since both read the same files chunked alike."""
    for made, block in enumerate(here, start=1):
        yield block
        if process.ready():
            yield from process.blocks(skip=made)
            return


@contextmanager
def _older_objects_frozen() -> Iterator[None]:
    """The objects made before the run (modules, the model, the policy) left out of the
    garbage collector's full collections while it runs (``gc.freeze``): the run makes objects
    by the hundred thousand, and each full collection would walk them all again. Nothing is
    done when the process froze objects itself: their thawing is its own."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


# --- the hit rate, with the future each label needs carried between chunks -------------------


@dataclass
class _Labels:
    """Hits of directional signals against the close ``horizon`` candles later, as
    ``run_backtest`` judges them; per symbol the last ``horizon`` closes wait for their future."""

    symbols: tuple[str, ...]
    horizon: int
    cost_bps: float
    threshold: float
    hits: int = 0
    directional: int = 0
    _waiting: dict[str, tuple[_Float64s, NDArray[np.intp], _Float64s]] = field(default_factory=dict)

    def add(self, block: Mapping[str, Bars], predictions: ChunkPredictions) -> None:
        for symbol, bars in block.items():
            fresh = (bars.close, predictions.choice[symbol], predictions.confidence[symbol])
            waiting = self._waiting.get(symbol)
            close, choice, confidence = fresh if waiting is None else (
                np.concatenate([old, new]) for old, new in zip(waiting, fresh, strict=True)
            )  # fmt: skip
            truth = label_future_returns(close, horizon=self.horizon, cost_bps=self.cost_bps)
            judged = choice[: truth.shape[0]] != NO_SIGNAL
            hits, directional = hit_counts(
                choice[: truth.shape[0]][judged],
                confidence[: truth.shape[0]][judged],
                truth[judged],
                threshold=self.threshold,
            )
            self.hits += hits
            self.directional += directional
            keep = slice(truth.shape[0], None)
            self._waiting[symbol] = (close[keep], choice[keep], confidence[keep])


# --- part 2: the sequential trading -----------------------------------------------------------


@dataclass
class _Counts:
    signals: int = 0
    trades: int = 0
    reducing_trades: int = 0
    wins: int = 0
    halted_at_ms: int | None = None
    start_ms: int | None = None
    end_ms: int = 0
    interval: str = ""


class _Trader:
    """The step loop: ``run_backtest``'s ``_Run.step`` on pre-made predictions."""

    def __init__(
        self,
        spec: TradingPolicySpec,
        info: ExchangeInfo,
        model: Predictor,
        *,
        symbols: tuple[str, ...],
        halt_on_drawdown: bool,
        on_signal: Callable[[Signal], None] | None,
        on_fill: Callable[[Fill], None] | None,
        on_update: Callable[[OrderUpdate], None] | None,
        max_volume_share: Decimal | None,
    ) -> None:
        self._version = model.version
        self._halt_on_drawdown = halt_on_drawdown
        self._on_signal = on_signal
        self._on_fill = on_fill
        # Fill ids never repeat in a run: the ledger need not remember them (memory bounded).
        self._ledger = Ledger(
            initial_capital=spec.paper.initial_capital_usd, exchange=info, keep_fill_ids=False
        )
        self._drawdown = DrawdownEvaluator(spec.risk.max_drawdown_pct, source="backtest")
        self._near_limit = spec.risk.max_drawdown_pct - _HALF_PCT_STEP
        self._marks: dict[str, Decimal] = {}
        self._unmarked: dict[str, Decimal] = {}  # marks the ledger has not needed yet
        self._ledger_marks: dict[str, Decimal] = {}  # the last mark given to the ledger
        self._candles: dict[str, tuple[Bars, int]] = {}  # the step's candle per symbol
        self._execution = BacktestExecution(
            spec, info, equity=lambda: self._ledger.equity, candle_of=self._candle_of,
            on_fill=self._book, on_update=on_update, max_volume_share=max_volume_share,
        )  # fmt: skip
        self._steps = 0
        self._sharpe = SharpeAccumulator()
        self._sharpe.add(float(spec.paper.initial_capital_usd))
        self._counts = _Counts()
        self._threshold = spec.risk.min_confidence
        # Below minConfidence a signal can only be denied, unless the intake could overflow.
        self._skip_certain = spec.signals.queue_size >= len(symbols) and set(symbols) <= set(
            spec.symbols
        )

    def trade(self, block: Mapping[str, Bars], predictions: ChunkPredictions) -> None:
        symbols = sorted(block)
        order, starts, now = _step_order([block[s].open_time_ms for s in symbols],
                                         [block[s].close_time_ms for s in symbols])  # fmt: skip
        which, rows = order
        counts = self._counts
        if counts.start_ms is None:
            counts.start_ms = min(int(block[s].open_time_ms[0]) for s in symbols)
            counts.interval = block[symbols[0]].interval
        counts.end_ms = max(counts.end_ms, *(int(block[s].close_time_ms[-1]) for s in symbols))
        offsets = np.cumsum([0, *(len(block[s]) for s in symbols)])[:-1]
        flat = offsets[which] + rows  # each event's row in the symbols' concatenated columns
        choice = np.concatenate([predictions.choice[s] for s in symbols])[flat]
        confidence = np.concatenate([predictions.confidence[s] for s in symbols])[flat]
        made = choice != NO_SIGNAL
        # Below minConfidence a signal is counted per step, not built one by one (see
        # ``_certain_denial``); when it is to be shown (``on_signal``) each one is built.
        low = made & (confidence < self._threshold)
        if not self._skip_certain or self._on_signal is not None:
            low[:] = False
        bounds = starts.tolist()
        built = made & ~low
        closes = [close for s in symbols for close in block[s].close_decimals()]
        event_bars = [block[symbols[i]] for i in which.tolist()]
        event_rows = rows.tolist()
        event_closes = [closes[i] for i in flat.tolist()]
        symbols_of = [b.symbol for b in event_bars]
        marks = list(zip(symbols_of, event_bars, event_rows, event_closes, strict=True))
        self._steps_of(
            _Events(
                marks=marks,
                bars=event_bars,
                rows=event_rows,
                built=np.flatnonzero(built).tolist(),
                built_in_step=np.add.reduceat(built.astype(np.int64), bounds[:-1]).tolist(),
                choice=choice.tolist(),
                confidence=confidence.tolist(),
                signals=np.add.reduceat(made.astype(np.int64), bounds[:-1]).tolist(),
                low=np.add.reduceat(low.astype(np.int64), bounds[:-1]).tolist(),
            ),
            bounds,
            now.tolist(),
        )

    def _steps_of(self, events: _Events, bounds: list[int], now: list[int]) -> None:
        built, b = events.built, 0  # the events whose signal is built, in order; the next one
        execution = self._execution
        denials = execution.counts.denials
        for k, now_ms in enumerate(now):
            stop = bounds[k + 1]
            execution.at(now_ms)
            self._mark_step(events, bounds[k], stop)
            self._counts.signals += events.signals[k]
            if events.low[k]:
                reason = DenialReason.HALTED if execution.halted else DenialReason.LOW_CONFIDENCE
                denials[reason.value] += events.low[k]
            count = events.built_in_step[k]
            if count:
                self._step_signals(events, built[b : b + count], now_ms)
                b += count
            execution.decide_all()
            self._steps += 1
            self._evaluate_risk(now_ms)
            self._sharpe.add(self._ledger.equity_float)

    def _mark_step(self, events: _Events, start: int, stop: int) -> None:
        """The step's closes: the core's marks (the decisions' and the orders'), the ledger's
        where a position is."""
        candles, marks, unmarked = self._candles, self._marks, self._unmarked
        candles.clear()
        mark, holds = self._execution.core.mark, self._ledger.holds
        for symbol, bars, row, close in events.marks[start:stop]:
            marks[symbol] = close
            mark(symbol, close)
            candles[symbol] = (bars, row)
            if holds(symbol):
                self._mark_ledger(symbol, close)
            else:
                unmarked[symbol] = close

    def _mark_ledger(self, symbol: str, close: Decimal) -> None:
        """Mark the ledger, unless with the very ``Decimal`` it was last marked with (rows with
        one close text share one: ``Bars.close_decimals``): that mark would change nothing,
        since only a mark moves the ledger's mark and every fill settles equity and drawdown."""
        if close is not self._ledger_marks.get(symbol):
            self._ledger.mark(symbol, close)
            self._ledger_marks[symbol] = close

    def _step_signals(self, events: _Events, built: list[int], now_ms: int) -> None:
        """The step's signals at or above minConfidence, each made and offered; once halted,
        when nobody watches them, only counted: each is a certain ``halted`` denial (see
        ``_certain_denial``), and after a halt most steps have some."""
        if self._skip_certain and self._on_signal is None and self._execution.halted:
            self._execution.counts.denials[DenialReason.HALTED.value] += len(built)
            return
        bars, rows, choice, confidence = events.bars, events.rows, events.choice, events.confidence
        for e in built:
            self._signal(bars[e], rows[e], choice[e], confidence[e], now_ms)

    def _signal(self, bars: Bars, row: int, choice: int, confidence: float, now_ms: int) -> None:
        certain = self._certain_denial(confidence)
        if certain is not None and self._on_signal is None:
            self._execution.counts.denials[certain] += 1
            return
        open_time_ms = int(bars.open_time_ms[row])
        # Valid by construction: a checked close, a probability, an id of bounded parts.
        signal = trusted(
            Signal,
            signal_id=signal_id(self._version, _Named(bars.symbol, open_time_ms)),
            symbol=bars.symbol,
            direction=CLASSES[choice],
            confidence=confidence,
            model_version=self._version,
            candle_open_time_ms=open_time_ms,
            price=self._marks[bars.symbol],
            created_at_ms=now_ms,
        )
        if self._on_signal is not None:
            self._on_signal(signal)
        if certain is not None:
            self._execution.counts.denials[certain] += 1
        else:
            self._execution.offer(signal)

    def _certain_denial(self, confidence: float) -> str | None:
        """What ``decide`` is bound to answer, without asking it: ``halted`` once halted (its
        first check), ``low_confidence`` below minConfidence (its first check that can fail for
        a signal of a traded symbol decided in the step that made it, so never expired). Only
        when the intake cannot overflow, or the signal's presence there could matter."""
        if not self._skip_certain:
            return None
        if self._execution.halted:
            return DenialReason.HALTED.value
        if confidence < self._threshold:
            return DenialReason.LOW_CONFIDENCE.value
        return None

    def _candle_of(self, symbol: str) -> Candle:
        """The step's candle of ``symbol``, built only when an order for it is sent."""
        bars, row = self._candles[symbol]
        return bars.candle(row)

    def _book(self, fill: Fill) -> None:
        pending = self._unmarked.pop(fill.symbol, None)
        if pending is not None:
            self._mark_ledger(fill.symbol, pending)
        reducing, win = book_fill(self._ledger, fill)
        self._counts.trades += 1
        self._counts.reducing_trades += reducing
        self._counts.wins += win
        if self._on_fill is not None:
            self._on_fill(fill)

    def _evaluate_risk(self, now_ms: int) -> None:
        if self._execution.halted or not self._halt_on_drawdown:
            return
        if self._ledger.max_drawdown_pct < self._near_limit:
            return  # the snapshot's drawdown (<= the maximum, rounded) cannot reach the limit
        snapshot = self._ledger.snapshot(sequence=self._steps, ts_ms=now_ms)
        alert = self._drawdown.on_snapshot(snapshot)
        if alert is not None:
            self._execution.halt(alert.detail)
            self._counts.halted_at_ms = now_ms

    def result(self, labels: _Labels) -> StreamedResult:
        counts, ledger, execution = self._counts, self._ledger, self._execution.counts
        if counts.start_ms is None:
            raise BacktestError("no candles to backtest")
        for symbol, close in self._unmarked.items():
            self._mark_ledger(symbol, close)
        self._unmarked.clear()
        per_year = _YEAR_MS / interval_ms(counts.interval)
        snapshot = ledger.snapshot(sequence=self._steps, ts_ms=counts.end_ms)
        with localcontext(_EXACT):
            return_pct = (
                (ledger.equity - ledger.initial_capital) / ledger.initial_capital * 100
            ).quantize(_PCT)
        figures = BacktestFigures(
            start_ms=counts.start_ms,
            end_ms=counts.end_ms,
            steps=self._steps,
            periods_per_year=per_year,
            initial_capital=snapshot.initial_capital,
            final_equity=snapshot.equity,
            realized_pnl=snapshot.realized_pnl,
            unrealized_pnl=snapshot.unrealized_pnl,
            fees=snapshot.fees,
            return_pct=return_pct,
            max_drawdown_pct=snapshot.max_drawdown_pct,
            sharpe=self._sharpe.ratio(per_year),
            signals=counts.signals,
            directional_signals=labels.directional,
            signal_hit_rate=labels.hits / labels.directional if labels.directional else None,
            orders=execution.orders,
            unfilled_orders=execution.unfilled,
            trades=counts.trades,
            reducing_trades=counts.reducing_trades,
            win_rate=counts.wins / counts.reducing_trades if counts.reducing_trades else None,
            denials=dict(sorted(execution.denials.items())),
            halted_at_ms=counts.halted_at_ms,
        )
        return StreamedResult(
            figures=figures,
            final_marks=dict(self._marks),
            final_positions=dict(ledger.positions),
            dropped=dict(sorted(execution.dropped.items())),
        )


@dataclass(frozen=True, kw_only=True)
class _Events:
    """One block's candles in step order, as lists for the step loop: per event, what marks
    it (``marks``: symbol, bars, row, exact close), its symbol's bars, row, model class and
    confidence; the events whose signal is built (``built``); per step, how many of those it
    has (``built_in_step``), its signals and how many of them are below minConfidence and
    counted without being built (``low``)."""

    marks: list[tuple[str, Bars, int, Decimal]]
    bars: list[Bars]
    rows: list[int]
    built: list[int]
    built_in_step: list[int]
    choice: list[int]
    confidence: list[float]
    signals: list[int]
    low: list[int]


class _Named(NamedTuple):
    """What ``signal_id`` reads of a candle."""

    symbol: str
    open_time_ms: int


def _step_order(
    open_times: list[_Int64s], close_times: list[_Int64s]
) -> tuple[tuple[_Int64s, _Int64s], _Int64s, _Int64s]:
    """Every candle of the block in step order (open time, then symbol: the symbols come
    sorted): (symbol index, row) per candle, where each step starts, and each step's time (its
    latest close + 1 ms, as ``run_backtest``)."""
    which = np.concatenate([np.full(t.shape[0], i) for i, t in enumerate(open_times)])
    rows = np.concatenate([np.arange(t.shape[0]) for t in open_times])
    opens, closes = np.concatenate(open_times), np.concatenate(close_times)
    order = np.lexsort((which, opens))
    opens, closes = opens[order], closes[order]
    starts = np.flatnonzero(np.r_[True, opens[1:] != opens[:-1]])
    now = np.maximum.reduceat(closes, starts) + 1
    return (which[order], rows[order]), np.r_[starts, opens.shape[0]], now
