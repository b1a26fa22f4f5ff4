"""The NATS stacks the operator serves: one per TradingPolicy, ``<namespace>.<policy>``.

A policy's workloads speak only its stack's names (subjects, streams, durables, KV keys:
``subjects.scoped_*``), so two policies, or two installs sharing one NATS, never read each
other's messages. The operator serves every known stack over its one connection
(``Bus.for_stack``); for each it runs the control heartbeat, the halt acknowledgements'
subscription, the risk-alert consumer (its own durable) and a risk monitor reading that
stack's market data, orders and snapshots.

Every EmergencyStop of the namespace still covers every policy, so the halt latch is one
decision written into every stack (``put_latch``), with the same revision everywhere: the
acknowledgements of all stacks are then answers to one revision. A stack added later gets the
latch in force at once (the caller writes it, see the handlers).

Acknowledgements go to one ``AckCollector``, each worker named ``<stack>/<worker id>``: worker
ids are chosen per stack and may repeat across stacks.

Only the leading replica (``leadership``) acts: heartbeats, the risk-alert consumer (a durable
shared by the replicas, so a standby would take alerts from the leader), the risk monitors
(they publish alerts) and latch writes run only between ``lead`` and ``follow``. A standby
keeps its connection and its stacks, and collects the acknowledgements (a read), so a takeover
knows at once which workers are present.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    EmergencyStopView,
    HaltAck,
    HaltLatch,
    RiskAlert,
    Undecodable,
)
from qtrader.control.ess_resource import EssTriggers
from qtrader.control.halt_channel import AckCollector, announce_view, publish_latch
from qtrader.control.halt_combination import StopView, combine, next_latch
from qtrader.control.risk_monitor import RiskMonitor
from qtrader.local.control import heartbeat_forever

log = logging.getLogger(__name__)

AlertHandler = Callable[[RiskAlert], Awaitable[None]]


class NotLeading(RuntimeError):
    """A write asked of a replica that stands by."""


@dataclass
class _Served:
    bus: Bus
    risk: RiskMonitor
    tasks: list[asyncio.Task[None]] = field(default_factory=list)  # while served
    leading: list[asyncio.Task[None]] = field(default_factory=list)  # while this replica leads


class Stacks:
    """The known stacks and what runs for each; stop triggers apply to every stack."""

    def __init__(
        self,
        bus: Bus,
        *,
        acks: AckCollector,
        on_alert: AlertHandler,
        heartbeat_interval_s: float,
        source: str = "qtrader-operator",
    ) -> None:
        self._bus = bus
        self._acks = acks
        self._on_alert = on_alert
        self._heartbeat_interval_s = heartbeat_interval_s
        self._source = source
        self._served: dict[str, _Served] = {}
        self._triggers: dict[str, EssTriggers | None] = {}
        self._leading = False

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._served)

    @property
    def leading(self) -> bool:
        return self._leading

    async def lead(self) -> None:
        """Start the leader's work in every stack: heartbeats, alerts, risk monitors."""
        self._leading = True
        for stack, served in self._served.items():
            self._start_leading(stack, served)

    async def follow(self) -> None:
        """Stop the leader's work (this replica stands by); connections and stacks stay."""
        self._leading = False
        for served in self._served.values():
            tasks, served.leading = served.leading, []
            await _cancel(tasks)

    async def add(self, stack: str) -> bool:
        """Serve ``stack``; False when it already is."""
        if stack in self._served:
            return False
        view = self._bus.for_stack(stack)
        await view.ensure_topology()
        served = _Served(bus=view, risk=self._monitor(view, stack))
        self._served[stack] = served
        served.tasks.append(_start(f"{stack}/halt-acks", self._collect_acks(view, stack)))
        if self._leading:
            self._start_leading(stack, served)
        log.info("serving stack %s", stack)
        return True

    def _monitor(self, bus: Bus, stack: str) -> RiskMonitor:
        risk = RiskMonitor(bus, source=f"{self._source}/{stack}")
        for name, triggers in self._triggers.items():
            risk.configure(name, triggers)
        return risk

    def _start_leading(self, stack: str, served: _Served) -> None:
        # A fresh monitor: one left from an earlier term holds figures from before the gap.
        served.risk = self._monitor(served.bus, stack)
        served.leading = [
            _start(f"{stack}/heartbeat", self._heartbeat(served.bus)),
            _start(f"{stack}/risk-alerts", self._consume_alerts(served.bus)),
            _start(f"{stack}/risk-monitor", served.risk.run()),
        ]

    async def remove(self, stack: str) -> None:
        served = self._served.pop(stack, None)
        if served is not None:
            await _cancel([*served.leading, *served.tasks])
            self._acks.forget(lambda worker: worker.startswith(f"{stack}/"))
            log.info("stack %s no longer served", stack)

    async def close(self) -> None:
        for stack in list(self._served):
            await self.remove(stack)

    # --- the stops' triggers, on every stack ----------------------------------------------

    def configure(self, name: str, triggers: EssTriggers | None) -> None:
        self._triggers[name] = triggers
        for served in self._served.values():
            served.risk.configure(name, triggers)

    def forget(self, name: str) -> None:
        self._triggers.pop(name, None)
        for served in self._served.values():
            served.risk.forget(name)

    def holding(self, name: str) -> str | None:
        """What still holds stop ``name`` back in any stack, each figure named by its stack."""
        held = [
            f"{stack}: {figure}"
            for stack, served in sorted(self._served.items())
            if (figure := served.risk.holding(name)) is not None
        ]
        return "; ".join(held) or None

    # --- the latch, in every stack --------------------------------------------------------

    async def put_latch(
        self,
        stops: Sequence[StopView],
        *,
        known: HaltLatch | None,
        min_revision: int,
        now: datetime,
        flatten: bool = False,
    ) -> tuple[HaltLatch, bool]:
        """Put the combination of ``stops`` in force in every stack; returns the latch and
        whether it is a new revision. ``known``: the latch this process last put in force
        (it may be the only one when no stack is served yet). The caller serialises writers."""
        buses = [served.bus for served in self._served.values()]
        currents = [
            await bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch) for bus in buses
        ]
        reference, floor = _reference(known, currents)
        latch = _next(
            stops, reference, min_revision=min_revision, floor=floor, now=now, flatten=flatten
        )
        in_force = latch if latch is not None else reference
        assert in_force is not None  # next_latch writes whenever there is no latch
        for bus, current in zip(buses, currents, strict=True):
            if current != in_force:  # a new revision, or a stack that lacks the one in force
                await publish_latch(bus, in_force)
        return in_force, latch is not None

    async def announce_view(self, view: EmergencyStopView) -> None:
        """Tell every stack's live viewers a stop's status (each stop covers every stack)."""
        for served in list(self._served.values()):
            await announce_view(served.bus, view)

    # --- per stack --------------------------------------------------------------------------

    async def _heartbeat(self, bus: Bus) -> None:
        await heartbeat_forever(bus, issued_by=self._source, interval_s=self._heartbeat_interval_s)

    async def _collect_acks(self, bus: Bus, stack: str) -> None:
        async def on_ack(ack: HaltAck) -> None:
            named = ack.model_copy(update={"worker_id": f"{stack}/{ack.worker_id}"})
            await self._acks.on_ack(named)

        await bus.subscribe(subjects.CONTROL_HALT_ACK, HaltAck, on_ack, label="halt-acks")

    async def _consume_alerts(self, bus: Bus) -> None:
        await bus.consume(subjects.OPERATOR_RISK_ALERTS, RiskAlert, self._on_alert)


def _reference(
    known: HaltLatch | None, currents: Sequence[HaltLatch | Undecodable | None]
) -> tuple[HaltLatch | None, int]:
    """The newest latch any stack (or this process) holds, and the revision a new latch must
    reach to lie above a latch that does not decode (no more latches were ever written to the
    bucket than its KV revision)."""
    floor = 0
    latches = [known] if known is not None else []
    for current in currents:
        if isinstance(current, Undecodable):
            log.error("replacing the halt latch in the bucket: %s", current)
            floor = max(floor, current.stored_revision + 1)
        elif current is not None:
            latches.append(current)
    return max(latches, key=lambda latch: latch.revision, default=None), floor


def _next(
    stops: Sequence[StopView],
    reference: HaltLatch | None,
    *,
    min_revision: int,
    floor: int,
    now: datetime,
    flatten: bool,
) -> HaltLatch | None:
    """The new latch to write, or None when ``reference`` says the combination already."""
    issued_at_ms = int(now.timestamp() * 1000)
    combined = combine(stops)
    latch = next_latch(
        combined,
        current=reference,
        min_revision=max(min_revision, floor),
        issued_at_ms=issued_at_ms,
        flatten=flatten,
    )
    if latch is None and reference is not None and reference.revision < floor:
        # Same meaning, but a stack's undecodable latch may hold a revision above it.
        latch = next_latch(
            combined,
            current=None,
            min_revision=max(min_revision, floor),
            issued_at_ms=issued_at_ms,
            flatten=flatten,
        )
    return latch


def _start(name: str, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    task = asyncio.create_task(coroutine, name=name)
    task.add_done_callback(_report_end)
    return task


CANCEL_TIMEOUT_S = 5.0


async def _cancel(tasks: Sequence[asyncio.Task[None]]) -> None:
    """Cancel a stack's tasks; one that does not end within ``CANCEL_TIMEOUT_S`` is named
    (with where it waits) and left behind, so stopping the operator never hangs on it."""
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=CANCEL_TIMEOUT_S)
    for task in pending:
        where = "; ".join(f"{f.f_code.co_filename}:{f.f_lineno}" for f in task.get_stack())
        log.error("stack task %s did not end when cancelled (at %s)", task.get_name(), where)


def _report_end(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("stack task %s failed", task.get_name(), exc_info=exc)
    else:
        log.error("stack task %s ended unexpectedly", task.get_name())
