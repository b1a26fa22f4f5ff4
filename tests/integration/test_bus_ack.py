"""A handler slower than the consumer's ack wait keeps its message: no redelivery meanwhile.

The execution worker can spend longer than the ack wait on one intent (an order whose outcome
is being looked up); were the intent redelivered meanwhile, another replica could send it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from decimal import Decimal

import pytest
from prometheus_client import REGISTRY

from qtrader.bus.errors import NotYet
from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import Direction, Signal
from qtrader.local.nats_server import EmbeddedNats

pytestmark = pytest.mark.integration


async def test_a_slow_handler_is_not_redelivered_while_it_works(nats_server: EmbeddedNats) -> None:
    spec = dataclasses.replace(subjects.EXECUTION_SIGNALS, durable="slow-test", ack_wait_s=1.0)
    bus = Bus(url=nats_server.url, client_name="test-ack")
    await bus.connect()
    await bus.ensure_topology()
    await bus.ensure_consumer(spec)
    deliveries: list[str] = []

    async def slow(signal: Signal) -> None:
        deliveries.append(signal.signal_id)
        await asyncio.sleep(3.5)  # three and a half ack waits

    signal = Signal(
        signal_id="slow-1",
        symbol="BTCUSDT",
        direction=Direction.LONG,
        confidence=0.9,
        model_version="test",
        candle_open_time_ms=1,
        price=Decimal(1),
        created_at_ms=int(time.time() * 1000),
    )
    await bus.publish(subjects.signal_subject("BTCUSDT"), signal)
    consumer = asyncio.create_task(bus.consume(spec, Signal, slow))
    try:
        await asyncio.sleep(8.0)  # long enough for any redelivery to have been handled too
    finally:
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
        await bus.close()
    assert deliveries == ["slow-1"]


def _signal(n: int) -> Signal:
    return Signal(
        signal_id=f"batch-{n}",
        symbol="BTCUSDT",
        direction=Direction.LONG,
        confidence=0.9,
        model_version="test",
        candle_open_time_ms=n,
        price=Decimal(1),
        created_at_ms=int(time.time() * 1000),
    )


async def test_a_batch_is_acknowledged_after_its_handler_and_redelivered_whole_if_it_fails(
    nats_server: EmbeddedNats,
) -> None:
    spec = dataclasses.replace(subjects.EXECUTION_SIGNALS, durable="batch-test", ack_wait_s=5.0)
    bus = Bus(url=nats_server.url, client_name="test-batch")
    await bus.connect()
    await bus.ensure_topology()
    await bus.ensure_consumer(spec)
    calls: list[list[str]] = []
    done = asyncio.Event()

    async def fail_once(signals: list[Signal]) -> None:
        calls.append([s.signal_id for s in signals])
        if len(calls) == 1:
            raise RuntimeError("the first delivery fails")
        if sum(len(c) for c in calls[1:]) >= 5:
            done.set()

    for n in range(5):
        await bus.publish(subjects.signal_subject("BTCUSDT"), _signal(n))
    consumer = asyncio.create_task(bus.consume_batches(spec, Signal, fail_once))
    try:
        await asyncio.wait_for(done.wait(), 15)
        await asyncio.sleep(1.5)  # anything not acknowledged would come again by now
    finally:
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
        await bus.close()
    expected = [f"batch-{n}" for n in range(5)]
    assert calls[0] == expected  # one fetch, one call: the five together
    assert sorted(i for c in calls[1:] for i in c) == expected  # all again, each once


async def test_a_slow_batch_handler_keeps_every_message_of_its_batch(
    nats_server: EmbeddedNats,
) -> None:
    """The batch shares one keep-alive: every message of it is told in progress, none is
    redelivered while the handler works for three and a half ack waits."""
    spec = dataclasses.replace(subjects.EXECUTION_SIGNALS, durable="slow-batch", ack_wait_s=1.0)
    bus = Bus(url=nats_server.url, client_name="test-slow-batch")
    await bus.connect()
    await bus.ensure_topology()
    await bus.ensure_consumer(spec)
    calls: list[list[str]] = []

    async def slow(signals: list[Signal]) -> None:
        calls.append([s.signal_id for s in signals])
        await asyncio.sleep(3.5)

    for n in range(5):
        await bus.publish(subjects.signal_subject("BTCUSDT"), _signal(n))
    consumer = asyncio.create_task(bus.consume_batches(spec, Signal, slow))
    try:
        await asyncio.sleep(8.0)  # long enough for any redelivery to have been handled too
    finally:
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
        await bus.close()
    assert calls == [[f"batch-{n}" for n in range(5)]]


async def test_a_handler_not_done_yet_gets_its_message_again_after_the_delay_it_asked(
    nats_server: EmbeddedNats,
) -> None:
    """``NotYet``: the message stays on the server and comes again after the delay (to any
    replica), while the ones after it go on; it is not a handler failure."""
    spec = dataclasses.replace(subjects.EXECUTION_SIGNALS, durable="not-yet", ack_wait_s=30.0)
    bus = Bus(url=nats_server.url, client_name="test-not-yet")
    await bus.connect()
    await bus.ensure_topology()
    await bus.ensure_consumer(spec)
    seen: list[tuple[str, float]] = []
    third = asyncio.Event()
    started = time.monotonic()

    async def later_for_the_first(signal: Signal) -> None:
        seen.append((signal.signal_id, time.monotonic() - started))
        if len(seen) == 3:
            third.set()
        if signal.signal_id == "batch-0" and len(seen) == 1:
            raise NotYet("not known yet", delay_s=1.5)

    for n in range(2):
        await bus.publish(subjects.signal_subject("BTCUSDT"), _signal(n))
    errors_before = _counted("qtrader_handler_errors_total", "not-yet")
    deferred_before = _counted("qtrader_messages_deferred_total", "not-yet")
    consumer = asyncio.create_task(bus.consume(spec, Signal, later_for_the_first))
    try:
        await asyncio.wait_for(third.wait(), timeout=10)
        await asyncio.sleep(2.0)  # nothing more comes: the second delivery was acknowledged
    finally:
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
        await bus.close()
    assert [signal_id for signal_id, _ in seen] == ["batch-0", "batch-1", "batch-0"]
    assert seen[2][1] - seen[0][1] >= 1.4  # not before the delay it asked
    assert _counted("qtrader_handler_errors_total", "not-yet") == errors_before
    assert _counted("qtrader_messages_deferred_total", "not-yet") == deferred_before + 1


def _counted(counter: str, consumer: str) -> float:
    value = REGISTRY.get_sample_value(counter, {"consumer": consumer})
    return value or 0.0
