"""What the live viewers see: the pipeline's events, from NATS into a ``FanoutHub``.

ESS transitions (every halt latch the control plane broadcasts: ACTIVE, REDUCING, HALTED, with
its reason and issuer), order updates, fills, risk alerts and portfolio snapshots, each as its
wire message in JSON (``kind`` tells them apart). Core subscriptions: the viewers watch the
present, as it is published; a viewer that wants history reads the streams. Handing an event
to the hub never awaits, so no viewer can slow the workload that serves them.
"""

from __future__ import annotations

import asyncio

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


async def feed_viewers(bus: Bus, hub: FanoutHub) -> None:
    """Forward every viewed event to ``hub`` until cancelled."""

    async def forward(message: Message) -> None:
        hub.publish_message(message)

    await asyncio.gather(
        *(
            bus.subscribe(subject, message_type, forward, label="viewer")
            for subject, message_type in VIEWED
        )
    )
