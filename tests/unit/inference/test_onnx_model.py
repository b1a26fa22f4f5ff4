"""The runtime model: the shipped default loads and predicts; broken files are refused."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qtrader.contracts.messages import Direction
from qtrader.inference.features import FEATURE_NAMES, WINDOW
from qtrader.inference.onnx_model import (
    CLASSES,
    ModelLoadError,
    SignalModel,
    card_path,
    decide,
    default_model_path,
)


@pytest.fixture(scope="module")
def default_model() -> SignalModel:
    return SignalModel.load(default_model_path())


@pytest.fixture
def model_copy(tmp_path: Path) -> Path:
    """A copy of the default model and its card, free to be broken by the test."""
    target = tmp_path / "model.onnx"
    shutil.copyfile(default_model_path(), target)
    shutil.copyfile(card_path(default_model_path()), card_path(target))
    return target


def rewrite_card(model: Path, **changes: object) -> None:
    card = json.loads(card_path(model).read_text())
    card.update(changes)
    card_path(model).write_text(json.dumps(card))


def test_default_model_when_loaded_then_card_describes_this_build() -> None:
    model = SignalModel.load(default_model_path())
    assert model.card.features == FEATURE_NAMES
    assert model.card.window == WINDOW
    assert model.card.classes == (Direction.SHORT, Direction.FLAT, Direction.LONG)
    assert model.version == model.card.model_version
    assert set(model.card.held_out_metrics) >= {"accuracy", "log_loss"}


def test_default_model_when_inspected_then_it_is_one_small_self_contained_file() -> None:
    path = default_model_path()
    assert path.stat().st_size < 100_000
    assert sorted(p.name for p in path.parent.glob(f"{path.stem}*")) == [
        "default.json",
        "default.onnx",
    ]


@pytest.mark.parametrize("batch_size", [1, 64])
def test_default_model_when_predicting_then_rows_are_probabilities(
    default_model: SignalModel, batch_size: int
) -> None:
    rng = np.random.default_rng(batch_size)
    batch = rng.normal(scale=0.01, size=(batch_size, len(FEATURE_NAMES))).astype(np.float32)
    probabilities = default_model.predict(batch)
    assert probabilities.shape == (batch_size, len(CLASSES))
    assert probabilities.dtype == np.float32
    assert np.all(probabilities >= 0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_predict_when_batch_has_wrong_width_then_raises(default_model: SignalModel) -> None:
    with pytest.raises(ValueError, match="shape"):
        default_model.predict(np.zeros((2, len(FEATURE_NAMES) + 1), dtype=np.float32))


def test_decide_when_long_is_most_probable_then_long_with_its_probability() -> None:
    direction, confidence = decide(np.array([0.2, 0.1, 0.7], dtype=np.float32))
    assert direction is Direction.LONG
    assert confidence == pytest.approx(0.7)


def test_decide_when_float_error_exceeds_one_then_confidence_is_clipped() -> None:
    direction, confidence = decide(np.array([1.0000001, 0.0, 0.0]))
    assert direction is Direction.SHORT
    assert confidence == 1.0


def test_runtime_model_modules_when_imported_then_torch_is_not_loaded() -> None:
    probe = (
        "import sys, qtrader.inference.onnx_model, qtrader.inference.features; "
        "print(sorted(m for m in ('torch', 'onnx', 'qtrader.inference.training') "
        "if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def test_load_when_model_file_missing_then_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot read model"):
        SignalModel.load(tmp_path / "absent.onnx")


def test_load_when_model_file_corrupt_then_model_load_error(model_copy: Path) -> None:
    garbage = b"this is not a protobuf" * 10
    model_copy.write_bytes(garbage)
    rewrite_card(model_copy, onnx_sha256=hashlib.sha256(garbage).hexdigest())
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load"):
        SignalModel.load(model_copy)


def test_load_when_card_missing_then_model_load_error(model_copy: Path) -> None:
    card_path(model_copy).unlink()
    with pytest.raises(ModelLoadError, match="cannot read model card"):
        SignalModel.load(model_copy)


def test_load_when_card_is_not_json_then_model_load_error(model_copy: Path) -> None:
    card_path(model_copy).write_text("{not json")
    with pytest.raises(ModelLoadError, match="invalid model card"):
        SignalModel.load(model_copy)


def test_load_when_card_lacks_a_field_then_model_load_error(model_copy: Path) -> None:
    card = json.loads(card_path(model_copy).read_text())
    del card["seed"]
    card_path(model_copy).write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="invalid model card"):
        SignalModel.load(model_copy)


def test_load_when_card_lists_other_features_then_model_load_error(model_copy: Path) -> None:
    rewrite_card(model_copy, features=[*FEATURE_NAMES[:-1], "raw_close_price"])
    with pytest.raises(ModelLoadError, match="features"):
        SignalModel.load(model_copy)


def test_load_when_card_has_other_window_then_model_load_error(model_copy: Path) -> None:
    rewrite_card(model_copy, window=WINDOW * 2)
    with pytest.raises(ModelLoadError, match="window"):
        SignalModel.load(model_copy)


def test_load_when_card_belongs_to_other_weights_then_model_load_error(model_copy: Path) -> None:
    rewrite_card(model_copy, onnx_sha256="0" * 64)
    with pytest.raises(ModelLoadError, match="sha256"):
        SignalModel.load(model_copy)


@pytest.mark.parametrize(
    ("input_shape", "reason"),
    [(["batch", len(FEATURE_NAMES) - 1], "width"), ([1, len(FEATURE_NAMES)], "dynamic batch")],
)
def test_load_when_graph_input_shape_is_wrong_then_model_load_error(
    model_copy: Path, input_shape: list[str | int], reason: str
) -> None:
    model_copy.write_bytes(softmax_graph(input_shape))
    rewrite_card(model_copy, onnx_sha256=hashlib.sha256(model_copy.read_bytes()).hexdigest())
    with pytest.raises(ModelLoadError, match=reason):
        SignalModel.load(model_copy)


def softmax_graph(input_shape: list[str | int]) -> bytes:
    """A valid ONNX model (Softmax only) whose input has ``input_shape``."""
    onnx = pytest.importorskip("onnx", reason="building a test graph needs the onnx package")
    helper, tensor = onnx.helper, onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["features"], ["probabilities"], axis=-1)],
        "wrong_shape",
        [helper.make_tensor_value_info("features", tensor, input_shape)],
        [helper.make_tensor_value_info("probabilities", tensor, input_shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    serialized: bytes = model.SerializeToString()
    return serialized
