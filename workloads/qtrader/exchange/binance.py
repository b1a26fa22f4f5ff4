"""Binance USD-M futures through python-binance: the ``Venue`` for testnet and live mode.

One request path (``_request``) carries every call and applies the rules in one place:

* every request first acquires its documented cost from the shared rate limiter; every answer's
  ``X-MBX-*`` headers correct the limiter's count;
* 429 / -1003 / -1015 pause all traffic (every replica, through the limiter) until
  ``Retry-After`` or the window's end, then the request is tried again: a rate-limited request
  was not executed;
* 418 records the ban: no request at all leaves this process until it ends, ``health`` is
  CRITICAL and the caller (execution) raises the risk alert;
* -1021 resyncs the server-time offset and retries once; a -1021 that the resync did not cure
  means our clock and Binance's disagree in a way a resync cannot fix: ``health`` is DEGRADED,
  and CRITICAL once ``CLOCK_SKEW_CRITICAL_AFTER`` signed requests in a row ended that way (every
  order is being rejected), until a signed request is accepted again;
* ``Transient`` failures are retried with full-jitter backoff only when repeating is safe: reads
  and cancels always, a new order only when Binance said it was not executed (503 "Service
  Unavailable", -1001 "Internal error"); any other failure of a new order is ``OutcomeUnknown``;
* business errors raise ``Rejected`` after one request.

python-binance is synchronous (requests); its calls run on one dedicated thread so the client's
session and its ``response`` attribute are never shared between two requests in flight.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import requests
from prometheus_client import Counter, Gauge

with warnings.catch_warnings():
    # python-binance 1.0.37 imports websockets' legacy client, which websockets >= 14 deprecates
    # at import time; not ours to fix, and the test suite turns warnings into errors.
    warnings.filterwarnings("ignore", r"websockets\..* is deprecated", DeprecationWarning)
    from binance.client import Client
    from binance.exceptions import BinanceAPIException, BinanceRequestException

from qtrader.contracts.messages import (
    SETTLEMENT_ASSET,
    Fill,
    OrderIntent,
    OrderStatus,
    OrderType,
    Side,
)
from qtrader.exchange.backoff import full_jitter
from qtrader.exchange.credentials import Credentials
from qtrader.exchange.errors import (
    Banned,
    ClockSkew,
    ExchangeError,
    NotSent,
    OutcomeUnknown,
    RateLimited,
    Rejected,
    Transient,
    classify,
)
from qtrader.exchange.filters import prepare_order
from qtrader.exchange.limiter import LimiterConfig, RateLimiter
from qtrader.exchange.limits import RequestCost, request_cost, rules_from_exchange_info
from qtrader.exchange.user_stream import UserTrades, stream_base_of
from qtrader.exchange.venue import VenueIncome, VenueOrder, VenuePosition
from qtrader.health.contract import DependencyHealth, Status
from qtrader.instruments import ExchangeInfo

log = logging.getLogger(__name__)

REQUESTS = Counter(
    "qtrader_exchange_requests_total",
    "Requests to the exchange by endpoint and outcome (ok, rate_limited, banned, clock_skew, "
    "transient, error).",
    ["endpoint", "outcome"],
)

CLOCK_OFFSET = Gauge(
    "qtrader_exchange_clock_offset_ms",
    "Binance's server time minus ours, in ms, as measured at the last resync (signed requests "
    "carry our time plus this).",
)
TRADES_READ = Counter(
    "qtrader_exchange_order_trades_total",
    "Filled orders whose trades were read, by source: the user-data stream, or REST (weight 5).",
    ["source"],
)
CLOCK_REJECTIONS = Counter(
    "qtrader_exchange_clock_rejections_total",
    "Requests Binance rejected with -1021 (timestamp outside recvWindow), resynced or not.",
)
# Signed requests in a row rejected -1021 even after a resync before health is CRITICAL: one
# can be a resync that raced a clock step; three in a row mean every order is being rejected.
CLOCK_SKEW_CRITICAL_AFTER = 3

CLIENT_ORDER_PREFIX = "qt"  # our orders; anything else open on the account is not ours
_STATUS = {
    "NEW": OrderStatus.NEW,
    "PARTIALLY_FILLED": OrderStatus.PARTIALLY_FILLED,
    "FILLED": OrderStatus.FILLED,
    "CANCELED": OrderStatus.CANCELED,
    "REJECTED": OrderStatus.REJECTED,
    "EXPIRED": OrderStatus.EXPIRED,
    "EXPIRED_IN_MATCH": OrderStatus.EXPIRED,
}
# Documented "not executed" answers to a new order: safe to send it again.
_NOT_EXECUTED_MESSAGES = ("service unavailable", "internal error")


@dataclass(frozen=True, kw_only=True)
class BinanceSettings:
    base_url: str
    credentials: Credentials
    egress_id: str = "egress-default"
    redis_url: str | None = None
    replicas: int = 1
    safety_margin: float = 0.9
    timeout_s: float = 5.0
    recv_window_ms: int = 5000
    max_retries: int = 5
    backoff_base_s: float = 0.2
    backoff_cap_s: float = 10.0
    # An order's trades from the user-data stream (waited for at most this long), else REST.
    user_stream: bool = True
    user_stream_wait_s: float = 1.0


@dataclass(frozen=True)
class _Endpoint:
    method: str
    path: str
    call: Callable[[Client], Callable[..., Any]]


_TIME = _Endpoint("GET", "/fapi/v1/time", lambda c: c.futures_time)
_EXCHANGE_INFO = _Endpoint("GET", "/fapi/v1/exchangeInfo", lambda c: c.futures_exchange_info)
_NEW_ORDER = _Endpoint("POST", "/fapi/v1/order", lambda c: c.futures_create_order)
_GET_ORDER = _Endpoint("GET", "/fapi/v1/order", lambda c: c.futures_get_order)
_OPEN_ORDERS = _Endpoint("GET", "/fapi/v1/openOrders", lambda c: c.futures_get_open_orders)
_CANCEL_ALL = _Endpoint(
    "DELETE", "/fapi/v1/allOpenOrders", lambda c: c.futures_cancel_all_open_orders
)
_COUNTDOWN = _Endpoint(
    "POST", "/fapi/v1/countdownCancelAll", lambda c: c.futures_countdown_cancel_all
)
_USER_TRADES = _Endpoint("GET", "/fapi/v1/userTrades", lambda c: c.futures_account_trades)
_TICKER_PRICE = _Endpoint("GET", "/fapi/v2/ticker/price", lambda c: c.futures_symbol_ticker)
_POSITION_RISK = _Endpoint("GET", "/fapi/v3/positionRisk", lambda c: c.futures_position_information)
_BALANCE = _Endpoint("GET", "/fapi/v3/balance", lambda c: c.futures_account_balance)
_INCOME = _Endpoint("GET", "/fapi/v1/income", lambda c: c.futures_income_history)
_LISTEN_KEY = _Endpoint("POST", "/fapi/v1/listenKey", lambda c: c.futures_stream_get_listen_key)
_KEEP_LISTEN_KEY = _Endpoint("PUT", "/fapi/v1/listenKey", lambda c: c.futures_stream_keepalive)


class BinanceFutures:
    """The Binance venue; ``start`` must be awaited before anything else."""

    name = "binance"

    def __init__(self, settings: BinanceSettings, *, rng: random.Random | None = None) -> None:
        self._settings = settings
        self._client = _make_client(settings)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="binance")
        self._limiter: RateLimiter | None = None
        self._info: ExchangeInfo | None = None
        self._ban: Banned | None = None
        # Admission and sending under one lock: see _send_once.
        self._sending = asyncio.Lock()
        self._rng = rng or random.Random()
        self._last_error: str | None = None
        self._offset_ms = 0
        # Signed requests in a row that -1021 rejected after a resync, and the last answer.
        self._uncured_skews = 0
        self._last_skew = ""
        self._user_trades: UserTrades | None = None
        self._user_stream: asyncio.Task[None] | None = None

    @property
    def exchange_info(self) -> ExchangeInfo:
        if self._info is None:
            raise RuntimeError("BinanceFutures.start() has not run")
        return self._info

    @property
    def limiter(self) -> RateLimiter | None:
        return self._limiter

    @property
    def banned(self) -> Banned | None:
        return self._ban

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self, symbols: Sequence[str]) -> list[VenueOrder]:
        """Sync the clock, load limits and instruments, return our orders still open."""
        document, headers = await self._run(_EXCHANGE_INFO, {}, signed=False)
        self._limiter = await RateLimiter.create(
            LimiterConfig(
                rules=rules_from_exchange_info(document),
                egress_id=self._settings.egress_id,
                account_id=self._settings.credentials.account_id,
                replicas=self._settings.replicas,
                safety_margin=self._settings.safety_margin,
                redis_url=self._settings.redis_url,
            )
        )
        await self._limiter.observe(headers)
        self._info = ExchangeInfo.from_binance(document)
        await self.sync_time()
        if self._settings.user_stream:
            self._start_user_stream()
        return await self.open_orders(symbols)

    def _start_user_stream(self) -> None:
        self._user_trades = UserTrades(
            stream_base=stream_base_of(self._settings.base_url),
            listen_key=self._listen_key,
            keep_alive=self._keep_listen_key,
            wait_s=self._settings.user_stream_wait_s,
        )
        self._user_stream = asyncio.create_task(self._user_trades.run(), name="user-stream")

    async def _listen_key(self) -> str:
        return str(await self._request(_LISTEN_KEY, {}, signed=False, safe=True))

    async def _keep_listen_key(self, key: str) -> None:
        await self._request(_KEEP_LISTEN_KEY, {"listenKey": key}, signed=False, safe=True)

    async def refresh(self) -> None:
        """Reload instruments and filters (Binance changes them; an hourly reload suffices)."""
        document = await self._request(_EXCHANGE_INFO, {}, signed=False, safe=True)
        self._info = ExchangeInfo.from_binance(document)

    async def sync_time(self) -> None:
        """Keep ``server time - local time`` so signed timestamps land inside recvWindow."""
        limiter = self._limiter
        async with self._sending:  # never sent during a pause (see _send_once)
            if limiter is not None:  # None only for the very first sync, inside start()
                await limiter.acquire(request_cost(_TIME.method, _TIME.path, {}))
            before = time.time() * 1000  # bracket only the request, not the limiter's wait
            answer, headers = await self._run(_TIME, {}, signed=False)
            after = time.time() * 1000
        if limiter is not None:
            await limiter.observe(headers)
        offset = int(answer["serverTime"] - (before + after) / 2)
        self._client.timestamp_offset = offset
        self._offset_ms = offset
        CLOCK_OFFSET.set(offset)
        log.info("server time offset %d ms", offset)

    async def close(self) -> None:
        if self._user_stream is not None:
            self._user_stream.cancel()
            await asyncio.gather(self._user_stream, return_exceptions=True)
        if self._limiter is not None:
            await self._limiter.close()
        self._thread.shutdown(wait=False, cancel_futures=True)
        self._client.session.close()

    # --- orders ------------------------------------------------------------------------------

    async def place(self, order: OrderIntent, *, not_after_ms: int | None = None) -> VenueOrder:
        """Send one order (rounded and checked locally first); its final state for IOC. Not
        sent at all (``NotSent``) if ``not_after_ms`` passes while it waits to go out."""
        order = prepare_order(order, self.exchange_info.instrument(order.symbol))
        answer = await self._request(
            _NEW_ORDER, _order_params(order), signed=True, safe=False, not_after_ms=not_after_ms
        )
        try:
            return await self._with_fills(answer, order.side, order.reduce_only)
        except ExchangeError as exc:
            # Booked, but its trades could not be read: what it filled is not known yet, so
            # the caller must look it up (never report it failed, never send it again).
            raise OutcomeUnknown(
                f"order {answer.get('orderId')} booked, its trades not read: {exc}",
                status=exc.status,
                code=exc.code,
            ) from exc

    async def lookup(self, symbol: str, client_order_id: str) -> VenueOrder | None:
        params = {"symbol": symbol, "origClientOrderId": client_order_id}
        try:
            answer = await self._request(_GET_ORDER, params, signed=True, safe=True)
        except Rejected as exc:
            if exc.code == -2013:
                return None
            raise
        return await self._with_fills(answer, Side(answer["side"]), bool(answer.get("reduceOnly")))

    async def account(self) -> tuple[list[VenuePosition], Decimal]:
        """The account as the venue holds it: every non-zero position and the USDT wallet
        balance (``positionRisk`` and ``balance``, weight 5 each)."""
        risk = await self._request(_POSITION_RISK, {}, signed=True, safe=True)
        balances = await self._request(_BALANCE, {}, signed=True, safe=True)
        positions = [
            VenuePosition(
                symbol=str(row["symbol"]),
                quantity=Decimal(str(row["positionAmt"])),
                entry_price=Decimal(str(row["entryPrice"])),
                mark_price=Decimal(str(row["markPrice"])),
                unrealized_pnl=Decimal(str(row["unRealizedProfit"])),
            )
            for row in risk
            if Decimal(str(row["positionAmt"])) != 0
        ]
        usdt = [Decimal(str(b["balance"])) for b in balances if b.get("asset") == "USDT"]
        return positions, (usdt[0] if usdt else Decimal(0))

    async def income(self, *, start_ms: int, limit: int) -> list[VenueIncome]:
        """The account's income history from ``start_ms`` (inclusive), oldest first, at most
        ``limit`` (Binance: 1,000) entries; weight 30."""
        params = {"startTime": start_ms, "limit": limit}
        rows = await self._request(_INCOME, params, signed=True, safe=True)
        try:
            return [_income(row) for row in rows]
        except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
            raise ExchangeError(f"{_INCOME.path}: an entry that does not read: {exc!r}") from exc

    async def open_orders(self, symbols: Sequence[str]) -> list[VenueOrder]:
        orders = []
        for symbol in symbols:
            answer = await self._request(_OPEN_ORDERS, {"symbol": symbol}, signed=True, safe=True)
            for raw in answer:
                if str(raw.get("clientOrderId", "")).startswith(CLIENT_ORDER_PREFIX):
                    orders.append(await self._with_fills(raw, Side(raw["side"]), False))
        return orders

    async def cancel_all(self, symbols: Sequence[str]) -> int:
        cancelled = 0
        for symbol in symbols:
            open_now = await self._request(_OPEN_ORDERS, {"symbol": symbol}, signed=True, safe=True)
            if open_now:
                await self._request(_CANCEL_ALL, {"symbol": symbol}, signed=True, safe=True)
                cancelled += len(open_now)
        return cancelled

    async def arm_dead_man(self, symbols: Sequence[str], countdown_ms: int) -> None:
        for symbol in symbols:
            params = {"symbol": symbol, "countdownTime": countdown_ms}
            await self._request(_COUNTDOWN, params, signed=True, safe=True)

    def health(self) -> DependencyHealth:
        if self._ban is not None and self._ban.retry_at > time.time():
            return DependencyHealth(
                name="exchange",
                status=Status.CRITICAL,
                detail=f"Binance banned this IP until {_iso(self._ban.retry_at)}: {self._ban}",
            )
        if self._info is None:
            return DependencyHealth(
                name="exchange", status=Status.CRITICAL, detail="exchangeInfo not loaded yet"
            )
        if self._uncured_skews:
            return self._clock_health()
        if self._last_error is not None:
            return DependencyHealth(
                name="exchange", status=Status.DEGRADED, detail=f"last error: {self._last_error}"
            )
        return DependencyHealth(name="exchange", status=Status.OK, detail=self._settings.base_url)

    def _clock_health(self) -> DependencyHealth:
        critical = self._uncured_skews >= CLOCK_SKEW_CRITICAL_AFTER
        return DependencyHealth(
            name="exchange",
            status=Status.CRITICAL if critical else Status.DEGRADED,
            detail=f"clock skew: {self._uncured_skews} signed requests in a row rejected -1021 "
            f"after a resync (measured offset {self._offset_ms} ms, recvWindow "
            f"{self._settings.recv_window_ms} ms): {self._last_skew}"[:300],
        )

    def limiter_health(self) -> DependencyHealth:
        if self._limiter is None:
            return DependencyHealth(
                name="rate-limiter", status=Status.CRITICAL, detail="not started"
            )
        return self._limiter.health()

    # --- the one request path ----------------------------------------------------------------

    async def _request(
        self,
        endpoint: _Endpoint,
        params: Mapping[str, Any],
        *,
        signed: bool,
        safe: bool,
        not_after_ms: int | None = None,
    ) -> Any:
        limiter = self._limiter
        if limiter is None:
            raise RuntimeError("BinanceFutures.start() has not run")
        cost = request_cost(endpoint.method, endpoint.path, params)
        clock_resynced = False
        for attempt in range(self._settings.max_retries + 1):
            try:
                answer, headers = await self._send_once(
                    limiter, endpoint, params, cost, signed, not_after_ms
                )
            except Banned:
                REQUESTS.labels(endpoint.path, "banned").inc()
                raise
            except RateLimited as exc:
                REQUESTS.labels(endpoint.path, "rate_limited").inc()
                self._note(exc)
                await asyncio.sleep(self._backoff(attempt))  # spread the replicas' return
                continue  # not executed: try again once the pause is over
            except ClockSkew as exc:
                REQUESTS.labels(endpoint.path, "clock_skew").inc()
                CLOCK_REJECTIONS.inc()
                if clock_resynced:
                    self._note_uncured_skew(exc)
                    raise
                clock_resynced = True
                await self.sync_time()
                continue
            except Transient as exc:
                REQUESTS.labels(endpoint.path, "transient").inc()
                self._note(exc)
                if not (safe or _not_executed(exc)):
                    raise OutcomeUnknown(str(exc), status=exc.status, code=exc.code) from exc
                await asyncio.sleep(self._backoff(attempt))
                continue
            except ExchangeError:
                REQUESTS.labels(endpoint.path, "error").inc()
                raise
            REQUESTS.labels(endpoint.path, "ok").inc()
            await limiter.observe(headers)
            self._last_error = None
            if signed:  # only a signed request's timestamp is checked against Binance's clock
                self._uncured_skews = 0
            return answer
        raise Transient(f"{endpoint.method} {endpoint.path}: gave up after retries")

    async def _send_once(
        self,
        limiter: RateLimiter,
        endpoint: _Endpoint,
        params: Mapping[str, Any],
        cost: RequestCost,
        signed: bool,
        not_after_ms: int | None = None,
    ) -> tuple[Any, dict[str, str]]:
        """Admit one request and send it, and on a 429 or 418 set the pause, all under one lock.

        Requests go out one at a time on the client's thread anyway; the lock makes the next
        one wait for this one's answer before it is even admitted. Admitted first and queued
        for the thread instead, a request would go out after a 429 that paused everything,
        during the back-off, which is exactly what Binance answers with a 418 ban.
        """
        async with self._sending:
            self._refuse_while_banned()
            await limiter.acquire(cost)
            # Checked after the limiter's wait, the last moment before the request leaves.
            if not_after_ms is not None and time.time() * 1000 > not_after_ms:
                late_ms = int(time.time() * 1000) - not_after_ms
                raise NotSent(f"{endpoint.path}: not sent, its deadline passed {late_ms} ms ago")
            try:
                return await self._run(endpoint, params, signed=signed)
            except Banned as exc:
                self._ban = exc
                await limiter.pause_until(exc.retry_at, "banned")
                raise
            except RateLimited as exc:
                await limiter.pause_until(exc.retry_at, "rate_limited")
                raise

    async def _run(
        self, endpoint: _Endpoint, params: Mapping[str, Any], *, signed: bool
    ) -> tuple[Any, dict[str, str]]:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._thread, self._call, endpoint, dict(params))
        except ExchangeError as exc:
            if self._limiter is not None and exc.headers:
                await self._limiter.observe(exc.headers)
            raise

    def _call(self, endpoint: _Endpoint, params: dict[str, Any]) -> tuple[Any, dict[str, str]]:
        """On the client's thread: one HTTP request, its answer and headers, or a typed error."""
        try:
            answer = endpoint.call(self._client)(**params)
        except BinanceAPIException as exc:
            headers = dict(exc.response.headers) if exc.response is not None else {}
            error = classify(
                exc.status_code, exc.code or None, exc.message, headers, now=time.time()
            )
            error.headers = headers
            raise error from None
        except BinanceRequestException as exc:
            raise OutcomeUnknown(f"unreadable answer: {exc.message}") from None
        except requests.ConnectTimeout:
            raise Transient("network: connect timeout (nothing sent)") from None
        except requests.ConnectionError as exc:
            if _never_sent(exc):
                raise Transient(f"network: {exc}") from None
            raise _NetworkFailure(f"network: {type(exc).__name__} after sending") from None
        except requests.Timeout:
            raise _NetworkFailure(f"no answer within {self._settings.timeout_s} s") from None
        response = self._client.response
        headers = dict(response.headers) if response is not None else {}
        return answer, headers

    async def _with_fills(
        self, raw: Mapping[str, Any], side: Side, reduce_only: bool
    ) -> VenueOrder:
        order = _venue_order(raw)
        if order.executed_qty == 0:
            return order
        trades = await self._trades_of(order)
        prices = await self._fee_prices(trades)
        fills = tuple(_fill(t, order, side, reduce_only, prices) for t in trades)
        return VenueOrder(
            client_order_id=order.client_order_id,
            order_id=order.order_id,
            symbol=order.symbol,
            status=order.status,
            executed_qty=order.executed_qty,
            avg_price=order.avg_price,
            fills=fills,
        )

    async def _trades_of(self, order: VenueOrder) -> list[Mapping[str, Any]]:
        """The order's trades: from the user-data stream when it has them all, else REST."""
        stream = self._user_trades
        if stream is not None:
            streamed = await stream.trades_covering(order.client_order_id, order.executed_qty)
            if streamed is not None:
                TRADES_READ.labels("stream").inc()
                return list(streamed)
        TRADES_READ.labels("rest").inc()
        params = {"symbol": order.symbol, "orderId": int(order.order_id)}
        trades: list[Mapping[str, Any]] = await self._request(
            _USER_TRADES, params, signed=True, safe=True
        )
        return trades

    async def _fee_prices(self, trades: Sequence[Mapping[str, Any]]) -> dict[str, Decimal]:
        """The USDT price of each commission asset other than USDT (BNB, for an account that
        pays fees in it), read as the trades are: a fee is valued at the venue's price when it
        was charged, give or take the moment its trades took to read. A price that cannot be
        read leaves the fee unvalued (kept in its own asset, the equity said incomplete),
        never guessed."""
        assets = sorted({_fee_asset(t) for t in trades} - {SETTLEMENT_ASSET})
        prices: dict[str, Decimal] = {}
        for asset in assets:
            params = {"symbol": f"{asset}{SETTLEMENT_ASSET}"}
            try:
                answer = await self._request(_TICKER_PRICE, params, signed=False, safe=True)
                prices[asset] = Decimal(str(answer["price"]))
            except (ExchangeError, KeyError, TypeError, ArithmeticError) as exc:
                log.warning("no %s price to value fees in %s: %s", SETTLEMENT_ASSET, asset, exc)
        return prices

    def _refuse_while_banned(self) -> None:
        ban = self._ban
        if ban is not None and ban.retry_at > time.time():
            raise Banned(str(ban), retry_at=ban.retry_at, status=ban.status, code=ban.code)

    def _backoff(self, attempt: int) -> float:
        s = self._settings
        return full_jitter(attempt, base_s=s.backoff_base_s, cap_s=s.backoff_cap_s, rng=self._rng)

    def _note_uncured_skew(self, exc: ClockSkew) -> None:
        self._uncured_skews += 1
        self._last_skew = str(exc)[:200]
        log.error(
            "clock skew a resync did not cure (%d in a row, offset %d ms): %s",
            self._uncured_skews,
            self._offset_ms,
            exc,
        )

    def _note(self, exc: ExchangeError) -> None:
        self._last_error = f"{type(exc).__name__}: {exc}"[:200]
        log.warning("exchange: %s", self._last_error)


class _NetworkFailure(Transient):
    """The request may have been sent: a read may be repeated, a new order may not."""


def _not_executed(exc: Transient) -> bool:
    if isinstance(exc, _NetworkFailure) or exc.status in (408, 502):
        return False  # the order may be booked: ambiguous, look it up
    return exc.code == -1001 or any(m in exc.message.lower() for m in _NOT_EXECUTED_MESSAGES)


def _never_sent(exc: requests.ConnectionError) -> bool:
    """A refused or unresolvable connection: the request cannot have reached the exchange."""
    text = str(exc)
    return "NewConnectionError" in text or "Connection refused" in text


def _make_client(settings: BinanceSettings) -> Client:
    client = Client(
        settings.credentials.api_key,
        settings.credentials.api_secret,
        ping=False,
        requests_params={"timeout": settings.timeout_s},
    )
    base = settings.base_url.rstrip("/")
    client.FUTURES_URL = f"{base}/fapi"
    client.API_URL = f"{base}/api"
    client.REQUEST_RECVWINDOW = settings.recv_window_ms
    return client


def _order_params(order: OrderIntent) -> dict[str, Any]:
    params: dict[str, Any] = {
        "symbol": order.symbol,
        "side": order.side.value,
        "type": order.order_type.value,
        "quantity": format(order.quantity, "f"),
        "newClientOrderId": order.client_order_id,
        "newOrderRespType": "RESULT",
    }
    if order.order_type is OrderType.LIMIT:
        assert order.limit_price is not None  # OrderIntent validates this
        params["price"] = format(order.limit_price, "f")
        params["timeInForce"] = "IOC"
    if order.reduce_only:
        params["reduceOnly"] = "true"
    return params


def _venue_order(raw: Mapping[str, Any]) -> VenueOrder:
    return VenueOrder(
        client_order_id=str(raw["clientOrderId"]),
        order_id=str(raw["orderId"]),
        symbol=str(raw["symbol"]),
        status=_STATUS.get(str(raw["status"]), OrderStatus.UNKNOWN),
        executed_qty=Decimal(str(raw.get("executedQty", "0"))),
        avg_price=Decimal(str(raw.get("avgPrice", "0"))),
    )


def binance_fill_id(symbol: str, trade_id: object) -> str:
    """A Binance trade's fill id: the venue's trade ids are unique per symbol."""
    return f"binance-{symbol}-{trade_id}"


def _fill(
    trade: Mapping[str, Any],
    order: VenueOrder,
    side: Side,
    reduce_only: bool,
    fee_prices: Mapping[str, Decimal],
) -> Fill:
    fee, asset = Decimal(str(trade["commission"])), _fee_asset(trade)
    price = fee_prices.get(asset)
    return Fill(
        fill_id=binance_fill_id(order.symbol, trade["id"]),
        client_order_id=order.client_order_id,
        symbol=order.symbol,
        side=side,
        quantity=Decimal(str(trade["qty"])),
        price=Decimal(str(trade["price"])),
        fee=fee,
        fee_asset=asset,
        fee_usdt=None if asset == SETTLEMENT_ASSET or price is None else fee * price,
        reduce_only=reduce_only,
        ts_ms=int(trade["time"]),
    )


def _fee_asset(trade: Mapping[str, Any]) -> str:
    return str(trade.get("commissionAsset", SETTLEMENT_ASSET))


def _income(row: Mapping[str, Any]) -> VenueIncome:
    return VenueIncome(
        tran_id=str(row["tranId"]),
        income_type=str(row["incomeType"]),
        amount=Decimal(str(row["income"])),
        asset=str(row["asset"]),
        symbol=str(row.get("symbol") or ""),
        time_ms=int(row["time"]),
        info=str(row.get("info") or ""),
    )


def _iso(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))
