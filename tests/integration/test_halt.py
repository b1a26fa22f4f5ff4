"""The halt reaching real execution workers: acknowledgements, no order after them, fail closed.

Two execution workers and a portfolio run as real processes on a real nats-server. The test
plays the control plane (policy, latch, heartbeat) and the upstream pipeline (candles and
signals), so it can trip while signals flow and check every order the workers produced.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    HaltAck,
    HaltLatch,
    OrderStatus,
    RefusedBy,
    TradingState,
)
from qtrader.contracts.policy import parse_policy
from qtrader.local.control import heartbeat_forever, publish_policy, write_latch
from qtrader.local.nats_server import EmbeddedNats
from support.flow import flowing, order_updates
from support.workers import Worker, eventually, start_worker, stop_pipeline

pytestmark = pytest.mark.integration

POLICY = parse_policy(
    {
        "apiVersion": "qtrader.dev/v1alpha1",
        "kind": "TradingPolicy",
        "metadata": {"name": "halt-test"},
        "spec": {
            "symbols": ["BTCUSDT"],
            "risk": {"minConfidence": 0.0, "maxPositionUsd": "1000"},
        },
    }
)


async def _connect(url: str) -> Bus:
    bus = Bus(url=url, client_name="test-control")
    await bus.connect()
    await bus.ensure_topology()
    await publish_policy(bus, POLICY)
    return bus


def _execution(url: str, tmp_path: Path, worker_id: str, *extra: str) -> Worker:
    args = ("--worker-id", worker_id, *extra)
    return start_worker("execution", nats_url=url, log_dir=tmp_path, args=args)


async def test_trip_while_signals_flow_then_all_ack_and_no_order_after_any_ack(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    url = nats_server.url
    bus = await _connect(url)
    await write_latch(bus, state=TradingState.ACTIVE, reason="test", issued_by="test")
    heartbeat = asyncio.create_task(heartbeat_forever(bus, issued_by="test", interval_s=0.2))
    trip: HaltLatch | None = None
    acks: dict[str, HaltAck] = {}  # each worker's first acknowledgement of the trip's latch

    async def on_ack(ack: HaltAck) -> None:
        # A worker also reports HALTED before its first heartbeat (it fails closed): only the
        # acknowledgements of the trip's revision are the ones this test is about.
        if ack.state is TradingState.HALTED and trip is not None and ack.revision >= trip.revision:
            acks.setdefault(ack.worker_id, ack)

    listener = asyncio.create_task(
        bus.subscribe(subjects.CONTROL_HALT_ACK, HaltAck, on_ack, label="acks")
    )
    workers = [start_worker("portfolio", nats_url=url, log_dir=tmp_path)]
    workers += [_execution(url, tmp_path, f"exec-{n}") for n in (1, 2)]
    try:
        async with flowing(bus):

            async def filled_by_both() -> bool:
                updates = await order_updates(url)
                senders = {u.worker_id for u in updates if u.status is OrderStatus.FILLED}
                return senders == {"exec-1", "exec-2"}

            deadline = time.monotonic() + 30
            while not await filled_by_both():
                assert time.monotonic() < deadline, "both workers should trade before the trip"
                await asyncio.sleep(0.2)
            latch = await write_latch(
                bus, state=TradingState.HALTED, reason="test trip", issued_by="test"
            )
            trip = latch
            await bus.broadcast(subjects.CONTROL_HALT, latch)
            await eventually(lambda: set(acks) == {"exec-1", "exec-2"}, timeout_s=10, what="acks")
            await asyncio.sleep(2.0)  # signals keep coming after the acknowledgements
        updates = await order_updates(url)
        for update in updates:
            if update.status is OrderStatus.FILLED:
                ack = acks[update.worker_id]
                assert update.ts_ms <= ack.ts_ms, f"{update.client_order_id} filled after its ack"
        denied = sum(w.metric("qtrader_signals_denied_total", reason="halted") for w in workers)
        assert denied > 0, "signals kept coming after the acknowledgements and were denied"
        refused = [u for u in updates if u.refused_by is RefusedBy.HALT_GATE]
        assert all("HALTED" in (u.reason or "") for u in refused)
        assert all(a.revision == latch.revision for a in acks.values())
        for worker in workers[1:]:
            assert "HALTED" in str(worker.health()), worker.health()
    finally:
        for task in (heartbeat, listener):
            task.cancel()
        await asyncio.gather(heartbeat, listener, return_exceptions=True)
        await stop_pipeline(workers, nats_url=url)
        await bus.close()


async def test_worker_when_no_latch_readable_then_sends_nothing(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    url = nats_server.url
    bus = await _connect(url)  # a policy, heartbeats, but no latch was ever written
    heartbeat = asyncio.create_task(heartbeat_forever(bus, issued_by="test", interval_s=0.2))
    workers = [start_worker("portfolio", nats_url=url, log_dir=tmp_path)]
    execution = _execution(url, tmp_path, "exec-no-latch")
    workers.append(execution)
    try:
        async with flowing(bus):
            await eventually(
                lambda: execution.metric("qtrader_signals_denied_total", reason="halted") >= 20,
                timeout_s=20,
                what="signals denied because no latch is in force",
                worker=execution,
            )
        assert await order_updates(url) == []
        assert "no halt latch could be read" in str(execution.health())
    finally:
        heartbeat.cancel()
        await asyncio.gather(heartbeat, return_exceptions=True)
        await stop_pipeline(workers, nats_url=url)
        await bus.close()


async def test_worker_when_control_heartbeat_stops_then_halts_itself(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    url = nats_server.url
    bus = await _connect(url)
    await write_latch(bus, state=TradingState.ACTIVE, reason="test", issued_by="test")
    heartbeat = asyncio.create_task(heartbeat_forever(bus, issued_by="test", interval_s=0.2))
    workers = [start_worker("portfolio", nats_url=url, log_dir=tmp_path)]
    execution = _execution(url, tmp_path, "exec-hb", "--heartbeat-timeout", "1")
    workers.append(execution)
    try:
        async with flowing(bus):
            await eventually(
                lambda: execution.metric("qtrader_orders_sent_total", exchange="paper") >= 1,
                timeout_s=20,
                what="orders while the heartbeat runs",
                worker=execution,
            )
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            await eventually(
                lambda: "heartbeat missing" in str(execution.health()),
                timeout_s=10,
                what="the worker to notice the silence",
                worker=execution,
            )
            sent = execution.metric("qtrader_orders_sent_total", exchange="paper")
            await asyncio.sleep(2.0)
            assert execution.metric("qtrader_orders_sent_total", exchange="paper") == sent
            assert execution.metric("qtrader_signals_denied_total", reason="halted") > 0
    finally:
        heartbeat.cancel()
        await stop_pipeline(workers, nats_url=url)
        await bus.close()
