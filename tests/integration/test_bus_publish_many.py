"""``Bus.publish_many`` sends a batch in waves, one message per subject in each: every message is
stored once, each subject's in its order, also when the broker hangs mid-batch (SIGSTOP) with or
without an outbox. Real nats-server; what it stores is read back from the server itself."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path

import pytest

from qtrader.bus.errors import BusUnavailable
from qtrader.bus.nats_bus import Bus
from qtrader.bus.outbox import Outbox
from qtrader.bus.outbox_publisher import StreamAck
from qtrader.contracts import subjects
from qtrader.contracts.messages import Candle
from qtrader.local.nats_server import EmbeddedNats
from qtrader_tools.candles import flat_candle
from support.streams import read_all
from support.workers import eventually

pytestmark = pytest.mark.integration

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT")
START_MS = 1_700_000_000_000


def _steps(count: int, first: int = 0) -> list[tuple[str, Candle]]:
    """``count`` steps of a candle for every symbol, step by step, as marketdata sends them."""
    return [
        (
            subjects.candle_subject(symbol),
            flat_candle(symbol, Decimal(100 + step), open_time_ms=START_MS + step * 60_000),
        )
        for step in range(first, first + count)
        for symbol in SYMBOLS
    ]


async def _stored(url: str) -> dict[str, list[int]]:
    """Each symbol's stored steps, in stream order."""
    candles = await read_all(
        url, stream="QT_MARKET", subject="qtrader.market.candle.*", message_type=Candle
    )
    steps: dict[str, list[int]] = {symbol: [] for symbol in SYMBOLS}
    for candle in candles:
        steps[candle.symbol].append((candle.open_time_ms - START_MS) // 60_000)
    return steps


@asynccontextmanager
async def _bus(server: EmbeddedNats, outbox: Outbox | None = None) -> AsyncIterator[Bus]:
    bus = Bus(url=server.url, client_name="test-many", outbox=outbox, publish_timeout_s=0.5)
    await bus.connect()
    await bus.ensure_topology()
    try:
        yield bus
    finally:
        await bus.close()


@asynccontextmanager
async def _hung(server: EmbeddedNats) -> AsyncIterator[None]:
    """The broker stopped by SIGSTOP (alive, silent), resumed on leaving."""
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)


async def test_every_message_is_stored_once_each_subject_in_its_order(
    nats_server: EmbeddedNats,
) -> None:
    items = _steps(5)
    async with _bus(nats_server) as bus:
        first = await bus.publish_many(items)
        again = await bus.publish_many(items)
    assert all(isinstance(ack, StreamAck) and not ack.duplicate for ack in first), first
    sequences = [ack.sequence for ack in first if isinstance(ack, StreamAck)]
    assert sorted(sequences) == list(range(1, len(items) + 1))
    # The stream's answer to a message is in that message's place.
    for (subject, candle), ack in zip(items, first, strict=True):
        assert isinstance(ack, StreamAck)
        per_step = sequences[SYMBOLS.index(candle.symbol) :: len(SYMBOLS)]
        assert ack.sequence == per_step[(candle.open_time_ms - START_MS) // 60_000], subject
    assert all(isinstance(ack, StreamAck) and ack.duplicate for ack in again), again
    assert await _stored(nats_server.url) == {symbol: list(range(5)) for symbol in SYMBOLS}


async def test_without_an_outbox_a_hung_broker_fails_the_wave_and_leaves_the_rest_unsent(
    nats_server: EmbeddedNats,
) -> None:
    items = _steps(3)
    async with _bus(nats_server) as bus:
        async with _hung(nats_server):
            results = await bus.publish_many(items)
        assert all(isinstance(result, BusUnavailable) for result in results), results
        unsent = results[len(SYMBOLS) :]
        assert all("not sent" in str(result) for result in unsent), unsent
        # The caller retries what failed, in order; what the hung broker took at last is
        # answered as a duplicate, not stored again.
        retried = await bus.publish_many(items)
    assert all(isinstance(ack, StreamAck) for ack in retried), retried
    assert await _stored(nats_server.url) == {symbol: [0, 1, 2] for symbol in SYMBOLS}


async def test_with_an_outbox_a_hung_broker_keeps_the_batch_and_replay_stores_it_once(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    async with _bus(nats_server, Outbox(tmp_path / "out.db")) as bus:
        assert all(isinstance(a, StreamAck) for a in await bus.publish_many(_steps(2)))
        async with _hung(nats_server):
            kept = await bus.publish_many(_steps(3, first=2))
            assert kept == [None] * len(kept)
            assert bus.outbox_depth() == len(kept)
        replay = asyncio.create_task(bus.replay_forever())
        try:
            await eventually(lambda: bus.outbox_depth() == 0, timeout_s=20, what="the replay")
        finally:
            replay.cancel()
            await asyncio.gather(replay, return_exceptions=True)
    assert await _stored(nats_server.url) == {symbol: list(range(5)) for symbol in SYMBOLS}
