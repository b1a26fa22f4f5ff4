"""Keep the local stack's processes up: a dead workload or nats-server is started again.

``qtrader up`` runs what a cluster's kubelet would keep alive (four workloads and the broker),
so it must do the kubelet's job too: a process that exits without having been asked to is
started again, the same way (same port, same store, same outbox), after a back-off that doubles
with each failure in a row (``BACKOFF_INITIAL_S`` up to ``BACKOFF_MAX_S``) and starts over once
the process has stayed up for ``STABLE_AFTER_S``. Every exit and restart is an event the live
summaries show and the final report counts; whatever is down when the run ends, or crash-loops
(failed again after a restart), makes ``qtrader up`` exit non-zero.

``Supervisor.step`` is one look at every service on an injected clock; ``Supervisor.run`` takes
that step every ``interval_s`` until the stack stops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 30.0
_MAX_EVENTS = 100


@dataclass(frozen=True, kw_only=True)
class SupervisedEvent:
    at: float  # the supervisor's clock
    service: str
    what: str  # "exited (code -9)", "restarted (2nd time)", "failed to start: ..."


@dataclass(kw_only=True)
class _Service:
    name: str
    start: Callable[[], None]
    exit_code: Callable[[], int | None]  # None while it runs
    started_at: float
    restarts: int = 0
    failures_in_a_row: int = 0
    down_since: float | None = None
    restart_at: float | None = None
    held: bool = False  # stopped on purpose: not restarted


@dataclass
class Supervisor:
    clock: Callable[[], float] = time.monotonic
    _services: dict[str, _Service] = field(default_factory=dict)
    events: list[SupervisedEvent] = field(default_factory=list)

    def add(
        self, name: str, *, start: Callable[[], None], exit_code: Callable[[], int | None]
    ) -> None:
        """Watch ``name``, already started; ``start`` starts it again the same way."""
        self._services[name] = _Service(
            name=name, start=start, exit_code=exit_code, started_at=self.clock()
        )

    def hold(self, name: str) -> None:
        """``name`` is being stopped on purpose: never restart it."""
        if name in self._services:
            self._services[name].held = True

    def hold_all(self) -> None:
        for name in self._services:
            self.hold(name)

    @property
    def restarts(self) -> dict[str, int]:
        return {name: service.restarts for name, service in self._services.items()}

    def summary(self) -> str:
        """``restarts 0`` or ``restarts 3 (execution 2, nats-server 1) DOWN: execution``."""
        restarted = {name: n for name, n in self.restarts.items() if n}
        text = f"restarts {sum(restarted.values())}"
        if restarted:
            text += " (" + ", ".join(f"{name} {n}" for name, n in sorted(restarted.items())) + ")"
        down = self.down()
        return text + (f" DOWN: {', '.join(down)}" if down else "")

    def down(self) -> list[str]:
        """Services nobody asked to stop that are not running now, or crash-looping: failed
        again after a restart and not up for ``STABLE_AFTER_S`` since (a restart that is about
        to fail must not pass for a recovery)."""
        return [
            name
            for name, service in self._services.items()
            if not service.held
            and (service.exit_code() is not None or service.failures_in_a_row >= 2)
        ]

    async def run(self, stop: asyncio.Event, *, interval_s: float = 0.5) -> None:
        """Check and restart until ``stop`` is set (a stopping stack restarts nothing)."""
        while not stop.is_set():
            self.step(stopping=stop.is_set)
            try:
                await asyncio.wait_for(stop.wait(), interval_s)
            except TimeoutError:
                continue

    def step(self, *, stopping: Callable[[], bool] = lambda: False) -> None:
        now = self.clock()
        for service in self._services.values():
            if service.held:
                continue
            code = service.exit_code()
            if code is None:
                if now - service.started_at >= STABLE_AFTER_S:
                    service.failures_in_a_row = 0
                continue
            if service.down_since is None:
                self._went_down(service, code, now)
            if service.restart_at is not None and now >= service.restart_at and not stopping():
                self._restart(service, now)

    def _went_down(self, service: _Service, code: int, now: float) -> None:
        service.down_since = now
        service.restart_at = now + backoff_s(service.failures_in_a_row)
        service.failures_in_a_row += 1
        delay = service.restart_at - now
        self._record(service.name, f"exited (code {code}); restart in {delay:.1f} s", now)

    def _restart(self, service: _Service, now: float) -> None:
        try:
            service.start()
        except Exception as exc:  # e.g. the port was taken meanwhile: try again later
            service.restart_at = now + backoff_s(service.failures_in_a_row)
            service.failures_in_a_row += 1
            self._record(service.name, f"failed to start: {exc}", now)
            return
        service.restarts += 1
        service.started_at = now
        service.down_since = None
        service.restart_at = None
        self._record(service.name, f"restarted ({service.restarts} in all)", now)

    def _record(self, name: str, what: str, now: float) -> None:
        log.warning("%s %s", name, what)
        self.events.append(SupervisedEvent(at=now, service=name, what=what))
        del self.events[:-_MAX_EVENTS]


def backoff_s(failures_in_a_row: int) -> float:
    """0.5 s after the first failure, doubling, at most ``BACKOFF_MAX_S``."""
    return min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * (1 << min(failures_in_a_row, 16)))
