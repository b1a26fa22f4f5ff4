"""The state machine's persisted status fits the EmergencyStop CRD's status schema.

The API server prunes status fields its schema does not declare, so a field the state machine
writes but the CRD lacks would vanish on the next read: an operator restart would lose it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from qtrader.control.ess import EssMode, EssSpec, EssStatus, reconcile

CRD = Path(__file__).resolve().parents[3] / "crds" / "emergencystops.qtrader.dev.yaml"
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def _status_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    status: dict[str, Any] = schema["properties"]["status"]
    return {**status, "additionalProperties": False}


def _persisted(status: EssStatus) -> dict[str, Any]:
    # None means "delete this field" in the merge patch; it is never stored.
    return {k: v for k, v in status.to_dict().items() if v is not None}


def _spec(*, tripped: bool, mode: EssMode = EssMode.HALTED) -> EssSpec:
    return EssSpec(
        tripped=tripped,
        reason="test" if tripped else "",
        mode=mode,
        cooldown_seconds=60,
        require_manual_reset=True,
        tripped_by="risk:drawdown",
        flatten_on_trip=False,
    )


def test_status_in_every_state_when_persisted_then_the_crd_declares_every_field() -> None:
    schema = _status_schema()
    armed = EssStatus.initial()
    tripped = reconcile(spec=_spec(tripped=True), status=armed, now=NOW).status
    reducing = reconcile(
        spec=_spec(tripped=True, mode=EssMode.REDUCING), status=armed, now=NOW
    ).status
    refused = reconcile(
        spec=_spec(tripped=False), status=tripped, now=NOW + timedelta(seconds=1)
    ).status
    for status in (armed, tripped, reducing, refused):
        jsonschema.validate(_persisted(status), schema)
    assert set(_persisted(refused)) >= {"tripMode", "automatic", "resetRefusedUntil"}
