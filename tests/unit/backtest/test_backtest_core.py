"""The backtest trades through the execution worker's own core: the same orders for the same
signals, partial fills and their retries, expiries and the exposure book's cuts included.

The run: the streamed backtest on the seeded synthetic market with the shipped model, on a paper
exchange that fills at most half of a candle's volume (an order larger than that fills in part
and its remainder is sent again) under a slippage bound of 10 bps, which one symbol's coarse
tick cannot meet (its orders expire unfilled, attempt after attempt). Then the same signals go
through an ``ExecutionCore`` wired as the execution worker wires it (validated messages, a book
that keeps its history, the paper venue given every candle as the worker's price feed gives it,
a control-plane heartbeat every step), on an asyncio event loop that awaits each intent as the
worker's send stage does: every order update and fill must be equal.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from decimal import Decimal

import pytest

from qtrader.backtest.bars import candle_bars
from qtrader.backtest.data import CandleSeries, synthetic_series
from qtrader.backtest.engine import run_backtest
from qtrader.backtest.execution import WORKER_ID
from qtrader.backtest.policy import evaluation_policy
from qtrader.backtest.streamed import run_streamed_backtest
from qtrader.contracts.messages import (
    Candle,
    Fill,
    HaltLatch,
    OrderIntent,
    OrderStatus,
    OrderUpdate,
    PolicyRevision,
    Signal,
    TradingState,
)
from qtrader.contracts.policy import TradingPolicySpec
from qtrader.execution.clock import SimulatedClock
from qtrader.execution.core import ExecutionCore
from qtrader.execution.decisions import attempt_client_order_id
from qtrader.execution.exposure import ExposureBook
from qtrader.execution.halt import HaltGate
from qtrader.execution.paper import PaperExchange, PaperVenue
from qtrader.inference.onnx_model import SignalModel, default_model_path
from qtrader.instruments import paper_exchange_info
from qtrader.portfolio.ledger import Ledger

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT")
HORIZON = 5
VOLUME_SHARE = Decimal("0.5")


class Run:
    """What a run sent and filled: its order updates and fills, in order."""

    def __init__(self) -> None:
        self.signals: list[Signal] = []
        self.updates: list[OrderUpdate] = []
        self.fills: list[Fill] = []


@pytest.fixture(scope="module")
def series() -> CandleSeries:
    return synthetic_series(symbols=SYMBOLS, candles=600, seed=5)


@pytest.fixture(scope="module")
def spec() -> TradingPolicySpec:
    data = evaluation_policy(SYMBOLS).model_dump()
    data["risk"]["max_slippage_bps"] = 10
    return TradingPolicySpec.model_validate(data)


@pytest.fixture(scope="module")
def backtest(series: CandleSeries, spec: TradingPolicySpec) -> Run:
    run = Run()
    result = run_streamed_backtest(
        {symbol: candle_bars(candles, chunk_rows=97) for symbol, candles in series.items()},
        SignalModel.load(default_model_path()),
        spec,
        label_horizon=HORIZON,
        on_signal=run.signals.append,
        on_update=run.updates.append,
        on_fill=run.fills.append,
        max_volume_share=VOLUME_SHARE,
    )
    assert result.figures.halted_at_ms is None  # the worker below never halts either
    return run


async def as_the_worker(
    series: CandleSeries, spec: TradingPolicySpec, signals: list[Signal]
) -> Run:
    """The signals through the worker's wiring of the core, step by step: prices first (its
    price feed: the core's marks and the paper exchange), then the step's signals into the
    intake, then decision cycles until it is empty, each intent awaited on the venue."""
    run = Run()
    info = paper_exchange_info()
    clock = SimulatedClock()
    gate = HaltGate(heartbeat_timeout_s=10, clock=clock.monotonic_s)
    gate.apply(HaltLatch(state=TradingState.ACTIVE, revision=1, issued_at_ms=0))
    ledger = Ledger(initial_capital=spec.paper.initial_capital_usd, exchange=info)
    book = ExposureBook()
    paper = PaperExchange(
        exchange=info,
        fee_bps=spec.paper.fee_bps,
        slippage_bps=spec.paper.slippage_bps,
        positions=book.position,
        max_volume_share=VOLUME_SHARE,
    )
    policy = PolicyRevision(name="parity", revision=1, published_at_ms=0, spec=spec)

    async def publish_update(update: OrderUpdate) -> None:
        run.updates.append(update)

    async def publish_fill(fill: Fill) -> None:  # the portfolio's ledger takes it
        run.fills.append(fill)
        ledger.apply_fill(fill)

    core = ExecutionCore(
        gate=gate,
        clock=clock,
        policy=lambda: policy,
        equity=lambda: ledger.equity,
        publish_update=publish_update,
        publish_fill=publish_fill,
        worker_id=WORKER_ID,
        book=book,
    )
    core.connect(PaperVenue(paper, info, history=book.fills_of, clock=clock))
    intake = core.open_intake(spec.signals)
    made_at: dict[int, list[Signal]] = defaultdict(list)
    for signal in signals:
        made_at[signal.created_at_ms].append(signal)
    for step in steps(series):
        clock.set(max(candle.close_time_ms for candle in step) + 1)
        gate.heartbeat()
        for candle in step:
            core.mark(candle.symbol, candle.close)
            paper.on_candle(candle)
            ledger.mark(candle.symbol, candle.close)
        for signal in made_at[clock.wall_ms()]:
            core.offer(signal)
        while len(intake):
            taken, _ = core.take_cycle()
            for signal in taken:
                outcome = core.decide(signal)
                if isinstance(outcome, OrderIntent):
                    await core.execute(outcome)
    return run


def steps(series: CandleSeries) -> list[list[Candle]]:
    merged = sorted(itertools.chain(*series.values()), key=lambda c: (c.open_time_ms, c.symbol))
    return [list(group) for _, group in itertools.groupby(merged, key=lambda c: c.open_time_ms)]


def test_backtest_when_given_the_same_signals_as_the_worker_then_the_same_orders_and_fills(
    backtest: Run, series: CandleSeries, spec: TradingPolicySpec
) -> None:
    worker = asyncio.run(as_the_worker(series, spec, backtest.signals))
    finals = {u.status for u in backtest.updates if u.status.is_final}
    # The run holds what only the live driver does: fills in part, retries, expiries.
    assert {OrderStatus.FILLED, OrderStatus.CANCELED, OrderStatus.EXPIRED} <= finals
    assert worker.updates == backtest.updates
    assert worker.fills == backtest.fills


def test_backtest_when_an_order_fills_in_part_then_its_remainder_is_sent_again(
    backtest: Run,
) -> None:
    """What the first-attempt-only backtest could not do: a partial fill, then a second attempt
    for the remainder with its own client order id, and the intent ending with what filled."""
    by_intent: dict[str, list[OrderUpdate]] = defaultdict(list)
    for update in backtest.updates:
        by_intent[update.intent_id].append(update)
    retried = [
        updates
        for updates in by_intent.values()
        if [u.status for u in updates[:3]]
        == [OrderStatus.PENDING_NEW, OrderStatus.PARTIALLY_FILLED, OrderStatus.PENDING_NEW]
    ]
    assert retried
    for first, partial, second, *rest in retried:
        assert second.client_order_id == attempt_client_order_id(first.client_order_id, 1)
        assert second.quantity == first.quantity - partial.filled_quantity
        final = rest[-1]
        assert final.status.is_final
        stem = first.client_order_id[:32]
        filled = sum(f.quantity for f in backtest.fills if f.client_order_id.startswith(stem))
        assert final.filled_quantity == filled >= partial.filled_quantity


def test_per_candle_backtest_when_partial_fills_then_the_same_fills_and_figures_as_streamed(
    series: CandleSeries, spec: TradingPolicySpec
) -> None:
    model = SignalModel.load(default_model_path())
    fills: list[Fill] = []
    streamed = run_streamed_backtest(
        {symbol: candle_bars(candles, chunk_rows=97) for symbol, candles in series.items()},
        model,
        spec,
        label_horizon=HORIZON,
        on_fill=fills.append,
        max_volume_share=VOLUME_SHARE,
    )
    per_candle = run_backtest(
        series, model, spec, label_horizon=HORIZON, max_volume_share=VOLUME_SHARE
    )
    assert per_candle.figures.unfilled_orders > 0
    assert streamed.figures == per_candle.figures
    assert fills == list(per_candle.fills)
