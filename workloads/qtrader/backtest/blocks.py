"""Part 1 of the streamed backtest: the candles of several symbols in blocks aligned in time,
and each block's signals made at once (features over whole arrays, one ensemble call).

Light on purpose (numpy, the features and the model; no execution, no pydantic messages beyond
the candles the reader may build), so that the prediction process (``prediction_process``)
starts quickly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from qtrader.backtest.bars import Bars
from qtrader.backtest.errors import BacktestError
from qtrader.inference.features import WINDOW, ModelInputs, inputs_from_arrays
from qtrader.inference.onnx_model import Predictor, decide_batch

NO_SIGNAL = -1  # a row whose window was not full yet

_Float64s = NDArray[np.float64]

Block = dict[str, Bars]
"""One aligned block: each symbol's candles up to one open time."""


@dataclass(frozen=True, kw_only=True)
class ChunkPredictions:
    """One chunk's signals per symbol: row ``i`` of the symbol's bars made class
    ``choice[i]`` (-1: its window was not full yet) with ``confidence[i]``."""

    choice: Mapping[str, NDArray[np.intp]]
    confidence: Mapping[str, _Float64s]


# --- the chunks of several symbols, aligned in time ------------------------------------------


def aligned_blocks(bars: Mapping[str, Iterable[Bars]]) -> Iterator[Block]:
    """Each symbol's chunks cut so that every block holds all candles up to one open time.

    A block ends at the earliest last open time among the symbols still reading, so a later
    block never holds a candle older than one already handed out. Each symbol holds at most
    about two chunks at once.
    """
    sources = {symbol: iter(chunks) for symbol, chunks in bars.items()}
    held: dict[str, Bars | None] = {symbol: None for symbol in sources}
    interval: str | None = None
    while sources or any(b is not None and len(b) for b in held.values()):
        for symbol in list(sources):
            pending = held[symbol]
            if pending is None or len(pending) == 0:
                chunk = next(sources[symbol], None)
                if chunk is None:
                    del sources[symbol]
                    continue
                interval = _check_chunk(chunk, symbol, interval, after=pending)
                held[symbol] = chunk if pending is None else pending.then(chunk)
        ends = [int(held_bars.open_time_ms[-1]) for s, held_bars in held.items()
                if s in sources and held_bars is not None and len(held_bars)]  # fmt: skip
        cut = min(ends) if ends else None
        block: dict[str, Bars] = {}
        for symbol, pending in held.items():
            if pending is None or len(pending) == 0:
                continue
            stop = (
                len(pending)
                if cut is None
                else int(np.searchsorted(pending.open_time_ms, cut, side="right"))
            )
            if stop:
                block[symbol] = pending.take(0, stop)
                held[symbol] = pending.take(stop, len(pending))
        if block:
            yield block


def _check_chunk(chunk: Bars, symbol: str, interval: str | None, *, after: Bars | None) -> str:
    if chunk.symbol != symbol:
        raise BacktestError(f"a {chunk.symbol} candle is in the {symbol} series")
    if interval is not None and chunk.interval != interval:
        raise BacktestError(f"candles must share one interval, got {[interval, chunk.interval]}")
    opens = chunk.open_time_ms
    previous = None if after is None or len(after) == 0 else int(after.open_time_ms[-1])
    if np.any(np.diff(opens) <= 0) or (previous is not None and int(opens[0]) <= previous):
        raise BacktestError(f"{symbol}: candles must be in ascending open time")
    return chunk.interval


# --- part 1: features and the ensemble, one chunk at a time -----------------------------------


class ChunkFeatures:
    """Per symbol, the last ``WINDOW - 1`` candles carried into the next chunk's windows."""

    def __init__(self, symbols: tuple[str, ...]) -> None:
        self._symbols = symbols
        self._carry: dict[str, tuple[_Float64s, ...]] = {}

    def predict(self, block: Mapping[str, Bars], model: Predictor) -> ChunkPredictions:
        inputs: list[ModelInputs] = []
        missing: dict[str, int] = {}  # rows of the chunk without a full window
        for symbol in self._symbols:
            if symbol not in block:
                continue
            columns = self._columns(symbol, block[symbol])
            rows = inputs_from_arrays(*columns)
            missing[symbol] = len(block[symbol]) - rows.rows
            inputs.append(rows)
        stacked = ModelInputs.stack(inputs)
        if stacked.rows:
            choice, confidence = decide_batch(model.predict(stacked).probabilities)
        else:
            choice, confidence = np.empty(0, np.intp), np.empty(0, np.float64)
        return self._split(block, missing, choice, confidence)

    def _columns(self, symbol: str, bars: Bars) -> tuple[_Float64s, ...]:
        fresh = (bars.open, bars.high, bars.low, bars.close, bars.volume)
        carried = self._carry.get(symbol)
        columns = fresh if carried is None else tuple(
            np.concatenate([old, new]) for old, new in zip(carried, fresh, strict=True)
        )  # fmt: skip
        self._carry[symbol] = tuple(column[-(WINDOW - 1) :].copy() for column in columns)
        return columns

    def _split(
        self,
        block: Mapping[str, Bars],
        missing: Mapping[str, int],
        choice: NDArray[np.intp],
        confidence: _Float64s,
    ) -> ChunkPredictions:
        choices: dict[str, NDArray[np.intp]] = {}
        confidences: dict[str, _Float64s] = {}
        start = 0
        for symbol, skipped in missing.items():
            made = len(block[symbol]) - skipped
            choices[symbol] = np.concatenate(
                [np.full(skipped, NO_SIGNAL, np.intp), choice[start : start + made]]
            )
            confidences[symbol] = np.concatenate(
                [np.zeros(skipped), confidence[start : start + made]]
            )
            start += made
        return ChunkPredictions(choice=choices, confidence=confidences)


def predicted_blocks(
    bars: Mapping[str, Iterable[Bars]], model: Predictor
) -> Iterator[tuple[Block, ChunkPredictions]]:
    """Each aligned block with its signals, made in this process."""
    features = ChunkFeatures(tuple(sorted(bars)))
    for block in aligned_blocks(bars):
        yield block, features.predict(block, model)
