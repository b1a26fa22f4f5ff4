"""A durable consumer hands over a message as soon as it comes, never holding it for the next.

At a light pace a step's signals come in one message, then nothing for a while. nats-py's
``fetch`` of a batch, started with nothing buffered, held such a message until the next one came
(or its pull expired): the pipeline benchmark's candle -> intent p99 was 100 ms at 10 steps/s.
And at a full pace a fetch still takes what is waiting in one batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal

import pytest

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import Direction, Signal
from qtrader.local.nats_server import EmbeddedNats

pytestmark = pytest.mark.integration

# Bursts of messages PERIOD_S apart after the consumer idled: a fetch that found nothing left a
# pull waiting at the server, which took the next message and held the fetch after it.
IDLE_S = 1.2
PERIOD_S = 0.25
BURST = 6
COUNT = 3 * BURST


def _signal(index: int) -> Signal:
    return Signal(
        signal_id=f"fetch-{index}",
        symbol="BTCUSDT",
        direction=Direction.LONG,
        confidence=0.9,
        model_version="test",
        candle_open_time_ms=index,
        price=Decimal(1),
        created_at_ms=int(time.time() * 1000),
    )


async def _bus(url: str, durable: str) -> tuple[Bus, subjects.ConsumerSpec]:
    spec = dataclasses.replace(subjects.EXECUTION_SIGNALS, durable=durable)
    bus = Bus(url=url, client_name=f"test-{durable}")
    await bus.connect()
    await bus.ensure_topology()
    await bus.ensure_consumer(spec)
    return bus, spec


Consuming = Callable[[Bus, subjects.ConsumerSpec, list[tuple[float, list[str]]]], Awaitable[None]]


async def _batches(
    bus: Bus, spec: subjects.ConsumerSpec, got: list[tuple[float, list[str]]]
) -> None:
    async def handler(signals: list[Signal]) -> None:
        got.append((time.monotonic(), [s.signal_id for s in signals]))

    await bus.consume_batches(spec, Signal, handler)


async def _one_by_one(
    bus: Bus, spec: subjects.ConsumerSpec, got: list[tuple[float, list[str]]]
) -> None:
    async def handler(signal: Signal) -> None:
        got.append((time.monotonic(), [signal.signal_id]))

    await bus.consume(spec, Signal, handler)


@pytest.mark.parametrize("consuming", [_batches, _one_by_one], ids=["batches", "one-by-one"])
async def test_a_message_alone_is_handled_at_once_not_with_the_next(
    nats_server: EmbeddedNats, consuming: Consuming
) -> None:
    """Messages alone, PERIOD_S apart: each is handled at once, none held until the next came
    (PERIOD_S late), as nats-py's fetch of a batch held some."""
    bus, spec = await _bus(nats_server.url, "fetch-alone")
    got: list[tuple[float, list[str]]] = []
    sent: dict[str, float] = {}
    consumer = asyncio.create_task(consuming(bus, spec, got))
    try:
        for index in range(COUNT):
            if index % BURST == 0:
                await asyncio.sleep(IDLE_S)  # the consumer's fetches wait on an empty one
            signal = _signal(index)
            sent[signal.signal_id] = time.monotonic()
            await bus.publish(subjects.signal_subject("BTCUSDT"), signal)
            await asyncio.sleep(PERIOD_S)
        await asyncio.sleep(PERIOD_S)
    finally:
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
        await bus.close()
    handled = {ids[0]: at for at, ids in got}
    assert [ids for _, ids in got] == [[f"fetch-{i}"] for i in range(COUNT)]
    late = {key: round(handled[key] - at, 3) for key, at in sent.items() if handled[key] - at > 0.1}
    assert not late, f"held until the next message came: {late}"


async def test_what_is_waiting_is_taken_in_one_batch(nats_server: EmbeddedNats) -> None:
    bus, spec = await _bus(nats_server.url, "fetch-waiting")
    for index in range(100):
        await bus.publish(subjects.signal_subject("BTCUSDT"), _signal(index))
    got: list[tuple[float, list[str]]] = []
    consumer = asyncio.create_task(_batches(bus, spec, got))
    try:
        for _ in range(200):
            if sum(len(ids) for _, ids in got) >= 100:
                break
            await asyncio.sleep(0.05)
    finally:
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
        await bus.close()
    sizes = [len(ids) for _, ids in got]
    assert sum(sizes) == 100, sizes
    assert sizes == [64, 36], sizes  # the default batch, then the rest: nothing left behind
