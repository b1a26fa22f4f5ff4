"""Train the signal classifier on synthetic candles and export it to ONNX with its model card.

Only the ``qtrader model train`` command and the tests import this module: it needs torch, which
the runtime images never install. The runtime reads the result through ``onnx_model``.

Choices that are not obvious:

* The split is chronological (first 80 % of time trains, last 20 % is held out) with an embargo:
  a training example whose label looks ``LABEL_HORIZON`` candles ahead into the held-out period
  is dropped, so no held-out price leaks into training.
* Feature standardisation (train-split mean and scale) and the softmax are part of the network,
  so the exported graph maps raw features to probabilities and nothing outside it can drift.
* Training is reproducible: a fixed seed for initialisation and shuffling (without touching the
  caller's global RNG state) and one torch thread, so the same seed gives the same weights and,
  with them, the same ONNX bytes and the same content-derived ``model_version``.
* ``export`` re-loads what it wrote through ``SignalModel.load`` and compares it with torch, so
  a broken export fails the training command instead of a later rollout.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import torch
from numpy.typing import NDArray
from torch import nn

from qtrader.contracts.messages import Candle, Direction
from qtrader.inference.features import FEATURE_NAMES, WINDOW, features_from_arrays
from qtrader.inference.onnx_model import (
    CLASSES,
    ModelCard,
    SignalModel,
    TrainingData,
    card_path,
)
from qtrader.instruments import paper_exchange_info
from qtrader.marketdata.synthetic import INTERVAL_MS, Regime, SyntheticConfig, SyntheticMarket

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT", "BNBUSDT", "ADAUSDT")
INTERVAL = "1m"
LABEL_HORIZON = 5  # candles between the decision and the close the label is judged on
ROUND_TRIP_FEE_BPS = 8.0
HELD_OUT_FRACTION = 0.2
OPSET = 20
HIDDEN_UNITS = 32
BATCH_SIZE = 256
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-4
PARITY_TOLERANCE = 1e-5

_SHORT, _FLAT, _LONG = (CLASSES.index(d) for d in (Direction.SHORT, Direction.FLAT, Direction.LONG))


@dataclass(frozen=True, kw_only=True)
class Examples:
    """Feature rows, their class labels (indices into ``CLASSES``) and their candle times."""

    features: NDArray[np.float32]
    labels: NDArray[np.int64]
    open_time_ms: NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True, kw_only=True)
class Dataset:
    train: Examples
    held_out: Examples
    description: TrainingData


class SignalNet(nn.Module):
    """Standardise, a small MLP, softmax: raw feature rows in, class probabilities out."""

    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, *, mean: NDArray[np.float32], scale: NDArray[np.float32]) -> None:
        super().__init__()
        n_features = mean.shape[0]
        self.register_buffer("mean", torch.from_numpy(mean.copy()))
        self.register_buffer("scale", torch.from_numpy(scale.copy()))
        self.layers = nn.Sequential(
            nn.Linear(n_features, HIDDEN_UNITS),
            nn.ReLU(),
            nn.Linear(HIDDEN_UNITS, HIDDEN_UNITS),
            nn.ReLU(),
            nn.Linear(HIDDEN_UNITS, len(CLASSES)),
        )

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers((features - self.mean) / self.scale)
        return out

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(features), dim=-1)


@dataclass(frozen=True, kw_only=True)
class TrainingResult:
    """A trained network (eval mode) with what the model card needs to describe it."""

    model: SignalNet
    seed: int
    training_data: TrainingData
    held_out: Examples
    held_out_metrics: dict[str, float]


# --- data -------------------------------------------------------------------------------------


def label_future_returns(
    close: NDArray[np.float64], *, horizon: int, fee_bps: float
) -> NDArray[np.int64]:
    """Class of the return from each close to the close ``horizon`` candles later, net of fees.

    LONG above ``+fee``, SHORT below ``-fee``, FLAT between. The last ``horizon`` closes have no
    future and get no label, so the result is ``horizon`` shorter than ``close``.
    """
    future_return = close[horizon:] / close[:-horizon] - 1.0
    fee = fee_bps / 10_000
    labels = np.full(future_return.shape, _FLAT, dtype=np.int64)
    labels[future_return > fee] = _LONG
    labels[future_return < -fee] = _SHORT
    return labels


def build_dataset(
    *, seed: int, candles_per_symbol: int, symbols: tuple[str, ...] = SYMBOLS
) -> Dataset:
    """Synthetic MIXED-regime candles per symbol, as features, labels and a chronological split."""
    if candles_per_symbol < WINDOW + LABEL_HORIZON + 10:
        raise ValueError(f"candles_per_symbol must be at least {WINDOW + LABEL_HORIZON + 10}")
    config = SyntheticConfig(symbols=symbols, seed=seed, regime=Regime.MIXED, interval=INTERVAL)
    series = _candle_series(config, candles_per_symbol)
    split_index = int(candles_per_symbol * (1 - HELD_OUT_FRACTION))
    parts = [_split_symbol(candles, split_index) for candles in series.values()]
    interval_ms = INTERVAL_MS[INTERVAL]
    description = TrainingData(
        source="synthetic",
        regime=config.regime.value,
        symbols=symbols,
        interval=INTERVAL,
        start_ms=config.start_ms,
        end_ms=config.start_ms + candles_per_symbol * interval_ms - 1,
        candles_per_symbol=candles_per_symbol,
        held_out_from_ms=config.start_ms + split_index * interval_ms,
        label_horizon_candles=LABEL_HORIZON,
        round_trip_fee_bps=ROUND_TRIP_FEE_BPS,
    )
    return Dataset(
        train=_concat([train for train, _ in parts]),
        held_out=_concat([held_out for _, held_out in parts]),
        description=description,
    )


def _candle_series(config: SyntheticConfig, candles_per_symbol: int) -> dict[str, list[Candle]]:
    market = SyntheticMarket(config, paper_exchange_info())
    total = candles_per_symbol * len(config.symbols)
    series: dict[str, list[Candle]] = {symbol: [] for symbol in config.symbols}
    for candle in itertools.islice(market.candles(), total):
        series[candle.symbol].append(candle)
    return series


def _split_symbol(candles: list[Candle], split_index: int) -> tuple[Examples, Examples]:
    """Train on rows whose label ends before ``split_index``; hold out rows from it on."""
    columns = [
        np.array([float(getattr(c, name)) for c in candles], dtype=np.float64)
        for name in ("open", "high", "low", "close", "volume")
    ]
    features = features_from_arrays(*columns)
    labels = label_future_returns(columns[3], horizon=LABEL_HORIZON, fee_bps=ROUND_TRIP_FEE_BPS)
    # Row i of ``features`` ends at candle t = i + WINDOW - 1; its label is labels[t].
    last_index = np.arange(WINDOW - 1, len(labels))
    examples = Examples(
        features=features[: len(last_index)],
        labels=labels[last_index],
        open_time_ms=np.array([candles[t].open_time_ms for t in last_index], dtype=np.int64),
    )
    train = _select(examples, last_index + LABEL_HORIZON < split_index)
    held_out = _select(examples, last_index >= split_index)
    return train, held_out


def _select(examples: Examples, mask: NDArray[np.bool_]) -> Examples:
    return Examples(
        features=examples.features[mask],
        labels=examples.labels[mask],
        open_time_ms=examples.open_time_ms[mask],
    )


def _concat(parts: list[Examples]) -> Examples:
    return Examples(
        features=np.concatenate([p.features for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        open_time_ms=np.concatenate([p.open_time_ms for p in parts]),
    )


# --- training ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _reproducible(seed: int) -> Iterator[None]:
    """Seeded torch RNG and one thread, restoring the caller's RNG state and thread count."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def train(
    *,
    seed: int = 7,
    candles_per_symbol: int = 8_000,
    epochs: int = 25,
    symbols: tuple[str, ...] = SYMBOLS,
) -> TrainingResult:
    """Build the dataset, train the network and measure it on the held-out split."""
    dataset = build_dataset(seed=seed, candles_per_symbol=candles_per_symbol, symbols=symbols)
    with _reproducible(seed):
        model = _new_model(dataset.train)
        _fit(model, dataset.train, epochs=epochs, seed=seed)
    model.eval()
    return TrainingResult(
        model=model,
        seed=seed,
        training_data=dataset.description,
        held_out=dataset.held_out,
        held_out_metrics=_metrics(model, train=dataset.train, held_out=dataset.held_out),
    )


def _new_model(train_set: Examples) -> SignalNet:
    mean = train_set.features.mean(axis=0)
    scale = train_set.features.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return SignalNet(mean=mean.astype(np.float32), scale=scale)


def _fit(model: SignalNet, train_set: Examples, *, epochs: int, seed: int) -> None:
    features = torch.from_numpy(train_set.features)
    labels = torch.from_numpy(train_set.labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    loss_fn = nn.CrossEntropyLoss()
    shuffle = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_set), generator=shuffle)
        for start in range(0, len(order), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            optimizer.zero_grad()
            loss = loss_fn(model.logits(features[batch]), labels[batch])
            loss.backward()
            optimizer.step()


def predict_probabilities(model: SignalNet, features: NDArray[np.float32]) -> NDArray[np.float32]:
    """The torch model's class probabilities for ``features`` (the reference for ONNX parity)."""
    with torch.no_grad():
        probabilities: NDArray[np.float32] = model(torch.from_numpy(features)).numpy()
    return probabilities


def _metrics(model: SignalNet, *, train: Examples, held_out: Examples) -> dict[str, float]:
    """Held-out accuracy and log loss, next to the no-skill baselines from train-set priors."""
    probabilities = predict_probabilities(model, held_out.features).astype(np.float64)
    labels = held_out.labels
    priors = np.bincount(train.labels, minlength=len(CLASSES)) / len(train)
    metrics = {
        "accuracy": float(np.mean(probabilities.argmax(axis=1) == labels)),
        "log_loss": _log_loss(probabilities, labels),
        "majority_class_accuracy": float(np.mean(labels == int(priors.argmax()))),
        "prior_log_loss": _log_loss(np.tile(priors, (len(labels), 1)), labels),
        "train_examples": float(len(train)),
        "held_out_examples": float(len(held_out)),
    }
    for index, direction in enumerate(CLASSES):
        metrics[f"held_out_share_{direction.value.lower()}"] = float(np.mean(labels == index))
    return metrics


def _log_loss(probabilities: NDArray[np.float64], labels: NDArray[np.int64]) -> float:
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0))))


# --- export -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's known chatter (missing torchvision ops, a pytree deprecation)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r".*treespec, LeafSpec.*", category=FutureWarning
            )
            yield
    finally:
        logger.setLevel(level)


def export(result: TrainingResult, *, output: Path) -> ModelCard:
    """Write ``output`` (self-contained ONNX) and its card beside it; return the card."""
    output.parent.mkdir(parents=True, exist_ok=True)
    example = torch.from_numpy(result.held_out.features[:2])
    with _reproducible(result.seed), _quiet_exporter():
        torch.onnx.export(
            result.model,
            (example,),
            output,
            dynamo=True,
            opset_version=OPSET,
            input_names=["features"],
            output_names=["probabilities"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=False,
            verbose=False,
        )
    card = _card(result, output)
    card_path(output).write_text(card.model_dump_json(indent=2) + "\n")
    _verify(result, output)
    return card


def _card(result: TrainingResult, output: Path) -> ModelCard:
    data = output.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    return ModelCard(
        model_version=f"mlp-s{result.seed}-{digest[:12]}",
        created_at=datetime.now(UTC),
        onnx_sha256=digest,
        opset=_default_opset(onnx.load_from_string(data)),
        features=FEATURE_NAMES,
        window=WINDOW,
        classes=CLASSES,
        training_data=result.training_data,
        held_out_metrics=result.held_out_metrics,
        seed=result.seed,
    )


def _default_opset(model: onnx.ModelProto) -> int:
    versions = [entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")]
    if len(versions) != 1:
        raise RuntimeError(f"exported model has no single default-domain opset: {versions}")
    return int(versions[0])


def _verify(result: TrainingResult, output: Path) -> None:
    """Load the export as the service would and compare it with torch for batch 1 and 64."""
    model = SignalModel.load(output)
    for size in (1, 64):
        rows = result.held_out.features[:size]
        difference = np.abs(model.predict(rows) - predict_probabilities(result.model, rows))
        if rows.shape[0] != size or float(difference.max()) > PARITY_TOLERANCE:
            raise RuntimeError(
                f"ONNX export differs from torch by {difference.max()} (batch {size})"
            )


def train_and_export(
    *,
    output: Path,
    seed: int = 7,
    candles_per_symbol: int = 8_000,
    epochs: int = 25,
) -> ModelCard:
    """Train with ``seed`` and write ``output`` plus its card; return the card."""
    result = train(seed=seed, candles_per_symbol=candles_per_symbol, epochs=epochs)
    return export(result, output=output)
