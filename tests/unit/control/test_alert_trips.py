"""Which risk alerts trip which EmergencyStop: a ban always, others when they breach its trigger."""

from __future__ import annotations

from decimal import Decimal

import pytest

from qtrader.contracts.messages import RiskAlert, RiskAlertKind
from qtrader.control.ess import EssMode, mode_restore
from qtrader.control.ess_applier import alert_trip
from qtrader.control.ess_resource import (
    ALWAYS_TRIPS,
    EmergencyStopSpec,
    EssTriggers,
    alert_trips,
    trigger_threshold,
)

TRIGGERS = EssTriggers(
    drawdown_pct="5",
    flash_crash_pct="15",
    stale_market_data_seconds=30,
    execution_error_rate=0.5,
)


def _alert(kind: RiskAlertKind, value: str) -> RiskAlert:
    return RiskAlert(
        alert_id=f"{kind.value}:1",
        alert_kind=kind,
        source="test",
        value=Decimal(value),
        threshold=Decimal(value),
        detail="",
        ts_ms=1,
    )


@pytest.mark.parametrize(
    ("kind", "value", "trips"),
    [
        (RiskAlertKind.DRAWDOWN, "4.9999", False),
        (RiskAlertKind.DRAWDOWN, "5", True),
        (RiskAlertKind.FLASH_CRASH, "14.99", False),
        (RiskAlertKind.FLASH_CRASH, "17.3548", True),
        (RiskAlertKind.STALE_MARKET_DATA, "29.9", False),
        (RiskAlertKind.STALE_MARKET_DATA, "30.001", True),
        (RiskAlertKind.EXECUTION_ERROR_RATE, "0.4", False),
        (RiskAlertKind.EXECUTION_ERROR_RATE, "0.6", True),
        (RiskAlertKind.EXCHANGE_BAN, "0", True),
    ],
)
def test_an_alert_trips_when_it_reaches_the_stops_threshold(
    kind: RiskAlertKind, value: str, trips: bool
) -> None:
    assert alert_trips(_alert(kind, value), TRIGGERS) is trips


@pytest.mark.parametrize("kind", [k for k in RiskAlertKind if k not in ALWAYS_TRIPS])
def test_without_its_trigger_no_alert_trips_but_a_ban_or_reconciliation_always_does(
    kind: RiskAlertKind,
) -> None:
    assert trigger_threshold(None, kind) is None
    assert not alert_trips(_alert(kind, "100"), None)
    assert not alert_trips(_alert(kind, "100"), EssTriggers())
    assert {
        RiskAlertKind.EXCHANGE_BAN,
        RiskAlertKind.RECONCILIATION,
        RiskAlertKind.WALLET_RECONCILIATION,
    } == ALWAYS_TRIPS
    for always in ALWAYS_TRIPS:
        assert alert_trips(_alert(always, "0"), None)


def test_alert_trip_when_it_breaches_an_armed_stop_then_an_automatic_patch_with_the_figures() -> (
    None
):
    spec = EmergencyStopSpec(triggers=TRIGGERS)
    trip = alert_trip(_alert(RiskAlertKind.DRAWDOWN, "9.35"), spec=spec, tripped_by="")
    assert trip is not None
    assert trip.tripped_by == "risk:drawdown"
    assert trip.spec_patch["tripped"] is True
    assert "(value 9.35, threshold 9.35)" in str(trip.spec_patch["reason"])
    assert alert_trip(_alert(RiskAlertKind.DRAWDOWN, "1"), spec=spec, tripped_by="") is None
    tripped = spec.with_patch({"tripped": True, "reason": "by hand"})
    ban = _alert(RiskAlertKind.EXCHANGE_BAN, "0")
    assert alert_trip(ban, spec=tripped, tripped_by="") is None  # a person's trip stays theirs


@pytest.mark.parametrize(
    "kind", [RiskAlertKind.RECONCILIATION, RiskAlertKind.WALLET_RECONCILIATION]
)
def test_a_reconciliation_alert_trips_to_reducing_by_default_and_remembers_the_mode(
    kind: RiskAlertKind,
) -> None:
    spec = EmergencyStopSpec()  # mode Halted, reconciliationMode Reducing: the defaults
    trip = alert_trip(_alert(kind, "1"), spec=spec, tripped_by="")
    assert trip is not None
    assert trip.spec_patch["mode"] == "Reducing"
    assert trip.mode_before is EssMode.HALTED
    assert trip.annotations == {
        "qtrader.dev/tripped-by": f"risk:{kind.value}",
        "qtrader.dev/mode-before-trip": "Halted",
    }
    assert mode_restore(trip.mode_before) == {"mode": "Halted"}


def test_a_trip_in_the_stops_own_mode_changes_no_mode() -> None:
    halting = EmergencyStopSpec(reconciliation_mode=EssMode.HALTED)
    trip = alert_trip(_alert(RiskAlertKind.RECONCILIATION, "1"), spec=halting, tripped_by="")
    assert trip is not None
    assert "mode" not in trip.spec_patch
    assert trip.mode_before is None
    ban = alert_trip(
        _alert(RiskAlertKind.EXCHANGE_BAN, "1"), spec=EmergencyStopSpec(), tripped_by=""
    )
    assert ban is not None
    assert "mode" not in ban.spec_patch  # every other kind trips in the stop's own mode
    assert mode_restore(None) == {}
