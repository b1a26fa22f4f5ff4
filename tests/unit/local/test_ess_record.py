"""The local EmergencyStop record: camelCase on the wire, a status the CRD would accept."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from qtrader.contracts.messages import (
    MessageRejected,
    RiskAlert,
    RiskAlertKind,
    TradingState,
    decode,
)
from qtrader.control.ess import EssMode, reconcile
from qtrader.control.ess_applier import alert_trip
from qtrader.control.ess_resource import (
    Acknowledgement,
    load_emergency_stop_file,
    status_document,
)
from qtrader.control.ess_status import EssState, EssStatus
from qtrader.local.control_plane import EssRecord

ROOT = Path(__file__).resolve().parents[3]
NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def _status_schema() -> dict[str, Any]:
    (document,) = [
        d for d in yaml.safe_load_all((ROOT / "crds/emergencystops.qtrader.dev.yaml").read_text())
    ]
    (version,) = document["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    return schema


def _record(**status: Any) -> EssRecord:
    spec = load_emergency_stop_file(ROOT / "examples/emergencystop.yaml").spec
    return EssRecord(name="main", generation=1, spec=spec, status=status)


def _tripped_status() -> EssStatus:
    record = _record()
    spec = record.spec.with_patch({"tripped": True, "reason": "test"})
    return reconcile(
        spec=spec.to_ess_spec(tripped_by="cli:ops"), status=EssStatus.initial(), now=NOW
    ).status


def test_record_when_encoded_then_the_spec_is_camel_case_and_it_decodes_back() -> None:
    record = _record(**_tripped_status().to_dict())
    data = record.encode()
    assert b'"cooldownSeconds":300' in data
    assert b'"requireManualReset":true' in data
    assert decode(data, EssRecord) == record


def test_record_when_its_status_is_malformed_then_decode_rejects_it_naming_the_field() -> None:
    data = _record().encode().replace(b'"status":{}', b'"status":{"tripCount":"many"}')
    with pytest.raises(MessageRejected, match=r"status\.tripCount"):
        decode(data, EssRecord)


def test_record_when_shown_as_a_resource_then_reads_like_kubectl_get() -> None:
    record = _record().with_spec(_record().spec.with_patch({"tripped": True, "reason": "x"}))
    record = record.model_copy(update={"tripped_by": "cli:ops"})
    resource = record.to_resource()
    assert resource["apiVersion"] == "qtrader.dev/v1alpha1"
    assert resource["kind"] == "EmergencyStop"
    assert resource["metadata"] == {
        "name": "main",
        "generation": 2,
        "annotations": {"qtrader.dev/tripped-by": "cli:ops"},
    }
    assert resource["spec"]["tripped"] is True


def test_status_document_when_tripped_with_acks_then_the_crd_status_schema_accepts_it() -> None:
    status = _tripped_status()
    ack = Acknowledgement(
        worker="exec-1",
        revision=status.latch_revision,
        at=NOW + timedelta(milliseconds=3),
        state=TradingState.HALTED,
        open_orders_cancelled=2,
    )
    document = status_document(
        status,
        generation=2,
        now=NOW,
        previous_conditions=[],
        acknowledgements=[ack],
        pending_workers=["exec-2"],
    )
    present = {k: v for k, v in document.items() if v is not None}
    jsonschema.validate(present, _status_schema())
    assert present["state"] == EssState.TRIPPED.value
    assert present["observedGeneration"] == 2
    assert present["acknowledgements"] == [
        {
            "worker": "exec-1",
            "revision": 1,
            "at": "2025-01-02T03:04:05.003000Z",
            "state": "HALTED",
            "openOrdersCancelled": 2,
        }
    ]
    assert present["pendingWorkers"] == ["exec-2"]
    halted = [c for c in present["conditions"] if c["type"] == "Halted"]
    assert halted[0]["status"] == "True"
    assert EssStatus.from_dict(present) == status


def test_with_spec_when_the_spec_is_reset_then_who_tripped_it_is_dropped() -> None:
    tripped = _record().with_spec(
        _record().spec.with_patch({"tripped": True, "reason": "auto"}), tripped_by="risk:drawdown"
    )
    assert tripped.ess_spec().tripped_by == "risk:drawdown"
    reset = tripped.with_spec(tripped.spec.with_patch({"tripped": False}))
    assert reset.tripped_by == ""
    retripped = reset.with_spec(reset.spec.with_patch({"tripped": True, "reason": "by hand"}))
    assert retripped.ess_spec().tripped_by == "kubectl"  # a person's, never automatic


def test_with_spec_when_a_reconciliation_trip_is_reset_then_the_stops_mode_comes_back() -> None:
    record = _record()
    alert = RiskAlert(
        alert_id="reconciliation:1",
        alert_kind=RiskAlertKind.RECONCILIATION,
        source="test",
        value=Decimal(1),
        threshold=Decimal(0),
        detail="BTCUSDT: venue 0.1, ledger 0",
        ts_ms=1,
    )
    trip = alert_trip(alert, spec=record.spec, tripped_by="")
    assert trip is not None
    tripped = record.with_spec(
        record.spec.with_patch(trip.spec_patch),
        tripped_by=trip.tripped_by,
        mode_before_trip=trip.mode_before,
    )
    assert tripped.spec.mode is EssMode.REDUCING
    assert tripped.to_resource()["metadata"]["annotations"]["qtrader.dev/mode-before-trip"] == (
        "Halted"
    )
    reset = tripped.with_spec(tripped.spec.with_patch({"tripped": False}))
    assert reset.spec.mode is EssMode.HALTED
    assert reset.mode_before_trip is None
    assert reset.to_resource()["metadata"]["annotations"] == {}
