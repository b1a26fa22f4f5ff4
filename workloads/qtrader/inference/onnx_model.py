"""The signal model at run time: an ONNX graph plus the model card that describes it.

This is the only module that imports onnxruntime; the inference service never imports torch.
``SignalModel.load`` refuses (with ``ModelLoadError``) anything it cannot serve correctly: a
missing or corrupt file, a card that is missing, invalid, written for other weights (its
``onnx_sha256`` differs) or for other features, and a graph whose input or output shape does not
fit. Refusing at load time means a bad model stops a rollout at startup instead of emitting
nonsense signals later.

The session runs on one intra-op thread: the model is tiny, so threads only add scheduling
jitter to the latency and compete with the other workloads on the node.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qtrader.contracts.messages import Direction
from qtrader.inference.features import FEATURE_NAMES, WINDOW

# The order of the model's output columns.
CLASSES: tuple[Direction, ...] = (Direction.SHORT, Direction.FLAT, Direction.LONG)

CARD_VERSION: Literal[1] = 1


class ModelLoadError(Exception):
    """The model file or its card cannot be served; the message says which and why."""


class TrainingData(BaseModel):
    """Where the training examples came from and how they were labelled."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str
    regime: str
    symbols: tuple[str, ...]
    interval: str
    start_ms: int = Field(ge=0)
    end_ms: int = Field(ge=0)
    candles_per_symbol: int = Field(gt=0)
    held_out_from_ms: int = Field(ge=0)  # examples at or after this open time are held out
    label_horizon_candles: int = Field(gt=0)
    round_trip_fee_bps: float = Field(ge=0)


class ModelCard(BaseModel):
    """The JSON written beside the ``.onnx`` file (same stem)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    card_version: Literal[1] = CARD_VERSION
    model_version: Annotated[str, Field(min_length=1, max_length=64)]
    created_at: datetime
    onnx_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    opset: int = Field(gt=0)
    features: tuple[str, ...]
    window: int = Field(gt=0)
    classes: tuple[Direction, ...]
    training_data: TrainingData
    held_out_metrics: dict[str, float]
    seed: int


class SignalModel:
    """A loaded, validated model; ``predict`` maps feature rows to class probabilities."""

    def __init__(self, *, session: ort.InferenceSession, card: ModelCard, path: Path) -> None:
        self._session = session
        self._card = card
        self._path = path
        self._input_name: str = session.get_inputs()[0].name
        self._output_name: str = session.get_outputs()[0].name

    @classmethod
    def load(cls, path: Path) -> SignalModel:
        """Load ``path`` and the card beside it, or raise ``ModelLoadError`` saying why."""
        data = _read_model_bytes(path)
        card = _read_card(card_path(path))
        _check_card(card, data)
        session = _open_session(data, path)
        _check_signature(session, path)
        return cls(session=session, card=card, path=path)

    @property
    def version(self) -> str:
        return self._card.model_version

    @property
    def card(self) -> ModelCard:
        return self._card

    @property
    def path(self) -> Path:
        return self._path

    def predict(self, batch: NDArray[np.floating]) -> NDArray[np.float32]:
        """Probabilities of ``CLASSES`` per row of ``batch``: shape ``(n, 3)``, rows sum to 1."""
        if batch.ndim != 2 or batch.shape[1] != len(FEATURE_NAMES):
            raise ValueError(f"batch must have shape (n, {len(FEATURE_NAMES)}), got {batch.shape}")
        feed = np.ascontiguousarray(batch, dtype=np.float32)
        (probabilities,) = self._session.run([self._output_name], {self._input_name: feed})
        return np.asarray(probabilities, dtype=np.float32)


def decide(probs_row: NDArray[np.floating]) -> tuple[Direction, float]:
    """The most probable direction and its probability, clipped to [0, 1], as the confidence."""
    if probs_row.shape != (len(CLASSES),):
        raise ValueError(f"expected {len(CLASSES)} probabilities, got shape {probs_row.shape}")
    index = int(np.argmax(probs_row))
    # float32 softmax can overshoot 1.0 by an ulp; Signal.confidence must stay within [0, 1].
    confidence = min(max(float(probs_row[index]), 0.0), 1.0)
    return CLASSES[index], confidence


def default_model_path() -> Path:
    """The model shipped in the package (``qtrader/models/default.onnx``).

    The package is installed as plain files (never zipped), so the resource is a real path.
    """
    return Path(str(resources.files("qtrader").joinpath("models/default.onnx")))


def card_path(model_path: Path) -> Path:
    """Where the card of ``model_path`` lives: same directory and stem, ``.json``."""
    return model_path.with_suffix(".json")


def _read_model_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read model {path}: {exc}") from exc


def _read_card(path: Path) -> ModelCard:
    try:
        return ModelCard.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise ModelLoadError(f"cannot read model card {path}: {exc}") from exc
    except ValidationError as exc:
        raise ModelLoadError(f"invalid model card {path}: {exc}") from exc


def _check_card(card: ModelCard, model_bytes: bytes) -> None:
    if card.features != FEATURE_NAMES:
        raise ModelLoadError(
            f"model card features {list(card.features)} differ from this build's "
            f"{list(FEATURE_NAMES)}"
        )
    if card.window != WINDOW:
        raise ModelLoadError(f"model card window {card.window} differs from {WINDOW}")
    if card.classes != CLASSES:
        raise ModelLoadError(f"model card classes {list(card.classes)} differ from {CLASSES}")
    digest = hashlib.sha256(model_bytes).hexdigest()
    if card.onnx_sha256 != digest:
        raise ModelLoadError(
            f"model card is for onnx sha256 {card.onnx_sha256}, the file has {digest}"
        )


def _session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only; load failures surface as ModelLoadError
    return options


def _open_session(model_bytes: bytes, path: Path) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(
            model_bytes, sess_options=_session_options(), providers=["CPUExecutionProvider"]
        )
    # onnxruntime raises pybind11-generated exception types (InvalidProtobuf, Fail, ...) that
    # share no useful base class below Exception.
    except Exception as exc:
        raise ModelLoadError(f"onnxruntime cannot load {path}: {exc}") from exc


def _check_signature(session: ort.InferenceSession, path: Path) -> None:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelLoadError(f"{path}: expected 1 input and 1 output, got {inputs} -> {outputs}")
    _check_tensor(path, "input", inputs[0], width=len(FEATURE_NAMES))
    _check_tensor(path, "output", outputs[0], width=len(CLASSES))


def _check_tensor(path: Path, role: str, arg: ort.NodeArg, *, width: int) -> None:
    shape = list(arg.shape)
    # A dynamic batch axis is reported as a name (or None), never as a fixed int.
    if arg.type != "tensor(float)" or len(shape) != 2 or isinstance(shape[0], int):
        raise ModelLoadError(
            f"{path}: {role} must be float32 [batch, {width}] with a dynamic batch axis, "
            f"got {arg.type} {shape}"
        )
    if shape[1] != width:
        raise ModelLoadError(f"{path}: {role} width is {shape[1]}, expected {width}")
