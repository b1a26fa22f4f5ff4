"""The viewer stream's manners, over real WebSockets against a real portfolio worker.

The portfolio runs as a process on a real nats-server while the stop is HALTED; a websockets
client connects and must learn that at once (the state message), the same risk alert published
twice must reach it once, and a browser page of another origin must be refused. The keep-alive
is checked on the viewer app served by uvicorn with a short interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import RiskAlert, RiskAlertKind, TradingState
from qtrader.contracts.policy import parse_policy
from qtrader.local.control import heartbeat_forever, publish_policy, write_latch
from qtrader.local.nats_server import EmbeddedNats
from qtrader.viewer import FanoutHub, create_viewer_app
from support.workers import Worker, eventually, start_worker

pytestmark = pytest.mark.integration


@pytest.fixture
async def halted_portfolio(
    nats_server: EmbeddedNats, tmp_path: Path
) -> AsyncIterator[tuple[Worker, Bus]]:
    bus = Bus(url=nats_server.url, client_name="test-control")
    await bus.connect()
    await bus.ensure_topology()
    policy = {
        "apiVersion": "qtrader.dev/v1alpha1",
        "kind": "TradingPolicy",
        "metadata": {"name": "viewer-test"},
        "spec": {"mode": "paper", "symbols": ["BTCUSDT"]},
    }
    await publish_policy(bus, parse_policy(policy))
    await write_latch(bus, state=TradingState.HALTED, reason="drill", issued_by="test")
    heartbeat = asyncio.create_task(heartbeat_forever(bus, issued_by="test"))
    worker = start_worker("portfolio", nats_url=nats_server.url, log_dir=tmp_path)
    try:
        await eventually(
            lambda: worker.get("/healthz").status_code == 200,
            timeout_s=30,
            what="the portfolio to serve",
            worker=worker,
        )
        yield worker, bus
    finally:
        worker.stop()
        heartbeat.cancel()
        await asyncio.gather(heartbeat, return_exceptions=True)
        await bus.close()


async def _next(ws: ClientConnection, timeout_s: float = 5.0) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout_s))
    return message


async def test_viewer_when_connecting_while_halted_then_first_message_says_halted(
    halted_portfolio: tuple[Worker, Bus],
) -> None:
    worker, _ = halted_portfolio
    url = f"ws://127.0.0.1:{worker.port}/events"
    async with connect(url) as ws:
        first = await _next(ws)
    assert first["seq"] == 0
    [state] = first["events"]
    assert state["kind"] == "state"
    assert state["latch"]["state"] == "HALTED"
    assert state["latch"]["reason"] == "drill"
    assert state["health"]["service"] == "portfolio"
    assert "status" in state["health"]


async def test_viewer_when_the_same_alert_is_published_twice_then_it_arrives_once(
    halted_portfolio: tuple[Worker, Bus],
) -> None:
    worker, bus = halted_portfolio
    alert = RiskAlert(
        alert_id="drawdown:all:7",
        alert_kind=RiskAlertKind.DRAWDOWN,
        source="portfolio/p1",
        value=Decimal("3.2"),
        threshold=Decimal(3),
        detail="drawdown 3.2%",
        ts_ms=1,
    )
    url = f"ws://127.0.0.1:{worker.port}/events"
    async with connect(url) as ws:
        await _next(ws)  # the state
        for _ in range(2):
            await bus.publish(subjects.risk_alert_subject("drawdown"), alert)
        await bus.publish(
            subjects.risk_alert_subject("drawdown"),
            alert.model_copy(update={"alert_id": "drawdown:all:8"}),
        )
        ids: list[str] = []
        with contextlib.suppress(TimeoutError):
            while "drawdown:all:8" not in ids:
                batch = await _next(ws)
                ids += [e["alert_id"] for e in batch["events"] if e["kind"] == "risk_alert"]
        await asyncio.sleep(0.5)  # a late duplicate would be here by now
        with contextlib.suppress(TimeoutError):
            while True:
                batch = await _next(ws, timeout_s=0.5)
                ids += [e["alert_id"] for e in batch["events"] if e["kind"] == "risk_alert"]
    assert ids == ["drawdown:all:7", "drawdown:all:8"]


async def test_viewer_when_origin_is_foreign_then_refused_and_own_origin_served(
    halted_portfolio: tuple[Worker, Bus],
) -> None:
    port = halted_portfolio[0].port
    url = f"ws://127.0.0.1:{port}/events"
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url, origin="http://evil.example"):  # type: ignore[arg-type]
            pass
    assert refused.value.response.status_code == 403
    async with connect(url, origin=f"http://127.0.0.1:{port}") as ws:  # type: ignore[arg-type]
        assert (await _next(ws))["events"][0]["kind"] == "state"
    async with connect(url) as ws:  # no Origin: not a browser
        assert (await _next(ws))["seq"] == 0


class _InLoopServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def _serving(hub: FanoutHub, **options: Any) -> AsyncIterator[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(create_viewer_app(hub, **options), log_level="warning", lifespan="off")
    server = _InLoopServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await eventually(lambda: server.started, timeout_s=10, what="uvicorn to start")
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)
        sock.close()


async def test_viewer_when_idle_then_keepalive_outside_the_sequence() -> None:
    hub = FanoutHub()
    async with _serving(hub, keepalive_s=0.3, allowed_origins=["https://console.example"]) as port:
        url = f"ws://127.0.0.1:{port}/events"
        async with connect(url, origin="https://console.example") as ws:  # type: ignore[arg-type]
            assert await _next(ws, timeout_s=2) == {"seq": 0, "events": [], "dropped": 0}
            await eventually(lambda: hub.clients == 1, timeout_s=5, what="the viewer to attach")
            hub.publish({"i": 1})
            batch = await _next(ws, timeout_s=2)
            while batch["seq"] == 0:  # a keep-alive may come first
                batch = await _next(ws, timeout_s=2)
            assert batch == {"seq": 1, "events": [{"i": 1}], "dropped": 0}
