"""Model input features computed from the last ``WINDOW`` candles of one symbol.

Every feature is scale-free (log returns, ratios, z-scores, positions within a range), never a
raw price or volume, so one model serves every symbol whatever its price level or tick size.

Training computes features for a whole series at once (``features_from_arrays``); the live
service pushes one candle at a time into a ``FeatureWindow``. Both call the same vectorised
``_window_features`` on windows of identical shape, so the numbers the model sees live are the
numbers it was trained on (a test holds the two paths to agreement). The arithmetic is done in
float64 and cast to float32 only at the end, because the ONNX graph takes float32.
"""

from __future__ import annotations

import math
from collections import deque
from typing import NamedTuple

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

_Float64s = NDArray[np.float64]


class WindowNotReadyError(RuntimeError):
    """``features()`` was asked for before the window held ``WINDOW`` candles."""


class _Bar(NamedTuple):
    open: float
    high: float
    low: float
    close: float
    volume: float


class FeatureWindow:
    """The rolling last ``WINDOW`` candles of one symbol, and their feature vector.

    Keep one per symbol. A candle that is not newer than the last accepted one (a redelivery or
    an out-of-order message) is ignored, so at-least-once delivery cannot skew the window.
    """

    def __init__(self, symbol: str | None = None) -> None:
        # None: bound to the symbol of the first candle pushed.
        self.symbol = symbol
        self._bars: deque[_Bar] = deque(maxlen=WINDOW)
        self._last_open_time_ms: int | None = None

    @property
    def ready(self) -> bool:
        return len(self._bars) == WINDOW

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
        self._bars.append(
            _Bar(
                open=float(candle.open),
                high=float(candle.high),
                low=float(candle.low),
                close=float(candle.close),
                volume=float(candle.volume),
            )
        )
        self._last_open_time_ms = candle.open_time_ms
        return True

    def features(self) -> NDArray[np.float32]:
        """The feature vector, float32 of shape ``(len(FEATURE_NAMES),)``."""
        if not self.ready:
            raise WindowNotReadyError(
                f"{self.symbol}: {len(self._bars)} of {WINDOW} candles so far"
            )
        # One contiguous (1, WINDOW) row per column: the same layout as the sliding windows.
        columns: _Float64s = np.ascontiguousarray(np.asarray(self._bars, dtype=np.float64).T)
        o, h, low, c, v = (columns[i : i + 1] for i in range(len(_Bar._fields)))
        row: _Float64s = _window_features(o, h, low, c, v)[0]
        return row.astype(np.float32)


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
    series = [np.asarray(values, dtype=np.float64) for values in (open, high, low, close, volume)]
    _check_series(series)
    n = series[0].shape[0]
    if n < WINDOW:
        return np.empty((0, len(FEATURE_NAMES)), dtype=np.float32)
    windows: list[_Float64s] = [np.lib.stride_tricks.sliding_window_view(s, WINDOW) for s in series]
    return _window_features(*windows).astype(np.float32)


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


def _safe_ratio(numerator: _Float64s, denominator: _Float64s, *, default: float) -> _Float64s:
    """``numerator / denominator``, or ``default`` where the denominator is zero (flat window)."""
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, numerator / safe, default)
