"""The viewer endpoints: ``/events`` (WebSocket, the batches) and ``/viewer/stats`` (JSON).

Each WebSocket connection gets its own ``ClientFeed`` and two tasks: a sender that awaits the
feed's next batch and sends it, and a receiver that only watches for the client going away (so
a viewer that disconnects while nothing is published is detached at once, not at the next
event). A sender blocked on a slow socket blocks only itself: the hub keeps queueing for that
client (dropping its oldest events) and every other client's sender runs on.

``attach_viewer(app, hub)`` adds both routes, and the live console's page that reads them
(``qtrader.viewer.console``), to an existing workload app (e.g. the health app of
``qtrader.health.contract``); ``create_viewer_app(hub)`` is a standalone app with just these.

Outside the batches (``seq`` 0, so a client counting gaps in ``seq`` ignores them): with a
``state`` provider, a viewer first gets the present (a single ``kind: "state"`` event: the latch,
the portfolio, health), because the stream only carries changes and one connecting while halted
would otherwise not learn it; and after ``keepalive_s`` without a batch, an empty one, so
proxies and clients can tell an idle stream from a dead one.

A browser sends any page's cookies and network position along with a WebSocket, whatever the
page's origin (no CORS for WebSockets), so a connection whose ``Origin`` is neither this host
nor one of ``allowed_origins`` is refused before the handshake completes (HTTP 403).
Clients that are not browsers send no ``Origin`` and are served.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, FastAPI, WebSocket
from pydantic import BaseModel
from starlette.websockets import WebSocketDisconnect

from qtrader.viewer.console import console_router
from qtrader.viewer.fanout import ClientFeed, FanoutHub, FeedClosed, TooManyClients

log = logging.getLogger(__name__)

# RFC 6455 close code 1013, "try again later": the server is at its viewer limit.
CLOSE_TRY_AGAIN_LATER = 1013
# RFC 6455 1008, "policy violation": before accept, Starlette answers the handshake with 403.
CLOSE_POLICY_VIOLATION = 1008
KEEPALIVE_S = 15.0  # well under the 60 s idle timeout of common proxies

StateProvider = Callable[[], Awaitable[Mapping[str, Any]]]


class ClientStatsModel(BaseModel):
    client_id: str
    peer: str
    sent_batches: int
    sent_events: int
    dropped: int
    queued: int


class ViewerStats(BaseModel):
    # The server confirmed the feed's subscriptions: what is published from then on reaches the
    # viewers (while NATS stays connected: /health says whether it is).
    fed: bool
    clients: int
    published: int
    dropped_total: int
    per_client: list[ClientStatsModel]


def viewer_router(
    hub: FanoutHub,
    *,
    state: StateProvider | None = None,
    allowed_origins: Collection[str] = (),
    keepalive_s: float = KEEPALIVE_S,
) -> APIRouter:
    router = APIRouter()

    @router.websocket("/events")
    async def events(websocket: WebSocket) -> None:
        if not origin_allowed(websocket, allowed_origins):
            log.warning("viewer refused: Origin %s", websocket.headers.get("origin"))
            await websocket.close(code=CLOSE_POLICY_VIOLATION)
            return
        await stream_to(websocket, hub, state=state, keepalive_s=keepalive_s)

    @router.get("/viewer/stats")
    async def viewer_stats() -> ViewerStats:
        return ViewerStats(
            fed=hub.fed,
            clients=hub.clients,
            published=hub.published,
            dropped_total=hub.dropped_total,
            per_client=[
                ClientStatsModel(
                    client_id=s.client_id,
                    peer=s.peer,
                    sent_batches=s.sent_batches,
                    sent_events=s.sent_events,
                    dropped=s.dropped,
                    queued=s.queued,
                )
                for s in hub.stats()
            ],
        )

    return router


def attach_viewer(
    app: FastAPI,
    hub: FanoutHub,
    *,
    state: StateProvider | None = None,
    allowed_origins: Collection[str] = (),
    keepalive_s: float = KEEPALIVE_S,
) -> None:
    """Serve ``/events``, ``/viewer/stats`` and the live console (``/console``) from ``app``,
    fed by ``hub``."""
    app.include_router(
        viewer_router(hub, state=state, allowed_origins=allowed_origins, keepalive_s=keepalive_s)
    )
    app.include_router(console_router())


def create_viewer_app(
    hub: FanoutHub,
    *,
    state: StateProvider | None = None,
    allowed_origins: Collection[str] = (),
    keepalive_s: float = KEEPALIVE_S,
) -> FastAPI:
    app = FastAPI(title="qtrader viewer", docs_url=None, redoc_url=None)
    attach_viewer(app, hub, state=state, allowed_origins=allowed_origins, keepalive_s=keepalive_s)
    return app


def origin_allowed(websocket: WebSocket, allowed_origins: Collection[str]) -> bool:
    """No Origin (not a browser), the same host:port as the request, or a listed origin."""
    origin = websocket.headers.get("origin")
    if origin is None:
        return True
    if origin.rstrip("/") in {o.rstrip("/") for o in allowed_origins} or "*" in allowed_origins:
        return True
    return urlsplit(origin).netloc.lower() == websocket.headers.get("host", "").lower()


def _out_of_band(events: list[Mapping[str, Any]]) -> str:
    return json.dumps({"seq": 0, "events": events, "dropped": 0}, separators=(",", ":"))


async def stream_to(
    websocket: WebSocket,
    hub: FanoutHub,
    *,
    state: StateProvider | None = None,
    keepalive_s: float = KEEPALIVE_S,
) -> None:
    """Send the present (with ``state``), then ``hub``'s batches to one viewer until it goes
    away."""
    await websocket.accept()
    peer = f"{websocket.client.host}:{websocket.client.port}" if websocket.client else ""
    try:
        feed = hub.attach(peer)
    except TooManyClients as exc:
        await websocket.close(code=CLOSE_TRY_AGAIN_LATER, reason=str(exc)[:120])
        return
    # Attached before the state is read, so nothing published in between is missed (a change
    # may then arrive both in the state and in the first batch, never in neither).
    present = None if state is None else await state()
    sender = asyncio.create_task(
        _send_batches(websocket, feed, present, keepalive_s), name=f"viewer-send:{peer}"
    )
    watcher = asyncio.create_task(_until_disconnect(websocket), name=f"viewer-recv:{peer}")
    try:
        await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hub.detach(feed)
        for task in (sender, watcher):
            task.cancel()
        # Only the tasks' outcome is gathered here: a dead connection is the normal way out.
        await asyncio.gather(sender, watcher, return_exceptions=True)
        log.debug("viewer %s (%s) left: %s", feed.client_id, peer, feed.stats())


async def _send_batches(
    websocket: WebSocket,
    feed: ClientFeed,
    present: Mapping[str, Any] | None,
    keepalive_s: float,
) -> None:
    with contextlib.suppress(FeedClosed, WebSocketDisconnect):
        if present is not None:
            await websocket.send_text(_out_of_band([{"kind": "state", **present}]))
        while True:
            try:
                # next_batch mutates the feed only in synchronous steps: safe to cancel.
                batch = await asyncio.wait_for(feed.next_batch(), keepalive_s)
            except TimeoutError:
                await websocket.send_text(_out_of_band([]))
                continue
            await websocket.send_text(batch.encode())


async def _until_disconnect(websocket: WebSocket) -> None:
    """Viewers have nothing to say; read (and ignore) until the disconnect message."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
