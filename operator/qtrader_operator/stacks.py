"""The NATS stacks the operator serves: one per TradingPolicy, ``<namespace>.<policy>``.

A policy's workloads speak only its stack's names (subjects, streams, durables, KV keys:
``subjects.scoped_*``), so two policies, or two installs sharing one NATS, never read each
other's messages. The operator serves every known stack over its one connection
(``Bus.for_stack``); for each it runs the control heartbeat, the halt acknowledgements'
subscription, the risk-alert consumer (its own durable) and a risk monitor reading that
stack's market data, orders and snapshots.

Each stack's halt latch is the combination of the stops covering its policy (every stop of the
namespace, or those whose ``policySelector`` selects the policy's labels, and always the stop
the policy names: ``halt_combination.combine_for``). Whenever any stack's combination changes,
every stack gets a new latch at one new revision (``put_latch``), each with its own content:
the acknowledgements of all stacks are then answers to one revision, as a stop's status counts
them. A stack added later gets the latch in force at once (the caller writes it, see the
handlers). A stop's triggers are watched in every stack, but its alerts, its reset holds and
its view count only in the stacks it covers.

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
    TradingState,
    Undecodable,
)
from qtrader.control.ess_resource import EssTriggers
from qtrader.control.halt_channel import AckCollector, announce_view, publish_latch
from qtrader.control.halt_combination import (
    Combined,
    StopView,
    combine,
    combine_for,
    most_restrictive,
    next_latch,
)
from qtrader.control.open_positions import OpenPositions, PositionsSeen
from qtrader.control.policy_selector import PolicyScope, PolicySelector, covers
from qtrader.control.risk_monitor import RiskMonitor
from qtrader.local.control import heartbeat_forever
from qtrader_operator.cancelling import cancel_and_wait

log = logging.getLogger(__name__)

AlertHandler = Callable[[str, RiskAlert], Awaitable[None]]  # (stack, alert)


class NotLeading(RuntimeError):
    """A write asked of a replica that stands by."""


@dataclass
class _Served:
    bus: Bus
    risk: RiskMonitor
    scope: PolicyScope  # which stops cover the stack's policy
    latch: HaltLatch | None = None  # the latch last read or put in force here
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
        self._positions = OpenPositions()
        self._triggers: dict[str, EssTriggers | None] = {}
        self._selectors: dict[str, PolicySelector | None] = {}
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
            await cancel_and_wait(tasks)

    async def add(self, stack: str, scope: PolicyScope) -> bool:
        """Serve ``stack``, whose policy has ``scope``; False when it already is with that scope
        (True also when its scope changed: the caller puts the latch in force again)."""
        known = self._served.get(stack)
        if known is not None:
            changed = known.scope != scope
            known.scope = scope
            return changed
        view = self._bus.for_stack(stack)
        await view.ensure_topology()
        served = _Served(bus=view, risk=self._monitor(view, stack), scope=scope)
        self._served[stack] = served
        served.tasks.append(_start(f"{stack}/halt-acks", self._collect_acks(view, stack)))
        served.tasks.append(_start(f"{stack}/positions", self._positions.follow(view, stack)))
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
            _start(f"{stack}/risk-alerts", self._consume_alerts(served.bus, stack)),
            _start(f"{stack}/risk-monitor", served.risk.run()),
        ]

    async def remove(self, stack: str) -> None:
        served = self._served.pop(stack, None)
        if served is not None:
            await cancel_and_wait([*served.leading, *served.tasks])
            self._acks.forget(lambda worker: worker.startswith(f"{stack}/"))
            self._positions.forget(stack)
            log.info("stack %s no longer served", stack)

    async def close(self) -> None:
        for stack in list(self._served):
            await self.remove(stack)

    # --- the stops' triggers, on every stack ----------------------------------------------

    def configure(
        self, name: str, triggers: EssTriggers | None, selector: PolicySelector | None
    ) -> None:
        self._triggers[name] = triggers
        self._selectors[name] = selector
        for served in self._served.values():
            served.risk.configure(name, triggers)

    def forget(self, name: str) -> None:
        self._triggers.pop(name, None)
        self._selectors.pop(name, None)
        for served in self._served.values():
            served.risk.forget(name)

    def selector(self, name: str) -> PolicySelector | None:
        """Stop ``name``'s selector as last configured (None: it covers every policy)."""
        return self._selectors.get(name)

    def covered_by(self, name: str) -> list[str]:
        """The stacks stop ``name`` covers, sorted."""
        selector = self._selectors.get(name)
        return [
            stack
            for stack, served in sorted(self._served.items())
            if covers(stop=name, selector=selector, policy=served.scope)
        ]

    def positions_of(self, name: str) -> PositionsSeen:
        """The open positions of the stacks stop ``name`` covers."""
        return self._positions.seen(self.covered_by(name))

    def scope(self, stack: str) -> PolicyScope | None:
        served = self._served.get(stack)
        return None if served is None else served.scope

    def holding(self, name: str) -> str | None:
        """What still holds stop ``name`` back in the stacks it covers, each figure named by
        its stack."""
        held = [
            f"{stack}: {figure}"
            for stack in self.covered_by(name)
            if (figure := self._served[stack].risk.holding(name)) is not None
        ]
        return "; ".join(held) or None

    def held_by(self, name: str) -> tuple[str, ...] | None:
        """The stops holding a halt in the stacks stop ``name`` covers; None when no stack is
        served (then the namespace's combination is all there is)."""
        if not self._served:
            return None
        holders = {
            holder
            for stack in self.covered_by(name)
            if (latch := self._served[stack].latch) is not None
            for holder in latch.held_by
        }
        return tuple(sorted(holders))

    # --- the latch, in every stack --------------------------------------------------------

    async def put_latch(
        self,
        stops: Sequence[StopView],
        *,
        known: HaltLatch | None,
        min_revision: int,
        now: datetime,
        flatten_by: str | None = None,
    ) -> tuple[HaltLatch, bool]:
        """Put each stack's combination of ``stops`` in force; returns the namespace's latch
        (every stop's combination, at the revision in force) and whether a new revision was
        written. ``known``: the latch this process last put in force (it may be the only one
        when no stack is served yet). ``flatten_by``: the stop whose trip asked for this write
        and flattens; only the stacks it covers flatten. The caller serialises writers."""
        served = sorted(self._served.items())
        currents = [
            await s.bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch)
            for _, s in served
        ]
        reference, floor = _reference(known, currents)
        namespace = combine(stops)
        if not served:  # no policy: only the namespace's view to keep
            latch = _next(namespace, reference, min_revision=min_revision, floor=floor, now=now)
            in_force = latch if latch is not None else reference
            assert in_force is not None  # next_latch writes whenever there is no latch
            return in_force, latch is not None
        wanted = {stack: combine_for(stops, s.scope) for stack, s in served}
        revision = reference.revision if reference is not None else 0
        changed = (
            revision == 0
            or floor > revision
            or any(
                isinstance(current, HaltLatch) and not _says(current, wanted[stack])
                for (stack, _), current in zip(served, currents, strict=True)
            )
        )
        if changed:
            revision = max(min_revision, floor, revision + 1)
        flattening = set(self.covered_by(flatten_by)) if flatten_by is not None else set()
        # One latch per meaning at this revision: stacks that mean the same hold the same latch
        # (a stack catching up gets the very latch the others hold).
        made: dict[tuple[TradingState, tuple[str, ...], bool], HaltLatch] = {}
        if not changed:
            for current in currents:
                if isinstance(current, HaltLatch) and current.revision == revision:
                    made[(current.state, tuple(current.held_by), current.flatten)] = current
        for (stack, s), current in zip(served, currents, strict=True):
            if not changed and isinstance(current, HaltLatch) and current.revision >= revision:
                s.latch = current
                continue
            want = wanted[stack]
            flatten = stack in flattening and want.state is not TradingState.ACTIVE
            key = (want.state, want.held_by, flatten)
            latch = made.setdefault(key, _latch(want, revision, now=now, flatten=flatten))
            await publish_latch(s.bus, latch)  # a new revision, or a stack that lacks it
            s.latch = latch
        states = [s.latch.state for _, s in served if s.latch is not None]
        summary = _latch(namespace, revision, now=now, flatten=False)
        return summary.model_copy(update={"state": most_restrictive(states)}), changed

    async def announce_view(self, view: EmergencyStopView) -> None:
        """Tell the live viewers of every stack the stop covers its status."""
        for stack in self.covered_by(view.name):
            await announce_view(self._served[stack].bus, view)

    # --- per stack --------------------------------------------------------------------------

    async def _heartbeat(self, bus: Bus) -> None:
        await heartbeat_forever(bus, issued_by=self._source, interval_s=self._heartbeat_interval_s)

    async def _collect_acks(self, bus: Bus, stack: str) -> None:
        async def on_ack(ack: HaltAck) -> None:
            named = ack.model_copy(update={"worker_id": f"{stack}/{ack.worker_id}"})
            await self._acks.on_ack(named)

        await bus.subscribe(subjects.CONTROL_HALT_ACK, HaltAck, on_ack, label="halt-acks")

    async def _consume_alerts(self, bus: Bus, stack: str) -> None:
        async def on_alert(alert: RiskAlert) -> None:
            await self._on_alert(stack, alert)

        await bus.consume(subjects.OPERATOR_RISK_ALERTS, RiskAlert, on_alert)


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
    combined: Combined,
    reference: HaltLatch | None,
    *,
    min_revision: int,
    floor: int,
    now: datetime,
) -> HaltLatch | None:
    """The namespace's new latch while no stack is served, or None when ``reference`` says
    ``combined`` already (at a revision no undecodable latch may exceed)."""
    issued_at_ms = int(now.timestamp() * 1000)
    current = reference if reference is None or reference.revision >= floor else None
    return next_latch(
        combined,
        current=current,
        min_revision=max(min_revision, floor),
        issued_at_ms=issued_at_ms,
    )


def _says(latch: HaltLatch, combined: Combined) -> bool:
    """Whether ``latch`` means ``combined`` (its state and the stops holding it)."""
    return latch.state is combined.state and tuple(latch.held_by) == combined.held_by


def _latch(combined: Combined, revision: int, *, now: datetime, flatten: bool) -> HaltLatch:
    latch = next_latch(
        combined,
        current=None,
        min_revision=revision,
        issued_at_ms=int(now.timestamp() * 1000),
        flatten=flatten,
    )
    assert latch is not None  # next_latch writes whenever there is no latch
    return latch


def _start(name: str, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    task = asyncio.create_task(coroutine, name=name)
    task.add_done_callback(_report_end)
    return task


def _report_end(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("stack task %s failed", task.get_name(), exc_info=exc)
    else:
        log.error("stack task %s ended unexpectedly", task.get_name())
