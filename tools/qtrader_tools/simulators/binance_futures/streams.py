"""WebSocket streams on the simulator's port: market klines and user data, Binance's paths.

Paths (``ws://HOST:PORT`` stands for ``wss://fstream.binance.com``); each may also be
prefixed with ``/market``, ``/public`` or ``/private`` as in Binance's current routing:

* ``/ws/<stream>`` a raw stream: each message is the payload itself;
* ``/stream?streams=<a>/<b>`` a combined stream: ``{"stream": <name>, "data": <payload>}``;
* ``/ws/<listenKey>``, ``/ws?listenKey=<key>`` (python-binance's futures user socket is
  ``/private/ws?listenKey=<key>``) a user-data stream; a listen key may also be one of the
  names of a combined stream.

Stream names: ``<symbol>@kline_<interval>`` (``"e": "kline"``) and
``<pair>_perpetual@continuousKline_<interval>`` (``"e": "continuous_kline"``, python-binance's
``kline_futures_socket``); any other name is refused at the handshake with HTTP 400 (stricter
than Binance, which accepts and stays silent: a typo in a test fails at once).

Every ``kline_push_ms`` each kline subscription gets the forming kline (``x: false``); when the
server clock has passed a kline's end, the connection first gets that kline closed
(``x: true``), and every kline it missed in between (a clock jump) closed too, at most
``MAX_CATCH_UP``. Klines come from ``klines.MarketHistory``, so they agree with
``/fapi/v1/klines`` and with the fills.

Connections end by the server: after ``ws_max_age_ms`` on the server clock (close code 1001),
when their listen key expires (after a ``listenKeyExpired`` event) or is deleted, when an admin
drops them (``drop``: the TCP connection is aborted, as a network failure would), or when a
client reads too slowly to keep its queue under ``QUEUE_LIMIT`` messages. While ``refusing``
(an admin switch: a network outage rather than one cut), new connections are answered 503.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import WSMsgType, web

from .config import SimConfig
from .events import listen_key_expired
from .klines import INTERVAL_MS, open_time
from .listen_keys import ListenKeys
from .matching import Venue

_log = logging.getLogger(__name__)
MAX_CATCH_UP = 1000
QUEUE_LIMIT = 10_000
_KLINE = re.compile(r"^([a-z0-9]+)@kline_(\w+)$")
_CONTINUOUS = re.compile(r"^([a-z0-9]+)_perpetual@continuousKline_(\w+)$")
PREFIXES = ("", "/market", "/public", "/private")


class Server(Protocol):
    venue: Venue
    config: SimConfig
    listen_keys: ListenKeys

    def now_ms(self) -> int: ...


class StreamError(ValueError):
    """A stream name or path the simulator does not serve."""


@dataclass(frozen=True)
class KlineStream:
    name: str
    symbol: str
    interval: str
    continuous: bool


@dataclass(frozen=True)
class _Close:
    code: int
    message: str


@dataclass(eq=False)
class Connection:
    ws: web.WebSocketResponse
    request: web.Request
    opened_ms: int
    combined: bool
    klines: list[KlineStream]
    listen_keys: list[str]
    queue: asyncio.Queue[str | _Close] = field(default_factory=asyncio.Queue)
    last_open: dict[str, int] = field(default_factory=dict)
    closing: bool = False
    aborted: bool = False

    def send(self, stream: str, payload: dict[str, Any]) -> None:
        self.send_raw({"stream": stream, "data": payload} if self.combined else payload)

    def send_raw(self, body: dict[str, Any]) -> None:
        if self.closing:
            return
        if self.queue.qsize() >= QUEUE_LIMIT:
            self.close(1008, "slow consumer")
            return
        self.queue.put_nowait(json.dumps(body, separators=(",", ":")))

    def close(self, code: int, message: str) -> None:
        if not self.closing:
            self.closing = True
            self.queue.put_nowait(_Close(code, message))

    def abort(self) -> None:
        self.aborted = True
        self.close(1006, "dropped")
        transport = self.request.transport
        if transport is not None:
            transport.abort()


class StreamHub:
    def __init__(self, server: Server) -> None:
        self._server = server
        self.connections: set[Connection] = set()
        self.refusing = False  # an outage: every new connection is answered 503

    # --- connections --------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.refusing:
            return web.json_response({"code": -1008, "msg": "Service Unavailable."}, status=503)
        try:
            combined, names = _names(request)
            klines, keys = self._resolve(names)
        except StreamError as exc:
            return web.json_response({"code": -1121, "msg": str(exc)}, status=400)
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        now = self._server.now_ms()
        conn = Connection(ws, request, now, combined, klines, keys)
        self.connections.add(conn)
        writer = asyncio.create_task(self._write(conn), name=f"sim-ws-writer-{id(conn)}")
        try:
            await self._read(conn)
        finally:
            self.connections.discard(conn)
            conn.close(1000, "")
            await writer
        return ws

    def _resolve(self, names: list[str]) -> tuple[list[KlineStream], list[str]]:
        klines, keys = [], []
        for name in names:
            if self._server.listen_keys.account_of(name) is not None:
                keys.append(name)
            else:
                klines.append(self._kline_stream(name))
        return klines, keys

    def _kline_stream(self, name: str) -> KlineStream:
        match = _KLINE.match(name) or _CONTINUOUS.match(name)
        if match is None:
            raise StreamError(f"unknown stream or listenKey {name!r}")
        symbol, interval = match.group(1).upper(), match.group(2)
        if interval not in INTERVAL_MS:
            raise StreamError(f"unsupported kline interval {interval!r} in {name!r}")
        if symbol not in self._server.venue.info:
            raise StreamError(f"unknown symbol {symbol!r} in {name!r}")
        return KlineStream(name, symbol, interval, continuous="@continuousKline_" in name)

    async def _read(self, conn: Connection) -> None:
        """Answer SUBSCRIBE, UNSUBSCRIBE and LIST_SUBSCRIPTIONS until the connection ends."""
        async for message in conn.ws:
            if message.type is WSMsgType.TEXT:
                conn.send_raw(self._request(conn, message.data))

    def _request(self, conn: Connection, text: str) -> dict[str, Any]:
        try:
            request = json.loads(text)
            method, request_id = request["method"], request.get("id")
            params = request.get("params", [])
            if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
                raise StreamError("params must be a list of stream names")
        except (ValueError, TypeError, KeyError) as exc:
            return {"error": {"code": 3, "msg": f"Invalid JSON: {exc}"}, "id": None}
        try:
            result = self._apply(conn, method, params)
        except StreamError as exc:
            return {"error": {"code": 2, "msg": f"Invalid request: {exc}"}, "id": request_id}
        return {"result": result, "id": request_id}

    def _apply(self, conn: Connection, method: Any, params: list[str]) -> list[str] | None:
        if method == "LIST_SUBSCRIPTIONS":
            return [s.name for s in conn.klines] + conn.listen_keys
        if method not in ("SUBSCRIBE", "UNSUBSCRIBE"):
            raise StreamError(f"unknown method {method!r}")
        klines, keys = self._resolve(params)
        if method == "SUBSCRIBE":
            conn.klines += [s for s in klines if s not in conn.klines]
            conn.listen_keys += [k for k in keys if k not in conn.listen_keys]
        else:
            conn.klines = [s for s in conn.klines if s.name not in params]
            conn.listen_keys = [k for k in conn.listen_keys if k not in params]
        return None

    async def _write(self, conn: Connection) -> None:
        while True:
            item = await conn.queue.get()
            try:
                if isinstance(item, _Close):
                    if not conn.aborted:
                        await conn.ws.close(code=item.code, message=item.message.encode())
                    return
                await conn.ws.send_str(item)
            except (ConnectionError, RuntimeError):
                return  # the client is gone; the reader ends the connection

    # --- what the server does to them ---------------------------------------------------------

    def user_event(self, api_key: str, event: dict[str, Any]) -> None:
        """Deliver a user-data event to every connection on a listen key of ``api_key``."""
        keys = self._server.listen_keys
        for conn in list(self.connections):
            for key in conn.listen_keys:
                if keys.account_of(key) == api_key:
                    conn.send(key, event)

    def tick(self, now_ms: int) -> None:
        """Housekeeping on the server clock: klines, expired listen keys, old connections."""
        self._push_klines(now_ms)
        for expired in self._server.listen_keys.expire(now_ms):
            self.end_listen_key(expired.key, now_ms, expired=True)
        max_age = self._server.config.ws_max_age_ms
        for conn in list(self.connections):
            if now_ms - conn.opened_ms >= max_age:
                conn.close(1001, "connection reached its maximum age")

    def end_listen_key(self, key: str, now_ms: int, *, expired: bool) -> None:
        for conn in list(self.connections):
            if key in conn.listen_keys:
                if expired:
                    conn.send(key, listen_key_expired(key, now_ms))
                conn.close(1000, "listenKey expired" if expired else "listenKey closed")

    def drop(self) -> int:
        """Abort every connection now (an injected network failure); returns how many."""
        dropped = list(self.connections)
        for conn in dropped:
            conn.abort()
        return len(dropped)

    async def close_all(self) -> None:
        for conn in list(self.connections):
            conn.close(1001, "server stopping")
        for _ in range(100):
            if not self.connections:
                return
            await asyncio.sleep(0.01)
        self.drop()

    def _push_klines(self, now_ms: int) -> None:
        history = self._server.venue.history
        now_ms = history.latest(now_ms)
        cache: dict[tuple[str, str, int, bool], dict[str, Any]] = {}
        for conn in list(self.connections):
            for stream in conn.klines:
                length = INTERVAL_MS[stream.interval]
                current = open_time(stream.interval, now_ms)
                last = conn.last_open.get(stream.name)
                if last is not None and last < current:
                    first = max(last, current - MAX_CATCH_UP * length)
                    for t in range(first, current, length):
                        conn.send(stream.name, self._event(stream, t, True, now_ms, cache))
                conn.send(stream.name, self._event(stream, current, False, now_ms, cache))
                conn.last_open[stream.name] = current

    def _event(
        self,
        stream: KlineStream,
        open_ms: int,
        closed: bool,
        now_ms: int,
        cache: dict[tuple[str, str, int, bool], dict[str, Any]],
    ) -> dict[str, Any]:
        key = (stream.symbol, stream.interval, open_ms, closed)
        if key not in cache:
            kline = self._server.venue.history.kline(stream.symbol, stream.interval, open_ms)
            cache[key] = kline.payload(closed=closed)
        payload = cache[key]
        if not stream.continuous:
            return {"e": "kline", "E": now_ms, "s": stream.symbol, "k": payload}
        k = {name: value for name, value in payload.items() if name != "s"}
        return {
            "e": "continuous_kline",
            "E": now_ms,
            "ps": stream.symbol,
            "ct": "PERPETUAL",
            "k": k,
        }


def routes(hub: StreamHub) -> list[web.RouteDef]:
    """The websocket routes, under every prefix."""
    defs = []
    for prefix in PREFIXES:
        for path in ("/ws", "/ws/{names:.+}", "/stream"):
            defs.append(web.get(prefix + path, hub.handle))
    return defs


def _names(request: web.Request) -> tuple[bool, list[str]]:
    """Whether the path is a combined stream, and the stream names it asks for."""
    path = request.path
    for prefix in PREFIXES[1:]:
        path = path.removeprefix(prefix)
    if path == "/stream":
        return True, [n for n in request.query.get("streams", "").split("/") if n]
    key = request.query.get("listenKey")
    if path == "/ws" and key:
        return False, [key]
    names = request.match_info.get("names", "")
    if "/" in names:
        raise StreamError(f"a raw stream is /ws/<one stream>, got {request.path!r}")
    return False, [names] if names else []
