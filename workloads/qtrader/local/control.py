"""The control-plane writes that local mode performs itself: the policy revision and the latch.

In a cluster the operator writes both; locally ``qtrader up`` (and later ``qtrader policy`` and
``qtrader ess``) write the same messages to the same buckets, so the workloads cannot tell the
difference. Revisions only grow: each write reads the current value first.
"""

from __future__ import annotations

import asyncio
import logging
import time

from qtrader.bus.errors import BusUnavailable
from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    ControlHeartbeat,
    HaltLatch,
    PolicyRevision,
    TradingState,
    Undecodable,
)
from qtrader.contracts.policy import TradingPolicy

log = logging.getLogger(__name__)


def _now_ms() -> int:
    return int(time.time() * 1000)


async def publish_policy(bus: Bus, policy: TradingPolicy) -> PolicyRevision:
    current = await bus.kv_get(subjects.POLICY_BUCKET, subjects.POLICY_KEY, PolicyRevision)
    revision = PolicyRevision(
        name=policy.metadata.name,
        revision=_revision_after(current),
        published_at_ms=_now_ms(),
        spec=policy.spec,
    )
    await bus.kv_put(subjects.POLICY_BUCKET, subjects.POLICY_KEY, revision)
    return revision


async def write_latch(bus: Bus, *, state: TradingState, reason: str, issued_by: str) -> HaltLatch:
    current = await bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch)
    latch = HaltLatch(
        state=state,
        revision=_revision_after(current),
        reason=reason,
        issued_by=issued_by,
        issued_at_ms=_now_ms(),
    )
    await bus.kv_put(subjects.HALT_BUCKET, subjects.HALT_KEY, latch)
    return latch


def _revision_after(current: HaltLatch | PolicyRevision | Undecodable | None) -> int:
    """The next revision; over a value that does not decode, one above its KV revision (no
    more revisions than that were ever written to the key), so the workers take it as new."""
    if isinstance(current, Undecodable):
        log.warning("replacing %s", current)
        return current.stored_revision + 1
    return current.revision + 1 if current else 1


async def heartbeat_forever(bus: Bus, *, issued_by: str, interval_s: float = 1.0) -> None:
    """Tell the execution workers the control plane is alive, with the latch revision it holds.

    Workers halt themselves when the heartbeat stops; a worker that hears of a newer latch
    revision than it has acknowledged re-reads the latch at once.
    """
    while True:
        try:
            latch = await bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch)
            heartbeat = ControlHeartbeat(
                issued_by=issued_by,
                # None that decodes: the workers are halted by it; nothing newer to announce.
                latch_revision=latch.revision if isinstance(latch, HaltLatch) else 0,
                ts_ms=_now_ms(),
            )
            await bus.broadcast(subjects.CONTROL_HEARTBEAT, heartbeat)
        except BusUnavailable as exc:
            log.warning("heartbeat not sent: %s", exc)
        await asyncio.sleep(interval_s)
