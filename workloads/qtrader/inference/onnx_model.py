"""The signal model at run time: an ensemble of ONNX graphs and the model card that describes it.

This is the only module that imports onnxruntime; the inference service never imports torch.
``SignalModel.load`` refuses (with ``ModelLoadError``) anything it cannot serve correctly: a
missing or invalid card, a member file that is missing or whose sha256 differs from the card's,
a card written for other features, window or classes, and a graph whose input or output shape
does not fit. Refusing at load time means a bad model stops a rollout at startup instead of
emitting nonsense signals later.

The ensemble's probabilities are the mean of its members' (``combine: mean_probability`` on the
card). ``predict`` runs every member once on the whole batch and reports each member's own
probabilities and run time too, which the service exports as per-model latency and agreement.

Each session runs on one intra-op thread: the members are tiny, so threads only add scheduling
jitter to the latency and compete with the other workloads on the node.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from qtrader.contracts.messages import Direction
from qtrader.inference.card import (
    AnyCard,
    CardError,
    LegacyModelCard,
    Member,
    ModelCard,
    member_path,
    read_card,
)
from qtrader.inference.card import card_path as card_path
from qtrader.inference.features import (
    FEATURE_NAMES,
    SEQUENCE_FEATURE_NAMES,
    WINDOW,
    ModelInputs,
)

# The order of the model's output columns.
CLASSES: tuple[Direction, ...] = (Direction.SHORT, Direction.FLAT, Direction.LONG)

InputKind = Literal["features", "sequence"]
_Probabilities = NDArray[np.float32]


class ModelLoadError(Exception):
    """The model files or the card cannot be served; the message says which and why."""


# --- the decision rule ------------------------------------------------------------------------


def decide_batch(
    probabilities: NDArray[np.floating],
) -> tuple[NDArray[np.intp], NDArray[np.float64]]:
    """Per row: the index into ``CLASSES`` of the most probable direction, and its probability
    clipped to [0, 1] as the confidence. The one decision rule: signals, hit rates and the
    backtest all use it."""
    if probabilities.ndim != 2 or probabilities.shape[1] != len(CLASSES):
        raise ValueError(f"expected (n, {len(CLASSES)}) probabilities, got {probabilities.shape}")
    index = np.argmax(probabilities, axis=1)
    picked = probabilities[np.arange(probabilities.shape[0]), index].astype(np.float64)
    # float32 softmax can overshoot 1.0 by an ulp; Signal.confidence must stay within [0, 1].
    return index, np.clip(picked, 0.0, 1.0)


def decide(probs_row: NDArray[np.floating]) -> tuple[Direction, float]:
    """The most probable direction of one row and its probability as the confidence."""
    if probs_row.shape != (len(CLASSES),):
        raise ValueError(f"expected {len(CLASSES)} probabilities, got shape {probs_row.shape}")
    index, confidence = decide_batch(probs_row[None, :])
    return CLASSES[int(index[0])], float(confidence[0])


# --- members and the ensemble -----------------------------------------------------------------


_INPUT_SHAPES: dict[InputKind, tuple[int, ...]] = {
    "features": (len(FEATURE_NAMES),),
    "sequence": (WINDOW, len(SEQUENCE_FEATURE_NAMES)),
}


class MemberSession:
    """One ONNX graph in onnxruntime, fed the input view it was trained on."""

    def __init__(self, *, name: str, input_kind: InputKind, session: ort.InferenceSession) -> None:
        self.name = name
        self.input_kind: InputKind = input_kind
        self._session = session
        self._input_name: str = session.get_inputs()[0].name
        self._output_name: str = session.get_outputs()[0].name

    @classmethod
    def from_bytes(
        cls, *, name: str, input_kind: InputKind, data: bytes, where: str
    ) -> MemberSession:
        """Open ``data`` (``where`` names it in errors) and check its signature."""
        session = _open_session(data, where)
        _check_signature(session, where, input_kind)
        return cls(name=name, input_kind=input_kind, session=session)

    def run(self, inputs: ModelInputs) -> _Probabilities:
        """Probabilities of ``CLASSES`` per row: shape ``(n, 3)``."""
        view = inputs.features if self.input_kind == "features" else inputs.sequence
        feed = np.ascontiguousarray(view, dtype=np.float32)
        (probabilities,) = self._session.run([self._output_name], {self._input_name: feed})
        return np.asarray(probabilities, dtype=np.float32)


@dataclass(frozen=True)
class Prediction:
    """An ensemble's answer for one batch: the combined probabilities and each member's."""

    probabilities: _Probabilities
    members: Mapping[str, _Probabilities]
    seconds: Mapping[str, float]  # each member's run time for the whole batch

    def unanimous(self) -> NDArray[np.bool_]:
        """Per row: whether every member's most probable class is the same."""
        choices = np.stack([p.argmax(axis=1) for p in self.members.values()])
        unanimous: NDArray[np.bool_] = np.all(choices == choices[0], axis=0)
        return unanimous


class Predictor(Protocol):
    """What makes signals: the served ``SignalModel``, or an unsaved ``Ensemble`` in training."""

    @property
    def version(self) -> str: ...

    def predict(self, inputs: ModelInputs) -> Prediction: ...


class Ensemble:
    """Members whose probabilities are averaged."""

    def __init__(self, *, version: str, members: Sequence[MemberSession]) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self._version = version
        self._members = tuple(members)

    @property
    def version(self) -> str:
        return self._version

    @property
    def member_names(self) -> tuple[str, ...]:
        return tuple(member.name for member in self._members)

    def predict(self, inputs: ModelInputs) -> Prediction:
        outputs: dict[str, _Probabilities] = {}
        seconds: dict[str, float] = {}
        for member in self._members:
            started = time.perf_counter()
            outputs[member.name] = member.run(inputs)
            seconds[member.name] = time.perf_counter() - started
        combined = combine(list(outputs.values()))
        return Prediction(probabilities=combined, members=outputs, seconds=seconds)


def combine(member_probabilities: Sequence[NDArray[np.floating]]) -> _Probabilities:
    """The ensemble's probabilities: the members' mean, in float64, returned as float32."""
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in member_probabilities])
    mean: _Probabilities = stacked.mean(axis=0).astype(np.float32)
    return mean


class SignalModel(Ensemble):
    """A loaded, validated ensemble with the card that describes it."""

    def __init__(self, *, card: AnyCard, path: Path, members: Sequence[MemberSession]) -> None:
        super().__init__(version=card.model_version, members=members)
        self._card = card
        self._path = path

    @classmethod
    def load(cls, reference: Path) -> SignalModel:
        """Load the card ``reference`` means and every member it names, or raise
        ``ModelLoadError`` saying why."""
        path = card_path(reference)
        try:
            card = read_card(path)
        except CardError as exc:
            raise ModelLoadError(str(exc)) from exc
        if isinstance(card, LegacyModelCard):
            return cls(card=card, path=path, members=[_load_legacy_member(card, path)])
        _check_card(card, path)
        return cls(card=card, path=path, members=[_load_member(path, m) for m in card.members])

    @property
    def card(self) -> AnyCard:
        return self._card

    @property
    def path(self) -> Path:
        """The card's path."""
        return self._path

    @property
    def legacy(self) -> bool:
        """True for a version 1 card: served, but without the figures this build documents."""
        return isinstance(self._card, LegacyModelCard)

    @property
    def created_at(self) -> datetime:
        created = self._card.created_at
        return created if created.tzinfo is not None else created.replace(tzinfo=UTC)


def default_model_path() -> Path:
    """The model card shipped in the package (``qtrader/models/default.json``).

    The package is installed as plain files (never zipped), so the resource is a real path.
    """
    return Path(str(resources.files("qtrader").joinpath("models/default.json")))


# --- loading ----------------------------------------------------------------------------------


def _check_card(card: ModelCard, path: Path) -> None:
    if card.features != FEATURE_NAMES:
        raise ModelLoadError(
            f"model card {path}: features {list(card.features)} differ from this build's "
            f"{list(FEATURE_NAMES)}"
        )
    if card.sequence_features != SEQUENCE_FEATURE_NAMES:
        raise ModelLoadError(
            f"model card {path}: sequence features {list(card.sequence_features)} differ from "
            f"this build's {list(SEQUENCE_FEATURE_NAMES)}"
        )
    _check_window_and_classes(card.window, card.classes, path)


def _check_window_and_classes(window: int, classes: tuple[Direction, ...], path: Path) -> None:
    if window != WINDOW:
        raise ModelLoadError(f"model card {path}: window {window} differs from {WINDOW}")
    if classes != CLASSES:
        raise ModelLoadError(
            f"model card {path}: classes {[c.value for c in classes]} differ from "
            f"{[c.value for c in CLASSES]}"
        )


def _load_member(path: Path, member: Member) -> MemberSession:
    file = member_path(path, member)
    data = _read_checked(file, member.sha256, what=f"member {member.name!r}")
    return MemberSession.from_bytes(
        name=member.name, input_kind=member.input, data=data, where=str(file)
    )


def _load_legacy_member(card: LegacyModelCard, path: Path) -> MemberSession:
    if card.features != FEATURE_NAMES:
        raise ModelLoadError(
            f"model card {path}: features {list(card.features)} differ from this build's "
            f"{list(FEATURE_NAMES)}"
        )
    _check_window_and_classes(card.window, card.classes, path)
    file = path.with_suffix(".onnx")
    data = _read_checked(file, card.onnx_sha256, what="the model")
    return MemberSession.from_bytes(name="mlp", input_kind="features", data=data, where=str(file))


def _read_checked(file: Path, sha256: str, *, what: str) -> bytes:
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read {what} {file}: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ModelLoadError(
            f"{what} {file} has sha256 {digest}, the model card says {sha256}: the file is not "
            "the one the card describes"
        )
    return data


def _session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only; load failures surface as ModelLoadError
    return options


def _open_session(model_bytes: bytes, where: str) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(
            model_bytes, sess_options=_session_options(), providers=["CPUExecutionProvider"]
        )
    # onnxruntime raises pybind11-generated exception types (InvalidProtobuf, Fail, ...) that
    # share no useful base class below Exception.
    except Exception as exc:
        raise ModelLoadError(f"onnxruntime cannot load {where}: {exc}") from exc


def _check_signature(session: ort.InferenceSession, where: str, input_kind: InputKind) -> None:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelLoadError(f"{where}: expected 1 input and 1 output, got {inputs} -> {outputs}")
    _check_tensor(where, "input", inputs[0], _INPUT_SHAPES[input_kind])
    _check_tensor(where, "output", outputs[0], (len(CLASSES),))


def _check_tensor(where: str, role: str, arg: ort.NodeArg, tail: tuple[int, ...]) -> None:
    shape = list(arg.shape)
    expected = ", ".join(["batch", *(str(n) for n in tail)])
    # A dynamic batch axis is reported as a name (or None), never as a fixed int.
    if arg.type != "tensor(float)" or len(shape) != 1 + len(tail) or isinstance(shape[0], int):
        raise ModelLoadError(
            f"{where}: {role} must be float32 [{expected}] with a dynamic batch axis, "
            f"got {arg.type} {shape}"
        )
    if tuple(shape[1:]) != tail:
        raise ModelLoadError(f"{where}: {role} shape is {shape}, expected [{expected}]")
