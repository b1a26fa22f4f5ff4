"""Positions stay within their limits on the venue, whatever its orders end as, at any pace.

A real execution worker in testnet mode (python-binance over HTTP) and a real portfolio, on a
real nats-server, trade three symbols on the local Binance-compatible server running in its own
process. The test plays the control plane and the upstream pipeline (candles and signals that
flip the target between LONG, SHORT and FLAT). Every verdict comes from the simulator's own
records, through the shared exposure checker (``qtrader_tools.stress.invariants``): no position
beyond ``maxPositionUsd`` at its trade price by more than one step, no more open positions than
allowed, no reduce-only order rejected (-2022), and no order booked for an intent older than its
time to live.

The cases are the ones seen to break it: orders that end unfilled (an IOC that meets no
liquidity, a price beyond the slippage bound, 408 and HTML 502 answers that were never booked),
10 and 40 rounds of candles a second, and a flood with the exchange's weight limit lowered so
the worker's rate limiter binds, then a halt in the middle of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    Direction,
    OrderIntent,
    OrderStatus,
    Signal,
    TradingState,
)
from qtrader.contracts.policy import parse_policy
from qtrader.exchange.limits import LimitKind, RateLimitRule
from qtrader.local.control import heartbeat_forever, publish_policy, write_latch
from qtrader.local.nats_server import EmbeddedNats
from qtrader_tools.candles import flat_candle
from qtrader_tools.simulators.binance_futures import SimAdmin
from qtrader_tools.stress.invariants import (
    ExposureLimits,
    ExposureReport,
    check_exposure,
    from_sim_records,
)
from support.binance_sim import KEY, SECRET, sim_listing, sim_process
from support.flow import order_updates
from support.streams import read_all
from support.workers import Worker, eventually, start_worker, stop_pipeline

pytestmark = pytest.mark.integration

PRICES = {"BTCUSDT": Decimal(30_000), "ETHUSDT": Decimal(2_000), "SOLUSDT": Decimal(100)}
SYMBOLS = tuple(PRICES)
MAX_POSITION_USD = Decimal(1000)
MAX_OPEN = 3
INTENT_TTL_S = 3
# The simulator books an order when it arrives; the worker's last check is just before the
# request leaves. This is the most the two may be apart (loopback, a loaded machine).
BOOKING_TOLERANCE_MS = 250
DIRECTIONS = (Direction.LONG, Direction.SHORT, Direction.FLAT, Direction.SHORT, Direction.LONG)
WEIGHT_PER_SECOND = 12  # lowered for the flood: about two orders (and their trades) a second


def _policy(**signals: Any) -> Any:
    return parse_policy(
        {
            "apiVersion": "qtrader.dev/v1alpha1",
            "kind": "TradingPolicy",
            "metadata": {"name": "exposure-test"},
            "spec": {
                "mode": "testnet",
                "symbols": list(SYMBOLS),
                "risk": {
                    "minConfidence": 0.0,
                    "maxPositionUsd": str(MAX_POSITION_USD),
                    "maxOpenPositions": MAX_OPEN,
                    "maxSlippageBps": 100,
                },
                "signals": {"intentTtlSeconds": INTENT_TTL_S, **signals},
            },
        }
    )


@contextlib.contextmanager
def _exchange(tmp_path: Path, rules: tuple[RateLimitRule, ...] = ()) -> Iterator[SimAdmin]:
    config: dict[str, Any] = {"prices": {s: str(p) for s, p in PRICES.items()}}
    if rules:
        config["rate_limits"] = [rule.as_binance() for rule in rules]
    with sim_process(config, tmp_path / "sim") as url, SimAdmin(url) as admin:
        yield admin


async def _feed(bus: Bus, *, rounds_per_s: float, stop: asyncio.Event, tag: str) -> None:
    """Each round: a candle and a signal for every symbol, the target cycling so that positions
    open, flip and close (FLAT is a reduce-only close)."""
    index = 0
    while not stop.is_set():
        now_ms = int(time.time() * 1000)
        for k, symbol in enumerate(SYMBOLS):
            price = PRICES[symbol]
            open_ms = 1_700_000_000_000 + index * 60_000
            candle = flat_candle(symbol, price, open_time_ms=open_ms)
            await bus.publish(subjects.candle_subject(symbol), candle)
            signal = Signal(
                signal_id=f"{tag}:{symbol}:{index}",
                symbol=symbol,
                direction=DIRECTIONS[(index + k) % len(DIRECTIONS)],
                confidence=0.9,
                model_version="test",
                candle_open_time_ms=open_ms,
                price=price,
                created_at_ms=now_ms,
            )
            await bus.publish(subjects.signal_subject(symbol), signal)
        index += 1
        await asyncio.sleep(1 / rounds_per_s)


@contextlib.asynccontextmanager
async def _feeding(bus: Bus, *, rounds_per_s: float, tag: str) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(_feed(bus, rounds_per_s=rounds_per_s, stop=stop, tag=tag))
    try:
        yield
    finally:
        stop.set()
        await task


@contextlib.asynccontextmanager
async def _stack(
    nats: EmbeddedNats, admin: SimAdmin, tmp_path: Path, policy: Any, *, replicas: int = 1
) -> AsyncIterator[tuple[Bus, list[Worker]]]:
    bus = Bus(url=nats.url, client_name="test-exposure")
    await bus.connect()
    await bus.ensure_topology()
    await publish_policy(bus, policy)
    await write_latch(bus, state=TradingState.ACTIVE, reason="test", issued_by="test")
    heartbeat = asyncio.create_task(heartbeat_forever(bus, issued_by="test", interval_s=0.2))
    env = {"QTRADER_BINANCE_API_KEY": KEY, "QTRADER_BINANCE_API_SECRET": SECRET}
    args = ("--exchange-url", admin.base_url, "--unknown-grace", "1", "--exchange-timeout", "2")
    workers = [start_worker("portfolio", nats_url=nats.url, log_dir=tmp_path)]
    try:
        executions = []
        for n in range(replicas):
            worker_args = ("--worker-id", f"exec-exposure-{n}", *args)
            executions.append(
                start_worker(
                    "execution", nats_url=nats.url, log_dir=tmp_path, args=worker_args, env=env
                )
            )
        workers += executions
        yield bus, executions
    finally:
        heartbeat.cancel()
        await stop_pipeline(workers, nats_url=nats.url)
        await bus.close()


async def _settled(worker: Worker, *, timeout_s: float) -> None:
    """Every intent this worker decided is final (nothing left to book afterwards)."""
    await eventually(
        lambda: (
            worker.metric("qtrader_intent_backlog") == 0
            and worker.metric("qtrader_orders_unknown") == 0
        ),
        timeout_s=timeout_s,
        what="the intent backlog drained",
        worker=worker,
    )


async def _judge(url: str, admin: SimAdmin) -> ExposureReport:
    """The exposure invariant and the time to live, from the venue's own records."""
    listing = sim_listing(admin)
    orders = admin.orders()
    trades, rejections = from_sim_records(trades=admin.trades(), orders=orders, log=admin.log())
    limits = ExposureLimits(
        max_position_usd=MAX_POSITION_USD,
        max_open_positions=MAX_OPEN,
        step_sizes={s: listing.instrument(s).step_size for s in SYMBOLS},
    )
    report = check_exposure(trades=trades, rejections=rejections, limits=limits)
    print(f"\nexposure: {report.summary()}; {len(orders)} orders booked")
    assert report.ok, report.summary()
    assert report.reduce_only_rejections == 0
    intents = await read_all(
        url, stream="QT_ORDERS", subject="qtrader.order.intent.*", message_type=OrderIntent
    )
    created = {i.client_order_id[:32]: i.created_at_ms for i in intents}
    ages = [int(o["time"]) - created[str(o["clientOrderId"])[:32]] for o in orders]
    print(f"oldest intent booked: {max(ages, default=0)} ms (ttl {INTENT_TTL_S * 1000} ms)")
    assert max(ages, default=0) <= INTENT_TTL_S * 1000 + BOOKING_TOLERANCE_MS
    return report


async def test_orders_that_end_unfilled_never_leave_a_position_beyond_its_limit(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """IOCs that meet no liquidity, a price beyond the slippage bound, 408 and HTML 502 answers
    never booked: the intents decided on top of them are re-checked when sent."""
    with _exchange(tmp_path) as admin:
        async with _stack(nats_server, admin, tmp_path, _policy()) as (bus, [execution]):
            async with _feeding(bus, rounds_per_s=10, tag="unfilled"):
                await eventually(
                    lambda: len(admin.trades()) >= 3,
                    timeout_s=30,
                    what="first trades",
                    worker=execution,
                )
                order_route = "POST /fapi/v1/order"
                admin.faults(
                    [
                        {"route": order_route, "kind": "http_408", "probability": 0.15, "seed": 3},
                        {"route": order_route, "kind": "html_502", "probability": 0.15, "seed": 4},
                    ]
                )
                for symbol in SYMBOLS:
                    admin.partial(symbol, "0", 4)  # IOCs that fill nothing
                await asyncio.sleep(4)
                # Beyond the 100 bps bound: buys expire unfilled, sells fill (better) for a while.
                admin.price("BTCUSDT", PRICES["BTCUSDT"] * Decimal("1.02"))
                admin.price("ETHUSDT", PRICES["ETHUSDT"] * Decimal("0.98"))
                await asyncio.sleep(3)
                admin.price("BTCUSDT", PRICES["BTCUSDT"])
                admin.price("ETHUSDT", PRICES["ETHUSDT"])
                admin.faults([])
                await asyncio.sleep(3)
            await _settled(execution, timeout_s=20)
            updates = await order_updates(nats_server.url)
        report = await _judge(nats_server.url, admin)
        served = [e for e in admin.log() if e.get("fault") in ("http_408", "html_502")]
        unfilled = [u for u in updates if u.status is OrderStatus.EXPIRED]
        print(f"faults served {len(served)}, intents ended unfilled {len(unfilled)}")
        assert served, "the 408/502 faults were served"
        assert unfilled, "some intents ended with nothing filled"
        assert report.trades > 0


@pytest.mark.parametrize("rounds_per_s", [10, 40])
async def test_at_full_pace_a_fill_is_never_counted_twice(
    nats_server: EmbeddedNats, tmp_path: Path, rounds_per_s: int
) -> None:
    """No fault: at 10 and 40 rounds of candles a second on three symbols, a decision between a
    fill and its intent's final update sizes on the position once."""
    with _exchange(tmp_path) as admin:
        async with _stack(nats_server, admin, tmp_path, _policy()) as (bus, [execution]):
            async with _feeding(bus, rounds_per_s=rounds_per_s, tag=f"pace{rounds_per_s}"):
                await eventually(
                    lambda: len(admin.trades()) >= 3,
                    timeout_s=30,
                    what="first trades",
                    worker=execution,
                )
                await asyncio.sleep(8)
            await _settled(execution, timeout_s=20)
            positions = _dependency(execution, "positions")
        report = await _judge(nats_server.url, admin)
        assert report.trades >= 3
        assert positions is not None


async def test_two_replicas_count_each_others_orders_in_flight(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """Two workers share the signal and intent queues and one account: each counts the
    other's attempts (their PENDING_NEW on ORDERS) and fills in flight and in position."""
    with _exchange(tmp_path) as admin:
        async with _stack(nats_server, admin, tmp_path, _policy(), replicas=2) as (bus, pair):
            async with _feeding(bus, rounds_per_s=10, tag="replicas"):
                await eventually(
                    lambda: len(admin.trades()) >= 3,
                    timeout_s=30,
                    what="first trades",
                    worker=pair[0],
                )
                await asyncio.sleep(8)
            for worker in pair:
                await _settled(worker, timeout_s=20)
            sent = [
                worker.metric("qtrader_orders_sent_total", exchange="binance") for worker in pair
            ]
        report = await _judge(nats_server.url, admin)
        print(f"orders sent by each replica: {sent}")
        assert all(n > 0 for n in sent), sent  # both sent, so each had the other's in flight
        assert report.trades >= 3


async def test_a_flood_with_the_weight_limit_lowered_expires_stale_intents_and_a_halt_stops_it(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """The worker's rate limiter binds: intents past their ttl end EXPIRED and are never booked,
    the backlog stays at its bound with /health DEGRADED saying so, drains once the flood stops;
    after a halt no order is sent and no queued intent is looked up."""
    rules = (
        RateLimitRule(LimitKind.REQUEST_WEIGHT, "SECOND", 1, WEIGHT_PER_SECOND),
        RateLimitRule(LimitKind.ORDERS, "SECOND", 10, 100),
    )
    bound = 20
    policy = _policy(maxIntentBacklog=bound)
    with _exchange(tmp_path, rules) as admin:
        async with _stack(nats_server, admin, tmp_path, policy) as (bus, [execution]):
            health_seen: list[str] = []
            backlog_seen: list[float] = []
            async with _feeding(bus, rounds_per_s=20, tag="flood"):
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    backlog_seen.append(execution.metric("qtrader_intent_backlog"))
                    health_seen.append(str(_detail(execution, "intent-backlog")))
                    await asyncio.sleep(0.5)
                latch = await write_latch(
                    bus, state=TradingState.HALTED, reason="test halt", issued_by="test"
                )
                await eventually(
                    lambda: execution.metric("qtrader_trading_state") == 2,
                    timeout_s=10,
                    what="the halt in force",
                    worker=execution,
                )
                halted_ms = int(time.time() * 1000)
                await asyncio.sleep(3)  # signals keep coming while halted
            await _settled(execution, timeout_s=INTENT_TTL_S + 15)
            halted_lookups = execution.metric("qtrader_halted_lookups_total")
            expired_by_ttl = execution.metric(
                "qtrader_orders_refused_total", reason="intent_expired"
            )
            backlog_full = execution.metric("qtrader_signals_denied_total", reason="backlog_full")
            updates = await order_updates(nats_server.url)
        report = await _judge(nats_server.url, admin)
        log = admin.log()
        sent_after = [e for e in log if e["path"] == "/fapi/v1/order" and e["method"] == "POST"]
        sent_after = [e for e in sent_after if e["t_ms"] > halted_ms]
        looked_up = [e for e in log if e["path"] == "/fapi/v1/order" and e["method"] == "GET"]
        looked_up = [e for e in looked_up if e["t_ms"] > halted_ms]
        expired = [
            u
            for u in updates
            if u.status is OrderStatus.EXPIRED and "intent_expired" in (u.reason or "")
        ]
        print(
            f"flood: max backlog {max(backlog_seen)} (bound {bound}), expired by ttl "
            f"{int(expired_by_ttl)}, backlog_full denials {int(backlog_full)}, orders after the "
            f"halt {len(sent_after)}, look-ups after it {len(looked_up)} (counted "
            f"{int(halted_lookups)}), latch {latch.revision}"
        )
        assert max(backlog_seen) <= bound
        degraded = [h for h in health_seen if h.startswith("DEGRADED")]
        assert degraded, health_seen
        assert "intents decided and not final" in degraded[0]
        assert "oldest" in degraded[0]
        assert backlog_full > 0
        assert expired, "intents past their ttl ended EXPIRED"
        assert sent_after == []
        assert len(looked_up) <= halted_lookups
        assert report.trades > 0


def _dependency(worker: Worker, name: str) -> str | None:
    for dependency in worker.health().get("dependencies", []):  # type: ignore[attr-defined]
        if dependency["name"] == name:
            return str(dependency["status"])
    return None


def _detail(worker: Worker, name: str) -> str | None:
    for dependency in worker.health().get("dependencies", []):  # type: ignore[attr-defined]
        if dependency["name"] == name:
            return f"{dependency['status']}: {dependency.get('detail')}"
    return None
