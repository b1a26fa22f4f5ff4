"""``qtrader bench backtest``: the streamed backtest in candles/s, beside what it stands on.

The data is the seeded synthetic market written as Binance kline files (``SYMBOL-1m-*.csv``) in a
temporary folder, so every run reads files, as ``qtrader backtest --csv`` does; writing them is
not timed. Rows, each measured in the same run with interleaved repeats (median):

* **streamed**: ``run_streamed_backtest`` on the files with the shipped model under the card's
  evaluation policy, as ``qtrader backtest --csv`` runs it: every candle's features, both
  ensemble members on every candle (made by a prediction process beside the trading when the
  machine has a second core), and every signal through the execution worker's own core (intake,
  decisions, the order driver's attempts and retries on the paper exchange) and the exact
  ledger; also its CPU seconds, both processes together;
* **streamed, one process**: the same run with the reading and predicting in the trading
  process (``--one-process``);
* **floor**: the vectorised part alone: reading the files, the features and one ensemble call
  per chunk, with no trading: what the streamed run cannot go below;
* **per-candle**: ``run_backtest`` (the live path in a loop) on the first ``per_candle`` candles
  of each symbol, the way ``qtrader backtest`` ran before the streamed engine;
* **backtrader**, when it is installed (it is no dependency): its Cerebro engine on the same
  files with a two-moving-average strategy that trades, as a reference for a Python
  event-driven backtester.

Then the growth, both ways: wall time and candles/s for 10k, 50k and 200k candles of one
symbol, and for 1, 4 and 16 symbols of 10k candles; and the peak resident memory of a fresh
process running the streamed backtest on 50k and on 200k candles of one symbol (one process;
and with the prediction process, the trading process's and the child's). These runs trade to
the end, without the policy's drawdown halt: a halted stretch costs only marks, which would
hide how the trading grows. The growth in candles repeats each symbol's first 10,000 candles
end to end, so every block of a longer run trades alike. The last line is one JSON object.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from qtrader.backtest.bars import csv_bars
from qtrader.backtest.blocks import ChunkFeatures, aligned_blocks
from qtrader.backtest.data import synthetic_series
from qtrader.backtest.engine import run_backtest
from qtrader.backtest.policy import policy_for
from qtrader.backtest.prediction_process import KlineFiles
from qtrader.backtest.streamed import run_streamed_backtest
from qtrader.contracts.messages import Candle, replaced
from qtrader.contracts.policy import TradingPolicySpec
from qtrader.inference.card import ModelCard
from qtrader.inference.onnx_model import SignalModel, default_model_path
from qtrader.instruments import paper_exchange_info
from qtrader_tools.benchmarks.harness import publish

SEED = 7
# The growth in candles repeats the first 10,000 of each symbol: the seeded market beyond about
# 50,000 candles of one symbol makes only signals below minConfidence (8,878 orders in 50k and
# in 200k), so a longer run would be cheaper per candle for its data, not its engine.
GROWTH_BLOCK = 10_000
_HEADER = (
    "open_time,open,high,low,close,volume,close_time,quote_volume,count,"
    "taker_buy_volume,taker_buy_quote_volume,ignore\n"
)


def write_market(
    folder: Path, *, symbols: Sequence[str], candles: int, block: int | None = None
) -> list[Path]:
    """``candles`` synthetic candles per symbol as kline files in ``folder``; with ``block``,
    its first ``block`` candles repeated end to end (times running on), so every block trades
    alike."""
    folder.mkdir(parents=True, exist_ok=True)
    made = candles if block is None else min(block, candles)
    series = synthetic_series(symbols=symbols, candles=made, seed=SEED)
    paths = []
    for symbol, first in series.items():
        rows = first if block is None else _repeated(first, candles)
        path = folder / f"{symbol}-1m-bench.csv"
        with path.open("w") as out:
            out.write(_HEADER)
            out.writelines(
                f"{c.open_time_ms},{c.open},{c.high},{c.low},{c.close},{c.volume},"
                f"{c.close_time_ms},0,{c.trades},0,0,0\n"
                for c in rows
            )
        paths.append(path)
    return paths


def _repeated(block: Sequence[Candle], candles: int) -> list[Candle]:
    """``block`` again and again to ``candles`` candles, each copy later by the block's span."""
    span_ms = block[-1].close_time_ms + 1 - block[0].open_time_ms
    return [
        replaced(
            block[i % len(block)],
            open_time_ms=block[i % len(block)].open_time_ms + (i // len(block)) * span_ms,
            close_time_ms=block[i % len(block)].close_time_ms + (i // len(block)) * span_ms,
        )
        for i in range(candles)
    ]


def _symbol(path: Path) -> str:
    return path.name.split("-")[0]


def _policy(model: SignalModel, symbols: Sequence[str]) -> TradingPolicySpec:
    card = model.card
    assert isinstance(card, ModelCard)  # the shipped model has a current card
    return policy_for(symbols, card.evaluation.policy)


class Timing(NamedTuple):
    seconds: float  # wall
    cpu_s: float  # this process's and its children's, user and system
    candles: int


def streamed_seconds(
    paths: Sequence[Path],
    model: SignalModel,
    *,
    prediction_process: bool = True,
    halt_on_drawdown: bool = True,
) -> Timing:
    """The streamed backtest on ``paths``, timed; with a prediction process if asked and this
    machine has a second core (as ``qtrader backtest --csv`` does); without the drawdown halt
    when asked (every candle then trades to the end)."""
    spec = _policy(model, [_symbol(p) for p in paths])
    files = KlineFiles({_symbol(p): (p,) for p in paths}, "1m")
    beside = prediction_process and len(os.sched_getaffinity(0)) > 1
    cpu, started = _cpu_s(), time.perf_counter()
    result = run_streamed_backtest(
        files, model, spec, prediction_process=beside, halt_on_drawdown=halt_on_drawdown
    )
    seconds = time.perf_counter() - started
    return Timing(seconds, _cpu_s() - cpu, result.figures.steps * len(paths))


def _cpu_s() -> float:
    used = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        used += usage.ru_utime + usage.ru_stime
    return used


def floor_seconds(paths: Sequence[Path], model: SignalModel) -> float:
    """Reading, features and one ensemble call per chunk: no trading."""
    bars = {_symbol(p): csv_bars(p, symbol=_symbol(p), interval="1m") for p in paths}
    features = ChunkFeatures(tuple(sorted(bars)))
    started = time.perf_counter()
    for block in aligned_blocks(bars):
        features.predict(block, model)
    return time.perf_counter() - started


def per_candle_seconds(paths: Sequence[Path], model: SignalModel, candles: int) -> float:
    """``run_backtest`` on the first ``candles`` of each file (reading them not timed)."""
    from qtrader.marketdata.csv_replay import read_klines

    series = {}
    for path in paths:
        reader = read_klines(path, symbol=_symbol(path), interval="1m")
        series[_symbol(path)] = [c for c, _ in zip(reader, range(candles), strict=False)]
    spec = _policy(model, list(series))
    started = time.perf_counter()
    run_backtest(series, model, spec)
    return time.perf_counter() - started


def backtrader_seconds(paths: Sequence[Path]) -> float | None:
    """backtrader's Cerebro over the same files (None when it is not installed)."""
    try:
        import backtrader as bt  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None

    class Crossing(bt.Strategy):  # type: ignore[misc,name-defined,unused-ignore]
        def __init__(self) -> None:
            self.cross = [
                bt.ind.CrossOver(bt.ind.SMA(d, period=5), bt.ind.SMA(d, period=20))
                for d in self.datas
            ]

        def next(self) -> None:
            for data, cross in zip(self.datas, self.cross, strict=True):
                if cross[0] != 0:
                    self.order_target_size(data=data, target=float(cross[0]))

    cerebro = bt.Cerebro(stdstats=False)
    for path in paths:
        cerebro.adddata(
            bt.feeds.GenericCSVData(
                dataname=str(path),
                dtformat=lambda ms: _utc(float(ms)),
                datetime=0,
                open=1,
                high=2,
                low=3,
                close=4,
                volume=5,
                openinterest=-1,
                timeframe=bt.TimeFrame.Minutes,
                headers=True,
            )
        )
    cerebro.addstrategy(Crossing)
    started = time.perf_counter()
    cerebro.run()
    return time.perf_counter() - started


def _utc(ms: float) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).replace(tzinfo=None)


def peak_rss_mb(path: Path, *, prediction_process: bool) -> dict[str, float]:
    """Peak resident memory (MB) of a fresh process running the streamed backtest on
    ``path``; with a prediction process, also the child's."""
    # VmHWM, not getrusage's ru_maxrss, for the process itself: Linux carries ru_maxrss over
    # from the parent across fork and exec, so a child of a large parent reports the parent's
    # peak. The prediction child's is its ru_maxrss (RUSAGE_CHILDREN): at most the larger of
    # its own peak and the fresh process's size when it started it, an upper bound.
    code = (
        "import resource, sys; from pathlib import Path;"
        "from qtrader_tools.benchmarks.backtest import streamed_seconds;"
        "from qtrader.inference.onnx_model import SignalModel, default_model_path;"
        "streamed_seconds([Path(sys.argv[1])], SignalModel.load(default_model_path()),"
        " prediction_process=sys.argv[2] == '1', halt_on_drawdown=False);"
        "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1],"
        " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path), str(int(prediction_process))],
        capture_output=True,
        text=True,
        check=True,
    )
    trading_kb, child_kb = (int(kb) for kb in done.stdout.split()[-2:])
    peak: dict[str, float] = {"trading": round(trading_kb / 1024)}
    if prediction_process:
        peak["prediction child, at most"] = round(child_kb / 1024)
    return peak


def _streamed_median(
    paths: Sequence[Path], model: SignalModel, *, prediction_process: bool, repeats: int = 2
) -> float:
    """Growth and memory runs trade to the end (no drawdown halt): a run halted for part of its
    range costs less per candle there, which would hide how the trading itself grows."""
    return statistics.median(
        streamed_seconds(
            paths, model, prediction_process=prediction_process, halt_on_drawdown=False
        ).seconds
        for _ in range(repeats)
    )


def run(
    *,
    candles: int = 50_000,
    symbols: int = 4,
    repeats: int = 3,
    per_candle: int = 2_000,
    growth: bool = True,
    json_path: Path | None = None,
    out: TextIO = sys.stdout,
) -> int:
    model = SignalModel.load(default_model_path())
    names = list(paper_exchange_info().instruments)[:16]
    figures: dict[str, Any] = {"candles_per_symbol": candles, "symbols": symbols}
    with tempfile.TemporaryDirectory(prefix="qtrader-bench-backtest-") as tmp:
        root = Path(tmp)
        paths = write_market(root / "main", symbols=names[:symbols], candles=candles)
        figures["rows"] = _main_rows(paths, model, repeats=repeats, per_candle=per_candle)
        if growth:
            figures["growth"] = _growth(root, names, model)
            figures["peak_rss_mb"] = _peak_rss(root, names)
    publish(_table(figures), figures, json_path=json_path, out=out)
    return 0


def _main_rows(
    paths: Sequence[Path], model: SignalModel, *, repeats: int, per_candle: int
) -> dict[str, dict[str, float]]:
    """Streamed both ways, floor and per-candle interleaved, each repeat in turn; medians."""
    beside: list[Timing] = []
    alone: list[Timing] = []
    floor: list[float] = []
    slow: list[float] = []
    for _ in range(repeats):
        beside.append(streamed_seconds(paths, model, prediction_process=True))
        alone.append(streamed_seconds(paths, model, prediction_process=False))
        floor.append(floor_seconds(paths, model))
        slow.append(per_candle_seconds(paths, model, per_candle))
    total = beside[0].candles
    rows = {
        "streamed": _timed_row(beside),
        "streamed, one process": _timed_row(alone),
        "floor (read + features + batched inference)": _row(statistics.median(floor), total),
        f"per-candle run_backtest ({per_candle} per symbol)": _row(
            statistics.median(slow), per_candle * len(paths)
        ),
    }
    trader = backtrader_seconds(paths)
    if trader is not None:
        rows["backtrader (SMA crossover)"] = _row(trader, total)
    return rows


def _timed_row(timings: Sequence[Timing]) -> dict[str, float]:
    row = _row(statistics.median(t.seconds for t in timings), timings[0].candles)
    row["cpu_s"] = round(statistics.median(t.cpu_s for t in timings), 3)
    return row


def _row(seconds: float, candles: int) -> dict[str, float]:
    return {"seconds": round(seconds, 3), "candles": candles, "per_s": round(candles / seconds)}


def _growth(root: Path, names: Sequence[str], model: SignalModel) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    for beside, way in ((True, ""), (False, ", one process")):
        for count in (10_000, 50_000, 200_000):
            paths = write_market(
                root / f"c{count}", symbols=names[:1], candles=count, block=GROWTH_BLOCK
            )
            seconds = _streamed_median(paths, model, prediction_process=beside)
            rows[f"1 symbol x {count}{way}"] = _row(seconds, count)
        for width in (1, 4, 16):
            paths = write_market(root / f"s{width}", symbols=names[:width], candles=10_000)
            seconds = _streamed_median(paths, model, prediction_process=beside)
            rows[f"{width} symbols x 10000{way}"] = _row(seconds, width * 10_000)
    return rows


def _peak_rss(root: Path, names: Sequence[str]) -> dict[str, dict[str, float]]:
    peaks = {}
    for count in (50_000, 200_000):
        (path,) = write_market(
            root / f"rss{count}", symbols=names[:1], candles=count, block=GROWTH_BLOCK
        )
        peaks[f"{count}, one process"] = peak_rss_mb(path, prediction_process=False)
        peaks[str(count)] = peak_rss_mb(path, prediction_process=True)
    return peaks


def _table(figures: dict[str, Any]) -> str:
    lines = [
        f"qtrader bench backtest: {figures['symbols']} symbols x "
        f"{figures['candles_per_symbol']} 1m candles from kline files (medians)",
        f"  {'':<52}{'seconds':>9}{'candles/s':>12}",
    ]
    sections = [figures["rows"], figures.get("growth", {})]
    for section in sections:
        for label, row in section.items():
            cpu = f"  (CPU {row['cpu_s']:.3f} s)" if "cpu_s" in row else ""
            lines.append(f"  {label:<52}{row['seconds']:>9.3f}{row['per_s']:>12,.0f}{cpu}")
        lines.append("")
    for run, peaks in figures.get("peak_rss_mb", {}).items():
        said = ", ".join(f"{who} {mb:.0f} MB" for who, mb in peaks.items())
        lines.append(f"  peak RSS, 1 symbol x {run}: {said}")
    return "\n".join(lines).rstrip()
