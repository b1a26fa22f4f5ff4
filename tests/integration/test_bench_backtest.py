"""``qtrader bench backtest`` runs and reports every row; its speed is never asserted."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from qtrader_tools.benchmarks import backtest

pytestmark = pytest.mark.integration


def test_bench_backtest_when_run_small_then_every_row_and_the_same_candles(tmp_path: Path) -> None:
    out = io.StringIO()
    figures_path = tmp_path / "figures.json"
    code = backtest.run(
        candles=1_000, symbols=2, repeats=1, growth=False, json_path=figures_path, out=out
    )
    assert code == 0
    figures = json.loads(figures_path.read_text())
    rows = figures["rows"]
    assert rows["streamed"]["candles"] == 2_000
    assert rows["floor (read + features + batched inference)"]["candles"] == 2_000
    assert all(row["seconds"] > 0 for row in rows.values())
    assert "floor (read + features + batched inference)" in out.getvalue()
