"""Nothing lost across a broker outage: the disk outbox, replayed in order with original ids.

A real nats-server is stopped in the middle of a stream of publishes and started again on the
same store directory and port. The outage lasts ``QTRADER_TEST_OUTAGE_S`` seconds (3 by default;
the documented long run uses 60-120). What the stream holds afterwards is read back from the
server itself.
"""

from __future__ import annotations

import asyncio
import os
import time
from decimal import Decimal
from pathlib import Path

import pytest

from qtrader.bus.errors import BusBackPressure
from qtrader.bus.nats_bus import Bus
from qtrader.bus.outbox import Outbox
from qtrader.contracts import subjects
from qtrader.contracts.messages import Candle
from qtrader.contracts.policy import parse_policy
from qtrader.health.contract import Status
from qtrader.local.control import publish_policy
from qtrader.local.nats_server import EmbeddedNats
from qtrader_tools.candles import flat_candle
from support.streams import read_all
from support.workers import Worker, eventually, start_worker

pytestmark = pytest.mark.integration

EVENTS = int(os.environ.get("QTRADER_TEST_OUTBOX_EVENTS", "10000"))
OUTAGE_S = float(os.environ.get("QTRADER_TEST_OUTAGE_S", "3"))
START_MS = 1_700_000_000_000
POLICY = parse_policy(
    {
        "apiVersion": "qtrader.dev/v1alpha1",
        "kind": "TradingPolicy",
        "metadata": {"name": "outbox-test"},
        "spec": {"symbols": ["BTCUSDT", "ETHUSDT"]},
    }
)


def candle(index: int) -> Candle:
    return flat_candle("BTCUSDT", Decimal(100) + index % 7, open_time_ms=START_MS + index * 60_000)


async def test_events_published_across_an_outage_arrive_once_each_in_order(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    bus = Bus(url=nats_server.url, client_name="producer", outbox=Outbox(tmp_path / "out.db"))
    await bus.connect()
    await bus.ensure_topology()
    replay = asyncio.create_task(bus.replay_forever())
    outage_started = asyncio.Event()

    async def outage() -> None:
        await outage_started.wait()
        await asyncio.to_thread(nats_server.stop)
        await asyncio.sleep(OUTAGE_S)
        await asyncio.to_thread(nats_server.start)

    broker = asyncio.create_task(outage())
    kept = 0
    try:
        for index in range(EVENTS):
            if index == EVENTS // 5:
                outage_started.set()
                await asyncio.sleep(0)  # let the outage begin
            if await bus.publish(subjects.candle_subject("BTCUSDT"), candle(index)) is None:
                kept += 1
        await broker
        assert kept > 0, "the outage must have sent messages to the outbox"
        deadline = time.monotonic() + 60
        while bus.outbox_depth() > 0:
            assert time.monotonic() < deadline, f"{bus.outbox_depth()} still in the outbox"
            await asyncio.sleep(0.1)
        assert bus.outbox_health().status is Status.OK
    finally:
        for task in (replay, broker):
            task.cancel()
        await asyncio.gather(replay, broker, return_exceptions=True)
        await bus.close()

    stored = await read_all(
        nats_server.url, stream="QT_MARKET", subject="qtrader.market.candle.*", message_type=Candle
    )
    indexes = [(c.open_time_ms - START_MS) // 60_000 for c in stored]
    assert len(indexes) == EVENTS  # none lost, none twice
    assert indexes == list(range(EVENTS))  # in publish order


async def test_a_full_outbox_pushes_back_and_says_critical(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    bus = Bus(
        url=nats_server.url,
        client_name="producer",
        outbox=Outbox(tmp_path / "out.db", capacity=20),
        publish_timeout_s=0.5,
    )
    await bus.connect()
    await bus.ensure_topology()
    nats_server.stop()
    try:
        for index in range(20):
            assert await bus.publish(subjects.candle_subject("BTCUSDT"), candle(index)) is None
        assert bus.outbox_health().status is Status.CRITICAL
        with pytest.raises(BusBackPressure, match="capacity"):
            await bus.publish(subjects.candle_subject("BTCUSDT"), candle(20))
        assert bus.outbox_depth() == 20  # the refused message was not written
    finally:
        nats_server.start()
        # Closed once reconnected: nats-py 2.16 closing a client mid-reconnect can leave that
        # reconnect's tasks running on the closed client (harmless at exit, a leak here).
        await eventually(lambda: bus.connected, timeout_s=10, what="the reconnect")
        await bus.close()


async def test_marketdata_rides_out_an_outage_and_health_says_so(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """A real marketdata process keeps producing through the outage; /health shows the outbox
    DEGRADED while it holds candles; afterwards the stream has every candle once, in order."""
    url = nats_server.url
    bus = Bus(url=url, client_name="test-control")
    await bus.connect()
    await bus.ensure_topology()
    await publish_policy(bus, POLICY)
    await bus.close()
    args = ("--seed", "5", "--candles-per-second", "20", "--max-candles", "160")
    marketdata = start_worker("marketdata", nats_url=url, log_dir=tmp_path, args=args)
    try:
        await eventually(
            lambda: _published(marketdata) >= 40, timeout_s=20, what="40 candles", worker=marketdata
        )
        await asyncio.to_thread(nats_server.stop)
        await eventually(
            lambda: _dependency(marketdata, "outbox") == "DEGRADED",
            timeout_s=15,
            what="the outbox holding candles",
            worker=marketdata,
        )
        await asyncio.sleep(OUTAGE_S)
        await asyncio.to_thread(nats_server.start)
        await eventually(
            lambda: (
                "ended" in str(marketdata.health()) and _dependency(marketdata, "outbox") == "OK"
            ),
            timeout_s=60,
            what="the feed to end and the outbox to drain",
            worker=marketdata,
        )
    finally:
        marketdata.stop()
    stored = await read_all(
        url, stream="QT_MARKET", subject="qtrader.market.candle.*", message_type=Candle
    )
    for symbol in POLICY.spec.symbols:
        times = [c.open_time_ms for c in stored if c.symbol == symbol]
        assert len(times) == 160, symbol
        assert times == sorted(set(times)), f"{symbol}: out of order or repeated"


def _published(worker: Worker) -> float:
    return sum(
        worker.metric("qtrader_candles_published_total", symbol=s) for s in POLICY.spec.symbols
    )


def _dependency(worker: Worker, name: str) -> object:
    return worker.dependency(name).get("status")
