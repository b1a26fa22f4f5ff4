"""The model card: one JSON document describing an ensemble of ONNX graphs and how it was measured.

Layout on disk (documented in ``models/README.md``): the card ``NAME.json`` and, in the same
directory, one ``.onnx`` file per member, named by the card (``NAME.mlp.onnx``,
``NAME.tcn.onnx``) together with its sha256. A model reference is the card's path; a reference
ending in ``.onnx`` means the card of the same stem (``NAME.onnx`` -> ``NAME.json``), which is
how references written for the single-model layout keep working.

Card versions: ``2`` is the ensemble card written by ``qtrader model train`` today. ``1`` is the
single-model card of earlier builds (one ``NAME.onnx`` beside ``NAME.json``, no calibration and no
backtest figures). A version 1 card is still read, so a deployed model keeps serving after an
upgrade, but the inference role reports it DEGRADED: the card cannot back the figures this build
exports and documents. Any other version is refused.

Every figure on a card is computed by the training run from held-out data; a figure that cannot
be computed (a hit rate with no directional signal above the threshold, a Sharpe ratio of a flat
equity curve) is ``null``, never a made-up number.
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from qtrader.contracts.messages import Direction
from qtrader.contracts.policy import TradingPolicySpec, format_validation_error

CARD_VERSION: Literal[2] = 2
LEGACY_CARD_VERSION: Literal[1] = 1

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Ratio = Annotated[float, Field(ge=0.0, le=1.0)]
MemberName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
# A bare file name in the card's directory: no separators, no "..", no hidden files.
FileName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}\.onnx$")]


class CardError(ValueError):
    """A card that cannot be read or does not describe a servable model; says which and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- figures ------------------------------------------------------------------------------------


class ClassificationMetrics(_Strict):
    """How well predicted probabilities matched the labels of held-out examples.

    ``hit_rate`` is the accuracy of the directional signals the live path would trade: rows whose
    most probable class is LONG or SHORT with a probability of at least the evaluation policy's
    ``risk.minConfidence``; ``directional_signals`` counts them. Expected calibration error uses
    10 equal-width bins of the top probability; the Brier score is the multi-class one (sum over
    classes of the squared error, averaged over rows).
    """

    examples: int = Field(gt=0)
    accuracy: Ratio
    log_loss: float = Field(ge=0.0)
    brier_score: float = Field(ge=0.0, le=2.0)
    expected_calibration_error: Ratio
    directional_signals: int = Field(ge=0)
    hit_rate: Ratio | None


class Baseline(_Strict):
    """The no-skill references: always the training set's majority class, or its class shares."""

    majority_class_accuracy: Ratio
    prior_log_loss: float = Field(ge=0.0)
    label_shares: dict[Direction, Ratio]


class BacktestFigures(_Strict):
    """A backtest on the live code path (``qtrader.backtest``), after fees and slippage.

    ``sharpe`` is the mean over the standard deviation of the per-candle equity returns, times
    the square root of ``periods_per_year`` (candles per year: crypto trades around the clock),
    with a risk-free rate of 0; null when the equity never moved. ``max_drawdown_pct`` is the
    ledger's: the worst fall from a peak after any fill or mark. ``win_rate`` is the share of
    position-reducing fills whose realized PnL exceeded their own fee. ``signal_hit_rate`` is the
    card's hit rate measured on the signals the run emitted (labels from the run's candles).
    ``orders`` are the intents sent (``unfilled_orders`` of them ended without a fill), ``trades``
    the fills, ``denials`` the signals ``decide`` turned down, by reason.
    """

    start_ms: int = Field(ge=0)
    end_ms: int = Field(ge=0)
    steps: int = Field(ge=0)
    periods_per_year: float = Field(gt=0)
    initial_capital: Decimal
    final_equity: Decimal
    realized_pnl: Decimal
    unrealized_pnl: Decimal
    fees: Decimal
    return_pct: Decimal
    max_drawdown_pct: Decimal
    sharpe: float | None
    signals: int = Field(ge=0)
    directional_signals: int = Field(ge=0)
    signal_hit_rate: Ratio | None
    orders: int = Field(ge=0)
    unfilled_orders: int = Field(ge=0)
    trades: int = Field(ge=0)
    reducing_trades: int = Field(ge=0)
    win_rate: Ratio | None
    denials: dict[str, int]
    halted_at_ms: int | None


class FoldEvaluation(_Strict):
    """One walk-forward fold: models trained on every example whose label is known before
    ``test_from_ms``, measured on the examples decided in ``[test_from_ms, test_to_ms)``."""

    index: int = Field(ge=0)
    test_from_ms: int = Field(ge=0)
    test_to_ms: int = Field(ge=0)
    train_examples: int = Field(gt=0)
    baseline: Baseline
    ensemble: ClassificationMetrics
    members: dict[MemberName, ClassificationMetrics]
    agreement_rate: Ratio
    backtest: BacktestFigures


class OverallEvaluation(_Strict):
    """Every fold's held-out predictions pooled (each from its own fold's models), and one
    backtest over all folds in a row, each fold traded by its own models."""

    ensemble: ClassificationMetrics
    members: dict[MemberName, ClassificationMetrics]
    agreement_rate: Ratio
    backtest: BacktestFigures


class Evaluation(_Strict):
    """How the figures were measured. The last fold is the held-out test of the shipped
    members: they are that fold's models (trained on everything before it)."""

    policy: TradingPolicySpec
    folds: tuple[FoldEvaluation, ...] = Field(min_length=1)
    overall: OverallEvaluation

    @property
    def test(self) -> FoldEvaluation:
        return self.folds[-1]


# --- what was trained on what -----------------------------------------------------------------


class DataFile(_Strict):
    name: str = Field(min_length=1, max_length=255)
    sha256: Sha256


class TrainingData(_Strict):
    """The candles, the labelling and the split."""

    source: Literal["synthetic", "csv"]
    regime: str | None  # synthetic data only
    data_seed: int | None  # synthetic data only
    files: tuple[DataFile, ...]  # csv only: the kline files and their sha256
    symbols: tuple[str, ...] = Field(min_length=1)
    interval: str
    start_ms: int = Field(ge=0)  # open time of the first candle
    end_ms: int = Field(ge=0)  # close time of the last candle
    candles: dict[str, int]
    examples: int = Field(gt=0)
    label_horizon_candles: int = Field(gt=0)
    label_cost_bps: float = Field(ge=0)  # round trip: 2 x (fee + slippage) of the policy
    folds: int = Field(ge=1)
    initial_train_fraction: float = Field(gt=0, lt=1)
    epochs: int = Field(ge=1)


class Member(_Strict):
    """One ONNX graph of the ensemble; ``file`` lives in the card's directory."""

    name: MemberName
    architecture: Literal["mlp", "tcn"]
    input: Literal["features", "sequence"]
    description: str = Field(min_length=1, max_length=256)
    file: FileName
    sha256: Sha256
    opset: int = Field(gt=0)
    parameters: int = Field(gt=0)


class ModelCard(_Strict):
    """The card of an ensemble (version 2)."""

    card_version: Literal[2] = CARD_VERSION
    model_version: Annotated[str, Field(min_length=1, max_length=64)]
    created_at: datetime
    seed: int
    window: int = Field(gt=0)
    features: tuple[str, ...]
    sequence_features: tuple[str, ...]
    classes: tuple[Direction, ...]
    combine: Literal["mean_probability"] = "mean_probability"
    members: tuple[Member, ...] = Field(min_length=1, max_length=8)
    training: TrainingData
    evaluation: Evaluation

    @model_validator(mode="after")
    def _members_distinct(self) -> ModelCard:
        for attribute in ("name", "file"):
            values = [getattr(member, attribute) for member in self.members]
            if len(set(values)) != len(values):
                raise ValueError(f"members: each {attribute} may appear once, got {values}")
        folds = self.evaluation.folds
        if [fold.index for fold in folds] != list(range(len(folds))):
            raise ValueError("evaluation.folds must be numbered 0, 1, ... in time order")
        names = {member.name for member in self.members}
        listed = [set(fold.members) for fold in folds] + [set(self.evaluation.overall.members)]
        for members in listed:
            if members != names:
                raise ValueError(f"evaluation lists members {sorted(members)}, not {names}")
        return self


class LegacyTrainingData(_Strict):
    source: str
    regime: str
    symbols: tuple[str, ...]
    interval: str
    start_ms: int = Field(ge=0)
    end_ms: int = Field(ge=0)
    candles_per_symbol: int = Field(gt=0)
    held_out_from_ms: int = Field(ge=0)
    label_horizon_candles: int = Field(gt=0)
    round_trip_fee_bps: float = Field(ge=0)


class LegacyModelCard(_Strict):
    """The single-model card of earlier builds (version 1), read so old models keep serving."""

    card_version: Literal[1] = LEGACY_CARD_VERSION
    model_version: Annotated[str, Field(min_length=1, max_length=64)]
    created_at: datetime
    onnx_sha256: Sha256
    opset: int = Field(gt=0)
    features: tuple[str, ...]
    window: int = Field(gt=0)
    classes: tuple[Direction, ...]
    training_data: LegacyTrainingData
    held_out_metrics: dict[str, float]
    seed: int


AnyCard = ModelCard | LegacyModelCard


def card_path(reference: Path) -> Path:
    """The card a model reference means: the path itself, or ``NAME.json`` for ``NAME.onnx``."""
    return reference if reference.suffix == ".json" else reference.with_suffix(".json")


def member_path(card_file: Path, member: Member) -> Path:
    return card_file.parent / member.file


def read_card(path: Path) -> AnyCard:
    """Parse the card at ``path`` (any supported version) or raise ``CardError`` saying why."""
    try:
        raw = json.loads(path.read_bytes())
    except OSError as exc:
        raise CardError(f"cannot read model card {path}: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CardError(f"invalid model card {path}: not JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise CardError(f"invalid model card {path}: not a JSON object")
    version = raw.get("card_version")
    kind: type[ModelCard] | type[LegacyModelCard]
    if version == CARD_VERSION:
        kind = ModelCard
    elif version == LEGACY_CARD_VERSION:
        kind = LegacyModelCard
    else:
        raise CardError(
            f"invalid model card {path}: card_version {version!r} is not one this build reads "
            f"({LEGACY_CARD_VERSION} or {CARD_VERSION})"
        )
    try:
        return kind.model_validate(raw)
    except ValidationError as exc:
        raise CardError(f"invalid model card {path}: {format_validation_error(exc)}") from exc


def write_card(card: ModelCard, path: Path) -> None:
    path.write_text(card.model_dump_json(indent=2) + "\n")
