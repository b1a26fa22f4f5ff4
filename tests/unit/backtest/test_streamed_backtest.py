"""The streamed backtest against the per-candle one: same candles, same signals, same trades.

``run_backtest`` is the live path in a loop (a ``FeatureWindow`` and a model call per step);
the streamed engine computes inputs over chunks and calls the ensemble once per chunk. Chunk
sizes here are small and odd so that windows, labels and steps straddle chunk boundaries.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from decimal import Decimal
from itertools import pairwise
from pathlib import Path

import pytest

from qtrader.backtest.bars import Bars, candle_bars, csv_bars
from qtrader.backtest.data import CandleSeries, csv_series, synthetic_series
from qtrader.backtest.engine import BacktestResult, run_backtest
from qtrader.backtest.policy import evaluation_policy
from qtrader.backtest.streamed import StreamedResult, run_streamed_backtest
from qtrader.contracts.messages import Candle, Fill, Signal
from qtrader.contracts.policy import TradingPolicySpec
from qtrader.inference.onnx_model import SignalModel, default_model_path
from qtrader.marketdata.csv_replay import KlineFormatError, read_klines

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT")
HORIZON = 5
EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "data"
HEADER = (
    "open_time,open,high,low,close,volume,close_time,quote_volume,count,"
    "taker_buy_volume,taker_buy_quote_volume,ignore\n"
)


@pytest.fixture(scope="module")
def model() -> SignalModel:
    return SignalModel.load(default_model_path())


@pytest.fixture(scope="module")
def series() -> CandleSeries:
    return synthetic_series(symbols=SYMBOLS, candles=700, seed=5)


def with_risk(spec: TradingPolicySpec, **changes: object) -> TradingPolicySpec:
    data = spec.model_dump()
    for key, value in changes.items():
        section, name = key.split("__")
        data[section][name] = value
    return TradingPolicySpec.model_validate(data)


def streamed(
    bars: dict[str, Iterator[Bars]], model: SignalModel, spec: TradingPolicySpec
) -> tuple[StreamedResult, list[Signal], list[Fill]]:
    signals: list[Signal] = []
    fills: list[Fill] = []
    result = run_streamed_backtest(
        bars, model, spec, label_horizon=HORIZON, on_signal=signals.append, on_fill=fills.append
    )
    return result, signals, fills


def assert_same_run(
    live: BacktestResult, fast: StreamedResult, signals: list[Signal], fills: list[Fill]
) -> None:
    assert fast.figures == live.figures
    assert signals == list(live.signals)  # direction and confidence bit for bit
    assert fills == list(live.fills)
    assert dict(fast.final_positions) == dict(live.final_positions)
    assert dict(fast.final_marks) == dict(live.final_marks)
    assert fast.dropped == live.dropped


@pytest.mark.parametrize(
    "changes",
    [
        {},
        # A drawdown limit the run reaches: the halt, and every signal after it denied.
        {"risk__max_drawdown_pct": Decimal("0.5")},
        # An intake smaller than a step's signals: drops, and signals decided in cycles.
        {"signals__queue_size": 2, "signals__max_per_cycle": 1},
    ],
    ids=["evaluation-policy", "halts-on-drawdown", "intake-overflows"],
)
def test_streamed_when_same_candles_then_same_signals_trades_and_figures_as_per_candle(
    changes: dict[str, object], series: CandleSeries, model: SignalModel
) -> None:
    spec = with_risk(evaluation_policy(SYMBOLS), **changes)
    live = run_backtest(series, model, spec, label_horizon=HORIZON)
    fast, signals, fills = streamed(
        {s: candle_bars(c, chunk_rows=97) for s, c in series.items()}, model, spec
    )
    assert live.figures.trades > 50
    if "risk__max_drawdown_pct" in changes:
        assert live.figures.halted_at_ms is not None
    if "signals__queue_size" in changes:
        assert live.dropped
    assert_same_run(live, fast, signals, fills)


@pytest.mark.parametrize(
    "changes",
    [{}, {"risk__max_drawdown_pct": Decimal("0.5")}],
    ids=["evaluation-policy", "halts-on-drawdown"],
)
def test_streamed_when_signals_not_shown_then_low_ones_counted_unbuilt_with_the_same_figures(
    changes: dict[str, object], series: CandleSeries, model: SignalModel
) -> None:
    """Without ``on_signal`` the signals below minConfidence are counted per step, as
    ``low_confidence`` (``halted`` once halted), and never built."""
    spec = with_risk(evaluation_policy(SYMBOLS), **changes)
    live = run_backtest(series, model, spec, label_horizon=HORIZON)
    fills: list[Fill] = []
    fast = run_streamed_backtest(
        {s: candle_bars(c, chunk_rows=97) for s, c in series.items()},
        model,
        spec,
        label_horizon=HORIZON,
        on_fill=fills.append,
    )
    assert live.figures.denials["low_confidence"] > 0
    if "risk__max_drawdown_pct" in changes:
        assert live.figures.denials["halted"] > 0
    assert fast.figures == live.figures
    assert fills == list(live.fills)
    assert dict(fast.final_positions) == dict(live.final_positions)
    assert dict(fast.final_marks) == dict(live.final_marks)
    assert fast.dropped == live.dropped


def test_streamed_when_symbols_start_late_and_have_gaps_then_steps_match_per_candle(
    series: CandleSeries, model: SignalModel
) -> None:
    ragged = {
        "BTCUSDT": series["BTCUSDT"],
        "ETHUSDT": series["ETHUSDT"][150:],  # starts in the third chunk of the others
        "SOLUSDT": series["SOLUSDT"][:300] + series["SOLUSDT"][420:],  # a gap of 120 candles
    }
    spec = evaluation_policy(tuple(ragged))
    live = run_backtest(ragged, model, spec, label_horizon=HORIZON)
    fast, signals, fills = streamed(
        {s: candle_bars(c, chunk_rows=64) for s, c in ragged.items()}, model, spec
    )
    assert_same_run(live, fast, signals, fills)


def test_streamed_when_read_from_kline_files_then_same_as_per_candle_on_those_files(
    series: CandleSeries, model: SignalModel, tmp_path: Path
) -> None:
    paths = [write_klines(tmp_path, candles) for candles in series.values()]
    from_files = csv_series(paths)
    spec = evaluation_policy(SYMBOLS)
    live = run_backtest(from_files, model, spec, label_horizon=HORIZON)
    bars = {
        path.name.split("-")[0]: csv_bars(
            path, symbol=path.name.split("-")[0], interval="1m", chunk_rows=111
        )
        for path in paths
    }
    fast, signals, fills = streamed(bars, model, spec)
    assert_same_run(live, fast, signals, fills)


def test_streamed_when_closes_repeat_then_same_as_per_candle_on_those_files(
    series: CandleSeries, model: SignalModel, tmp_path: Path
) -> None:
    """Prices on a whole-dollar grid: most closes repeat the last one, and the streamed run
    marks the ledger only when a close is not the very ``Decimal`` it marked last."""
    coarse = {
        symbol: [on_grid(c, Decimal(1)) for c in candles] for symbol, candles in series.items()
    }
    paths = [write_klines(tmp_path, candles) for candles in coarse.values()]
    closes = [c.close for candles in coarse.values() for c in candles]
    assert sum(a == b for a, b in pairwise(closes)) > len(closes) // 2
    spec = evaluation_policy(SYMBOLS)
    live = run_backtest(csv_series(paths), model, spec, label_horizon=HORIZON)
    bars = {
        path.name.split("-")[0]: csv_bars(
            path, symbol=path.name.split("-")[0], interval="1m", chunk_rows=111
        )
        for path in paths
    }
    fast, signals, fills = streamed(bars, model, spec)
    assert live.figures.trades > 20
    assert_same_run(live, fast, signals, fills)


def test_streamed_when_run_then_the_garbage_collectors_frozen_objects_are_as_before(
    series: CandleSeries, model: SignalModel
) -> None:
    """The run freezes the objects older than it and thaws them after; objects the process
    froze itself stay frozen."""
    short = {symbol: candles[:80] for symbol, candles in series.items()}
    spec = evaluation_policy(SYMBOLS)
    gc.unfreeze()  # as a process that never froze anything
    run_streamed_backtest({s: candle_bars(c) for s, c in short.items()}, model, spec)
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        run_streamed_backtest({s: candle_bars(c) for s, c in short.items()}, model, spec)
        # Still frozen (a frozen object that dies leaves the count: it only shrinks a little).
        assert gc.get_freeze_count() > frozen // 2
    finally:
        gc.unfreeze()


def on_grid(candle: Candle, step: Decimal) -> Candle:
    """``candle`` with its prices rounded to ``step`` (at least one step): rounding keeps the
    high above and the low below the open and the close."""

    def rounded(price: Decimal) -> Decimal:
        return max(step, (price / step).to_integral_value() * step)

    prices = {name: rounded(getattr(candle, name)) for name in ("open", "high", "low", "close")}
    return candle.model_copy(update=prices)


def test_streamed_when_run_then_reads_the_input_only_a_chunk_or_two_ahead(
    series: CandleSeries, model: SignalModel
) -> None:
    chunk = 50
    pulled = dict.fromkeys(SYMBOLS, 0)
    ahead: list[int] = []

    def counted(symbol: str) -> Iterator[Bars]:
        for bars in candle_bars(series[symbol], chunk_rows=chunk):
            pulled[symbol] += 1
            yield bars

    def on_signal(signal: Signal) -> None:
        index = (signal.candle_open_time_ms - series["BTCUSDT"][0].open_time_ms) // 60_000
        ahead.append(pulled[signal.symbol] - index // chunk)

    run_streamed_backtest(
        {s: counted(s) for s in SYMBOLS}, model, evaluation_policy(SYMBOLS), on_signal=on_signal
    )
    assert len(ahead) == sum(len(c) - 31 for c in series.values())
    assert max(ahead) <= 2  # the chunk being traded and at most the next one


# --- the chunked kline reader -----------------------------------------------------------------


def write_klines(folder: Path, candles: list[Candle], *, header: bool = True) -> Path:
    path = folder / f"{candles[0].symbol}-1m-test.csv"
    rows = [
        f"{c.open_time_ms},{c.open},{c.high},{c.low},{c.close},{c.volume},{c.close_time_ms},"
        f"0,{c.trades},0,0,0\n"
        for c in candles
    ]
    path.write_text((HEADER if header else "") + "".join(rows))
    return path


def all_candles(bars: Iterator[Bars]) -> list[Candle]:
    return [chunk.candle(row) for chunk in bars for row in range(len(chunk))]


def test_csv_bars_when_reading_the_sample_then_same_candles_and_floats_as_the_strict_reader() -> (
    None
):
    path = EXAMPLES / "BTCUSDT-1m-sample.csv"
    strict = list(read_klines(path, symbol="BTCUSDT", interval="1m"))
    chunks = list(csv_bars(path, symbol="BTCUSDT", interval="1m", chunk_rows=128))
    assert [c for chunk in chunks for c in all_candles(iter([chunk]))] == strict
    closes = [float(x) for chunk in chunks for x in chunk.close]
    assert closes == [float(c.close) for c in strict]
    exact = [chunk.close_decimal(row) for chunk in chunks for row in range(len(chunk))]
    assert exact == [c.close for c in strict]


def test_csv_bars_when_a_first_chunk_size_given_then_chunks_grow_from_it_to_the_chunk_size(
    series: CandleSeries, tmp_path: Path
) -> None:
    path = write_klines(tmp_path, series["BTCUSDT"])  # 700 rows after the header
    chunks = list(
        csv_bars(path, symbol="BTCUSDT", interval="1m", chunk_rows=200, first_chunk_rows=25)
    )
    # The header is a line of the first chunk.
    assert [len(chunk) for chunk in chunks] == [24, 50, 100, 200, 200, 126]
    strict = list(read_klines(path, symbol="BTCUSDT", interval="1m"))
    assert [c for chunk in chunks for c in all_candles(iter([chunk]))] == strict


def test_csv_bars_when_a_row_needs_the_strict_reader_then_it_takes_over_with_its_verdict(
    series: CandleSeries, tmp_path: Path
) -> None:
    candles = series["BTCUSDT"][:300]
    path = write_klines(tmp_path, candles, header=False)
    lines = path.read_text().splitlines(keepends=True)
    # An exponent: valid for the strict reader (Decimal), a doubt for the fast one.
    lines[200] = lines[200].replace(",0,", ",0E+0,", 1)
    path.write_text("".join(lines))
    assert all_candles(csv_bars(path, symbol="BTCUSDT", interval="1m", chunk_rows=64)) == list(
        read_klines(path, symbol="BTCUSDT", interval="1m")
    )


def test_csv_bars_when_a_cell_moved_to_the_row_before_then_the_strict_readers_verdict(
    series: CandleSeries, tmp_path: Path
) -> None:
    """The next row's open time moved to the end of the row before: the chunk's cells, read
    in order, are the right ones, but two rows do not have 12. The fast reader counts each
    row's cells, so the strict reader refuses the file, as it would alone."""
    candles = series["BTCUSDT"][:100]
    path = write_klines(tmp_path, candles, header=False)
    lines = path.read_text().splitlines(keepends=True)
    open_time, rest = lines[41].split(",", 1)
    lines[40] = f"{lines[40].rstrip()},{open_time}\n"
    lines[41] = rest
    path.write_text("".join(lines))
    with pytest.raises(KlineFormatError) as strict:
        list(read_klines(path, symbol="BTCUSDT", interval="1m"))
    with pytest.raises(KlineFormatError) as fast:
        all_candles(csv_bars(path, symbol="BTCUSDT", interval="1m", chunk_rows=64))
    assert str(fast.value) == str(strict.value)


def test_csv_bars_when_a_price_reads_as_the_bound_in_float_then_the_strict_reader_refuses_it(
    series: CandleSeries, tmp_path: Path
) -> None:
    """Just above MAX_PRICE as a Decimal, exactly MAX_PRICE as a float: not passed as checked
    (its candle is built unvalidated), the strict reader refuses it."""
    candles = series["BTCUSDT"][:100]
    path = write_klines(tmp_path, candles, header=False)
    lines = path.read_text().splitlines(keepends=True)
    cells = lines[50].split(",")
    cells[1:5] = ["1000000000000.0000001"] * 4
    lines[50] = ",".join(cells)
    path.write_text("".join(lines))
    with pytest.raises(KlineFormatError):
        list(read_klines(path, symbol="BTCUSDT", interval="1m"))
    with pytest.raises(KlineFormatError):
        all_candles(csv_bars(path, symbol="BTCUSDT", interval="1m", chunk_rows=64))
