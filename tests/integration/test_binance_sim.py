"""The Binance USD-M futures simulator, driven by the real python-binance client over HTTP.

Each test gets a fresh server on a free loopback port, run in a background thread with its own
event loop (python-binance's client is synchronous); the admin API is used over httpx. Limits use
1-second windows and tiny limits so nothing waits for minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests

with warnings.catch_warnings():
    # python-binance imports websockets' legacy client, deprecated at import time (not ours).
    warnings.filterwarnings("ignore", r"websockets\..* is deprecated", DeprecationWarning)
    from binance import Client
    from binance.exceptions import BinanceAPIException

from qtrader.exchange.limits import request_cost, rules_from_exchange_info
from qtrader.instruments import ExchangeInfo
from qtrader_tools.simulators.binance_futures import (
    BinanceFuturesSim,
    SimAdmin,
    SimAdminError,
    SimConfig,
)
from support.binance_sim import sim_in_thread

pytestmark = pytest.mark.integration

KEY, SECRET = "sim-key", "sim-secret"
OTHER_KEY, OTHER_SECRET = "other-key", "other-secret"
KEYS = {KEY: SECRET, OTHER_KEY: OTHER_SECRET}


class Sim:
    """A running simulator plus the clients a test opened on it (closed at teardown)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.admin = SimAdmin(url)
        self._clients: list[Client] = []

    def client(
        self, key: str = KEY, secret: str = SECRET, *, ip: str | None = None, timeout: float = 5
    ) -> Client:
        client = Client(key, secret, ping=False, requests_params={"timeout": timeout})
        client.FUTURES_URL = f"{self.url}/fapi"
        client.API_URL = f"{self.url}/api"
        if ip is not None:
            client.session.headers["X-Sim-Client-IP"] = ip
        self._clients.append(client)
        return client

    def close(self) -> None:
        for client in self._clients:
            client.close_connection()
        self.admin.close()


@pytest.fixture
def sim() -> Iterator[Sim]:
    with sim_in_thread(SimConfig(api_keys=KEYS, client_ip_header=True)) as url:
        running = Sim(url)
        try:
            yield running
        finally:
            running.close()


def api_error(call: Any, *args: Any, **kwargs: Any) -> BinanceAPIException:
    with pytest.raises(BinanceAPIException) as caught:
        call(*args, **kwargs)
    return caught.value


def used_weight(client: Client) -> int:
    return int(client.response.headers["X-MBX-USED-WEIGHT-1M"])


# --- exchangeInfo, signatures, timestamps ---------------------------------------------------------


async def test_runs_in_the_test_loop_and_exchange_info_reflects_the_configured_limits() -> None:
    limits = [
        {"rateLimitType": "REQUEST_WEIGHT", "interval": "SECOND", "intervalNum": 1, "limit": 50},
        {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 1, "limit": 7},
        {"rateLimitType": "ORDERS", "interval": "MINUTE", "intervalNum": 1, "limit": 90},
    ]
    server = BinanceFuturesSim(SimConfig.from_dict({"rate_limits": limits}))
    url = await server.start()
    client = Client(KEY, SECRET, ping=False)
    client.FUTURES_URL = f"{url}/fapi"
    try:
        info = await asyncio.to_thread(client.futures_exchange_info)
    finally:
        client.close_connection()
        await server.stop()
    assert info["rateLimits"] == limits
    assert [rule.as_binance() for rule in rules_from_exchange_info(info)] == limits
    assert len(ExchangeInfo.from_binance(info).instruments) == 20
    assert abs(info["serverTime"] - time.time() * 1000) < 5_000


def test_api_key_and_signature_are_checked(sim: Sim) -> None:
    wrong_secret = api_error(sim.client(KEY, "not-the-secret").futures_account)
    assert (wrong_secret.status_code, wrong_secret.code) == (400, -1022)
    unknown_key = api_error(sim.client("nobody", SECRET).futures_account)
    assert (unknown_key.status_code, unknown_key.code) == (401, -2015)
    no_key = httpx.get(f"{sim.url}/fapi/v2/account", params={"timestamp": now_ms()})
    assert (no_key.status_code, no_key.json()["code"]) == (401, -2014)

    # Binance's documented form: totalParams in the order sent, query then body, unsorted.
    query = "symbol=BTCUSDT&timestamp=" + str(now_ms())
    body = "type=MARKET&side=BUY&quantity=1&newOrderRespType=RESULT"
    signature = hmac.new(SECRET.encode(), (query + body).encode(), hashlib.sha256).hexdigest()
    headers = {"X-MBX-APIKEY": KEY, "Content-Type": "application/x-www-form-urlencoded"}
    url = f"{sim.url}/fapi/v1/order?{query}"
    signed = httpx.post(url, content=f"{body}&signature={signature}", headers=headers)
    assert (signed.status_code, signed.json()["status"]) == (200, "FILLED")
    tampered = httpx.post(url, content=f"{body}0&signature={signature}", headers=headers)
    assert (tampered.status_code, tampered.json()["code"]) == (400, -1022)

    sim.admin.config(check_signature=False)
    assert sim.client(KEY, "not-the-secret").futures_account()["canTrade"] is True


def test_timestamps_outside_the_window_or_ahead_are_refused(sim: Sim) -> None:
    client = sim.client()
    sim.admin.clock(skew_ms=-3_000)  # the client is 3 s ahead of the server
    ahead = api_error(client.futures_account)
    assert (ahead.status_code, ahead.code) == (400, -1021)
    assert "ahead" in ahead.message
    sim.admin.clock(skew_ms=11_000)  # 11 s behind; python-binance sends recvWindow=10000
    late = api_error(client.futures_account)
    assert (late.code, late.message) == (
        -1021,
        "Timestamp for this request is outside of the recvWindow.",
    )
    client.REQUEST_RECVWINDOW = None  # no recvWindow: the server's default of 5000 applies
    sim.admin.clock(skew_ms=6_000)
    assert api_error(client.futures_account).code == -1021
    sim.admin.clock(skew_ms=4_000)
    assert client.futures_account()["canTrade"] is True

    client.REQUEST_RECVWINDOW = 10_000
    sim.admin.clock(skew_ms=-3_000)
    client.timestamp_offset = client.futures_time()["serverTime"] - now_ms()  # resync
    assert client.futures_account()["canTrade"] is True


def test_reported_time_offset_makes_a_skew_no_resync_cures(sim: Sim) -> None:
    client = sim.client()
    sim.admin.clock(skew_ms=-20_000)  # the checking clock is 20 s behind ours ...
    assert sim.admin.report_time_offset(20_000) == 20_000  # ... the time reported is not
    reported = client.futures_time()["serverTime"]
    assert abs(reported - now_ms()) < 1_000
    client.timestamp_offset = reported - now_ms()  # a resync measures about 0
    assert api_error(client.futures_account).code == -1021
    sim.admin.report_time_offset(0)
    client.timestamp_offset = client.futures_time()["serverTime"] - now_ms()
    assert client.futures_account()["canTrade"] is True
    sim.admin.report_time_offset(5_000)
    sim.admin.reset()  # a reset clears the offset too
    assert abs(client.futures_time()["serverTime"] - now_ms()) < 1_000


# --- weights, headers, 429 and 418 ----------------------------------------------------------------


def test_every_request_is_charged_its_documented_weight_and_reported_in_headers(sim: Sim) -> None:
    sim.admin.config(window_mode="sliding")  # no window boundary can fall inside the test
    client = sim.client()
    order = {"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC"}
    calls: list[tuple[str, str, dict[str, str], Any]] = [
        ("GET", "/fapi/v1/ping", {}, client.futures_ping),
        ("GET", "/fapi/v1/time", {}, client.futures_time),
        ("GET", "/fapi/v1/exchangeInfo", {}, client.futures_exchange_info),
        ("GET", "/fapi/v1/openOrders", {"symbol": "BTCUSDT"}, client.futures_get_open_orders),
        ("GET", "/fapi/v1/openOrders", {}, client.futures_get_open_orders),
        ("GET", "/fapi/v2/account", {}, client.futures_account),
        ("GET", "/fapi/v1/userTrades", {"symbol": "BTCUSDT"}, client.futures_account_trades),
        (
            "POST",
            "/fapi/v1/countdownCancelAll",
            {"symbol": "BTCUSDT", "countdownTime": "0"},
            client.futures_countdown_cancel_all,
        ),
        (
            "POST",
            "/fapi/v1/order",
            {**order, "quantity": "2", "price": "90"},
            client.futures_create_order,
        ),
        (
            "POST",
            "/fapi/v1/order",
            {**order, "quantity": "2", "price": "91"},
            client.futures_create_order,
        ),
        ("GET", "/fapi/v1/order", {"symbol": "BTCUSDT", "orderId": "1"}, client.futures_get_order),
        (
            "DELETE",
            "/fapi/v1/order",
            {"symbol": "BTCUSDT", "orderId": "1"},
            client.futures_cancel_order,
        ),
        (
            "DELETE",
            "/fapi/v1/allOpenOrders",
            {"symbol": "BTCUSDT"},
            client.futures_cancel_all_open_orders,
        ),
    ]
    weight = orders = 0
    for method, path, params, call in calls:
        call(**params)
        cost = request_cost(method, path, params)
        weight, orders = weight + cost.weight, orders + cost.orders
        assert used_weight(client) == weight, (method, path)
        if (method, path) == ("POST", "/fapi/v1/order"):
            assert client.response.headers["X-MBX-ORDER-COUNT-10S"] == str(orders)
            assert client.response.headers["X-MBX-ORDER-COUNT-1M"] == str(orders)
        else:
            assert "X-MBX-ORDER-COUNT-10S" not in client.response.headers
    assert weight == 1 + 1 + 1 + 1 + 40 + 5 + 5 + 10 + 0 + 0 + 1 + 1 + 1  # the table itself
    log = sim.admin.log()
    assert [(e["method"], e["path"]) for e in log] == [(m, p) for m, p, _, _ in calls]
    assert sum(e["weight"] for e in log) == weight
    assert sum(e["orders"] for e in log) == orders == 2
    assert httpx.get(f"{sim.url}/fapi/v1/nothing").status_code == 404


def test_a_429_then_traffic_during_the_back_off_gets_a_418_ban_that_doubles(sim: Sim) -> None:
    sim.admin.config(
        rate_limits=[
            {"rateLimitType": "REQUEST_WEIGHT", "interval": "SECOND", "intervalNum": 1, "limit": 4},
            {"rateLimitType": "ORDERS", "interval": "MINUTE", "intervalNum": 1, "limit": 100},
        ],
        window_mode="sliding",
        ban_base_s=0.5,
    )
    client, other_ip = sim.client(ip="10.0.0.1"), sim.client(ip="10.0.0.2")
    ban_ends = []
    for _ in range(2):  # the second round shows the ban doubling
        for _ in range(4):
            client.futures_ping()
        limited = api_error(client.futures_ping)
        assert (limited.status_code, limited.code) == (429, -1003)
        assert limited.response.headers["Retry-After"] == "1"
        assert limited.response.headers["X-MBX-USED-WEIGHT-1S"] == "4"
        banned = api_error(client.futures_ping)  # did not back off
        assert (banned.status_code, banned.code) == (418, -1003)
        ban_ends.append(
            int(
                re.match(r"Way too many requests; IP banned until (\d+)\.", banned.message).group(1)
            )
        )
        again = api_error(client.futures_ping)
        assert again.status_code == 418
        assert f"banned until {ban_ends[-1]}." in again.message
        assert again.response.headers["Retry-After"] == "1"
        other_ip.futures_ping()  # weight and bans are per IP
        time.sleep(max(0, ban_ends[-1] - now_ms()) / 1000 + 1.05)  # ban over, window empty

    log = [e for e in sim.admin.log() if e["ip"] == "10.0.0.1"]
    starts = [e for i, e in enumerate(log) if e["status"] == 418 and log[i - 1]["status"] == 429]
    assert [end - e["t_ms"] for end, e in zip(ban_ends, starts, strict=True)] == [500, 1000]
    assert all(not e["admitted"] and e["weight"] == 0 for e in log if e["status"] in (418, 429))
    windows = sim.admin.windows()
    weight = rule(windows, "REQUEST_WEIGHT:1S")
    assert weight["subjects"]["10.0.0.1"] == {"configured": 4, "sliding": 4}
    assert weight["subjects"]["10.0.0.2"]["configured"] == 1  # one ping per round, 1 s apart
    assert windows["ips"]["10.0.0.1"]["bans"] == 2
    client.futures_ping()  # the ban is over


def test_orders_are_limited_per_api_key(sim: Sim) -> None:
    sim.admin.config(
        rate_limits=[
            {
                "rateLimitType": "REQUEST_WEIGHT",
                "interval": "MINUTE",
                "intervalNum": 1,
                "limit": 99,
            },
            {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 1, "limit": 2},
        ],
        window_mode="sliding",
    )
    client, other_key = sim.client(), sim.client(OTHER_KEY, OTHER_SECRET)
    order = {"symbol": "BTCUSDT", "side": "BUY", "type": "MARKET", "quantity": "1"}
    client.futures_create_order(**order)
    client.futures_create_order(**order)
    limited = api_error(client.futures_create_order, **order)
    assert (limited.status_code, limited.code) == (429, -1015)
    assert limited.response.headers["Retry-After"] == "1"
    other_key.futures_create_order(**order)  # another account has its own order count
    client.futures_account()  # reads from the same IP are not part of an orders back-off
    assert api_error(client.futures_create_order, **order).status_code == 418
    windows = rule(sim.admin.windows(), "ORDERS:1S")
    assert windows["subjects"] == {
        KEY: {"configured": 2, "sliding": 2},
        OTHER_KEY: {"configured": 1, "sliding": 1},
    }


def test_the_window_audit_reports_the_most_admitted_per_window(sim: Sim) -> None:
    sim.admin.config(
        rate_limits=[
            {"rateLimitType": "REQUEST_WEIGHT", "interval": "SECOND", "intervalNum": 1, "limit": 3},
            {"rateLimitType": "ORDERS", "interval": "MINUTE", "intervalNum": 1, "limit": 100},
        ],
        window_mode="fixed",
    )
    client = sim.client()
    sleep_until_ms_in_second(600)  # 3 requests late in one fixed window ...
    for _ in range(3):
        client.futures_ping()
    sleep_until_ms_in_second(50)  # ... and 3 early in the next one
    for _ in range(3):
        client.futures_ping()
    log = sim.admin.log()
    assert all(e["status"] == 200 for e in log)
    per_fixed_window: dict[int, int] = {}
    for entry in log:
        window = entry["t_ms"] // 1000
        per_fixed_window[window] = per_fixed_window.get(window, 0) + entry["weight"]
    weight = rule(sim.admin.windows(), "REQUEST_WEIGHT:1S")
    assert weight["max_configured"] == max(per_fixed_window.values()) == 3
    assert weight["max_sliding"] == brute_force_sliding_max(log, 1000)
    assert weight["max_sliding"] > weight["limit"]  # what a fixed window lets through


# --- matching -------------------------------------------------------------------------------------


def test_market_ioc_fok_and_gtc_orders_match_against_the_set_price(sim: Sim) -> None:
    client = sim.client()
    sim.admin.price("BTCUSDT", "100")
    market = client.futures_create_order(
        symbol="BTCUSDT", side="BUY", type="MARKET", quantity="1.5", newOrderRespType="RESULT"
    )
    assert (market["status"], market["avgPrice"], market["cumQuote"]) == ("FILLED", "100", "150")
    ack = client.futures_create_order(symbol="BTCUSDT", side="BUY", type="MARKET", quantity="1")
    assert (ack["status"], ack["executedQty"]) == ("NEW", "0")  # ACK is the default
    assert client.futures_get_order(symbol="BTCUSDT", orderId=ack["orderId"])["status"] == "FILLED"

    limit = {"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "newOrderRespType": "RESULT"}
    ioc = client.futures_create_order(**limit, timeInForce="IOC", quantity="2", price="99.9")
    assert (ioc["status"], ioc["executedQty"]) == ("EXPIRED", "0")
    gtc = client.futures_create_order(**limit, timeInForce="GTC", quantity="2", price="95")
    assert gtc["status"] == "NEW"
    assert [o["orderId"] for o in client.futures_get_open_orders(symbol="BTCUSDT")] == [
        gtc["orderId"]
    ]
    moved = sim.admin.price("BTCUSDT", "94.5")
    assert [o["orderId"] for o in moved["filled"]] == [gtc["orderId"]]
    filled = client.futures_get_order(symbol="BTCUSDT", orderId=gtc["orderId"])
    assert (filled["status"], filled["avgPrice"], filled["executedQty"]) == ("FILLED", "95", "2")
    maker = client.futures_account_trades(symbol="BTCUSDT", orderId=gtc["orderId"])
    assert [(t["price"], t["qty"], t["maker"], t["commission"]) for t in maker] == [
        ("95", "2", True, "0.038")  # 190 x the maker fee 0.0002
    ]

    sim.admin.price("SOLUSDT", "20")
    sim.admin.partial("SOLUSDT", "0.5", 3)
    sol = {"symbol": "SOLUSDT", "side": "BUY", "newOrderRespType": "RESULT"}
    fok = client.futures_create_order(
        **sol, type="LIMIT", timeInForce="FOK", quantity="4", price="21"
    )
    assert (fok["status"], fok["executedQty"]) == ("EXPIRED", "0")  # all or nothing
    part = client.futures_create_order(**sol, type="MARKET", quantity="3")
    assert (part["status"], part["executedQty"]) == ("EXPIRED", "1")  # 1.5 rounded down
    rest = client.futures_create_order(
        **sol, type="LIMIT", timeInForce="GTC", quantity="4", price="20"
    )
    assert (rest["status"], rest["executedQty"]) == ("PARTIALLY_FILLED", "2")
    full = client.futures_create_order(**sol, type="MARKET", quantity="3")  # partial used up
    assert (full["status"], full["executedQty"]) == ("FILLED", "3")
    sim.admin.price("SOLUSDT", "19.5")
    assert client.futures_get_order(symbol="SOLUSDT", orderId=rest["orderId"])["status"] == "FILLED"
    position = {p["symbol"]: p for p in client.futures_account()["positions"]}
    assert position["SOLUSDT"]["positionAmt"] == "8"  # 1 + 2 + 3 + the resting 2
    assert position["BTCUSDT"]["positionAmt"] == "4.5"


def test_user_trades_carry_the_taker_commission_rounded_half_up(sim: Sim) -> None:
    fee = Decimal("0.00037777")
    sim.admin.config(taker_fee=str(fee))
    sim.admin.price("SOLUSDT", "123.45")
    client = sim.client()
    order = client.futures_create_order(symbol="SOLUSDT", side="SELL", type="MARKET", quantity="1")
    trades = client.futures_account_trades(symbol="SOLUSDT")
    assert len(trades) == 1
    trade = trades[0]
    assert trade["orderId"] == order["orderId"]
    assert (trade["side"], trade["buyer"], trade["maker"]) == ("SELL", False, False)
    assert (trade["price"], trade["qty"], trade["quoteQty"]) == ("123.45", "1", "123.45")
    assert Decimal(trade["commission"]) == (Decimal("123.45") * fee).quantize(
        Decimal("1e-8"), rounding=ROUND_HALF_UP
    )
    assert trade["commission"] == "0.04663571"  # 0.0466357065 rounded half up
    assert (trade["commissionAsset"], trade["realizedPnl"]) == ("USDT", "0")


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"symbol": "FOOUSDT", "type": "MARKET", "quantity": "1"}, -1121),
        (
            {
                "symbol": "BTCUSDT",
                "type": "LIMIT",
                "timeInForce": "GTC",
                "quantity": "1",
                "price": "100.05",
            },
            -4014,
        ),  # 2 decimals as listed ("0.10"), off the 0.1 grid
        (
            {
                "symbol": "BTCUSDT",
                "type": "LIMIT",
                "timeInForce": "GTC",
                "quantity": "1",
                "price": "100.001",
            },
            -1111,
        ),
        (
            {
                "symbol": "UNIUSDT",
                "type": "LIMIT",
                "timeInForce": "GTC",
                "quantity": "100",
                "price": "5.1234",
            },
            -4014,
        ),
        ({"symbol": "BTCUSDT", "type": "MARKET", "quantity": "1.0005"}, -1111),
        (
            {
                "symbol": "BTCUSDT",
                "type": "MARKET",
                "quantity": "1",
                "newClientOrderId": "no spaces",
            },
            -4015,
        ),
        (
            {"symbol": "BTCUSDT", "type": "MARKET", "quantity": "1", "newClientOrderId": "x" * 37},
            -4015,
        ),
        ({"symbol": "BTCUSDT", "type": "MARKET", "quantity": "0.5"}, -4164),
        ({"symbol": "BTCUSDT", "type": "MARKET", "quantity": "1", "reduceOnly": "true"}, -2022),
        ({"symbol": "BTCUSDT", "type": "MARKET", "quantity": "3000"}, -2019),
        ({"symbol": "BTCUSDT", "type": "MARKET", "quantity": "1", "timeInForce": "GTC"}, -1106),
        ({"symbol": "BTCUSDT", "type": "LIMIT", "quantity": "1", "price": "100"}, -1102),
        ({"symbol": "BTCUSDT", "type": "LIMIT_MAKER", "quantity": "1"}, -1116),
    ],
)
def test_invalid_orders_are_refused_with_binances_codes(
    sim: Sim, params: dict[str, str], code: int
) -> None:
    refused = api_error(sim.client().futures_create_order, side="BUY", **params)
    assert (refused.status_code, refused.code) == (400, code)
    assert sim.admin.orders() == []


def test_reduce_only_and_client_id_rules(sim: Sim) -> None:
    client = sim.client()
    client.futures_create_order(symbol="BTCUSDT", side="BUY", type="MARKET", quantity="2")
    small = client.futures_create_order(
        symbol="BTCUSDT",
        side="SELL",
        type="MARKET",
        quantity="0.5",
        reduceOnly="true",
        newOrderRespType="RESULT",
    )  # notional 50 < 100: allowed because it only reduces
    assert small["status"] == "FILLED"
    flip = api_error(
        client.futures_create_order,
        symbol="BTCUSDT",
        side="SELL",
        type="MARKET",
        quantity="2",
        reduceOnly="true",
    )
    assert flip.code == -2022  # would flip the 1.5 long
    increase = api_error(
        client.futures_create_order,
        symbol="BTCUSDT",
        side="BUY",
        type="MARKET",
        quantity="1",
        reduceOnly="true",
    )
    assert increase.code == -2022

    resting = {
        "symbol": "BTCUSDT",
        "side": "BUY",
        "type": "LIMIT",
        "timeInForce": "GTC",
        "quantity": "2",
        "price": "90",
        "newClientOrderId": "open-1",
    }
    client.futures_create_order(**resting)
    duplicate = api_error(client.futures_create_order, **resting)
    assert duplicate.code == -4116
    assert client.futures_cancel_order(symbol="BTCUSDT", origClientOrderId="open-1")["status"] == (
        "CANCELED"
    )
    assert api_error(client.futures_cancel_order, symbol="BTCUSDT", orderId=999).code == -2011
    missing = api_error(client.futures_get_order, symbol="BTCUSDT", origClientOrderId="nope")
    assert (missing.status_code, missing.code) == (400, -2013)
    other = sim.client(OTHER_KEY, OTHER_SECRET)  # orders are private to their account
    assert api_error(other.futures_get_order, symbol="BTCUSDT", orderId=1).code == -2013


def test_margin_counts_resting_orders_until_they_close(sim: Sim) -> None:
    sim.admin.config(balance="150", leverage=1)
    client = sim.client()
    market = {"symbol": "BTCUSDT", "side": "BUY", "type": "MARKET", "quantity": "1"}
    client.futures_create_order(
        symbol="BTCUSDT", side="BUY", type="LIMIT", timeInForce="GTC", quantity="1.2", price="90"
    )  # reserves 108 of the 150
    assert api_error(client.futures_create_order, **market).code == -2019  # needs 100 more
    client.futures_cancel_all_open_orders(symbol="BTCUSDT")
    assert client.futures_create_order(**market, newOrderRespType="RESULT")["status"] == "FILLED"
    account = client.futures_account()
    assert account["totalWalletBalance"] == "149.96"  # 150 - the 0.04 taker commission
    assert account["availableBalance"] == "49.96"  # minus the position's 100 of margin


def test_a_client_id_reused_after_its_order_is_final_makes_a_second_order(sim: Sim) -> None:
    client = sim.client()
    order = {
        "symbol": "BTCUSDT",
        "side": "BUY",
        "type": "MARKET",
        "quantity": "1",
        "newClientOrderId": "intent-42",
    }
    first = client.futures_create_order(**order)
    second = client.futures_create_order(**order)  # accepted: Binance only checks open orders
    assert second["orderId"] == first["orderId"] + 1
    found = client.futures_get_order(symbol="BTCUSDT", origClientOrderId="intent-42")
    assert found["orderId"] == second["orderId"]  # the newest with that id
    assert [o["clientOrderId"] for o in sim.admin.orders()] == ["intent-42", "intent-42"]
    assert len(sim.admin.trades()) == 2  # the client traded twice: it must never do this


# --- faults ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "status", "code"),
    [
        ("booked_then_503_unknown", 503, -1000),
        ("booked_then_1006", 500, -1006),
        ("booked_then_1007", 500, -1007),
        ("booked_then_reset", None, None),
        ("booked_then_hang", None, None),
    ],
)
def test_booked_then_failed_leaves_the_order_on_the_exchange(
    sim: Sim, kind: str, status: int | None, code: int | None
) -> None:
    sim.admin.faults([{"route": "POST /fapi/v1/order", "kind": kind, "next": 1, "hang_s": 3}])
    client = sim.client(timeout=0.5)
    order = {
        "symbol": "BTCUSDT",
        "side": "BUY",
        "type": "MARKET",
        "quantity": "1",
        "newClientOrderId": f"c-{kind}",
    }
    if status is None:
        with pytest.raises(requests.RequestException):
            client.futures_create_order(**order)
    else:
        failed = api_error(client.futures_create_order, **order)
        assert (failed.status_code, failed.code) == (status, code)
        if status == 503:
            assert failed.message == "Unknown error, please check your request or try again later."
    booked = client.futures_get_order(symbol="BTCUSDT", origClientOrderId=f"c-{kind}")
    assert booked["status"] == "FILLED"
    assert len(sim.admin.orders()) == 1
    entry = next(e for e in sim.admin.log() if e["path"] == "/fapi/v1/order")
    assert (entry["fault"], entry["status"]) == (kind, status)


@pytest.mark.parametrize(
    ("kind", "status", "code"),
    [
        ("unavailable_503", 503, -1008),
        ("internal_503", 503, -1001),
        ("http_408", 408, 0),
        ("html_502", 502, 0),
        ("hang_before_booking", None, None),
    ],
)
def test_faults_before_booking_leave_nothing_on_the_exchange(
    sim: Sim, kind: str, status: int | None, code: int | None
) -> None:
    sim.admin.faults([{"route": "POST /fapi/v1/order", "kind": kind, "next": 1, "hang_s": 3}])
    client = sim.client(timeout=0.5)
    order = {
        "symbol": "BTCUSDT",
        "side": "BUY",
        "type": "MARKET",
        "quantity": "1",
        "newClientOrderId": f"c-{kind}",
    }
    if status is None:
        with pytest.raises(requests.RequestException):
            client.futures_create_order(**order)
    else:
        failed = api_error(client.futures_create_order, **order)
        assert (failed.status_code, failed.code) == (status, code)
    missing = api_error(client.futures_get_order, symbol="BTCUSDT", origClientOrderId=f"c-{kind}")
    assert missing.code == -2013
    assert sim.admin.orders() == []
    assert client.futures_create_order(**order)["status"] == "NEW"  # the fault was used up


def test_fault_triggers_modifiers_and_injected_rate_limits(sim: Sim) -> None:
    client = sim.client()
    sim.admin.faults(
        [
            {
                "route": "GET /fapi/v1/ping",
                "kind": "wrong_weight_headers",
                "every": 2,
                "value": 777,
            },
            {"route": "GET /fapi/v1/time", "kind": "no_weight_headers", "next": 1},
            {
                "route": "*",
                "kind": "error_code",
                "next": 1,
                "status": 400,
                "code": -1099,
                "msg": "custom",
            },
        ]
    )
    assert api_error(client.futures_ping).code == -1099  # "*" matches; the modifier counts too
    client.futures_ping()
    assert client.response.headers["X-MBX-USED-WEIGHT-1M"] == "777"  # every 2nd ping
    client.futures_ping()
    assert client.response.headers["X-MBX-USED-WEIGHT-1M"] == "3"
    client.futures_time()
    assert "X-MBX-USED-WEIGHT-1M" not in client.response.headers
    assert [f["fired"] for f in sim.admin.get_faults()] == [1, 1, 1]

    def pattern() -> list[str | None]:
        sim.admin.reset()
        sim.admin.faults(
            [{"route": "GET /fapi/v1/ping", "kind": "internal_503", "probability": 0.5, "seed": 7}]
        )
        for _ in range(12):
            with contextlib.suppress(BinanceAPIException):
                client.futures_ping()
        return [e["fault"] for e in sim.admin.log()]

    first = pattern()
    assert first == pattern()  # seeded: the same requests fail on every run
    assert 0 < first.count("internal_503") < 12

    sim.admin.reset()
    sim.admin.faults(
        [{"route": "GET /fapi/v1/ping", "kind": "http_429", "next": 1, "retry_after_s": 1}]
    )
    limited = api_error(client.futures_ping)
    assert (limited.status_code, limited.response.headers["Retry-After"]) == (429, "1")
    assert api_error(client.futures_time).status_code == 418  # ignored the injected 429
    sim.admin.reset()
    sim.admin.faults([{"route": "*", "kind": "http_418", "next": 1, "retry_after_s": 5}])
    banned = api_error(client.futures_ping)
    assert (banned.status_code, banned.response.headers["Retry-After"]) == (418, "5")
    assert int(api_error(client.futures_time).response.headers["Retry-After"]) in (4, 5)


def test_bad_admin_input_is_refused_with_the_reason(sim: Sim) -> None:
    with pytest.raises(SimAdminError, match="unknown fault kind"):
        sim.admin.faults([{"route": "*", "kind": "explode", "next": 1}])
    with pytest.raises(SimAdminError, match="exactly one trigger"):
        sim.admin.faults([{"route": "*", "kind": "http_408"}])
    with pytest.raises(SimAdminError, match="unknown config field"):
        sim.admin.config(rate_limit=[])
    with pytest.raises(SimAdminError, match="REQUEST_WEIGHT and an ORDERS rule"):
        sim.admin.config(rate_limits=[])
    with pytest.raises(SimAdminError, match="Invalid symbol"):
        sim.admin.price("FOOUSDT", "1")


# --- countdownCancelAll ---------------------------------------------------------------------------


def test_countdown_cancels_resting_orders_only_when_not_refreshed(sim: Sim) -> None:
    client = sim.client()
    resting = {
        "symbol": "BTCUSDT",
        "side": "BUY",
        "type": "LIMIT",
        "timeInForce": "GTC",
        "quantity": "2",
        "price": "90",
    }
    kept = client.futures_create_order(**resting)
    client.futures_countdown_cancel_all(symbol="BTCUSDT", countdownTime=300)
    client.futures_countdown_cancel_all(symbol="BTCUSDT", countdownTime=0)  # stops it
    time.sleep(0.6)
    assert client.futures_get_order(symbol="BTCUSDT", orderId=kept["orderId"])["status"] == "NEW"

    answer = client.futures_countdown_cancel_all(symbol="BTCUSDT", countdownTime=1000)
    assert answer == {"symbol": "BTCUSDT", "countdownTime": "1000"}
    for _ in range(6):  # refreshed every 0.25 s: 1.5 s in all, longer than the countdown
        time.sleep(0.25)
        client.futures_countdown_cancel_all(symbol="BTCUSDT", countdownTime=1000)
    assert client.futures_get_order(symbol="BTCUSDT", orderId=kept["orderId"])["status"] == "NEW"
    assert [c["symbol"] for c in sim.admin.countdowns()] == ["BTCUSDT"]

    deadline = time.monotonic() + 5
    while client.futures_get_order(symbol="BTCUSDT", orderId=kept["orderId"])["status"] == "NEW":
        assert time.monotonic() < deadline, "the countdown never fired"
        time.sleep(0.1)
    assert client.futures_get_open_orders(symbol="BTCUSDT") == []
    assert sim.admin.countdowns() == []


# --- the command line -----------------------------------------------------------------------------


def test_cli_prints_one_line_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    config = tmp_path / "sim.json"
    config.write_text('{"balance": "555", "window_mode": "sliding"}')
    command = [
        sys.executable,
        "-m",
        "qtrader_tools.simulators.binance_futures",
        "--port",
        "0",
        "--config",
        str(config),
    ]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.fullmatch(r"listening on (http://127\.0\.0\.1:\d+)\n", line)
        assert match, line
        with SimAdmin(match.group(1)) as admin:
            assert admin.get_config()["balance"] == "555"
            assert httpx.get(f"{match.group(1)}/fapi/v1/ping").json() == {}
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert process.stdout.read() == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "70000"], "port must be in [0, 65535]"),
        (["--host", "localhost!"], "not an IP address"),
        (["--config", "/nonexistent/sim.json"], "cannot read /nonexistent/sim.json"),
    ],
)
def test_cli_refuses_bad_arguments_clearly(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qtrader_tools.simulators.binance_futures", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


# --- helpers --------------------------------------------------------------------------------------


def now_ms() -> int:
    return int(time.time() * 1000)


def rule(windows: dict[str, Any], key: str) -> dict[str, Any]:
    return next(r for r in windows["rules"] if r["key"] == key)


def sleep_until_ms_in_second(target: int) -> None:
    """Sleep until the wall clock's millisecond within the second is ``target``."""
    wait = (target - now_ms() % 1000) % 1000
    time.sleep(wait / 1000)


def brute_force_sliding_max(log: list[dict[str, Any]], window_ms: int) -> int:
    admitted = [(e["t_ms"], e["weight"]) for e in log if e["admitted"]]
    return max(
        sum(w for t, w in admitted if start <= t < start + window_ms) for start, _ in admitted
    )
