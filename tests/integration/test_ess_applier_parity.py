"""One applier, two adapters: the operator's and the local control plane's EmergencyStop agree.

The same sequence (trip, a reset refused in the cooldown, a reset refused while an exchange ban
holds, a reset once both are over) is driven at the same instants through the applier with the
kopf adapter (``KopfStore``: the handler's patch, merged into the resource as the API server
merges it) and through ``LocalControlPlane`` (its KV record), each on its own real nats-server.
The status documents, the events and the latches must be the same. ``observedGeneration`` is
left out: the API server counts generations after the handler returns, the local record at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import kopf
import pytest

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import HaltLatch, RiskAlert, RiskAlertKind
from qtrader.control.ess import EssEvent, EssStatus
from qtrader.control.ess_applier import AckMemory, StopInput, apply_once
from qtrader.control.ess_resource import parse_emergency_stop, parse_spec
from qtrader.control.halt_channel import AckCollector, SingleStopChannel
from qtrader.control.open_positions import LOCAL_STACK, OpenPositions
from qtrader.local import ess_client
from qtrader.local.control_plane import LocalControlPlane
from qtrader.local.nats_server import EmbeddedNats
from qtrader_operator.handlers import KopfStore

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
SPEC: dict[str, Any] = {"cooldownSeconds": 60, "requireManualReset": True, "ackTimeoutSeconds": 2}


@pytest.fixture
def other_nats(tmp_path: Path) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(store_dir=tmp_path / "nats-other")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def _bus(url: str) -> AsyncIterator[Bus]:
    bus = Bus(url=url, client_name="test-parity")
    await bus.connect()
    await bus.ensure_topology()
    try:
        yield bus
    finally:
        await bus.close()


def _merge(target: dict[str, Any], patch: Mapping[str, Any]) -> None:
    """A JSON merge patch (RFC 7386), as the API server applies the handler's patch."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, Mapping):
            existing = target.get(key)
            target[key] = existing if isinstance(existing, dict) else {}
            _merge(target[key], value)
        else:
            target[key] = value


class KopfSide:
    """The operator's adapter on a resource held here; events as (type, reason, message)."""

    def __init__(self, bus: Bus) -> None:
        self.resource: dict[str, Any] = {
            "metadata": {"name": "main", "generation": 1, "annotations": {}},
            "spec": parse_spec(SPEC).to_document(),
            "status": {},
        }
        self.channel = SingleStopChannel(bus, "main")
        self.memory = AckMemory()
        self.status = EssStatus.initial()
        self.events: list[tuple[str, str, str]] = []

    async def start(self, now: datetime) -> None:
        latch = await self.channel.put(self.status, min_revision=1, flatten=False, now=now)
        self.status = EssStatus(latch_revision=latch.revision)
        self.memory.latch_written = (latch.revision, now)

    def patch_spec(self, patch: Mapping[str, Any]) -> None:
        _merge(self.resource["spec"], patch)
        self.resource["metadata"]["generation"] += 1

    async def round(self, *, now: datetime, hold: str | None) -> None:
        patch = kopf.Patch()
        store = KopfStore(body=None, patch=patch, status=self.resource["status"], emit=self._emit)
        metadata = self.resource["metadata"]
        applied = await apply_once(
            stop=StopInput(
                name="main",
                spec=parse_spec(self.resource["spec"]),
                tripped_by=metadata["annotations"].get("qtrader.dev/tripped-by", ""),
                generation=metadata["generation"],
                previous_conditions=self.resource["status"].get("conditions") or [],
                # No portfolio runs: neither side has a snapshot.
                positions=OpenPositions().seen([LOCAL_STACK]),
            ),
            status=self.status,
            store=store,
            channel=self.channel,
            acks=AckCollector(),
            memory=self.memory,
            hold=hold,
            now=now,
        )
        self.status = applied.status
        if patch.get("spec"):
            metadata["generation"] += 1
        _merge(self.resource, patch)

    def _emit(self, event: EssEvent) -> None:
        self.events.append((event.type.value, event.reason.value, event.message))


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def _comparable(status: Mapping[str, Any]) -> dict[str, Any]:
    document = {k: v for k, v in status.items() if k not in ("observedGeneration", "events")}
    document["conditions"] = [
        {k: v for k, v in c.items() if k != "observedGeneration"}
        for c in status.get("conditions") or []
    ]
    return document


async def _latch(bus: Bus) -> tuple[Any, ...]:
    latch = await bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch)
    assert latch is not None
    return (latch.state, latch.revision, latch.held_by, latch.reason, latch.issued_by)


async def test_the_same_events_through_both_adapters_give_the_same_status_events_and_latches(
    nats_server: EmbeddedNats, other_nats: EmbeddedNats
) -> None:
    clock = Clock()
    document = {
        "apiVersion": "qtrader.dev/v1alpha1",
        "kind": "EmergencyStop",
        "metadata": {"name": "main"},
        "spec": SPEC,
    }
    async with _bus(nats_server.url) as kopf_bus, _bus(other_nats.url) as local_bus:
        kopf_side = KopfSide(kopf_bus)
        local = LocalControlPlane(local_bus, resource=parse_emergency_stop(document), clock=clock)
        await local.start()
        await kopf_side.start(T0)
        local_events: list[tuple[str, str, str]] = []

        async def step(seconds: float, patch: Mapping[str, Any] | None) -> None:
            clock.now = T0 + timedelta(seconds=seconds)
            if patch is not None:
                kopf_side.patch_spec(patch)
                record = await ess_client.read_record(local_bus, "main")
                changed = record.with_spec(record.spec.with_patch(patch), tripped_by="")
                await local_bus.kv_put(subjects.ESS_BUCKET, "main", changed)
            hold = local.risk.holding("main")
            await local.reconcile_once()
            await kopf_side.round(now=clock.now, hold=hold)
            record = await ess_client.read_record(local_bus, "main")
            local_events[:] = [
                (e["type"], e["reason"], e["message"]) for e in record.list_in_status("events")
            ]
            assert _comparable(kopf_side.resource["status"]) == _comparable(record.status)
            assert kopf_side.events == local_events
            assert await _latch(kopf_bus) == await _latch(local_bus)
            assert kopf_side.resource["spec"] == record.spec.to_document()

        await step(0, None)
        await step(1, {"tripped": True, "reason": "parity"})
        await step(10, {"tripped": False})  # inside the cooldown: refused, set back
        ban = RiskAlert(
            alert_id="ban-1",
            alert_kind=RiskAlertKind.EXCHANGE_BAN,
            source="test",
            value=Decimal("2.2"),
            threshold=Decimal(0),
            detail="banned",
            ts_ms=int(time.time() * 1000),
        )
        await local.risk.on_ban(ban)
        await step(61, {"tripped": False})  # past the cooldown, but the ban holds: refused
        await asyncio.sleep(2.5)  # the ban is over
        await step(62, {"tripped": False})  # now it goes through
        assert [reason for _, reason, _ in kopf_side.events] == [
            "Tripped",
            "ResetRefused",
            "ResetRefused",
            "Reset",
        ]
        assert "exchange ban still runs" in kopf_side.events[2][2]
        assert kopf_side.resource["status"]["state"] == "Armed"
