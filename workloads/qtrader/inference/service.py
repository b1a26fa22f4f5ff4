"""The inference role: candles in, signals out, from an ONNX model served by onnxruntime.

It keeps a rolling feature window per symbol and emits one signal per closed candle once the
window is full. The signal's id is the model version, symbol and candle time, so a redelivered
candle produces the same signal id and JetStream drops the repeat.

Without a loadable model the role does not consume candles at all (they stay in the stream for
when a model is there) and ``/health`` says CRITICAL with the loader's error: no signal is ever
made up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

from qtrader.contracts import subjects
from qtrader.contracts.messages import Candle, Signal
from qtrader.health.contract import DependencyHealth, Status
from qtrader.inference.features import FeatureWindow
from qtrader.inference.onnx_model import ModelLoadError, SignalModel, decide, default_model_path
from qtrader.runtime import Task, WorkerContext

log = logging.getLogger(__name__)

SIGNALS = Counter("qtrader_signals_emitted_total", "Signals published.", ["direction"])
INFERENCE_SECONDS = Histogram(
    "qtrader_inference_duration_seconds",
    "Time to compute features and run the model for one candle.",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
)
CONFIDENCE = Histogram(
    "qtrader_signal_confidence",
    "Confidence of emitted signals.",
    buckets=(0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.8, 0.9, 1.0),
)
MODEL_INFO = Gauge("qtrader_model_info", "The model in service (value 1).", ["version"])


@dataclass(frozen=True, kw_only=True)
class InferenceConfig:
    # None: the policy's model reference decides ("default" is the model shipped in the package).
    model_path: Path | None = None


class Inference:
    def __init__(self, context: WorkerContext, config: InferenceConfig) -> None:
        self._context = context
        self._config = config
        self._model: SignalModel | None = None
        self._load_error = "model not loaded yet"
        self._windows: dict[str, FeatureWindow] = {}
        context.monitor.add_check("model", self.check)

    def tasks(self) -> dict[str, Task]:
        return {"inference": self._serve()}

    async def _serve(self) -> None:
        policy = await self._context.policy.wait()
        path = self._config.model_path or _resolve(policy.spec.model.ref)
        try:
            self._model = await asyncio.to_thread(SignalModel.load, path)
        except ModelLoadError as exc:
            self._load_error = str(exc)
            log.error("no model, no signals: %s", exc)
            await asyncio.Event().wait()
            return
        MODEL_INFO.labels(self._model.version).set(1)
        log.info("serving model %s from %s", self._model.version, path)
        await self._context.bus.consume(subjects.INFERENCE_CANDLES, Candle, self._on_candle)

    async def _on_candle(self, candle: Candle) -> None:
        model = self._model
        assert model is not None  # the consumer starts only after the model loaded
        window = self._windows.setdefault(candle.symbol, FeatureWindow())
        accepted = window.push(candle)
        # A redelivery of the newest candle (its signal's publish failed) computes the same
        # signal again; an older candle has nothing left to say.
        if not accepted and window.last_open_time_ms != candle.open_time_ms:
            return
        if not window.ready:
            return
        started = time.perf_counter()
        probabilities = model.predict(window.features()[None, :])
        direction, confidence = decide(probabilities[0])
        INFERENCE_SECONDS.observe(time.perf_counter() - started)
        signal = Signal(
            signal_id=f"{model.version}:{candle.symbol}:{candle.open_time_ms}",
            symbol=candle.symbol,
            direction=direction,
            confidence=confidence,
            model_version=model.version,
            candle_open_time_ms=candle.open_time_ms,
            price=candle.close,
            created_at_ms=int(time.time() * 1000),
        )
        await self._context.bus.publish(subjects.signal_subject(candle.symbol), signal)
        SIGNALS.labels(direction.value).inc()
        CONFIDENCE.observe(confidence)

    async def check(self) -> DependencyHealth:
        if self._model is None:
            return DependencyHealth(name="model", status=Status.CRITICAL, detail=self._load_error)
        return DependencyHealth(
            name="model", status=Status.OK, detail=f"serving {self._model.version}"
        )


def _resolve(reference: str) -> Path:
    return default_model_path() if reference == "default" else Path(reference)
