"""What the live viewers see: the pipeline's events, from NATS into a ``FanoutHub``.

ESS transitions (every halt latch the control plane broadcasts: ACTIVE, REDUCING, HALTED, with
its reason and issuer), each EmergencyStop's status when it changes (``EmergencyStopView``:
who tripped it, why, since when, its cooldown), order updates, fills, risk alerts, portfolio
snapshots and every worker's health report, each as its wire message in JSON (``kind`` tells
them apart). Core subscriptions: the viewers watch the present, as it is published; a viewer
that wants history reads the streams, and an event published before the server has the
subscriptions reaches no viewer: the hub is ``fed`` (``/viewer/stats`` says so) once the server
has confirmed every one of them. Handing an event to the hub never awaits, so no viewer
can slow the workload that serves them.

``ViewerState`` keeps what a viewer connecting now must be told first: the latch in force (read
from its KV bucket at start, then every broadcast), the latest portfolio snapshot, each stop's
latest view and each worker's latest health report (a worker not heard from for
``FORGET_WORKER_S`` is dropped: a restarted one has a new id). A risk alert is forwarded once
per ``alert_id``: the portfolio's evaluator and the control plane's monitor may both publish the
same alert, and a viewer must not show it twice. A stop's view comes after every reconcile
round (twice a second); it is forwarded only when it says something new. Health reports are all
forwarded (one per worker every 2 s): their arrival is how a viewer tells a silent worker.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from qtrader.bus.errors import BusUnavailable
from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    EmergencyStopView,
    Fill,
    HaltLatch,
    Message,
    OrderUpdate,
    PortfolioSnapshot,
    RiskAlert,
    WorkloadHealthReport,
)
from qtrader.viewer.fanout import FanoutHub

VIEWED: tuple[tuple[str, type[Message]], ...] = (
    (subjects.CONTROL_HALT, HaltLatch),
    (subjects.CONTROL_ESS_STATUS, EmergencyStopView),
    (subjects.all_of(subjects.ORDER_UPDATE_PREFIX), OrderUpdate),
    (subjects.all_of(subjects.FILL_PREFIX), Fill),
    (subjects.all_of(subjects.RISK_ALERT_PREFIX), RiskAlert),
    (subjects.PORTFOLIO_SNAPSHOT, PortfolioSnapshot),
    (subjects.all_of(subjects.HEALTH_REPORT_PREFIX), WorkloadHealthReport),
)


SEEN_ALERTS = 4096  # alert ids remembered for the duplicate check (oldest forgotten first)
MAX_STOPS = 256  # stops remembered (a namespace rarely has more than a few)
MAX_WORKERS = 256  # workers remembered; the longest silent forgotten first
FORGET_WORKER_S = 60.0  # a worker silent this long is gone (a restart has a new worker id)

Clock = Callable[[], float]


class ViewerState:
    """The latest latch, snapshot, stop views and health reports; which alert ids were already
    forwarded. ``clock``: wall-clock seconds (when a report arrived, what ``now_ms`` says)."""

    def __init__(self, *, clock: Clock = time.time) -> None:
        self._clock = clock
        self.latch: HaltLatch | None = None
        self.snapshot: PortfolioSnapshot | None = None
        self.stops: dict[str, EmergencyStopView] = {}
        self._workers: OrderedDict[str, tuple[WorkloadHealthReport, float]] = OrderedDict()
        self._alerts: OrderedDict[str, None] = OrderedDict()

    def note(self, message: Message) -> bool:
        """Remember ``message``; False when it is not to be forwarded: a risk alert already
        seen, or a stop's view that says nothing new."""
        if isinstance(message, HaltLatch):
            if self.latch is None or message.revision >= self.latch.revision:
                self.latch = message
        elif isinstance(message, PortfolioSnapshot):
            self.snapshot = message
        elif isinstance(message, RiskAlert):
            return _first_time(self._alerts, message.alert_id, SEEN_ALERTS)
        elif isinstance(message, EmergencyStopView):
            return self._note_stop(message)
        elif isinstance(message, WorkloadHealthReport):
            self._note_worker(message)
        return True

    def _note_stop(self, view: EmergencyStopView) -> bool:
        known = self.stops.get(view.name)
        if known is not None and _same_view(known, view):
            return False
        if known is None and len(self.stops) >= MAX_STOPS:
            return False  # a flood of names: the known stops keep their place
        self.stops[view.name] = view
        return True

    def _note_worker(self, report: WorkloadHealthReport) -> None:
        self._workers.pop(report.worker_id, None)
        self._workers[report.worker_id] = (report, self._clock())  # newest last
        while len(self._workers) > MAX_WORKERS:
            self._workers.popitem(last=False)

    def workers(self) -> list[WorkloadHealthReport]:
        """The latest report of every worker heard from within ``FORGET_WORKER_S``."""
        horizon = self._clock() - FORGET_WORKER_S
        for worker_id in [w for w, (_, heard) in self._workers.items() if heard < horizon]:
            del self._workers[worker_id]
        return [report for report, _ in self._workers.values()]

    def present(self) -> dict[str, Any]:
        """What a viewer connecting now must see first; ``now_ms`` is this server's clock, so a
        page can count a cooldown down without trusting its own."""
        return {
            "latch": None if self.latch is None else self.latch.model_dump(mode="json"),
            "portfolio": None if self.snapshot is None else self.snapshot.model_dump(mode="json"),
            "stops": [view.model_dump(mode="json") for view in self.stops.values()],
            "workloads": [report.model_dump(mode="json") for report in self.workers()],
            "now_ms": round(self._clock() * 1000),
        }


def _first_time(seen: OrderedDict[str, None], key: str, limit: int) -> bool:
    if key in seen:
        return False
    seen[key] = None
    if len(seen) > limit:
        seen.popitem(last=False)
    return True


def _same_view(a: EmergencyStopView, b: EmergencyStopView) -> bool:
    """Equal but for when it was sent."""
    return a.model_copy(update={"ts_ms": 0}) == b.model_copy(update={"ts_ms": 0})


async def feed_viewers(bus: Bus, hub: FanoutHub, state: ViewerState | None = None) -> None:
    """Forward every viewed event to ``hub`` until cancelled (each risk alert once)."""
    state = state or ViewerState()
    try:
        latch = await bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch)
    except BusUnavailable:
        latch = None  # the next broadcast tells it
    if isinstance(latch, HaltLatch):
        state.note(latch)

    async def forward(message: Message) -> None:
        if state.note(message):
            hub.publish_message(message)

    registered = [asyncio.Event() for _ in VIEWED]

    async def mark_fed() -> None:
        await asyncio.gather(*(event.wait() for event in registered))
        hub.fed = True

    try:
        await asyncio.gather(
            mark_fed(),
            *(
                bus.subscribe(subject, message_type, forward, label="viewer", registered=event)
                for (subject, message_type), event in zip(VIEWED, registered, strict=True)
            ),
        )
    finally:
        hub.fed = False
