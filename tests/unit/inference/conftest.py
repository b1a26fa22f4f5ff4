"""Fixtures of the inference tests: copies of the shipped model to break, a version 1 card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qtrader.inference.card import ModelCard, card_path, read_card
from qtrader.inference.features import FEATURE_NAMES, WINDOW
from qtrader.inference.onnx_model import default_model_path


@pytest.fixture
def model_copy(tmp_path: Path) -> Path:
    """A copy of the default card and its members, free to be broken by the test."""
    source = default_model_path()
    for path in source.parent.glob(f"{source.stem}.*"):
        shutil.copyfile(path, tmp_path / path.name)
    return tmp_path / source.name


@pytest.fixture
def legacy_model(tmp_path: Path) -> Path:
    """A version 1 layout: NAME.onnx (a features graph) beside its single-model card."""
    card = read_card(default_model_path())
    assert isinstance(card, ModelCard)
    mlp = next(m for m in card.members if m.input == "features")
    onnx_file = tmp_path / "old.onnx"
    shutil.copyfile(default_model_path().parent / mlp.file, onnx_file)
    document = {
        "card_version": 1,
        "model_version": "mlp-s7-legacy",
        "created_at": "2026-01-01T00:00:00Z",
        "onnx_sha256": mlp.sha256,
        "opset": 20,
        "features": list(FEATURE_NAMES),
        "window": WINDOW,
        "classes": ["SHORT", "FLAT", "LONG"],
        "training_data": {
            "source": "synthetic",
            "regime": "mixed",
            "symbols": ["BTCUSDT"],
            "interval": "1m",
            "start_ms": 0,
            "end_ms": 1,
            "candles_per_symbol": 100,
            "held_out_from_ms": 1,
            "label_horizon_candles": 5,
            "round_trip_fee_bps": 8.0,
        },
        "held_out_metrics": {"accuracy": 0.5},
        "seed": 7,
    }
    card_path(onnx_file).write_text(json.dumps(document))
    return onnx_file
