"""Training and export end to end: reproducible from a seed, the ONNX graphs compute what torch
trained, and the card's figures are what the written model and the backtest engine give.

Trains tiny ensembles (two symbols, a few hundred candles, one epoch) so the file runs in
seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="training and export need the train extra (torch)")

import onnx

from qtrader.backtest.engine import run_backtest
from qtrader.inference.card import ModelCard, read_card
from qtrader.inference.features import FEATURE_NAMES, SEQUENCE_FEATURE_NAMES
from qtrader.inference.onnx_model import ModelLoadError, SignalModel
from qtrader.research.dataset import examples_from_candles, round_trip_cost_bps
from qtrader.research.evaluation import classification_metrics
from qtrader.training.training import (
    OPSET,
    TrainedEnsemble,
    TrainingConfig,
    _fold_candles,
    _load_series,
    predict_probabilities,
    train_ensemble,
    view,
    write_ensemble,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"
TINY = TrainingConfig(
    seed=3,
    symbols=("BTCUSDT", "ETHUSDT"),
    candles_per_symbol=500,
    folds=2,
    epochs=1,
)


@pytest.fixture(scope="module")
def trained() -> TrainedEnsemble:
    return train_ensemble(TINY)


@pytest.fixture(scope="module")
def written(trained: TrainedEnsemble, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("model") / "tiny.json"
    write_ensemble(trained, output)
    return output


def test_training_when_repeated_with_one_seed_then_same_bytes_and_version(
    trained: TrainedEnsemble, written: Path, tmp_path: Path
) -> None:
    again = tmp_path / "again.json"
    write_ensemble(train_ensemble(TINY), again)
    first, second = read_card(written), read_card(again)
    assert isinstance(first, ModelCard)
    assert isinstance(second, ModelCard)
    assert [m.sha256 for m in first.members] == [m.sha256 for m in second.members]
    assert first.model_version == second.model_version
    assert first.evaluation == second.evaluation
    for a, b in zip(first.members, second.members, strict=True):
        assert (written.parent / a.file).read_bytes() == (again.parent / b.file).read_bytes()


def test_training_when_seed_differs_then_other_weights(trained: TrainedEnsemble) -> None:
    other = train_ensemble(dataclasses.replace(TINY, seed=4))
    assert [m.sha256 for m in other.members] != [m.sha256 for m in trained.members]


@pytest.mark.parametrize("batch_size", [1, 64, None])
def test_each_member_when_served_by_onnxruntime_then_matches_torch_within_1e_5(
    trained: TrainedEnsemble, written: Path, batch_size: int | None
) -> None:
    model = SignalModel.load(written)
    rows = trained.folds[-1].test.inputs.take(slice(0, batch_size))
    served = model.predict(rows)
    for member in trained.members:
        expected = predict_probabilities(member.net, view(rows, member.architecture.input_kind))
        got = served.members[member.architecture.name]
        assert got.shape == (rows.rows, 3)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_card_when_written_then_names_each_member_file_its_sha_and_opset(written: Path) -> None:
    card = read_card(written)
    assert isinstance(card, ModelCard)
    assert [m.name for m in card.members] == ["mlp", "tcn"]
    assert [m.file for m in card.members] == ["tiny.mlp.onnx", "tiny.tcn.onnx"]
    for member in card.members:
        data = (written.parent / member.file).read_bytes()
        assert hashlib.sha256(data).hexdigest() == member.sha256
        opsets = [o.version for o in onnx.load_from_string(data).opset_import if o.domain == ""]
        assert opsets == [member.opset] == [OPSET]
        assert member.parameters > 0
    assert sorted(p.name for p in written.parent.iterdir()) == sorted(
        ["tiny.json", "tiny.mlp.onnx", "tiny.tcn.onnx"]
    )
    assert card.features == FEATURE_NAMES
    assert card.sequence_features == SEQUENCE_FEATURE_NAMES
    assert card.seed == TINY.seed
    assert card.training.symbols == TINY.symbols
    assert card.training.candles == {"BTCUSDT": 500, "ETHUSDT": 500}
    assert card.training.source == "synthetic"
    assert card.training.folds == len(card.evaluation.folds) == 2


def test_card_when_read_then_the_test_fold_figures_are_what_the_written_model_gives(
    trained: TrainedEnsemble, written: Path
) -> None:
    card = read_card(written)
    assert isinstance(card, ModelCard)
    model = SignalModel.load(written)
    last = trained.folds[-1]
    threshold = card.evaluation.policy.risk.min_confidence
    recomputed = classification_metrics(
        model.predict(last.test.inputs).probabilities, last.test.labels, threshold=threshold
    )
    assert card.evaluation.test.ensemble == recomputed
    # The backtest figures come from the engine: the written model on the fold's candles
    # gives the card's figures again.
    series = _load_series(TINY)
    rerun = run_backtest(
        _fold_candles(series, last.fold),
        model,
        card.evaluation.policy,
        label_horizon=card.training.label_horizon_candles,
    )
    assert rerun.figures == card.evaluation.test.backtest
    # The engine's hit rate on the fold's signals is the card's hit rate on the fold.
    assert rerun.figures.directional_signals == card.evaluation.test.ensemble.directional_signals
    assert rerun.figures.signal_hit_rate == card.evaluation.test.ensemble.hit_rate


def test_card_when_read_then_folds_hold_out_what_their_models_never_saw(
    trained: TrainedEnsemble,
) -> None:
    series = _load_series(TINY)
    cost = round_trip_cost_bps(trained.policy.paper)
    examples = examples_from_candles(series, horizon=TINY.label_horizon, cost_bps=cost)
    for run in trained.folds:
        fold = run.fold
        assert run.evaluation.train_examples == int(
            np.sum(examples.label_end_ms < fold.test_from_ms)
        )
        assert int(run.test.open_time_ms.min()) >= fold.test_from_ms
    overall = trained.overall.ensemble.examples
    assert overall == sum(len(run.test) for run in trained.folds)


def test_written_model_when_its_card_is_swapped_for_another_seeds_then_refused(
    written: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other.json"
    write_ensemble(train_ensemble(dataclasses.replace(TINY, seed=9)), other)
    other.write_text(written.read_text().replace("tiny.", "other."))
    with pytest.raises(ModelLoadError, match="sha256"):
        SignalModel.load(other)


def test_training_when_given_kline_csvs_then_trains_on_them(tmp_path: Path) -> None:
    files = tuple(sorted(EXAMPLES.glob("*-1m-sample.csv")))
    config = dataclasses.replace(TINY, csv_files=files)
    card = write_ensemble(train_ensemble(config), tmp_path / "csv.json")
    assert card.training.source == "csv"
    assert card.training.symbols == ("BTCUSDT", "ETHUSDT")
    assert [f.name for f in card.training.files] == [f.name for f in files]
    assert card.training.files[0].sha256 == hashlib.sha256(files[0].read_bytes()).hexdigest()
    assert card.training.start_ms == 1_704_067_200_000
    assert card.training.regime is None
    SignalModel.load(tmp_path / "csv.json")


def test_training_when_too_few_candles_for_the_folds_then_value_error() -> None:
    with pytest.raises(ValueError, match="too few"):
        train_ensemble(dataclasses.replace(TINY, candles_per_symbol=120, folds=4))


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qtrader", "model", "train", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_cli_when_tiny_run_then_writes_the_ensemble_and_prints_its_figures(
    tmp_path: Path,
) -> None:
    output = tmp_path / "cli.json"
    result = run_cli(
        "--output", str(output), "--seed", "5", "--symbols", "BTCUSDT", "ETHUSDT",
        "--candles", "500", "--epochs", "1", "--folds", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    card = read_card(output)
    assert isinstance(card, ModelCard)
    assert card.model_version in result.stdout
    assert "fold 1" in result.stdout
    assert "overall" in result.stdout
    SignalModel.load(output)
    # Another process, the same seed and data: the same bytes (nothing of the run's source
    # paths or line numbers is in the graphs).
    here = train_ensemble(
        dataclasses.replace(TINY, seed=5, candles_per_symbol=500, symbols=("BTCUSDT", "ETHUSDT"))
    )
    assert [m.sha256 for m in card.members] == [m.sha256 for m in here.members]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--output", "model.txt"], "--output must name the card"),
        (["--output", "m.json", "--csv", "README.md", "--candles", "500"], "synthetic data only"),
        (["--output", "m.json", "--candles", "5"], "--candles"),
        (["--output", "m.json", "--symbols", "btc"], "is not a symbol"),
    ],
)
def test_cli_when_arguments_are_wrong_then_exit_2_saying_why(args: list[str], message: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
