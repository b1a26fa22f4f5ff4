"""The bus closes every connection it opened: after a caller gives up on connecting, and when
it is closed while the client is reconnecting to a server that went away.

A connection left open is closed by nobody until the garbage collector finds it, and then its
ResourceWarning fails whatever test is running. The servers here are real: a nats-server, and
a TCP server that accepts and never answers (a client there is stuck mid-handshake), which
counts the connections whose client closed them.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import pytest

from qtrader.bus.nats_bus import Bus
from qtrader.cli import main
from qtrader.contracts import subjects
from qtrader.contracts.messages import AccountEntry, HaltLatch, TradingState
from qtrader.local.nats_server import EmbeddedNats
from support.silent import SilentServer

pytestmark = pytest.mark.integration

READS = 3000  # before the fix, one read in a few hundred hung: every one of six runs of this many


async def _eventually(condition: Callable[[], bool], *, what: str, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.05)


def _all_closed(server: SilentServer) -> Callable[[], bool]:
    return lambda: server.closed_by_client == server.accepted


async def test_connect_when_cancelled_mid_handshake_then_the_half_made_connection_is_closed() -> (
    None
):
    with SilentServer() as server:
        bus = Bus(url=server.url, client_name="test-cancelled")
        connecting = asyncio.create_task(bus.connect())
        await _eventually(lambda: server.accepted >= 1, what="the client to connect")
        connecting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await connecting
        await _eventually(_all_closed(server), what="the client to close its connection")
        assert not bus.connected
        await bus.close()


async def test_connect_when_a_wait_for_times_out_then_the_half_made_connection_is_closed() -> None:
    with SilentServer() as server:
        bus = Bus(url=server.url, client_name="test-timeout")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(bus.connect(), 1.0)
        await _eventually(_all_closed(server), what="the client to close its connection")
        await bus.close()


def test_cli_when_the_server_never_answers_then_exits_1_and_leaves_no_connection_open(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with SilentServer() as server:
        assert main(["ess", "status", "--nats-url", server.url]) == 1
        assert "cannot reach the stack's NATS server" in capsys.readouterr().err
        assert server.accepted >= 1
        asyncio.run(_eventually(_all_closed(server), what="the CLI to close its connection"))


async def test_close_when_the_client_is_reconnecting_then_closes_and_stops_reconnecting(
    nats_server: EmbeddedNats,
) -> None:
    bus = Bus(url=nats_server.url, client_name="test-reconnecting")
    await bus.connect()
    try:
        assert bus.connected
        nats_server.stop()
        await _eventually(lambda: not bus.connected, what="the client to notice the outage")
        # Something answers on the server's port again, but never finishes a handshake: the
        # client stays in its reconnect loop, connected here.
        with SilentServer(port=nats_server.port) as server:
            await _eventually(lambda: server.accepted >= 1, what="a reconnect attempt")
            await bus.close()
            await _eventually(_all_closed(server), what="the client to close its connection")
            accepted = server.accepted
            await asyncio.sleep(1.5)  # three reconnect intervals: a live client would be back
            assert server.accepted == accepted, "the closed bus kept reconnecting"
    finally:
        await bus.close()


async def test_a_loop_connecting_reading_a_key_and_closing_ends_at_the_first_cancel(
    nats_server: EmbeddedNats,
) -> None:
    """nats-py 2.16 swallows a cancellation that lands while its flush queue waits (in a
    connect, a KV read, a close): such a loop went on after one cancel in three, and a test's
    latch sampler hung a CI run so. Each loop here is cancelled once, at a random moment."""
    writer = Bus(url=nats_server.url, client_name="test-writer")
    await writer.connect()
    await writer.ensure_topology()
    latch = HaltLatch(state=TradingState.ACTIVE, revision=1, issued_at_ms=1)
    await writer.kv_put(subjects.HALT_BUCKET, subjects.HALT_KEY, latch)
    await writer.close()

    async def read_forever() -> None:
        while True:
            bus = Bus(url=nats_server.url, client_name="test-reader")
            await bus.connect()
            try:
                await bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch)
            finally:
                await bus.close()

    went_on = 0
    chance = random.Random(5)
    for _ in range(60):
        task = asyncio.create_task(read_forever())
        await asyncio.sleep(chance.uniform(0.0, 0.02))
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=2.0)
        if not done:
            went_on += 1
            while not task.done():  # end it all the same, so the test leaves nothing behind
                task.cancel()
                await asyncio.wait({task}, timeout=0.2)
    assert went_on == 0, f"{went_on} of 60 loops went on after their cancel"


async def test_reading_what_is_stored_on_an_empty_subject_always_returns(
    nats_server: EmbeddedNats,
) -> None:
    """``read_stored`` answers at once when nothing is stored and cancels its replay, which is
    then creating its consumer. On Python 3.11 ``asyncio.wait_for`` returns a result that
    arrives as its task is cancelled and swallows the cancellation: the replay went on to hold
    its subscription forever, and ``read_stored`` waited for it forever (one call in a few
    hundred; an execution worker's income reader never started so, and no funding was booked)."""
    bus = Bus(url=nats_server.url, client_name="test-read-stored")
    await bus.connect()
    await bus.ensure_topology()
    hung = 0
    try:
        for _ in range(READS):
            reading = asyncio.create_task(
                bus.read_stored(subjects.FILLS, subjects.ACCOUNT_ENTRY, AccountEntry, label="t")
            )
            done, _ = await asyncio.wait({reading}, timeout=5.0)
            if not done:
                hung += 1
                while not reading.done():  # end it all the same
                    reading.cancel()
                    await asyncio.wait({reading}, timeout=0.2)
                break
            assert reading.result() == []
    finally:
        await bus.close()
    assert hung == 0, "read_stored hung on a subject with nothing stored"
