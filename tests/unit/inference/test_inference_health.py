"""The inference role's ``model`` dependency: CRITICAL, DEGRADED or OK, and why."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from qtrader.health.contract import Status
from qtrader.inference.onnx_model import SignalModel, default_model_path
from qtrader.inference.service import model_health

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def test_health_when_no_model_then_critical_with_the_load_error() -> None:
    health = model_health(None, "cannot read model card /models/x.json", now=NOW)
    assert health.status is Status.CRITICAL
    assert health.detail == "cannot read model card /models/x.json"


def test_health_when_default_model_then_ok_with_version_and_members() -> None:
    model = SignalModel.load(default_model_path())
    health = model_health(model, "", now=NOW)
    assert health.status is Status.OK
    assert model.version in (health.detail or "")
    assert "mlp+tcn" in (health.detail or "")


def test_health_when_card_is_version_1_then_degraded_saying_so(legacy_model: Path) -> None:
    model = SignalModel.load(legacy_model)
    health = model_health(model, "", now=NOW)
    assert health.status is Status.DEGRADED
    assert "version 1 card" in (health.detail or "")


def test_health_when_card_created_in_the_future_then_degraded(model_copy: Path) -> None:
    card = model_copy
    document = json.loads(card.read_text())
    document["created_at"] = (NOW + timedelta(days=2)).isoformat()
    card.write_text(json.dumps(document))
    health = model_health(SignalModel.load(card), "", now=NOW)
    assert health.status is Status.DEGRADED
    assert "in the future" in (health.detail or "")
    # Within the clock-skew allowance it is fine.
    assert model_health(SignalModel.load(card), "", now=NOW + timedelta(days=2)).status is Status.OK
