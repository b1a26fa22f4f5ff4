"""Many EmergencyStops, one halt latch per policy: a pure combination of the stops covering it.

Each EmergencyStop decides its own state (``qtrader.control.ess.reconcile``, kept in its own
status). A policy's workers obey one latch, so no stop may write its own state there: a second
stop that is Armed would lift the halt the first one holds. Instead every writer puts the
*combination* of the stops covering the policy in force (``combine_for``; which stops cover
which policy: ``policy_selector``): the most restrictive state wins (HALTED over REDUCING over
ACTIVE) and ``held_by`` names every such stop that is not Armed. A policy therefore trades only
while every stop covering it is Armed, and creating, resetting or deleting one stop changes the
latch only as far as the others allow. A policy whose own stop (``emergencyStopRef``) does not
exist is halted.

Why it is safe in any order of events: the combination depends only on the stops that exist,
not on who wrote last, so any writer (a stop's reconcile, the periodic keeper, a restart) reaches
the same latch. ``next_latch`` writes a new revision only when the combined content (state and
``held_by``) differs from the latch in force, at a revision above it, so revisions only grow.

Where a stop's state comes from (``StopView``): the control plane's own last decision when it
has one (``decided``); otherwise the stored status, made at least as restrictive as the spec asks
(a stop whose spec says tripped but whose stored status does not yet, e.g. right after a
restart that lost the status write, counts as tripped: fail closed).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from qtrader.contracts.messages import HaltLatch, TradingState
from qtrader.control.ess_status import EssMode, EssStatus
from qtrader.control.policy_selector import PolicyScope, PolicySelector, covers

_MAX_REASON_CHARS = 1024  # HaltLatch.reason's limit
_MAX_ISSUER_CHARS = 256  # HaltLatch.issued_by's limit


def most_restrictive(states: Iterable[TradingState]) -> TradingState:
    """HALTED over REDUCING over ACTIVE; ACTIVE for none."""
    return max(states, key=lambda state: state.restriction, default=TradingState.ACTIVE)


@dataclass(frozen=True, kw_only=True)
class StopView:
    """One EmergencyStop as the combination sees it."""

    name: str
    status: EssStatus
    decided: bool = True  # the status is the control plane's own last decision
    spec_tripped: bool = False
    spec_mode: EssMode = EssMode.HALTED
    flatten_on_trip: bool = False
    selector: PolicySelector | None = None  # None: it covers every policy of its namespace

    @property
    def state(self) -> TradingState:
        latch = self.status.latch
        if self.decided or not self.spec_tripped:
            return latch
        return most_restrictive([latch, self.spec_mode.latch])


@dataclass(frozen=True, kw_only=True)
class Combined:
    """What the latch must say for a set of stops."""

    state: TradingState
    held_by: tuple[str, ...]
    reason: str
    issued_by: str
    flatten_on_trip: bool  # every stop holding a HALTED halt flattens on trip


def combine(stops: Iterable[StopView]) -> Combined:
    """The most restrictive state of ``stops``; ``held_by``: every stop not Armed, sorted.

    No stop at all is HALTED: with no kill switch nothing could stop trading, so nothing
    trades (a policy's ``emergencyStopRef`` must name one that exists, too)."""
    stops = list(stops)
    if not stops:
        return Combined(
            state=TradingState.HALTED,
            held_by=(),
            reason="no EmergencyStop exists",
            issued_by="emergency-stop",
            flatten_on_trip=False,
        )
    holding = sorted((s for s in stops if s.state is not TradingState.ACTIVE), key=_name)
    state = most_restrictive(s.state for s in holding)
    if not holding:
        return Combined(
            state=state, held_by=(), reason="", issued_by="emergency-stop", flatten_on_trip=False
        )
    halted = [s for s in holding if s.state is TradingState.HALTED]
    return Combined(
        state=state,
        held_by=tuple(s.name for s in holding),
        reason="; ".join(f"{s.name}: {s.status.reason or 'tripped'}" for s in holding),
        issued_by=", ".join(s.status.tripped_by or s.name for s in holding),
        flatten_on_trip=bool(halted) and all(s.flatten_on_trip for s in halted),
    )


def combine_for(stops: Iterable[StopView], policy: PolicyScope) -> Combined:
    """What ``policy``'s latch must say: the combination of the stops covering it, or HALTED
    when its own stop does not exist (fail closed: nothing it names could stop it)."""
    stops = list(stops)
    if policy.stop_ref is None or policy.stop_ref not in {s.name for s in stops}:
        named = "unknown" if policy.stop_ref is None else policy.stop_ref
        return Combined(
            state=TradingState.HALTED,
            held_by=(),
            reason=f"the policy's EmergencyStop ({named}) does not exist",
            issued_by="emergency-stop",
            flatten_on_trip=False,
        )
    return combine(s for s in stops if covers(stop=s.name, selector=s.selector, policy=policy))


def next_latch(
    combined: Combined,
    *,
    current: HaltLatch | None,
    min_revision: int,
    issued_at_ms: int,
    flatten: bool = False,
) -> HaltLatch | None:
    """The latch to write for ``combined``, or None when ``current`` already says it.

    The revision is above the current one and at least ``min_revision`` (a stop's own count,
    so a latch left by another run never hides a new decision). ``flatten``: the trip that
    asked for this write flattens positions (only when the result halts or reduces).
    """
    if (
        current is not None
        and current.state is combined.state
        and tuple(current.held_by) == combined.held_by
    ):
        return None
    revision = max(min_revision, current.revision + 1 if current is not None else 1)
    return HaltLatch(
        state=combined.state,
        revision=revision,
        reason=combined.reason[:_MAX_REASON_CHARS],
        issued_by=combined.issued_by[:_MAX_ISSUER_CHARS],
        issued_at_ms=issued_at_ms,
        flatten=flatten and combined.state is not TradingState.ACTIVE,
        held_by=combined.held_by,
    )


def _name(stop: StopView) -> str:
    return stop.name
