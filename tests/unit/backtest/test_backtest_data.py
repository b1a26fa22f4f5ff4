"""Candle ranges for backtests and training: kline files joined per symbol, the synthetic market."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from qtrader.backtest.data import csv_series, interval_ms, synthetic_series, time_range
from qtrader.backtest.policy import evaluation_policy, policy_for

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "data"
BTC = EXAMPLES / "BTCUSDT-1m-sample.csv"
ETH = EXAMPLES / "ETHUSDT-1m-sample.csv"


@pytest.mark.parametrize(
    ("text", "ms"), [("1s", 1_000), ("1m", 60_000), ("15m", 900_000), ("4h", 14_400_000)]
)
def test_interval_ms_when_kline_interval_then_milliseconds(text: str, ms: int) -> None:
    assert interval_ms(text) == ms


@pytest.mark.parametrize("text", ["", "0m", "1M", "m", "1y"])
def test_interval_ms_when_not_an_interval_then_raises(text: str) -> None:
    with pytest.raises(ValueError, match="not a kline interval"):
        interval_ms(text)


def test_csv_series_when_two_symbols_then_each_in_ascending_time() -> None:
    series = csv_series([ETH, BTC])
    assert sorted(series) == ["BTCUSDT", "ETHUSDT"]
    assert [len(c) for c in series.values()] == [600, 600]
    for candles in series.values():
        times = [c.open_time_ms for c in candles]
        assert times == sorted(times)
    assert time_range(series) == (1_704_067_200_000, 1_704_067_200_000 + 600 * 60_000 - 1)


def test_csv_series_when_one_symbol_split_over_files_then_joined(tmp_path: Path) -> None:
    lines = BTC.read_text().splitlines()
    first, second = tmp_path / "BTCUSDT-1m-a.csv", tmp_path / "BTCUSDT-1m-b.csv"
    first.write_text("\n".join(lines[:301]) + "\n")
    second.write_text("\n".join(lines[301:]) + "\n")
    series = csv_series([second, first])
    assert len(series["BTCUSDT"]) == 600


def test_csv_series_when_a_candle_is_in_two_files_then_raises(tmp_path: Path) -> None:
    copy = tmp_path / "BTCUSDT-1m-copy.csv"
    shutil.copyfile(BTC, copy)
    with pytest.raises(ValueError, match="in two files"):
        csv_series([BTC, copy])


def test_csv_series_when_intervals_differ_then_raises(tmp_path: Path) -> None:
    other = tmp_path / "ETHUSDT-5m-sample.csv"
    shutil.copyfile(ETH, other)
    with pytest.raises(ValueError, match="different intervals"):
        csv_series([BTC, other])


def test_csv_series_when_no_files_then_raises() -> None:
    with pytest.raises(ValueError, match="no kline files"):
        csv_series([])


def test_synthetic_series_when_seeded_then_reproducible_and_interleaved_by_symbol() -> None:
    first = synthetic_series(symbols=("BTCUSDT", "ETHUSDT"), candles=50, seed=3)
    second = synthetic_series(symbols=("BTCUSDT", "ETHUSDT"), candles=50, seed=3)
    assert first == second
    assert [len(c) for c in first.values()] == [50, 50]
    assert all(c.symbol == "ETHUSDT" for c in first["ETHUSDT"])


@pytest.mark.parametrize(
    ("symbols", "candles", "message"),
    [(("BTCUSDT",), 0, "candles"), ((), 10, "symbols"), (("BTCUSDT", "BTCUSDT"), 10, "symbols")],
)
def test_synthetic_series_when_arguments_invalid_then_raises(
    symbols: tuple[str, ...], candles: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        synthetic_series(symbols=symbols, candles=candles, seed=1)


def test_policy_for_when_other_symbols_then_each_may_hold_a_position() -> None:
    template = evaluation_policy(("BTCUSDT", "ETHUSDT", "SOLUSDT"), min_confidence=0.5)
    spec = policy_for(("XRPUSDT",), template)
    assert spec.symbols == ("XRPUSDT",)
    assert spec.risk.max_open_positions == 1
    assert spec.risk.min_confidence == 0.5
    assert spec.paper == template.paper
