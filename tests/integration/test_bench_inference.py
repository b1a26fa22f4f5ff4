"""``qtrader bench inference`` runs, prints each figure beside its torch baseline, ends with one
JSON object, and holds onnxruntime to torch's outputs (speed is reported, never asserted)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the inference benchmark needs the train extra (torch)")

from qtrader_tools.benchmarks import inference

FIGURES = ("ort_p50_us", "ort_p99_us", "torch_p50_us", "torch_p99_us")


def test_bench_when_run_small_then_table_json_and_parity(tmp_path: Path) -> None:
    out = io.StringIO()
    json_path = tmp_path / "inference.json"
    code = inference.run(samples=30, batch=8, json_path=json_path, out=out)
    assert code == 0
    lines = out.getvalue().splitlines()
    result = json.loads(lines[-1])
    assert json.loads(json_path.read_text()) == result
    assert result["benchmark"] == "inference"
    assert result["samples"] == 30
    assert result["batch"] == 8
    assert result["parity_ok"] is True
    for name in ("mlp", "tcn", "ensemble"):
        for key in (*FIGURES, "ort_rows_per_s", "torch_rows_per_s"):
            assert result[f"{name}_{key}"] > 0
        assert result[f"{name}_ort_p50_us"] <= result[f"{name}_ort_p99_us"]
        assert result[f"{name}_max_abs_diff"] <= 1e-5
        rows = [line for line in lines if line.startswith(f"{name} ")]
        assert len(rows) == 3
        assert all(line.rstrip().endswith("x") for line in rows)
    assert "batch-8 throughput" in out.getvalue()


def test_bench_when_torch_is_missing_then_exit_1_naming_the_train_extra() -> None:
    probe = (
        "import sys; sys.modules['torch'] = None; "
        "from qtrader_tools.benchmarks import inference; sys.exit(inference.run(samples=10))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 1
    assert "train extra" in result.stderr
    assert result.stdout == ""
