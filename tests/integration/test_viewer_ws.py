"""The live viewer stream over real WebSockets: uvicorn on a loopback port, real clients.

500 events over 2 s go to three fast viewers and one slow one (it reads a message every 100 ms
through a small socket receive buffer, so the server's send to it really blocks). The fast ones
get every event in order with contiguous batch numbers; the slow one gets contiguous batch
numbers with counted drops (and keeps the newest events); it never holds the others back; each
client's batch rate stays within the cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import uvicorn
from prometheus_client import REGISTRY
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from qtrader.viewer import FanoutHub, create_viewer_app
from support.workers import eventually

pytestmark = pytest.mark.integration

EVENTS = 500
PUBLISH_OVER_S = 2.0
CAP = 50.0
QUEUE_SIZE = 50
PAD_BYTES = 1000  # random hex, so permessage-deflate cannot shrink it away


class _InLoopServer(uvicorn.Server):
    """uvicorn in the test's event loop; the test, not uvicorn, owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Served:
    hub: FanoutHub
    host: str
    port: int

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/events"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}"


@contextlib.asynccontextmanager
async def serving(hub: FanoutHub) -> AsyncIterator[Served]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted sockets inherit this: a small fixed send buffer (Linux would otherwise grow it
    # to megabytes) lets a slow reader push back on the server within a 2 s run.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        create_viewer_app(hub), log_level="warning", lifespan="off", timeout_graceful_shutdown=5
    )
    server = _InLoopServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await eventually(lambda: server.started, timeout_s=10, what="uvicorn to start")
        yield Served(hub=hub, host="127.0.0.1", port=sock.getsockname()[1])
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)
        sock.close()


@dataclass
class Received:
    seqs: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    at: list[float] = field(default_factory=list)
    done_at: float = 0.0

    @property
    def accounted(self) -> int:
        return len(self.ids) + sum(self.dropped)


async def read_all(ws: ClientConnection, *, delay_s: float = 0.0) -> Received:
    """Read batches until every published event is either received or reported dropped."""
    got = Received()
    while got.accounted < EVENTS:
        batch = json.loads(await ws.recv())
        got.at.append(time.monotonic())
        got.seqs.append(batch["seq"])
        got.dropped.append(batch["dropped"])
        got.ids += [event["i"] for event in batch["events"]]
        if delay_s:
            await asyncio.sleep(delay_s)
    got.done_at = time.monotonic()
    return got


def slow_socket(served: Served) -> socket.socket:
    """A connected socket with a tiny receive buffer: TCP pushes back on the server quickly."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((served.host, served.port))
    sock.setblocking(False)
    return sock


async def publish_paced(hub: FanoutHub) -> float:
    """Publish EVENTS events evenly over PUBLISH_OVER_S; return when the last one went out."""
    start = time.monotonic()
    for i in range(EVENTS):
        hub.publish({"i": i, "kind": "test", "pad": secrets.token_hex(PAD_BYTES)})
        next_at = start + (i + 1) * PUBLISH_OVER_S / EVENTS
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    return time.monotonic()


def assert_within_cap(got: Received) -> None:
    """Batches per second over the run, from receive times: at most the cap plus jitter."""
    span = got.at[-1] - got.at[0]
    assert len(got.at) - 1 <= CAP * span + 3, (len(got.at), span)


async def test_fast_viewers_get_everything_and_a_slow_one_drops_without_slowing_them() -> None:
    hub = FanoutHub(window_s=0.010, max_batches_per_s=CAP, queue_size=QUEUE_SIZE)
    dropped_before = REGISTRY.get_sample_value("qtrader_viewer_dropped_total") or 0.0
    async with serving(hub) as served, contextlib.AsyncExitStack() as stack:
        fast = [await stack.enter_async_context(connect(served.ws_url)) for _ in range(3)]
        slow = await stack.enter_async_context(
            connect(served.ws_url, sock=slow_socket(served), max_queue=1)
        )
        await eventually(lambda: hub.clients == 4, timeout_s=5, what="4 viewers attached")

        readers = [asyncio.create_task(read_all(ws)) for ws in fast]
        slow_reader = asyncio.create_task(read_all(slow, delay_s=0.1))
        published_at = await publish_paced(hub)
        fast_got = await asyncio.wait_for(asyncio.gather(*readers), 10)
        slow_got = await asyncio.wait_for(slow_reader, 10)

        async with httpx.AsyncClient(base_url=served.http_url) as http:
            stats = (await http.get("/viewer/stats")).json()

    for got in fast_got:
        assert got.ids == list(range(EVENTS))
        assert got.seqs == list(range(1, len(got.seqs) + 1))
        assert sum(got.dropped) == 0
        assert got.done_at < slow_got.done_at
        assert_within_cap(got)

    assert slow_got.seqs == list(range(1, len(slow_got.seqs) + 1))
    assert sum(slow_got.dropped) > 0
    assert slow_got.accounted == EVENTS
    assert slow_got.ids == sorted(set(slow_got.ids))
    assert slow_got.ids[-1] == EVENTS - 1  # drop-oldest: the newest event always arrives
    assert slow_got.done_at > published_at
    assert_within_cap(slow_got)

    assert stats["clients"] == 4
    assert stats["published"] == EVENTS
    per_client = sorted(stats["per_client"], key=lambda c: c["dropped"])
    assert [c["dropped"] for c in per_client] == [0, 0, 0, sum(slow_got.dropped)]
    assert [c["sent_events"] for c in per_client] == [EVENTS] * 3 + [len(slow_got.ids)]
    assert stats["dropped_total"] == sum(slow_got.dropped)
    dropped_after = REGISTRY.get_sample_value("qtrader_viewer_dropped_total")
    assert dropped_after == dropped_before + sum(slow_got.dropped)


async def test_a_viewer_that_leaves_while_idle_is_detached_at_once() -> None:
    hub = FanoutHub()
    async with serving(hub) as served:
        async with connect(served.ws_url):
            await eventually(lambda: hub.clients == 1, timeout_s=5, what="the viewer attached")
        await eventually(lambda: hub.clients == 0, timeout_s=5, what="the viewer detached")
        hub.publish({"after": "leaving"})
        assert hub.published == 1


async def test_a_viewer_beyond_the_limit_is_told_to_try_again_later() -> None:
    hub = FanoutHub(max_clients=1)
    async with serving(hub) as served, connect(served.ws_url) as first:
        await eventually(lambda: hub.clients == 1, timeout_s=5, what="the first viewer")
        async with connect(served.ws_url) as second:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(second.recv(), 5)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1013

        hub.publish({"i": 1})
        batch = json.loads(await asyncio.wait_for(first.recv(), 5))
        assert batch == {"seq": 1, "events": [{"i": 1}], "dropped": 0}
