"""The control plane's side of the halt: write the latch, broadcast it, collect acknowledgements.

The latch is the combination of every EmergencyStop (``put_combined``, see
``qtrader.control.halt_combination``), never one stop's state alone.

Used alike by the kopf operator and by local mode (``qtrader up`` / ``qtrader ess``), so a trip
means the same thing in both. The latch in the HALT bucket is the durable truth; the broadcast on
CONTROL_HALT only makes it arrive fast. Execution workers answer every latch they put in force
and every control heartbeat with a ``HaltAck``, so the acknowledgements double as presence: a
worker whose last answer is older than ``presence_timeout_s`` is no longer counted as live.

Why silence is not absence: a worker that stops answering (frozen, partitioned, paused by the
kernel) may still hold an old latch and wake up with orders to send, so a worker the control
plane has heard from stays *known*, and pending for every newer revision, until it acknowledges
or its lease lapses: ``ack_lease_s(ack_timeout_s)``, the longer of ``ACK_LEASE_S`` (60 s) and
twice the ack timeout, counted from its last answer. Only then is it forgotten (a Deployment
scaled to 0, a worker that died). The lease is longer than the ack timeout so that every silent
worker is reported as overdue (``AckTimeout``) before it can drop out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from qtrader.bus.errors import BusUnavailable
from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    EmergencyStopView,
    HaltAck,
    HaltLatch,
    TradingState,
    Undecodable,
)
from qtrader.control.ess_status import EssStatus
from qtrader.control.halt_combination import StopView, combine, next_latch

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


async def put_combined(
    bus: Bus,
    stops: Sequence[StopView],
    *,
    min_revision: int,
    now: datetime,
    flatten: bool = False,
) -> tuple[HaltLatch, bool]:
    """Put the combination of ``stops`` in force (``halt_combination``); returns the latch in
    force and whether it was written now. The caller serialises its writers (the read and the
    write are two steps: the bus has no compare-and-set)."""
    stored = await bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch)
    current = None if isinstance(stored, Undecodable) else stored
    if isinstance(stored, Undecodable):
        # The workers are halted by it. No more latches were ever written to the bucket than
        # its KV revision, so a revision above that is above every latch they may hold.
        log.error("replacing the halt latch in the bucket: %s", stored)
        min_revision = max(min_revision, stored.stored_revision + 1)
    latch = next_latch(
        combine(stops),
        current=current,
        min_revision=min_revision,
        issued_at_ms=int(now.timestamp() * 1000),
        flatten=flatten,
    )
    if latch is None:
        assert current is not None  # next_latch writes whenever there is no latch
        return current, False
    await publish_latch(bus, latch)
    return latch, True


class SingleStopChannel:
    """The applier's latch channel (``ess_applier.LatchChannel``) for a control plane that owns
    one stop (local mode): the combination is that stop alone, named in ``held_by``."""

    def __init__(self, bus: Bus, name: str) -> None:
        self._bus = bus
        self._name = name
        self.latch: HaltLatch | None = None  # the latch in force, as last read or written
        self.written = False  # whether the last ``put`` wrote a new revision

    async def put(
        self, status: EssStatus, *, min_revision: int, flatten: bool, now: datetime
    ) -> HaltLatch:
        view = StopView(name=self._name, status=status, flatten_on_trip=flatten)
        self.latch, self.written = await put_combined(
            self._bus, [view], min_revision=min_revision, now=now, flatten=flatten
        )
        return self.latch

    def held_by(self) -> Sequence[str]:
        return self.latch.held_by if self.latch is not None else ()

    async def announce(self, view: EmergencyStopView) -> None:
        await announce_view(self._bus, view)


async def announce_view(bus: Bus, view: EmergencyStopView) -> None:
    """Tell ``bus``'s live viewers a stop's status; a view lost while NATS is down is replaced
    by the next round's, so it is not worth a retry or a failed round."""
    with contextlib.suppress(BusUnavailable):
        await bus.announce(subjects.CONTROL_ESS_STATUS, view)


ACK_LEASE_S = 60.0


def ack_lease_s(ack_timeout_s: float) -> float:
    """How long a silent worker stays known (and pending): at least 60 s, twice the timeout."""
    return max(ACK_LEASE_S, 2 * ack_timeout_s)


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

    def forget(self, selected: Callable[[str], bool]) -> None:
        """Drop the workers ``selected`` picks: ones that are gone for certain (the operator's
        stack of a deleted policy), so they are not pending for the next revisions."""
        for worker in [w for w in self._acks if selected(w)]:
            del self._acks[worker]

    def live(self) -> dict[str, WorkerAck]:
        now = self._clock()
        return {
            worker: ack
            for worker, ack in self._acks.items()
            if now - ack.heard_at <= self._presence_timeout_s
        }

    def known(self, *, lease_s: float = ACK_LEASE_S) -> dict[str, WorkerAck]:
        """Workers heard from within ``lease_s``, answering or not (see the module docstring)."""
        now = self._clock()
        return {worker: ack for worker, ack in self._acks.items() if now - ack.heard_at <= lease_s}

    def pending(self, revision: int, *, lease_s: float = ACK_LEASE_S) -> tuple[str, ...]:
        """Known workers that have not yet acknowledged ``revision``, silent ones included."""
        known = self.known(lease_s=lease_s)
        return tuple(sorted(w for w, ack in known.items() if ack.revision < revision))

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
