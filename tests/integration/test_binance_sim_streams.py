"""The simulator's websocket streams, user-data events, funding and ledger, over real clients.

python-binance's ``AsyncClient`` and ``BinanceSocketManager`` (what production uses) are
pointed at the simulator by URL (``support.binance_sim``); plain ``websockets`` clients check
the raw paths and the server's closes. The simulator runs in a thread of its own; its clock is
moved through the admin API, so kline closes, funding times and expiries come without waiting.
"""

from __future__ import annotations

import asyncio
import json
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

with warnings.catch_warnings():
    # python-binance imports websockets' legacy client, deprecated at import time (not ours).
    warnings.filterwarnings("ignore", r"websockets\..* is deprecated", DeprecationWarning)
    from binance.exceptions import BinanceAPIException

from qtrader_tools.simulators.binance_futures import SimAdmin, SimConfig
from support.binance_sim import (
    KEY,
    SECRET,
    sim_async_client,
    sim_in_thread,
    sim_socket_manager,
    stream_base,
)

pytestmark = pytest.mark.integration

MINUTE_MS = 60_000
EIGHT_HOURS_MS = 8 * 3_600_000
# The field names as Binance documents them.
ORDER_FIELDS = {
    *("s", "c", "S", "o", "f", "q", "p", "ap", "sp", "x", "X", "i", "l", "z", "L", "n", "N"),
    *("T", "t", "b", "a", "m", "R", "wt", "ot", "ps", "cp", "rp", "pP", "si", "ss", "V", "pm"),
    "gtd",
}
KLINE_FIELDS = {"t", "T", "s", "i", "f", "L", "o", "c", "h", "l", "v", "n", "x", "q", "V", "Q", "B"}
Message = dict[str, Any]


@pytest.fixture
def sim() -> Iterator[tuple[str, SimAdmin]]:
    config = SimConfig(
        api_keys={KEY: SECRET},
        kline_push_ms=20,
        prices={"BTCUSDT": Decimal(100), "ETHUSDT": Decimal(50)},
    )
    with sim_in_thread(config) as url, SimAdmin(url) as admin:
        _align_clock(admin)
        yield url, admin


def _align_clock(admin: SimAdmin) -> None:
    """Put the server clock 1 s past a minute's start, so a test's klines stay in one minute."""
    now = _server_time(admin)
    admin.clock(advance_ms=MINUTE_MS - now % MINUTE_MS + 1000)


def _server_time(admin: SimAdmin) -> int:
    return int(admin._http.get("/fapi/v1/time").json()["serverTime"])


@asynccontextmanager
async def binance(url: str) -> AsyncIterator[Any]:
    client = await sim_async_client(url)
    try:
        yield client
    finally:
        await client.close_connection()


async def next_message(
    socket: Any, accept: Callable[[Message], bool], timeout_s: float = 5.0
) -> Message:
    async with asyncio.timeout(timeout_s):
        while True:
            message: Message = await socket.recv()
            if accept(message):
                return message


def quick(socket: Any) -> Any:
    """A user socket that notices its own close within 0.2 s: python-binance's read loop waits
    up to ``TIMEOUT`` (10 s) for a message before it looks at its state, and a quiet user stream
    sends none."""
    socket.TIMEOUT = 0.2
    return socket


def kline_of(message: Message) -> Message:
    data: Message = message.get("data", message)
    kline: Message = data["k"]
    return kline


def is_order(execution: str) -> Callable[[Message], bool]:
    return lambda m: m.get("e") == "ORDER_TRADE_UPDATE" and m["o"]["x"] == execution


def is_account(reason: str) -> Callable[[Message], bool]:
    return lambda m: m.get("e") == "ACCOUNT_UPDATE" and m["a"]["m"] == reason


# --- market streams ---------------------------------------------------------------------------


async def test_multiplex_kline_closes_with_the_fills_and_prices_and_matches_the_rest_backfill(
    sim: tuple[str, SimAdmin],
) -> None:
    url, admin = sim
    async with binance(url) as client:
        manager = sim_socket_manager(client, url)
        async with manager.futures_multiplex_socket(["btcusdt@kline_1m"]) as socket:
            first = await next_message(socket, lambda m: "data" in m)
            assert first["stream"] == "btcusdt@kline_1m"
            assert (first["data"]["e"], first["data"]["s"]) == ("kline", "BTCUSDT")
            assert set(first["data"]) == {"e", "E", "s", "k"}
            assert set(first["data"]["k"]) == KLINE_FIELDS
            assert first["data"]["k"]["x"] is False
            await client.futures_create_order(
                symbol="BTCUSDT", side="BUY", type="MARKET", quantity="1.5"
            )
            for price in ("101", "99", "100.5"):
                admin.price("BTCUSDT", price)
            forming = kline_of(await next_message(socket, lambda m: kline_of(m)["c"] == "100.5"))
            admin.clock(advance_ms=MINUTE_MS)
            closed = kline_of(await next_message(socket, lambda m: kline_of(m)["x"]))
        rows = await client.futures_klines(
            symbol="BTCUSDT", interval="1m", startTime=closed["t"], limit=2
        )
    assert closed["t"] == forming["t"]
    assert closed["T"] == closed["t"] + MINUTE_MS - 1
    expected = {"o": "100", "h": "101", "l": "99", "c": "100.5", "v": "1.5", "n": 1}
    assert {k: closed[k] for k in expected} == expected
    assert (closed["q"], closed["V"], closed["Q"], closed["f"], closed["L"]) == (
        "150", "1.5", "150", 1, 1,
    )  # fmt: skip
    backfill = rows[0]
    assert backfill == [
        closed["t"], closed["o"], closed["h"], closed["l"], closed["c"], closed["v"],
        closed["T"], closed["q"], closed["n"], closed["V"], closed["Q"], "0",
    ]  # fmt: skip
    assert rows[1][0] == closed["t"] + MINUTE_MS  # the forming kline follows
    assert rows[1][1] == rows[1][4] == "100.5"  # opens where the closed one closed


async def test_kline_futures_socket_gets_continuous_klines(sim: tuple[str, SimAdmin]) -> None:
    url, admin = sim
    admin.price("ETHUSDT", "51.25")
    async with binance(url) as client:
        manager = sim_socket_manager(client, url)
        async with manager.kline_futures_socket("ETHUSDT", interval="5m") as socket:
            message = await next_message(socket, lambda m: "k" in m)
    assert (message["e"], message["ps"], message["ct"]) == (
        "continuous_kline",
        "ETHUSDT",
        "PERPETUAL",
    )
    assert set(message["k"]) == KLINE_FIELDS - {"s"}
    assert (message["k"]["i"], message["k"]["c"]) == ("5m", "51.25")


async def test_raw_stream_sends_bare_payloads_and_answers_subscriptions(
    sim: tuple[str, SimAdmin],
) -> None:
    url, _ = sim
    base = stream_base(url)
    async with connect(f"{base}ws/btcusdt@kline_1m") as ws:
        message = await _json(ws, lambda m: m.get("e") == "kline")
        assert message["s"] == "BTCUSDT"
        await ws.send('{"method": "SUBSCRIBE", "params": ["ethusdt@kline_3m"], "id": 7}')
        assert await _json(ws, lambda m: m.get("id") == 7) == {"result": None, "id": 7}
        await _json(ws, lambda m: m.get("s") == "ETHUSDT" and m["k"]["i"] == "3m")
        await ws.send('{"method": "LIST_SUBSCRIPTIONS", "id": 8}')
        listed = await _json(ws, lambda m: m.get("id") == 8)
        assert listed["result"] == ["btcusdt@kline_1m", "ethusdt@kline_3m"]
    with pytest.raises(InvalidStatus) as refused:
        await connect(f"{base}stream?streams=btcusdt@kline_1m/btcusdt@depth")
    assert refused.value.response.status_code == 400


async def _json(ws: Any, accept: Callable[[Message], bool]) -> Message:
    async with asyncio.timeout(5):
        while True:
            message: Message = json.loads(await ws.recv())
            if accept(message):
                return message


# --- user data ----------------------------------------------------------------------------------


async def test_user_socket_reports_each_order_change_fill_and_account_change(
    sim: tuple[str, SimAdmin],
) -> None:
    url, admin = sim
    async with binance(url) as client:
        manager = sim_socket_manager(client, url)
        async with quick(manager.futures_user_socket()) as socket:
            await _until_listening(admin)
            resting = await client.futures_create_order(
                symbol="BTCUSDT", side="BUY", type="LIMIT", timeInForce="GTC",
                quantity="2", price="98",
            )  # fmt: skip
            new = await next_message(socket, is_order("NEW"))
            admin.price("BTCUSDT", "97")
            fill = await next_message(socket, is_order("TRADE"))
            opened = await next_message(socket, is_account("ORDER"))
            admin.price("BTCUSDT", "103")
            await client.futures_create_order(
                symbol="BTCUSDT", side="SELL", type="MARKET", quantity="1.5"
            )
            await next_message(socket, is_order("NEW"))
            close = await next_message(socket, is_order("TRADE"))
            reduced = await next_message(socket, is_account("ORDER"))
        trades = await client.futures_account_trades(symbol="BTCUSDT")
        balance = await client.futures_account_balance()
    assert set(new["o"]) == ORDER_FIELDS
    assert set(new) == {"e", "E", "T", "o"}
    assert (new["o"]["i"], new["o"]["X"], new["o"]["b"], new["o"]["a"]) == (
        resting["orderId"], "NEW", "196", "0",
    )  # fmt: skip
    assert (fill["o"]["X"], fill["o"]["l"], fill["o"]["L"], fill["o"]["m"]) == (
        "FILLED", "2", "98", True,
    )  # fmt: skip
    assert (fill["o"]["n"], fill["o"]["N"], fill["o"]["t"]) == ("0.0392", "USDT", 1)  # maker fee
    assert opened["a"]["P"] == [
        {"s": "BTCUSDT", "pa": "2", "ep": "98", "bep": "98", "cr": "0", "up": "-2",
         "mt": "cross", "iw": "0", "ps": "BOTH"},
    ]  # fmt: skip
    assert (close["o"]["rp"], close["o"]["n"], close["o"]["m"]) == ("7.5", "0.0618", False)
    assert reduced["a"]["P"][0]["pa"] == "0.5"
    assert reduced["a"]["P"][0]["cr"] == "7.5"
    wallet = Decimal(10000) + Decimal("7.5") - Decimal("0.0392") - Decimal("0.0618")
    assert reduced["a"]["B"] == [{"a": "USDT", "wb": "10007.399", "cw": "10007.399", "bc": "0"}]
    assert [t["realizedPnl"] for t in trades] == ["0", "7.5"]
    usdt = next(b for b in balance if b["asset"] == "USDT")
    assert Decimal(usdt["balance"]) == wallet


async def _until_listening(admin: SimAdmin) -> None:
    """Until python-binance's user socket is connected (the simulator lists it)."""
    async with asyncio.timeout(5):
        while not any(c["listen_keys"] for c in admin.websockets()["connections"]):  # noqa: ASYNC110  # polling another process's state
            await asyncio.sleep(0.02)


async def test_manual_trade_reaches_the_user_stream_with_a_web_client_id(
    sim: tuple[str, SimAdmin],
) -> None:
    url, admin = sim
    async with binance(url) as client:
        manager = sim_socket_manager(client, url)
        async with quick(manager.futures_user_socket()) as socket:
            await _until_listening(admin)
            admin.manual_trade(KEY, "ETHUSDT", "SELL", "3")
            fill = await next_message(socket, is_order("TRADE"))
        positions = await client.futures_position_information(symbol="ETHUSDT")
    assert fill["o"]["c"].startswith("web_")
    assert fill["o"]["X"] == "FILLED"
    assert [p["positionAmt"] for p in positions] == ["-3"]


async def test_listen_key_keepalive_extends_expiry_sends_the_event_and_closes(
    sim: tuple[str, SimAdmin],
) -> None:
    url, admin = sim
    async with binance(url) as client:
        key = await client.futures_stream_get_listen_key()
        assert await client.futures_stream_get_listen_key() == key  # one active key
        async with connect(f"{stream_base(url)}ws/{key}") as ws:
            admin.clock(advance_ms=50 * MINUTE_MS)
            await client.futures_stream_keepalive(key)  # now valid until +60 min
            admin.clock(advance_ms=50 * MINUTE_MS)
            await asyncio.sleep(0.2)
            assert [k["listen_key"] for k in admin.websockets()["listen_keys"]] == [key]
            admin.clock(advance_ms=11 * MINUTE_MS)
            expired = await _json(ws, lambda m: True)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
        assert expired == {"e": "listenKeyExpired", "E": expired["E"], "listenKey": key}
        assert isinstance(expired["E"], str)
        with pytest.raises(BinanceAPIException) as gone:
            await client.futures_stream_keepalive(key)
        assert (gone.value.code, gone.value.message) == (-1125, "This listenKey does not exist.")


async def test_deleting_the_listen_key_closes_its_stream(sim: tuple[str, SimAdmin]) -> None:
    url, _ = sim
    async with binance(url) as client:
        key = await client.futures_stream_get_listen_key()
        async with connect(f"{stream_base(url)}private/ws/{key}") as ws:
            await client.futures_stream_close(key)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)


# --- connection faults ------------------------------------------------------------------------


async def test_server_closes_a_connection_after_its_maximum_age(
    sim: tuple[str, SimAdmin],
) -> None:
    url, admin = sim
    async with connect(f"{stream_base(url)}ws/btcusdt@kline_1m") as ws:
        await _json(ws, lambda m: True)
        admin.clock(advance_ms=24 * 60 * MINUTE_MS - 5000)
        await _json(ws, lambda m: True)  # still open just before 24 h
        admin.clock(advance_ms=5000)
        with pytest.raises(ConnectionClosed) as closed:
            await _drain(ws)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1001


async def _drain(ws: Any) -> None:
    """Read until the connection ends (raises ConnectionClosed), at most 5 s per message."""
    while True:
        await asyncio.wait_for(ws.recv(), 5)


async def test_python_binance_socket_reconnects_after_an_injected_drop(
    sim: tuple[str, SimAdmin],
) -> None:
    url, admin = sim
    async with binance(url) as client:
        manager = sim_socket_manager(client, url)
        async with manager.futures_multiplex_socket(["btcusdt@kline_1m"]) as socket:
            await next_message(socket, lambda m: "data" in m)
            assert admin.drop_websockets() == 1
            error = await next_message(socket, lambda m: m.get("e") == "error")
            admin.price("BTCUSDT", "104")
            again = await next_message(socket, lambda m: "data" in m and kline_of(m)["c"] == "104")
    assert error["type"] in {
        "ConnectionClosedError",
        "ConnectionClosedOK",
        "BinanceWebsocketClosed",
    }
    assert again["stream"] == "btcusdt@kline_1m"


# --- funding, BNB commissions, the ledger -------------------------------------------------------


async def test_funding_is_charged_at_the_scheduled_time_to_longs_and_paid_to_shorts(
    sim: tuple[str, SimAdmin],
) -> None:
    url, admin = sim
    # A listen key outliving the jump to the funding time (no keepalive is sent in between).
    admin.config(api_keys={KEY: SECRET, "short-key": "short-secret"}, listen_key_validity_ms=10**9)
    admin.funding_rate("BTCUSDT", "0.0001")
    async with binance(url) as client, _short_client(url) as short:
        await client.futures_create_order(symbol="BTCUSDT", side="BUY", type="MARKET", quantity="3")
        await short.futures_create_order(symbol="BTCUSDT", side="SELL", type="MARKET", quantity="1")
        admin.price("BTCUSDT", "120")
        manager = sim_socket_manager(client, url)
        async with quick(manager.futures_user_socket()) as socket:
            await _until_listening(admin)
            premium = await client.futures_mark_price(symbol="BTCUSDT")
            funding_time = premium["nextFundingTime"]
            assert funding_time % EIGHT_HOURS_MS == 0  # 00:00, 08:00 or 16:00 UTC
            admin.clock(advance_ms=funding_time - _server_time(admin) + 1000)
            update = await next_message(socket, is_account("FUNDING_FEE"))
        await resync(client)
        await resync(short)
        long_income = await client.futures_income_history(incomeType="FUNDING_FEE")
        short_income = await short.futures_income_history(symbol="BTCUSDT")
        account = await client.futures_account()
    assert [(e["income"], e["time"], e["asset"]) for e in long_income] == [
        ("-0.036", funding_time, "USDT")
    ]  # 3 x 120 x 0.0001, paid
    funding = [e for e in short_income if e["incomeType"] == "FUNDING_FEE"]
    assert [e["income"] for e in funding] == ["0.012"]  # received
    assert update["a"]["P"] == []  # cross margin: balance only
    commission = Decimal("0.12")  # 3 x 100 x 0.0004
    wallet = Decimal(10000) - commission - Decimal("0.036")
    assert update["a"]["B"] == [{"a": "USDT", "wb": "9999.844", "cw": "9999.844", "bc": "0"}]
    assert Decimal(account["totalWalletBalance"]) == wallet
    assert Decimal(account["totalUnrealizedProfit"]) == Decimal(60)


async def resync(client: Any) -> None:
    """What a client does after -1021: take the server's time again (the clock was moved)."""
    server_ms = (await client.get_server_time())["serverTime"]
    client.timestamp_offset = server_ms - int(time.time() * 1000)


@asynccontextmanager
async def _short_client(url: str) -> AsyncIterator[Any]:
    client = await sim_async_client(url, "short-key", "short-secret")
    try:
        yield client
    finally:
        await client.close_connection()


async def test_bnb_burn_pays_commission_in_bnb_at_a_discount(sim: tuple[str, SimAdmin]) -> None:
    url, admin = sim
    admin.config(bnb_price="600")
    admin.transfer(KEY, "BNB", "1")
    async with binance(url) as client:
        await client.futures_v1_post_fee_burn(feeBurn="true")
        assert (await client.futures_v1_get_fee_burn())["feeBurn"] is True
        await client.futures_create_order(symbol="BTCUSDT", side="BUY", type="MARKET", quantity="2")
        trades = await client.futures_account_trades(symbol="BTCUSDT")
        balances = {b["asset"]: b["balance"] for b in await client.futures_account_balance()}
        commissions = await client.futures_income_history(incomeType="COMMISSION")
    # 2 x 100 x 0.0004 = 0.08 USDT; 0.9 x 0.08 / 600 = 0.00012 BNB
    assert (trades[0]["commission"], trades[0]["commissionAsset"]) == ("0.00012", "BNB")
    assert balances == {"USDT": "10000", "BNB": "0.99988"}
    assert [(e["income"], e["asset"]) for e in commissions] == [("-0.00012", "BNB")]


async def test_income_history_filters_and_the_wallet_is_exactly_its_sum(
    sim: tuple[str, SimAdmin],
) -> None:
    url, admin = sim
    admin.transfer(KEY, "USDT", "250.5")
    async with binance(url) as client:
        for qty, price in (("0.7", "100.3"), ("-0.3", "101.7"), ("-0.9", "99.1"), ("0.25", "98")):
            admin.price("ETHUSDT", price)
            side = "BUY" if not qty.startswith("-") else "SELL"
            await client.futures_create_order(
                symbol="ETHUSDT", side=side, type="MARKET", quantity=qty.lstrip("-")
            )
        admin.funding_rate("ETHUSDT", "-0.0003")
        admin.settle_funding("ETHUSDT")
        everything = await client.futures_income_history(limit=1000)
        realized = await client.futures_income_history(incomeType="REALIZED_PNL")
        first_two = await client.futures_income_history(limit=2)
        account = await client.futures_account()
    kinds = {e["incomeType"] for e in everything}
    assert kinds == {"TRANSFER", "COMMISSION", "REALIZED_PNL", "FUNDING_FEE"}
    assert all(e["incomeType"] == "REALIZED_PNL" for e in realized)
    assert len(realized) == 3
    assert first_two == everything[:2]
    assert [e["tranId"] for e in everything] == sorted(e["tranId"] for e in everything)
    total = sum((Decimal(e["income"]) for e in everything), Decimal(0))
    assert Decimal(account["totalWalletBalance"]) == Decimal(10000) + total
    # long 0.7 @ 100.3; sell 0.3 @ 101.7 (+0.42); sell 0.9 @ 99.1 closes 0.4 (-0.48) and opens
    # a 0.5 short; buy 0.25 @ 98 (+0.275); the 0.25 short left pays 0.25 x 98 x 0.0003.
    assert [e["income"] for e in realized] == ["0.42", "-0.48", "0.275"]
    funding = [e["income"] for e in everything if e["incomeType"] == "FUNDING_FEE"]
    assert funding == ["-0.00735"]
