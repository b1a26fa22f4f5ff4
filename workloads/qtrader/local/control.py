"""The control-plane writes that local mode performs itself: the policy revision and the latch.

In a cluster the operator writes both; locally ``qtrader up`` (and later ``qtrader policy`` and
``qtrader ess``) write the same messages to the same buckets, so the workloads cannot tell the
difference. Revisions only grow: each write reads the current value first.
"""

from __future__ import annotations

import time

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import HaltLatch, PolicyRevision, TradingState
from qtrader.contracts.policy import TradingPolicy


def _now_ms() -> int:
    return int(time.time() * 1000)


async def publish_policy(bus: Bus, policy: TradingPolicy) -> PolicyRevision:
    current = await bus.kv_get(subjects.POLICY_BUCKET, subjects.POLICY_KEY, PolicyRevision)
    revision = PolicyRevision(
        name=policy.metadata.name,
        revision=(current.revision + 1) if current else 1,
        published_at_ms=_now_ms(),
        spec=policy.spec,
    )
    await bus.kv_put(subjects.POLICY_BUCKET, subjects.POLICY_KEY, revision)
    return revision


async def write_latch(bus: Bus, *, state: TradingState, reason: str, issued_by: str) -> HaltLatch:
    current = await bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch)
    latch = HaltLatch(
        state=state,
        revision=(current.revision + 1) if current else 1,
        reason=reason,
        issued_by=issued_by,
        issued_at_ms=_now_ms(),
    )
    await bus.kv_put(subjects.HALT_BUCKET, subjects.HALT_KEY, latch)
    return latch
