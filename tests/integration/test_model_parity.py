"""Training and export end to end: the ONNX graph the service runs computes what torch trained.

Trains a tiny model (few candles, two epochs) so the whole file runs in seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="training and export need the train extra (torch)")

from qtrader.inference.features import FEATURE_NAMES
from qtrader.inference.onnx_model import ModelLoadError, SignalModel, card_path
from qtrader.inference.training import (
    LABEL_HORIZON,
    TrainingResult,
    build_dataset,
    export,
    predict_probabilities,
    train,
    train_and_export,
)
from qtrader.marketdata.synthetic import INTERVAL_MS

SEED = 3
TINY_CANDLES_PER_SYMBOL = 400
TINY_EPOCHS = 2


def train_and_export_tiny(output: Path, *, seed: int = SEED) -> None:
    train_and_export(
        output=output, seed=seed, candles_per_symbol=TINY_CANDLES_PER_SYMBOL, epochs=TINY_EPOCHS
    )


@pytest.fixture(scope="module")
def trained() -> TrainingResult:
    return train(seed=SEED, candles_per_symbol=TINY_CANDLES_PER_SYMBOL, epochs=TINY_EPOCHS)


@pytest.fixture(scope="module")
def exported(trained: TrainingResult, tmp_path_factory: pytest.TempPathFactory) -> SignalModel:
    output = tmp_path_factory.mktemp("model") / "tiny.onnx"
    export(trained, output=output)
    return SignalModel.load(output)


@pytest.mark.parametrize("batch_size", [1, 64, None])
def test_onnx_model_when_given_held_out_rows_then_matches_torch_within_1e_5(
    trained: TrainingResult, exported: SignalModel, batch_size: int | None
) -> None:
    rows = trained.held_out.features[:batch_size]
    onnx_probabilities = exported.predict(rows)
    torch_probabilities = predict_probabilities(trained.model, rows)
    assert onnx_probabilities.shape == (len(rows), 3)
    np.testing.assert_allclose(onnx_probabilities, torch_probabilities, rtol=0, atol=1e-5)


def test_export_when_written_then_card_describes_the_training(
    trained: TrainingResult, exported: SignalModel
) -> None:
    card = exported.card
    assert card.seed == SEED
    assert card.opset == 20
    assert card.features == FEATURE_NAMES
    assert card.training_data == trained.training_data
    assert card.held_out_metrics == trained.held_out_metrics
    assert 0.0 <= card.held_out_metrics["accuracy"] <= 1.0
    assert card.held_out_metrics["log_loss"] > 0.0


def test_export_when_written_then_only_the_model_and_its_card_exist(
    exported: SignalModel,
) -> None:
    assert sorted(p.name for p in exported.path.parent.iterdir()) == ["tiny.json", "tiny.onnx"]


def test_train_and_export_when_run_twice_with_one_seed_then_same_model_version(
    tmp_path: Path,
) -> None:
    first, second = tmp_path / "a" / "m.onnx", tmp_path / "b" / "m.onnx"
    train_and_export_tiny(first)
    train_and_export_tiny(second)
    assert SignalModel.load(first).version == SignalModel.load(second).version
    assert first.read_bytes() == second.read_bytes()


def test_exported_model_when_its_card_is_swapped_for_another_seed_then_refused(
    exported: SignalModel, tmp_path: Path
) -> None:
    other = tmp_path / "other.onnx"
    train_and_export_tiny(other, seed=SEED + 1)
    card_path(other).write_text(card_path(exported.path).read_text())
    with pytest.raises(ModelLoadError, match="sha256"):
        SignalModel.load(other)


def test_dataset_when_split_then_no_training_label_reaches_into_held_out_time() -> None:
    dataset = build_dataset(seed=1, candles_per_symbol=300, symbols=("BTCUSDT", "ETHUSDT"))
    held_out_from = dataset.description.held_out_from_ms
    interval_ms = INTERVAL_MS[dataset.description.interval]
    label_end = dataset.train.open_time_ms.max() + LABEL_HORIZON * interval_ms
    assert label_end < held_out_from
    assert dataset.held_out.open_time_ms.min() >= held_out_from
    assert len(dataset.train) > len(dataset.held_out) > 0
