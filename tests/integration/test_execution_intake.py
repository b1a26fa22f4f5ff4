"""A flood of signals into a real execution worker: the intake stays within its bound.

The worker runs in paper mode on a real nats-server; 400 signals are published at once, far
more than a cycle takes (the policy: queue 50, 5 per cycle). Its own /metrics must show the
queue never deeper than the bound, the overflow dropped as ``queue_full``, and every signal
accounted for: decided, dropped, or still queued.
"""

from __future__ import annotations

import asyncio
import random
import time
from decimal import Decimal
from pathlib import Path

import pytest

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import Direction, Signal, TradingState
from qtrader.contracts.policy import parse_policy
from qtrader.local.control import heartbeat_forever, publish_policy, write_latch
from qtrader.local.nats_server import EmbeddedNats
from support.workers import eventually, start_worker

pytestmark = pytest.mark.integration

QUEUE, PER_CYCLE, FLOOD = 50, 5, 400
POLICY = parse_policy(
    {
        "apiVersion": "qtrader.dev/v1alpha1",
        "kind": "TradingPolicy",
        "metadata": {"name": "intake-test"},
        "spec": {
            "symbols": ["BTCUSDT"],
            "signals": {"queueSize": QUEUE, "maxPerCycle": PER_CYCLE, "ttlSeconds": 600},
        },
    }
)


async def test_signal_flood_keeps_the_queue_within_its_bound(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    bus = Bus(url=nats_server.url, client_name="test-intake")
    await bus.connect()
    await bus.ensure_topology()
    await publish_policy(bus, POLICY)
    await write_latch(bus, state=TradingState.ACTIVE, reason="test", issued_by="test")
    heartbeat = asyncio.create_task(heartbeat_forever(bus, issued_by="test", interval_s=0.2))
    worker = start_worker(
        "execution", nats_url=nats_server.url, log_dir=tmp_path, args=("--cycle", "0.5")
    )
    try:
        rng = random.Random(5)
        now_ms = int(time.time() * 1000)
        for index in range(FLOOD):
            signal = Signal(
                signal_id=f"flood:{index}",
                symbol="BTCUSDT",
                direction=Direction.LONG,
                confidence=round(rng.random(), 4),
                model_version="test",
                candle_open_time_ms=now_ms,
                price=Decimal(30_000),
                created_at_ms=now_ms,
            )
            await bus.publish(subjects.signal_subject("BTCUSDT"), signal)

        def accounted() -> bool:
            decided = worker.metric("qtrader_signals_denied_total", reason="no_market_price")
            dropped = worker.metric("qtrader_signals_dropped_total", reason="queue_full")
            queued = worker.metric("qtrader_signal_queue_depth")
            return decided + dropped + queued == FLOOD

        await eventually(accounted, timeout_s=30, what="every signal accounted for", worker=worker)
        assert worker.metric("qtrader_signal_queue_high_water") == QUEUE
        assert worker.metric("qtrader_signal_queue_depth") <= QUEUE
        dropped = worker.metric("qtrader_signals_dropped_total", reason="queue_full")
        assert dropped >= FLOOD - QUEUE - 10 * PER_CYCLE  # what a few cycles could take
    finally:
        heartbeat.cancel()
        worker.stop()
        await bus.close()
