"""The EmergencyStop (kill switch) state machine: a pure decision, no I/O, no clock.

The Kubernetes operator and the local CLI (``qtrader ess trip | reset | status``) both call
``reconcile(spec=, status=, now=, hold=)`` and apply the ``Transition`` it returns, in this
order: patch the spec (``spec_patch``), write the halt latch if ``latch_changed``, record
``events``, persist ``status``, requeue after ``requeue_after`` seconds. The latch written is
not this stop's alone but the combination of every stop (``qtrader.control.halt_combination``:
the most restrictive wins), at a revision of at least ``status.latch_revision``; the caller
records the revision in force in the status it persists. A caller that fails at a step stops
there without persisting the status; the retry then decides again from the old status and
reaches the same decision; the combined latch is written again only if its content differs.
The spec and status types live in ``ess_status`` (re-exported here), the status conditions in
``ess_conditions``.

States (the latch is what workers obey)::

    Armed        ACTIVE               trading allowed
    Tripped      HALTED               no new orders, open orders cancelled
    Reducing     REDUCING             only exposure-reducing orders
    CoolingDown  as trip_mode was     halt still in force; a reset asked for inside the cooldown
                                      completes by itself at its end unless tripped again

Transitions ("halted" is Tripped or Reducing, ``cu`` is ``cooldown_until``; anything not listed
changes nothing and emits nothing)::

    from         spec, hold and time                    to                      event
    Armed        tripped                                Tripped/Reducing (mode) Tripped W
    halted       tripped, automatic trip, no manual     Armed, spec patched to  AutoReset N
                 reset, no hold, now >= cu and          tripped False
                 now > tripped_at
    halted       tripped, mode != trip_mode             Tripped/Reducing (mode) ModeChanged W
    halted       not tripped, hold                      unchanged, spec patched ResetRefused W
                                                        back (tripped, reason)
    halted       not tripped, now >= cu                 Armed                   Reset N
    halted       not tripped, now < cu, manual reset    unchanged, spec patched ResetRefused W
                                                        back (tripped, reason)
    halted       not tripped, now < cu, no manual reset CoolingDown             ResetDeferred W
    CoolingDown  tripped                                Tripped/Reducing (mode) ResetWithdrawn W
    CoolingDown  not tripped, hold                      Tripped/Reducing (mode) ResetRefused W
                                                        (trip_mode), spec
                                                        patched back
    CoolingDown  not tripped, now >= cu                 Armed                   CooldownEnded N

``hold`` is the caller's answer to "is a trigger's condition still in force?": ``None``, or a
sentence with the figure (the risk monitor's ``RiskMonitor.holding``, e.g. "drawdown 9.35% still
beyond the 3% trigger"). Rows are tried in the order listed.

A trip sets ``trip_count + 1``, ``tripped_at``/``tripped_by``/``reason`` and
``cu = now + cooldownSeconds``; a mode change keeps the count and the cooldown. Every return to
Armed sets ``reset_count + 1`` and clears reason, cooldown, trip mode, ``automatic`` and the
refusal; ``tripped_at``/``tripped_by`` keep the last trip for the post-mortem.

Why it is built this way:

* Level-based. The answer depends only on (spec, status, now), never on what changed, so a
  missed watch event, an operator restart or a retried handler gives the same answer. Everything
  it needs is in the status, which round-trips exactly through the custom resource
  (``to_dict``/``from_dict``).
* One call reaches a resting point. ``reconcile`` applies single steps until none applies,
  reasoning about the spec as its own patches leave it, so calling it again with the new status
  and the patched spec changes nothing and emits nothing. (Two steps in one call happen: a
  refused reset together with a mode change, a withdrawn reset followed by an overdue automatic
  reset.) The latch gets at most one new revision per call, and only when its state changes.
* An automatic reset returns Armed at once, together with the spec patch
  ``{"tripped": False, "reason": ""}`` that makes it visible in kubectl. Waiting for the patched
  spec to come back before arming would take two reconciles and two events for one reset, and
  the first result would not be a resting point. This is why the spec patch is applied before
  the status is persisted: Armed next to a spec still saying tripped reads as a new trip (safe,
  but spurious).
* An automatic reset never happens at the instant of the trip (``now > tripped_at``): even with
  ``cooldownSeconds: 0`` the halt is written once, and workers cancel their open orders.
* A refused reset sets the spec back to tripped, with the trip's reason (the CRD requires a
  reason when tripped): the spec is a request, and a spec left at ``tripped: false`` would show
  a reset that did not happen and re-fire the refusal forever.
* A trip is automatic when ``tripped_by`` starts with ``risk:`` (the risk alert path sets it).
  When a reset is withdrawn, the trip stays automatic only if the withdrawal is automatic too:
  a person who re-trips takes the trip over and it no longer resets itself.
* Who tripped it. ``tripped_by`` comes from the ``qtrader.dev/tripped-by`` annotation, which
  only the risk alert path sets (``automatic_trip_patch``); without it the trip is a person's
  (``MANUAL_TRIPPER``, "kubectl"). The annotation belongs to one trip: a control plane clears it
  (``clear_tripped_by``) as soon as the spec is no longer tripped (a reset, refused, deferred or
  automatic), so a person's later ``kubectl patch ... tripped=true`` is never taken for
  automatic and never resets itself.
* Reset only when safe: while ``hold`` is set (a trigger's condition still in force: drawdown at
  or beyond ``drawdownPct``, a symbol's market data older than ``staleMarketDataSeconds``, an
  exchange ban not yet over) a reset is *refused*, never let through to re-trip at once: a
  reset followed by an automatic re-trip would write an ACTIVE latch that workers may trade on
  for the moment between the two. The refusal is the cooldown refusal's shape (spec set back
  to tripped with the trip's reason, a ``ResetRefused`` Warning naming the figure); a deferred
  reset (CoolingDown) is withdrawn back to the trip's state; an automatic trip does not reset
  itself while the condition holds (it waits, silently, and resets once it clears). Whether
  the condition holds is whatever the caller knows now: a figure not yet seen (no portfolio
  snapshot since the control plane started) does not hold a reset back.
* A deferred reset stays accepted if ``requireManualReset`` is switched on during the cooldown:
  it was valid when asked for. Trip again to withdraw it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from qtrader.contracts.messages import HaltLatch, TradingState
from qtrader.control.ess_status import (
    AUTOMATIC_PREFIX,
    EssMode,
    EssSpec,
    EssState,
    EssStatus,
    as_utc,
    format_time,
    is_automatic,
)

__all__ = [
    "AUTOMATIC_PREFIX",
    "MANUAL_TRIPPER",
    "TRIPPED_BY_ANNOTATION",
    "AutomaticTrip",
    "EssEvent",
    "EssEventReason",
    "EssMode",
    "EssSpec",
    "EssState",
    "EssStatus",
    "EventType",
    "SpecPatch",
    "Transition",
    "ack_overdue",
    "automatic_trip_patch",
    "clear_tripped_by",
    "latch_message",
    "mode_restore",
    "pending_acks",
    "reconcile",
    "trip_issuer",
]

TRIPPED_BY_ANNOTATION = "qtrader.dev/tripped-by"
# The stop's mode before an automatic trip changed it (a reconciliation trip's own mode); the
# reset that ends that trip puts it back (``mode_restore``).
MODE_BEFORE_TRIP_ANNOTATION = "qtrader.dev/mode-before-trip"
MANUAL_TRIPPER = "kubectl"  # who a trip is by when no annotation names an automatic one
_MAX_REASON_CHARS = 1024  # HaltLatch.reason's limit
_MAX_ISSUER_CHARS = 256  # HaltLatch.issued_by's and the CRD's status.trippedBy limit
_MIN_REQUEUE_S = 1.0
_MAX_STEPS = 4  # the longest chain is two steps; more means a cycle, which is a bug

SpecPatch = dict[str, bool | str]


class EventType(enum.StrEnum):
    NORMAL = "Normal"
    WARNING = "Warning"


class EssEventReason(enum.StrEnum):
    """The bounded set of Kubernetes event reasons the ESS emits."""

    TRIPPED = "Tripped"
    MODE_CHANGED = "ModeChanged"
    RESET = "Reset"
    RESET_REFUSED = "ResetRefused"
    RESET_DEFERRED = "ResetDeferred"
    RESET_WITHDRAWN = "ResetWithdrawn"
    COOLDOWN_ENDED = "CooldownEnded"
    AUTO_RESET = "AutoReset"
    ACK_TIMEOUT = "AckTimeout"  # the applier's: workers did not acknowledge the latch in time


# --- reconcile --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EssEvent:
    """One Kubernetes event for the EmergencyStop resource (the CLI prints it)."""

    type: EventType
    reason: EssEventReason
    message: str


@dataclass(frozen=True, kw_only=True)
class Transition:
    """What ``reconcile`` decided; the caller applies it in the order the module docstring gives.

    ``latch``: what the halt latch must say. ``latch_changed``: write a new latch, at revision
    ``status.latch_revision`` (already bumped). ``requeue_after`` (s): reconcile again then,
    because a cooldown ends; None when nothing time-based is pending. ``spec_patch``: a merge
    patch for the resource's spec. ``flatten``: a fresh trip asked to flatten positions.
    """

    status: EssStatus
    latch: TradingState
    latch_changed: bool
    events: tuple[EssEvent, ...] = ()
    requeue_after: float | None = None
    spec_patch: SpecPatch | None = None
    flatten: bool = False


@dataclass(frozen=True, kw_only=True)
class _Step:
    status: EssStatus
    event: EssEvent
    spec_patch: SpecPatch | None = None
    flatten: bool = False


def reconcile(
    *, spec: EssSpec, status: EssStatus, now: datetime, hold: str | None = None
) -> Transition:
    """Decide the next status, latch, events and spec patch from the desired and recorded state;
    ``hold`` says which trigger condition still holds (no reset then), None when none does."""
    now = as_utc(now, "now")
    desired, current = spec, status
    events: list[EssEvent] = []
    patch: SpecPatch = {}
    flatten = False
    for _ in range(_MAX_STEPS):
        step = _step(spec=desired, status=current, now=now, hold=hold)
        if step is None:
            break
        current = step.status
        events.append(step.event)
        flatten = flatten or step.flatten
        if step.spec_patch:
            patch.update(step.spec_patch)
            desired = desired.with_patch(step.spec_patch)
    else:  # pragma: no cover - every chain settles within two steps; reaching this is a bug
        raise RuntimeError(f"EmergencyStop reconcile does not settle from {status}")
    latch_changed = current.latch is not status.latch
    if latch_changed:
        current = replace(current, latch_revision=status.latch_revision + 1)
    return Transition(
        status=current,
        latch=current.latch,
        latch_changed=latch_changed,
        events=tuple(events),
        requeue_after=_requeue_after(spec=desired, status=current, now=now),
        spec_patch=patch or None,
        flatten=flatten,
    )


def _step(*, spec: EssSpec, status: EssStatus, now: datetime, hold: str | None) -> _Step | None:
    """One transition of the table in the module docstring, or None when none applies."""
    if status.state is EssState.ARMED:
        return _trip(spec=spec, status=status, now=now) if spec.tripped else None
    # EssStatus.__post_init__ guarantees these for every state but Armed.
    assert status.cooldown_until is not None
    assert status.tripped_at is not None
    until = format_time(status.cooldown_until)
    cooldown_ended = now >= status.cooldown_until
    if status.state is EssState.COOLING_DOWN:
        if spec.tripped:
            return _withdraw_reset(spec=spec, status=status)
        if hold is not None:
            return _refuse_unsafe_reset(status, hold=hold)
        if not cooldown_ended:
            return None
        message = f"the cooldown ended at {until}: the deferred reset completed, trading allowed"
        return _Step(status=_armed(status), event=_normal(EssEventReason.COOLDOWN_ENDED, message))
    if spec.tripped:
        if (
            status.automatic
            and not spec.require_manual_reset
            and cooldown_ended
            and now > status.tripped_at
            and hold is None
        ):
            message = f"automatic trip by {status.tripped_by} reset: the cooldown ended at {until}"
            return _Step(
                status=_armed(status),
                event=_normal(EssEventReason.AUTO_RESET, message),
                spec_patch={"tripped": False, "reason": ""},
            )
        if spec.mode is not status.trip_mode:
            message = f"halt mode changed from {status.trip_mode} to {spec.mode}"
            return _Step(
                status=replace(status, state=spec.mode.state, trip_mode=spec.mode),
                event=_warning(EssEventReason.MODE_CHANGED, message),
            )
        return None
    if hold is not None:
        return _refuse_unsafe_reset(status, hold=hold)
    if cooldown_ended:
        message = f"reset: trading allowed (the cooldown ended at {until})"
        return _Step(status=_armed(status), event=_normal(EssEventReason.RESET, message))
    refused = replace(status, reset_refused_until=status.cooldown_until)
    if spec.require_manual_reset:
        message = (
            f"reset refused: the cooldown runs until {until} and requireManualReset is set;"
            " reset again after it"
        )
        return _Step(
            status=refused,
            event=_warning(EssEventReason.RESET_REFUSED, message),
            spec_patch={"tripped": True, "reason": status.reason or "reset refused in cooldown"},
        )
    message = f"reset deferred: the halt stays in force and the reset will complete at {until}"
    return _Step(
        status=replace(refused, state=EssState.COOLING_DOWN),
        event=_warning(EssEventReason.RESET_DEFERRED, message),
    )


def _trip(*, spec: EssSpec, status: EssStatus, now: datetime) -> _Step:
    by = (spec.tripped_by or "unknown")[:_MAX_ISSUER_CHARS]
    until = now + timedelta(seconds=spec.cooldown_seconds)
    automatic = is_automatic(by)
    message = (
        f"tripped by {by} ({spec.mode}): {spec.reason or 'no reason given'};"
        f" cooldown until {format_time(until)}"
    )
    if automatic and not spec.require_manual_reset:
        message += ", then it resets itself"
    if spec.flatten_on_trip:
        message += "; positions will be flattened"
    tripped = replace(
        status,
        state=spec.mode.state,
        reason=spec.reason,
        tripped_at=now,
        tripped_by=by,
        cooldown_until=until,
        trip_count=status.trip_count + 1,
        trip_mode=spec.mode,
        automatic=automatic,
        reset_refused_until=None,
    )
    return _Step(
        status=tripped,
        event=_warning(EssEventReason.TRIPPED, message),
        flatten=spec.flatten_on_trip,
    )


def _refuse_unsafe_reset(status: EssStatus, *, hold: str) -> _Step:
    """A reset while a trigger's condition holds: refused, the trip's state and spec kept."""
    assert status.trip_mode is not None  # every state but Armed has one
    message = f"reset refused: {hold}; the halt stays in force until it clears"
    return _Step(
        status=replace(status, state=status.trip_mode.state),
        event=_warning(EssEventReason.RESET_REFUSED, message[:_MAX_REASON_CHARS]),
        spec_patch={
            "tripped": True,
            "reason": (status.reason or f"reset refused: {hold}")[:_MAX_REASON_CHARS],
        },
    )


def _withdraw_reset(*, spec: EssSpec, status: EssStatus) -> _Step:
    by = spec.tripped_by[:_MAX_ISSUER_CHARS] or status.tripped_by
    message = f"reset withdrawn by {by}: the halt stays in force ({spec.mode})"
    withdrawn = replace(
        status,
        state=spec.mode.state,
        trip_mode=spec.mode,
        tripped_by=by,
        automatic=status.automatic and is_automatic(by),
        reset_refused_until=None,
    )
    return _Step(status=withdrawn, event=_warning(EssEventReason.RESET_WITHDRAWN, message))


def _armed(status: EssStatus) -> EssStatus:
    return replace(
        status,
        state=EssState.ARMED,
        reason="",
        cooldown_until=None,
        reset_count=status.reset_count + 1,
        trip_mode=None,
        automatic=False,
        reset_refused_until=None,
    )


def _normal(reason: EssEventReason, message: str) -> EssEvent:
    return EssEvent(type=EventType.NORMAL, reason=reason, message=message)


def _warning(reason: EssEventReason, message: str) -> EssEvent:
    return EssEvent(type=EventType.WARNING, reason=reason, message=message)


def _requeue_after(*, spec: EssSpec, status: EssStatus, now: datetime) -> float | None:
    """Seconds until the cooldown end, when something happens then (a reset, a condition flip)."""
    if status.cooldown_until is None:
        return None
    refused = status.reset_refused_until is not None and status.reset_refused_until > now
    resets_itself = status.automatic and not spec.require_manual_reset
    if not (status.state is EssState.COOLING_DOWN or refused or resets_itself):
        return None
    return max((status.cooldown_until - now).total_seconds(), _MIN_REQUEUE_S)


# --- trip inputs and outputs ------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AutomaticTrip:
    """A risk alert's trip: merge ``spec_patch`` into the spec, ``annotations`` into metadata.
    ``mode_before``: the stop's mode when the trip set another one (None when it did not)."""

    spec_patch: SpecPatch
    tripped_by: str
    mode_before: EssMode | None = None

    @property
    def annotations(self) -> dict[str, str]:
        annotations = {TRIPPED_BY_ANNOTATION: self.tripped_by}
        if self.mode_before is not None:
            annotations[MODE_BEFORE_TRIP_ANNOTATION] = self.mode_before.value
        return annotations


def automatic_trip_patch(
    *, alert_kind: str, detail: str, spec: EssSpec, mode: EssMode | None = None
) -> AutomaticTrip | None:
    """The patch that trips the ESS for a risk alert, or None when the spec is tripped already.
    ``mode``: the mode this kind of alert trips in, when it is not the stop's own: the spec
    shows it while the trip lasts (a person may still change it), and the reset puts the
    stop's own back (``mode_restore``).

    An alert never takes over a trip in force, so a person's trip keeps needing a person.
    """
    if spec.tripped:
        return None
    reason = f"auto: {alert_kind}: {detail}"[:_MAX_REASON_CHARS]
    patch: SpecPatch = {"tripped": True, "reason": reason}
    before = None
    if mode is not None and mode is not spec.mode:
        patch["mode"] = mode.value
        before = spec.mode
    return AutomaticTrip(
        spec_patch=patch, tripped_by=f"{AUTOMATIC_PREFIX}{alert_kind}", mode_before=before
    )


def mode_restore(mode_before: EssMode | None) -> SpecPatch:
    """What the reset of an automatic trip that changed the stop's mode adds to its spec patch
    (nothing when it did not), so the next trip, a person's too, is in the stop's own mode."""
    return {} if mode_before is None else {"mode": mode_before.value}


def trip_issuer(annotation: str | None) -> str:
    """Who the spec's trip is by: the tripped-by annotation, else a person (``kubectl``)."""
    return annotation or MANUAL_TRIPPER


def clear_tripped_by(
    *, annotation: str | None, spec: EssSpec, spec_patch: SpecPatch | None
) -> bool:
    """Whether the tripped-by annotation must be removed: it is set and the spec, once
    ``spec_patch`` is applied, is not tripped (the trip it named is over or being reset)."""
    tripped = spec.with_patch(spec_patch).tripped if spec_patch else spec.tripped
    return bool(annotation) and not tripped


def latch_message(status: EssStatus, *, issued_at_ms: int, flatten: bool = False) -> HaltLatch:
    """The halt latch the caller writes when ``Transition.latch_changed``; ``flatten`` is the
    transition's (only a fresh trip of a stop with ``flattenOnTrip`` asks for it)."""
    issued_by = "emergency-stop" if status.state is EssState.ARMED else status.tripped_by
    return HaltLatch(
        state=status.latch,
        revision=status.latch_revision,
        reason=status.reason[:_MAX_REASON_CHARS],
        issued_by=issued_by[:_MAX_ISSUER_CHARS],
        issued_at_ms=issued_at_ms,
        flatten=flatten and status.latch is not TradingState.ACTIVE,
    )


# --- worker acknowledgements ------------------------------------------------------------------


def pending_acks(
    *, latch_revision: int, acks: Mapping[str, int], live_workers: Iterable[str]
) -> tuple[str, ...]:
    """Live workers that have acknowledged neither ``latch_revision`` nor a later one, sorted."""
    return tuple(sorted({w for w in live_workers if acks.get(w, -1) < latch_revision}))


def ack_overdue(*, latch_written_at: datetime, now: datetime, timeout_s: float) -> bool:
    """Whether more than ``timeout_s`` seconds passed since the latch was written."""
    elapsed = as_utc(now, "now") - as_utc(latch_written_at, "latch_written_at")
    return elapsed.total_seconds() > timeout_s
