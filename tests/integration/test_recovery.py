"""Restart recovery: a portfolio killed with SIGKILL mid-stream comes back to the same cents,
and a fill or an order intent delivered twice has one effect, also across a kill.

Real processes on a real nats-server. The fills are published by the test (2,000 of them, with
flips, partial closes and fees, over two symbols); the truth they are checked against is an
independent exact account (``Fraction``s) and an uninterrupted portfolio run over the same
stream.
"""

from __future__ import annotations

import asyncio
import random
import time
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    Candle,
    Fill,
    OrderIntent,
    OrderStatus,
    PortfolioSnapshot,
    RiskAlert,
    RiskAlertKind,
    Side,
    TradingState,
)
from qtrader.contracts.policy import parse_policy
from qtrader.execution.decisions import client_order_id_for
from qtrader.local.control import heartbeat_forever, publish_policy, write_latch
from qtrader.local.nats_server import EmbeddedNats
from qtrader_tools.candles import flat_candle
from support.flow import order_updates
from support.ledger_check import cents, independent_portfolio, last_snapshot
from support.streams import publish_raw, read_all
from support.workers import Worker, eventually, start_worker

pytestmark = pytest.mark.integration

FILLS = 2_000
CAPITAL = Decimal(10_000)
MARKS = {"BTCUSDT": Decimal("30123.4"), "ETHUSDT": Decimal("2011.27")}
POLICY = parse_policy(
    {
        "apiVersion": "qtrader.dev/v1alpha1",
        "kind": "TradingPolicy",
        "metadata": {"name": "recovery-test"},
        "spec": {"symbols": list(MARKS), "paper": {"initialCapitalUsd": str(CAPITAL)}},
    }
)


def fill_stream(seed: int = 3) -> list[Fill]:
    """Buys and sells of random size around a drifting price: opens, adds, partial closes,
    flips through zero; fees at 4 bps, rounded to 1e-8 like the paper exchange's."""
    rng = random.Random(seed)
    fills = []
    for index in range(FILLS):
        symbol = rng.choice(list(MARKS))
        base = MARKS[symbol]
        tick = Decimal("0.1") if symbol == "BTCUSDT" else Decimal("0.01")
        price = (base * Decimal(rng.randint(9_500, 10_500)) / 10_000).quantize(tick)
        quantity = Decimal(rng.randint(1, 40)) * Decimal("0.001")
        fee = (price * quantity * 4 / 10_000).quantize(Decimal("1e-8"))
        fills.append(
            Fill(
                fill_id=f"recovery-{index}",
                client_order_id=f"qt-recovery-{index}",
                symbol=symbol,
                side=rng.choice([Side.BUY, Side.SELL]),
                quantity=quantity,
                price=price,
                fee=fee,
                ts_ms=1_700_000_000_000 + index,
            )
        )
    return fills


def mark_candle(symbol: str, price: Decimal, minute: int = 0) -> Candle:
    return flat_candle(symbol, price, open_time_ms=1_800_000_000_000 + minute * 60_000)


async def settled(
    worker: Worker, bus: Bus, url: str, fills: int, *, since_ms: int
) -> PortfolioSnapshot:
    """``worker``'s snapshot once every fill is applied and both marks are in (candles keep
    coming, as from a live feed: the portfolio takes prices from the candles published while it
    runs). Only snapshots made since ``since_ms`` (its start) count: the previous portfolio's
    last one is on the stream too, and would pass for this one's."""
    result: list[PortfolioSnapshot] = []
    minute = 0

    async def check() -> bool:
        snapshot = await last_snapshot(url)
        if snapshot is not None and snapshot.ts_ms < since_ms:
            snapshot = None
        marked = snapshot is not None and all(
            p.mark_price == MARKS[p.symbol] for p in snapshot.positions
        )
        if snapshot is not None and snapshot.fills_applied == fills and marked:
            result.append(snapshot)
            return True
        return False

    deadline = asyncio.get_running_loop().time() + 60
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"{worker.role} did not settle"
        minute += 1
        for symbol, price in MARKS.items():
            await bus.publish(subjects.candle_subject(symbol), mark_candle(symbol, price, minute))
        await asyncio.sleep(0.2)
    return result[0]


@pytest.mark.invariants_exempt(
    "exposure", "orders", reason="the test plays the venue: its 2,000 fills belong to no order"
)
async def test_portfolio_killed_mid_stream_comes_back_to_the_same_cents(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    url = nats_server.url
    bus = Bus(url=url, client_name="test-recovery")
    await bus.connect()
    await bus.ensure_topology()
    await publish_policy(bus, POLICY)
    fills = fill_stream()
    first = start_worker("portfolio", nats_url=url, log_dir=tmp_path)
    try:
        for fill in fills[: FILLS // 2]:
            await bus.publish(subjects.fill_subject(fill.symbol), fill)

        async def mid_stream() -> bool:
            snapshot = await last_snapshot(url)
            return snapshot is not None and snapshot.fills_applied >= FILLS // 4

        deadline = asyncio.get_running_loop().time() + 30
        while not await mid_stream():
            assert asyncio.get_running_loop().time() < deadline, "portfolio applied nothing"
            await asyncio.sleep(0.05)
        first.stop(kill=True)  # SIGKILL: no shutdown path runs

        for fill in fills[FILLS // 2 :]:  # the stream goes on while it is down
            await bus.publish(subjects.fill_subject(fill.symbol), fill)

        started_ms = int(time.time() * 1000)
        restarted = start_worker("portfolio", nats_url=url, log_dir=tmp_path)
        recovered = await settled(restarted, bus, url, FILLS, since_ms=started_ms)
        restarted.stop()

        started_ms = int(time.time() * 1000)
        uninterrupted = start_worker("portfolio", nats_url=url, log_dir=tmp_path)
        clean = await settled(uninterrupted, bus, url, FILLS, since_ms=started_ms)
        uninterrupted.stop()
    finally:
        first.stop()
        await bus.close()

    for field in ("realized_pnl", "unrealized_pnl", "fees", "equity", "positions"):
        assert getattr(recovered, field) == getattr(clean, field), field
    realized, fees, unrealized, quantities = independent_portfolio(fills, MARKS)
    assert cents(recovered.realized_pnl) == cents(realized)
    assert cents(recovered.fees) == cents(fees)
    assert cents(recovered.unrealized_pnl) == cents(unrealized)
    assert cents(recovered.equity) == cents(Fraction(CAPITAL) + realized - fees + unrealized)
    by_symbol = {p.symbol: p.quantity for p in recovered.positions}
    for symbol, quantity in quantities.items():
        assert by_symbol.get(symbol, Decimal(0)) == quantity


@pytest.mark.invariants_exempt(
    "exposure",
    "orders",
    "duplicates",
    reason="the test plays the venue and stores each fill twice, to prove it counts once",
)
async def test_the_same_fill_delivered_twice_counts_once(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    url = nats_server.url
    bus = Bus(url=url, client_name="test-duplicates")
    await bus.connect()
    await bus.ensure_topology()
    await publish_policy(bus, POLICY)
    fills = fill_stream()[:20]
    worker = start_worker("portfolio", nats_url=url, log_dir=tmp_path)
    try:
        for fill in fills:
            await bus.publish(subjects.fill_subject(fill.symbol), fill)
            # The same fill again under another message id: past JetStream's de-duplication,
            # as a producer restarted after the duplicate window would send it.
            await publish_raw(
                url,
                subjects.fill_subject(fill.symbol),
                fill.encode(),
                msg_id=f"again-{fill.fill_id}",
            )

        async def applied() -> bool:
            snapshot = await last_snapshot(url)
            return snapshot is not None and snapshot.fills_applied == len(fills)

        deadline = asyncio.get_running_loop().time() + 30
        while not await applied():
            assert asyncio.get_running_loop().time() < deadline, "fills not applied"
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # and no more than that, once the duplicates are read too
        snapshot = await last_snapshot(url)
    finally:
        worker.stop()
        await bus.close()
    assert snapshot is not None
    assert snapshot.fills_applied == len(fills)
    realized, fees, _, _ = independent_portfolio(fills, MARKS)
    assert cents(snapshot.fees) == cents(fees)
    assert cents(snapshot.realized_pnl) == cents(realized)


@pytest.mark.invariants_exempt(
    "duplicates",
    "ledger",
    reason="the test stores the intent again (new message ids) and plays the portfolio",
)
async def test_the_same_intent_delivered_again_makes_one_order_even_after_a_kill(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    url = nats_server.url
    bus = Bus(url=url, client_name="test-intents")
    await bus.connect()
    await bus.ensure_topology()
    await publish_policy(bus, POLICY)
    await write_latch(bus, state=TradingState.ACTIVE, reason="test", issued_by="test")
    # The test plays the portfolio: an order is sent only while equity is known.
    await bus.publish(subjects.PORTFOLIO_SNAPSHOT, _equity_snapshot(Decimal(10_000)))
    heartbeat = asyncio.create_task(heartbeat_forever(bus, issued_by="test", interval_s=0.2))
    stop_prices = asyncio.Event()

    async def prices() -> None:  # the paper exchange fills at the latest close
        minute = 0
        while not stop_prices.is_set():
            minute += 1
            candle = mark_candle("BTCUSDT", Decimal(30_000), minute)
            await bus.publish(subjects.candle_subject("BTCUSDT"), candle)
            await asyncio.sleep(0.2)

    feed = asyncio.create_task(prices())
    intent_id = "sig-recovery-intent"
    intent = OrderIntent(
        intent_id=intent_id,
        client_order_id=client_order_id_for(intent_id),
        symbol="BTCUSDT",
        side=Side.BUY,
        quantity=Decimal("0.010"),
        reference_price=Decimal(30_000),
        policy_revision=1,
        # Within its time to live when first sent (an older intent is never sent: it ends
        # EXPIRED); each redelivery is recognised by its final update on the ORDERS stream,
        # whatever its age by then.
        created_at_ms=int(time.time() * 1000),
    )
    subject = subjects.order_intent_subject("BTCUSDT")

    def handled(worker: Worker) -> float:
        """Intents this worker drove to a final state (its own metric)."""
        return worker.metric("qtrader_orders_sent_total", exchange="paper")

    async def wait_handled(worker: Worker, count: int) -> None:
        await eventually(
            lambda: handled(worker) >= count, timeout_s=30, what="the intent", worker=worker
        )

    async def wait_came_again(worker: Worker) -> None:
        await eventually(
            lambda: f"intent {intent_id} came again after its final update" in worker.log(),
            timeout_s=30,
            what="the intent delivered again",
            worker=worker,
        )

    first = start_worker("execution", nats_url=url, log_dir=tmp_path)
    try:
        await eventually(lambda: _trading(first), timeout_s=15, what="ACTIVE", worker=first)
        await bus.publish(subject, intent)
        await wait_handled(first, 1)
        # Delivered again after its final update: acknowledged, nothing sent, looked up or
        # published (driven again, it would end twice).
        await publish_raw(url, subject, intent.encode(), msg_id="again-1")
        await wait_came_again(first)
        assert handled(first) == 1
        assert first.metric("qtrader_order_attempts_recovered_total") == 0
        first.stop(kill=True)
        second = start_worker("execution", nats_url=url, log_dir=tmp_path)
        try:
            await eventually(lambda: _trading(second), timeout_s=15, what="ACTIVE", worker=second)
            await publish_raw(url, subject, intent.encode(), msg_id="again-2")
            # Known final from the ORDERS stream the restarted worker replayed.
            await wait_came_again(second)
            assert handled(second) == 0
            assert second.metric("qtrader_order_attempts_recovered_total") == 0
        finally:
            second.stop()
    finally:
        first.stop()
        stop_prices.set()
        await feed
        heartbeat.cancel()
        await bus.close()

    fills = await read_all(url, stream="QT_FILLS", subject="qtrader.fill.*", message_type=Fill)
    assert [f.client_order_id for f in fills] == [intent.client_order_id]  # one order, once
    updates = await order_updates(url)
    finals = {u.status for u in updates if u.intent_id == intent_id and u.status.is_final}
    assert finals == {OrderStatus.FILLED}


def _equity_snapshot(equity: Decimal) -> PortfolioSnapshot:
    return PortfolioSnapshot(
        sequence=1,
        ts_ms=int(time.time() * 1000),
        fills_applied=0,
        initial_capital=equity,
        realized_pnl=Decimal(0),
        unrealized_pnl=Decimal(0),
        fees=Decimal(0),
        equity=equity,
        peak_equity=equity,
        drawdown_pct=Decimal(0),
        max_drawdown_pct=Decimal(0),
        positions=(),
    )


def _trading(worker: Worker) -> bool:
    dependencies = worker.health().get("dependencies", [])
    assert isinstance(dependencies, list)
    return any(d["name"] == "halt-latch" and d["status"] == "OK" for d in dependencies)


@pytest.mark.invariants_exempt(
    "exposure", "orders", reason="the test plays the venue: an oversized fill of no order"
)
async def test_a_drawdown_beyond_the_policy_limit_raises_one_risk_alert(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """The portfolio raises the trip input: a long position marked 2% down with a 1% limit."""
    url = nats_server.url
    bus = Bus(url=url, client_name="test-drawdown")
    await bus.connect()
    await bus.ensure_topology()
    limited = POLICY.model_copy(
        update={
            "spec": POLICY.spec.model_copy(
                update={
                    "risk": POLICY.spec.risk.model_copy(update={"max_drawdown_pct": Decimal(1)})
                }
            )
        }
    )
    await publish_policy(bus, limited)
    worker = start_worker("portfolio", nats_url=url, log_dir=tmp_path)
    try:
        buy = Fill(
            fill_id="dd-1",
            client_order_id="qt-dd-1",
            symbol="BTCUSDT",
            side=Side.BUY,
            quantity=Decimal("0.1"),
            price=Decimal(30_000),
            fee=Decimal(0),
            ts_ms=1_700_000_000_000,
        )
        await bus.publish(subjects.fill_subject("BTCUSDT"), buy)
        # 0.1 BTC on 10,000 of capital: 1%, 3% and 4% below the peak.
        for minute, price in enumerate(("30000", "29000", "27000", "26000"), start=1):
            candle = mark_candle("BTCUSDT", Decimal(price), minute)
            await bus.publish(subjects.candle_subject("BTCUSDT"), candle)
            await asyncio.sleep(1.0)  # past the snapshot interval: each price gets a snapshot

        async def alerts() -> list[RiskAlert]:
            return await read_all(
                url, stream="QT_RISK", subject="qtrader.risk.alert.*", message_type=RiskAlert
            )

        deadline = asyncio.get_running_loop().time() + 15
        while not await alerts():
            assert asyncio.get_running_loop().time() < deadline, worker.log()
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.5)  # deeper drawdown, same episode: no second alert
        found = await alerts()
    finally:
        worker.stop()
        await bus.close()
    (alert,) = found
    assert alert.alert_kind is RiskAlertKind.DRAWDOWN
    assert alert.threshold == Decimal(1)
    assert alert.value >= Decimal(1)
