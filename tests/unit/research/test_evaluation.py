"""Classification figures against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qtrader.contracts.messages import Direction
from qtrader.inference.onnx_model import CLASSES
from qtrader.research.evaluation import (
    agreement_rate,
    baseline,
    brier_score,
    classification_metrics,
    expected_calibration_error,
    log_loss,
)

SHORT, FLAT, LONG = (CLASSES.index(d) for d in (Direction.SHORT, Direction.FLAT, Direction.LONG))

# Four rows: a confident right LONG, a right SHORT at 0.5, a wrong LONG at 0.4, a FLAT.
PROBS = np.array(
    [
        [0.1, 0.1, 0.8],
        [0.5, 0.2, 0.3],
        [0.3, 0.3, 0.4],
        [0.2, 0.6, 0.2],
    ]
)
LABELS = np.array([LONG, SHORT, SHORT, FLAT])


def test_log_loss_is_the_mean_negative_log_of_the_true_class() -> None:
    expected = -(math.log(0.8) + math.log(0.5) + math.log(0.3) + math.log(0.6)) / 4
    assert log_loss(PROBS, LABELS) == pytest.approx(expected)


def test_brier_score_sums_squared_errors_over_classes() -> None:
    rows = [
        0.1**2 + 0.1**2 + 0.2**2,
        0.5**2 + 0.2**2 + 0.3**2,
        0.7**2 + 0.3**2 + 0.4**2,
        0.2**2 + 0.4**2 + 0.2**2,
    ]
    assert brier_score(PROBS, LABELS) == pytest.approx(sum(rows) / 4)


def test_calibration_error_weights_each_bin_gap_by_its_share() -> None:
    # Confidences 0.8 (right), 0.5 (right), 0.4 (wrong), 0.6 (right): one row per bin.
    expected = (abs(1 - 0.8) + abs(1 - 0.5) + abs(0 - 0.4) + abs(1 - 0.6)) / 4
    assert expected_calibration_error(PROBS, LABELS) == pytest.approx(expected)


def test_calibration_error_when_perfectly_calibrated_then_zero() -> None:
    probs = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    assert expected_calibration_error(probs, np.array([LONG, SHORT])) == 0.0


def test_metrics_when_threshold_is_045_then_hit_rate_counts_directional_rows_above_it() -> None:
    metrics = classification_metrics(PROBS, LABELS, threshold=0.45)
    assert metrics.examples == 4
    assert metrics.accuracy == pytest.approx(3 / 4)
    # Directional and >= 0.45: the LONG at 0.8 and the SHORT at 0.5 (both right); the LONG at
    # 0.4 is below the threshold and the FLAT is not directional.
    assert metrics.directional_signals == 2
    assert metrics.hit_rate == 1.0


def test_metrics_when_no_row_reaches_the_threshold_then_hit_rate_is_none() -> None:
    metrics = classification_metrics(PROBS, LABELS, threshold=0.95)
    assert metrics.directional_signals == 0
    assert metrics.hit_rate is None


def test_metrics_when_shapes_disagree_then_raises() -> None:
    with pytest.raises(ValueError, match="probabilities"):
        classification_metrics(PROBS[:3], LABELS, threshold=0.5)


def test_agreement_rate_is_the_share_of_rows_with_one_argmax() -> None:
    other = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.1, 0.1, 0.8], [0.1, 0.8, 0.1]])
    assert agreement_rate([PROBS, other]) == pytest.approx(3 / 4)


def test_baseline_predicts_the_training_majority_with_the_training_shares() -> None:
    train = np.array([LONG, LONG, LONG, SHORT])
    result = baseline(train, LABELS)
    assert result.majority_class_accuracy == pytest.approx(1 / 4)
    priors = {SHORT: 0.25, FLAT: 1e-12, LONG: 0.75}
    expected = -sum(math.log(priors[int(label)]) for label in LABELS) / 4
    assert result.prior_log_loss == pytest.approx(expected)
    assert result.label_shares[Direction.SHORT] == pytest.approx(0.5)
