"""The Binance venue and the order driver against the local Binance-compatible server.

python-binance talks HTTP to the simulator; the assertions read the simulator's own order book
and request log, never the adapter's view of itself. Each fault that books an order and then
fails the answer must end with exactly one order per intent at the exchange.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any

import pytest

from qtrader.contracts.messages import (
    Fill,
    HaltLatch,
    OrderIntent,
    OrderStatus,
    OrderType,
    OrderUpdate,
    Side,
    TradingState,
)
from qtrader.exchange.binance import BinanceFutures, BinanceSettings
from qtrader.exchange.credentials import Credentials
from qtrader.exchange.errors import Banned, ClockSkew, FilterViolation, Rejected
from qtrader.execution.clock import SYSTEM_CLOCK, Clock, SimulatedClock
from qtrader.execution.decisions import client_order_id_for
from qtrader.execution.exposure import Admitted, ExposureBook, Refused, SendLimits, admit_order
from qtrader.execution.halt import HaltGate
from qtrader.execution.orders import DriverSettings, OrderDriver
from qtrader.health.contract import Status
from qtrader_tools.simulators.binance_futures import SimAdmin, SimConfig
from support.binance_sim import KEY, SECRET, sim_in_thread

pytestmark = pytest.mark.integration

PRICE = Decimal(50_000)  # BTCUSDT at the simulator: tick 0.10, step 0.001, min notional 100


class Exchange:
    """The simulator's admin view plus the marks the driver sees."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.admin = SimAdmin(url)
        self.marks: dict[str, Decimal] = {"BTCUSDT": PRICE}

    def orders_of(self, intent: OrderIntent) -> list[dict[str, Any]]:
        stem = intent.client_order_id[:32]
        return [o for o in self.admin.orders() if str(o["clientOrderId"]).startswith(stem)]

    def posts(self) -> list[dict[str, Any]]:
        return [
            e for e in self.admin.log() if (e["method"], e["path"]) == ("POST", "/fapi/v1/order")
        ]


@pytest.fixture
def exchange() -> Iterator[Exchange]:
    config = SimConfig.from_dict({"prices": {"BTCUSDT": str(PRICE)}, "ban_base_s": 2})
    with sim_in_thread(config) as url:
        running = Exchange(url)
        try:
            yield running
        finally:
            running.admin.close()


@pytest.fixture
async def venue(exchange: Exchange) -> AsyncIterator[BinanceFutures]:
    settings = BinanceSettings(
        base_url=exchange.url,
        credentials=Credentials(api_key=KEY, api_secret=SECRET),
        timeout_s=0.5,
        backoff_base_s=0.05,
        backoff_cap_s=0.2,
        # These tests break the REST reads of an order's trades on purpose; the user-data
        # stream that spares them is tested in test_user_data_stream.
        user_stream=False,
    )
    binance = BinanceFutures(settings)
    await binance.start(["BTCUSDT"])
    yield binance
    await binance.close()


class Recorder:
    """What the driver publishes, applied to an exposure book as the worker does."""

    def __init__(self) -> None:
        self.updates: list[OrderUpdate] = []
        self.fills: list[Fill] = []
        self.book = ExposureBook()

    async def update(self, update: OrderUpdate) -> None:
        self.updates.append(update)
        self.book.apply_update(update)

    async def fill(self, fill: Fill) -> None:
        self.fills.append(fill)
        self.book.apply_fill(fill)


def active_gate() -> HaltGate:
    gate = HaltGate(heartbeat_timeout_s=3600)
    gate.apply(HaltLatch(state=TradingState.ACTIVE, revision=1, issued_at_ms=_now_ms()))
    gate.heartbeat()
    return gate


GRACE_S, LOOKUP_EVERY_S = 1.0, 0.1  # the drivers' look-ups of an unknown order


def driver_for(
    venue: BinanceFutures, exchange: Exchange, recorder: Recorder, clock: Clock = SYSTEM_CLOCK
) -> OrderDriver:
    """A driver whose exposure limits are far away: these tests are about the venue."""
    limits = SendLimits(
        max_position_usd=Decimal(10**9),
        max_open_positions=10,
        max_leverage=Decimal(125),
        equity=Decimal(10**9),
        marks=exchange.marks,
        instrument=venue.exchange_info.instrument("BTCUSDT"),
    )

    def admit(order: OrderIntent) -> Admitted | Refused:
        return admit_order(recorder.book, order, limits=limits, now_ms=_now_ms(), ttl_ms=3_600_000)

    return OrderDriver(
        venue,
        active_gate(),
        marks=exchange.marks.get,
        publish_update=recorder.update,
        publish_fill=recorder.fill,
        admit=admit,
        expiry=lambda intent: None,
        deadline=lambda intent: intent.created_at_ms + 3_600_000,
        was_sent=recorder.book.was_sent,
        ended=recorder.book.ended,
        worker_id="test",
        settings=DriverSettings(unknown_grace_s=GRACE_S, lookup_interval_s=LOOKUP_EVERY_S),
        clock=clock,
    )


def intent(name: str, side: Side = Side.BUY, quantity: str = "0.010") -> OrderIntent:
    intent_id = f"sig-{name}-{time.monotonic_ns()}"
    return OrderIntent(
        intent_id=intent_id,
        client_order_id=client_order_id_for(intent_id),
        symbol="BTCUSDT",
        side=side,
        quantity=Decimal(quantity),
        reference_price=PRICE,
        policy_revision=1,
        created_at_ms=_now_ms(),
    )


def _now_ms() -> int:
    return int(time.time() * 1000)


# --- an order whose answer is lost is looked up, never sent twice ------------------------------


# (fault, the outcome is unknown to the client, requests the exchange saw for the order)
FAULTS = [
    ("booked_then_503_unknown", True, 1),
    ("booked_then_hang", True, 1),
    ("booked_then_reset", True, 1),
    ("booked_then_1006", True, 1),
    ("booked_then_1007", True, 1),
    ("http_408", True, 2),  # ambiguous: looked up, unknown past the grace, sent again
    ("html_502", True, 2),  # not booked: looked up, unknown past the grace, sent again
    ("hang_before_booking", True, 2),
    ("unavailable_503", False, 2),  # documented as not executed: retried at once
    ("internal_503", False, 2),
]


@pytest.mark.parametrize(("fault", "unknown", "posts"), FAULTS)
async def test_when_the_answer_to_an_order_fails_then_exactly_one_order_per_intent(
    exchange: Exchange, venue: BinanceFutures, fault: str, unknown: bool, posts: int
) -> None:
    exchange.admin.faults(
        [{"route": "POST /fapi/v1/order", "kind": fault, "next": 1, "hang_s": 1.5}]
    )
    recorder = Recorder()
    order = intent(fault)

    final = await driver_for(venue, exchange, recorder).execute(order, max_slippage_bps=20)

    assert final.status is OrderStatus.FILLED, final
    booked = exchange.orders_of(order)
    assert len(booked) == 1, booked
    assert booked[0]["status"] == "FILLED"
    assert sum(f.quantity for f in recorder.fills) == order.quantity
    assert len({f.fill_id for f in recorder.fills}) == len(recorder.fills)
    assert (OrderStatus.UNKNOWN in [u.status for u in recorder.updates]) is unknown
    assert len(exchange.posts()) == posts


async def test_when_the_driver_runs_on_a_simulated_clock_then_its_look_up_waits_are_its_time(
    exchange: Exchange, venue: BinanceFutures
) -> None:
    """An order the venue never booked (its answer a 502) is looked up until the grace period
    is over, then sent again. On a backtest's clock the waits between look-ups move that clock
    instead of sleeping, and the grace is measured on it: the look-ups the venue saw are the
    simulated time that passed, one per interval and one more."""
    exchange.admin.faults([{"route": "POST /fapi/v1/order", "kind": "html_502", "next": 1}])
    recorder = Recorder()
    order = intent("simulated-waits")
    clock = SimulatedClock(order.created_at_ms)

    final = await driver_for(venue, exchange, recorder, clock).execute(order, max_slippage_bps=20)

    assert final.status is OrderStatus.FILLED, final
    waited_s = (clock.wall_ms() - order.created_at_ms) / 1000
    assert GRACE_S <= waited_s < GRACE_S + LOOKUP_EVERY_S
    lookups = [
        e for e in exchange.admin.log() if (e["method"], e["path"]) == ("GET", "/fapi/v1/order")
    ]
    assert len(lookups) == round(waited_s / LOOKUP_EVERY_S) + 1
    assert len(exchange.posts()) == 2


async def test_when_the_trades_of_a_booked_order_cannot_be_read_then_it_is_looked_up(
    exchange: Exchange, venue: BinanceFutures
) -> None:
    """The order is booked and filled, but every userTrades read after it fails: the outcome is
    unknown (not a rejection), the lookup reads the trades, the fills are all reported."""
    retries = BinanceSettings(
        base_url="", credentials=Credentials(api_key="k", api_secret="s")
    ).max_retries
    exchange.admin.faults(
        [{"route": "GET /fapi/v1/userTrades", "kind": "internal_503", "next": retries + 1}]
    )
    recorder = Recorder()
    order = intent("trades-unread")

    final = await driver_for(venue, exchange, recorder).execute(order, max_slippage_bps=20)

    assert final.status is OrderStatus.FILLED, final
    assert OrderStatus.UNKNOWN in [u.status for u in recorder.updates]
    assert len(exchange.posts()) == 1
    trades = {str(t["id"]) for t in exchange.admin.trades() if t["symbol"] == "BTCUSDT"}
    assert {f.fill_id.rsplit("-", 1)[1] for f in recorder.fills} == trades
    assert sum(f.quantity for f in recorder.fills) == order.quantity


async def test_when_the_venue_cannot_say_whether_it_has_an_order_then_it_is_not_sent_again(
    exchange: Exchange, venue: BinanceFutures
) -> None:
    """The answer to the order is lost and every lookup fails: sending it again could book it
    twice, so the intent is left UNKNOWN for reconciliation, with one order at the exchange."""
    exchange.admin.faults(
        [
            {"route": "POST /fapi/v1/order", "kind": "booked_then_503_unknown", "next": 1},
            {"route": "GET /fapi/v1/order", "kind": "internal_503", "every": 1},
        ]
    )
    recorder = Recorder()
    order = intent("lookups-fail")

    final = await driver_for(venue, exchange, recorder).execute(order, max_slippage_bps=20)

    assert final.status is OrderStatus.UNKNOWN, final
    assert len(exchange.posts()) == 1
    assert len(exchange.orders_of(order)) == 1


async def test_when_a_ban_cuts_an_order_off_after_booking_then_unknown_until_resolved(
    exchange: Exchange, venue: BinanceFutures
) -> None:
    """Booked and filled, then banned before its trades are read: the look-ups are refused
    during the ban, so the outcome stays UNKNOWN and nothing is sent again; once the ban is
    over, resolving it finds the order and publishes its fills."""
    exchange.admin.faults(
        [{"route": "GET /fapi/v1/userTrades", "kind": "http_418", "next": 1, "retry_after_s": 2}]
    )
    recorder = Recorder()
    order = intent("banned-after-booking")

    final = await driver_for(venue, exchange, recorder).execute(order, max_slippage_bps=20)

    assert final.status is OrderStatus.UNKNOWN, final
    assert recorder.fills == []
    assert len(exchange.posts()) == 1
    [booked] = exchange.orders_of(order)
    assert booked["status"] == "FILLED"

    driver = driver_for(venue, exchange, recorder)
    assert await driver.resolve(order) is None  # still banned: the venue cannot say yet
    await asyncio.sleep(2.2)  # the ban ends
    resolved = await driver.resolve(order)

    assert resolved is not None
    assert resolved.status is OrderStatus.FILLED
    trades = {str(t["id"]) for t in exchange.admin.trades()}
    assert {f.fill_id.rsplit("-", 1)[1] for f in recorder.fills} == trades
    assert len(exchange.posts()) == 1  # resolving sends nothing


async def test_when_an_order_is_booked_then_its_fills_carry_the_exchange_fees(
    exchange: Exchange, venue: BinanceFutures
) -> None:
    recorder = Recorder()
    order = intent("fees")
    await driver_for(venue, exchange, recorder).execute(order, max_slippage_bps=20)
    trades = {f"binance-BTCUSDT-{t['id']}": t for t in exchange.admin.trades()}
    assert recorder.fills
    for fill in recorder.fills:
        trade = trades[fill.fill_id]
        assert (fill.price, fill.quantity, fill.fee) == (
            Decimal(trade["price"]),
            Decimal(trade["qty"]),
            Decimal(trade["commission"]),
        )
    statuses = [u.status for u in recorder.updates]
    assert statuses == [OrderStatus.PENDING_NEW, OrderStatus.FILLED]


# --- partial fills and the slippage bound --------------------------------------------------


async def test_when_partially_filled_and_price_inside_bound_then_remainder_completes(
    exchange: Exchange, venue: BinanceFutures
) -> None:
    exchange.admin.partial("BTCUSDT", ratio="0.5", count=1)
    recorder = Recorder()
    order = intent("partial-complete")

    final = await driver_for(venue, exchange, recorder).execute(order, max_slippage_bps=20)

    assert final.status is OrderStatus.FILLED
    assert final.filled_quantity == order.quantity
    booked = exchange.orders_of(order)
    assert [o["status"] for o in booked] == ["EXPIRED", "FILLED"]  # IOC remainder, then re-sent
    assert sum(Decimal(o["executedQty"]) for o in booked) == order.quantity
    assert OrderStatus.PARTIALLY_FILLED in [u.status for u in recorder.updates]


async def test_when_price_leaves_the_bound_then_remainder_is_not_chased(
    exchange: Exchange, venue: BinanceFutures
) -> None:
    exchange.admin.partial("BTCUSDT", ratio="0.5", count=1)
    recorder = Recorder()
    order = intent("partial-cancel")

    async def move_price_after_first_fill(fill: Fill) -> None:
        await recorder.fill(fill)
        exchange.marks["BTCUSDT"] = PRICE * Decimal("1.0021")  # beyond the 20 bps cap
        exchange.admin.price("BTCUSDT", PRICE * Decimal("1.0021"))

    driver = driver_for(venue, exchange, recorder)
    driver._publish_fill = move_price_after_first_fill  # the price moves as the fill arrives

    final = await driver.execute(order, max_slippage_bps=20)

    assert final.status is OrderStatus.CANCELED
    assert final.filled_quantity == Decimal("0.005")
    assert "slippage bound" in (final.reason or "")
    assert len(exchange.orders_of(order)) == 1


async def test_when_exchange_price_already_beyond_bound_then_nothing_fills(
    exchange: Exchange, venue: BinanceFutures
) -> None:
    exchange.admin.price("BTCUSDT", PRICE * Decimal("1.01"))
    exchange.marks["BTCUSDT"] = PRICE * Decimal("1.01")
    recorder = Recorder()
    final = await driver_for(venue, exchange, recorder).execute(
        intent("beyond"), max_slippage_bps=20
    )
    assert final.status is OrderStatus.EXPIRED
    assert recorder.fills == []
    booked = exchange.admin.orders()
    assert [(o["status"], Decimal(o["price"])) for o in booked] == [
        ("EXPIRED", Decimal("50100.0"))  # a limit at the bound: 50,000 + 20 bps, on the tick
    ]


async def test_when_an_attempt_fills_nothing_then_it_is_not_sent_again(
    exchange: Exchange, venue: BinanceFutures
) -> None:
    """The venue's price is beyond the bound while ours still says inside it (our candles lag
    the book): the IOC meets nothing, and sending it again at once, with no newer price, would
    spend request weight for the same answer. The intent ends EXPIRED; the next signal decides
    again with a newer price."""
    exchange.admin.price("BTCUSDT", PRICE * Decimal("1.01"))
    recorder = Recorder()
    order = intent("nothing-filled")

    final = await driver_for(venue, exchange, recorder).execute(order, max_slippage_bps=20)

    assert final.status is OrderStatus.EXPIRED
    assert "filled nothing" in (final.reason or "")
    assert [o["status"] for o in exchange.orders_of(order)] == ["EXPIRED"]
    assert len(exchange.posts()) == 1
    assert [u.status for u in recorder.updates] == [OrderStatus.PENDING_NEW, OrderStatus.EXPIRED]
    assert recorder.book.in_flight("BTCUSDT") == 0  # nothing left reserved


# --- filters, business errors, limits ------------------------------------------------------


async def test_when_order_breaks_a_filter_then_refused_locally_and_never_sent(
    exchange: Exchange, venue: BinanceFutures
) -> None:
    too_small = intent("small", quantity="0.001")  # 0.001 x 50,000 = 50 < 100 min notional
    with pytest.raises(FilterViolation, match=r"notional 50\.\d* below the minimum 100"):
        await venue.place(too_small.model_copy(update={"quantity": Decimal("0.0019")}))
    assert exchange.posts() == []

    off_grid = intent("grid").model_copy(
        update={
            "quantity": Decimal("0.01099"),
            "order_type": OrderType.LIMIT,
            "limit_price": Decimal("50050.07"),
        }
    )
    placed = await venue.place(off_grid)
    assert placed.status is OrderStatus.FILLED
    (booked,) = exchange.admin.orders()
    assert (Decimal(booked["origQty"]), Decimal(booked["price"])) == (
        Decimal("0.010"),
        Decimal("50050.0"),  # a BUY cap rounds down to the tick: never above the bound
    )


async def test_when_business_error_then_one_request_and_typed_error(
    exchange: Exchange, venue: BinanceFutures
) -> None:
    with pytest.raises(Rejected) as caught:
        await venue.place(intent("margin", quantity="100"))  # 5 M notional > balance x leverage
    assert caught.value.code == -2019
    assert len(exchange.posts()) == 1


async def test_when_rate_limited_then_pauses_until_retry_after_and_sends_once(
    exchange: Exchange, venue: BinanceFutures
) -> None:
    exchange.admin.faults(
        [{"route": "POST /fapi/v1/order", "kind": "http_429", "next": 1, "retry_after_s": 1}]
    )
    placed = await venue.place(intent("paused"))
    assert placed.status is OrderStatus.FILLED
    log = exchange.admin.log()
    limited = next(e for e in log if e["status"] == 429)
    after = [e for e in log if e["t_ms"] > limited["t_ms"]]
    assert after
    assert min(e["t_ms"] for e in after) - limited["t_ms"] >= 950
    assert all(e["status"] != 418 for e in log)
    assert len(exchange.admin.orders()) == 1


async def test_when_clock_is_skewed_then_resyncs_and_order_goes_through(
    exchange: Exchange, venue: BinanceFutures
) -> None:
    exchange.admin.clock(skew_ms=-4_000)  # the server is 4 s behind us: we look 4 s ahead
    placed = await venue.place(intent("skew"))
    assert placed.status is OrderStatus.FILLED
    codes = [e["code"] for e in exchange.posts()]
    assert codes[0] == -1021
    assert len(exchange.admin.orders()) == 1


async def test_when_skew_survives_the_resync_then_degraded_then_critical_then_ok_again(
    exchange: Exchange, venue: BinanceFutures
) -> None:
    # The server checks timestamps on a clock 20 s behind the time it reports: a resync from
    # the reported time changes nothing, and every signed request is rejected -1021.
    exchange.admin.clock(skew_ms=-20_000)
    exchange.admin.report_time_offset(20_000)
    with pytest.raises(ClockSkew):
        await venue.place(intent("skew-1"))
    health = venue.health()
    assert health.status is Status.DEGRADED, health
    assert "1 signed requests in a row rejected -1021 after a resync" in health.detail
    for n in (2, 3):
        with pytest.raises(ClockSkew):
            await venue.place(intent(f"skew-{n}"))
    health = venue.health()
    assert health.status is Status.CRITICAL, health
    assert "3 signed requests in a row" in health.detail
    assert f"recvWindow {BinanceSettings.recv_window_ms} ms" in health.detail
    assert exchange.admin.orders() == []
    assert [e["code"] for e in exchange.posts()] == [-1021] * 6  # each resynced once

    exchange.admin.report_time_offset(0)  # the reported time agrees again: a resync cures it
    placed = await venue.place(intent("skew-cured"))
    assert placed.status is OrderStatus.FILLED
    assert venue.health().status is Status.OK
    assert len(exchange.admin.orders()) == 1


async def test_when_banned_then_no_request_leaves_and_health_is_critical(
    exchange: Exchange, venue: BinanceFutures
) -> None:
    exchange.admin.faults(
        [{"route": "POST /fapi/v1/order", "kind": "http_418", "next": 1, "retry_after_s": 30}]
    )
    with pytest.raises(Banned):
        await venue.place(intent("ban-1"))
    sent = len(exchange.admin.log())
    with pytest.raises(Banned):
        await venue.place(intent("ban-2"))
    assert len(exchange.admin.log()) == sent  # refused locally for the ban's duration
    assert venue.health().status is Status.CRITICAL
    assert exchange.admin.orders() == []


async def test_dead_man_switch_is_armed_at_the_exchange(
    exchange: Exchange, venue: BinanceFutures
) -> None:
    await venue.arm_dead_man(["BTCUSDT"], 30_000)
    (countdown,) = exchange.admin.countdowns()
    assert countdown["symbol"] == "BTCUSDT"


async def test_start_reports_our_orders_left_open(
    exchange: Exchange, venue: BinanceFutures
) -> None:
    resting = intent("resting").model_copy(
        update={"order_type": OrderType.LIMIT, "limit_price": Decimal("40000.0")}
    )
    # A GTC order left by a worker that died: placed here with python-binance directly.
    client = venue._client  # the same signed client the venue uses
    client.futures_create_order(
        symbol="BTCUSDT",
        side="BUY",
        type="LIMIT",
        timeInForce="GTC",
        quantity="0.010",
        price="40000.0",
        newClientOrderId=resting.client_order_id,
    )
    left = await venue.start(["BTCUSDT"])
    assert [o.client_order_id for o in left] == [resting.client_order_id]
    assert await venue.cancel_all(["BTCUSDT"]) == 1
    assert [o["status"] for o in exchange.admin.orders()] == ["CANCELED"]


async def test_when_an_intent_is_delivered_again_then_no_second_order(
    exchange: Exchange, venue: BinanceFutures
) -> None:
    recorder = Recorder()
    driver = driver_for(venue, exchange, recorder)
    order = intent("again")
    first = await driver.execute(order, max_slippage_bps=20)
    # The same intent again, as after a crash before its ack: older than recover_after_s.
    redelivered = order.model_copy(update={"created_at_ms": order.created_at_ms - 60_000})
    again = await driver.execute(redelivered, max_slippage_bps=20)

    assert first is not None
    assert first.status is OrderStatus.FILLED
    assert again is None, "its final update is known: nothing to do"
    assert len(exchange.orders_of(order)) == 1
    assert len(exchange.posts()) == 1
    fill_ids = [f.fill_id for f in recorder.fills]
    assert len(fill_ids) == len(set(fill_ids))  # published once


async def test_when_a_partly_filled_intent_is_delivered_again_then_only_the_rest_is_sent(
    exchange: Exchange, venue: BinanceFutures
) -> None:
    exchange.admin.partial("BTCUSDT", ratio="0.5", count=1)
    recorder = Recorder()
    driver = driver_for(venue, exchange, recorder)
    order = intent("again-partial").model_copy(
        update={"created_at_ms": _now_ms() - 60_000}  # so the first delivery also looks up
    )
    await venue.place(  # attempt 0 went out before a crash: half filled, the rest expired
        order.model_copy(update={"order_type": OrderType.LIMIT, "limit_price": PRICE})
    )
    final = await driver.execute(order, max_slippage_bps=20)

    assert final.status is OrderStatus.FILLED
    booked = exchange.orders_of(order)
    assert [o["clientOrderId"][-3:] for o in booked] == [order.client_order_id[-3:], "-r1"]
    assert sum(Decimal(o["executedQty"]) for o in booked) == order.quantity
