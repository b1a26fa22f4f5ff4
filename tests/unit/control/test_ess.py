"""The EmergencyStop state machine: every transition, idempotence, persistence, acks, conditions."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qtrader.contracts.messages import TradingState
from qtrader.control.ess import (
    TRIPPED_BY_ANNOTATION,
    EssEventReason,
    EssMode,
    EssSpec,
    EssState,
    EssStatus,
    EventType,
    Transition,
    ack_overdue,
    automatic_trip_patch,
    clear_tripped_by,
    latch_message,
    pending_acks,
    reconcile,
    trip_issuer,
)
from qtrader.control.ess_conditions import status_conditions
from qtrader.control.open_positions import PositionsSeen, StackPositions

T0 = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)
COOLDOWN_S = 300
RESETS = {EssEventReason.RESET, EssEventReason.COOLDOWN_ENDED, EssEventReason.AUTO_RESET}


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def make_spec(**changes: Any) -> EssSpec:
    base = EssSpec(
        tripped=False,
        reason="",
        mode=EssMode.HALTED,
        cooldown_seconds=COOLDOWN_S,
        require_manual_reset=False,
        tripped_by="kubectl",
        flatten_on_trip=False,
    )
    return replace(base, **changes)


def tripped_status(spec: EssSpec, *, now: datetime = T0) -> EssStatus:
    """The status right after ``spec`` (tripped) was reconciled from Armed at ``now``."""
    return reconcile(spec=replace(spec, tripped=True), status=EssStatus.initial(), now=now).status


def reasons(transition: Transition) -> list[EssEventReason]:
    return [event.reason for event in transition.events]


def assert_settled(spec: EssSpec, transition: Transition, *, now: datetime) -> None:
    """Reconciling again, with the spec patch applied, changes nothing and says nothing."""
    patched = spec.with_patch(transition.spec_patch or {})
    again = reconcile(spec=patched, status=transition.status, now=now)
    assert again.status == transition.status
    assert again.events == ()
    assert not again.latch_changed
    assert again.spec_patch is None


# --- Armed ------------------------------------------------------------------------------------


def test_initial_status_is_armed_with_zero_counts_and_an_active_latch() -> None:
    status = EssStatus.initial()
    assert status.state is EssState.ARMED
    assert (status.trip_count, status.reset_count, status.latch_revision) == (0, 0, 0)
    assert status.latch is TradingState.ACTIVE


def test_reconcile_when_armed_and_not_tripped_then_nothing_happens() -> None:
    t = reconcile(spec=make_spec(), status=EssStatus.initial(), now=T0)
    assert t.status == EssStatus.initial()
    assert (t.latch, t.latch_changed, t.events, t.spec_patch) == (
        TradingState.ACTIVE,
        False,
        (),
        None,
    )
    assert t.requeue_after is None


@pytest.mark.parametrize(
    ("mode", "state", "latch"),
    [
        (EssMode.HALTED, EssState.TRIPPED, TradingState.HALTED),
        (EssMode.REDUCING, EssState.REDUCING, TradingState.REDUCING),
    ],
)
def test_reconcile_when_armed_and_tripped_then_halt_in_force_with_cooldown_and_new_latch(
    mode: EssMode, state: EssState, latch: TradingState
) -> None:
    spec = make_spec(tripped=True, reason="manual stop", mode=mode)
    t = reconcile(spec=spec, status=EssStatus.initial(), now=T0)
    assert t.status.state is state
    assert (t.latch, t.latch_changed, t.status.latch_revision) == (latch, True, 1)
    assert t.status.tripped_at == T0
    assert t.status.cooldown_until == at(COOLDOWN_S)
    assert (t.status.tripped_by, t.status.reason, t.status.trip_count) == (
        "kubectl",
        "manual stop",
        1,
    )
    assert t.status.trip_mode is mode
    assert not t.status.automatic
    assert [(e.type, e.reason) for e in t.events] == [(EventType.WARNING, EssEventReason.TRIPPED)]
    assert "until 2025-01-06T09:05:00Z" in t.events[0].message
    assert t.requeue_after is None  # a person's trip: nothing happens by itself at the cooldown end
    assert not t.flatten
    assert_settled(spec, t, now=T0)


def test_reconcile_when_trip_asks_to_flatten_then_the_transition_says_flatten_once() -> None:
    spec = make_spec(tripped=True, flatten_on_trip=True)
    t = reconcile(spec=spec, status=EssStatus.initial(), now=T0)
    assert t.flatten
    assert "flattened" in t.events[0].message
    assert not reconcile(spec=spec, status=t.status, now=at(1)).flatten


def test_reconcile_when_an_alert_trips_then_automatic_and_requeued_at_cooldown_end() -> None:
    spec = make_spec(tripped=True, tripped_by="risk:drawdown", reason="auto: drawdown: 5%")
    t = reconcile(spec=spec, status=EssStatus.initial(), now=T0)
    assert t.status.automatic
    assert t.requeue_after == COOLDOWN_S
    assert "resets itself" in t.events[0].message


# --- mode changes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "after", "state", "latch"),
    [
        (EssMode.HALTED, EssMode.REDUCING, EssState.REDUCING, TradingState.REDUCING),
        (EssMode.REDUCING, EssMode.HALTED, EssState.TRIPPED, TradingState.HALTED),
    ],
)
def test_reconcile_when_tripped_and_mode_changes_then_switches_without_new_trip_or_cooldown(
    before: EssMode, after: EssMode, state: EssState, latch: TradingState
) -> None:
    status = tripped_status(make_spec(mode=before))
    spec = make_spec(tripped=True, mode=after)
    t = reconcile(spec=spec, status=status, now=at(30))
    assert (t.status.state, t.latch, t.latch_changed) == (state, latch, True)
    assert t.status.latch_revision == status.latch_revision + 1
    assert (t.status.trip_count, t.status.cooldown_until) == (1, status.cooldown_until)
    assert reasons(t) == [EssEventReason.MODE_CHANGED]
    assert_settled(spec, t, now=at(30))


# --- resets -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(EssMode))
def test_reconcile_when_reset_inside_cooldown_without_manual_reset_then_cooling_down_and_halt_kept(
    mode: EssMode,
) -> None:
    status = tripped_status(make_spec(mode=mode))
    spec = make_spec(mode=mode)
    t = reconcile(spec=spec, status=status, now=at(100))
    assert t.status.state is EssState.COOLING_DOWN
    assert t.latch is status.latch
    assert not t.latch_changed
    assert t.status.latch_revision == status.latch_revision
    assert t.status.reset_refused_until == at(COOLDOWN_S)
    assert [(e.type, e.reason) for e in t.events] == [
        (EventType.WARNING, EssEventReason.RESET_DEFERRED)
    ]
    assert "complete at 2025-01-06T09:05:00Z" in t.events[0].message
    assert t.requeue_after == COOLDOWN_S - 100
    assert t.spec_patch is None
    assert_settled(spec, t, now=at(100))


def test_reconcile_when_reset_in_cooldown_under_manual_reset_then_refused_spec_set_back() -> None:
    status = tripped_status(make_spec(require_manual_reset=True, reason="manual stop"))
    spec = make_spec(require_manual_reset=True)  # the reset also cleared the reason
    t = reconcile(spec=spec, status=status, now=at(100))
    assert t.status.state is EssState.TRIPPED
    assert t.status.reset_refused_until == at(COOLDOWN_S)
    assert (t.latch, t.latch_changed) == (TradingState.HALTED, False)
    assert t.spec_patch == {"tripped": True, "reason": "manual stop"}  # the CRD wants a reason
    assert reasons(t) == [EssEventReason.RESET_REFUSED]
    assert "runs until 2025-01-06T09:05:00Z" in t.events[0].message
    assert t.requeue_after == COOLDOWN_S - 100  # the ResetRefused condition turns False then
    assert_settled(spec, t, now=at(100))


def test_reconcile_when_reset_refused_and_mode_changed_together_then_both_apply() -> None:
    status = tripped_status(make_spec(require_manual_reset=True))
    spec = make_spec(require_manual_reset=True, mode=EssMode.REDUCING)
    t = reconcile(spec=spec, status=status, now=at(100))
    assert reasons(t) == [EssEventReason.RESET_REFUSED, EssEventReason.MODE_CHANGED]
    assert (t.status.state, t.latch, t.latch_changed) == (
        EssState.REDUCING,
        TradingState.REDUCING,
        True,
    )
    assert t.status.latch_revision == status.latch_revision + 1
    assert_settled(spec, t, now=at(100))


@pytest.mark.parametrize("require_manual_reset", [False, True])
@pytest.mark.parametrize("mode", list(EssMode))
def test_reconcile_when_reset_after_cooldown_then_armed_with_active_latch_and_reason_cleared(
    mode: EssMode, require_manual_reset: bool
) -> None:
    spec = make_spec(mode=mode, require_manual_reset=require_manual_reset, reason="stop")
    status = tripped_status(spec)
    t = reconcile(spec=spec, status=status, now=at(COOLDOWN_S))
    assert t.status.state is EssState.ARMED
    assert (t.latch, t.latch_changed) == (TradingState.ACTIVE, True)
    assert t.status.latch_revision == status.latch_revision + 1
    assert (t.status.reset_count, t.status.trip_count) == (1, 1)
    assert (t.status.reason, t.status.reset_refused_until, t.status.trip_mode) == ("", None, None)
    assert (t.status.tripped_at, t.status.tripped_by) == (T0, "kubectl")  # the last trip
    assert [(e.type, e.reason) for e in t.events] == [(EventType.NORMAL, EssEventReason.RESET)]
    assert t.requeue_after is None
    assert_settled(spec, t, now=at(COOLDOWN_S))


def test_reconcile_when_cooling_down_and_cooldown_still_runs_then_nothing_but_requeue() -> None:
    spec = make_spec()
    cooling = reconcile(spec=spec, status=tripped_status(spec), now=at(100)).status
    t = reconcile(spec=spec, status=cooling, now=at(250))
    assert (t.status, t.events, t.latch_changed) == (cooling, (), False)
    assert t.requeue_after == COOLDOWN_S - 250


@pytest.mark.parametrize("mode", list(EssMode))
def test_reconcile_when_cooling_down_and_cooldown_ends_then_the_deferred_reset_completes(
    mode: EssMode,
) -> None:
    spec = make_spec(mode=mode)
    cooling = reconcile(spec=spec, status=tripped_status(spec), now=at(100))
    assert cooling.requeue_after == COOLDOWN_S - 100
    t = reconcile(spec=spec, status=cooling.status, now=at(100 + cooling.requeue_after))
    assert t.status.state is EssState.ARMED
    assert (t.latch, t.latch_changed) == (TradingState.ACTIVE, True)
    assert (t.status.reset_count, t.status.reset_refused_until) == (1, None)
    assert [(e.type, e.reason) for e in t.events] == [
        (EventType.NORMAL, EssEventReason.COOLDOWN_ENDED)
    ]
    assert_settled(spec, t, now=at(COOLDOWN_S))


@pytest.mark.parametrize(
    ("mode", "state", "latch_changed"),
    [(EssMode.HALTED, EssState.TRIPPED, False), (EssMode.REDUCING, EssState.REDUCING, True)],
)
def test_reconcile_when_cooling_down_and_tripped_again_then_reset_withdrawn_without_new_trip(
    mode: EssMode, state: EssState, latch_changed: bool
) -> None:
    spec = make_spec()
    cooling = reconcile(spec=spec, status=tripped_status(spec), now=at(100)).status
    retrip = make_spec(tripped=True, mode=mode)
    t = reconcile(spec=retrip, status=cooling, now=at(200))
    assert t.status.state is state
    assert t.latch_changed is latch_changed
    assert (t.status.trip_count, t.status.cooldown_until) == (1, cooling.cooldown_until)
    assert t.status.reset_refused_until is None
    assert reasons(t) == [EssEventReason.RESET_WITHDRAWN]
    assert_settled(retrip, t, now=at(200))
    # and the withdrawn reset does not complete at the cooldown end
    later = reconcile(spec=retrip, status=t.status, now=at(COOLDOWN_S + 1))
    assert (later.status.state, later.events) == (state, ())


# --- automatic trips --------------------------------------------------------------------------


AUTO = make_spec(tripped=True, tripped_by="risk:drawdown", reason="auto: drawdown: 5%")


def test_reconcile_when_automatic_trip_cooldown_ends_then_armed_and_spec_patched() -> None:
    status = tripped_status(AUTO)
    t = reconcile(spec=AUTO, status=status, now=at(COOLDOWN_S))
    assert t.status.state is EssState.ARMED
    assert (t.latch, t.latch_changed, t.status.reset_count) == (TradingState.ACTIVE, True, 1)
    assert t.spec_patch == {"tripped": False, "reason": ""}
    assert [(e.type, e.reason) for e in t.events] == [(EventType.NORMAL, EssEventReason.AUTO_RESET)]
    assert_settled(AUTO, t, now=at(COOLDOWN_S))


def test_reconcile_when_automatic_trip_inside_cooldown_then_it_stays_tripped() -> None:
    status = tripped_status(AUTO)
    t = reconcile(spec=AUTO, status=status, now=at(COOLDOWN_S - 1))
    assert (t.status, t.events, t.spec_patch) == (status, (), None)
    assert t.requeue_after == 1


def test_reconcile_when_automatic_trip_needs_manual_reset_then_it_never_resets_itself() -> None:
    spec = replace(AUTO, require_manual_reset=True)
    status = tripped_status(spec)
    t = reconcile(spec=spec, status=status, now=at(COOLDOWN_S * 10))
    assert (t.status, t.events, t.spec_patch, t.requeue_after) == (status, (), None, None)


def test_reconcile_when_a_person_trips_and_cooldown_ends_then_it_stays_tripped() -> None:
    spec = make_spec(tripped=True)
    status = tripped_status(spec)
    t = reconcile(spec=spec, status=status, now=at(COOLDOWN_S * 10))
    assert (t.status, t.events, t.spec_patch, t.requeue_after) == (status, (), None, None)


def test_reconcile_when_automatic_trip_has_no_cooldown_then_halt_written_before_reset() -> None:
    spec = replace(AUTO, cooldown_seconds=0)
    tripped = reconcile(spec=spec, status=EssStatus.initial(), now=T0)
    assert (tripped.latch, tripped.requeue_after) == (TradingState.HALTED, 1.0)
    assert_settled(spec, tripped, now=T0)
    later = reconcile(spec=spec, status=tripped.status, now=at(1))
    assert reasons(later) == [EssEventReason.AUTO_RESET]


def test_reconcile_when_a_person_withdraws_reset_of_automatic_trip_then_stays_tripped() -> None:
    cooling = reconcile(spec=make_spec(), status=tripped_status(AUTO), now=at(100)).status
    retrip = make_spec(tripped=True, tripped_by="kubectl")
    t = reconcile(spec=retrip, status=cooling, now=at(200))
    assert (t.status.tripped_by, t.status.automatic) == ("kubectl", False)
    later = reconcile(spec=retrip, status=t.status, now=at(COOLDOWN_S * 10))
    assert (later.status.state, later.events) == (EssState.TRIPPED, ())


def test_reconcile_when_alert_withdraws_overdue_automatic_reset_then_resets_at_once() -> None:
    cooling = reconcile(spec=make_spec(), status=tripped_status(AUTO), now=at(100)).status
    t = reconcile(spec=AUTO, status=cooling, now=at(COOLDOWN_S + 5))
    assert reasons(t) == [EssEventReason.RESET_WITHDRAWN, EssEventReason.AUTO_RESET]
    assert (t.status.state, t.latch_changed, t.spec_patch) == (
        EssState.ARMED,
        True,
        {"tripped": False, "reason": ""},
    )
    assert t.status.latch_revision == cooling.latch_revision + 1  # one new revision per call
    assert_settled(AUTO, t, now=at(COOLDOWN_S + 5))


def test_automatic_trip_patch_when_armed_then_trips_with_reason_and_tripped_by_annotation() -> None:
    trip = automatic_trip_patch(alert_kind="drawdown", detail="5.2% > 5%", spec=make_spec())
    assert trip is not None
    assert trip.spec_patch == {"tripped": True, "reason": "auto: drawdown: 5.2% > 5%"}
    assert trip.tripped_by == "risk:drawdown"
    assert trip.annotations == {TRIPPED_BY_ANNOTATION: "risk:drawdown"}
    spec = replace(make_spec().with_patch(trip.spec_patch), tripped_by=trip.tripped_by)
    assert reconcile(spec=spec, status=EssStatus.initial(), now=T0).status.automatic


def test_trip_issuer_when_no_annotation_then_a_person_kubectl_and_not_automatic() -> None:
    spec = make_spec(tripped=True, reason="by hand", tripped_by=trip_issuer(None))
    status = reconcile(spec=spec, status=EssStatus.initial(), now=T0).status
    assert (status.tripped_by, status.automatic) == ("kubectl", False)
    assert trip_issuer("risk:drawdown") == "risk:drawdown"


@pytest.mark.parametrize(
    ("annotation", "tripped", "spec_patch", "cleared"),
    [
        ("risk:drawdown", False, None, True),  # a reset asked for: the trip it named is over
        ("risk:drawdown", True, {"tripped": False, "reason": ""}, True),  # an automatic reset
        ("risk:drawdown", True, None, False),  # the automatic trip in force keeps it
        (None, False, None, False),
        ("", False, None, False),
    ],
)
def test_clear_tripped_by_when_the_spec_is_not_tripped_then_the_annotation_goes(
    annotation: str | None, tripped: bool, spec_patch: dict[str, Any] | None, cleared: bool
) -> None:
    spec = make_spec(tripped=tripped, reason="r" if tripped else "")
    assert clear_tripped_by(annotation=annotation, spec=spec, spec_patch=spec_patch) is cleared


def test_a_person_trips_after_an_automatic_trip_was_reset_then_it_never_resets_itself() -> None:
    """The defect of issue 13: the annotation outlived the automatic trip's reset."""
    reset = reconcile(spec=make_spec(), status=tripped_status(AUTO), now=at(COOLDOWN_S))
    assert reset.status.state is EssState.ARMED
    assert clear_tripped_by(annotation="risk:drawdown", spec=make_spec(), spec_patch=None)
    manual = make_spec(tripped=True, reason="by hand", tripped_by=trip_issuer(None))
    tripped = reconcile(spec=manual, status=reset.status, now=at(COOLDOWN_S + 1))
    assert (tripped.status.tripped_by, tripped.status.automatic) == ("kubectl", False)
    later = reconcile(spec=manual, status=tripped.status, now=at(COOLDOWN_S * 10))
    assert (later.status.state, later.events, later.spec_patch) == (EssState.TRIPPED, (), None)


def test_automatic_trip_patch_when_already_tripped_then_none() -> None:
    assert automatic_trip_patch(alert_kind="drawdown", detail="x", spec=AUTO) is None


def test_automatic_trip_patch_when_detail_is_long_then_reason_fits_the_latch() -> None:
    trip = automatic_trip_patch(alert_kind="flash_crash", detail="x" * 5000, spec=make_spec())
    assert trip is not None
    assert len(str(trip.spec_patch["reason"])) == 1024


# --- lifecycle --------------------------------------------------------------------------------


def test_lifecycle_when_tripped_and_reset_several_times_then_counts_and_revisions_add_up() -> None:
    spec, status, now = make_spec(), EssStatus.initial(), T0
    written: list[tuple[int, TradingState]] = []

    def step(new_spec: EssSpec) -> Transition:
        nonlocal spec, status
        spec = new_spec
        t = reconcile(spec=spec, status=status, now=now)
        if t.latch_changed:
            written.append((t.status.latch_revision, latch_message(t.status, issued_at_ms=0).state))
        status = EssStatus.from_dict(t.status.to_dict())  # an operator restart between calls
        assert status == t.status
        return t

    for cycle in range(1, 4):
        t = step(replace(spec, tripped=True, reason=f"cycle {cycle}"))
        assert (t.status.state, t.status.trip_count) == (EssState.TRIPPED, cycle)
        now += timedelta(seconds=60)
        t = step(replace(spec, tripped=False))
        assert t.status.state is EssState.COOLING_DOWN
        assert t.requeue_after == COOLDOWN_S - 60
        now += timedelta(seconds=t.requeue_after)
        t = step(spec)
        assert (t.status.state, t.status.reset_count) == (EssState.ARMED, cycle)
        now += timedelta(seconds=600)
    assert written == [
        (revision, TradingState.HALTED if revision % 2 else TradingState.ACTIVE)
        for revision in range(1, 7)
    ]


# --- properties over all states ---------------------------------------------------------------

TRIPPERS = ["", "kubectl", "cli", "risk:drawdown", "risk:flash_crash"]
instants = st.integers(min_value=0, max_value=2400).map(at)
specs = st.builds(
    EssSpec,
    tripped=st.booleans(),
    reason=st.sampled_from(["", "manual stop", "auto: drawdown: 5%"]),
    mode=st.sampled_from(EssMode),
    cooldown_seconds=st.sampled_from([0, 1, 60, 300, 900]),
    require_manual_reset=st.booleans(),
    tripped_by=st.sampled_from(TRIPPERS),
    flatten_on_trip=st.booleans(),
)


@st.composite
def statuses(draw: st.DrawFn, times: st.SearchStrategy[datetime] = instants) -> EssStatus:
    state = draw(st.sampled_from(EssState))
    counts = st.integers(min_value=0, max_value=50)
    common: dict[str, Any] = {
        "trip_count": draw(counts),
        "reset_count": draw(counts),
        "latch_revision": draw(counts),
    }
    if state is EssState.ARMED:
        return EssStatus(
            tripped_at=draw(st.none() | times), tripped_by=draw(st.sampled_from(TRIPPERS)), **common
        )
    modes = {EssState.TRIPPED: [EssMode.HALTED], EssState.REDUCING: [EssMode.REDUCING]}
    tripped_at = draw(times)
    cooldown_until = tripped_at + timedelta(seconds=draw(st.sampled_from([0, 1, 60, 300, 900])))
    tripped_by = draw(st.sampled_from(TRIPPERS[1:]))
    return EssStatus(
        state=state,
        reason=draw(st.sampled_from(["", "stop"])),
        tripped_at=tripped_at,
        tripped_by=tripped_by,
        cooldown_until=cooldown_until,
        trip_mode=draw(st.sampled_from(modes.get(state, list(EssMode)))),
        automatic=tripped_by.startswith("risk:") and draw(st.booleans()),
        reset_refused_until=draw(st.none() | st.just(cooldown_until)),
        **common,
    )


@settings(max_examples=1000, database=None, deadline=None)
@given(spec=specs, status=statuses(), now=instants)
def test_reconcile_twice_then_the_second_call_changes_nothing(
    spec: EssSpec, status: EssStatus, now: datetime
) -> None:
    first = reconcile(spec=spec, status=status, now=now)
    assert_settled(spec, first, now=now)
    patched = spec.with_patch(first.spec_patch or {})
    assert (
        reconcile(spec=patched, status=first.status, now=now).requeue_after == first.requeue_after
    )


@settings(max_examples=1000, database=None, deadline=None)
@given(spec=specs, status=statuses(), now=instants)
def test_reconcile_then_latch_follows_status_and_revision_moves_once_per_change(
    spec: EssSpec, status: EssStatus, now: datetime
) -> None:
    t = reconcile(spec=spec, status=status, now=now)
    assert t.latch is t.status.latch
    assert t.latch_changed == (t.latch is not status.latch)
    assert t.status.latch_revision == status.latch_revision + int(t.latch_changed)
    assert t.status.trip_count - status.trip_count in (0, 1)
    if t.requeue_after is not None:
        assert t.requeue_after >= 1.0


@settings(max_examples=1000, database=None, deadline=None)
@given(spec=specs, status=statuses(), now=instants)
def test_reconcile_never_lifts_a_halt_before_its_cooldown_ends(
    spec: EssSpec, status: EssStatus, now: datetime
) -> None:
    t = reconcile(spec=spec, status=status, now=now)
    if status.latch is not TradingState.ACTIVE and t.latch is TradingState.ACTIVE:
        assert status.cooldown_until is not None
        assert status.cooldown_until <= now
        assert t.events[-1].reason in RESETS


@settings(max_examples=300, database=None, deadline=None)
@given(spec=specs.map(lambda spec: replace(spec, tripped=True)), now=instants)
def test_reconcile_when_armed_and_tripped_then_the_halt_is_always_written(
    spec: EssSpec, now: datetime
) -> None:
    t = reconcile(spec=spec, status=EssStatus.initial(), now=now)
    assert t.latch_changed
    assert t.latch is not TradingState.ACTIVE
    assert reasons(t) == [EssEventReason.TRIPPED]


@settings(max_examples=300, database=None, deadline=None)
@given(
    status=statuses(
        times=st.datetimes(
            min_value=datetime(1970, 1, 1),
            max_value=datetime(2200, 1, 1),
            timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30))]),
        )
    )
)
def test_status_to_dict_then_from_dict_round_trips_exactly(status: EssStatus) -> None:
    raw = status.to_dict()
    assert EssStatus.from_dict(raw) == status
    assert EssStatus.from_dict(raw).to_dict() == raw
    assert all(raw[key] is None or raw[key].endswith("Z") for key in ("trippedAt", "cooldownUntil"))


# --- persistence ------------------------------------------------------------------------------


def test_status_to_dict_when_tripped_then_camel_case_rfc3339_utc() -> None:
    status = tripped_status(make_spec(reason="stop", mode=EssMode.REDUCING), now=at(0.25))
    assert status.to_dict() == {
        "state": "Reducing",
        "reason": "stop",
        "trippedAt": "2025-01-06T09:00:00.250000Z",
        "trippedBy": "kubectl",
        "cooldownUntil": "2025-01-06T09:05:00.250000Z",
        "tripCount": 1,
        "resetCount": 0,
        "latchRevision": 1,
        "tripMode": "Reducing",
        "automatic": False,
        "resetRefusedUntil": None,
    }


def test_status_from_dict_when_empty_or_with_foreign_keys_then_initial() -> None:
    assert EssStatus.from_dict({}) == EssStatus.initial()
    assert EssStatus.from_dict({"conditions": [], "observedGeneration": 3}) == EssStatus.initial()


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"state": "Exploded"}, "status.state"),
        ({"tripCount": "1"}, "status.tripCount"),
        ({"tripCount": True}, "status.tripCount"),
        ({"automatic": "yes"}, "status.automatic"),
        ({"reason": 5}, "status.reason"),
        ({"trippedAt": "2025-01-06T09:00:00+01:00"}, "status.trippedAt"),
        ({"trippedAt": 5}, "status.trippedAt"),
        ({"state": "Tripped"}, "needs trippedAt"),
        ({"latchRevision": -1}, "latch_revision"),
    ],
)
def test_status_from_dict_when_a_field_is_wrong_then_value_error_naming_it(
    raw: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        EssStatus.from_dict(raw)


def test_status_when_state_contradicts_trip_mode_then_value_error() -> None:
    with pytest.raises(ValueError, match="contradicts"):
        EssStatus(
            state=EssState.TRIPPED,
            tripped_at=T0,
            cooldown_until=T0,
            trip_mode=EssMode.REDUCING,
        )


def test_spec_when_cooldown_is_negative_then_value_error() -> None:
    with pytest.raises(ValueError, match="cooldownSeconds"):
        make_spec(cooldown_seconds=-1)


def test_spec_with_patch_when_the_patch_is_not_an_ess_patch_then_value_error() -> None:
    with pytest.raises(ValueError, match="not an ESS spec patch"):
        make_spec().with_patch({"mode": "Halted"})


def test_reconcile_when_now_is_naive_then_value_error() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        reconcile(spec=make_spec(), status=EssStatus.initial(), now=datetime(2025, 1, 6))


def test_latch_message_when_tripped_then_carries_revision_reason_and_issuer() -> None:
    status = tripped_status(make_spec(reason="stop"))
    latch = latch_message(status, issued_at_ms=1_700_000_000_000)
    assert (latch.state, latch.revision, latch.reason, latch.issued_by) == (
        TradingState.HALTED,
        1,
        "stop",
        "kubectl",
    )
    assert latch_message(EssStatus.initial(), issued_at_ms=0).state is TradingState.ACTIVE


# --- acknowledgements -------------------------------------------------------------------------


def test_pending_acks_when_live_workers_have_not_acked_revision_then_listed_sorted() -> None:
    acks = {"exec-a": 3, "exec-b": 2, "exec-c": 4, "exec-gone": 1}
    live = ["exec-d", "exec-b", "exec-a", "exec-c", "exec-a"]
    assert pending_acks(latch_revision=3, acks=acks, live_workers=live) == ("exec-b", "exec-d")


def test_pending_acks_when_every_live_worker_acked_then_empty() -> None:
    assert pending_acks(latch_revision=1, acks={"a": 1}, live_workers=["a"]) == ()


@pytest.mark.parametrize(("elapsed_s", "overdue"), [(0, False), (10, False), (10.001, True)])
def test_ack_overdue_when_more_than_the_timeout_passed_then_true(
    elapsed_s: float, overdue: bool
) -> None:
    assert ack_overdue(latch_written_at=T0, now=at(elapsed_s), timeout_s=10) is overdue


# --- conditions -------------------------------------------------------------------------------


def by_type(conditions: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in conditions}


def flags(conditions: list[dict[str, Any]]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in conditions}


def test_status_conditions_when_armed_then_only_ready_is_true() -> None:
    conditions = status_conditions(EssStatus.initial(), generation=1, now=T0, previous=[])
    assert flags(conditions) == {
        "Ready": "True",
        "Halted": "False",
        "Reducing": "False",
        "ResetRefused": "False",
        "AckTimeout": "False",
        "PositionsOpen": "Unknown",  # not followed: none given
    }
    assert all(c["observedGeneration"] == 1 for c in conditions)
    assert all(c["lastTransitionTime"] == "2025-01-06T09:00:00Z" for c in conditions)


@pytest.mark.parametrize(
    ("mode", "reset", "expected"),
    [
        (EssMode.HALTED, False, {"Halted": "True", "Reducing": "False", "ResetRefused": "False"}),
        (EssMode.REDUCING, False, {"Halted": "False", "Reducing": "True", "ResetRefused": "False"}),
        (EssMode.HALTED, True, {"Halted": "True", "Reducing": "False", "ResetRefused": "True"}),
        (EssMode.REDUCING, True, {"Halted": "False", "Reducing": "True", "ResetRefused": "True"}),
    ],
)
def test_status_conditions_when_halt_in_force_then_ready_false_and_mode_condition_true(
    mode: EssMode, reset: bool, expected: dict[str, str]
) -> None:
    spec = make_spec(mode=mode)
    status = tripped_status(spec)
    if reset:  # a reset inside the cooldown: CoolingDown, the latch as it was
        status = reconcile(spec=spec, status=status, now=at(10)).status
    conditions = by_type(status_conditions(status, generation=2, now=at(10), previous=[]))
    assert {t: c["status"] for t, c in conditions.items()} == {
        "Ready": "False",
        "AckTimeout": "False",
        "PositionsOpen": "Unknown",
        **expected,
    }
    if reset:
        assert conditions["ResetRefused"]["reason"] == "ResetDeferred"
        assert "2025-01-06T09:05:00Z" in conditions["ResetRefused"]["message"]


def test_status_conditions_when_reset_refused_then_true_until_the_cooldown_end() -> None:
    spec = make_spec(require_manual_reset=True)
    status = reconcile(spec=spec, status=tripped_status(spec), now=at(10)).status
    during = by_type(status_conditions(status, generation=1, now=at(10), previous=[]))
    assert (during["ResetRefused"]["status"], during["ResetRefused"]["reason"]) == (
        "True",
        "ResetRefused",
    )
    assert "until 2025-01-06T09:05:00Z" in during["ResetRefused"]["message"]
    after = status_conditions(
        status, generation=1, now=at(COOLDOWN_S), previous=list(during.values())
    )
    assert by_type(after)["ResetRefused"]["status"] == "False"
    assert by_type(after)["ResetRefused"]["lastTransitionTime"] == "2025-01-06T09:05:00Z"


def test_status_conditions_when_status_unchanged_then_last_transition_time_is_kept() -> None:
    status = tripped_status(make_spec(reason="first"))
    first = status_conditions(status, generation=1, now=at(5), previous=[])
    reworded = replace(status, reason="second")
    again = status_conditions(reworded, generation=2, now=at(60), previous=first)
    assert [c["lastTransitionTime"] for c in again] == ["2025-01-06T09:00:05Z"] * 6
    assert all(c["observedGeneration"] == 2 for c in again)
    assert "second" in by_type(again)["Halted"]["message"]
    reset = reconcile(spec=make_spec(), status=status, now=at(COOLDOWN_S)).status
    flipped = by_type(status_conditions(reset, generation=3, now=at(COOLDOWN_S), previous=again))
    assert flipped["Ready"]["lastTransitionTime"] == "2025-01-06T09:05:00Z"
    assert flipped["Halted"]["lastTransitionTime"] == "2025-01-06T09:05:00Z"
    assert flipped["Reducing"]["lastTransitionTime"] == "2025-01-06T09:00:05Z"


# --- resets while a trigger's condition holds -------------------------------------------------

HOLD = "drawdown 9.35% still beyond the 3% trigger"


def assert_settled_holding(spec: EssSpec, transition: Transition, *, now: datetime) -> None:
    patched = spec.with_patch(transition.spec_patch or {})
    again = reconcile(spec=patched, status=transition.status, now=now, hold=HOLD)
    assert (again.status, again.events, again.latch_changed, again.spec_patch) == (
        transition.status,
        (),
        False,
        None,
    )


@pytest.mark.parametrize("require_manual_reset", [True, False])
@pytest.mark.parametrize("when_s", [10, COOLDOWN_S + 1])
def test_reset_when_a_trigger_condition_holds_then_refused_with_the_figure_and_spec_set_back(
    require_manual_reset: bool, when_s: int
) -> None:
    tripped = tripped_status(replace(AUTO, require_manual_reset=require_manual_reset))
    spec = make_spec(require_manual_reset=require_manual_reset)
    t = reconcile(spec=spec, status=tripped, now=at(when_s), hold=HOLD)
    assert t.status.state is EssState.TRIPPED
    assert (t.latch, t.latch_changed) == (TradingState.HALTED, False)
    assert t.spec_patch == {"tripped": True, "reason": tripped.reason}
    ((event),) = t.events
    assert (event.type, event.reason) == (EventType.WARNING, EssEventReason.RESET_REFUSED)
    assert HOLD in event.message
    assert_settled_holding(spec, t, now=at(when_s))


def test_deferred_reset_when_a_trigger_condition_starts_holding_then_refused_back_to_tripped() -> (
    None
):
    cooling = reconcile(spec=make_spec(), status=tripped_status(AUTO), now=at(10)).status
    assert cooling.state is EssState.COOLING_DOWN
    t = reconcile(spec=make_spec(), status=cooling, now=at(COOLDOWN_S + 1), hold=HOLD)
    assert (t.status.state, t.latch, t.latch_changed) == (
        EssState.TRIPPED,
        TradingState.HALTED,
        False,
    )
    assert reasons(t) == [EssEventReason.RESET_REFUSED]
    assert t.spec_patch is not None
    assert t.spec_patch["tripped"] is True


def test_automatic_trip_when_its_condition_holds_then_no_reset_itself_until_it_clears() -> None:
    status = tripped_status(AUTO)
    held = reconcile(spec=AUTO, status=status, now=at(COOLDOWN_S * 2), hold=HOLD)
    assert (held.status, held.events, held.spec_patch) == (status, (), None)
    cleared = reconcile(spec=AUTO, status=status, now=at(COOLDOWN_S * 2 + 1))
    assert reasons(cleared) == [EssEventReason.AUTO_RESET]


def test_trip_when_a_condition_holds_then_trips_as_usual() -> None:
    t = reconcile(spec=make_spec(tripped=True), status=EssStatus.initial(), now=T0, hold=HOLD)
    assert (t.status.state, reasons(t)) == (EssState.TRIPPED, [EssEventReason.TRIPPED])


def test_status_conditions_when_workers_are_overdue_then_ack_timeout_names_them() -> None:
    status = tripped_status(make_spec())
    conditions = by_type(
        status_conditions(
            status, generation=2, now=at(10), previous=[], overdue_workers=["exec-2", "exec-1"]
        )
    )
    ack = conditions["AckTimeout"]
    assert (ack["status"], ack["reason"]) == ("True", "AckTimeout")
    assert (
        f"exec-1, exec-2 did not acknowledge latch revision {status.latch_revision}"
        in (ack["message"])
    )


# --- the positions the portfolio holds ----------------------------------------------------------


def _seen(*positions: tuple[str, str], missing: tuple[str, ...] = ()) -> PositionsSeen:
    held = tuple((symbol, Decimal(quantity)) for symbol, quantity in positions)
    known = (StackPositions(stack="ns.demo", positions=held, as_of_ms=1),)
    return PositionsSeen(known=known, missing=missing)


def _positions_open(status: EssStatus, seen: PositionsSeen, *, now: datetime) -> dict[str, Any]:
    conditions = status_conditions(
        status, generation=1, now=now, previous=[], positions=seen, flattens=True
    )
    return by_type(conditions)["PositionsOpen"]


def test_positions_open_names_each_position_and_says_how_a_flattening_trip_stands() -> None:
    """A trip that flattens: Flattening in its first 60 s, FlattenUnfinished after them while
    anything is still open, Flat once nothing is; Open while trading."""
    status = tripped_status(make_spec(flatten_on_trip=True))
    held = _seen(("BTCUSDT", "0.033"), ("ETHUSDT", "-1.5"))
    early = _positions_open(status, held, now=at(10))
    assert (early["status"], early["reason"]) == ("True", "Flattening")
    assert early["message"] == "ns.demo BTCUSDT 0.033; ns.demo ETHUSDT -1.5"
    late = _positions_open(status, held, now=at(61))
    assert (late["status"], late["reason"]) == ("True", "FlattenUnfinished")
    flat = _positions_open(status, _seen(), now=at(61))
    assert (flat["status"], flat["reason"]) == ("False", "Flat")
    trading = _positions_open(EssStatus.initial(), held, now=at(61))
    assert (trading["status"], trading["reason"]) == ("True", "Open")


def test_positions_open_is_unknown_while_a_covered_stack_has_no_snapshot() -> None:
    status = tripped_status(make_spec())
    unknown = _positions_open(status, _seen(missing=("ns.other",)), now=at(1))
    assert (unknown["status"], unknown["reason"]) == ("Unknown", "NoSnapshot")
    assert "ns.other" in unknown["message"]
    partly = _positions_open(status, _seen(("BTCUSDT", "1"), missing=("ns.other",)), now=at(1))
    assert (partly["status"], partly["reason"]) == ("True", "Flattening")
    assert partly["message"] == "ns.demo BTCUSDT 1; no snapshot yet of ns.other"
