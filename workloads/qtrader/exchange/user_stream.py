"""Our trades as Binance's user-data stream reports them, so an order's fills need no REST read.

``UserTrades.run`` gets a listen key (``POST /fapi/v1/listenKey`` through the venue's own REST
path: rate limiter, retries), keeps it alive every 30 minutes (``PUT``), reads
``<stream base>ws/<listenKey>`` with a plain ``websockets`` client, and records every
``ORDER_TRADE_UPDATE`` whose execution type is ``TRADE`` under its client order id, in the shape
``GET /fapi/v1/userTrades`` answers (id, qty, price, commission, commissionAsset, time), so one
function turns either into a ``Fill``. A plain client, not python-binance's socket manager: its
close waits out a 10 s read timeout, and a venue must close at once.

The stream is an optimisation, never the only source: ``trades_covering`` waits at most
``wait_s`` for the trades that make up an order's executed quantity and answers None when they
are not all there (the socket is down, reconnecting or behind); the caller then reads them over
REST (weight 5). A socket that fails, or a listen key that expires, is replaced after a
back-off; while there is none every order's trades come from REST. Only the latest
``MAX_ORDERS`` orders' trades are kept. The account has one listen key, shared by every replica
(Binance returns the active one); none of them deletes it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal
from typing import Any, Final

from websockets.asyncio.client import connect

log = logging.getLogger(__name__)

MAX_ORDERS: Final = 10_000
RECONNECT_S: Final = (1.0, 2.0, 5.0, 10.0)
KEEP_ALIVE_S: Final = 30 * 60.0  # Binance: a key lives 60 minutes past its last keep-alive
POLL_S: Final = 0.01
# Binance's USD-M futures stream hosts; any other venue serves its streams on its REST host.
STREAM_BASES: Final = {
    "https://fapi.binance.com": "wss://fstream.binance.com/",
    "https://testnet.binancefuture.com": "wss://fstream.binancefuture.com/",
}


def stream_base_of(rest_url: str) -> str:
    """Where a venue's streams are: Binance's by its REST host, else that host over ws."""
    base = rest_url.rstrip("/")
    if base in STREAM_BASES:
        return STREAM_BASES[base]
    scheme, _, rest = base.partition("://")
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/"


class UserTrades:
    def __init__(
        self,
        *,
        stream_base: str,
        listen_key: Callable[[], Awaitable[str]],
        keep_alive: Callable[[str], Awaitable[None]],
        wait_s: float,
    ) -> None:
        self._stream_base = stream_base
        self._listen_key = listen_key
        self._keep_alive = keep_alive
        self._wait_s = wait_s
        self._trades: OrderedDict[str, dict[int, dict[str, Any]]] = OrderedDict()
        self.connected = False
        self.events = 0

    async def run(self) -> None:
        """Keep a socket open for as long as the venue is used (cancel to stop)."""
        failures = 0  # attempts since the last session that opened
        while True:
            opened = False
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure of the socket: REST serves meanwhile
                log.warning("user-data stream: %r", exc)
            finally:
                opened, self.connected = self.connected, False
            # A session that opened and then dropped is no failure to connect: back to the
            # first wait (a dropped healthy session waited ever longer: 1, 2, 5, then 10 s).
            failures = 0 if opened else failures
            wait = RECONNECT_S[min(failures, len(RECONNECT_S) - 1)]
            failures += 1
            await asyncio.sleep(wait)

    async def _session(self) -> None:
        key = await self._listen_key()
        async with connect(self._stream_base + "ws/" + key, close_timeout=1) as socket:
            self.connected = True
            log.info("user-data stream open: order trades come from it")
            keeper = asyncio.create_task(self._keep_key_alive(key), name="listen-key")
            try:
                async for raw in socket:
                    self._handle(json.loads(raw))
            finally:
                keeper.cancel()
                await asyncio.gather(keeper, return_exceptions=True)

    async def _keep_key_alive(self, key: str) -> None:
        while True:
            await asyncio.sleep(KEEP_ALIVE_S)
            await self._keep_alive(key)

    def _handle(self, message: Any) -> None:
        if not isinstance(message, Mapping):
            return
        if message.get("e") == "listenKeyExpired":  # a new key, a new socket
            raise ConnectionError("the listen key expired")
        if message.get("e") != "ORDER_TRADE_UPDATE":
            return
        order = message.get("o")
        if isinstance(order, Mapping) and order.get("x") == "TRADE":
            self._record(order)

    def _record(self, order: Mapping[str, Any]) -> None:
        client_order_id = str(order["c"])
        trades = self._trades.setdefault(client_order_id, {})
        self._trades.move_to_end(client_order_id)
        trades[int(order["t"])] = {
            "id": int(order["t"]),
            "qty": str(order["l"]),
            "price": str(order["L"]),
            "commission": str(order.get("n", "0")),
            "commissionAsset": str(order.get("N") or "USDT"),
            "time": int(order["T"]),
        }
        self.events += 1
        while len(self._trades) > MAX_ORDERS:
            self._trades.popitem(last=False)

    async def trades_covering(
        self, client_order_id: str, executed_qty: Decimal
    ) -> list[dict[str, Any]] | None:
        """The order's trades once they add up to ``executed_qty`` (at most ``wait_s`` from
        now); None when the stream is down or has not brought them all in time."""
        deadline = time.monotonic() + self._wait_s
        while self.connected:
            trades = list(self._trades.get(client_order_id, {}).values())
            if sum((Decimal(t["qty"]) for t in trades), Decimal(0)) >= executed_qty:
                return sorted(trades, key=lambda t: int(t["id"]))
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(POLL_S)
        return None
