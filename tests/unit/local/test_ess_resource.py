"""The EmergencyStop YAML model: the same fields, defaults, bounds and rules as the CRD."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from qtrader.control.ess_resource import (
    EmergencyStopError,
    EmergencyStopSpec,
    EssTriggers,
    default_emergency_stop,
    load_emergency_stop_file,
    parse_emergency_stop,
)
from qtrader.control.ess_status import EssMode

ROOT = Path(__file__).resolve().parents[3]
CRD = ROOT / "crds" / "emergencystops.qtrader.dev.yaml"
EXAMPLE = ROOT / "examples" / "emergencystop.yaml"


def _crd_spec_schema() -> dict[str, Any]:
    (document,) = [d for d in yaml.safe_load_all(CRD.read_text()) if d]
    (version,) = document["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return schema


def _defaults(schema: dict[str, Any]) -> dict[str, Any]:
    return {name: sub["default"] for name, sub in schema["properties"].items() if "default" in sub}


def _example() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return copy.deepcopy(document)


def _with_spec(**changes: Any) -> dict[str, Any]:
    document = _example()
    for key, value in changes.items():
        if key.startswith("triggers_"):
            document["spec"]["triggers"][key.removeprefix("triggers_")] = value
        else:
            document["spec"][key] = value
    return document


def test_the_example_parses_with_the_values_it_spells() -> None:
    stop = load_emergency_stop_file(EXAMPLE)
    assert stop.name == "main"
    assert stop.spec.cooldown_seconds == 300
    assert stop.spec.require_manual_reset is True
    assert stop.spec.triggers is not None
    assert stop.spec.triggers.drawdown_pct == "3"
    assert stop.spec.triggers.execution_error_rate == 0.2
    assert stop.spec.to_document() == _example()["spec"]


def test_the_models_defaults_equal_the_crds_defaults() -> None:
    schema = _crd_spec_schema()
    assert EmergencyStopSpec().to_document() == _defaults(schema)
    triggers = EmergencyStopSpec.model_validate({"triggers": {}}).to_document()["triggers"]
    assert triggers == _defaults(schema["properties"]["triggers"])


def test_the_model_has_exactly_the_crds_spec_fields_and_mode_values() -> None:
    schema = _crd_spec_schema()
    fields = {info.alias for info in EmergencyStopSpec.model_fields.values()}
    assert fields == set(schema["properties"])
    triggers = {info.alias for info in EssTriggers.model_fields.values()}
    assert triggers == set(schema["properties"]["triggers"]["properties"])
    assert {m.value for m in EssMode} == set(schema["properties"]["mode"]["enum"])


def test_a_minimal_document_is_armed_halting_with_a_five_minute_cooldown() -> None:
    stop = parse_emergency_stop(
        {"apiVersion": "qtrader.dev/v1alpha1", "kind": "EmergencyStop", "metadata": {"name": "x"}}
        | {"spec": {}}
    )
    assert stop.spec == default_emergency_stop("x").spec
    spec = stop.spec.to_ess_spec(tripped_by="")
    assert (spec.tripped, spec.mode, spec.cooldown_seconds) == (False, EssMode.HALTED, 300)
    assert spec.require_manual_reset is True


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"tripped": True, "reason": ""}, "spec: a reason is required when tripping"),
        ({"mode": "Paused"}, "spec.mode: Input should be 'Halted' or 'Reducing'"),
        ({"cooldownSeconds": -1}, "spec.cooldownSeconds: Input should be greater than or equal"),
        ({"cooldownSeconds": 86_401}, "spec.cooldownSeconds: Input should be less than or equal"),
        ({"cooldownSeconds": "5"}, "spec.cooldownSeconds: Input should be a valid integer"),
        ({"tripped": "yes", "reason": "x"}, "spec.tripped: Input should be a valid boolean"),
        ({"autoReset": True}, "spec.autoReset: Extra inputs are not permitted"),
        ({"reason": "x" * 1025}, "spec.reason: String should have at most 1024 characters"),
        (
            {"triggers_drawdownPct": "0"},
            "spec.triggers.drawdownPct: triggers.drawdownPct must be greater than 0 and at most",
        ),
        (
            {"triggers_flashCrashPct": "100.5"},
            "triggers.flashCrashPct must be greater than 0 and at most 100",
        ),
        ({"triggers_drawdownPct": "3%"}, "spec.triggers.drawdownPct: String should match"),
        ({"triggers_drawdownPct": 3}, "spec.triggers.drawdownPct: Input should be a valid string"),
        ({"triggers_flashCrashWindowSeconds": 0}, "spec.triggers.flashCrashWindowSeconds"),
        ({"triggers_staleMarketDataSeconds": 3601}, "spec.triggers.staleMarketDataSeconds"),
        ({"triggers_executionErrorRate": 0}, "spec.triggers.executionErrorRate"),
        ({"triggers_executionErrorRate": 1.5}, "spec.triggers.executionErrorRate"),
        ({"ackTimeoutSeconds": 0}, "spec.ackTimeoutSeconds"),
        ({"ackTimeoutSeconds": "5"}, "spec.ackTimeoutSeconds: Input should be a valid integer"),
    ],
)
def test_what_the_crd_rejects_the_model_rejects_naming_the_field(
    changes: dict[str, Any], expected: str
) -> None:
    with pytest.raises(EmergencyStopError, match="invalid EmergencyStop") as raised:
        parse_emergency_stop(_with_spec(**changes))
    assert expected in str(raised.value)


def test_a_tripped_stop_with_a_reason_is_accepted() -> None:
    stop = parse_emergency_stop(_with_spec(tripped=True, reason="maintenance", mode="Reducing"))
    spec = stop.spec.to_ess_spec(tripped_by="cli:ops")
    assert (spec.tripped, spec.reason, spec.mode) == (True, "maintenance", EssMode.REDUCING)
    assert spec.tripped_by == "cli:ops"


def test_tripped_by_comes_from_the_annotation() -> None:
    document = _example()
    document["metadata"]["annotations"] = {"qtrader.dev/tripped-by": "risk:drawdown"}
    assert parse_emergency_stop(document).tripped_by == "risk:drawdown"
    assert parse_emergency_stop(_example()).tripped_by == ""


def test_a_merge_patch_is_validated_like_the_api_server_does() -> None:
    spec = load_emergency_stop_file(EXAMPLE).spec
    tripped = spec.with_patch({"tripped": True, "reason": "manual"})
    assert (tripped.tripped, tripped.reason, tripped.cooldown_seconds) == (True, "manual", 300)
    assert tripped.triggers == spec.triggers
    with pytest.raises(EmergencyStopError, match="a reason is required when tripping"):
        spec.with_patch({"tripped": True})


def test_a_missing_spec_is_rejected() -> None:
    document = _example()
    del document["spec"]
    with pytest.raises(EmergencyStopError, match="spec: Field required"):
        parse_emergency_stop(document)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "must hold exactly one EmergencyStop, found 0"),
        (EXAMPLE.read_text() + "\n---\n" + EXAMPLE.read_text(), "found 2"),
        ("spec: [", "is not valid YAML"),
    ],
)
def test_a_file_without_exactly_one_emergency_stop_is_rejected(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "ess.yaml"
    path.write_text(text)
    with pytest.raises(EmergencyStopError, match=expected):
        load_emergency_stop_file(path)


def test_a_missing_file_is_reported_by_name(tmp_path: Path) -> None:
    with pytest.raises(EmergencyStopError, match="cannot read EmergencyStop file"):
        load_emergency_stop_file(tmp_path / "nope.yaml")
