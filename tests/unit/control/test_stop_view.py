"""What the live viewers are told of a stop after a round (``ess_applier.stop_view``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import get_args

from qtrader.contracts.messages import EmergencyStopView, EssStateName, TradingState, decode
from qtrader.control.ess import EssState, EssStatus, reconcile
from qtrader.control.ess_applier import StopInput, stop_view
from qtrader.control.ess_resource import EmergencyStopSpec

T0 = datetime(2026, 3, 2, 14, 0, tzinfo=UTC)


def _stop(**spec: object) -> StopInput:
    return StopInput(
        name="main",
        spec=EmergencyStopSpec.model_validate(spec),
        tripped_by="cli:alice" if spec.get("tripped") else "",
        generation=1,
        previous_conditions=(),
    )


def _tripped(stop: StopInput) -> EssStatus:
    spec = stop.spec.to_ess_spec(tripped_by=stop.tripped_by)
    return reconcile(spec=spec, status=EssStatus.initial(), now=T0).status


def test_the_wire_names_of_the_states_are_the_state_machines() -> None:
    assert set(get_args(EssStateName)) == {state.value for state in EssState}


def test_view_of_a_trip_says_who_why_since_when_and_until_when() -> None:
    stop = _stop(tripped=True, reason="exchange maintenance", cooldownSeconds=120)
    view = stop_view(stop, _tripped(stop), pending=["exec-1"], held_by=["main"], now=T0)
    assert view.state == "Tripped"
    assert view.latch is TradingState.HALTED
    assert (view.tripped_by, view.reason) == ("cli:alice", "exchange maintenance")
    assert view.tripped_at_ms == round(T0.timestamp() * 1000)
    assert view.cooldown_until_ms == view.tripped_at_ms + 120_000
    assert view.require_manual_reset is True
    assert (view.trip_count, view.pending_workers, view.held_by) == (1, ("exec-1",), ("main",))
    assert decode(view.encode(), EmergencyStopView) == view


def test_view_of_an_armed_stop_has_no_cooldown_and_a_reset_keeps_the_last_trip() -> None:
    stop = _stop(tripped=True, reason="drill", cooldownSeconds=0, requireManualReset=False)
    tripped = _tripped(stop)
    armed_spec = _stop(cooldownSeconds=0).spec.to_ess_spec(tripped_by="")
    later = T0 + timedelta(seconds=1)
    armed = reconcile(spec=armed_spec, status=tripped, now=later).status
    view = stop_view(_stop(), armed, pending=[], held_by=[], now=later)
    assert (view.state, view.latch, view.cooldown_until_ms) == ("Armed", TradingState.ACTIVE, None)
    assert view.tripped_by == "cli:alice"  # the last trip, for the post-mortem
    assert view.reset_count == 1
    assert view.ts_ms == round(later.timestamp() * 1000)
