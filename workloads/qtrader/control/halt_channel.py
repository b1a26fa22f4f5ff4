"""The control plane's side of the halt: write the latch, broadcast it, collect acknowledgements.

Used alike by the kopf operator and by local mode (``qtrader up`` / ``qtrader ess``), so a trip
means the same thing in both. The latch in the HALT bucket is the durable truth; the broadcast on
CONTROL_HALT only makes it arrive fast. Execution workers answer every latch they put in force
and every control heartbeat with a ``HaltAck``, so the acknowledgements double as presence: a
worker whose last answer is older than ``presence_timeout_s`` is no longer counted as live.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import HaltAck, HaltLatch, TradingState, Undecodable
from qtrader.control.ess import latch_message
from qtrader.control.ess_status import EssStatus

log = logging.getLogger(__name__)


async def publish_latch(bus: Bus, latch: HaltLatch) -> None:
    """Make ``latch`` the one in force, in the order that fails closed.

    A halt travels first and is made durable after: the workers stop a KV write sooner, and if
    the write then fails they are halted anyway. A resume is made durable first: a worker must
    never trade on a latch that a restart would not find in the bucket.
    """
    if latch.state is TradingState.ACTIVE:
        await bus.kv_put(subjects.HALT_BUCKET, subjects.HALT_KEY, latch)
        await bus.broadcast(subjects.CONTROL_HALT, latch)
        return
    await bus.broadcast(subjects.CONTROL_HALT, latch)
    await bus.kv_put(subjects.HALT_BUCKET, subjects.HALT_KEY, latch)


async def sync_latch(bus: Bus, status: EssStatus, *, now: datetime) -> EssStatus | None:
    """Make the latch in the bucket the one ``status`` names, at start of a control plane.

    A fresh stack has no latch at all (and its workers stay halted until one is written); the
    bucket may also hold a latch from another run. A new revision above both wins. Returns the
    status with that revision, or None when the bucket already agreed. A value there that does
    not decode (the workers are halted by it) is replaced the same way, by a revision above its
    KV revision: no more latches were ever written to the bucket than that.
    """
    stored = await bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch)
    if isinstance(stored, Undecodable):
        log.error("replacing the halt latch in the bucket: %s", stored)
        above = stored.stored_revision
    else:
        if stored and stored.revision == status.latch_revision and stored.state is status.latch:
            return None
        above = stored.revision if stored else 0
    revision = max(status.latch_revision, above) + 1
    synced = replace(status, latch_revision=revision)
    await publish_latch(bus, latch_message(synced, issued_at_ms=int(now.timestamp() * 1000)))
    return synced


@dataclass(frozen=True, kw_only=True)
class WorkerAck:
    worker_id: str
    revision: int
    state: str
    open_orders_cancelled: int
    acked_at_ms: int  # the worker's clock, when it put the revision in force
    heard_at: float  # our monotonic clock, when its latest answer arrived


class AckCollector:
    """The latest answer of every execution worker, from CONTROL_HALT_ACK."""

    def __init__(
        self, *, presence_timeout_s: float = 5.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._presence_timeout_s = presence_timeout_s
        self._clock = clock
        self._acks: dict[str, WorkerAck] = {}
        self._changed = asyncio.Event()

    async def run(self, bus: Bus) -> None:
        await bus.subscribe(subjects.CONTROL_HALT_ACK, HaltAck, self.on_ack, label="halt-acks")

    async def on_ack(self, ack: HaltAck) -> None:
        previous = self._acks.get(ack.worker_id)
        # Presence answers repeat the revision in force; keep the time it was first put in force.
        repeated = previous is not None and previous.revision == ack.revision
        self._acks[ack.worker_id] = WorkerAck(
            worker_id=ack.worker_id,
            revision=ack.revision,
            state=ack.state.value,
            open_orders_cancelled=ack.open_orders_cancelled,
            acked_at_ms=previous.acked_at_ms if previous is not None and repeated else ack.ts_ms,
            heard_at=self._clock(),
        )
        self._changed.set()

    def live(self) -> dict[str, WorkerAck]:
        now = self._clock()
        return {
            worker: ack
            for worker, ack in self._acks.items()
            if now - ack.heard_at <= self._presence_timeout_s
        }

    def pending(self, revision: int) -> tuple[str, ...]:
        """Live workers that have not yet acknowledged ``revision``."""
        return tuple(sorted(w for w, ack in self.live().items() if ack.revision < revision))

    async def wait_all(self, revision: int, *, expected: int, timeout_s: float) -> bool:
        """Wait until ``expected`` live workers acknowledged ``revision``; False on timeout."""
        deadline = self._clock() + timeout_s
        while True:
            acked = [a for a in self.live().values() if a.revision >= revision]
            if len(acked) >= expected:
                return True
            left = deadline - self._clock()
            if left <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                return False
