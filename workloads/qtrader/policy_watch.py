"""Live policy in a workload: the current TradingPolicy revision, read from the POLICY KV bucket.

Every workload runs one ``PolicyWatcher``. It reads the bucket at start, follows every new
revision without a restart, and re-reads the bucket when the revision it holds is older than the
policy's own refresh interval (a watch that silently stopped must not leave a stale policy in
force). The revision and its age are metrics and a health dependency; a workload with no policy
reports DEGRADED and does not trade.

A value in the bucket that does not decode is refused, never fatal: the last good revision stays
in force (none at start: no trading), ``/health`` says DEGRADED naming the bad revision and why,
``qtrader_policy_refused_total`` counts it, until a valid revision is written.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from prometheus_client import Counter, Gauge

from qtrader.bus.errors import BusUnavailable
from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import PolicyRevision, Undecodable
from qtrader.health.contract import DependencyHealth, Status

log = logging.getLogger(__name__)

POLICY_REVISION = Gauge("qtrader_policy_revision", "The TradingPolicy revision in force (0: none).")
POLICY_AGE = Gauge(
    "qtrader_policy_age_seconds", "Seconds since the policy in force was last read or confirmed."
)

POLICY_REFUSED = Counter(
    "qtrader_policy_refused_total",
    "Policy values in the bucket that did not decode (the last good revision stayed in force).",
)

Listener = Callable[[PolicyRevision], None]


class PolicyWatcher:
    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._current: PolicyRevision | None = None
        self._refused: Undecodable | None = None  # the bucket's value, when it does not decode
        self._confirmed_at = 0.0
        self._listeners: list[Listener] = []
        self._arrived = asyncio.Event()
        POLICY_AGE.set_function(self.age_s)

    @property
    def current(self) -> PolicyRevision | None:
        return self._current

    def age_s(self) -> float:
        return time.monotonic() - self._confirmed_at if self._current else 0.0

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def wait(self) -> PolicyRevision:
        await self._arrived.wait()
        assert self._current is not None  # set before the event
        return self._current

    def _take(self, stored: PolicyRevision | Undecodable | None) -> None:
        if isinstance(stored, Undecodable):
            self._refuse(stored)
        elif stored is not None:  # a deleted policy confirms nothing; the last one stays
            self._accept(stored)

    def _refuse(self, bad: Undecodable) -> None:
        """Keep the last good revision (and its age: a refused value confirms nothing)."""
        if self._refused is None or self._refused.stored_revision != bad.stored_revision:
            POLICY_REFUSED.inc()
            kept = f"revision {self._current.revision}" if self._current else "no policy"
            log.error("policy refused, %s stays in force: %s", kept, bad)
        self._refused = bad

    def _accept(self, revision: PolicyRevision) -> None:
        self._confirmed_at = time.monotonic()
        self._refused = None
        if self._current is not None and revision.revision == self._current.revision:
            return
        self._current = revision
        POLICY_REVISION.set(revision.revision)
        log.info("policy %s revision %d in force", revision.name, revision.revision)
        for listener in self._listeners:
            listener(revision)
        self._arrived.set()

    async def run(self) -> None:
        """Follow the bucket until cancelled; runs beside the refresh loop."""
        await asyncio.gather(self._watch(), self._refresh())

    async def _watch(self) -> None:
        while True:
            try:
                async for revision in self._bus.kv_watch(
                    subjects.POLICY_BUCKET, subjects.POLICY_KEY, PolicyRevision
                ):
                    self._take(revision)
            except BusUnavailable as exc:
                log.warning("policy watch interrupted (%s); resuming", exc)
            except Exception:
                log.exception("policy watch failed; resuming")
            await asyncio.sleep(1.0)

    async def _refresh(self) -> None:
        while True:
            await self.read_now()
            interval = self._current.spec.policy_refresh_seconds if self._current else 1.0
            if self._refused is not None:  # the age is not confirmed; no point re-reading sooner
                await asyncio.sleep(interval)
                continue
            await asyncio.sleep(min(interval, max(0.1, interval - self.age_s())))

    async def read_now(self) -> None:
        try:
            revision = await self._bus.kv_get(
                subjects.POLICY_BUCKET, subjects.POLICY_KEY, PolicyRevision
            )
        except BusUnavailable as exc:
            log.warning("cannot re-read the policy: %s", exc)
            return
        self._take(revision)

    async def check(self) -> DependencyHealth:
        current, refused = self._current, self._refused
        if refused is not None:
            kept = (
                f"{current.name} revision {current.revision} stays in force"
                if current
                else "no policy in force: not trading"
            )
            detail = f"policy {refused.source} revision {refused.stored_revision} refused"
            return DependencyHealth(
                name="policy", status=Status.DEGRADED, detail=f"{detail} ({refused.why}); {kept}"
            )
        if current is None:
            return DependencyHealth(
                name="policy", status=Status.DEGRADED, detail="no policy published: not trading"
            )
        age = self.age_s()
        stale = age > 2 * current.spec.policy_refresh_seconds
        return DependencyHealth(
            name="policy",
            status=Status.DEGRADED if stale else Status.OK,
            detail=f"{current.name} revision {current.revision}, age {age:.1f}s"
            + (" (stale)" if stale else ""),
        )
