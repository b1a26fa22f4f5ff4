"""A hung broker (SIGSTOP, then SIGCONT) never wedges the bus, whatever runs during the stall.

The defect this guards against is nats-py 2.16's: a ``flush(timeout)`` that times out cancels
the future its PING waits on; the PONG that arrives after the stall then sets a result on the
cancelled future, ``InvalidStateError`` ends the client's read loop, and the client goes on
believing it is connected while it never reads again (no acks, no deliveries, no pongs). Health
checks ping every few seconds and the halt broadcast flushes, so any stall longer than their
timeout used to wedge every workload for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal

import pytest

from qtrader.bus.errors import BusUnavailable
from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import ControlHeartbeat, Direction, Signal
from qtrader.local.nats_server import EmbeddedNats
from support.hang import hang, resume

pytestmark = pytest.mark.integration

STALL_S = 5.0
RECOVER_WITHIN_S = 10.0
# Long enough for the client to give up on the connection (two unanswered pings, 2 s apart) and
# make several reconnect attempts (2 s each, 0.5 s apart).
LONG_STALL_S = 12.0


@pytest.fixture
async def bus(nats_server: EmbeddedNats) -> AsyncIterator[Bus]:
    connected = Bus(url=nats_server.url, client_name="test-liveness")
    await connected.connect()
    await connected.ensure_topology()
    try:
        yield connected
    finally:
        await connected.close()


@contextlib.asynccontextmanager
async def stalled(server: EmbeddedNats, seconds: float) -> AsyncIterator[None]:
    """The broker hung (SIGSTOP) for ``seconds``, then resumed, whatever happens meanwhile."""
    assert server.pid is not None
    hang(server.pid)
    try:
        yield
        await asyncio.sleep(seconds)
    finally:
        resume(server.pid)


async def _keep_calling(call: Callable[[], Awaitable[object]], every_s: float) -> None:
    while True:
        with contextlib.suppress(BusUnavailable):
            await call()
        await asyncio.sleep(every_s)


def _signal(signal_id: str) -> Signal:
    return Signal(
        signal_id=signal_id,
        symbol="BTCUSDT",
        direction=Direction.LONG,
        confidence=0.9,
        model_version="test",
        candle_open_time_ms=1,
        price=Decimal(1),
        created_at_ms=int(time.time() * 1000),
    )


async def _recovers(bus: Bus) -> float:
    """Seconds until a JetStream publish is acknowledged and consumed again after the stall."""
    started = time.monotonic()
    received = asyncio.Event()

    async def on_signal(_: Signal) -> None:
        received.set()

    consumer = asyncio.create_task(bus.consume(subjects.EXECUTION_SIGNALS, Signal, on_signal))
    try:
        while time.monotonic() - started < RECOVER_WITHIN_S:
            try:
                await bus.publish(subjects.signal_subject("BTCUSDT"), _signal("after-stall"))
                await asyncio.wait_for(received.wait(), RECOVER_WITHIN_S)
                await bus.round_trip_s()
                return time.monotonic() - started
            except (BusUnavailable, TimeoutError):
                await asyncio.sleep(0.2)
        pytest.fail(f"the bus did not publish, consume and ping within {RECOVER_WITHIN_S} s")
    finally:
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer


async def test_health_pings_during_a_hang_do_not_wedge_the_bus(
    nats_server: EmbeddedNats, bus: Bus
) -> None:
    pinging = asyncio.create_task(_keep_calling(bus.round_trip_s, every_s=0.5))
    try:
        async with stalled(nats_server, STALL_S):
            pass
    finally:
        pinging.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pinging
    await _recovers(bus)
    assert bus.connected


async def test_broadcasts_during_a_hang_do_not_wedge_the_bus(
    nats_server: EmbeddedNats, bus: Bus
) -> None:
    heartbeat = ControlHeartbeat(issued_by="test", latch_revision=0, ts_ms=1)
    broadcasting = asyncio.create_task(
        _keep_calling(lambda: bus.broadcast(subjects.CONTROL_HEARTBEAT, heartbeat), every_s=0.5)
    )
    try:
        async with stalled(nats_server, STALL_S):
            pass
    finally:
        broadcasting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await broadcasting
    await _recovers(bus)


async def test_a_hang_is_reported_while_it_lasts(nats_server: EmbeddedNats, bus: Bus) -> None:
    async with stalled(nats_server, 0.0):
        failure = await _first_failed_ping(bus, tries=10)
    assert failure is not None, "10 pings over 5 s of a hung broker all answered"
    assert "did not answer a ping" in str(failure)


async def _first_failed_ping(bus: Bus, *, tries: int) -> BusUnavailable | None:
    for _ in range(tries):
        try:
            await bus.round_trip_s()
        except BusUnavailable as exc:
            return exc
        await asyncio.sleep(0.5)
    return None


async def test_reconnecting_to_a_hung_broker_leaves_no_socket_open(
    nats_server: EmbeddedNats, bus: Bus
) -> None:
    """A hung broker's kernel still accepts connections: each reconnect attempt connects, then
    waits for an INFO that never comes. nats-py opens the next attempt's socket over the last
    one without closing it, leaving it to the collector (a ResourceWarning, the socket open
    until then). The bus closes each failed attempt's socket itself."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with stalled(nats_server, LONG_STALL_S):
            pass
        await _recovers(bus)
        gc.collect()
    leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaked, f"sockets left to the collector: {leaked}"
