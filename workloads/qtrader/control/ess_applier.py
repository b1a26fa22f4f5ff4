"""One EmergencyStop applier: the state machine's transitions applied once, for both control planes.

``reconcile`` (``qtrader.control.ess``) decides; ``apply_once`` carries the decision out, in the
documented order: spec patch (and the tripped-by annotation cleared once the spec is no longer
tripped), latch (the combination of every stop, ``halt_combination``), events, the workers'
acknowledgements (pending, overdue, an ``AckTimeout`` event once per latch revision), and the
status document. The kopf operator and the local control plane differ only in where these go,
so each supplies two small adapters:

* ``EssStore``: the resource. ``patch_spec`` (kopf: the handler's patch; local: the KV record,
  refusing when it changed meanwhile), ``post_event`` (kopf: a Kubernetes event; local: the
  record's ``status.events``), ``save_status`` (kopf: the changed keys into the patch; local:
  the record).
* ``LatchChannel``: the halt latch. ``put`` puts the combination of every stop in force with
  this one at the given status and returns the latch in force; ``held_by`` the stops holding it;
  ``announce`` tells the live viewers the stop's status (``stop_view``) at the end of every
  round: who tripped it, why, since when, its cooldown, the workers still pending. Every round,
  not only on a change, so a viewer's server that starts later learns it within a round.

Risk alerts become trips the same way in both (``alert_trip``: which stops an alert trips,
and the patch, with the tripped-by annotation, that a shell merges into the resource).

A step that fails raises and the rest is not done; the next round decides again from the
status held in memory, which is the same decision (see ``qtrader.control.ess``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from qtrader.contracts.messages import (
    EmergencyStopView,
    EssStateName,
    HaltLatch,
    RiskAlert,
    TradingState,
)
from qtrader.control.ess import (
    AutomaticTrip,
    EssEvent,
    EssEventReason,
    EssMode,
    EssState,
    EssStatus,
    EventType,
    SpecPatch,
    Transition,
    ack_overdue,
    automatic_trip_patch,
    clear_tripped_by,
    mode_restore,
    reconcile,
    trip_issuer,
)
from qtrader.control.ess_resource import (
    Acknowledgement,
    EmergencyStopSpec,
    alert_trips,
    status_document,
    trip_mode,
)
from qtrader.control.halt_channel import AckCollector, ack_lease_s
from qtrader.control.open_positions import PositionsSeen


class EssStore(Protocol):
    """Where one EmergencyStop's spec, events and status live."""

    async def patch_spec(self, patch: SpecPatch, *, clear_tripped_by: bool) -> int | None:
        """Merge ``patch`` into the spec; returns the new generation when the store knows it."""
        ...

    async def post_event(self, event: EssEvent, *, at: datetime) -> None: ...

    async def save_status(self, document: dict[str, Any]) -> None: ...


class LatchChannel(Protocol):
    """The halt latch every worker obeys."""

    async def put(
        self, status: EssStatus, *, min_revision: int, flatten: bool, now: datetime
    ) -> HaltLatch: ...

    def held_by(self) -> Sequence[str]: ...

    async def announce(self, view: EmergencyStopView) -> None:
        """Send ``view`` to the live viewers; never raises (nothing depends on it)."""
        ...


@dataclass
class AckMemory:
    """What the applier remembers about one stop's latch between rounds."""

    latch_written: tuple[int, datetime] | None = None  # (revision, when) this stop last wrote
    reported_for: int = 0  # the latest latch revision reported overdue


@dataclass(frozen=True, kw_only=True)
class StopInput:
    """One EmergencyStop as read this round."""

    name: str
    spec: EmergencyStopSpec
    tripped_by: str  # the tripped-by annotation, "" when absent
    generation: int
    previous_conditions: Sequence[Mapping[str, Any]]
    mode_before_trip: EssMode | None = None  # the mode-before-trip annotation
    # The open positions of the stacks it covers (``PositionsOpen``); None: not followed.
    positions: PositionsSeen | None = None


@dataclass(frozen=True, kw_only=True)
class Applied:
    """What one round did: the transition (its status at the revision in force), the workers
    still pending and those overdue."""

    transition: Transition
    pending: tuple[str, ...]
    overdue: tuple[str, ...]

    @property
    def status(self) -> EssStatus:
        return self.transition.status


async def apply_once(
    *,
    stop: StopInput,
    status: EssStatus,
    store: EssStore,
    channel: LatchChannel,
    acks: AckCollector,
    memory: AckMemory,
    hold: str | None,
    now: datetime,
) -> Applied:
    """Decide from ``status`` and the spec, then apply the transition (module docstring)."""
    annotation = stop.tripped_by or None
    ess_spec = stop.spec.to_ess_spec(tripped_by=trip_issuer(annotation))
    transition = reconcile(spec=ess_spec, status=status, now=now, hold=hold)
    generation = stop.generation
    clear = clear_tripped_by(annotation=annotation, spec=ess_spec, spec_patch=transition.spec_patch)
    if transition.spec_patch or clear:
        # The trip that set its own mode is over: the stop's own mode comes back with it.
        restore = mode_restore(stop.mode_before_trip) if clear else {}
        patch = {**(transition.spec_patch or {}), **restore}
        patched = await store.patch_spec(patch, clear_tripped_by=clear)
        generation = patched if patched is not None else generation
    if transition.latch_changed:
        decided = transition.status
        latch = await channel.put(
            decided, min_revision=decided.latch_revision, flatten=transition.flatten, now=now
        )
        transition = replace(transition, status=replace(decided, latch_revision=latch.revision))
        memory.latch_written = (latch.revision, now)
    for event in transition.events:
        await store.post_event(event, at=now)
    pending, overdue = await _follow_acks(
        stop, transition.status, store=store, acks=acks, memory=memory, now=now
    )
    document = status_document(
        transition.status,
        generation=generation,
        now=now,
        previous_conditions=stop.previous_conditions,
        acknowledgements=acknowledgements(acks, lease_s=ack_lease_s(stop.spec.ack_timeout_seconds)),
        pending_workers=pending,
        overdue_workers=overdue,
        held_by=channel.held_by(),
        positions=stop.positions,
        flattens=stop.spec.flatten_on_trip,
    )
    await store.save_status(document)
    view = stop_view(stop, transition.status, pending=pending, held_by=channel.held_by(), now=now)
    await channel.announce(view)
    return Applied(transition=transition, pending=pending, overdue=overdue)


_STATE_NAMES: dict[EssState, EssStateName] = {
    EssState.ARMED: "Armed",
    EssState.TRIPPED: "Tripped",
    EssState.REDUCING: "Reducing",
    EssState.COOLING_DOWN: "CoolingDown",
}


def stop_view(
    stop: StopInput,
    status: EssStatus,
    *,
    pending: Sequence[str],
    held_by: Sequence[str],
    now: datetime,
) -> EmergencyStopView:
    """What the live viewers are told of one stop after a round (``EmergencyStopView``)."""
    return EmergencyStopView(
        name=stop.name,
        state=_STATE_NAMES[status.state],
        latch=status.latch,
        latch_revision=status.latch_revision,
        reason=status.reason,
        tripped_by=status.tripped_by,
        tripped_at_ms=_epoch_ms(status.tripped_at),
        cooldown_until_ms=_epoch_ms(status.cooldown_until),
        require_manual_reset=stop.spec.require_manual_reset,
        automatic=status.automatic,
        trip_count=status.trip_count,
        reset_count=status.reset_count,
        pending_workers=tuple(pending)[:256],
        held_by=tuple(held_by)[:256],
        ts_ms=round(now.timestamp() * 1000),
    )


def _epoch_ms(moment: datetime | None) -> int | None:
    return None if moment is None else round(moment.timestamp() * 1000)


async def _follow_acks(
    stop: StopInput,
    status: EssStatus,
    *,
    store: EssStore,
    acks: AckCollector,
    memory: AckMemory,
    now: datetime,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The workers pending and overdue; an AckTimeout event, once per latch revision."""
    timeout_s = stop.spec.ack_timeout_seconds
    revision = status.latch_revision
    pending = acks.pending(revision, lease_s=ack_lease_s(timeout_s))
    written = memory.latch_written
    overdue = (
        pending
        if written is not None
        and written[0] == revision
        and ack_overdue(latch_written_at=written[1], now=now, timeout_s=timeout_s)
        else ()
    )
    if overdue and memory.reported_for < revision:
        memory.reported_for = revision
        message = (
            f"{', '.join(overdue)} did not acknowledge latch revision {revision}"
            f" within {timeout_s}s"
        )
        event = EssEvent(type=EventType.WARNING, reason=EssEventReason.ACK_TIMEOUT, message=message)
        await store.post_event(event, at=now)
    return pending, overdue


def acknowledgements(acks: AckCollector, *, lease_s: float) -> list[Acknowledgement]:
    """Every known worker's latest answer, as ``status.acknowledgements`` lists it."""
    return [
        Acknowledgement(
            worker=ack.worker_id,
            revision=ack.revision,
            at=datetime.fromtimestamp(ack.acked_at_ms / 1000, tz=UTC),
            state=TradingState(ack.state),
            open_orders_cancelled=ack.open_orders_cancelled,
        )
        for ack in acks.known(lease_s=lease_s).values()
    ]


def alert_trip(
    alert: RiskAlert, *, spec: EmergencyStopSpec, tripped_by: str
) -> AutomaticTrip | None:
    """The automatic trip a risk alert asks of a stop (its spec and tripped-by annotation), or
    None: the alert does not breach the stop's trigger (``alert_trips``), or the stop is
    tripped already (an alert never takes over a trip in force)."""
    if not alert_trips(alert, spec.triggers):
        return None
    detail = f"{alert.detail} (value {alert.value}, threshold {alert.threshold})"
    return automatic_trip_patch(
        alert_kind=alert.alert_kind.value,
        detail=detail,
        spec=spec.to_ess_spec(tripped_by=trip_issuer(tripped_by or None)),
        mode=trip_mode(alert, spec),
    )
