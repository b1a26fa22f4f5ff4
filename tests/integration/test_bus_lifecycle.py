"""The bus closes every connection it opened: after a caller gives up on connecting, and when
it is closed while the client is reconnecting to a server that went away.

A connection left open is closed by nobody until the garbage collector finds it, and then its
ResourceWarning fails whatever test is running. The servers here are real: a nats-server, and
a TCP server that accepts and never answers (a client there is stuck mid-handshake), which
counts the connections whose client closed them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from qtrader.bus.nats_bus import Bus
from qtrader.cli import main
from qtrader.local.nats_server import EmbeddedNats
from support.silent import SilentServer

pytestmark = pytest.mark.integration


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
