"""Which operator replica leads: kopf's peering, read back for the work kopf does not do.

Two replicas run; kopf's peering (a ``KopfPeering`` object, each replica a key in its
``status`` with ``priority``, ``lifetime`` and ``lastseen``) pauses every replica but the one
with the highest priority among the live ones, so only that one runs handlers. The operator
also works outside kopf's handlers (the control heartbeat, the latch keeper, the risk-alert
consumer, the risk monitors: see ``stacks`` and ``handlers``), and those must run on the same
replica only. kopf keeps its pause to itself, so ``Leadership`` reads the same object with the
same rule and says whether this replica leads.

The rule (kopf's): a replica leads while its own entry is live and no other live entry has a
priority as high or higher (equal priorities freeze everyone, as in kopf). An entry is live
until ``lastseen + lifetime``; a replica that dies without removing its entry (a crash, a
SIGKILL, a lost node) is followed once that deadline passes. A replica that exits normally
removes its entry, and the next one follows at once.

A replica that comes to lead while other replicas are live (it started, or came back, with a
higher priority than the one leading) first waits ``handover_s``: the one leading reads the
object on the same period and stands by within it, so the two never act at once. After a
crash there is nobody to wait for, and the successor acts at once.

A leader that cannot read the object for longer than the lifetime steps down: by then a
standby that can reach the API may have taken over, and two replicas heartbeating and writing
latches is worse than a pause (the workers halt only after their heartbeat timeout).

Priorities: older replicas win (``priority_from_start``), so a new pod of a rolling upgrade
never preempts the leader; leadership moves only when the leader goes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from qtrader_operator.kube import KubeApi, KubeError

log = logging.getLogger(__name__)

PEERING_API = "/apis/kopf.dev/v1"
# Start-time priorities count down from here (milliseconds since the epoch, times 1000 for a
# random tie-break): positive, below 2**53 (exact in every JSON reader) until the year 2286.
_PRIORITY_EPOCH_MS = 10**13


@dataclass(frozen=True, kw_only=True)
class PeeringConfig:
    """kopf's peering settings for this replica; the same values go to kopf."""

    name: str  # the KopfPeering object in the operator's namespace
    identity: str  # this replica's key in its status (the pod's name)
    priority: int
    lifetime_s: int = 3  # how long an entry outlives its last keep-alive (kopf: whole seconds)
    poll_s: float = 0.5  # how often this replica reads the object
    handover_s: float = 1.5  # > poll_s: a preempted leader has read the object by then


def priority_from_start(now_ms: int | None = None, tie_break: int | None = None) -> int:
    """A priority that is higher the earlier the replica started (ties: a random 0..999)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    tie_break = random.randrange(1000) if tie_break is None else tie_break
    return (_PRIORITY_EPOCH_MS - now_ms) * 1000 + tie_break


def peering_path(namespace: str, name: str) -> str:
    return f"{PEERING_API}/namespaces/{namespace}/kopfpeerings/{name}"


def leads(status: Mapping[str, Any], *, identity: str, priority: int, now: datetime) -> bool:
    """kopf's rule over a peering object's ``status``: this replica's entry is live and no
    other live entry has a priority as high or higher."""
    live = {peer: entry for peer, entry in status.items() if _live(entry, now)}
    if identity not in live:
        return False
    return not any(_priority(entry) >= priority for peer, entry in live.items() if peer != identity)


def others_live(status: Mapping[str, Any], *, identity: str, now: datetime) -> bool:
    """Whether any other replica's entry is live (one of them may be leading right now)."""
    return any(peer != identity and _live(entry, now) for peer, entry in status.items())


def _live(entry: Any, now: datetime) -> bool:
    """An entry is live until ``lastseen + lifetime``; one that does not parse is not."""
    if not isinstance(entry, Mapping):  # a removed entry (null) or garbage
        return False
    try:
        seen = datetime.fromisoformat(str(entry["lastseen"]))
        lifetime = timedelta(seconds=int(entry.get("lifetime", 60)))
    except (KeyError, TypeError, ValueError):
        return False
    if seen.tzinfo is None:
        seen = seen.replace(tzinfo=UTC)
    return seen + lifetime > now


def _priority(entry: Mapping[str, Any]) -> int:
    try:
        return int(entry.get("priority", 0))
    except (TypeError, ValueError):
        return 0


Transition = Callable[[bool], Awaitable[None]]


class Leadership:
    """Whether this replica leads, kept current by ``run``; standalone: always."""

    def __init__(self, peering: PeeringConfig | None, *, namespace: str) -> None:
        self._peering = peering
        self._namespace = namespace
        self._leading = peering is None
        self._confirmed_at: float | None = None  # monotonic time of the last good read

    @property
    def leading(self) -> bool:
        return self._leading

    @property
    def identity(self) -> str | None:
        return None if self._peering is None else self._peering.identity

    async def run(self, kube: KubeApi, on_change: Transition) -> None:
        """Follow the peering object until cancelled; ``on_change`` gets each transition
        (awaited before the next read, so transitions never overlap)."""
        peering = self._peering
        if peering is None:
            return
        path = peering_path(self._namespace, peering.name)
        while True:
            leading, others = await self._decide(kube, path, peering)
            if leading and not self._leading and others:
                log.info("replica %s to lead: waiting for the others to stand by", peering.identity)
                await asyncio.sleep(peering.handover_s)
                leading, _ = await self._decide(kube, path, peering)
            if leading != self._leading:
                self._leading = leading
                log.warning("replica %s %s", peering.identity, "leads" if leading else "stands by")
                await on_change(leading)
            await asyncio.sleep(peering.poll_s)

    async def _decide(self, kube: KubeApi, path: str, peering: PeeringConfig) -> tuple[bool, bool]:
        """Whether this replica leads, and whether other replicas are live."""
        now = time.monotonic()
        try:
            body = await kube.get(path)
        except KubeError as exc:
            stale = self._confirmed_at is None or now - self._confirmed_at > peering.lifetime_s
            if self._leading and stale:
                log.error("peering %s unreadable for too long (%s): stepping down", path, exc)
                return False, False
            log.warning("peering %s unreadable: %s", path, exc)
            return self._leading, False
        self._confirmed_at = now
        found = body.get("status") or {}
        status = found if isinstance(found, Mapping) else {}
        wall = datetime.now(UTC)
        return (
            leads(status, identity=peering.identity, priority=peering.priority, now=wall),
            others_live(status, identity=peering.identity, now=wall),
        )
