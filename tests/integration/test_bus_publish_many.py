"""``Bus.publish_many`` sends a batch in waves, one message per subject in each: every message is
stored once, each subject's in its order, also when the broker hangs mid-batch (SIGSTOP) with or
without an outbox. Each message gets its own answer: the stream's, an outage, or a refusal.
Real nats-server; what it stores is read back from the server itself."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from decimal import Decimal
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg
from nats.js.api import StreamConfig
from prometheus_client import REGISTRY

from qtrader.bus.errors import BusError, BusUnavailable
from qtrader.bus.nats_bus import Bus
from qtrader.bus.outbox import Outbox
from qtrader.bus.outbox_publisher import StreamAck
from qtrader.contracts import subjects
from qtrader.contracts.messages import Candle
from qtrader.local.nats_server import EmbeddedNats
from qtrader_tools.candles import flat_candle
from support.hang import hang, resume
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


@contextmanager
def _hung_sync(server: EmbeddedNats) -> Iterator[None]:
    """The broker stopped by SIGSTOP (alive, silent), resumed on leaving."""
    assert server.pid is not None
    hang(server.pid)
    try:
        yield
    finally:
        resume(server.pid)


@asynccontextmanager
async def _hung(server: EmbeddedNats) -> AsyncIterator[None]:
    with _hung_sync(server):
        yield


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


# --- what the stream answers ------------------------------------------------------------------


def _failures(family: str) -> float:
    return REGISTRY.get_sample_value("qtrader_publish_failures_total", {"family": family}) or 0.0


async def test_a_subject_no_stream_stores_is_unavailable_at_once_and_counted(
    nats_server: EmbeddedNats,
) -> None:
    """The server answers no-responders at once: the publish does not wait out its timeout."""
    before = _failures("nowhere")
    async with _bus(nats_server) as bus:
        began = time.monotonic()
        [answer] = await bus.publish_many([("qtrader.nowhere.x", _steps(1)[0][1])])
        took = time.monotonic() - began
        # The connection is as good as before.
        assert all(isinstance(a, StreamAck) for a in await bus.publish_many(_steps(1)))
    assert isinstance(answer, BusUnavailable), answer
    assert "no stream stores it" in str(answer)
    assert took < 0.5, took  # the publish timeout
    assert _failures("nowhere") == before + 1


async def test_a_message_the_stream_refuses_raises_a_bus_error_not_an_outage(
    nats_server: EmbeddedNats,
) -> None:
    """A stream's refusal (here its size limit) is a fault of the set-up: ``BusError`` (no
    nats-py exception leaves the bus), not ``BusUnavailable`` to be kept and replayed forever."""
    raw = await nats.connect(nats_server.url)
    try:
        await raw.jetstream().add_stream(
            StreamConfig(name="TINY", subjects=["qtrader.tiny.>"], max_msg_size=16)
        )
    finally:
        await raw.close()
    async with _bus(nats_server) as bus:
        with pytest.raises(BusError, match="refused by the stream") as raised:
            await bus.publish_acked("qtrader.tiny.x", _steps(1)[0][1])
        assert not isinstance(raised.value, BusUnavailable)
        assert all(isinstance(a, StreamAck) for a in await bus.publish_many(_steps(1)))


async def test_a_publish_cancelled_while_the_broker_hangs_ends_at_once(
    nats_server: EmbeddedNats,
) -> None:
    async with _bus(nats_server) as bus:
        with _hung_sync(nats_server):
            task = asyncio.create_task(bus.publish_many(_steps(2)))
            await asyncio.sleep(0.1)
            task.cancel()
            began = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert time.monotonic() - began < 0.2
        # What was left waiting for answers is gone; the bus publishes as before.
        assert all(isinstance(a, StreamAck) for a in await bus.publish_many(_steps(1, first=2)))


async def test_an_answer_that_is_no_ack_raises_a_bus_error(nats_server: EmbeddedNats) -> None:
    """Something other than a stream answering on the subject (here a core subscriber replying
    garbage): refused as a fault, never read as a stored message."""
    raw = await nats.connect(nats_server.url)
    try:

        async def answer_garbage(msg: Msg) -> None:
            await msg.respond(b"not an ack")

        await raw.subscribe("qtrader.fake.>", cb=answer_garbage)
        await raw.flush()
        async with _bus(nats_server) as bus:
            with pytest.raises(BusError, match="is no ack"):
                await bus.publish_acked("qtrader.fake.x", _steps(1)[0][1])
            assert all(isinstance(a, StreamAck) for a in await bus.publish_many(_steps(1)))
    finally:
        await raw.close()
