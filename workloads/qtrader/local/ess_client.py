"""``qtrader ess trip | reset``: patch an EmergencyStop's spec, read the control plane's answer.

This is local mode's ``kubectl patch``: a trip merges ``{"tripped": true, "reason": ...}`` (and
``mode`` when given) into the spec and sets the tripped-by annotation; a reset merges
``{"tripped": false}``. The patched spec is validated with the CRD's rules before it is stored,
and the next ``generation`` is written, as the API server would. Whether a reset is allowed is not
decided here: the control plane's ``reconcile`` decides (a reset inside the cooldown under
``requireManualReset`` is refused and the spec set back to tripped), so the command waits until
the status has observed its generation and reports what it says.

Why a patch can be re-applied: the record has two writers and no compare-and-set (see
``qtrader.local.control_plane``). A write that a concurrent one replaced shows as a record whose
generation is below ours, or at ours without our change; it is written again on top of what is
there. Once the generation has moved past ours, someone acted after us and we only report.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import Undecodable
from qtrader.control.ess_status import EssMode, EssState, parse_time
from qtrader.local.control_plane import EssRecord, utc_now

POLL_S = 0.1


class EssNotFound(LookupError):
    """No EmergencyStop of that name in the stack's ESS bucket."""


class Verdict(enum.StrEnum):
    TRIPPED = "tripped"
    RESET = "reset"
    DEFERRED = "deferred"
    REFUSED = "refused"
    OVERRIDDEN = "overridden"  # someone else changed the spec after us
    NOT_OBSERVED = "not-observed"  # the control plane did not answer in time
    NOTHING_TO_DO = "nothing-to-do"

    @property
    def succeeded(self) -> bool:
        return self in (Verdict.TRIPPED, Verdict.RESET, Verdict.DEFERRED, Verdict.NOTHING_TO_DO)


@dataclass(frozen=True, kw_only=True)
class Outcome:
    verdict: Verdict
    record: EssRecord
    events: tuple[dict[str, Any], ...]  # what the control plane recorded since the patch


async def read_record(bus: Bus, name: str) -> EssRecord:
    record = await bus.kv_get(subjects.ESS_BUCKET, name, EssRecord)
    if record is None:
        raise EssNotFound(f"no EmergencyStop named {name!r} in this stack")
    if isinstance(record, Undecodable):
        raise record.rejected()  # the command says why and exits 1
    return record


async def trip(
    bus: Bus, *, name: str, reason: str, mode: EssMode | None, tripped_by: str, timeout_s: float
) -> Outcome:
    patch: dict[str, Any] = {"tripped": True, "reason": reason}
    if mode is not None:
        patch["mode"] = mode.value
    return await _apply(
        bus, name=name, patch=patch, tripped_by=tripped_by, judge=_judge_trip, timeout_s=timeout_s
    )


async def reset(bus: Bus, *, name: str, timeout_s: float) -> Outcome:
    record = await read_record(bus, name)
    if not record.spec.tripped and record.ess_status().state is EssState.ARMED:
        return Outcome(verdict=Verdict.NOTHING_TO_DO, record=record, events=())
    return await _apply(
        bus,
        name=name,
        patch={"tripped": False},
        tripped_by=None,
        judge=_judge_reset,
        timeout_s=timeout_s,
    )


async def wait_for_acks(bus: Bus, *, name: str, timeout_s: float) -> EssRecord:
    """The record once every known worker acknowledged its latch revision, once the control
    plane reported the ones that did not (its ``AckTimeout`` condition), or at ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        record = await read_record(bus, name)
        if _all_acknowledged(record) or ack_timed_out(record) or time.monotonic() >= deadline:
            return record
        await asyncio.sleep(POLL_S)


def ack_timed_out(record: EssRecord) -> bool:
    """Whether the control plane reports workers overdue (the ``AckTimeout`` condition)."""
    return any(
        c.get("type") == "AckTimeout" and c.get("status") == "True"
        for c in record.list_in_status("conditions")
    )


def _all_acknowledged(record: EssRecord) -> bool:
    revision = record.ess_status().latch_revision
    acks = record.list_in_status("acknowledgements")
    return not record.list_in_status("pendingWorkers") and all(
        a.get("revision", 0) >= revision for a in acks
    )


Judge = Callable[[EssRecord, tuple[dict[str, Any], ...]], Verdict]


async def _apply(
    bus: Bus,
    *,
    name: str,
    patch: Mapping[str, Any],
    tripped_by: str | None,
    judge: Judge,
    timeout_s: float,
) -> Outcome:
    since = utc_now()
    deadline = time.monotonic() + timeout_s
    written = await _write(bus, await read_record(bus, name), patch, tripped_by=tripped_by)
    while True:
        record = await read_record(bus, name)
        if _lost(record, written=written, patch=patch):
            written = await _write(bus, record, patch, tripped_by=tripped_by)
        elif record.observed_generation >= written.generation:
            events = _events_since(record, since)
            return Outcome(verdict=judge(record, events), record=record, events=events)
        if time.monotonic() >= deadline:
            return Outcome(verdict=Verdict.NOT_OBSERVED, record=record, events=())
        await asyncio.sleep(POLL_S)


async def _write(
    bus: Bus, record: EssRecord, patch: Mapping[str, Any], *, tripped_by: str | None
) -> EssRecord:
    """Merge ``patch`` into the spec (validated: EmergencyStopError when the CRD would refuse)."""
    written = record.with_spec(record.spec.with_patch(patch), tripped_by=tripped_by)
    await bus.kv_put(subjects.ESS_BUCKET, record.name, written)
    return written


def _lost(record: EssRecord, *, written: EssRecord, patch: Mapping[str, Any]) -> bool:
    """Our write was replaced by one that did not see it."""
    if record.generation != written.generation:
        return record.generation < written.generation
    document = record.spec.to_document()
    return any(document.get(key) != value for key, value in patch.items())


def _judge_trip(record: EssRecord, events: tuple[dict[str, Any], ...]) -> Verdict:
    state = record.ess_status().state
    return Verdict.OVERRIDDEN if state is EssState.ARMED else Verdict.TRIPPED


def _judge_reset(record: EssRecord, events: tuple[dict[str, Any], ...]) -> Verdict:
    status = record.ess_status()
    if status.state is EssState.ARMED:
        return Verdict.RESET
    if status.state is EssState.COOLING_DOWN:
        return Verdict.DEFERRED
    # Refused in the cooldown, or because a trigger's condition still holds (an event says so).
    refused = status.reset_refused_until is not None or any(
        e.get("reason") == "ResetRefused" for e in events
    )
    return Verdict.REFUSED if refused else Verdict.OVERRIDDEN


def _events_since(record: EssRecord, since: datetime) -> tuple[dict[str, Any], ...]:
    """The events the control plane recorded at or after ``since`` (same machine, same clock)."""
    recent = []
    for event in record.list_in_status("events"):
        with contextlib.suppress(ValueError, TypeError, KeyError):
            if parse_time(event["at"]) >= since:
                recent.append(event)
    return tuple(recent)
