"""The inference role: candles in, signals out, from an ONNX ensemble served by onnxruntime.

It keeps a rolling feature window per symbol (``signals.SignalMaker``, the code the backtest
runs too) and emits one signal per closed candle once the window is full. The signal's id is the
model version, symbol and candle time, so a redelivered candle produces the same signal id and
JetStream drops the repeat.

Batching across symbols: the consumer hands over every candle of a fetch at once
(``Bus.consume_groups``), and the candles of one close time go through the model in one call
(``signals.CandleBatcher``). The signals made from one candle pack (a step of every symbol) are
published as one signal pack, the signal of a lone candle alone: the grouping follows what the
stream stores, so a candle pack delivered again makes the very same signal pack and the stream
drops it as a repeat. Candles are acknowledged only after the signals of every candle in the
fetch are published, so a crash loses no signal: the candles come again. At start, before
consuming, each symbol's window is warmed with the last ``WINDOW`` candles the consumer had
acknowledged, read back from the MARKET stream, and the candles a dead worker had in flight are
read and handled first (``warmup``), so every candle after the ack floor makes the very signal
an uninterrupted run makes (the same window, so the same features bit for bit): a restart does
not leave the first ``WINDOW - 1`` candles of a symbol without one.

Without a loadable model the role does not consume candles at all (they stay in the stream for
when a model is there) and ``/health`` says CRITICAL with the loader's error: no signal is ever
made up. A model served from a version 1 card (single model, no calibration or backtest
figures) is DEGRADED; so is a card created in the future (the model's age is then unknown and
not exported).

Metrics: per-member run time (``qtrader_model_inference_seconds{model}``), batch sizes, the
members' agreement (a counter of unanimous and split rows and the share over the last 1000
rows), the confidence of emitted signals, the model version (info) and its age since the card's
``created_at``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

from qtrader.bus.errors import BusUnavailable
from qtrader.contracts import subjects
from qtrader.contracts.messages import Candle, Pack, Signal
from qtrader.health.contract import DependencyHealth, Status
from qtrader.inference.features import WINDOW
from qtrader.inference.onnx_model import ModelLoadError, SignalModel, default_model_path
from qtrader.inference.signals import CandleBatcher, SignalBatch, SignalMaker
from qtrader.inference.warmup import Warmup, read_in_flight, read_warmup
from qtrader.runtime import Task, WorkerContext

log = logging.getLogger(__name__)

SIGNALS = Counter("qtrader_signals_emitted_total", "Signals published.", ["direction"])
INFERENCE_SECONDS = Histogram(
    "qtrader_inference_duration_seconds",
    "Time to compute features and run the ensemble for the batch a candle was in, per candle.",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
)
MODEL_SECONDS = Histogram(
    "qtrader_model_inference_seconds",
    "One ensemble member's onnxruntime run over one batch, by member.",
    ["model"],
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05),
)
BATCH_SIZE = Histogram(
    "qtrader_inference_batch_size",
    "Candles (one per symbol) that went through the model in one call.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
PREDICTIONS = Counter(
    "qtrader_model_predictions_total",
    "Predicted rows, by whether every ensemble member chose the same direction.",
    ["agreement"],
)
AGREEMENT = Gauge(
    "qtrader_model_agreement_ratio",
    "Share of the last 1000 predicted rows on which every ensemble member chose the same "
    "direction.",
    ["version"],
)
CONFIDENCE = Histogram(
    "qtrader_signal_confidence",
    "Confidence of emitted signals.",
    buckets=(0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.8, 0.9, 1.0),
)
MODEL_INFO = Gauge("qtrader_model_info", "The model in service (value 1).", ["version"])
MODEL_AGE = Gauge(
    "qtrader_model_age_seconds", "Seconds since the served model's card was created.", ["version"]
)

_AGREEMENT_WINDOW = 1000
# A card this far in the future is not clock skew: its age cannot be told.
_CLOCK_SKEW = timedelta(minutes=5)


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
        self._maker = SignalMaker()
        self._batcher = CandleBatcher()
        self._unpublished: list[tuple[str, Signal | Pack[Signal]]] = []
        self._publishing = asyncio.Lock()
        self._agreement: deque[bool] = deque(maxlen=_AGREEMENT_WINDOW)
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
        _export_model(self._model)
        log.info("serving model %s from %s", self._model.version, self._model.path)
        await self._warm(policy.spec.symbols)
        await self._context.bus.consume_groups(
            subjects.INFERENCE_CANDLES,
            Candle,
            self._on_candles,
            after_connection_loss=self._catch_up,
        )

    async def _warm(self, symbols: tuple[str, ...]) -> None:
        """Fill the windows with what the consumer acknowledged before this start, then make
        the signals of the candles a dead worker had in flight (``warmup``)."""
        warmup = await self._read_warmup(symbols)
        for candle in warmup.window:
            self._maker.accept(candle)  # their signals were published before the restart
        if warmup.window or warmup.in_flight:
            log.info(
                "feature windows warmed with %d stored candles; %d were in flight",
                len(warmup.window),
                sum(map(len, warmup.in_flight)),
            )
        made = False
        while True:
            try:
                # Once made, the signals wait in _unpublished: only their publishing is retried.
                await (self._emit([]) if made else self._on_candles(warmup.in_flight))
                return
            except BusUnavailable as exc:
                made = True
                log.warning("signals of the candles in flight not published yet: %s", exc)
                await asyncio.sleep(0.5)

    async def _catch_up(self) -> None:
        """After a lost connection: the candles handed out as it went never arrived, and come
        again only after newer ones; handle them first (the ones already handled are old to
        the windows and make nothing)."""
        in_flight = await read_in_flight(self._context.bus, subjects.INFERENCE_CANDLES)
        log.info("after a lost connection: %d candles were in flight", sum(map(len, in_flight)))
        await self._on_candles(in_flight)

    async def _read_warmup(self, symbols: tuple[str, ...]) -> Warmup:
        while True:
            try:
                return await read_warmup(
                    self._context.bus, subjects.INFERENCE_CANDLES, symbols, window=WINDOW
                )
            except BusUnavailable as exc:
                log.warning("cannot read the candles to warm the windows yet: %s", exc)
                await asyncio.sleep(0.5)

    async def _on_candles(self, groups: list[list[Candle]]) -> None:
        """The signals of every candle fetched together (each group what one stored message
        carried), one model call per close time, published grouped as the candles were."""
        signals: list[Signal] = []
        for candle in (candle for group in groups for candle in group):
            # The pending batch of an older close time is predicted before this candle moves
            # its symbol's window.
            signals += self._make(self._batcher.complete_before(candle))
            if self._maker.accept(candle):
                signals += self._make(self._batcher.add(candle))
        signals += self._make(self._batcher.due())  # the rest of this fetch, not a later one
        await self._emit(_grouped_as_candles(groups, signals))

    def _make(self, candles: Sequence[Candle]) -> list[Signal]:
        """The batch's signals, made now (synchronously: no window moves meanwhile)."""
        model = self._model
        assert model is not None  # the consumer starts only after the model loaded
        if not candles:
            return []
        started = time.perf_counter()
        batch = self._maker.make(candles, model, now_ms=int(time.time() * 1000))
        elapsed = time.perf_counter() - started
        self._observe(batch, elapsed)
        return list(batch.signals)

    def _observe(self, batch: SignalBatch, elapsed_s: float) -> None:
        BATCH_SIZE.observe(len(batch.signals))
        for _ in batch.signals:
            INFERENCE_SECONDS.observe(elapsed_s)
        for name, seconds in batch.prediction.seconds.items():
            MODEL_SECONDS.labels(name).observe(seconds)
        unanimous = batch.prediction.unanimous()
        agreed = int(unanimous.sum())
        PREDICTIONS.labels("unanimous").inc(agreed)
        PREDICTIONS.labels("split").inc(len(unanimous) - agreed)
        self._agreement.extend(bool(u) for u in unanimous)
        assert self._model is not None
        AGREEMENT.labels(self._model.version).set(sum(self._agreement) / len(self._agreement))

    async def _emit(self, outgoing: list[tuple[str, Signal | Pack[Signal]]]) -> None:
        """Publish (earlier failures first), together; what fails stays, in its order, for the
        next call to retry, and what the stream took is never sent again."""
        async with self._publishing:
            self._unpublished.extend(outgoing)
            if not self._unpublished:
                return
            results = await self._context.bus.publish_many(self._unpublished)
            failure: BusUnavailable | None = None
            left: list[tuple[str, Signal | Pack[Signal]]] = []
            for sent, result in zip(self._unpublished, results, strict=True):
                if isinstance(result, BusUnavailable):
                    failure = failure or result
                    left.append(sent)
                    continue
                for signal in sent[1].items if isinstance(sent[1], Pack) else (sent[1],):
                    SIGNALS.labels(signal.direction.value).inc()
                    CONFIDENCE.observe(signal.confidence)
            self._unpublished = left
            if failure is not None:
                raise failure

    async def check(self) -> DependencyHealth:
        return model_health(self._model, self._load_error, now=datetime.now(UTC))


def _grouped_as_candles(
    groups: list[list[Candle]], signals: list[Signal]
) -> list[tuple[str, Signal | Pack[Signal]]]:
    """The signals as they go out: those of one candle group (a stored message) in one pack,
    in the group's order, a lone one alone; groups in stream order. A signal of no group
    (a candle of a fetch whose handling failed after its window took it) goes alone, first."""
    made = {(s.symbol, s.candle_open_time_ms): s for s in signals}
    packed: list[tuple[str, Signal | Pack[Signal]]] = []
    for group in groups:
        found = [made.pop((c.symbol, c.open_time_ms), None) for c in group]
        of_group = [signal for signal in found if signal is not None]
        if len(of_group) == 1:
            packed.append((subjects.signal_subject(of_group[0].symbol), of_group[0]))
        elif of_group:
            packed.append((subjects.SIGNAL_STEP, Pack(tuple(of_group))))
    alone: list[tuple[str, Signal | Pack[Signal]]] = [
        (subjects.signal_subject(s.symbol), s) for s in made.values()
    ]
    return [*alone, *packed]


def model_health(model: SignalModel | None, load_error: str, *, now: datetime) -> DependencyHealth:
    """CRITICAL without a model; DEGRADED when its card cannot back this build's figures (a
    version 1 card) or its age is unknown (created in the future); OK otherwise."""
    if model is None:
        return DependencyHealth(name="model", status=Status.CRITICAL, detail=load_error)
    members = "+".join(model.member_names)
    if model.legacy:
        return DependencyHealth(
            name="model",
            status=Status.DEGRADED,
            detail=f"serving {model.version} from a version 1 card: a single model without "
            "calibration, backtest or per-member figures; retrain with qtrader model train",
        )
    if model.created_at > now + _CLOCK_SKEW:
        return DependencyHealth(
            name="model",
            status=Status.DEGRADED,
            detail=f"serving {model.version}, but its card was created at "
            f"{model.created_at.isoformat()}, in the future: the model's age is unknown",
        )
    return DependencyHealth(
        name="model",
        status=Status.OK,
        detail=f"serving {model.version} ({members}), card of {model.created_at:%Y-%m-%d %H:%M}Z",
    )


def _export_model(model: SignalModel) -> None:
    MODEL_INFO.labels(model.version).set(1)
    created = model.created_at
    if created <= datetime.now(UTC) + _CLOCK_SKEW:
        MODEL_AGE.labels(model.version).set_function(
            lambda: (datetime.now(UTC) - created).total_seconds()
        )


def _resolve(reference: str) -> Path:
    return default_model_path() if reference == "default" else Path(reference)
