"""Many EmergencyStops, one latch: the most restrictive stop wins and no write lifts another's."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import pytest

from qtrader.contracts.messages import HaltLatch, TradingState
from qtrader.control.ess import EssMode, EssSpec, EssStatus, reconcile
from qtrader.control.halt_combination import (
    StopView,
    combine,
    combine_for,
    most_restrictive,
    next_latch,
)
from qtrader.control.policy_selector import PolicyScope, PolicySelector

T0 = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)


def _status(mode: EssMode | None, *, reason: str = "why") -> EssStatus:
    if mode is None:
        return EssStatus.initial()
    spec = EssSpec(
        tripped=True,
        reason=reason,
        mode=mode,
        cooldown_seconds=60,
        require_manual_reset=True,
        tripped_by="kubectl",
        flatten_on_trip=False,
    )
    return reconcile(spec=spec, status=EssStatus.initial(), now=T0).status


def _view(name: str, mode: EssMode | None, **changes: object) -> StopView:
    return StopView(name=name, status=_status(mode), **changes)  # type: ignore[arg-type]


def test_most_restrictive_when_mixed_then_halted_over_reducing_over_active() -> None:
    states = [TradingState.ACTIVE, TradingState.REDUCING, TradingState.HALTED]
    for order in itertools.permutations(states):
        assert most_restrictive(order) is TradingState.HALTED
    assert most_restrictive([TradingState.ACTIVE, TradingState.REDUCING]) is TradingState.REDUCING
    assert most_restrictive([]) is TradingState.ACTIVE


def test_combine_when_no_stop_exists_then_halted() -> None:
    assert combine([]).state is TradingState.HALTED


@pytest.mark.parametrize("order", list(itertools.permutations(["main", "second", "third"])))
def test_combine_when_one_stop_is_tripped_then_halted_whatever_the_order(
    order: tuple[str, ...],
) -> None:
    modes = {"main": EssMode.HALTED, "second": None, "third": EssMode.REDUCING}
    combined = combine(_view(name, modes[name]) for name in order)
    assert combined.state is TradingState.HALTED
    assert combined.held_by == ("main", "third")
    assert combined.reason == "main: why; third: why"


def test_combine_when_every_stop_is_armed_then_active_held_by_none() -> None:
    combined = combine([_view("a", None), _view("b", None)])
    assert (combined.state, combined.held_by) == (TradingState.ACTIVE, ())


def test_a_stored_stop_whose_spec_asks_for_a_trip_counts_as_tripped_until_decided() -> None:
    stored = _view("a", None, decided=False, spec_tripped=True, spec_mode=EssMode.REDUCING)
    assert combine([stored]).state is TradingState.REDUCING
    decided = _view("a", None, decided=True, spec_tripped=True)
    assert combine([decided]).state is TradingState.ACTIVE


def test_flatten_on_trip_when_every_halting_stop_flattens_then_true() -> None:
    flatten = _view("a", EssMode.HALTED, flatten_on_trip=True)
    assert combine([flatten]).flatten_on_trip
    assert not combine([flatten, _view("b", EssMode.HALTED)]).flatten_on_trip


def _latch(state: TradingState, revision: int, held_by: tuple[str, ...]) -> HaltLatch:
    return HaltLatch(state=state, revision=revision, issued_at_ms=1, held_by=held_by)


def test_next_latch_when_the_bucket_already_says_it_then_nothing_to_write() -> None:
    combined = combine([_view("main", EssMode.HALTED), _view("second", None)])
    current = _latch(TradingState.HALTED, 7, ("main",))
    assert next_latch(combined, current=current, min_revision=3, issued_at_ms=2) is None


def test_next_latch_when_a_second_stop_is_created_armed_then_the_halt_stays() -> None:
    """Issue 13: a new Armed stop rewrote the latch to ACTIVE."""
    current = _latch(TradingState.HALTED, 7, ("main",))
    combined = combine([_view("main", EssMode.HALTED), _view("second", None)])
    assert next_latch(combined, current=current, min_revision=1, issued_at_ms=2) is None
    reset_main = combine([_view("main", None), _view("second", EssMode.HALTED)])
    latch = next_latch(reset_main, current=current, min_revision=1, issued_at_ms=2)
    assert latch is not None
    assert (latch.state, latch.held_by, latch.revision) == (TradingState.HALTED, ("second",), 8)


def test_next_latch_revision_when_a_stop_counts_higher_then_above_both() -> None:
    combined = combine([_view("main", EssMode.HALTED)])
    latch = next_latch(combined, current=None, min_revision=5, issued_at_ms=2, flatten=True)
    assert latch is not None
    assert (latch.revision, latch.flatten, latch.held_by) == (5, True, ("main",))
    active = next_latch(
        combine([_view("main", None)]), current=latch, min_revision=0, issued_at_ms=3, flatten=True
    )
    assert active is not None
    assert (active.state, active.revision, active.flatten) == (TradingState.ACTIVE, 6, False)


def test_a_latch_written_before_held_by_existed_decodes_as_held_by_nobody() -> None:
    old = b'{"kind":"halt_latch","state":"HALTED","revision":3,"issued_at_ms":1}'
    assert HaltLatch.model_validate_json(old).held_by == ()


# --- which stops cover which policy ----------------------------------------------------------

BTC = PolicyScope(labels={"desk": "btc", "tier": "1"}, stop_ref="main")
ETH = PolicyScope(labels={"desk": "eth"}, stop_ref="main")


def _desk(desk: str) -> PolicySelector:
    return PolicySelector.model_validate({"matchLabels": {"desk": desk}})


def test_a_stop_with_a_selector_halts_only_the_policies_it_selects() -> None:
    stops = [_view("main", None), _view("btc-desk", EssMode.HALTED, selector=_desk("btc"))]
    assert combine_for(stops, BTC).state is TradingState.HALTED
    assert combine_for(stops, BTC).held_by == ("btc-desk",)
    assert combine_for(stops, ETH).state is TradingState.ACTIVE
    assert combine_for(stops, ETH).held_by == ()


def test_a_stop_without_a_selector_covers_every_policy() -> None:
    stops = [_view("main", EssMode.REDUCING), _view("btc-desk", None, selector=_desk("btc"))]
    assert [combine_for(stops, p).state for p in (BTC, ETH)] == [TradingState.REDUCING] * 2


def test_the_stop_a_policy_names_covers_it_whatever_its_selector_says() -> None:
    stops = [_view("main", EssMode.HALTED, selector=_desk("nobody"))]
    assert combine_for(stops, ETH).state is TradingState.HALTED
    assert combine_for(stops, ETH).held_by == ("main",)


@pytest.mark.parametrize("ref", ["gone", None])
def test_a_policy_whose_own_stop_does_not_exist_is_halted(ref: str | None) -> None:
    combined = combine_for([_view("main", None)], PolicyScope(labels={}, stop_ref=ref))
    assert combined.state is TradingState.HALTED
    assert "does not exist" in combined.reason
