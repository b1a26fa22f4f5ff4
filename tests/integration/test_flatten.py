"""An EmergencyStop with ``flattenOnTrip``: the trip closes the position, and nothing else goes out.

Local mode's control plane (in-process) on a real nats-server, two real execution workers in
paper mode and a portfolio. LONG signals open a position; the stop is tripped as ``qtrader ess
trip`` does it, while signals keep coming. Read back from the streams: exactly one flatten
intent for the symbol (both workers publish it; the stream keeps it once), one reduce-only
order for it, the position closed to zero by the fills, and no other order filled after a
worker acknowledged the halt.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    Candle,
    CandleSource,
    Direction,
    Fill,
    HaltAck,
    OrderIntent,
    OrderStatus,
    OrderUpdate,
    RefusedBy,
    Signal,
)
from qtrader.contracts.policy import parse_policy
from qtrader.control.ess_resource import parse_emergency_stop
from qtrader.local import ess_client
from qtrader.local.control import heartbeat_forever, publish_policy
from qtrader.local.control_plane import LocalControlPlane
from qtrader.local.nats_server import EmbeddedNats
from support.ledger_check import last_snapshot
from support.streams import read_all
from support.workers import Worker, eventually, start_worker

pytestmark = pytest.mark.integration

WORKERS = ("flat-1", "flat-2")


async def _feed(bus: Bus, stop: asyncio.Event) -> None:
    """Candles and LONG signals, 20 a second: the position goes long and stays there."""
    index = 0
    while not stop.is_set():
        price = Decimal(30_000) + (index % 5) * 10
        open_ms = 1_700_000_000_000 + index * 60_000
        candle = Candle(
            symbol="BTCUSDT",
            interval="1m",
            open_time_ms=open_ms,
            close_time_ms=open_ms + 59_999,
            open=price,
            high=price + 5,
            low=price - 5,
            close=price,
            volume=Decimal(1),
            source=CandleSource.SYNTHETIC,
        )
        await bus.publish(subjects.candle_subject("BTCUSDT"), candle)
        signal = Signal(
            signal_id=f"flat:{index}",
            symbol="BTCUSDT",
            direction=Direction.LONG,
            confidence=0.9,
            model_version="test",
            candle_open_time_ms=open_ms,
            price=price,
            created_at_ms=int(time.time() * 1000),
        )
        await bus.publish(subjects.signal_subject("BTCUSDT"), signal)
        index += 1
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _feeding(bus: Bus) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(_feed(bus, stop))
    try:
        yield
    finally:
        stop.set()
        await task


@pytest.fixture
def workers(nats_server: EmbeddedNats, tmp_path: Path) -> Iterator[list[Worker]]:
    started = [
        start_worker(
            "execution", nats_url=nats_server.url, log_dir=tmp_path, args=("--worker-id", w)
        )
        for w in WORKERS
    ]
    started.append(start_worker("portfolio", nats_url=nats_server.url, log_dir=tmp_path))
    try:
        yield started
    finally:
        for worker in started:
            worker.stop()


async def _portfolio_long(url: str) -> bool:
    snapshot = await last_snapshot(url)
    return snapshot is not None and any(
        p.symbol == "BTCUSDT" and p.quantity > 0 for p in snapshot.positions
    )


async def _fills(url: str) -> list[Fill]:
    return await read_all(url, stream="QT_FILLS", subject="qtrader.fill.*", message_type=Fill)


async def test_a_trip_that_flattens_closes_the_position_and_sends_nothing_else(
    nats_server: EmbeddedNats, workers: list[Worker]
) -> None:
    bus = Bus(url=nats_server.url, client_name="test-flatten")
    await bus.connect()
    await bus.ensure_topology()
    acks: list[HaltAck] = []

    async def on_ack(ack: HaltAck) -> None:
        acks.append(ack)

    stop = parse_emergency_stop(
        {
            "apiVersion": "qtrader.dev/v1alpha1",
            "kind": "EmergencyStop",
            "metadata": {"name": "main"},
            "spec": {"cooldownSeconds": 60, "flattenOnTrip": True},
        }
    )
    policy = {
        "apiVersion": "qtrader.dev/v1alpha1",
        "kind": "TradingPolicy",
        "metadata": {"name": "flatten"},
        "spec": {"symbols": ["BTCUSDT"], "risk": {"minConfidence": 0.0}},
    }
    control = LocalControlPlane(bus, resource=stop, interval_s=0.2)
    tasks: list[asyncio.Task[None]] = []
    try:
        await publish_policy(bus, parse_policy(policy))
        await control.start()
        tasks.append(asyncio.create_task(control.run()))
        tasks.append(asyncio.create_task(heartbeat_forever(bus, issued_by="control-plane")))
        tasks.append(
            asyncio.create_task(
                bus.subscribe(subjects.CONTROL_HALT_ACK, HaltAck, on_ack, label="test")
            )
        )
        async with _feeding(bus):

            async def long_position() -> bool:
                fills = await _fills(nats_server.url)
                return sum(f.quantity * f.side.sign for f in fills) > 0

            await _wait(long_position, what="a long position")
            # Both workers flatten what they have read of FILLS (a fill still on its way to a
            # replica is the documented remainder): let the ones just stored reach them, as
            # they have reached the portfolio, which reads FILLS the same way.
            await _wait(lambda: _portfolio_long(nats_server.url), what="the portfolio long")
            await asyncio.sleep(1.0)
            outcome = await ess_client.trip(
                bus, name="main", reason="test flatten", mode=None, tripped_by="test", timeout_s=10
            )
            revision = outcome.record.ess_status().latch_revision

            async def flat() -> bool:
                fills = await _fills(nats_server.url)
                return sum(f.quantity * f.side.sign for f in fills) == 0

            await _wait(flat, what="the position closed")
            await asyncio.sleep(1.0)  # signals keep coming while halted
        await eventually(
            lambda: len({a.worker_id for a in acks if a.revision >= revision}) == len(WORKERS),
            timeout_s=10,
            what="both workers' acknowledgements",
        )
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await bus.close()

    intents = await read_all(
        nats_server.url,
        stream="QT_ORDERS",
        subject="qtrader.order.intent.*",
        message_type=OrderIntent,
    )
    updates = await read_all(
        nats_server.url,
        stream="QT_ORDERS",
        subject="qtrader.order.update.*",
        message_type=OrderUpdate,
    )
    flatten = [i for i in intents if i.intent_id == f"flatten:{revision}:BTCUSDT"]
    assert len(flatten) == 1, flatten
    assert flatten[0].reduce_only
    assert flatten[0].side.value == "SELL"
    filled = [u for u in updates if u.status is OrderStatus.FILLED]
    assert [u.intent_id for u in filled].count(flatten[0].intent_id) == 1
    acked_at = {a.worker_id: a.ts_ms for a in acks if a.revision >= revision}
    after = [
        u
        for u in filled
        if u.intent_id != flatten[0].intent_id and u.ts_ms > acked_at.get(u.worker_id, 0)
    ]
    assert after == []
    refused = [
        u
        for u in updates
        if u.refused_by is RefusedBy.HALT_GATE and u.ts_ms > min(acked_at.values())
    ]
    denied = sum(w.metric("qtrader_signals_denied_total", reason="halted") for w in workers[:2])
    assert refused or denied > 0  # orders were still asked for, and refused


async def _wait(
    check: Callable[[], Awaitable[bool]], *, what: str, timeout_s: float = 20.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)
