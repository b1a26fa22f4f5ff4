"""Local mode's control plane: the EmergencyStop kill switch, with the operator's semantics.

In a cluster the kopf operator reconciles EmergencyStop resources; locally ``qtrader up`` runs
this instead, on the same pure state machine (``qtrader.control.ess.reconcile``) and the same halt
channel (``publish_latch``, ``AckCollector``), so a trip, a refused reset or a cooldown behave the
same in both. The resource lives in the KV bucket ``qtrader-ess`` under its name as an
``EssRecord``: the spec in the CRD's camelCase form, a ``generation`` that every spec change bumps
(``metadata.generation``), the tripped-by annotation, and the CRD status plus ``events`` (the last
50; a cluster has Kubernetes events for that).

Each round, on every change of the record and at least every ``interval_s``, the shared applier
(``qtrader.control.ess_applier``, the operator's too) decides with ``reconcile`` and applies
the transition on this record (``_RecordStore``) and latch (``SingleStopChannel``) in the
documented order: spec patch, latch
(``publish_latch``), events (log lines and ``status.events``), status with conditions,
acknowledgements and pending workers. A round that fails stops at its step; the next decides
again from the unchanged status, which repeats the same latch revision (harmless). Workers that
have not acknowledged a new latch within ``ackTimeoutSeconds`` get an ``AckTimeout`` event.
Resets are decided with the risk monitor's ``holding`` (a trigger condition still in force
refuses them, as in the operator). Unlike the operator it scales nothing down: the latch halts
the workers, their processes stay.

Why the status it decides from is the one in memory, not the stored one: the record has two
writers (``qtrader ess`` changes the spec, this the status and its spec patches) and a KV put
here has no compare-and-set, so a ``qtrader ess`` write may carry a status read a moment before
a newer one was stored. Deciding from that copy could step back to an old latch revision, which
workers ignore. The stored status is read once, at start, so a trip survives a restart of
``qtrader up`` on the same ``--data-dir``; after that a stale copy is only overwritten. Every
write re-reads the record and replaces just its own part, as a merge patch would, and
``qtrader ess`` re-applies a patch that a concurrent write lost (``qtrader.local.ess_client``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import Field, field_validator

from qtrader.bus.errors import BusUnavailable
from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    HaltLatch,
    Message,
    MessageRejected,
    RiskAlert,
    Undecodable,
)
from qtrader.control.ess import (
    MODE_BEFORE_TRIP_ANNOTATION,
    TRIPPED_BY_ANNOTATION,
    EssEvent,
    EssMode,
    EssSpec,
    EssState,
    EssStatus,
    EventType,
    SpecPatch,
    Transition,
    mode_restore,
    trip_issuer,
)
from qtrader.control.ess_applier import (
    AckMemory,
    StopInput,
    acknowledgements,
    alert_trip,
    apply_once,
)
from qtrader.control.ess_resource import (
    ESS_API_VERSION,
    ESS_KIND,
    EmergencyStop,
    EmergencyStopError,
    EmergencyStopSpec,
    ResourceName,
    status_document,
)
from qtrader.control.ess_status import format_time
from qtrader.control.halt_channel import AckCollector, SingleStopChannel, ack_lease_s
from qtrader.control.open_positions import LOCAL_STACK, OpenPositions
from qtrader.control.risk_monitor import RiskMonitor

log = logging.getLogger(__name__)

MAX_EVENTS = 50


def utc_now() -> datetime:
    return datetime.now(UTC)


class EssRecord(Message):
    """One EmergencyStop in the ESS bucket: the local equivalent of the custom resource."""

    KIND = "emergency_stop"
    kind: Literal["emergency_stop"] = "emergency_stop"
    name: ResourceName
    generation: int = Field(ge=1)
    tripped_by: str = Field(default="", max_length=256)
    mode_before_trip: EssMode | None = None  # as the operator's mode-before-trip annotation
    spec: EmergencyStopSpec
    status: dict[str, Any] = Field(default_factory=dict)

    @field_validator("status")
    @classmethod
    def _status_parses(cls, value: dict[str, Any]) -> dict[str, Any]:
        EssStatus.from_dict(value)  # raises ValueError naming the field
        return value

    def encode(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()  # the spec in camelCase

    @property
    def dedup_id(self) -> str:
        return f"ess:{self.name}:{self.generation}"

    def ess_spec(self) -> EssSpec:
        return self.spec.to_ess_spec(tripped_by=trip_issuer(self.tripped_by))

    def ess_status(self) -> EssStatus:
        return EssStatus.from_dict(self.status)

    @property
    def observed_generation(self) -> int:
        value = self.status.get("observedGeneration")
        return value if isinstance(value, int) else 0

    def list_in_status(self, key: str) -> list[Any]:
        """``status.events``, ``status.acknowledgements``, ...; [] when absent."""
        value = self.status.get(key)
        return list(value) if isinstance(value, list) else []

    def with_spec(
        self,
        spec: EmergencyStopSpec,
        *,
        tripped_by: str | None = None,
        mode_before_trip: EssMode | None = None,
    ) -> EssRecord:
        """The record after a spec change: the next generation, as the API server counts.

        Who tripped it belongs to one trip: a spec that is not tripped drops it (as the
        operator removes the annotation), so a later trip is never taken for an automatic one;
        and the stop's own mode, when that trip set another, comes back (``mode_restore``).
        """
        by = self.tripped_by if tripped_by is None else tripped_by
        before = mode_before_trip or self.mode_before_trip
        if not spec.tripped:
            by = ""
            spec = spec.with_patch(mode_restore(before))
            before = None
        update = {
            "spec": spec,
            "generation": self.generation + 1,
            "tripped_by": by,
            "mode_before_trip": before,
        }
        return self.model_copy(update=update)

    def with_status(self, status: dict[str, Any]) -> EssRecord:
        return self.model_copy(update={"status": status})

    def to_resource(self) -> dict[str, Any]:
        """The record as ``kubectl get emergencystop NAME -o json`` would show the resource."""
        annotations = {TRIPPED_BY_ANNOTATION: self.tripped_by} if self.tripped_by else {}
        if self.mode_before_trip is not None:
            annotations[MODE_BEFORE_TRIP_ANNOTATION] = self.mode_before_trip.value
        return {
            "apiVersion": ESS_API_VERSION,
            "kind": ESS_KIND,
            "metadata": {
                "name": self.name,
                "generation": self.generation,
                "annotations": annotations,
            },
            "spec": self.spec.to_document(),
            "status": self.status,
        }


def event_entry(*, at: datetime, type_: str, reason: str, message: str) -> dict[str, str]:
    return {"at": format_time(at), "type": type_, "reason": reason, "message": message}


class _Superseded(Exception):
    """The record changed between the decision and its spec patch: decide again."""


class _RecordStore:
    """The applier's store on the local record: the spec patch goes to the KV record (refused
    when the record changed meanwhile: decide again), events into ``status.events``."""

    def __init__(self, plane: LocalControlPlane, record: EssRecord) -> None:
        self._plane = plane
        self._record = record
        self._new: list[dict[str, Any]] = []

    async def patch_spec(self, patch: SpecPatch, *, clear_tripped_by: bool) -> int | None:
        # EssRecord.with_spec drops tripped_by once the spec is not tripped: nothing else to do.
        self._record = await self._plane._patch_spec(self._record, dict(patch))
        return self._record.generation

    async def post_event(self, event: EssEvent, *, at: datetime) -> None:
        self._new.append(self._plane._event(event, at))

    async def save_status(self, document: dict[str, Any]) -> None:
        await self._plane._save(document, record=self._record, new=self._new)


class LocalControlPlane:
    """Reconciles one EmergencyStop in the ESS bucket and drives the halt latch from it."""

    def __init__(
        self,
        bus: Bus,
        *,
        resource: EmergencyStop,
        interval_s: float = 0.5,
        presence_timeout_s: float = 5.0,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._bus = bus
        self._resource = resource
        self._interval_s = interval_s
        self._clock = clock
        self.acks = AckCollector(presence_timeout_s=presence_timeout_s)
        self.positions = OpenPositions()  # local mode runs one stack, under the logical names
        self._status = EssStatus.initial()
        self._document: dict[str, Any] = {}  # the status as last written
        self._events: list[dict[str, Any]] = []
        self._ack_memory = AckMemory()
        self._channel = SingleStopChannel(bus, resource.name)
        self._wake = asyncio.Event()
        self.risk = RiskMonitor(bus, source="control-plane")
        self.risk.configure(resource.name, resource.spec.triggers)

    @property
    def name(self) -> str:
        return self._resource.name

    @property
    def status(self) -> EssStatus:
        return self._status

    @property
    def events(self) -> list[dict[str, Any]]:
        return list(self._events)

    # --- start ---------------------------------------------------------------------------------

    async def start(self) -> bool:
        """Store the resource unless one of its name exists (kept: a trip survives a restart),
        then put its latch in force. Returns True when the resource was created."""
        record = await self._read()
        created = record is None
        if record is None:
            record = EssRecord(
                name=self.name,
                generation=1,
                tripped_by=self._resource.tripped_by,
                spec=self._resource.spec,
            )
            await self._put(record)
        self._status = record.ess_status()
        self._document = dict(record.status)
        self._events = record.list_in_status("events")
        await self._sync_latch(record)
        return created

    async def _sync_latch(self, record: EssRecord) -> None:
        """Put this stop's state in force at start: the bucket may hold no latch (a fresh
        stack) or one from another run; a new revision above both wins."""
        now = self._clock()
        min_revision = self._status.latch_revision + 1
        latch, written = await self._put_latch(self._status, min_revision=min_revision, now=now)
        if not written:
            return
        status = replace(self._status, latch_revision=latch.revision)
        log.info("EmergencyStop %s: latch revision %d in force", self.name, latch.revision)
        await self._commit(status, record=record, generation=record.generation, now=now)

    async def _put_latch(
        self, status: EssStatus, *, min_revision: int, now: datetime
    ) -> tuple[HaltLatch, bool]:
        """Write the latch as the combination of the stops (local mode runs this one), which
        names it in ``held_by`` while it holds a halt, as the operator's latch does."""
        latch = await self._channel.put(status, min_revision=min_revision, flatten=False, now=now)
        if self._channel.written:
            self._ack_memory.latch_written = (latch.revision, now)
        return latch, self._channel.written

    # --- loop ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Reconcile until cancelled: on every change of the record and every ``interval_s``;
        evaluate the stop's triggers and trip it on the risk alerts that breach them."""
        await asyncio.gather(
            self._follow_acks(),
            self.positions.follow(self._bus, LOCAL_STACK),
            self._watch(),
            self._loop(),
            self.risk.run(),
            self._trip_on_alerts(),
        )

    async def _trip_on_alerts(self) -> None:
        """The operator's automatic trips, locally: the same consumer, the same rule."""
        while True:
            try:
                await self._bus.consume(subjects.OPERATOR_RISK_ALERTS, RiskAlert, self.on_alert)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # an alert left unacked is delivered again: resume
                log.warning("EmergencyStop %s: risk alerts interrupted (%s)", self.name, exc)
            await asyncio.sleep(self._interval_s)

    async def on_alert(self, alert: RiskAlert) -> None:
        """Trip the stop when the alert breaches its trigger (a ban always does); the patch is
        the one the operator makes, so ``qtrader ess status`` shows who tripped it and why."""
        record = await self._read()
        if record is None:
            return
        trip = alert_trip(alert, spec=record.spec, tripped_by=record.tripped_by)
        if trip is None:
            return  # below the trigger, or tripped already
        patched = record.with_spec(
            record.spec.with_patch(trip.spec_patch),
            tripped_by=trip.tripped_by,
            mode_before_trip=trip.mode_before,
        )
        await self._put(patched)
        log.warning("EmergencyStop %s tripped automatically by %s", self.name, trip.tripped_by)
        self._wake.set()

    async def _follow_acks(self) -> None:
        while True:
            try:
                await self.acks.run(self._bus)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # without acks the status cannot say who obeys: retry
                log.warning("EmergencyStop %s: no acknowledgements (%s); retrying", self.name, exc)
            await asyncio.sleep(self._interval_s)

    async def _watch(self) -> None:
        while True:
            try:
                async for _ in self._bus.kv_watch(subjects.ESS_BUCKET, self.name, EssRecord):
                    self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the periodic round covers the gap; resume the watch
                log.warning("EmergencyStop %s watch interrupted (%s); resuming", self.name, exc)
            await asyncio.sleep(self._interval_s)

    async def _loop(self) -> None:
        said = ""  # a record that does not decode fails every round: say so once, not 2/s
        while True:
            self._wake.clear()
            try:
                await self.reconcile_once()
                said = ""
            except _Superseded:
                continue
            except (BusUnavailable, MessageRejected, EmergencyStopError) as exc:
                if str(exc) != said:
                    log.warning("EmergencyStop %s not reconciled: %s", self.name, exc)
                said = str(exc)
            except Exception:  # level-based: the next round decides again from the same status
                log.exception("EmergencyStop %s reconcile failed", self.name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval_s)

    async def reconcile_once(self) -> Transition | None:
        """One round: decide from the stored spec and the status held here, then apply it with
        the shared applier (``qtrader.control.ess_applier``) on this record and latch."""
        record = await self._read()
        if record is None:
            log.error("EmergencyStop %s is gone from the bucket; the latch stays", self.name)
            return None
        self.risk.configure(self.name, record.spec.triggers)
        store = _RecordStore(self, record)
        applied = await apply_once(
            stop=StopInput(
                name=self.name,
                spec=record.spec,
                tripped_by=record.tripped_by,
                generation=record.generation,
                previous_conditions=self._document.get("conditions") or [],
                positions=self.positions.seen([LOCAL_STACK]),
            ),
            status=self._status,
            store=store,
            channel=self._channel,
            acks=self.acks,
            memory=self._ack_memory,
            hold=self.risk.holding(self.name),
            now=self._clock(),
        )
        self._status = applied.status
        return applied.transition

    async def _patch_spec(self, record: EssRecord, patch: dict[str, bool | str]) -> EssRecord:
        current = await self._read()
        if current is None or current.generation != record.generation:
            raise _Superseded
        patched = current.with_spec(current.spec.with_patch(patch))
        await self._put(patched)
        log.info("EmergencyStop %s: spec patched %s", self.name, patch)
        return patched

    def _event(self, event: EssEvent, now: datetime) -> dict[str, str]:
        level = logging.WARNING if event.type is EventType.WARNING else logging.INFO
        log.log(level, "EmergencyStop %s %s: %s", self.name, event.reason, event.message)
        return event_entry(
            at=now, type_=event.type.value, reason=event.reason.value, message=event.message
        )

    async def _commit(
        self, status: EssStatus, *, record: EssRecord, generation: int, now: datetime
    ) -> None:
        """Store the status document for ``status`` (start-up; rounds go through the applier)."""
        lease_s = ack_lease_s(record.spec.ack_timeout_seconds)
        document = status_document(
            status,
            generation=generation,
            now=now,
            previous_conditions=self._document.get("conditions") or [],
            acknowledgements=acknowledgements(self.acks, lease_s=lease_s),
            pending_workers=self.acks.pending(status.latch_revision, lease_s=lease_s),
            held_by=self._held_by(),
            positions=self.positions.seen([LOCAL_STACK]),
            flattens=record.spec.flatten_on_trip,
        )
        await self._save(document, record=record, new=[])
        self._status = status

    async def _save(
        self, document: dict[str, Any], *, record: EssRecord, new: Sequence[dict[str, Any]]
    ) -> None:
        """Store the status document (absent values left out) with the events, when it differs
        from the stored copy; re-read first, so a concurrent spec write is kept."""
        events = [*self._events, *new][-MAX_EVENTS:]
        full = {k: v for k, v in document.items() if v is not None} | {"events": events}
        if full != record.status:
            current = await self._read()
            if current is not None:
                await self._put(current.with_status(full))
        self._document, self._events = full, events

    def _held_by(self) -> tuple[str, ...]:
        return tuple(self._channel.held_by())

    async def _read(self) -> EssRecord | None:
        """The stored resource; one that does not decode raises ``MessageRejected``: the round
        is not reconciled, the latch in force stays, the log says why (never overwritten by a
        fresh resource, which could lift a trip it held)."""
        record = await self._bus.kv_get(subjects.ESS_BUCKET, self.name, EssRecord)
        if isinstance(record, Undecodable):
            raise record.rejected()
        return record

    async def _put(self, record: EssRecord) -> None:
        await self._bus.kv_put(subjects.ESS_BUCKET, self.name, record)

    # --- what qtrader up shows -------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """The ESS part of ``qtrader up``'s final report."""
        status = self._status
        return {
            "name": self.name,
            **{k: v for k, v in status.to_dict().items() if v is not None},
            "latch": status.latch.value,
            "acknowledgedBy": sorted(self.acks.live()),
            "pendingWorkers": list(self.acks.pending(status.latch_revision)),
        }

    def render_line(self) -> str:
        """One line for the live summary."""
        status = self._status
        line = f"ess {self.name}: {status.state}"
        if status.state is not EssState.ARMED:
            until = format_time(status.cooldown_until) if status.cooldown_until else "-"
            line += (
                f" ({status.trip_mode} by {status.tripped_by}: {status.reason};"
                f" cooldown until {until})"
            )
        line += (
            f"  trips {status.trip_count} resets {status.reset_count}"
            f"  latch rev {status.latch_revision} {status.latch}"
        )
        pending = self.acks.pending(status.latch_revision)
        return line + (f"  waiting for acks: {', '.join(pending)}" if pending else "")
