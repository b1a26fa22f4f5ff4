"""Training and evaluation examples: model inputs, labels net of costs, walk-forward folds.

No torch here: the backtest labels its signals with the same ``label_future_returns`` to measure
their hit rate, and the runtime image has no torch.

Labels: the class of the return from a candle's close to the close ``horizon`` candles later,
net of the round-trip cost of trading it (``2 x (fee + slippage)`` of the policy's paper
settings): LONG when a long would have made money after costs, SHORT when a short would have,
FLAT when neither.

Walk-forward split: the time range is cut into a first stretch that is only ever trained on
(``initial_train_fraction``) and ``folds`` equal stretches after it. Fold ``i`` is measured on
the examples decided inside its stretch by models trained on every example whose label was
known before the stretch began: an example's label ends at the close of the candle ``horizon``
candles after it, and that close must come before the fold's first candle opens (an embargo),
so no price of a fold reaches the models measured on it. The shipped models are the last fold's:
trained on everything before it, the last fold is their held-out test.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from qtrader.contracts.messages import Candle, Direction
from qtrader.contracts.policy import PaperExchangeSettings
from qtrader.inference.features import WINDOW, ModelInputs, inputs_from_arrays
from qtrader.inference.onnx_model import CLASSES

LABEL_HORIZON = 5  # candles between the decision and the close the label is judged on

_SHORT, _FLAT, _LONG = (CLASSES.index(d) for d in (Direction.SHORT, Direction.FLAT, Direction.LONG))


def round_trip_cost_bps(paper: PaperExchangeSettings) -> float:
    """What opening and closing a position costs, in basis points of its notional."""
    return float(2 * (paper.fee_bps + paper.slippage_bps))


def label_future_returns(
    close: NDArray[np.float64], *, horizon: int, cost_bps: float
) -> NDArray[np.int64]:
    """Class index (into ``CLASSES``) of each close's return ``horizon`` candles later, net of
    ``cost_bps``: LONG above ``+cost``, SHORT below ``-cost``, FLAT between.

    The last ``horizon`` closes have no future and get no label: the result is ``horizon``
    shorter than ``close``.
    """
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    if cost_bps < 0:
        raise ValueError(f"cost_bps must be >= 0, got {cost_bps}")
    close = np.asarray(close, dtype=np.float64)
    if close.shape[0] <= horizon:
        return np.empty(0, dtype=np.int64)
    future_return = close[horizon:] / close[:-horizon] - 1.0
    cost = cost_bps / 10_000
    labels = np.full(future_return.shape, _FLAT, dtype=np.int64)
    labels[future_return > cost] = _LONG
    labels[future_return < -cost] = _SHORT
    return labels


@dataclass(frozen=True, kw_only=True)
class Examples:
    """Model inputs with their labels; row ``i`` is decided at the close of the candle that
    opened at ``open_time_ms[i]``, and its label is known at ``label_end_ms[i]``."""

    inputs: ModelInputs
    labels: NDArray[np.int64]
    symbols: NDArray[np.str_]
    open_time_ms: NDArray[np.int64]
    label_end_ms: NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, rows: NDArray[np.bool_] | NDArray[np.integer]) -> Examples:
        return Examples(
            inputs=self.inputs.take(rows),
            labels=self.labels[rows],
            symbols=self.symbols[rows],
            open_time_ms=self.open_time_ms[rows],
            label_end_ms=self.label_end_ms[rows],
        )

    @staticmethod
    def concat(parts: Sequence[Examples]) -> Examples:
        return Examples(
            inputs=ModelInputs.stack([p.inputs for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            symbols=np.concatenate([p.symbols for p in parts]),
            open_time_ms=np.concatenate([p.open_time_ms for p in parts]),
            label_end_ms=np.concatenate([p.label_end_ms for p in parts]),
        )


def candle_columns(candles: Sequence[Candle]) -> list[NDArray[np.float64]]:
    """open, high, low, close and volume as float64 arrays."""
    return [
        np.array([float(getattr(c, name)) for c in candles], dtype=np.float64)
        for name in ("open", "high", "low", "close", "volume")
    ]


def symbol_examples(candles: Sequence[Candle], *, horizon: int, cost_bps: float) -> Examples:
    """Every labelled example of one symbol's series (candles in ascending open time)."""
    symbol = candles[0].symbol if candles else ""
    columns = candle_columns(candles)
    inputs = inputs_from_arrays(*columns)
    labels = label_future_returns(columns[3], horizon=horizon, cost_bps=cost_bps)
    # Row i of ``inputs`` ends at candle t = i + WINDOW - 1; its label is labels[t].
    last = np.arange(WINDOW - 1, len(labels), dtype=np.int64)
    open_times = np.array([c.open_time_ms for c in candles], dtype=np.int64)
    close_times = np.array([c.close_time_ms for c in candles], dtype=np.int64)
    return Examples(
        inputs=inputs.take(np.arange(len(last))),
        labels=labels[last],
        symbols=np.full(len(last), symbol),
        open_time_ms=open_times[last],
        label_end_ms=close_times[last + horizon],
    )


def examples_from_candles(
    candles_by_symbol: Mapping[str, Sequence[Candle]], *, horizon: int, cost_bps: float
) -> Examples:
    """Every symbol's labelled examples, one after the other."""
    parts = [
        symbol_examples(candles, horizon=horizon, cost_bps=cost_bps)
        for candles in candles_by_symbol.values()
    ]
    return Examples.concat(parts)


@dataclass(frozen=True)
class Fold:
    """The test stretch ``[test_from_ms, test_to_ms)`` of one walk-forward fold."""

    index: int
    test_from_ms: int
    test_to_ms: int

    def train_rows(self, examples: Examples) -> NDArray[np.bool_]:
        """Examples whose label was known before the fold's first candle opened."""
        rows: NDArray[np.bool_] = examples.label_end_ms < self.test_from_ms
        return rows

    def test_rows(self, examples: Examples) -> NDArray[np.bool_]:
        rows: NDArray[np.bool_] = (examples.open_time_ms >= self.test_from_ms) & (
            examples.open_time_ms < self.test_to_ms
        )
        return rows


def walk_forward_folds(
    *, start_ms: int, end_ms: int, interval_ms: int, folds: int, initial_train_fraction: float
) -> tuple[Fold, ...]:
    """``folds`` consecutive test stretches after the first ``initial_train_fraction`` of
    ``[start_ms, end_ms)``, on candle boundaries; the last one ends at ``end_ms``."""
    if folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds}")
    if not 0 < initial_train_fraction < 1:
        raise ValueError(f"initial_train_fraction must be in (0, 1), got {initial_train_fraction}")
    candles = (end_ms - start_ms) // interval_ms
    first = round(candles * initial_train_fraction)
    per_fold = (candles - first) // folds
    if first < 1 or per_fold < 1:
        raise ValueError(
            f"{candles} candles cannot make {folds} folds after a first "
            f"{initial_train_fraction:.0%} to train on"
        )
    bounds = [start_ms + (first + i * per_fold) * interval_ms for i in range(folds)] + [end_ms]
    return tuple(Fold(i, bounds[i], bounds[i + 1]) for i in range(folds))


def class_shares(labels: NDArray[np.int64]) -> dict[Direction, float]:
    counts = np.bincount(labels, minlength=len(CLASSES))
    total = max(1, int(counts.sum()))
    return {direction: float(counts[i] / total) for i, direction in enumerate(CLASSES)}
