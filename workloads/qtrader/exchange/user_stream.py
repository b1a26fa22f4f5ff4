"""Our trades as Binance's user-data stream reports them, so an order's fills need no REST read.

``UserTrades.run`` keeps a user-data socket open (python-binance creates the listen key and
keeps it alive) and records every ``ORDER_TRADE_UPDATE`` whose execution type is ``TRADE`` under
its client order id, in the shape ``GET /fapi/v1/userTrades`` answers (id, qty, price,
commission, commissionAsset, time), so one function turns either into a ``Fill``.

The stream is an optimisation, never the only source: ``trades_covering`` waits at most
``wait_s`` for the trades that make up an order's executed quantity and answers None when they
are not all there (the socket is down, reconnecting or lagging); the caller then reads them over
REST (weight 5). A socket that fails is opened again after a back-off; while it is down every
order's trades come from REST. Only the latest ``MAX_ORDERS`` orders' trades are kept.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Final

from qtrader.exchange.async_binance import create_client, socket_manager
from qtrader.exchange.credentials import Credentials

log = logging.getLogger(__name__)

MAX_ORDERS: Final = 10_000
RECONNECT_S: Final = (1.0, 2.0, 5.0, 10.0)
POLL_S: Final = 0.01


class UserTrades:
    def __init__(
        self, *, rest_url: str | None, testnet: bool, credentials: Credentials, wait_s: float
    ) -> None:
        self._rest_url = rest_url
        self._testnet = testnet
        self._credentials = credentials
        self._wait_s = wait_s
        self._trades: OrderedDict[str, dict[int, dict[str, Any]]] = OrderedDict()
        self.connected = False
        self.events = 0

    async def run(self) -> None:
        """Keep the socket open for as long as the venue is used (cancel to stop)."""
        failures = 0
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure of the socket: REST serves meanwhile
                log.warning("user-data stream: %r", exc)
            self.connected = False
            wait = RECONNECT_S[min(failures, len(RECONNECT_S) - 1)]
            failures += 1
            await asyncio.sleep(wait)

    async def _session(self) -> None:
        client = await create_client(
            rest_url=self._rest_url, testnet=self._testnet, credentials=self._credentials
        )
        try:
            manager = socket_manager(client, rest_url=self._rest_url)
            async with manager.futures_user_socket() as socket:
                self.connected = True
                log.info("user-data stream open: order trades come from it")
                while True:
                    self._handle(await socket.recv())
        finally:
            self.connected = False
            await client.close_connection()

    def _handle(self, message: Any) -> None:
        if not isinstance(message, Mapping):
            return
        if message.get("e") == "error":  # python-binance reports a broken socket this way
            raise ConnectionError(f"user-data socket: {message.get('type')}: {message.get('m')}")
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
