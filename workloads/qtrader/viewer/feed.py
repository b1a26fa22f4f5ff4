"""What the live viewers see: the pipeline's events, from NATS into a ``FanoutHub``.

ESS transitions (every halt latch the control plane broadcasts: ACTIVE, REDUCING, HALTED, with
its reason and issuer), order updates, fills, risk alerts and portfolio snapshots, each as its
wire message in JSON (``kind`` tells them apart). Core subscriptions: the viewers watch the
present, as it is published; a viewer that wants history reads the streams. Handing an event
to the hub never awaits, so no viewer can slow the workload that serves them.

``ViewerState`` keeps what a viewer connecting now must be told first: the latch in force (read
from its KV bucket at start, then every broadcast) and the latest portfolio snapshot. A risk
alert is forwarded once per ``alert_id``: the portfolio's evaluator and the control plane's
monitor may both publish the same alert, and a viewer must not show it twice.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any

from qtrader.bus.errors import BusUnavailable
from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    Fill,
    HaltLatch,
    Message,
    OrderUpdate,
    PortfolioSnapshot,
    RiskAlert,
)
from qtrader.viewer.fanout import FanoutHub

VIEWED: tuple[tuple[str, type[Message]], ...] = (
    (subjects.CONTROL_HALT, HaltLatch),
    (subjects.all_of(subjects.ORDER_UPDATE_PREFIX), OrderUpdate),
    (subjects.all_of(subjects.FILL_PREFIX), Fill),
    (subjects.all_of(subjects.RISK_ALERT_PREFIX), RiskAlert),
    (subjects.PORTFOLIO_SNAPSHOT, PortfolioSnapshot),
)


SEEN_ALERTS = 4096  # alert ids remembered for the duplicate check (oldest forgotten first)


class ViewerState:
    """The latest latch and portfolio snapshot; which alert ids were already forwarded."""

    def __init__(self) -> None:
        self.latch: HaltLatch | None = None
        self.snapshot: PortfolioSnapshot | None = None
        self._alerts: OrderedDict[str, None] = OrderedDict()

    def note(self, message: Message) -> bool:
        """Remember ``message``; False for a risk alert already seen (not to be forwarded)."""
        if isinstance(message, HaltLatch):
            if self.latch is None or message.revision >= self.latch.revision:
                self.latch = message
        elif isinstance(message, PortfolioSnapshot):
            self.snapshot = message
        elif isinstance(message, RiskAlert):
            if message.alert_id in self._alerts:
                return False
            self._alerts[message.alert_id] = None
            if len(self._alerts) > SEEN_ALERTS:
                self._alerts.popitem(last=False)
        return True

    def present(self) -> dict[str, Any]:
        """The latch and the portfolio as a viewer connecting now must see them."""
        return {
            "latch": None if self.latch is None else self.latch.model_dump(mode="json"),
            "portfolio": None if self.snapshot is None else self.snapshot.model_dump(mode="json"),
        }


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

    await asyncio.gather(
        *(
            bus.subscribe(subject, message_type, forward, label="viewer")
            for subject, message_type in VIEWED
        )
    )
