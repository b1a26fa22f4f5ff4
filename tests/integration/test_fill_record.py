"""A fill the worker cannot record holds the next order back: FILLS keeps the venue's order.

A real execution and portfolio worker on a real nats-server, trading in testnet mode on the
local Binance-compatible server, with a disk outbox of one message. The first order is booked
and its trades are read slowly (the venue leaves the first reads unanswered); meanwhile the
broker hangs (SIGSTOP) and the next signal's intent takes the outbox's only place. When the
trades come, their fill can be neither sent nor kept. It is a fact of the venue's, in the book
already: the worker must not send the next order until it is recorded. Sent before it (the
failed fill's intent handed back to the broker, the next intent taken meanwhile), FILLS would
hold the second trade before the first: the paper exchange's only record would show a position
the venue never held, and a ledger applying them in that order would split realized and
unrealized PnL otherwise than the venue (seen in CI, in paper mode: a short of three times the
limit on FILLS).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from qtrader.contracts import subjects
from qtrader.contracts.messages import Direction, Fill, OrderIntent, Signal
from qtrader.contracts.policy import parse_policy
from qtrader.local.nats_server import EmbeddedNats
from qtrader_tools.simulators.binance_futures import SimAdmin, SimConfig
from support.binance_sim import KEY, SECRET, sim_in_thread
from support.flow import control_plane
from support.hang import hang, resume
from support.streams import read_all
from support.workers import Worker, eventually, start_worker, stop_pipeline

pytestmark = pytest.mark.integration

PRICE = Decimal(30_000)
# The first order's trades: the venue leaves the first reads unanswered, and the client gives up
# on each after its timeout (5 s), so they come more than TRADES_READS_LOST * 5 s after booking.
TRADES_READS_LOST = 2
# The second signal is decided this long after the first: after the broker hangs, before the
# trades come. Wide margins both ways for a loaded machine (CI's two test processes and workers).
CYCLE_S = 7
POLICY = parse_policy(
    {
        "apiVersion": "qtrader.dev/v1alpha1",
        "kind": "TradingPolicy",
        "metadata": {"name": "fill-record-test"},
        "spec": {
            "mode": "testnet",
            "symbols": ["BTCUSDT"],
            "risk": {"minConfidence": 0.0, "maxPositionUsd": "1000", "maxSlippageBps": 100},
            "signals": {"maxPerCycle": 1, "ttlSeconds": 600, "intentTtlSeconds": 600},
        },
    }
)


@pytest.fixture
def exchange() -> Iterator[SimAdmin]:
    config = SimConfig.from_dict({"prices": {"BTCUSDT": str(PRICE)}})
    with sim_in_thread(config) as url, SimAdmin(url) as admin:
        yield admin


def _signal(index: int, direction: Direction) -> Signal:
    now_ms = int(time.time() * 1000)
    return Signal(
        signal_id=f"fill-record:{index}",
        symbol="BTCUSDT",
        direction=direction,
        confidence=0.9,
        model_version="test",
        candle_open_time_ms=now_ms,
        price=PRICE,
        created_at_ms=now_ms,
    )


def _execution(url: str, exchange_url: str, tmp_path: Path) -> Worker:
    env = {"QTRADER_BINANCE_API_KEY": KEY, "QTRADER_BINANCE_API_SECRET": SECRET}
    # Trades read over REST (the slow read is the gap the hang lands in); the control plane's
    # heartbeat stops with the broker, and a halt for it is not what this test is about.
    args = (
        "--worker-id", "exec-fill-record", "--exchange-url", exchange_url, "--no-user-stream",
        "--cycle", str(CYCLE_S), "--heartbeat-timeout", "600", "--outbox-capacity", "1",
    )  # fmt: skip
    return start_worker("execution", nats_url=url, log_dir=tmp_path, args=args, env=env)


async def test_a_fill_that_cannot_be_recorded_holds_the_next_order_until_it_is(
    nats_server: EmbeddedNats, exchange: SimAdmin, tmp_path: Path
) -> None:
    url = nats_server.url
    assert nats_server.pid is not None
    async with control_plane(url, POLICY, price=PRICE, name="test-fill-record") as bus:
        portfolio = start_worker("portfolio", nats_url=url, log_dir=tmp_path)  # the equity
        execution = _execution(url, exchange.base_url, tmp_path)
        workers: list[Worker] = [execution, portfolio]
        try:
            await eventually(
                lambda: execution.dependency("exchange").get("status") == "OK",
                timeout_s=30,
                what="the execution worker connected to the exchange",
                worker=execution,
            )
            exchange.faults(
                [{"route": "GET /fapi/v1/userTrades", "kind": "hang_before_booking",
                  "hang_s": 30, "next": TRADES_READS_LOST}]
            )  # fmt: skip
            # Decided CYCLE_S apart: a long, then a short that reverses it (a sell of twice the
            # long, sized on the long in flight). The second is sent once the first is booked,
            # and the broker hangs once the worker holds it: before its decision is due.
            await bus.publish(subjects.signal_subject("BTCUSDT"), _signal(0, Direction.LONG))
            await eventually(
                lambda: bool(exchange.trades()),
                timeout_s=30,
                what="the first order booked at the venue",
                worker=execution,
            )
            booked = time.monotonic()
            await bus.publish(subjects.signal_subject("BTCUSDT"), _signal(1, Direction.SHORT))
            await eventually(
                lambda: execution.metric("qtrader_signal_queue_depth") == 1,
                timeout_s=CYCLE_S - 1,
                what="the second signal waiting for its decision",
                worker=execution,
            )
            held_s = time.monotonic() - booked
            hang(nats_server.pid)
            try:
                await eventually(
                    lambda: execution.metric("qtrader_outbox_refused_total") >= 1,
                    timeout_s=TRADES_READS_LOST * 5 + 15,
                    what="the first order's fill refused by the full outbox",
                    worker=execution,
                )
                kept = execution.metric("qtrader_outbox_depth")
                waiting = execution.metric("qtrader_fills_unrecorded")
            finally:
                resume(nats_server.pid)
            await eventually(
                lambda: (
                    len(exchange.trades()) >= 2 and execution.metric("qtrader_intent_backlog") == 0
                ),
                timeout_s=60,
                what="the second order traded and both intents final",
                worker=execution,
            )
        finally:
            await stop_pipeline(workers, nats_url=url)

    assert held_s < CYCLE_S - 1, f"the broker hung {held_s:.1f} s after the booking: too late"
    assert kept == 1, "the second intent waited in the outbox during the hang"
    assert waiting == 1, "the worker showed the fill it could not record"
    assert "not published, dropped" not in execution.log(), "the second intent was kept"
    intents = await read_all(
        url, stream="QT_ORDERS", subject="qtrader.order.intent.*", message_type=OrderIntent
    )
    assert [i.side.value for i in intents] == ["BUY", "SELL"]
    fills = await read_all(url, stream="QT_FILLS", subject="qtrader.fill.*", message_type=Fill)
    venue_order = [f"binance-BTCUSDT-{t['id']}" for t in sorted(exchange.trades(), key=_trade_id)]
    stream_order = list(dict.fromkeys(f.fill_id for f in fills))  # first of each
    assert stream_order == venue_order, "FILLS holds the venue's trades in the venue's order"


def _trade_id(trade: dict[str, object]) -> int:
    return int(str(trade["id"]))
