"""Candles in, signals out: the signal-making code the inference service and the backtest share.

``SignalMaker`` keeps one ``FeatureWindow`` per symbol, says which candle should make a signal
(``accept``) and turns a batch of such candles into signals with one model call (``make``).
Nothing here knows about NATS or the wall clock: the caller passes ``now_ms`` (the service the
wall clock, the backtest the candle's close). A signal is stamped (``created_at_ms``) as old as
what it knows: a live candle's signal at the candle's close, if that is earlier than ``now_ms``,
so every TTL downstream counts from the market moment, not from when the candle reached the
model. A candle the feed fetched over REST after an outage, one a broker outage held back in an
outbox, or one an inference worker reads after a restart thus makes a signal that is already
old, and execution's signal TTL refuses it (``SIGNAL_EXPIRED``, counted and said) instead of
trading minutes-old prices as fresh. Other sources' times are simulated (a synthetic series
starts in 2023, a replay is history): their signals are stamped ``now_ms``.

``CandleBatcher`` decides when a batch is complete: candles of several symbols for one open time
arrive one after the other, and the batch goes to the model when every symbol of the previous
batch has delivered this open time, when a candle of a newer open time arrives, or when the
caller has nothing more to give it (``due``: the inference service calls it at the end of each
fetch, the candles that arrived together).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from qtrader.contracts.messages import Candle, CandleSource, Signal
from qtrader.inference.features import FeatureWindow, windows_inputs
from qtrader.inference.onnx_model import CLASSES, Prediction, Predictor, decide_batch


class CandleKey(Protocol):
    """What names a candle: its symbol and open time (a ``Candle`` has both)."""

    @property
    def symbol(self) -> str: ...

    @property
    def open_time_ms(self) -> int: ...


def signal_id(model_version: str, candle: CandleKey) -> str:
    """Model version, symbol and candle time: a redelivered candle gives the same id, so
    JetStream drops the repeat."""
    return f"{model_version}:{candle.symbol}:{candle.open_time_ms}"


@dataclass(frozen=True)
class SignalBatch:
    """The signals of one batch (in the order of its candles) and the prediction behind them."""

    signals: tuple[Signal, ...]
    prediction: Prediction


class SignalMaker:
    """Rolling windows per symbol and the one decision rule that turns probabilities into
    signals."""

    def __init__(self) -> None:
        self._windows: dict[str, FeatureWindow] = {}

    def accept(self, candle: Candle) -> bool:
        """Push ``candle``; True when it should make a signal now.

        A new candle makes one once its symbol's window is full. A redelivery of the newest
        candle (its signal's publish may have failed) makes the same signal again; an older
        candle has nothing left to say and is ignored. A warm-up candle (``CandleSource.WARMUP``)
        fills the window and makes none: it is history the feed fetched to fill windows, not
        news to trade on.
        """
        window = self._windows.get(candle.symbol)
        if window is None:
            window = self._windows[candle.symbol] = FeatureWindow(candle.symbol)
        accepted = window.push(candle)
        if not accepted and window.last_open_time_ms != candle.open_time_ms:
            return False
        return window.ready and candle.source is not CandleSource.WARMUP

    def make(self, candles: Sequence[Candle], model: Predictor, *, now_ms: int) -> SignalBatch:
        """One signal per candle, from one model call over all of them.

        Each candle must be the newest accepted one of its symbol (what ``accept`` said True
        for), at most one per symbol: the row comes from the symbol's window as it is now.
        """
        symbols = [candle.symbol for candle in candles]
        if len(set(symbols)) != len(symbols):
            raise ValueError(f"one candle per symbol in a batch, got {symbols}")
        windows = []
        for candle in candles:
            window = self._windows.get(candle.symbol)
            if window is None or window.last_open_time_ms != candle.open_time_ms:
                raise ValueError(
                    f"{candle.symbol} {candle.open_time_ms} is not the newest candle of its window"
                )
            windows.append(window)
        prediction = model.predict(windows_inputs(windows))
        indices, confidences = decide_batch(prediction.probabilities)
        signals = tuple(
            Signal(
                signal_id=signal_id(model.version, candle),
                symbol=candle.symbol,
                direction=CLASSES[int(index)],
                confidence=float(confidence),
                model_version=model.version,
                candle_open_time_ms=candle.open_time_ms,
                price=candle.close,
                created_at_ms=stamp(candle, now_ms),
            )
            for candle, index, confidence in zip(candles, indices, confidences, strict=True)
        )
        return SignalBatch(signals=signals, prediction=prediction)


def stamp(candle: Candle, now_ms: int) -> int:
    """The ``created_at_ms`` of ``candle``'s signal made at ``now_ms`` (module docstring): a live
    candle's close (``close_time_ms`` is its last millisecond), or ``now_ms`` if earlier (a
    venue clock ahead of ours must not make a signal from the future)."""
    if candle.source is CandleSource.LIVE:
        return min(now_ms, candle.close_time_ms + 1)
    return now_ms


class CandleBatcher:
    """Groups accepted candles of one open time into batches for the model.

    The symbols expected at an open time are those that delivered the previous open time, so a
    full group goes to the model as soon as its last candle arrives, with no timer.

    Use, per candle: ``complete_before(candle)`` first (a candle of a newer open time completes
    the pending batch, which must be predicted before the candle moves its window), then
    ``SignalMaker.accept``, then ``add`` if accepted.
    """

    def __init__(self, *, max_batch: int = 256) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._max_batch = max_batch
        self._pending: dict[str, Candle] = {}
        self._open_time_ms: int | None = None
        self._seen: set[str] = set()  # symbols of the current open time, flushed or pending
        self._expected: frozenset[str] = frozenset()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def complete_before(self, candle: Candle) -> list[Candle]:
        """The pending batch if ``candle`` belongs to another open time (else nothing)."""
        if candle.open_time_ms == self._open_time_ms:
            return []
        batch = self._take()
        if self._seen:
            self._expected = frozenset(self._seen)
        self._seen = set()
        self._open_time_ms = candle.open_time_ms
        return batch

    def add(self, candle: Candle) -> list[Candle]:
        """Add an accepted ``candle``; return the batch if that completed it (else nothing).

        A second candle of a symbol already pending (a redelivery) replaces the first.
        """
        if candle.open_time_ms != self._open_time_ms:
            raise ValueError("complete_before(candle) must come before add(candle)")
        self._pending[candle.symbol] = candle
        self._seen.add(candle.symbol)
        if self._expected <= self._seen or len(self._pending) >= self._max_batch:
            return self._take()
        return []

    def due(self) -> list[Candle]:
        """Whatever is pending, as a batch (empty if nothing): the caller's timer ran out."""
        return self._take()

    def _take(self) -> list[Candle]:
        batch = list(self._pending.values())
        self._pending = {}
        return batch
