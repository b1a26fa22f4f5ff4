"""A flood of signals into a real execution worker: the intake stays within its bound.

The worker runs in paper mode on a real nats-server; 400 signals are published at once, far
more than a cycle takes (the policy: queue 50, 5 per cycle). Its own /metrics must show the
queue never deeper than the bound, the overflow dropped as ``queue_full``, and every signal
accounted for: decided, dropped, or still queued.
"""

from __future__ import annotations

import asyncio
import itertools
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
from support.workers import Worker, eventually, start_worker

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


ONE_PER_CYCLE = parse_policy(
    {
        "apiVersion": "qtrader.dev/v1alpha1",
        "kind": "TradingPolicy",
        "metadata": {"name": "intake-pace-test"},
        "spec": {
            "symbols": ["BTCUSDT"],
            "signals": {"queueSize": 10, "maxPerCycle": 1, "ttlSeconds": 600},
        },
    }
)


def signal(index: int) -> Signal:
    now_ms = int(time.time() * 1000)
    return Signal(
        signal_id=f"pace:{index}",
        symbol="BTCUSDT",
        direction=Direction.LONG,
        confidence=0.9,
        model_version="test",
        candle_open_time_ms=now_ms,
        price=Decimal(30_000),
        created_at_ms=now_ms,
    )


async def started(
    nats_server: EmbeddedNats, tmp_path: Path, cycle_s: float
) -> tuple[Bus, asyncio.Task[None], Worker]:
    bus = Bus(url=nats_server.url, client_name="test-intake-pace")
    await bus.connect()
    await bus.ensure_topology()
    await publish_policy(bus, ONE_PER_CYCLE)
    await write_latch(bus, state=TradingState.ACTIVE, reason="test", issued_by="test")
    heartbeat = asyncio.create_task(heartbeat_forever(bus, issued_by="test", interval_s=0.2))
    worker = start_worker(
        "execution", nats_url=nats_server.url, log_dir=tmp_path, args=("--cycle", str(cycle_s))
    )
    return bus, heartbeat, worker


def decided(worker: Worker) -> float:
    """Signals decided (denied for want of a price: no candle was published)."""
    return float(worker.metric("qtrader_signals_denied_total", reason="no_market_price"))


async def test_a_signal_at_a_light_pace_is_decided_when_it_arrives_not_at_the_next_cycle(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """With a 30 s cycle, a signal arriving while no cycle has decided anything for 30 s is
    decided at once; the worker used to wait for its next 30 s tick."""
    bus, heartbeat, worker = await started(nats_server, tmp_path, cycle_s=30)
    try:
        await eventually(lambda: worker.metric("qtrader_signal_queue_capacity") == 10,
                         timeout_s=20, what="the intake open", worker=worker)  # fmt: skip
        for index in range(2):  # the second a few seconds later: a cycle decided just before
            published = time.monotonic()
            await bus.publish(subjects.signal_subject("BTCUSDT"), signal(index))
            if index == 0:
                await eventually(lambda: decided(worker) == 1, timeout_s=5,
                                 what="the signal decided", worker=worker)  # fmt: skip
                assert time.monotonic() - published < 5
                await asyncio.sleep(2)
        # The second waits for the 30 s after the first cycle: the rate bound holds.
        await asyncio.sleep(3)
        assert decided(worker) == 1
    finally:
        heartbeat.cancel()
        worker.stop()
        await bus.close()


async def test_cycles_that_decide_are_a_cycle_apart_and_signals_queued_wait_for_no_arrival(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """maxPerCycle 1 and a 1 s cycle: three signals at once are decided about 1 s apart."""
    bus, heartbeat, worker = await started(nats_server, tmp_path, cycle_s=1.0)
    try:
        await eventually(lambda: worker.metric("qtrader_signal_queue_capacity") == 10,
                         timeout_s=20, what="the intake open", worker=worker)  # fmt: skip
        for index in range(3):
            await bus.publish(subjects.signal_subject("BTCUSDT"), signal(index))
        seen: list[float] = []
        deadline = time.monotonic() + 15
        while len(seen) < 3 and time.monotonic() < deadline:
            count = decided(worker)
            while len(seen) < count:
                seen.append(time.monotonic())
            await asyncio.sleep(0.02)
        assert len(seen) == 3, worker.log()[-2000:]
        gaps = [later - earlier for earlier, later in itertools.pairwise(seen)]
        assert all(0.9 <= gap < 2.5 for gap in gaps), gaps
    finally:
        heartbeat.cancel()
        worker.stop()
        await bus.close()
