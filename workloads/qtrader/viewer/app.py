"""The viewer endpoints: ``/events`` (WebSocket, the batches) and ``/viewer/stats`` (JSON).

Each WebSocket connection gets its own ``ClientFeed`` and two tasks: a sender that awaits the
feed's next batch and sends it, and a receiver that only watches for the client going away (so
a viewer that disconnects while nothing is published is detached at once, not at the next
event). A sender blocked on a slow socket blocks only itself: the hub keeps queueing for that
client (dropping its oldest events) and every other client's sender runs on.

``attach_viewer(app, hub)`` adds both routes to an existing workload app (e.g. the health app of
``qtrader.health.contract``); ``create_viewer_app(hub)`` is a standalone app with just these.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import APIRouter, FastAPI, WebSocket
from pydantic import BaseModel
from starlette.websockets import WebSocketDisconnect

from qtrader.viewer.fanout import ClientFeed, FanoutHub, FeedClosed, TooManyClients

log = logging.getLogger(__name__)

# RFC 6455 close code 1013, "try again later": the server is at its viewer limit.
CLOSE_TRY_AGAIN_LATER = 1013


class ClientStatsModel(BaseModel):
    client_id: str
    peer: str
    sent_batches: int
    sent_events: int
    dropped: int
    queued: int


class ViewerStats(BaseModel):
    clients: int
    published: int
    dropped_total: int
    per_client: list[ClientStatsModel]


def viewer_router(hub: FanoutHub) -> APIRouter:
    router = APIRouter()

    @router.websocket("/events")
    async def events(websocket: WebSocket) -> None:
        await stream_to(websocket, hub)

    @router.get("/viewer/stats")
    async def viewer_stats() -> ViewerStats:
        return ViewerStats(
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


def attach_viewer(app: FastAPI, hub: FanoutHub) -> None:
    """Serve ``/events`` and ``/viewer/stats`` from ``app``, fed by ``hub``."""
    app.include_router(viewer_router(hub))


def create_viewer_app(hub: FanoutHub) -> FastAPI:
    app = FastAPI(title="qtrader viewer", docs_url=None, redoc_url=None)
    attach_viewer(app, hub)
    return app


async def stream_to(websocket: WebSocket, hub: FanoutHub) -> None:
    """Send ``hub``'s batches to one viewer until it goes away."""
    await websocket.accept()
    peer = f"{websocket.client.host}:{websocket.client.port}" if websocket.client else ""
    try:
        feed = hub.attach(peer)
    except TooManyClients as exc:
        await websocket.close(code=CLOSE_TRY_AGAIN_LATER, reason=str(exc)[:120])
        return
    sender = asyncio.create_task(_send_batches(websocket, feed), name=f"viewer-send:{peer}")
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


async def _send_batches(websocket: WebSocket, feed: ClientFeed) -> None:
    with contextlib.suppress(FeedClosed, WebSocketDisconnect):
        while True:
            batch = await feed.next_batch()
            await websocket.send_text(batch.encode())


async def _until_disconnect(websocket: WebSocket) -> None:
    """Viewers have nothing to say; read (and ignore) until the disconnect message."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
