"""The runtime model: the shipped ensemble loads and predicts; anything the card cannot back is
refused at load with a message saying what and where."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qtrader.contracts.messages import Direction
from qtrader.inference.card import ModelCard, card_path, read_card
from qtrader.inference.features import FEATURE_NAMES, SEQUENCE_FEATURE_NAMES, WINDOW, ModelInputs
from qtrader.inference.onnx_model import (
    CLASSES,
    ModelLoadError,
    SignalModel,
    combine,
    decide,
    decide_batch,
    default_model_path,
)


@pytest.fixture(scope="module")
def default_model() -> SignalModel:
    return SignalModel.load(default_model_path())


def rewrite_card(card: Path, **changes: object) -> None:
    document = json.loads(card.read_text())
    document.update(changes)
    card.write_text(json.dumps(document))


def rewrite_member(card: Path, name: str, **changes: object) -> None:
    document = json.loads(card.read_text())
    for member in document["members"]:
        if member["name"] == name:
            member.update(changes)
    card.write_text(json.dumps(document))


def member_file(card: Path, name: str) -> Path:
    document = json.loads(card.read_text())
    (file,) = [m["file"] for m in document["members"] if m["name"] == name]
    return card.parent / str(file)


def random_inputs(rows: int, seed: int = 0) -> ModelInputs:
    rng = np.random.default_rng(seed)
    return ModelInputs(
        rng.normal(scale=0.01, size=(rows, len(FEATURE_NAMES))).astype(np.float32),
        rng.normal(scale=0.01, size=(rows, WINDOW, len(SEQUENCE_FEATURE_NAMES))).astype(np.float32),
    )


# --- the shipped model ------------------------------------------------------------------------


def test_default_model_when_loaded_then_card_describes_this_build(
    default_model: SignalModel,
) -> None:
    card = default_model.card
    assert isinstance(card, ModelCard)
    assert card.card_version == 2
    assert card.features == FEATURE_NAMES
    assert card.sequence_features == SEQUENCE_FEATURE_NAMES
    assert card.window == WINDOW
    assert card.classes == (Direction.SHORT, Direction.FLAT, Direction.LONG)
    assert default_model.version == card.model_version
    assert default_model.member_names == ("mlp", "tcn")
    assert {m.input for m in card.members} == {"features", "sequence"}
    assert not default_model.legacy


def test_default_model_when_files_hashed_then_they_match_the_card(
    default_model: SignalModel,
) -> None:
    card = default_model.card
    assert isinstance(card, ModelCard)
    directory = default_model_path().parent
    for member in card.members:
        data = (directory / member.file).read_bytes()
        assert hashlib.sha256(data).hexdigest() == member.sha256
        assert len(data) < 100_000  # small, self-contained (no external data files)


def test_default_model_when_packaged_then_only_the_card_and_its_members_exist() -> None:
    path = default_model_path()
    card = read_card(path)
    assert isinstance(card, ModelCard)
    shipped = sorted(p.name for p in path.parent.glob(f"{path.stem}.*"))
    assert shipped == sorted([path.name, *(m.file for m in card.members)])


@pytest.mark.parametrize("rows", [1, 64])
def test_predict_when_given_rows_then_ensemble_is_the_members_mean(
    default_model: SignalModel, rows: int
) -> None:
    prediction = default_model.predict(random_inputs(rows, seed=rows))
    assert prediction.probabilities.shape == (rows, len(CLASSES))
    assert prediction.probabilities.dtype == np.float32
    assert set(prediction.members) == {"mlp", "tcn"}
    for probabilities in (prediction.probabilities, *prediction.members.values()):
        assert np.all(probabilities >= 0)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    mean = (prediction.members["mlp"].astype(np.float64) + prediction.members["tcn"]) / 2
    np.testing.assert_allclose(prediction.probabilities, mean, atol=1e-7)
    assert set(prediction.seconds) == {"mlp", "tcn"}
    assert all(seconds > 0 for seconds in prediction.seconds.values())


def test_predict_when_batched_then_each_row_equals_its_own_prediction(
    default_model: SignalModel,
) -> None:
    inputs = random_inputs(16, seed=3)
    batched = default_model.predict(inputs).probabilities
    single = np.concatenate(
        [default_model.predict(inputs.take(slice(i, i + 1))).probabilities for i in range(16)]
    )
    np.testing.assert_allclose(batched, single, rtol=0, atol=1e-6)


def test_unanimous_when_members_agree_or_not_then_per_row_flag() -> None:
    from qtrader.inference.onnx_model import Prediction

    a = np.array([[0.1, 0.2, 0.7], [0.6, 0.2, 0.2]], dtype=np.float32)
    b = np.array([[0.2, 0.2, 0.6], [0.2, 0.2, 0.6]], dtype=np.float32)
    prediction = Prediction(probabilities=combine([a, b]), members={"a": a, "b": b}, seconds={})
    assert prediction.unanimous().tolist() == [True, False]


def test_inputs_when_shapes_are_wrong_then_raises() -> None:
    with pytest.raises(ValueError, match="inputs must be"):
        ModelInputs(np.zeros((2, 3), np.float32), np.zeros((2, WINDOW, 4), np.float32))
    with pytest.raises(ValueError, match="sequences"):
        ModelInputs(
            np.zeros((2, len(FEATURE_NAMES)), np.float32),
            np.zeros((3, WINDOW, len(SEQUENCE_FEATURE_NAMES)), np.float32),
        )


def test_decide_when_long_is_most_probable_then_long_with_its_probability() -> None:
    direction, confidence = decide(np.array([0.2, 0.1, 0.7], dtype=np.float32))
    assert direction is Direction.LONG
    assert confidence == pytest.approx(0.7)


def test_decide_when_float_error_exceeds_one_then_confidence_is_clipped() -> None:
    direction, confidence = decide(np.array([1.0000001, 0.0, 0.0]))
    assert direction is Direction.SHORT
    assert confidence == 1.0


def test_decide_batch_when_rows_given_then_same_as_decide_per_row() -> None:
    rows = np.array([[0.2, 0.1, 0.7], [0.5, 0.4, 0.1], [0.3, 0.4, 0.3]])
    indices, confidences = decide_batch(rows)
    assert [CLASSES[i] for i in indices] == [decide(r)[0] for r in rows]
    assert confidences.tolist() == [decide(r)[1] for r in rows]


def test_runtime_model_modules_when_imported_then_torch_is_not_loaded() -> None:
    probe = (
        "import sys, qtrader.inference.onnx_model, qtrader.inference.features, "
        "qtrader.inference.service, qtrader.backtest.engine, qtrader.backtest.command; "
        "print(sorted(m for m in ('torch', 'onnx', 'qtrader.training.training') "
        "if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


# --- refusals ---------------------------------------------------------------------------------


def test_load_when_reference_is_the_onnx_stem_then_its_card_is_loaded(model_copy: Path) -> None:
    model = SignalModel.load(model_copy.with_suffix(".onnx"))
    assert model.path == model_copy


def test_load_when_card_missing_then_model_load_error(model_copy: Path) -> None:
    model_copy.unlink()
    with pytest.raises(ModelLoadError, match="cannot read model card"):
        SignalModel.load(model_copy)


def test_load_when_card_is_not_json_then_model_load_error(model_copy: Path) -> None:
    model_copy.write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"invalid model card .*: not JSON"):
        SignalModel.load(model_copy)


def test_load_when_card_lacks_a_field_then_model_load_error(model_copy: Path) -> None:
    document = json.loads(model_copy.read_text())
    del document["evaluation"]
    model_copy.write_text(json.dumps(document))
    with pytest.raises(ModelLoadError, match=r"invalid model card .*: evaluation: Field required"):
        SignalModel.load(model_copy)


def test_load_when_card_version_unknown_then_model_load_error(model_copy: Path) -> None:
    rewrite_card(model_copy, card_version=3)
    with pytest.raises(ModelLoadError, match="card_version 3"):
        SignalModel.load(model_copy)


def test_load_when_member_file_tampered_then_model_load_error(model_copy: Path) -> None:
    file = member_file(model_copy, "tcn")
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"member 'tcn' .* has sha256 .* the model card says"):
        SignalModel.load(model_copy)


def test_load_when_card_has_wrong_sha_then_model_load_error(model_copy: Path) -> None:
    rewrite_member(model_copy, "mlp", sha256="0" * 64)
    with pytest.raises(ModelLoadError, match=r"member 'mlp' .* the model card says 0{64}"):
        SignalModel.load(model_copy)


def test_load_when_member_file_missing_then_model_load_error(model_copy: Path) -> None:
    member_file(model_copy, "mlp").unlink()
    with pytest.raises(ModelLoadError, match="cannot read member 'mlp'"):
        SignalModel.load(model_copy)


def test_load_when_member_names_a_file_outside_its_directory_then_refused(
    model_copy: Path,
) -> None:
    rewrite_member(model_copy, "mlp", file="../default.mlp.onnx")
    with pytest.raises(ModelLoadError, match="invalid model card"):
        SignalModel.load(model_copy)


def test_load_when_member_input_kind_does_not_fit_its_graph_then_refused(
    model_copy: Path,
) -> None:
    # The card says the MLP takes the sequence: the graph's input shape says otherwise.
    rewrite_member(model_copy, "mlp", input="sequence")
    with pytest.raises(ModelLoadError, match=r"input must be float32 \[batch, 32, 4\]"):
        SignalModel.load(model_copy)


def test_load_when_card_lists_other_features_then_model_load_error(model_copy: Path) -> None:
    rewrite_card(model_copy, features=[*FEATURE_NAMES[:-1], "raw_close_price"])
    with pytest.raises(ModelLoadError, match="features"):
        SignalModel.load(model_copy)


def test_load_when_card_has_other_window_then_model_load_error(model_copy: Path) -> None:
    rewrite_card(model_copy, window=WINDOW * 2)
    with pytest.raises(ModelLoadError, match="window"):
        SignalModel.load(model_copy)


def test_load_when_member_file_corrupt_then_model_load_error(model_copy: Path) -> None:
    garbage = b"this is not a protobuf" * 10
    member_file(model_copy, "mlp").write_bytes(garbage)
    rewrite_member(model_copy, "mlp", sha256=hashlib.sha256(garbage).hexdigest())
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load"):
        SignalModel.load(model_copy)


@pytest.mark.parametrize(
    ("input_shape", "reason"),
    [(["batch", len(FEATURE_NAMES) - 1], "input shape"), ([1, len(FEATURE_NAMES)], "dynamic")],
)
def test_load_when_graph_input_shape_is_wrong_then_model_load_error(
    model_copy: Path, input_shape: list[str | int], reason: str
) -> None:
    file = member_file(model_copy, "mlp")
    file.write_bytes(softmax_graph(input_shape))
    rewrite_member(model_copy, "mlp", sha256=hashlib.sha256(file.read_bytes()).hexdigest())
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


# --- a version 1 card -------------------------------------------------------------------------


def test_load_when_card_is_version_1_then_the_single_model_serves_as_legacy(
    legacy_model: Path,
) -> None:
    model = SignalModel.load(legacy_model)
    assert model.legacy
    assert model.version == "mlp-s7-legacy"
    assert model.member_names == ("mlp",)
    prediction = model.predict(random_inputs(4))
    np.testing.assert_array_equal(prediction.probabilities, prediction.members["mlp"])


def test_load_when_version_1_card_has_wrong_sha_then_model_load_error(
    legacy_model: Path,
) -> None:
    rewrite_card(card_path(legacy_model), onnx_sha256="1" * 64)
    with pytest.raises(ModelLoadError, match="sha256"):
        SignalModel.load(legacy_model)
