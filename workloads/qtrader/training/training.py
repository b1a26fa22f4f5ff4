"""Train the signal ensemble (an MLP and a temporal convolution), measure it walk-forward, and
export it to ONNX with its model card.

Only ``qtrader model train``, the inference benchmark and the tests import this module: it needs
torch, which the runtime images never install. The runtime reads the result through
``onnx_model``.

The steps (``train_ensemble``):

1. candles: the seeded synthetic market, or Binance kline files a user supplies;
2. examples: ``features.inputs_from_arrays`` (the serving feature code) and labels net of the
   evaluation policy's round-trip cost (``dataset``);
3. walk-forward: for every fold, both members are trained on the examples whose labels end
   before the fold, exported to ONNX and measured *as onnxruntime serves them* on the fold:
   classification figures per member and for the ensemble, the members' agreement, and a
   backtest of the fold's candles on the live code path (``qtrader.backtest``);
4. overall: every fold's held-out predictions pooled, and one backtest over all folds in a row,
   each fold traded by its own models;
5. the last fold's members (trained on everything before the last fold, which is their
   held-out test) are the ensemble that is written, with the card.

Choices that are not obvious:

* Input standardisation (training-split mean and scale) and the softmax are part of each
  network, so an exported graph maps raw inputs to probabilities and nothing outside can drift.
* Reproducible: each member is seeded from the run's seed, the fold and the member (without
  touching the caller's global RNG state) and trained on one torch thread, so the same seed
  gives the same weights and, with them, the same ONNX bytes, sha256 and ``model_version``.
* ``write_ensemble`` re-loads what it wrote through ``SignalModel.load`` and compares every
  member with torch, so a broken export fails the training command instead of a later rollout.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from numpy.typing import NDArray
from torch import nn

from qtrader.backtest.data import (
    CandleSeries,
    csv_series,
    file_digests,
    interval_ms,
    series_interval,
    synthetic_series,
    time_range,
)
from qtrader.backtest.engine import ModelSchedule, run_backtest
from qtrader.backtest.policy import evaluation_policy
from qtrader.contracts.messages import Candle
from qtrader.contracts.policy import (
    TradingPolicySpec,
)
from qtrader.inference.card import (
    DataFile,
    Evaluation,
    FoldEvaluation,
    Member,
    ModelCard,
    OverallEvaluation,
    TrainingData,
    card_path,
    write_card,
)
from qtrader.inference.features import (
    FEATURE_NAMES,
    SEQUENCE_FEATURE_NAMES,
    WINDOW,
    ModelInputs,
)
from qtrader.inference.onnx_model import (
    CLASSES,
    Ensemble,
    InputKind,
    MemberSession,
    Prediction,
    SignalModel,
    combine,
)
from qtrader.marketdata.synthetic import Regime
from qtrader.research.dataset import (
    LABEL_HORIZON,
    Examples,
    Fold,
    examples_from_candles,
    round_trip_cost_bps,
    walk_forward_folds,
)
from qtrader.research.evaluation import (
    agreement_rate,
    baseline,
    classification_metrics,
    member_metrics,
)

log = logging.getLogger(__name__)

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT", "BNBUSDT", "ADAUSDT")
OPSET = 20
BATCH_SIZE = 256
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-4
PARITY_TOLERANCE = 1e-5
MLP_HIDDEN = 32
TCN_CHANNELS = 16
TCN_DILATIONS = (1, 2, 4)
TCN_KERNEL = 3


# --- the members ------------------------------------------------------------------------------


class _Standardised(nn.Module):
    """Standardise the input with the training split's statistics, run ``body``, softmax."""

    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, *, mean: NDArray[np.float32], scale: NDArray[np.float32]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(mean.astype(np.float32).copy()))
        self.register_buffer("scale", torch.from_numpy(scale.astype(np.float32).copy()))

    def body(self, standardised: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.body((inputs - self.mean) / self.scale)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(inputs), dim=-1)


class MlpNet(_Standardised):
    """The summary features through two hidden ReLU layers."""

    def __init__(self, *, mean: NDArray[np.float32], scale: NDArray[np.float32]) -> None:
        super().__init__(mean=mean, scale=scale)
        self.layers = nn.Sequential(
            nn.Linear(len(FEATURE_NAMES), MLP_HIDDEN),
            nn.ReLU(),
            nn.Linear(MLP_HIDDEN, MLP_HIDDEN),
            nn.ReLU(),
            nn.Linear(MLP_HIDDEN, len(CLASSES)),
        )

    def body(self, standardised: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(standardised)
        return out


class TcnNet(_Standardised):
    """A temporal convolution over the per-candle window: dilated 1-D convolutions (no padding:
    the whole window is the past), then the last step's and the average activation."""

    def __init__(self, *, mean: NDArray[np.float32], scale: NDArray[np.float32]) -> None:
        super().__init__(mean=mean, scale=scale)
        layers: list[nn.Module] = []
        channels = len(SEQUENCE_FEATURE_NAMES)
        for dilation in TCN_DILATIONS:
            layers += [
                nn.Conv1d(channels, TCN_CHANNELS, TCN_KERNEL, dilation=dilation),
                nn.ReLU(),
            ]
            channels = TCN_CHANNELS
        self.convolutions = nn.Sequential(*layers)
        self.head = nn.Linear(2 * TCN_CHANNELS, len(CLASSES))

    def body(self, standardised: torch.Tensor) -> torch.Tensor:
        # (batch, time, channels) -> (batch, channels, time) for Conv1d.
        activations = self.convolutions(standardised.transpose(1, 2))
        summary = torch.cat([activations[:, :, -1], activations.mean(dim=2)], dim=1)
        out: torch.Tensor = self.head(summary)
        return out


@dataclass(frozen=True)
class Architecture:
    name: Literal["mlp", "tcn"]
    input_kind: InputKind
    build: Callable[..., _Standardised]
    description: str


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        "mlp",
        "features",
        MlpNet,
        f"MLP {len(FEATURE_NAMES)}-{MLP_HIDDEN}-{MLP_HIDDEN}-{len(CLASSES)}, ReLU, on the "
        "window's summary features",
    ),
    Architecture(
        "tcn",
        "sequence",
        TcnNet,
        f"temporal convolution, {len(TCN_DILATIONS)} layers of {TCN_CHANNELS} channels, kernel "
        f"{TCN_KERNEL}, dilations {'/'.join(map(str, TCN_DILATIONS))}, ReLU, on the "
        f"{WINDOW}-candle sequence",
    ),
)


def view(inputs: ModelInputs, kind: InputKind) -> NDArray[np.float32]:
    return inputs.features if kind == "features" else inputs.sequence


def new_member(architecture: Architecture, train_inputs: ModelInputs) -> _Standardised:
    """An untrained member standardising with ``train_inputs``' per-column statistics."""
    data = view(train_inputs, architecture.input_kind)
    flat = data.reshape(-1, data.shape[-1]).astype(np.float64)
    mean = flat.mean(axis=0)
    scale = flat.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    return architecture.build(mean=mean.astype(np.float32), scale=scale.astype(np.float32))


def predict_probabilities(net: nn.Module, data: NDArray[np.float32]) -> NDArray[np.float32]:
    """The torch member's class probabilities (the reference for ONNX parity)."""
    with torch.no_grad():
        probabilities: NDArray[np.float32] = net(
            torch.from_numpy(np.ascontiguousarray(data))
        ).numpy()
    return probabilities


def parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


# --- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """What to train on and how; ``csv_files`` non-empty means Binance kline files."""

    seed: int = 7
    csv_files: tuple[Path, ...] = ()
    symbols: tuple[str, ...] = SYMBOLS
    candles_per_symbol: int = 8_000
    regime: Regime = Regime.MIXED
    folds: int = 4
    initial_train_fraction: float = 0.4
    epochs: int = 12
    label_horizon: int = LABEL_HORIZON
    min_confidence: float = 0.45

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1], got {self.min_confidence}")


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


def member_seed(seed: int, fold: int, member: int) -> int:
    return seed * 1_000 + fold * 10 + member


def train_member(
    architecture: Architecture, train: Examples, *, seed: int, epochs: int
) -> _Standardised:
    """One member trained on ``train`` (eval mode on return)."""
    with _reproducible(seed):
        net = new_member(architecture, train.inputs)
        inputs = torch.from_numpy(np.ascontiguousarray(view(train.inputs, architecture.input_kind)))
        labels = torch.from_numpy(train.labels)
        optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        loss_fn = nn.CrossEntropyLoss()
        shuffle = torch.Generator().manual_seed(seed)
        net.train()
        for _ in range(epochs):
            order = torch.randperm(len(train), generator=shuffle)
            for start in range(0, len(order), BATCH_SIZE):
                batch = order[start : start + BATCH_SIZE]
                optimizer.zero_grad()
                loss = loss_fn(net.logits(inputs[batch]), labels[batch])
                loss.backward()
                optimizer.step()
    net.eval()
    return net


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


def export_member(net: _Standardised, kind: InputKind, example: NDArray[np.float32]) -> bytes:
    """The self-contained ONNX bytes of ``net`` (dynamic batch axis), traced on ``example``."""
    with tempfile.TemporaryDirectory(prefix="qtrader-export-") as directory:
        output = Path(directory) / "member.onnx"
        with _reproducible(0), _quiet_exporter():
            torch.onnx.export(
                net,
                (torch.from_numpy(np.ascontiguousarray(example[:2])),),
                output,
                dynamo=True,
                opset_version=OPSET,
                input_names=[kind],
                output_names=["probabilities"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                external_data=False,
                verbose=False,
            )
        return without_provenance(output.read_bytes())


def without_provenance(data: bytes) -> bytes:
    """``data`` without what the exporter records about the Python source (each node's stack
    trace, with file paths and line numbers): the bytes then depend only on the graph and its
    weights, so the same seed gives the same sha256 from any checkout or install."""
    model = onnx.load_from_string(data)
    graphs = [model.graph, *(function for function in model.functions)]
    for graph in graphs:
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
    serialized: bytes = model.SerializeToString(deterministic=True)
    return serialized


def onnx_opset(data: bytes) -> int:
    model = onnx.load_from_string(data)
    versions = [entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")]
    if len(versions) != 1:
        raise RuntimeError(f"exported model has no single default-domain opset: {versions}")
    return int(versions[0])


@dataclass(frozen=True)
class TrainedMember:
    architecture: Architecture
    net: _Standardised
    onnx_bytes: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.onnx_bytes).hexdigest()

    def session(self) -> MemberSession:
        return MemberSession.from_bytes(
            name=self.architecture.name,
            input_kind=self.architecture.input_kind,
            data=self.onnx_bytes,
            where=f"exported {self.architecture.name}",
        )


def ensemble_of(members: Sequence[TrainedMember], *, version: str) -> Ensemble:
    return Ensemble(version=version, members=[member.session() for member in members])


def check_parity(member: TrainedMember, session: MemberSession, inputs: ModelInputs) -> None:
    """onnxruntime must compute what torch computes, for one row and for 64."""
    for size in (1, 64):
        rows = inputs.take(slice(0, size))
        expected = predict_probabilities(member.net, view(rows, member.architecture.input_kind))
        difference = float(np.abs(session.run(rows) - expected).max())
        if rows.rows != size or difference > PARITY_TOLERANCE:
            raise RuntimeError(
                f"ONNX export of {member.architecture.name} differs from torch by {difference} "
                f"(batch {size})"
            )


# --- the walk-forward run ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class FoldRun:
    fold: Fold
    members: tuple[TrainedMember, ...]
    test: Examples
    prediction: Prediction
    evaluation: FoldEvaluation


@dataclass(frozen=True, kw_only=True)
class TrainedEnsemble:
    """The walk-forward run: each fold's members and figures; the last fold's are shipped."""

    config: TrainingConfig
    policy: TradingPolicySpec
    training_data: TrainingData
    folds: tuple[FoldRun, ...]
    overall: OverallEvaluation
    seconds: float = field(default=0.0)

    @property
    def members(self) -> tuple[TrainedMember, ...]:
        return self.folds[-1].members


def train_ensemble(config: TrainingConfig) -> TrainedEnsemble:
    """Train and measure every fold, then the overall figures (see the module docstring)."""
    started = time.perf_counter()
    series = _load_series(config)
    symbols = tuple(series)
    policy = evaluation_policy(symbols, min_confidence=config.min_confidence)
    cost_bps = round_trip_cost_bps(policy.paper)
    examples = examples_from_candles(series, horizon=config.label_horizon, cost_bps=cost_bps)
    interval = series_interval(series)
    start_ms, end_ms = time_range(series)
    folds = walk_forward_folds(
        start_ms=start_ms,
        end_ms=end_ms + 1,
        interval_ms=interval_ms(interval),
        folds=config.folds,
        initial_train_fraction=config.initial_train_fraction,
    )
    runs = tuple(_run_fold(config, policy, series, examples, fold) for fold in folds)
    overall = _overall(config, policy, series, runs)
    training_data = _describe(config, series, examples, interval=interval, cost_bps=cost_bps)
    return TrainedEnsemble(
        config=config,
        policy=policy,
        training_data=training_data,
        folds=runs,
        overall=overall,
        seconds=time.perf_counter() - started,
    )


def _load_series(config: TrainingConfig) -> CandleSeries:
    if config.csv_files:
        return csv_series(config.csv_files)
    return synthetic_series(
        symbols=config.symbols,
        candles=config.candles_per_symbol,
        seed=config.seed,
        regime=config.regime,
    )


def _run_fold(
    config: TrainingConfig,
    policy: TradingPolicySpec,
    series: CandleSeries,
    examples: Examples,
    fold: Fold,
) -> FoldRun:
    train = examples.take(fold.train_rows(examples))
    test = examples.take(fold.test_rows(examples))
    if len(train) < BATCH_SIZE or len(test) == 0:
        raise ValueError(
            f"fold {fold.index}: {len(train)} training and {len(test)} test examples are too "
            "few; give more candles or fewer folds"
        )
    log.info("fold %d: training on %d examples, testing on %d", fold.index, len(train), len(test))
    trained: list[TrainedMember] = []
    for index, architecture in enumerate(ARCHITECTURES):
        seed = member_seed(config.seed, fold.index, index)
        net = train_member(architecture, train, seed=seed, epochs=config.epochs)
        example = view(train.inputs, architecture.input_kind)
        trained.append(
            TrainedMember(architecture, net, export_member(net, architecture.input_kind, example))
        )
    members = tuple(trained)
    ensemble = ensemble_of(members, version=f"fold{fold.index}-s{config.seed}")
    prediction = ensemble.predict(test.inputs)
    threshold = policy.risk.min_confidence
    backtest = run_backtest(
        _fold_candles(series, fold), ensemble, policy, label_horizon=config.label_horizon
    )
    evaluation = FoldEvaluation(
        index=fold.index,
        test_from_ms=fold.test_from_ms,
        test_to_ms=fold.test_to_ms,
        train_examples=len(train),
        baseline=baseline(train.labels, test.labels),
        ensemble=classification_metrics(prediction.probabilities, test.labels, threshold=threshold),
        members=member_metrics(prediction.members, test.labels, threshold=threshold),
        agreement_rate=agreement_rate(list(prediction.members.values())),
        backtest=backtest.figures,
    )
    return FoldRun(
        fold=fold, members=members, test=test, prediction=prediction, evaluation=evaluation
    )


def _fold_candles(series: CandleSeries, fold: Fold, *, until_ms: int | None = None) -> CandleSeries:
    """Each symbol's candles of the fold, after the ``WINDOW - 1`` before it that fill the
    windows, so the first signal is the fold's first candle."""
    end = fold.test_to_ms if until_ms is None else until_ms
    selected: CandleSeries = {}
    for symbol, candles in series.items():
        first = next(
            (i for i, c in enumerate(candles) if c.open_time_ms >= fold.test_from_ms), len(candles)
        )
        chosen = [c for c in candles[max(0, first - (WINDOW - 1)) :] if c.open_time_ms < end]
        if chosen:
            selected[symbol] = chosen
    return selected


def _overall(
    config: TrainingConfig,
    policy: TradingPolicySpec,
    series: CandleSeries,
    runs: Sequence[FoldRun],
) -> OverallEvaluation:
    threshold = policy.risk.min_confidence
    labels = np.concatenate([run.test.labels for run in runs])
    names: list[str] = [member.architecture.name for member in runs[0].members]
    members = {
        name: np.concatenate([run.prediction.members[name] for run in runs]) for name in names
    }
    combined = combine(list(members.values()))
    schedule = ModelSchedule(
        tuple(
            (run.fold.test_from_ms, ensemble_of(run.members, version=f"fold{run.fold.index}"))
            for run in runs
        )
    )
    whole = _fold_candles(series, runs[0].fold, until_ms=runs[-1].fold.test_to_ms)
    backtest = run_backtest(whole, schedule, policy, label_horizon=config.label_horizon)
    return OverallEvaluation(
        ensemble=classification_metrics(combined, labels, threshold=threshold),
        members=member_metrics(members, labels, threshold=threshold),
        agreement_rate=agreement_rate(list(members.values())),
        backtest=backtest.figures,
    )


def _describe(
    config: TrainingConfig,
    series: Mapping[str, Sequence[Candle]],
    examples: Examples,
    *,
    interval: str,
    cost_bps: float,
) -> TrainingData:
    start_ms, end_ms = time_range(series)
    synthetic = not config.csv_files
    return TrainingData(
        source="synthetic" if synthetic else "csv",
        regime=config.regime.value if synthetic else None,
        data_seed=config.seed if synthetic else None,
        files=tuple(DataFile(name=n, sha256=s) for n, s in file_digests(config.csv_files)),
        symbols=tuple(series),
        interval=interval,
        start_ms=start_ms,
        end_ms=end_ms,
        candles={symbol: len(candles) for symbol, candles in series.items()},
        examples=len(examples),
        label_horizon_candles=config.label_horizon,
        label_cost_bps=cost_bps,
        folds=config.folds,
        initial_train_fraction=config.initial_train_fraction,
        epochs=config.epochs,
    )


# --- writing ----------------------------------------------------------------------------------


def member_file_name(stem: str, architecture: Architecture) -> str:
    return f"{stem}.{architecture.name}.onnx"


def ensemble_version(seed: int, members: Sequence[TrainedMember]) -> str:
    """Derived from the members' bytes: the same weights always get the same version."""
    digest = hashlib.sha256(
        "".join(f"{m.architecture.name}:{m.sha256}\n" for m in members).encode()
    ).hexdigest()
    return f"ens-s{seed}-{digest[:12]}"


def build_card(trained: TrainedEnsemble, *, stem: str) -> ModelCard:
    members = trained.members
    return ModelCard(
        model_version=ensemble_version(trained.config.seed, members),
        created_at=datetime.now(UTC),
        seed=trained.config.seed,
        window=WINDOW,
        features=FEATURE_NAMES,
        sequence_features=SEQUENCE_FEATURE_NAMES,
        classes=CLASSES,
        members=tuple(
            Member(
                name=m.architecture.name,
                architecture=m.architecture.name,
                input=m.architecture.input_kind,
                description=m.architecture.description,
                file=member_file_name(stem, m.architecture),
                sha256=m.sha256,
                opset=onnx_opset(m.onnx_bytes),
                parameters=parameter_count(m.net),
            )
            for m in members
        ),
        training=trained.training_data,
        evaluation=Evaluation(
            policy=trained.policy,
            folds=tuple(run.evaluation for run in trained.folds),
            overall=trained.overall,
        ),
    )


def write_ensemble(trained: TrainedEnsemble, output: Path) -> ModelCard:
    """Write the members and the card ``output`` names (``NAME.json``, or ``NAME.onnx`` for the
    card of that stem), then load them as the service would and check them; return the card."""
    card_file = card_path(output)
    card_file.parent.mkdir(parents=True, exist_ok=True)
    card = build_card(trained, stem=card_file.stem)
    for member, entry in zip(trained.members, card.members, strict=True):
        (card_file.parent / entry.file).write_bytes(member.onnx_bytes)
    write_card(card, card_file)
    _verify(trained, card_file)
    return card


def _verify(trained: TrainedEnsemble, card_file: Path) -> None:
    """The written ensemble loads, matches torch, and predicts what the card's test fold saw."""
    model = SignalModel.load(card_file)
    last = trained.folds[-1]
    sessions = {m.architecture.name: m.session() for m in trained.members}
    for member in trained.members:
        check_parity(member, sessions[member.architecture.name], last.test.inputs)
    served = model.predict(last.test.inputs).probabilities
    if not np.array_equal(served, last.prediction.probabilities):
        raise RuntimeError("the written ensemble does not predict what its card measured")


def train_and_export(config: TrainingConfig, *, output: Path) -> ModelCard:
    """Train with ``config`` and write the ensemble and its card to ``output``."""
    return write_ensemble(train_ensemble(config), output)
