"""Classification figures of predicted probabilities against labels (numpy only).

The decision behind the hit rate is ``onnx_model.decide_batch``, the rule the live signals use:
a row is a directional signal when its most probable class is LONG or SHORT and that
probability reaches the threshold (the policy's ``risk.minConfidence``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

from qtrader.contracts.messages import Direction
from qtrader.inference.card import Baseline, ClassificationMetrics
from qtrader.inference.onnx_model import CLASSES, decide_batch
from qtrader.research.dataset import class_shares

CALIBRATION_BINS = 10
_FLAT = CLASSES.index(Direction.FLAT)
_EPSILON = 1e-12


def classification_metrics(
    probabilities: NDArray[np.floating], labels: NDArray[np.int64], *, threshold: float
) -> ClassificationMetrics:
    """Accuracy, log loss, Brier score, calibration and hit rate of ``probabilities``."""
    probs = _checked(probabilities, labels)
    choice, confidence = decide_batch(probs)
    hits, signals = hit_counts(choice, confidence, labels, threshold=threshold)
    return ClassificationMetrics(
        examples=len(labels),
        accuracy=float(np.mean(choice == labels)),
        log_loss=log_loss(probs, labels),
        brier_score=brier_score(probs, labels),
        expected_calibration_error=expected_calibration_error(probs, labels),
        directional_signals=signals,
        hit_rate=hits / signals if signals else None,
    )


def hit_counts(
    choice: NDArray[np.integer],
    confidence: NDArray[np.floating],
    labels: NDArray[np.int64],
    *,
    threshold: float,
) -> tuple[int, int]:
    """(directional signals whose label agrees, directional signals) at ``threshold``."""
    directional = (choice != _FLAT) & (confidence >= threshold)
    return int(np.sum(directional & (choice == labels))), int(np.sum(directional))


def log_loss(probabilities: NDArray[np.float64], labels: NDArray[np.int64]) -> float:
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(picked, _EPSILON, 1.0))))


def brier_score(probabilities: NDArray[np.float64], labels: NDArray[np.int64]) -> float:
    onehot = np.eye(len(CLASSES))[labels]
    return float(np.mean(np.sum((probabilities - onehot) ** 2, axis=1)))


def expected_calibration_error(
    probabilities: NDArray[np.float64], labels: NDArray[np.int64], *, bins: int = CALIBRATION_BINS
) -> float:
    """Sum over equal-width confidence bins of |accuracy - mean confidence| x the bin's share."""
    choice, confidence = decide_batch(probabilities)
    correct = choice == labels
    # Bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of exactly 0 goes to bin 0.
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    error = 0.0
    for b in range(bins):
        members = index == b
        if np.any(members):
            gap = abs(float(np.mean(correct[members])) - float(np.mean(confidence[members])))
            error += gap * float(np.mean(members))
    return error


def agreement_rate(member_probabilities: Sequence[NDArray[np.floating]]) -> float:
    """Share of rows on which every member's most probable class is the same."""
    choices = np.stack([np.asarray(p).argmax(axis=1) for p in member_probabilities])
    return float(np.mean(np.all(choices == choices[0], axis=0)))


def baseline(train_labels: NDArray[np.int64], test_labels: NDArray[np.int64]) -> Baseline:
    """The no-skill figures on ``test_labels`` of a model that knows only the training shares."""
    priors = np.bincount(train_labels, minlength=len(CLASSES)) / max(1, len(train_labels))
    return Baseline(
        majority_class_accuracy=float(np.mean(test_labels == int(priors.argmax()))),
        prior_log_loss=log_loss(np.tile(priors, (len(test_labels), 1)), test_labels),
        label_shares=class_shares(test_labels),
    )


def member_metrics(
    members: Mapping[str, NDArray[np.floating]], labels: NDArray[np.int64], *, threshold: float
) -> dict[str, ClassificationMetrics]:
    return {
        name: classification_metrics(probs, labels, threshold=threshold)
        for name, probs in members.items()
    }


def _checked(probabilities: NDArray[np.floating], labels: NDArray[np.int64]) -> NDArray[np.float64]:
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.ndim != 2 or probs.shape != (len(labels), len(CLASSES)):
        raise ValueError(
            f"expected ({len(labels)}, {len(CLASSES)}) probabilities, got {probs.shape}"
        )
    if len(labels) == 0:
        raise ValueError("no examples to measure")
    return probs
