"""The HTTP server: Binance USD-M futures REST routes, the request pipeline and the admin API.

Every exchange request goes through one pipeline, in this order:

1. parameters: the query string merged with a form body (the query wins);
2. a log entry (arrival time on the server clock, IP, API key, route);
3. cost: ``qtrader.exchange.limits.request_cost`` (a route it does not know is 404; the spot
   ``/api/v3/ping`` and ``/api/v3/time`` cost nothing: spot has its own limits);
4. rate limits, back-offs and bans (``accounting``): refused requests end here with 429/418;
   an admitted order request counts against ORDERS (for a known API key) whatever its outcome;
5. faults chosen for the route (``faults``);
6. the route itself: for signed routes the API key (-2014/-2015, HTTP 401), the HMAC signature
   (-1022) and the timestamp (-1021), then the business logic (``matching``), with no ``await``
   between check and booking;
7. headers: ``X-MBX-USED-WEIGHT-*`` on every answer, ``X-MBX-ORDER-COUNT-*`` on order answers,
   ``Retry-After`` on 429/418.

Signatures: an HMAC-SHA256 hex digest with the key's secret, accepted over either of two strings:
python-binance's (the parameters except ``signature``, sorted by name, ``symbol``'s value
URL-quoted, the others as they are) or Binance's documented ``totalParams`` (the raw query string
followed by the raw body, without the ``signature`` pair). The timestamp check is Binance's:
accepted only if ``timestamp < now + 1000`` and ``now - timestamp <= recvWindow``, on the server
clock (``time.time()`` plus an admin-set skew), evaluated when the request is processed. The time
the server *reports* (``/fapi/v1/time``, exchangeInfo's ``serverTime``) is that clock plus a
second admin-set offset, 0 unless ``/_sim/clock/report`` sets one: with one, a client that
resyncs from the reported time stays outside the window, a skew no resync cures.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, quote

from aiohttp import web

from qtrader.exchange.limits import RequestCost, request_cost

from . import account, errors
from .accounting import Accounting, LogEntry
from .config import ConfigError, SimConfig
from .decimals import plain
from .errors import ApiError
from .faults import Chosen, Fault, FaultError, FaultKind, choose, parse_faults
from .klines import INTERVAL_MS
from .ledger import Income
from .listen_keys import ListenKeys
from .matching import Order, Trade, Venue
from .streams import StreamHub
from .streams import routes as stream_routes

CLIENT_IP_HEADER = "X-Sim-Client-IP"
_SPOT_ROUTES = {("GET", "/api/v3/ping"), ("GET", "/api/v3/time")}
_UNKNOWN_503 = "Unknown error, please check your request or try again later."
_HTML_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n</body>\r\n</html>\r\n"
)


def load_exchange_info() -> dict[str, Any]:
    """The instruments the simulator lists: the paper exchange's exchangeInfo document."""
    text = resources.files("qtrader").joinpath("data/paper_exchange_info.json").read_text()
    document: dict[str, Any] = json.loads(text)
    return document


@dataclass(frozen=True)
class Call:
    """One exchange request as a route handler sees it."""

    method: str
    path: str
    params: Mapping[str, str]
    duplicate: str | None  # a parameter sent twice in one place (-1101)
    raw_query: str
    raw_body: str
    ip: str
    key_header: str | None


@dataclass(frozen=True)
class _Route:
    handler: Callable[[Call, str], Any]  # (call, api_key) -> JSON body
    signed: bool
    keyed: bool = False  # needs a known X-MBX-APIKEY but no signature (listenKey routes)


class BinanceFuturesSim:
    """A Binance USD-M futures REST server on a loopback port, with an admin API under /_sim/."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self._document = load_exchange_info()
        self._initial = self._listed(config or SimConfig())
        self._runner: web.AppRunner | None = None
        self._countdowns: asyncio.Task[None] | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self._stopping: asyncio.Event | None = None
        self._routes = self._route_table()
        self.streams = StreamHub(self)
        self.base_url = ""
        self.reset()

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0: any free port); returns the base URL."""
        if self._runner is not None:
            raise RuntimeError("the simulator is already running")
        self._stopping = asyncio.Event()
        runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        self.base_url = f"http://{bound_host}:{bound_port}"
        self._countdowns = asyncio.create_task(self._watch_countdowns(), name="sim-countdowns")
        self._housekeeping = asyncio.create_task(self._keep_house(), name="sim-housekeeping")
        return self.base_url

    async def stop(self) -> None:
        """Stop listening; requests that hang are released and their connections closed."""
        if self._stopping is not None:
            self._stopping.set()
        for task in (self._countdowns, self._housekeeping):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._countdowns = self._housekeeping = None
        await self.streams.close_all()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def reset(self) -> None:
        """Back to the start-up state: the start-up config, no orders, no log, no faults, no
        listen keys; websocket connections are dropped."""
        self.streams.drop()
        self.config = self._initial
        self.clock_skew_ms = self.config.start_skew_ms
        self.reported_offset_ms = 0  # added to the time reported, not to the timestamp check
        self.accounting = Accounting(self.config)
        self.venue = Venue(
            self._document, self.config, start_ms=self.now_ms(), listener=self.streams.user_event
        )
        self.listen_keys = ListenKeys(self.config.listen_key_validity_ms)
        self.faults: list[Fault] = []
        self.log: list[LogEntry] = []
        self._manual = 0

    def now_ms(self) -> int:
        """The server clock: wall time plus the admin-set skew."""
        return int(time.time() * 1000) + self.clock_skew_ms

    def configure(self, changes: Mapping[str, Any]) -> SimConfig:
        """Apply a partial config; new rate-limit rules or window mode restart the counters."""
        config = self._listed(self.config.merged(changes))
        if (config.rate_limits, config.window_mode) != (
            self.config.rate_limits,
            self.config.window_mode,
        ):
            self.accounting = Accounting(config)
        else:
            self.accounting.config = config
        self.venue.config = config
        self.venue.sync_prices(self.now_ms())
        if config.fee_burn != self.config.fee_burn:
            self.venue.fee_burn = set(config.fee_burn)
        if config.funding_rates != self.config.funding_rates:
            self.venue.funding_rates = dict(config.funding_rates)
        self.listen_keys.validity_ms = config.listen_key_validity_ms
        self.config = config
        return config

    def _listed(self, config: SimConfig) -> SimConfig:
        listed = {raw["symbol"] for raw in self._document["symbols"]}
        unlisted = sorted(set(config.prices) - listed)
        if unlisted:
            raise ConfigError(f"prices name unlisted symbol(s) {unlisted}")
        return config

    async def _watch_countdowns(self) -> None:
        """Binance checks countdowns about every 10 ms; so does this."""
        while True:
            await asyncio.sleep(self.config.countdown_check_ms / 1000)
            self.venue.expire_countdowns(self.now_ms())

    async def _keep_house(self) -> None:
        """Funding, kline pushes, listen-key expiry and connection age, on the server clock."""
        while True:
            await asyncio.sleep(self.config.kline_push_ms / 1000)
            now = self.now_ms()
            self.venue.funding_due(now)
            self.streams.tick(now)

    def _app(self) -> web.Application:
        app = web.Application()
        admin = [
            ("POST", "/_sim/reset", self._admin_reset),
            ("GET", "/_sim/config", self._admin_get_config),
            ("POST", "/_sim/config", self._admin_config),
            ("GET", "/_sim/faults", self._admin_get_faults),
            ("POST", "/_sim/faults", self._admin_faults),
            ("POST", "/_sim/price", self._admin_price),
            ("POST", "/_sim/partial", self._admin_partial),
            ("POST", "/_sim/clock", self._admin_clock),
            ("POST", "/_sim/clock/report", self._admin_clock_report),
            ("GET", "/_sim/log", self._admin_log),
            ("GET", "/_sim/orders", self._admin_orders),
            ("GET", "/_sim/trades", self._admin_trades),
            ("GET", "/_sim/countdowns", self._admin_countdowns),
            ("GET", "/_sim/windows", self._admin_windows),
            ("POST", "/_sim/funding/rate", self._admin_funding_rate),
            ("POST", "/_sim/funding/settle", self._admin_funding_settle),
            ("POST", "/_sim/transfer", self._admin_transfer),
            ("POST", "/_sim/fee_burn", self._admin_fee_burn),
            ("POST", "/_sim/manual_trade", self._admin_manual_trade),
            ("GET", "/_sim/income", self._admin_income),
            ("GET", "/_sim/ws", self._admin_ws),
            ("POST", "/_sim/ws/drop", self._admin_ws_drop),
        ]
        for method, path, handler in admin:
            app.router.add_route(method, path, _admin(handler))
        app.add_routes(stream_routes(self.streams))
        app.router.add_route("*", "/{tail:.*}", self._exchange)
        return app

    # --- the exchange pipeline -----------------------------------------------------------------

    async def _exchange(self, request: web.Request) -> web.StreamResponse:
        call = await self._call(request)
        now = self.now_ms()
        api_key = call.key_header if call.key_header in self.config.api_keys else None
        entry = LogEntry(now, call.ip, call.key_header, call.method, call.path)
        self.log.append(entry)
        route = self._routes.get((call.method, call.path))
        cost = self._cost(call)
        chosen = Chosen()
        response: web.StreamResponse | None
        try:
            if route is None or cost is None:
                raise ApiError(404, -1000, f"Unknown route {call.method} {call.path}.")
            self.accounting.admit(now, call.ip, api_key, cost)
            entry.admitted = True
            entry.weight, entry.orders = cost.weight, cost.orders if api_key else 0
            chosen = choose(self.faults, f"{call.method} {call.path}")
            entry.fault = chosen.name
            if chosen.latency_ms:
                await self._pause(chosen.latency_ms / 1000)
            response = await self._answer(request, call, route, chosen)
        except ApiError as exc:
            response = _error(exc)
        entry.status = response.status if response is not None else None
        entry.code = _code_of(response)
        if response is None:
            return web.Response()  # the connection is gone; aiohttp discards this
        self._add_headers(response, call, api_key, chosen)
        return response

    async def _answer(
        self, request: web.Request, call: Call, route: _Route, chosen: Chosen
    ) -> web.StreamResponse | None:
        """The route's answer, or the chosen fault's; None when the connection was dropped."""
        fault = chosen.outcome
        if fault is None:
            return self._run(call, route)
        kind = fault.kind
        if kind.books or (kind is FaultKind.ERROR_CODE and fault.book):
            self._run(call, route)  # processed; its answer is then lost
        if kind in (FaultKind.BOOKED_THEN_HANG, FaultKind.HANG_BEFORE_BOOKING):
            await self._pause(fault.hang_s)
            if kind is FaultKind.HANG_BEFORE_BOOKING and fault.book_after:
                self._run(call, route)
            _drop(request, reset=False)
            return None
        if kind is FaultKind.BOOKED_THEN_RESET:
            _drop(request, reset=True)
            return None
        return self._fault_answer(fault, call.ip)

    def _fault_answer(self, fault: Fault, ip: str) -> web.Response:
        kind = fault.kind
        now = self.now_ms()
        if kind is FaultKind.HTTP_429:
            seconds = fault.retry_after_s or 1
            self.accounting.impose_backoff(now, ip, seconds)
            msg = "Too many requests; please use the websocket for live updates."
            return _error(ApiError(429, -1003, msg, retry_after_s=seconds))
        if kind is FaultKind.HTTP_418:
            seconds = fault.retry_after_s or 2
            self.accounting.impose_ban(now, ip, seconds)
            msg = (
                f"Way too many requests; IP banned until {now + seconds * 1000}. Please use the "
                "websocket for live updates to avoid bans."
            )
            return _error(ApiError(418, -1003, msg, retry_after_s=seconds))
        if kind is FaultKind.HTTP_408:
            return web.Response(status=408, text="408 Request Timeout")
        if kind is FaultKind.HTML_502:
            return web.Response(status=502, text=_HTML_502, content_type="text/html")
        return _error(
            _FAULT_ERRORS[kind]
            if kind in _FAULT_ERRORS
            else ApiError(fault.status, fault.code, fault.msg)
        )

    def _run(self, call: Call, route: _Route) -> web.Response:
        """Authenticate and execute; business errors become Binance error answers."""
        try:
            if call.duplicate is not None:
                raise errors.rejected(errors.DUPLICATE_PARAM)
            if route.signed:
                api_key = self._authenticate(call)
            else:
                api_key = self._known_key(call) if route.keyed else ""
            return web.json_response(route.handler(call, api_key))
        except ApiError as exc:
            return _error(exc)

    def _known_key(self, call: Call) -> str:
        if not call.key_header:
            raise errors.rejected(errors.API_KEY_FORMAT, status=401)
        if call.key_header not in self.config.api_keys:
            raise errors.rejected(errors.API_KEY_REJECTED, status=401)
        return call.key_header

    def _authenticate(self, call: Call) -> str:
        api_key = self._known_key(call)
        secret = self.config.api_keys[api_key]
        if self.config.check_signature and not _signature_ok(secret, call):
            raise errors.rejected(errors.INVALID_SIGNATURE)
        timestamp = _integer(call.params, "timestamp")
        if timestamp is None:
            raise errors.mandatory("timestamp")
        recv_window = _integer(call.params, "recvWindow")
        if recv_window is None:
            recv_window = self.config.recv_window_ms
        if not 0 < recv_window <= 60_000:
            raise errors.invalid_value("recvWindow")
        now = self.now_ms()
        if timestamp >= now + 1000:
            raise errors.rejected(errors.TIMESTAMP_AHEAD)
        if now - timestamp > recv_window:
            raise errors.rejected(errors.TIMESTAMP_OUTSIDE)
        return api_key

    async def _call(self, request: web.Request) -> Call:
        body = (await request.read()).decode("utf-8", "replace")
        form = body if request.content_type == "application/x-www-form-urlencoded" else ""
        raw_query = request.rel_url.raw_query_string
        query = parse_qsl(raw_query, keep_blank_values=True)
        posted = parse_qsl(form, keep_blank_values=True)
        duplicate = _duplicate(query) or _duplicate(posted)
        params = {**dict(posted), **dict(query)}
        ip = request.remote or "unknown"
        if self.config.client_ip_header and CLIENT_IP_HEADER in request.headers:
            ip = request.headers[CLIENT_IP_HEADER]
        return Call(
            method=request.method,
            path=request.path,
            params=params,
            duplicate=duplicate,
            raw_query=raw_query,
            raw_body=form,
            ip=ip,
            key_header=request.headers.get("X-MBX-APIKEY"),
        )

    @staticmethod
    def _cost(call: Call) -> RequestCost | None:
        if (call.method, call.path) in _SPOT_ROUTES:
            return RequestCost()
        try:
            return request_cost(call.method, call.path, call.params)
        except (KeyError, ValueError):
            return None

    def _add_headers(
        self, response: web.StreamResponse, call: Call, api_key: str | None, chosen: Chosen
    ) -> None:
        is_order = (call.method, call.path) == ("POST", "/fapi/v1/order")
        headers = self.accounting.headers(self.now_ms(), call.ip, api_key, orders=is_order)
        for name, value in headers.items():
            if name.startswith("X-MBX-USED-WEIGHT-"):
                if chosen.no_weight_headers:
                    continue
                if chosen.wrong_weight_headers is not None:
                    value = str(chosen.wrong_weight_headers)
            response.headers[name] = value

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the server stops (so stop() never waits on a hang)."""
        assert self._stopping is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    # --- routes --------------------------------------------------------------------------------

    def _route_table(self) -> dict[tuple[str, str], _Route]:
        public, signed = False, True
        return {
            ("GET", "/fapi/v1/ping"): _Route(lambda call, key: {}, public),
            ("GET", "/fapi/v1/time"): _Route(self._time, public),
            ("GET", "/api/v3/ping"): _Route(lambda call, key: {}, public),
            ("GET", "/api/v3/time"): _Route(self._time, public),
            ("GET", "/fapi/v1/exchangeInfo"): _Route(self._exchange_info, public),
            ("GET", "/fapi/v1/ticker/price"): _Route(self._ticker, public),
            # python-binance's futures_symbol_ticker asks version 2 (the same answer).
            ("GET", "/fapi/v2/ticker/price"): _Route(self._ticker, public),
            ("POST", "/fapi/v1/order"): _Route(self._new_order, signed),
            ("GET", "/fapi/v1/order"): _Route(self._query_order, signed),
            ("DELETE", "/fapi/v1/order"): _Route(self._cancel_order, signed),
            ("GET", "/fapi/v1/openOrders"): _Route(self._open_orders, signed),
            ("DELETE", "/fapi/v1/allOpenOrders"): _Route(self._cancel_all, signed),
            ("POST", "/fapi/v1/countdownCancelAll"): _Route(self._countdown, signed),
            ("GET", "/fapi/v1/userTrades"): _Route(self._user_trades, signed),
            ("GET", "/fapi/v2/account"): _Route(self._account, signed),
            ("GET", "/fapi/v2/positionRisk"): _Route(self._position_risk, signed),
            ("GET", "/fapi/v3/positionRisk"): _Route(self._position_risk_v3, signed),
            ("GET", "/fapi/v2/balance"): _Route(self._balance, signed),
            ("GET", "/fapi/v3/balance"): _Route(self._balance, signed),
            ("GET", "/fapi/v1/income"): _Route(self._income, signed),
            ("GET", "/fapi/v1/feeBurn"): _Route(self._get_fee_burn, signed),
            ("POST", "/fapi/v1/feeBurn"): _Route(self._fee_burn, signed),
            ("GET", "/fapi/v1/klines"): _Route(self._klines, public),
            ("GET", "/fapi/v1/premiumIndex"): _Route(self._premium_index, public),
            ("POST", "/fapi/v1/listenKey"): _Route(self._listen_key_open, public, keyed=True),
            ("PUT", "/fapi/v1/listenKey"): _Route(self._listen_key_keepalive, public, keyed=True),
            ("DELETE", "/fapi/v1/listenKey"): _Route(self._listen_key_close, public, keyed=True),
        }

    def _reported_ms(self) -> int:
        return self.now_ms() + self.reported_offset_ms

    def _time(self, call: Call, api_key: str) -> Any:
        return {"serverTime": self._reported_ms()}

    def _exchange_info(self, call: Call, api_key: str) -> Any:
        document = copy.deepcopy(self._document)
        document["serverTime"] = self._reported_ms()
        document["rateLimits"] = [rule.as_binance() for rule in self.config.rate_limits]
        document.setdefault("exchangeFilters", [])
        return document

    def _ticker(self, call: Call, api_key: str) -> Any:
        now = self.now_ms()
        if "symbol" in call.params:
            symbol = self.venue.require_symbol(call.params["symbol"])
            return {"symbol": symbol, "price": plain(self.venue.price(symbol)), "time": now}
        return [
            {"symbol": s, "price": plain(self.venue.price(s)), "time": now}
            for s in sorted(self.venue.info.instruments)
        ]

    def _new_order(self, call: Call, api_key: str) -> Any:
        order, result = self.venue.place(api_key, call.params, self.now_ms())
        return order.as_binance() if result else order.acknowledged()

    def _query_order(self, call: Call, api_key: str) -> Any:
        return self.venue.query(api_key, call.params).as_binance()

    def _cancel_order(self, call: Call, api_key: str) -> Any:
        return self.venue.cancel(api_key, call.params, self.now_ms()).as_binance()

    def _open_orders(self, call: Call, api_key: str) -> Any:
        return [o.as_binance() for o in self.venue.open_orders(api_key, call.params.get("symbol"))]

    def _cancel_all(self, call: Call, api_key: str) -> Any:
        symbol = self.venue.require_symbol(call.params.get("symbol"))
        self.venue.cancel_all(api_key, symbol, self.now_ms())
        return {"code": 200, "msg": "The operation of cancel all open order is done."}

    def _countdown(self, call: Call, api_key: str) -> Any:
        return self.venue.set_countdown(api_key, call.params, self.now_ms())

    def _user_trades(self, call: Call, api_key: str) -> Any:
        return [t.as_binance() for t in self.venue.user_trades(api_key, call.params)]

    def _account(self, call: Call, api_key: str) -> Any:
        return account.account_info(self.venue, api_key, self.now_ms())

    def _position_risk(self, call: Call, api_key: str) -> Any:
        return account.position_risk(self.venue, api_key)

    def _position_risk_v3(self, call: Call, api_key: str) -> Any:
        return account.position_risk_v3(self.venue, api_key, self.now_ms())

    def _balance(self, call: Call, api_key: str) -> Any:
        return account.balances(self.venue, api_key, self.now_ms())

    def _income(self, call: Call, api_key: str) -> Any:
        entries = self.venue.ledger.query(api_key, call.params, self.now_ms())
        return [entry.as_binance() for entry in entries]

    def _get_fee_burn(self, call: Call, api_key: str) -> Any:
        return {"feeBurn": api_key in self.venue.fee_burn}

    def _fee_burn(self, call: Call, api_key: str) -> Any:
        value = call.params.get("feeBurn")
        if value not in ("true", "false"):
            raise errors.mandatory("feeBurn") if not value else errors.invalid_value("feeBurn")
        self.venue.set_fee_burn(api_key, value == "true")
        return {"code": 200, "msg": "success"}

    def _klines(self, call: Call, api_key: str) -> Any:
        symbol = self.venue.require_symbol(call.params.get("symbol"))
        interval = call.params.get("interval")
        if not interval:
            raise errors.mandatory("interval")
        if interval not in INTERVAL_MS:
            raise errors.bad_request(-1120, "Invalid interval.")
        limit = _integer(call.params, "limit") or 500
        if not 1 <= limit <= 1500:
            raise errors.invalid_value("limit")
        klines = self.venue.history.klines(
            symbol,
            interval,
            now_ms=self.now_ms(),
            start_ms=_integer(call.params, "startTime"),
            end_ms=_integer(call.params, "endTime"),
            limit=limit,
        )
        return [kline.row() for kline in klines]

    def _premium_index(self, call: Call, api_key: str) -> Any:
        now = self.now_ms()
        symbols = (
            [self.venue.require_symbol(call.params["symbol"])]
            if "symbol" in call.params
            else sorted(self.venue.info.instruments)
        )
        rows = [
            {
                "symbol": symbol,
                "markPrice": plain(self.venue.price(symbol)),
                "indexPrice": plain(self.venue.price(symbol)),
                "estimatedSettlePrice": plain(self.venue.price(symbol)),
                "lastFundingRate": plain(self.venue.funding_rates.get(symbol, Decimal(0))),
                "interestRate": "0",
                "nextFundingTime": self.venue.next_funding_ms,
                "time": now,
            }
            for symbol in symbols
        ]
        return rows[0] if "symbol" in call.params else rows

    def _listen_key_open(self, call: Call, api_key: str) -> Any:
        return {"listenKey": self.listen_keys.open(api_key, self.now_ms())}

    def _listen_key_keepalive(self, call: Call, api_key: str) -> Any:
        key = self.listen_keys.keepalive(api_key, call.params.get("listenKey"), self.now_ms())
        return {"listenKey": key}

    def _listen_key_close(self, call: Call, api_key: str) -> Any:
        key = self.listen_keys.close(api_key, call.params.get("listenKey"))
        self.streams.end_listen_key(key, self.now_ms(), expired=False)
        return {}

    # --- admin API -----------------------------------------------------------------------------

    async def _admin_reset(self, body: Any, query: Mapping[str, str]) -> Any:
        self.reset()
        return {"ok": True}

    async def _admin_get_config(self, body: Any, query: Mapping[str, str]) -> Any:
        return self.config.as_dict()

    async def _admin_config(self, body: Any, query: Mapping[str, str]) -> Any:
        return self.configure(body).as_dict()

    async def _admin_get_faults(self, body: Any, query: Mapping[str, str]) -> Any:
        return [fault.as_dict() for fault in self.faults]

    async def _admin_faults(self, body: Any, query: Mapping[str, str]) -> Any:
        self.faults = parse_faults(body)
        return [fault.as_dict() for fault in self.faults]

    async def _admin_price(self, body: Any, query: Mapping[str, str]) -> Any:
        symbol, price = _field(body, "symbol", str), _decimal_field(body, "price")
        filled = self.venue.set_price(symbol, price, self.now_ms())
        return {"symbol": symbol, "price": plain(price), "filled": [_order(o) for o in filled]}

    async def _admin_partial(self, body: Any, query: Mapping[str, str]) -> Any:
        symbol, ratio = _field(body, "symbol", str), _decimal_field(body, "ratio")
        count = _field(body, "count", int)
        self.venue.set_partial(symbol, ratio, count)
        return {"symbol": symbol, "ratio": plain(ratio), "count": count}

    async def _admin_clock(self, body: Any, query: Mapping[str, str]) -> Any:
        if not isinstance(body, Mapping) or len(set(body) & {"skew_ms", "advance_ms"}) != 1:
            raise ValueError("clock needs exactly one of skew_ms (set) or advance_ms (add)")
        if "skew_ms" in body:
            self.clock_skew_ms = _field(body, "skew_ms", int)
        else:
            self.clock_skew_ms += _field(body, "advance_ms", int)
        return {"skew_ms": self.clock_skew_ms, "server_time": self.now_ms()}

    async def _admin_clock_report(self, body: Any, query: Mapping[str, str]) -> Any:
        self.reported_offset_ms = _field(body, "offset_ms", int)
        return {"offset_ms": self.reported_offset_ms, "reported_time": self._reported_ms()}

    async def _admin_log(self, body: Any, query: Mapping[str, str]) -> Any:
        since = int(query.get("since", "0"))
        return [entry.as_dict() for entry in self.log[since:]]

    async def _admin_orders(self, body: Any, query: Mapping[str, str]) -> Any:
        return [_order(o) for orders in self.venue.orders.values() for o in orders]

    async def _admin_trades(self, body: Any, query: Mapping[str, str]) -> Any:
        return [_trade(t) for t in self.venue.trades]

    async def _admin_countdowns(self, body: Any, query: Mapping[str, str]) -> Any:
        now = self.now_ms()
        return [
            {
                "api_key": api_key,
                "symbol": symbol,
                "countdownTime": countdown,
                "deadline_ms": deadline,
                "remaining_ms": max(0, deadline - now),
            }
            for (api_key, symbol), (deadline, countdown) in sorted(self.venue.countdowns.items())
        ]

    async def _admin_windows(self, body: Any, query: Mapping[str, str]) -> Any:
        return {**self.accounting.audit(self.log), "ips": self.accounting.bans()}

    async def _admin_funding_rate(self, body: Any, query: Mapping[str, str]) -> Any:
        symbol, rate = _field(body, "symbol", str), _decimal_field(body, "rate")
        if not -1 < rate < 1:
            raise ValueError("rate must be in (-1, 1)")
        self.venue.set_funding_rate(symbol, rate)
        return {"symbol": symbol, "rate": plain(rate)}

    async def _admin_funding_settle(self, body: Any, query: Mapping[str, str]) -> Any:
        symbol = _field(body, "symbol", str) if "symbol" in (body or {}) else None
        if symbol is not None:
            self.venue.require_symbol(symbol)
        return [_income(e) for e in self.venue.settle_funding(self.now_ms(), symbol)]

    async def _admin_transfer(self, body: Any, query: Mapping[str, str]) -> Any:
        api_key, asset = _field(body, "api_key", str), _field(body, "asset", str)
        amount = _decimal_field(body, "amount")
        delay = _field(body, "income_delay_ms", int) if "income_delay_ms" in body else 0
        if delay < 0:
            raise ValueError("income_delay_ms must not be negative")
        entry = self.venue.transfer(api_key, asset, amount, self.now_ms(), income_delay_ms=delay)
        return _income(entry)

    async def _admin_fee_burn(self, body: Any, query: Mapping[str, str]) -> Any:
        api_key, enabled = _field(body, "api_key", str), _field(body, "enabled", bool)
        if api_key not in self.config.api_keys:
            raise ValueError(f"unknown api key {api_key!r}")
        self.venue.set_fee_burn(api_key, enabled)
        return {"api_key": api_key, "enabled": enabled}

    async def _admin_manual_trade(self, body: Any, query: Mapping[str, str]) -> Any:
        """A MARKET order placed outside the API (the web UI): client id ``web_<n>``."""
        api_key = _field(body, "api_key", str)
        if api_key not in self.config.api_keys:
            raise ValueError(f"unknown api key {api_key!r}")
        self._manual += 1
        params = {
            "symbol": _field(body, "symbol", str),
            "side": _field(body, "side", str),
            "type": "MARKET",
            "quantity": str(_decimal_field(body, "quantity")),
            "newClientOrderId": f"web_{self._manual}",
            "newOrderRespType": "RESULT",
        }
        order, _ = self.venue.place(api_key, params, self.now_ms())
        return _order(order)

    async def _admin_income(self, body: Any, query: Mapping[str, str]) -> Any:
        return [_income(e) for e in self.venue.ledger.entries]

    async def _admin_ws(self, body: Any, query: Mapping[str, str]) -> Any:
        return {
            "connections": [
                {
                    "opened_ms": c.opened_ms,
                    "combined": c.combined,
                    "streams": [s.name for s in c.klines],
                    "listen_keys": c.listen_keys,
                }
                for c in sorted(self.streams.connections, key=lambda c: c.opened_ms)
            ],
            "listen_keys": [
                {"listen_key": k.key, "api_key": k.api_key, "expires_ms": k.expires_ms}
                for k in self.listen_keys.active()
            ],
        }

    async def _admin_ws_drop(self, body: Any, query: Mapping[str, str]) -> Any:
        """Abort every connection; with ``{"refuse": true}`` also refuse new ones until a call
        with ``{"refuse": false}`` (an outage)."""
        if isinstance(body, Mapping) and "refuse" in body:
            self.streams.refusing = bool(body["refuse"])
        return {"dropped": self.streams.drop(), "refusing": self.streams.refusing}


_FAULT_ERRORS = {
    FaultKind.BOOKED_THEN_503_UNKNOWN: ApiError(503, -1000, _UNKNOWN_503),
    FaultKind.UNAVAILABLE_503: ApiError(503, -1008, "Service Unavailable."),
    FaultKind.INTERNAL_503: ApiError(
        503, -1001, "Internal error; unable to process your request. Please try again."
    ),
    FaultKind.BOOKED_THEN_1006: ApiError(
        500,
        -1006,
        "An unexpected response was received from the message bus. Execution status unknown.",
    ),
    FaultKind.BOOKED_THEN_1007: ApiError(
        500,
        -1007,
        "Timeout waiting for response from backend server. Send status unknown; execution status "
        "unknown.",
    ),
}


def _admin(handler: Callable[[Any, Mapping[str, str]], Any]) -> Any:
    """Wrap an admin handler: JSON in and out, bad input answered 400 with the reason."""

    async def wrapped(request: web.Request) -> web.Response:
        try:
            text = await request.text()
            body = json.loads(text) if text.strip() else {}
            result = await handler(body, request.rel_url.query)
        except json.JSONDecodeError as exc:
            return web.json_response({"error": f"body is not JSON: {exc}"}, status=400)
        except ApiError as exc:
            return web.json_response({"error": exc.msg, "code": exc.code}, status=400)
        except (ConfigError, FaultError, ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(result)

    return wrapped


def _error(exc: ApiError) -> web.Response:
    response = web.json_response(exc.body(), status=exc.status)
    if exc.retry_after_s is not None:
        response.headers["Retry-After"] = str(exc.retry_after_s)
    return response


def _code_of(response: web.StreamResponse | None) -> int | None:
    if not isinstance(response, web.Response) or response.status < 300:
        return None
    if response.content_type != "application/json" or response.body is None:
        return None
    assert isinstance(response.body, bytes)
    code = json.loads(response.body).get("code")
    return code if isinstance(code, int) else None


def _drop(request: web.Request, *, reset: bool) -> None:
    """End the connection without an answer: RST (``reset``) or a plain close."""
    transport = request.transport
    if transport is None or transport.is_closing():
        return
    if reset:
        transport.abort()
    else:
        transport.close()


def _duplicate(pairs: list[tuple[str, str]]) -> str | None:
    seen: set[str] = set()
    for name, _ in pairs:
        if name in seen:
            return name
        seen.add(name)
    return None


def _signature_ok(secret: str, call: Call) -> bool:
    signature = call.params.get("signature")
    if not signature:
        return False
    candidates = (_python_binance_payload(call.params), _total_params(call))
    key = secret.encode()
    return any(
        hmac.compare_digest(
            hmac.new(key, payload.encode(), hashlib.sha256).hexdigest(), signature.lower()
        )
        for payload in candidates
    )


def _python_binance_payload(params: Mapping[str, str]) -> str:
    """What python-binance signs: sorted by name, only ``symbol``'s value URL-quoted."""
    items = sorted((name, value) for name, value in params.items() if name != "signature")
    return "&".join(f"{n}={quote(v) if n == 'symbol' else v}" for n, v in items)


def _total_params(call: Call) -> str:
    """What Binance documents: the raw query string then the raw body, minus the signature."""

    def strip(raw: str) -> str:
        return "&".join(p for p in raw.split("&") if p and not p.startswith("signature="))

    return strip(call.raw_query) + strip(call.raw_body)


def _integer(params: Mapping[str, str], name: str) -> int | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    if not value.isdigit():
        raise errors.mandatory(name)  # Binance: "... was not sent, was empty/null, or malformed."
    return int(value)


def _field(body: Any, name: str, kind: type) -> Any:
    if not isinstance(body, Mapping) or name not in body:
        raise ValueError(f"missing field {name!r}")
    value = body[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"field {name!r} must be of type {kind.__name__}")
    return value


def _decimal_field(body: Any, name: str) -> Decimal:
    if not isinstance(body, Mapping) or name not in body:
        raise ValueError(f"missing field {name!r}")
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"field {name!r} must be a decimal string or number")
    try:
        parsed = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"field {name!r} is not a decimal: {value!r}") from None
    if not parsed.is_finite():
        raise ValueError(f"field {name!r} must be finite")
    return parsed


def _order(order: Order) -> dict[str, Any]:
    return {**order.as_binance(), "apiKey": order.api_key}


def _trade(trade: Trade) -> dict[str, Any]:
    return {**trade.as_binance(), "apiKey": trade.api_key}


def _income(entry: Income) -> dict[str, Any]:
    return {**entry.as_binance(), "apiKey": entry.api_key}
