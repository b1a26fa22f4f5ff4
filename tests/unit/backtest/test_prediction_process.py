"""The streamed backtest with its reading and predicting in a process of its own: the same run
as in one process, the child's errors raised as its own, and a child that dies or hangs ends the
run with a ``BacktestError`` instead of a wrong result or a wait forever."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path

import pytest

from qtrader.backtest.blocks import Block, ChunkPredictions, predicted_blocks
from qtrader.backtest.data import synthetic_series
from qtrader.backtest.errors import BacktestError
from qtrader.backtest.policy import evaluation_policy
from qtrader.backtest.prediction_process import KlineFiles, PredictionProcess
from qtrader.backtest.streamed import StreamedResult, _handed_over, run_streamed_backtest
from qtrader.contracts.messages import Fill, OrderUpdate, Signal
from qtrader.inference.onnx_model import ModelLoadError, SignalModel, default_model_path
from qtrader.marketdata.csv_replay import KlineFormatError

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
CHILD = "qtrader.backtest.prediction_process"
HEADER = (
    "open_time,open,high,low,close,volume,close_time,quote_volume,count,"
    "taker_buy_volume,taker_buy_quote_volume,ignore\n"
)


@pytest.fixture(scope="module")
def model() -> SignalModel:
    return SignalModel.load(default_model_path())


def write_market(folder: Path, candles: int, symbols: tuple[str, ...] = SYMBOLS) -> KlineFiles:
    files = {}
    for symbol, rows in synthetic_series(symbols=symbols, candles=candles, seed=11).items():
        path = folder / f"{symbol}-1m-test.csv"
        path.write_text(
            HEADER
            + "".join(
                f"{c.open_time_ms},{c.open},{c.high},{c.low},{c.close},{c.volume},"
                f"{c.close_time_ms},0,{c.trades},0,0,0\n"
                for c in rows
            )
        )
        files[symbol] = (path,)
    return KlineFiles(files, "1m", chunk_rows=250)


def children() -> list[int]:
    """This process's prediction children still in the process table (zombies included)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == os.getpid() and CHILD.encode() in cmdline:
            found.append(int(entry.name))
    return found


class Recorded:
    def __init__(self) -> None:
        self.signals: list[Signal] = []
        self.fills: list[Fill] = []
        self.updates: list[OrderUpdate] = []

    def run(
        self, source: KlineFiles, model: SignalModel, *, in_process: bool, **risk: object
    ) -> StreamedResult:
        spec = evaluation_policy(tuple(source.files))
        if risk:
            data = spec.model_dump()
            data["risk"].update(risk)
            spec = type(spec).model_validate(data)
        return run_streamed_backtest(
            source,
            model,
            spec,
            on_signal=self.signals.append,
            on_fill=self.fills.append,
            on_update=self.updates.append,
            prediction_process=in_process,
        )


@pytest.mark.parametrize(
    "risk", [{}, {"max_drawdown_pct": Decimal("0.5")}], ids=["evaluation-policy", "halts"]
)
def test_a_prediction_process_makes_the_same_run_as_one_process(
    risk: dict[str, object], model: SignalModel, tmp_path: Path
) -> None:
    # Long enough that the child takes over from the blocks made here while it starts.
    source = write_market(tmp_path, 12_000)
    alone, beside = Recorded(), Recorded()
    one = alone.run(source, model, in_process=False, **risk)
    two = beside.run(source, model, in_process=True, **risk)
    assert one.figures.trades > 20
    assert (one.figures.halted_at_ms is not None) == bool(risk)
    assert two == one
    assert beside.signals == alone.signals  # direction and confidence bit for bit
    assert beside.updates == alone.updates
    assert beside.fills == alone.fills
    assert children() == []


def flat(frames: Iterable[tuple[Block, ChunkPredictions]]) -> list[tuple[object, ...]]:
    """Every block's candles (times, prices, exact texts) and signals, comparable."""
    return [
        (
            symbol,
            bars.open_time_ms.tolist(),
            bars.close.tolist(),
            [bars.close_decimal(row) for row in range(len(bars))],
            predictions.choice[symbol].tolist(),
            predictions.confidence[symbol].tolist(),  # bit for bit
        )
        for block, predictions in frames
        for symbol, bars in sorted(block.items())
    ]


def test_the_childs_blocks_are_the_blocks_made_here_and_either_can_take_over(
    model: SignalModel, tmp_path: Path
) -> None:
    source = write_market(tmp_path, 3_000)
    with PredictionProcess(source, model.path) as process:
        here = flat(predicted_blocks(process.files.bars(), model))
        assert len(here) > 10 * len(SYMBOLS)
        assert flat(process.blocks()) == here
    with PredictionProcess(source, model.path) as process:
        while not process.ready():
            time.sleep(0.01)
        # The first block is made here, then the child's from the second on.
        handed = flat(_handed_over(predicted_blocks(process.files.bars(), model), process))
    assert handed == here
    assert children() == []


def test_a_bad_row_is_raised_as_the_reader_raises_it_after_the_blocks_before_it(
    model: SignalModel, tmp_path: Path
) -> None:
    source = write_market(tmp_path, 1_500)
    path = source.files["ETHUSDT"][0]
    lines = path.read_text().splitlines(keepends=True)
    lines[1200] = lines[1200].replace(",", ",-", 2).replace(",-", ",", 1)  # a negative open
    path.write_text("".join(lines))
    errors = []
    for in_process in (False, True):
        traded = Recorded()
        with pytest.raises(KlineFormatError) as raised:
            traded.run(source, model, in_process=in_process)
        errors.append((str(raised.value), len(traded.signals)))
    assert errors[1] == errors[0]
    assert "line 1201" in errors[0][0]
    assert errors[0][1] > 1_000  # the candles before it were traded
    assert children() == []


def test_a_model_that_does_not_load_in_the_child_is_raised_as_a_model_error(
    model: SignalModel, tmp_path: Path
) -> None:
    source = write_market(tmp_path, 100)
    with (
        PredictionProcess(source, tmp_path / "absent.json") as process,
        pytest.raises(ModelLoadError, match=r"absent\.json"),
    ):
        next(process.blocks())
    assert children() == []


def test_a_killed_prediction_process_ends_the_run_with_a_backtest_error(
    model: SignalModel, tmp_path: Path
) -> None:
    source = write_market(tmp_path, 30_000, symbols=("BTCUSDT",))
    killed: list[int] = []

    def kill_the_child(update: OrderUpdate) -> None:
        if not killed:
            (pid,) = children()
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    spec = evaluation_policy(("BTCUSDT",))
    with pytest.raises(BacktestError, match=r"ended before the last block \(exit code -9\)"):
        run_streamed_backtest(
            source, model, spec, on_update=kill_the_child, prediction_process=True
        )
    assert killed
    assert children() == []


def test_a_hung_prediction_process_ends_the_read_after_the_stall_time(
    model: SignalModel, tmp_path: Path
) -> None:
    """SIGSTOP: the child is alive and silent. The blocks it had written still come, then
    the wait ends after ``stall_s`` with a ``BacktestError``, and the stopped child is killed."""
    source = write_market(tmp_path, 30_000, symbols=("BTCUSDT",))
    received: list[object] = []
    with PredictionProcess(source, model.path, stall_s=1.0) as process:
        blocks = process.blocks()
        next(blocks)
        (pid,) = children()
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(BacktestError, match=r"sent nothing for 1 s"):
            received.extend(blocks)
        waited = time.monotonic() - started
    assert len(received) < 30_000 // 250 - 1  # it stopped short of the end
    assert 1.0 <= waited < 10
    assert children() == []


def test_a_prediction_process_needs_files_and_a_saved_model(model: SignalModel) -> None:
    with pytest.raises(TypeError, match="kline files and a saved model"):
        run_streamed_backtest({}, model, evaluation_policy(SYMBOLS), prediction_process=True)
