"""The shell every workload role runs in: bus, health server, policy, signals, named tasks.

A role supplies its health checks and its long-running coroutines; this module does the rest
the same way for all four roles:
1. serve the health contract at once (so a probe sees CRITICAL rather than nothing while NATS is
   still unreachable);
2. connect to NATS (retrying) and create the topology idempotently;
3. start the policy watcher and the role's tasks, each named, each guarded: a task that ends or
   fails stops the worker with a non-zero exit, so Kubernetes restarts it instead of leaving a
   half-alive process;
4. on SIGTERM or SIGINT let a role that has work in flight finish it (``Draining``, at most
   ``DRAIN_TIMEOUT_S``: execution's order at the venue), then cancel everything and close the
   connection cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from fastapi import FastAPI
from prometheus_client import Gauge

from qtrader.bus.errors import BusUnavailable
from qtrader.bus.nats_bus import Bus
from qtrader.bus.outbox import Outbox, OutboxUnwritable, open_outbox
from qtrader.contracts import subjects
from qtrader.health.contract import (
    REFRESH_INTERVAL_S,
    DependencyHealth,
    HealthMonitor,
    HealthReport,
    Status,
    create_app,
    serve,
)
from qtrader.policy_watch import PolicyWatcher
from qtrader.startup_heap import freeze_startup_heap

log = logging.getLogger(__name__)
FROZEN_AT_START = Gauge(
    "qtrader_gc_frozen_objects",
    "Objects made while the worker started, kept out of the garbage collector's walks.",
)

Task = Coroutine[Any, Any, None]


@dataclass(frozen=True, kw_only=True)
class WorkerOptions:
    nats_url: str
    health_host: str = "0.0.0.0"
    health_port: int = 8080
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    # Where unacknowledged publishes wait for NATS; None: no outbox (a failed publish raises).
    outbox_dir: Path | None = None
    outbox_capacity: int = 100_000
    # The TradingPolicy's stack (``<namespace>.<policy>``, set by the operator): the names of
    # its subjects, streams, consumers and KV keys. None in local mode (one policy).
    stack: str | None = None


@dataclass(frozen=True, kw_only=True)
class WorkerContext:
    """What a role is built from: the shared connection, the policy and its identity, and the
    HTTP app serving the health contract (a role may add its own routes to it)."""

    bus: Bus
    policy: PolicyWatcher
    monitor: HealthMonitor
    options: WorkerOptions
    app: FastAPI


class Role(Protocol):
    """A workload role: its tasks run until cancelled."""

    def tasks(self) -> dict[str, Task]: ...


@runtime_checkable
class Draining(Protocol):
    """A role with work that must not be cut off by a stop (an order booked at the venue whose
    fills are not yet published): ``drain`` returns once none is in flight, and the role takes
    no more until its tasks are cancelled."""

    async def drain(self) -> None: ...


RoleFactory = Callable[[WorkerContext], Role]
# Under Kubernetes' default 30 s grace period, with room for the rest of the shutdown.
DRAIN_TIMEOUT_S = 10.0


def configure_logging(service: str) -> None:
    level = os.environ.get("QTRADER_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s",
    )
    logging.getLogger("nats").setLevel(logging.WARNING)


def run_worker(service: str, options: WorkerOptions, factory: RoleFactory) -> int:
    """Run one workload until it is told to stop; returns the process exit code."""
    configure_logging(service)
    return asyncio.run(_run(service, options, factory))


async def _run(service: str, options: WorkerOptions, factory: RoleFactory) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    outbox, outbox_failure = _open_outbox(service, options)
    bus = Bus(
        url=options.nats_url,
        client_name=f"{service}:{options.worker_id}",
        outbox=outbox,
        stack=options.stack,
    )
    monitor = HealthMonitor(service=service)
    monitor.add_check("nats", lambda: nats_health(bus))
    monitor.add_check("outbox", lambda: _outbox_health(bus, outbox_failure))
    app = create_app(monitor)
    health = asyncio.create_task(
        serve(app, host=options.health_host, port=options.health_port), name="health-server"
    )
    tasks: dict[str, asyncio.Task[None]] = {"health-server": health}
    try:
        policy = PolicyWatcher(bus)
        monitor.add_check("policy", policy.check)
        # Built before connecting, so its routes and checks exist from the first request the
        # health server answers (a viewer must not meet a ready worker without /events).
        context = WorkerContext(bus=bus, policy=policy, monitor=monitor, options=options, app=app)
        role = factory(context)
        connected = asyncio.create_task(_connect(bus), name="connect")
        await _first_of(connected, stop)
        if stop.is_set():
            return 0
        coroutines = {
            "policy-watch": policy.run(),
            "health-refresh": monitor.refresh_forever(
                on_report=functools.partial(_announce_health, bus, worker_id=options.worker_id)
            ),
            "outbox-replay": bus.replay_forever(),
        }
        coroutines.update(role.tasks())
        for name, coroutine in coroutines.items():
            tasks[name] = asyncio.create_task(coroutine, name=name)
        FROZEN_AT_START.set(freeze_startup_heap())  # see startup_heap: halts wait on walks
        log.info("%s started (worker %s)", service, options.worker_id)
        code = await _supervise(tasks, stop)
        if stop.is_set():
            await _drain(role)
        return code
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        await bus.close()
        log.info("%s stopped", service)


def _open_outbox(
    service: str, options: WorkerOptions
) -> tuple[Outbox | None, OutboxUnwritable | None]:
    """One outbox file per role and host (the pod name in a cluster): a restarted worker
    replays what its previous run could not publish. One that cannot be opened (a read-only or
    full volume) is a CRITICAL dependency, not a crash: the worker runs without it, and a NATS
    outage then pushes back on its producers instead of being buffered."""
    if options.outbox_dir is None:
        return None, None
    name = f"{service}-{socket.gethostname()}"
    try:
        return open_outbox(options.outbox_dir, name, capacity=options.outbox_capacity), None
    except OutboxUnwritable as exc:
        log.error("cannot open the outbox, running without one: %s", exc)
        return None, exc


async def _outbox_health(bus: Bus, failure: OutboxUnwritable | None) -> DependencyHealth:
    if failure is not None:
        return DependencyHealth(
            name="outbox",
            status=Status.CRITICAL,
            detail=f"cannot be opened ({failure}): a NATS outage stops the producers",
        )
    return bus.outbox_health()


async def _connect(bus: Bus) -> None:
    await bus.connect()
    while True:
        try:
            await bus.ensure_topology()
            return
        except BusUnavailable as exc:
            log.warning("cannot create the JetStream topology yet: %s", exc)
            await asyncio.sleep(0.5)


async def _first_of(task: asyncio.Task[None], stop: asyncio.Event) -> None:
    stopper = asyncio.create_task(stop.wait(), name="stop-wait")
    done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    for pending in (task, stopper):
        if pending not in done:
            pending.cancel()
    if task in done:
        task.result()


async def _drain(role: Role) -> None:
    if not isinstance(role, Draining):
        return
    try:
        await asyncio.wait_for(role.drain(), DRAIN_TIMEOUT_S)
    except TimeoutError:
        log.error("work still in flight after %.0f s; stopping anyway", DRAIN_TIMEOUT_S)


async def _supervise(tasks: dict[str, asyncio.Task[None]], stop: asyncio.Event) -> int:
    """Wait for a stop request or for any task to end; an ending task is a failure."""
    stopper = asyncio.create_task(stop.wait(), name="stop-wait")
    done, _ = await asyncio.wait({stopper, *tasks.values()}, return_when=asyncio.FIRST_COMPLETED)
    if stopper in done:
        return 0
    stopper.cancel()
    for task in done:
        if task.cancelled():
            log.error("task %s was cancelled unexpectedly", task.get_name())
        elif (exc := task.exception()) is not None:
            log.error("task %s failed", task.get_name(), exc_info=exc)
        else:
            log.error("task %s ended unexpectedly", task.get_name())
    return 1


async def _announce_health(bus: Bus, report: HealthReport, *, worker_id: str) -> None:
    """Send ``report`` to whoever shows every workload's health (the portfolio's viewers)."""
    message = report.to_message(
        worker_id=worker_id, interval_s=REFRESH_INTERVAL_S, ts_ms=int(time.time() * 1000)
    )
    # A report lost while NATS is down costs nothing: /health says so, the next one follows.
    with contextlib.suppress(BusUnavailable):
        await bus.announce(subjects.health_report_subject(report.service), message)


async def nats_health(bus: Bus) -> DependencyHealth:
    try:
        rtt = await bus.round_trip_s()
    except BusUnavailable as exc:
        return DependencyHealth(name="nats", status=Status.CRITICAL, detail=str(exc))
    return DependencyHealth(
        name="nats", status=Status.OK, latency_ms=rtt * 1000, detail="connected"
    )
