"""The backtest engine on the live code path: its figures recomputed here from what it reports."""

from __future__ import annotations

import json
import math
import shutil
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from qtrader.backtest.data import CandleSeries, csv_series, synthetic_series
from qtrader.backtest.engine import BacktestError, BacktestResult, ModelSchedule, run_backtest
from qtrader.backtest.policy import evaluation_policy, policy_for
from qtrader.contracts.messages import Candle, CandleSource, Direction, Side
from qtrader.contracts.policy import TradingPolicySpec
from qtrader.inference.features import WINDOW
from qtrader.inference.onnx_model import SignalModel, default_model_path
from support.ledger_check import independent_portfolio

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "data"
SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
HORIZON = 5


@pytest.fixture(scope="module")
def model() -> SignalModel:
    return SignalModel.load(default_model_path())


@pytest.fixture(scope="module")
def synthetic() -> CandleSeries:
    return synthetic_series(symbols=SYMBOLS, candles=400, seed=21)


@pytest.fixture(scope="module")
def spec() -> TradingPolicySpec:
    return evaluation_policy(SYMBOLS)


@pytest.fixture(scope="module")
def synthetic_run(
    synthetic: CandleSeries, model: SignalModel, spec: TradingPolicySpec
) -> BacktestResult:
    return run_backtest(synthetic, model, spec, label_horizon=HORIZON)


@pytest.fixture(scope="module")
def csv_data() -> CandleSeries:
    return csv_series(sorted(EXAMPLES.glob("*-1m-sample.csv")))


@pytest.fixture(scope="module")
def csv_run(csv_data: CandleSeries, model: SignalModel) -> BacktestResult:
    return run_backtest(csv_data, model, evaluation_policy(tuple(csv_data)), label_horizon=HORIZON)


def to_fraction(value: Decimal) -> Fraction:
    return Fraction(value)


def money(value: Fraction) -> Decimal:
    exact = Decimal(value.numerator) / Decimal(value.denominator)
    return exact.quantize(Decimal("1e-8"))


@pytest.mark.parametrize("run", ["synthetic_run", "csv_run"])
def test_backtest_when_run_then_equity_is_capital_plus_pnl_minus_fees_of_its_fills(
    run: str, request: pytest.FixtureRequest
) -> None:
    result: BacktestResult = request.getfixturevalue(run)
    figures = result.figures
    assert figures.trades == len(result.fills) > 0
    realized, fees, unrealized, positions = independent_portfolio(
        list(result.fills), dict(result.final_marks)
    )
    capital = to_fraction(figures.initial_capital)
    assert abs(to_fraction(figures.realized_pnl) - realized) <= Fraction(1, 10**8)
    assert abs(to_fraction(figures.fees) - fees) <= Fraction(1, 10**8)
    assert abs(to_fraction(figures.unrealized_pnl) - unrealized) <= Fraction(1, 10**8)
    assert figures.final_equity == money(capital + realized - fees + unrealized)
    assert {s: q for s, q in positions.items() if q} == {
        s: Fraction(q) for s, q in result.final_positions.items()
    }
    expected_return = (capital + realized - fees + unrealized - capital) / capital * 100
    assert abs(to_fraction(figures.return_pct) - expected_return) <= Fraction(1, 10**6)


@pytest.mark.parametrize("run", ["synthetic_run", "csv_run"])
def test_backtest_when_run_then_max_drawdown_is_the_worst_fall_of_its_equity_curve(
    run: str, request: pytest.FixtureRequest
) -> None:
    result: BacktestResult = request.getfixturevalue(run)
    peak = to_fraction(result.figures.initial_capital)
    worst = Fraction(0)
    for point in result.equity_curve:
        equity = to_fraction(point.equity)
        peak = max(peak, equity)
        worst = max(worst, (peak - equity) / peak * 100)
    assert worst > 0
    assert abs(to_fraction(result.figures.max_drawdown_pct) - worst) <= Fraction(1, 10**6)


def test_backtest_when_run_then_sharpe_is_annualised_from_per_candle_returns(
    synthetic_run: BacktestResult,
) -> None:
    figures = synthetic_run.figures
    ends = [float(p.equity) for p in synthetic_run.equity_curve if p.step_end]
    assert len(ends) == figures.steps == 400
    series = np.array([float(figures.initial_capital), *ends])
    returns = series[1:] / series[:-1] - 1
    expected = returns.mean() / returns.std(ddof=1) * math.sqrt(365 * 24 * 60)
    assert figures.periods_per_year == 365 * 24 * 60
    assert figures.sharpe == pytest.approx(expected, rel=1e-9)


def test_backtest_when_run_then_one_signal_per_candle_once_windows_are_full(
    synthetic_run: BacktestResult, synthetic: CandleSeries, model: SignalModel
) -> None:
    assert synthetic_run.figures.signals == len(synthetic_run.signals)
    assert len(synthetic_run.signals) == sum(len(c) - (WINDOW - 1) for c in synthetic.values())
    assert {s.model_version for s in synthetic_run.signals} == {model.version}
    for signal in synthetic_run.signals:
        # Made at the close of its own candle, from that candle's close.
        assert signal.created_at_ms == signal.candle_open_time_ms + 60_000


def test_backtest_when_run_then_hit_rate_matches_the_future_closes_net_of_costs(
    synthetic_run: BacktestResult, synthetic: CandleSeries, spec: TradingPolicySpec
) -> None:
    cost = 2 * (spec.paper.fee_bps + spec.paper.slippage_bps) / 10_000
    closes = {s: {c.open_time_ms: i for i, c in enumerate(cs)} for s, cs in synthetic.items()}
    hits = judged = 0
    for signal in synthetic_run.signals:
        if signal.direction is Direction.FLAT or signal.confidence < spec.risk.min_confidence:
            continue
        series = synthetic[signal.symbol]
        index = closes[signal.symbol][signal.candle_open_time_ms]
        if index + HORIZON >= len(series):
            continue
        change = series[index + HORIZON].close / series[index].close - 1
        truth = (
            Direction.LONG
            if change > cost
            else Direction.SHORT
            if change < -cost
            else Direction.FLAT
        )
        judged += 1
        hits += truth is signal.direction
    assert synthetic_run.figures.directional_signals == judged > 0
    assert synthetic_run.figures.signal_hit_rate == pytest.approx(hits / judged)


def test_backtest_when_run_then_orders_respect_the_policys_limits(
    synthetic_run: BacktestResult, spec: TradingPolicySpec
) -> None:
    positions: dict[str, Decimal] = {}
    for fill in synthetic_run.fills:
        positions[fill.symbol] = positions.get(fill.symbol, Decimal(0)) + (
            fill.quantity if fill.side is Side.BUY else -fill.quantity
        )
        reference = next(
            i.reference_price
            for i in synthetic_run.intents
            if i.client_order_id == fill.client_order_id
        )
        assert abs(positions[fill.symbol]) * reference <= spec.risk.max_position_usd
        assert sum(1 for q in positions.values() if q) <= spec.risk.max_open_positions
        # Paid at most the policy's slippage bound away from the price the decision saw.
        assert abs(fill.price / reference - 1) <= Decimal(spec.risk.max_slippage_bps) / 10_000
    figures = synthetic_run.figures
    assert figures.orders == len(synthetic_run.intents)
    assert figures.orders - figures.unfilled_orders == len(
        {f.client_order_id for f in synthetic_run.fills}
    )


def test_backtest_when_run_twice_then_identical(
    synthetic: CandleSeries, model: SignalModel, spec: TradingPolicySpec
) -> None:
    first = run_backtest(synthetic, model, spec)
    second = run_backtest(synthetic, model, spec)
    assert first.figures == second.figures
    assert first.fills == second.fills


def test_backtest_when_drawdown_reaches_the_limit_then_halts_like_the_operator(
    synthetic: CandleSeries, model: SignalModel
) -> None:
    strict = policy_for(
        SYMBOLS,
        TradingPolicySpec.model_validate(
            {**evaluation_policy(SYMBOLS).model_dump(), "risk": {"maxDrawdownPct": "0.05"}}
        ),
    )
    result = run_backtest(synthetic, model, strict)
    halted = result.figures.halted_at_ms
    assert halted is not None
    assert all(intent.created_at_ms <= halted for intent in result.intents)
    assert result.figures.denials.get("halted", 0) > 0


def renamed_copy(directory: Path, version: str) -> Path:
    """The default model under another ``model_version`` (the card is not hashed, its members
    are)."""
    source = default_model_path()
    for path in source.parent.glob(f"{source.stem}.*"):
        shutil.copyfile(path, directory / path.name)
    card = directory / source.name
    document = json.loads(card.read_text())
    document["model_version"] = version
    card.write_text(json.dumps(document))
    return card


def test_backtest_when_schedule_switches_model_then_each_period_uses_its_model(
    synthetic: CandleSeries, model: SignalModel, tmp_path: Path
) -> None:
    other = SignalModel.load(renamed_copy(tmp_path, "renamed-model"))
    switch = synthetic["BTCUSDT"][200].open_time_ms
    schedule = ModelSchedule(((0, model), (switch, other)))
    result = run_backtest(synthetic, schedule, evaluation_policy(SYMBOLS))
    for signal in result.signals:
        expected = model if signal.candle_open_time_ms < switch else other
        assert signal.model_version == expected.version


def candle(symbol: str, minute: int, *, interval: str = "1m") -> Candle:
    return Candle(
        symbol=symbol,
        interval=interval,
        open_time_ms=minute * 60_000,
        close_time_ms=minute * 60_000 + 59_999,
        open=Decimal(100),
        high=Decimal(101),
        low=Decimal(99),
        close=Decimal(100),
        volume=Decimal(1),
        source=CandleSource.REPLAY,
    )


@pytest.mark.parametrize(
    ("series", "message"),
    [
        ({}, "no candles"),
        ({"BTCUSDT": []}, "no candles"),
        ({"FOOUSDT": [candle("FOOUSDT", 0)]}, "not listed by the paper exchange: FOOUSDT"),
        ({"BTCUSDT": [candle("BTCUSDT", 1), candle("BTCUSDT", 0)]}, "ascending open time"),
        ({"BTCUSDT": [candle("ETHUSDT", 0)]}, "ETHUSDT candle is in the BTCUSDT series"),
        (
            {"BTCUSDT": [candle("BTCUSDT", 0)], "ETHUSDT": [candle("ETHUSDT", 0, interval="5m")]},
            "one interval",
        ),
    ],
)
def test_backtest_when_input_is_unusable_then_says_why(
    series: CandleSeries, message: str, model: SignalModel
) -> None:
    with pytest.raises(BacktestError, match=message):
        run_backtest(series, model, evaluation_policy(("BTCUSDT", "ETHUSDT")))
