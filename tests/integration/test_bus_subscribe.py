"""A core subscription said registered is on the server: the next publish reaches it.

nats-py 2.16 queues a SUB (and a PUB) for its flusher task but writes a PING to the socket at
once, so a round trip made right after ``subscribe`` could come back before the server had the
SUB, and an event published then reached nobody (the viewer-load scenario's lost first event).
The subscriber talks to a real nats-server through a TCP relay here that records, in order,
every byte it sends: the SUB must be on the wire before the PING whose PONG said registered.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator

import pytest

from qtrader.bus.nats_bus import Bus
from qtrader.contracts.messages import ControlHeartbeat
from qtrader.local.nats_server import EmbeddedNats

pytestmark = pytest.mark.integration

TRIES = 100


class Relay:
    """Forwards one TCP port to the server, keeping what the clients sent, in order."""

    def __init__(self, server_port: int) -> None:
        self._server_port = server_port
        self.sent = bytearray()
        self.port = 0
        self._pumps: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Relay:
        self._listener = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._listener.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        self._listener.close()
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        await self._listener.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._server_port)
        for pump in (self._pump(reader, up_writer, self.sent), self._pump(up_reader, writer)):
            task = asyncio.create_task(pump)
            self._pumps.add(task)

    @staticmethod
    async def _pump(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: bytearray | None = None
    ) -> None:
        try:
            while chunk := await reader.read(65536):
                if record is not None:
                    record += chunk
                writer.write(chunk)
                await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@pytest.fixture
async def buses(nats_server: EmbeddedNats) -> AsyncIterator[tuple[Bus, Bus, Relay]]:
    async with Relay(int(nats_server.url.rsplit(":", 1)[1])) as relay:
        subscriber = Bus(url=f"nats://127.0.0.1:{relay.port}", client_name="test-subscriber")
        publisher = Bus(url=nats_server.url, client_name="test-publisher")
        await subscriber.connect()
        await publisher.connect()
        try:
            yield subscriber, publisher, relay
        finally:
            await publisher.close()
            await subscriber.close()


async def test_a_subscription_said_registered_was_on_the_wire_first_and_gets_the_next_publish(
    buses: tuple[Bus, Bus, Relay],
) -> None:
    subscriber, publisher, relay = buses
    out_of_order, missed = [], []
    for n in range(TRIES):
        subject = f"qtrader.test.registered.{n}"
        got = asyncio.Event()

        async def arrived(_: ControlHeartbeat, got: asyncio.Event = got) -> None:
            got.set()

        registered = asyncio.Event()
        held = asyncio.create_task(
            subscriber.subscribe(
                subject, ControlHeartbeat, arrived, label="test", registered=registered
            )
        )
        try:
            await asyncio.wait_for(registered.wait(), timeout=5)
            # The SUB, then (at once, or after other commands) the PING of the confirmation.
            if not re.search(
                rf"SUB {re.escape(subject)} +\d+\r\n(.*\r\n)*?PING\r\n", relay.sent.decode()
            ):
                out_of_order.append(n)
            heartbeat = ControlHeartbeat(issued_by="test", latch_revision=n, ts_ms=1)
            await publisher.broadcast(subject, heartbeat)
            try:
                await asyncio.wait_for(got.wait(), timeout=2)
            except TimeoutError:
                missed.append(n)
        finally:
            held.cancel()
            await asyncio.gather(held, return_exceptions=True)
    assert out_of_order == [], f"{len(out_of_order)} of {TRIES}: the PING left before the SUB"
    assert missed == [], f"{len(missed)} of {TRIES} publishes after 'registered' reached nobody"
