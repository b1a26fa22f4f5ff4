"""``qtrader backtest`` as a user runs it: figures from the engine, exit codes and messages."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from qtrader.backtest.data import csv_series, synthetic_series
from qtrader.backtest.engine import run_backtest
from qtrader.backtest.policy import policy_for
from qtrader.contracts.policy import load_policy_file
from qtrader.inference.card import ModelCard
from qtrader.inference.onnx_model import SignalModel, default_model_path
from qtrader.marketdata.synthetic import Regime

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BTC = ROOT / "examples" / "data" / "BTCUSDT-1m-sample.csv"
ETH = ROOT / "examples" / "data" / "ETHUSDT-1m-sample.csv"
POLICY = ROOT / "examples" / "policy.yaml"


def backtest(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qtrader", "backtest", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )


def last_json(stdout: str) -> dict[str, object]:
    document: dict[str, object] = json.loads(stdout.strip().splitlines()[-1])
    return document


def test_backtest_when_csv_given_then_prints_the_figures_of_the_engine() -> None:
    result = backtest("--csv", str(BTC), str(ETH), "--json")
    assert result.returncode == 0, result.stderr
    document = last_json(result.stdout)
    model = SignalModel.load(default_model_path())
    card = model.card
    assert isinstance(card, ModelCard)
    series = csv_series([BTC, ETH])
    expected = run_backtest(
        series,
        model,
        policy_for(tuple(series), card.evaluation.policy),
        label_horizon=card.training.label_horizon_candles,
    )
    assert document["model_version"] == model.version
    assert document["symbols"] == ["BTCUSDT", "ETHUSDT"]
    assert document["figures"] == expected.figures.model_dump(mode="json")


def test_backtest_when_one_process_asked_then_the_same_figures_as_with_a_prediction_process() -> (
    None
):
    """On this 2-core machine ``--csv`` reads and predicts in a second process by default."""
    beside = backtest("--csv", str(BTC), str(ETH), "--json")
    alone = backtest("--csv", str(BTC), str(ETH), "--json", "--one-process")
    assert beside.returncode == alone.returncode == 0, beside.stderr + alone.stderr
    assert last_json(beside.stdout) == last_json(alone.stdout)


def test_backtest_when_table_asked_then_every_card_figure_is_printed() -> None:
    result = backtest("--csv", str(BTC))
    assert result.returncode == 0, result.stderr
    for label in (
        "final equity",
        "return",
        "max drawdown",
        "Sharpe",
        "sqrt(525600 candles/year)",
        "fees",
        "trades (fills)",
        "hit rate",
        "win rate",
        "denied signals",
    ):
        assert label in result.stdout


def test_backtest_when_synthetic_with_a_policy_then_runs_under_that_policy() -> None:
    result = backtest(
        "--synthetic", "--symbols", "BTCUSDT", "SOLUSDT", "--candles", "150", "--seed", "3",
        "--regime", "trend", "--policy", str(POLICY), "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    document = last_json(result.stdout)
    spec = load_policy_file(POLICY).spec
    model = SignalModel.load(default_model_path())
    series = synthetic_series(
        symbols=("BTCUSDT", "SOLUSDT"), candles=150, seed=3, regime=Regime.TREND
    )
    expected = run_backtest(series, model, spec)
    assert document["min_confidence"] == spec.risk.min_confidence
    assert document["figures"] == expected.figures.model_dump(mode="json")


def test_backtest_when_liquidity_is_limited_then_the_engines_figures_with_partial_fills() -> None:
    result = backtest("--synthetic", "--candles", "400", "--max-volume-share", "0.5", "--json")
    assert result.returncode == 0, result.stderr
    document = last_json(result.stdout)
    model = SignalModel.load(default_model_path())
    card = model.card
    assert isinstance(card, ModelCard)
    series = synthetic_series(symbols=("BTCUSDT", "ETHUSDT", "SOLUSDT"), candles=400, seed=7)
    expected = run_backtest(
        series,
        model,
        policy_for(tuple(series), card.evaluation.policy),
        label_horizon=card.training.label_horizon_candles,
        max_volume_share=Decimal("0.5"),
    )
    unlimited = run_backtest(
        series,
        model,
        policy_for(tuple(series), card.evaluation.policy),
        label_horizon=card.training.label_horizon_candles,
    )
    assert document["figures"] == expected.figures.model_dump(mode="json")
    assert expected.figures != unlimited.figures  # the liquidity changed what traded


def test_backtest_when_model_given_then_that_model_trades(tmp_path: Path) -> None:
    source = default_model_path()
    for path in source.parent.glob(f"{source.stem}.*"):
        shutil.copyfile(path, tmp_path / path.name)
    card = tmp_path / source.name
    document = json.loads(card.read_text())
    document["model_version"] = "copy-of-default"
    card.write_text(json.dumps(document))
    result = backtest("--synthetic", "--candles", "60", "--model", str(card), "--json")
    assert result.returncode == 0, result.stderr
    assert last_json(result.stdout)["model_version"] == "copy-of-default"


def broken_csv(tmp_path: Path) -> Path:
    path = tmp_path / "BTCUSDT-1m-broken.csv"
    lines = BTC.read_text().splitlines()
    lines[5] = lines[5].replace(",", ";", 1)
    path.write_text("\n".join(lines) + "\n")
    return path


def tampered_model(tmp_path: Path) -> Path:
    source = default_model_path()
    for path in source.parent.glob(f"{source.stem}.*"):
        shutil.copyfile(path, tmp_path / path.name)
    member = next(tmp_path.glob("*.tcn.onnx"))
    member.write_bytes(member.read_bytes() + b"\0")
    return tmp_path / source.name


def bad_policy(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY.read_text().replace("minConfidence: 0.45", "minConfidence: 7"))
    return path


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda tmp: [], "one of the arguments --csv --synthetic is required"),
        (lambda tmp: ["--csv", str(BTC), "--synthetic"], "not allowed with argument"),
        (lambda tmp: ["--csv", str(tmp / "absent.csv")], "no such file"),
        (lambda tmp: ["--synthetic", "--candles", "0"], "--candles: must be 1-1000000"),
        (lambda tmp: ["--synthetic", "--max-volume-share", "0"], "must be a positive number"),
        (lambda tmp: ["--synthetic", "--max-volume-share", "1.5"], "must be at most 1"),
        (lambda tmp: ["--synthetic", "--symbols", "btc"], "is not a symbol"),
        (
            lambda tmp: ["--csv", str(BTC), "--symbols", "BTCUSDT"],
            "--symbols apply to --synthetic data",
        ),
        (lambda tmp: ["--csv", str(broken_csv(tmp))], "BTCUSDT-1m-broken.csv, line 6"),
        (lambda tmp: ["--synthetic", "--model", str(tampered_model(tmp))], "has sha256"),
        (lambda tmp: ["--synthetic", "--policy", str(bad_policy(tmp))], "minConfidence"),
        (
            lambda tmp: ["--synthetic", "--symbols", "XRPUSDT", "--policy", str(POLICY)],
            "the data has XRPUSDT, which the policy",
        ),
        (
            lambda tmp: ["--synthetic", "--symbols", "FOOUSDT"],
            "FOOUSDT is not listed by the exchange",
        ),
    ],
)
def test_backtest_when_input_is_wrong_then_exit_2_with_what_is_wrong(
    make_args: object, message: str, tmp_path: Path
) -> None:
    assert callable(make_args)
    result = backtest(*make_args(tmp_path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert result.stdout == ""
