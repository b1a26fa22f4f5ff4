"""An order's trades from Binance's user-data stream instead of a REST read (testnet mode, the
local Binance-compatible server, real execution and portfolio processes, a real nats-server).

The same trading, with the stream and without it (``--no-user-stream``): with it every filled
order's trades come from ``ORDER_TRADE_UPDATE`` events and no ``userTrades`` request is made;
the fills on the FILLS stream are the venue's own trades either way (ids, quantities, prices,
commissions); the exchange weight spent reading trades per filled order is printed for both.
When the stream is cut, REST takes over at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import Fill, TradingState
from qtrader.contracts.policy import parse_policy
from qtrader.exchange.limits import request_cost
from qtrader.local.control import heartbeat_forever, publish_policy, write_latch
from qtrader.local.nats_server import EmbeddedNats
from qtrader_tools.simulators.binance_futures import SimAdmin, SimConfig
from support.binance_sim import KEY, SECRET, sim_in_thread
from support.flow import flowing
from support.streams import read_all
from support.workers import Worker, eventually, start_worker, stop_pipeline

pytestmark = pytest.mark.integration

SYMBOL = "BTCUSDT"
POLICY = parse_policy(
    {
        "apiVersion": "qtrader.dev/v1alpha1",
        "kind": "TradingPolicy",
        "metadata": {"name": "user-stream-test"},
        "spec": {
            "mode": "testnet",
            "symbols": [SYMBOL],
            "risk": {"minConfidence": 0.0, "maxPositionUsd": "1000", "maxSlippageBps": 100},
        },
    }
)
READS = (("GET", "/fapi/v1/userTrades"), ("GET", "/fapi/v1/order"))


@pytest.fixture
def exchange() -> Iterator[SimAdmin]:
    config = SimConfig.from_dict({"prices": {SYMBOL: "30000"}})
    with sim_in_thread(config) as url, SimAdmin(url) as admin:
        yield admin


async def _trade(url: str, exchange: SimAdmin, tmp_path: Path, *, stream: bool) -> Worker:
    """Trade until five orders filled at the exchange; returns the execution worker, running."""
    env = {"QTRADER_BINANCE_API_KEY": KEY, "QTRADER_BINANCE_API_SECRET": SECRET}
    args = ("--worker-id", "exec-user", "--exchange-url", exchange.base_url)
    args += () if stream else ("--no-user-stream",)
    execution = start_worker("execution", nats_url=url, log_dir=tmp_path, args=args, env=env)
    bus = Bus(url=url, client_name="test-flow")
    await bus.connect()
    try:
        async with flowing(bus):
            await eventually(
                lambda: (
                    execution.metric("qtrader_exchange_order_trades_total", source="stream")
                    + execution.metric("qtrader_exchange_order_trades_total", source="rest")
                    >= 5
                ),
                timeout_s=30,
                what="five filled orders' trades read",
                worker=execution,
            )
    finally:
        await bus.close()
    return execution


def _read_weight(execution: Worker) -> float:
    """The weight of every order and trade read the worker made (its own request counts)."""
    total = 0.0
    for method, path in READS:
        sent = execution.metric("qtrader_exchange_requests_total", endpoint=path, outcome="ok")
        total += sent * request_cost(method, path, {}).weight
    return total


def _check_fills_are_the_venues(fills: list[Fill], exchange: SimAdmin) -> None:
    venue = {f"binance-{t['symbol']}-{t['id']}": t for t in exchange.trades()}
    assert fills
    for fill in fills:
        trade = venue[fill.fill_id]
        assert (fill.quantity, fill.price, fill.fee) == (
            Decimal(trade["qty"]),
            Decimal(trade["price"]),
            Decimal(trade["commission"]),
        ), (fill, trade)


async def test_filled_orders_take_their_trades_from_the_user_data_stream_not_rest(
    nats_server: EmbeddedNats, exchange: SimAdmin, tmp_path: Path
) -> None:
    url = nats_server.url
    control = Bus(url=url, client_name="test-control")
    await control.connect()
    await control.ensure_topology()
    await publish_policy(control, POLICY)
    await write_latch(control, state=TradingState.ACTIVE, reason="test", issued_by="test")
    heartbeat = asyncio.create_task(heartbeat_forever(control, issued_by="test", interval_s=0.2))
    workers = [start_worker("portfolio", nats_url=url, log_dir=tmp_path)]
    try:
        for run in ("rest", "stream"):
            (tmp_path / run).mkdir()
        rest = await _trade(url, exchange, tmp_path / "rest", stream=False)
        workers.append(rest)
        rest_orders = rest.metric("qtrader_exchange_order_trades_total", source="rest")
        rest_weight = _read_weight(rest) / rest_orders
        await stop_pipeline([rest], nats_url=url)

        streamed = await _trade(url, exchange, tmp_path / "stream", stream=True)
        workers.append(streamed)
        from_stream = streamed.metric("qtrader_exchange_order_trades_total", source="stream")
        assert streamed.metric("qtrader_exchange_order_trades_total", source="rest") == 0
        assert (
            streamed.metric(
                "qtrader_exchange_requests_total", endpoint="/fapi/v1/userTrades", outcome="ok"
            )
            == 0
        )
        stream_weight = _read_weight(streamed) / from_stream
        print(
            f"\nweight of trade reads per filled order: REST {rest_weight:.1f} "
            f"({rest_orders:.0f} orders), user-data stream {stream_weight:.1f} "
            f"({from_stream:.0f} orders)"
        )
        assert stream_weight < rest_weight

        # The stream cut: REST takes over (the next orders' trades are read there).
        exchange.drop_websockets(refuse=True)
        bus = Bus(url=url, client_name="test-flow")
        await bus.connect()
        try:
            async with flowing(bus):
                await eventually(
                    lambda: (
                        streamed.metric("qtrader_exchange_order_trades_total", source="rest") >= 2
                    ),
                    timeout_s=30,
                    what="trades read over REST while the stream is down",
                    worker=streamed,
                )
        finally:
            await bus.close()
            exchange.drop_websockets(refuse=False)
        fills = await read_all(
            url,
            stream=subjects.FILLS.name,
            subject=subjects.all_of(subjects.FILL_PREFIX),
            message_type=Fill,
        )
        _check_fills_are_the_venues(fills, exchange)
    finally:
        heartbeat.cancel()
        await asyncio.gather(heartbeat, return_exceptions=True)
        await stop_pipeline(workers, nats_url=url)
        await control.close()
