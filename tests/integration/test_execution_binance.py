"""An execution worker in testnet mode trading on the local Binance-compatible server.

Real processes (execution, portfolio) on a real nats-server; python-binance inside the worker
talks HTTP to the simulator. The test plays the control plane and the upstream pipeline. It
checks what reached the exchange from the exchange's own records, and that a 418 ban stops the
order flow, makes /health CRITICAL and raises the exchange-ban risk alert.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import Fill, OrderStatus, RiskAlert, RiskAlertKind, TradingState
from qtrader.contracts.policy import parse_policy
from qtrader.local.control import heartbeat_forever, publish_policy, write_latch
from qtrader.local.nats_server import EmbeddedNats
from qtrader_tools.simulators.binance_futures import SimAdmin, SimConfig
from support.binance_sim import KEY, SECRET, sim_in_thread
from support.flow import flowing, order_updates
from support.ledger_check import last_snapshot
from support.streams import read_all
from support.workers import Worker, eventually, start_worker, stop_pipeline

pytestmark = pytest.mark.integration

INTENTS = subjects.EXECUTION_INTENTS.durable  # the intent consumer, as its metrics name it

POLICY = parse_policy(
    {
        "apiVersion": "qtrader.dev/v1alpha1",
        "kind": "TradingPolicy",
        "metadata": {"name": "testnet-test"},
        "spec": {
            "mode": "testnet",
            "symbols": ["BTCUSDT"],
            "risk": {"minConfidence": 0.0, "maxPositionUsd": "1000", "maxSlippageBps": 100},
        },
    }
)


@pytest.fixture
def exchange() -> Iterator[SimAdmin]:
    config = SimConfig.from_dict({"prices": {"BTCUSDT": "30000"}})
    with sim_in_thread(config) as url, SimAdmin(url) as admin:
        yield admin


def _execution(url: str, exchange_url: str, tmp_path: Path, *extra: str) -> Worker:
    env = {"QTRADER_BINANCE_API_KEY": KEY, "QTRADER_BINANCE_API_SECRET": SECRET}
    args = ("--worker-id", "exec-binance", "--exchange-url", exchange_url, "--unknown-grace", "1")
    args += extra
    return start_worker("execution", nats_url=url, log_dir=tmp_path, args=args, env=env)


async def _until_filled_on_the_stream(url: str, *, timeout_s: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not any(u.status is OrderStatus.FILLED for u in await order_updates(url)):
        assert asyncio.get_running_loop().time() < deadline, "no FILLED update on ORDERS"
        await asyncio.sleep(0.2)


async def test_testnet_worker_trades_on_the_exchange_and_a_ban_stops_it(
    nats_server: EmbeddedNats, exchange: SimAdmin, tmp_path: Path
) -> None:
    url = nats_server.url
    bus = Bus(url=url, client_name="test-control")
    await bus.connect()
    await bus.ensure_topology()
    await publish_policy(bus, POLICY)
    await write_latch(bus, state=TradingState.ACTIVE, reason="test", issued_by="test")
    heartbeat = asyncio.create_task(heartbeat_forever(bus, issued_by="test", interval_s=0.2))
    workers = [start_worker("portfolio", nats_url=url, log_dir=tmp_path)]
    execution = _execution(url, exchange.base_url, tmp_path)
    workers.append(execution)
    try:
        async with flowing(bus):
            await eventually(
                lambda: len([o for o in exchange.orders() if o["status"] == "FILLED"]) >= 3,
                timeout_s=30,
                what="three orders filled at the exchange",
                worker=execution,
            )
            await eventually(
                lambda: bool(exchange.countdowns()),
                timeout_s=5,
                what="the dead-man countdown armed while trading",
                worker=execution,
            )
            # The venue books an order before the worker reads its trades and publishes it
            # FILLED: under load the ban could cut all three reads short (each then UNKNOWN,
            # rightly). The ban must come after at least one order was reported filled.
            await _until_filled_on_the_stream(url, timeout_s=30)

            exchange.faults([{"route": "*", "kind": "http_418", "next": 1, "retry_after_s": 60}])
            await eventually(
                lambda: _dependency(execution, "exchange") == "CRITICAL",
                timeout_s=15,
                what="/health CRITICAL after the ban",
                worker=execution,
            )
            banned_at = next(e["t_ms"] for e in exchange.log() if e["status"] == 418)
            await asyncio.sleep(2.0)  # signals keep coming during the ban
        after_ban = [e for e in exchange.log() if e["t_ms"] > banned_at]
        assert after_ban == [], "no request may leave the worker while it is banned"

        alerts = await read_all(
            url, stream="QT_RISK", subject="qtrader.risk.alert.*", message_type=RiskAlert
        )
        assert [a.alert_kind for a in alerts] == [RiskAlertKind.EXCHANGE_BAN]
        assert alerts[0].value > 0  # seconds of ban left when raised

        updates = await order_updates(url)
        filled = [u for u in updates if u.status is OrderStatus.FILLED]
        assert {u.exchange for u in filled} == {"binance"}
        booked = [o["clientOrderId"] for o in exchange.orders() if o["status"] == "FILLED"]
        for update in filled:  # each filled intent is at the exchange, under its own id stem
            assert any(c.startswith(update.client_order_id[:32]) for c in booked), update
        fills = await read_all(url, stream="QT_FILLS", subject="qtrader.fill.*", message_type=Fill)
        trades = exchange.trades()
        # Every trade is on FILLS, except one of an order the ban cut off between its booking
        # and the reading of its trades: that order's outcome is UNKNOWN (left for
        # reconciliation), never reported as failed and never sent again.
        published = {f.fill_id for f in fills}
        unread = [t for t in trades if f"binance-BTCUSDT-{t['id']}" not in published]
        client_ids = {o["orderId"]: str(o["clientOrderId"]) for o in exchange.orders()}
        last = {u.intent_id: u for u in updates}  # the stream keeps them in order
        unknown = {u.client_order_id[:32] for u in last.values() if u.status is OrderStatus.UNKNOWN}
        assert all(client_ids[t["orderId"]][:32] in unknown for t in unread), (unread, unknown)
        assert len(unread) <= 1
        assert len(fills) >= 3
        assert sum(Decimal(t["commission"]) for t in trades) > 0
        late = [u for u in updates if u.ts_ms > banned_at and u.status is OrderStatus.FILLED]
        assert late == []
    finally:
        heartbeat.cancel()
        await stop_pipeline(workers, nats_url=url)
        await bus.close()


def _dependency(worker: Worker, name: str) -> str | None:
    for dependency in worker.health().get("dependencies", []):
        if dependency["name"] == name:
            return str(dependency["status"])
    return None


async def test_an_order_a_ban_left_unknown_is_resolved_once_the_ban_is_over(
    nats_server: EmbeddedNats, exchange: SimAdmin, tmp_path: Path
) -> None:
    """The 418 answers the trades of a booked order: the worker leaves it UNKNOWN (its /health
    says so), looks it up again after the ban, and its trade reaches FILLS with a final
    update; every trade at the exchange is then on FILLS."""
    url = nats_server.url
    bus = Bus(url=url, client_name="test-resolve")
    await bus.connect()
    await bus.ensure_topology()
    await publish_policy(bus, POLICY)
    await write_latch(bus, state=TradingState.ACTIVE, reason="test", issued_by="test")
    heartbeat = asyncio.create_task(heartbeat_forever(bus, issued_by="test", interval_s=0.2))
    workers = [start_worker("portfolio", nats_url=url, log_dir=tmp_path)]
    # The ban answers the REST read of an order's trades: the worker must make one.
    execution = _execution(url, exchange.base_url, tmp_path, "--no-user-stream")
    workers.append(execution)
    try:
        ban = {"route": "GET /fapi/v1/userTrades", "kind": "http_418", "next": 1}
        exchange.faults([{**ban, "retry_after_s": 3}])
        async with flowing(bus):
            await eventually(
                lambda: execution.metric("qtrader_orders_unknown") == 1,
                timeout_s=30,
                what="an order left UNKNOWN by the ban",
                worker=execution,
            )
        await eventually(
            lambda: execution.metric("qtrader_orders_unknown") == 0,
            timeout_s=30,
            what="the unknown order resolved after the ban",
            worker=execution,
        )
        fills = await read_all(url, stream="QT_FILLS", subject="qtrader.fill.*", message_type=Fill)
        trades = exchange.trades()
        assert {f.fill_id for f in fills} == {f"binance-BTCUSDT-{t['id']}" for t in trades}
        updates = await order_updates(url)
        went_unknown = {u.intent_id for u in updates if u.status is OrderStatus.UNKNOWN}
        last = {u.intent_id: u for u in updates}
        assert went_unknown
        assert all(last[i].status.is_final for i in went_unknown)
        booked = [str(o["clientOrderId"]) for o in exchange.orders()]
        for intent_id in went_unknown:  # booked once, and resolving sent nothing more
            stem = last[intent_id].client_order_id[:32]
            assert len([c for c in booked if c.startswith(stem)]) == 1
    finally:
        heartbeat.cancel()
        await stop_pipeline(workers, nats_url=url)
        await bus.close()


async def test_commissions_paid_in_bnb_are_valued_at_the_venues_bnb_price_when_charged(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """A BNB-burn account: each fill keeps its fee in BNB as the venue charged it, valued in
    USDT at the venue's BNBUSDT price when its trades were read; a later price values later
    fees only. The portfolio's equity is then complete, its BNB fees the venue's to the unit."""
    config = SimConfig.from_dict({"prices": {"BTCUSDT": "30000", "BNBUSDT": "612.5"}})
    url = nats_server.url
    with sim_in_thread(config) as exchange_url, SimAdmin(exchange_url) as exchange:
        exchange.transfer(KEY, "BNB", "2")
        exchange.fee_burn(KEY, True)
        bus = Bus(url=url, client_name="test-control")
        await bus.connect()
        await bus.ensure_topology()
        await publish_policy(bus, POLICY)
        await write_latch(bus, state=TradingState.ACTIVE, reason="test", issued_by="test")
        heartbeat = asyncio.create_task(heartbeat_forever(bus, issued_by="test", interval_s=0.2))
        workers = [start_worker("portfolio", nats_url=url, log_dir=tmp_path)]
        execution = _execution(url, exchange_url, tmp_path)
        workers.append(execution)
        try:
            async with flowing(bus):
                await _until_trades(exchange, 2, execution)
                await _until_published(url, 2, execution)
                before = {f.fill_id for f in await _fills(url)}
                exchange.price("BNBUSDT", "640")
                moved_at = int(time.time() * 1000)  # the venue clock runs unskewed
                await _until_trades(exchange, len(exchange.trades()) + 2, execution)
        finally:
            heartbeat.cancel()
            await stop_pipeline(workers, nats_url=url)
            await bus.close()
        trades = {f"binance-BTCUSDT-{t['id']}": t for t in exchange.trades()}
        fills = await _fills(url)
    assert {f.fill_id for f in fills} == set(trades)
    for fill in fills:
        trade = trades[fill.fill_id]
        assert (fill.fee, fill.fee_asset) == (Decimal(trade["commission"]), "BNB")
        # Valued when read: a trade booked before the move and read after it takes either.
        if fill.fill_id in before:
            assert fill.fee_usdt == fill.fee * Decimal("612.5"), fill
        elif int(trade["time"]) > moved_at:
            assert fill.fee_usdt == fill.fee * Decimal("640"), fill
        assert fill.fee_usdt in (fill.fee * Decimal("612.5"), fill.fee * Decimal("640"))
    snapshot = await last_snapshot(url)
    assert snapshot is not None
    assert snapshot.unvalued_fees == ()
    spent = sum((Decimal(t["commission"]) for t in trades.values()), Decimal(0))
    assert {a.asset: a.amount for a in snapshot.fees_by_asset} == {"BNB": spent}


async def _until_trades(exchange: SimAdmin, count: int, worker: Worker) -> None:
    await eventually(
        lambda: len(exchange.trades()) >= count,
        timeout_s=30,
        what=f"{count} trades at the exchange",
        worker=worker,
    )


async def _fills(url: str) -> list[Fill]:
    return await read_all(url, stream="QT_FILLS", subject="qtrader.fill.*", message_type=Fill)


async def _until_published(url: str, count: int, worker: Worker) -> None:
    deadline = asyncio.get_running_loop().time() + 30
    while len(await _fills(url)) < count:
        assert asyncio.get_running_loop().time() < deadline, worker.log()[-3000:]
        await asyncio.sleep(0.1)


async def test_a_worker_stopped_with_an_order_at_the_venue_publishes_its_fill_before_it_exits(
    nats_server: EmbeddedNats, exchange: SimAdmin, tmp_path: Path
) -> None:
    """SIGTERM (a scale-down, the kill switch scaling execution to 0, a rollout) while an
    order is booked and its trades are still being read: the worker finishes that order, fill
    and final update, before it exits; it takes no further intent."""
    url = nats_server.url
    bus = Bus(url=url, client_name="test-control")
    await bus.connect()
    await bus.ensure_topology()
    await publish_policy(bus, POLICY)
    await write_latch(bus, state=TradingState.ACTIVE, reason="test", issued_by="test")
    heartbeat = asyncio.create_task(heartbeat_forever(bus, issued_by="test", interval_s=0.2))
    portfolio = start_worker("portfolio", nats_url=url, log_dir=tmp_path)  # execution's equity
    # Trades over REST, and the read of the first order's trades slow: the stop lands in it.
    execution = _execution(url, exchange.base_url, tmp_path, "--no-user-stream")
    try:
        exchange.faults(
            [{"route": "GET /fapi/v1/userTrades", "kind": "latency_ms", "latency_ms": 3000,
              "next": 1}]
        )  # fmt: skip
        async with flowing(bus):
            await eventually(
                lambda: bool(exchange.trades()),
                timeout_s=30,
                what="an order booked and filled at the exchange",
                worker=execution,
            )
        await asyncio.to_thread(execution.stop)  # SIGTERM, mid-read of its trades
    finally:
        heartbeat.cancel()
        await stop_pipeline([execution, portfolio], nats_url=url)
        await bus.close()
    trades = exchange.trades()
    fills = await _fills(url)
    assert {f.fill_id for f in fills} == {f"binance-BTCUSDT-{t['id']}" for t in trades}
    updates = await order_updates(url)
    final = {u.client_order_id[:32] for u in updates if u.status.is_final}
    booked = {str(o["clientOrderId"])[:32] for o in exchange.orders()}
    assert booked <= final, "every order booked has its final update"


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
async def test_an_order_left_unknown_by_a_dead_or_hung_worker_is_resolved_by_the_next(
    nats_server: EmbeddedNats, exchange: SimAdmin, tmp_path: Path, fault: signal.Signals
) -> None:
    """The worker that left an order UNKNOWN is SIGKILLed, or SIGSTOPped (hung, its connection
    open), before it can look it up again; a worker with another id (a pod rescheduled under a
    new name) resolves it: its trade reaches FILLS with a final update, and nothing more is
    sent. (Kept only in the memory of the worker that sent it, it was never resolved: its fills
    never reached the portfolio, and its reservation held the symbol in every replica's
    book.)"""
    url = nats_server.url
    bus = Bus(url=url, client_name="test-orphan")
    await bus.connect()
    await bus.ensure_topology()
    await publish_policy(bus, POLICY)
    await write_latch(bus, state=TradingState.ACTIVE, reason="test", issued_by="test")
    heartbeat = asyncio.create_task(heartbeat_forever(bus, issued_by="test", interval_s=0.2))
    workers = [start_worker("portfolio", nats_url=url, log_dir=tmp_path)]
    first = _execution(url, exchange.base_url, tmp_path, "--no-user-stream")
    try:
        ban = {"route": "GET /fapi/v1/userTrades", "kind": "http_418", "next": 1}
        exchange.faults([{**ban, "retry_after_s": 3}])
        async with flowing(bus):
            # Left UNKNOWN, its intent handed back to the server (to come again in 5 s): from
            # here on only the server holds it; the worker that sent it remembered it alone.
            await eventually(
                lambda: first.metric("qtrader_messages_deferred_total", consumer=INTENTS) >= 1,
                timeout_s=30,
                what="an order left UNKNOWN by the ban, its intent handed back",
                worker=first,
            )
            assert first.metric("qtrader_orders_unknown") == 1
            os.kill(first.process.pid, fault)
        updates = await order_updates(url)
        went_unknown = {u.intent_id for u in updates if u.status is OrderStatus.UNKNOWN}
        assert went_unknown
        second = _execution(
            url, exchange.base_url, tmp_path, "--no-user-stream", "--worker-id", "exec-other"
        )
        workers.append(second)

        async def every_unknown_ended() -> bool:
            last = {u.intent_id: u for u in await order_updates(url)}
            return all(last[i].status.is_final for i in went_unknown)

        deadline = time.monotonic() + 60
        while not await every_unknown_ended():
            assert time.monotonic() < deadline, f"never resolved:\n{second.log()[-3000:]}"
            await asyncio.sleep(0.5)
        last = {u.intent_id: u for u in await order_updates(url)}
        assert {last[i].worker_id for i in went_unknown} == {"exec-other"}
        fills = await read_all(url, stream="QT_FILLS", subject="qtrader.fill.*", message_type=Fill)
        trades = exchange.trades()
        assert {f.fill_id for f in fills} == {f"binance-BTCUSDT-{t['id']}" for t in trades}
        booked = [str(o["clientOrderId"]) for o in exchange.orders()]
        for intent_id in went_unknown:  # booked once, and resolving sent nothing more
            stem = last[intent_id].client_order_id[:32]
            assert len([c for c in booked if c.startswith(stem)]) == 1
        await eventually(
            lambda: second.metric("qtrader_orders_unknown") == 0,
            timeout_s=10,
            what="no order left unknown",
            worker=second,
        )
    finally:
        heartbeat.cancel()
        first.stop(kill=True)
        await stop_pipeline(workers, nats_url=url)
        await bus.close()


async def test_a_worker_started_during_a_ban_waits_it_out_then_trades(
    nats_server: EmbeddedNats, exchange: SimAdmin, tmp_path: Path
) -> None:
    """Started while the IP is banned (its first request is answered 418), the worker neither
    exits nor asks again before the ban ends (on Binance a request in a ban lengthens it); its
    /health says CRITICAL meanwhile. Then it starts and trades. (It exited: its orchestrator's
    restarts asked during the ban, and an order it had left unknown waited for them.)"""
    url = nats_server.url
    bus = Bus(url=url, client_name="test-start-banned")
    await bus.connect()
    await bus.ensure_topology()
    await publish_policy(bus, POLICY)
    await write_latch(bus, state=TradingState.ACTIVE, reason="test", issued_by="test")
    heartbeat = asyncio.create_task(heartbeat_forever(bus, issued_by="test", interval_s=0.2))
    ban_s = 4
    exchange.faults(
        [
            {
                "route": "GET /fapi/v1/exchangeInfo",
                "kind": "http_418",
                "next": 1,
                "retry_after_s": ban_s,
            }
        ]
    )
    workers = [start_worker("portfolio", nats_url=url, log_dir=tmp_path)]
    execution = _execution(url, exchange.base_url, tmp_path, "--no-user-stream")
    workers.append(execution)
    try:
        await eventually(
            lambda: "banned" in str(execution.dependency("exchange").get("detail")),
            timeout_s=10,
            what="/health naming the ban",
            worker=execution,
        )
        assert execution.dependency("exchange")["status"] == "CRITICAL"
        for reader in ("account-entries", "venue-account"):  # nothing of the venue is read yet
            waiting = execution.dependency(reader)
            assert (waiting["status"], waiting["detail"]) == (
                "DEGRADED",
                "waiting for the venue to start",
            ), reader
        async with flowing(bus):
            await _until_filled_on_the_stream(url, timeout_s=30)
        assert execution.process.poll() is None
        requests = exchange.log()
        banned_at = requests[0]["t_ms"]
        during = [r for r in requests[1:] if r["t_ms"] < banned_at + ban_s * 1000]
        assert during == [], f"asked during the ban: {during}"
    finally:
        heartbeat.cancel()
        await stop_pipeline(workers, nats_url=url)
        await bus.close()
