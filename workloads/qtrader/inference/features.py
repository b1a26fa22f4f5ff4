"""Model inputs computed from the last ``WINDOW`` candles of one symbol.

Two views of the same window, one per kind of ensemble member:

* ``features``: ``FEATURE_NAMES``, one summary vector per window (returns over several horizons,
  volatility, trend and volume z-scores, range and body of the last candle, where the close sits)
  for the MLP;
* ``sequence``: ``SEQUENCE_FEATURE_NAMES`` for each of the ``WINDOW`` candles, shape
  ``(WINDOW, n)``, for the temporal convolution, which learns its own summary of the path.

Every number is scale-free (log returns, ratios, z-scores, positions within a range), never a
raw price or volume, so one model serves every symbol whatever its price level or tick size.

Training computes inputs for a whole series at once (``inputs_from_arrays``); the live service
and the backtest push one candle at a time into a ``FeatureWindow``. Both call the same
vectorised ``_window_features`` and ``_window_sequence`` on windows of identical shape, so the
numbers the model sees live are the numbers it was trained on (a test holds the two paths to
agreement). The arithmetic is done in float64 and cast to float32 only at the end, because the
ONNX graphs take float32. This is the only feature code: training, serving and the backtest all
import it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from qtrader.contracts.messages import Candle

WINDOW = 32
RETURN_HORIZONS = (1, 3, 5, 15)

FEATURE_NAMES: tuple[str, ...] = (
    "log_return_1",
    "log_return_3",
    "log_return_5",
    "log_return_15",
    "log_return_window",
    "realized_volatility",
    "trend_zscore",
    "volume_zscore",
    "range_last",
    "body_last",
    "close_position",
    "close_vs_mean",
)

SEQUENCE_FEATURE_NAMES: tuple[str, ...] = (
    "candle_log_return",  # log(close / open) of each candle
    "candle_log_range",  # log(high / low)
    "close_vs_last",  # log(close / the window's last close): the path leading to now
    "volume_zscore",  # the candle's volume against the window's mean and deviation
)

_Float64s = NDArray[np.float64]
_Float32s = NDArray[np.float32]


@dataclass(frozen=True)
class ModelInputs:
    """A batch of model inputs: ``features (n, len(FEATURE_NAMES))`` and
    ``sequence (n, WINDOW, len(SEQUENCE_FEATURE_NAMES))``, both float32, row ``i`` of one
    describing the same window as row ``i`` of the other."""

    features: _Float32s
    sequence: _Float32s

    def __post_init__(self) -> None:
        n = self.features.shape[0]
        if self.features.shape[1:] != (len(FEATURE_NAMES),) or self.sequence.shape[1:] != (
            WINDOW,
            len(SEQUENCE_FEATURE_NAMES),
        ):
            raise ValueError(
                f"inputs must be (n, {len(FEATURE_NAMES)}) and (n, {WINDOW}, "
                f"{len(SEQUENCE_FEATURE_NAMES)}), got {self.features.shape} and "
                f"{self.sequence.shape}"
            )
        if self.sequence.shape[0] != n:
            raise ValueError(f"{n} feature rows but {self.sequence.shape[0]} sequences")

    @property
    def rows(self) -> int:
        return int(self.features.shape[0])

    def take(self, rows: slice | NDArray[np.integer] | NDArray[np.bool_]) -> ModelInputs:
        """The selected rows of both views."""
        return ModelInputs(self.features[rows], self.sequence[rows])

    @staticmethod
    def stack(rows: list[ModelInputs]) -> ModelInputs:
        """One batch from several (e.g. one single-row batch per symbol)."""
        if not rows:
            return empty_inputs()
        return ModelInputs(
            np.concatenate([r.features for r in rows]), np.concatenate([r.sequence for r in rows])
        )


def empty_inputs() -> ModelInputs:
    return ModelInputs(
        np.empty((0, len(FEATURE_NAMES)), dtype=np.float32),
        np.empty((0, WINDOW, len(SEQUENCE_FEATURE_NAMES)), dtype=np.float32),
    )


class WindowNotReadyError(RuntimeError):
    """``features()`` was asked for before the window held ``WINDOW`` candles."""


_OHLCV = 5  # columns of a bar: open, high, low, close, volume


class FeatureWindow:
    """The rolling last ``WINDOW`` candles of one symbol, and their feature vector.

    Keep one per symbol. A candle that is not newer than the last accepted one (a redelivery or
    an out-of-order message) is ignored, so at-least-once delivery cannot skew the window.

    The bars are float64 rows of a mirrored ring: bar ``k`` is written at row ``k % WINDOW`` and
    again ``WINDOW`` rows later, so the window, oldest first, is always one contiguous slice of
    the array, read without copying a Python float (converting each window's 160 floats
    afresh was a seventh of the inference worker's time).
    """

    def __init__(self, symbol: str | None = None) -> None:
        # None: bound to the symbol of the first candle pushed.
        self.symbol = symbol
        self._ring = np.empty((2 * WINDOW, _OHLCV), dtype=np.float64)
        self._pushed = 0
        self._last_open_time_ms: int | None = None

    @property
    def ready(self) -> bool:
        return self._pushed >= WINDOW

    @property
    def last_open_time_ms(self) -> int | None:
        return self._last_open_time_ms

    def push(self, candle: Candle) -> bool:
        """Add ``candle``; return False (and change nothing) if it is not newer than the last."""
        if self.symbol is None:
            self.symbol = candle.symbol
        elif candle.symbol != self.symbol:
            raise ValueError(f"FeatureWindow for {self.symbol} was given a {candle.symbol} candle")
        if self._last_open_time_ms is not None and candle.open_time_ms <= self._last_open_time_ms:
            return False
        bar = (
            float(candle.open),
            float(candle.high),
            float(candle.low),
            float(candle.close),
            float(candle.volume),
        )
        row = self._pushed % WINDOW
        self._ring[row] = bar
        self._ring[row + WINDOW] = bar
        self._pushed += 1
        self._last_open_time_ms = candle.open_time_ms
        return True

    def features(self) -> NDArray[np.float32]:
        """The feature vector, float32 of shape ``(len(FEATURE_NAMES),)``."""
        row: _Float64s = _window_features(*self._columns())[0]
        return row.astype(np.float32)

    def sequence(self) -> NDArray[np.float32]:
        """The per-candle view, float32 of shape ``(WINDOW, len(SEQUENCE_FEATURE_NAMES))``."""
        rows: _Float64s = _window_sequence(*self._columns())[0]
        return rows.astype(np.float32)

    def inputs(self) -> ModelInputs:
        """Both views as a one-row batch."""
        return windows_inputs([self])

    def _columns(self) -> _Float64s:
        """The window as one ``(5, 1, WINDOW)`` array: open, high, low, close and volume, each a
        contiguous ``(1, WINDOW)`` row (the layout of the sliding windows)."""
        return _stacked_columns([self._ready_bars()])

    def _ready_bars(self) -> _Float64s:
        """The window's bars, oldest first: a ``(WINDOW, 5)`` view of the ring."""
        if not self.ready:
            raise WindowNotReadyError(f"{self.symbol}: {self._pushed} of {WINDOW} candles so far")
        oldest = self._pushed % WINDOW
        return self._ring[oldest : oldest + WINDOW]


def windows_inputs(windows: Sequence[FeatureWindow]) -> ModelInputs:
    """Both views of every window, row ``i`` of window ``i``, in one vectorised pass: the rows
    equal what each window's ``inputs()`` alone gives, bit for bit (the same row-wise code)."""
    columns = _stacked_columns([window._ready_bars() for window in windows])
    return ModelInputs(
        _window_features(*columns).astype(np.float32),
        _window_sequence(*columns).astype(np.float32),
    )


def _stacked_columns(bars: Sequence[_Float64s]) -> _Float64s:
    """``m`` windows of ``(WINDOW, 5)`` bars as a contiguous ``(5, m, WINDOW)`` array, one plane
    per column."""
    stacked = np.stack(bars)  # (m, WINDOW, 5)
    return np.ascontiguousarray(stacked.transpose(2, 0, 1))


def features_from_arrays(
    open: ArrayLike,
    high: ArrayLike,
    low: ArrayLike,
    close: ArrayLike,
    volume: ArrayLike,
) -> NDArray[np.float32]:
    """Feature rows for one symbol's series, float32 of shape ``(n - WINDOW + 1, n_features)``.

    Row ``i`` describes the window ending at candle ``i + WINDOW - 1``. A series shorter than
    ``WINDOW`` gives zero rows.
    """
    return inputs_from_arrays(open, high, low, close, volume).features


def inputs_from_arrays(
    open: ArrayLike,
    high: ArrayLike,
    low: ArrayLike,
    close: ArrayLike,
    volume: ArrayLike,
) -> ModelInputs:
    """Both views for one symbol's series: ``n - WINDOW + 1`` rows (zero if shorter).

    Row ``i`` describes the window ending at candle ``i + WINDOW - 1``.
    """
    series = [np.asarray(values, dtype=np.float64) for values in (open, high, low, close, volume)]
    _check_series(series)
    n = series[0].shape[0]
    if n < WINDOW:
        return empty_inputs()
    windows: list[_Float64s] = [np.lib.stride_tricks.sliding_window_view(s, WINDOW) for s in series]
    return ModelInputs(
        _window_features(*windows).astype(np.float32),
        _window_sequence(*windows).astype(np.float32),
    )


def _check_series(series: list[_Float64s]) -> None:
    lengths = {s.shape for s in series}
    if len(lengths) != 1 or series[0].ndim != 1:
        raise ValueError(f"OHLCV must be 1-D arrays of one length, got shapes {sorted(lengths)}")
    if any(np.any(s <= 0) for s in series[:4]):
        raise ValueError("prices must be positive")


def _window_features(
    o: _Float64s, h: _Float64s, low: _Float64s, c: _Float64s, v: _Float64s
) -> _Float64s:
    """Features of ``m`` windows given as ``(m, WINDOW)`` arrays; returns ``(m, n_features)``."""
    log_close = np.log(c)
    last = log_close[:, -1]
    one_candle_returns = np.diff(log_close, axis=-1)
    volatility = one_candle_returns.std(axis=-1)
    window_return = last - log_close[:, 0]
    horizon_returns = [last - log_close[:, -1 - k] for k in RETURN_HORIZONS]
    trend_scale = volatility * math.sqrt(WINDOW - 1)
    last_range = h[:, -1] - low[:, -1]
    window_low, window_high = low.min(axis=-1), h.max(axis=-1)
    columns = [
        *horizon_returns,
        window_return,
        volatility,
        _safe_ratio(window_return, trend_scale, default=0.0),
        _safe_ratio(v[:, -1] - v.mean(axis=-1), v.std(axis=-1), default=0.0),
        last_range / c[:, -1],
        _safe_ratio(c[:, -1] - o[:, -1], last_range, default=0.0),
        _safe_ratio(c[:, -1] - window_low, window_high - window_low, default=0.5),
        last - log_close.mean(axis=-1),
    ]
    return np.stack(columns, axis=-1)


def _window_sequence(
    o: _Float64s, h: _Float64s, low: _Float64s, c: _Float64s, v: _Float64s
) -> _Float64s:
    """Per-candle inputs of ``m`` windows given as ``(m, WINDOW)`` arrays: ``(m, WINDOW, n)``."""
    log_close = np.log(c)
    volume_mean = v.mean(axis=-1, keepdims=True)
    volume_std = v.std(axis=-1, keepdims=True)
    columns = [
        log_close - np.log(o),
        np.log(h) - np.log(low),
        log_close - log_close[:, -1:],
        _safe_ratio(v - volume_mean, np.broadcast_to(volume_std, v.shape), default=0.0),
    ]
    return np.stack(columns, axis=-1)


def _safe_ratio(numerator: _Float64s, denominator: _Float64s, *, default: float) -> _Float64s:
    """``numerator / denominator``, or ``default`` where the denominator is zero (flat window)."""
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, numerator / safe, default)
