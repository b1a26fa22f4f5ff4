"""The viewer stream's manners, over real WebSockets against a real portfolio worker.

The portfolio runs as a process on a real nats-server while the stop is HALTED; a websockets
client connects and must learn that at once (the state message), the same risk alert published
twice must reach it once, and a browser page of another origin must be refused. With the local
control plane running in this process, a viewer learns each stop's status (who tripped it,
why, its cooldown) and every worker's health, on connect and as they change. The keep-alive is
checked on the viewer app served by uvicorn with a short interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
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
from qtrader.contracts.messages import (
    OrderStatus,
    OrderUpdate,
    RiskAlert,
    RiskAlertKind,
    Side,
    TradingState,
)
from qtrader.contracts.policy import parse_policy
from qtrader.control.ess_resource import parse_emergency_stop
from qtrader.local import ess_client
from qtrader.local.control import heartbeat_forever, publish_policy, write_latch
from qtrader.local.control_plane import LocalControlPlane
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
        # Serving, and the viewer feed's subscriptions confirmed by the server: an event
        # published before then reaches no viewer.
        await eventually(
            lambda: _fed(worker), timeout_s=30, what="the viewer feed to be fed", worker=worker
        )
        yield worker, bus
    finally:
        worker.stop()
        heartbeat.cancel()
        await asyncio.gather(heartbeat, return_exceptions=True)
        await bus.close()


def _fed(worker: Worker) -> bool:
    response = worker.get("/viewer/stats")
    return response.status_code == 200 and response.json()["fed"] is True


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


async def test_viewer_when_the_feed_is_fed_then_the_first_event_of_each_kind_arrives(
    halted_portfolio: tuple[Worker, Bus],
) -> None:
    """Published the moment the stats say "fed" (one subscription per kind): none is lost."""
    worker, bus = halted_portfolio
    url = f"ws://127.0.0.1:{worker.port}/events"
    update = OrderUpdate(
        client_order_id="qt-first-1",
        intent_id="first-1",
        symbol="BTCUSDT",
        side=Side.BUY,
        status=OrderStatus.NEW,
        quantity=Decimal("0.001"),
        filled_quantity=Decimal(0),
        avg_price=Decimal(0),
        exchange="test",
        ts_ms=1,
    )
    alert = RiskAlert(
        alert_id="first:1",
        alert_kind=RiskAlertKind.EXECUTION_ERROR_RATE,
        source="test",
        value=Decimal(0),
        threshold=Decimal(1),
        detail="the first event",
        ts_ms=1,
    )
    async with connect(url) as ws:
        await _next(ws)  # the state
        await bus.publish(subjects.order_update_subject("BTCUSDT"), update)
        await bus.publish(subjects.risk_alert_subject(alert.alert_kind.value), alert)
        kinds: set[str] = set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):  # other events (health reports) keep coming
                while not {"order_update", "risk_alert"} <= kinds:
                    kinds |= {e["kind"] for e in (await _next(ws))["events"]}
    assert {"order_update", "risk_alert"} <= kinds, f"only {sorted(kinds)} within 10 s"


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


POLICY = {
    "apiVersion": "qtrader.dev/v1alpha1",
    "kind": "TradingPolicy",
    "metadata": {"name": "viewer-test"},
    "spec": {"mode": "paper", "symbols": ["BTCUSDT"]},
}
STOP = {
    "apiVersion": "qtrader.dev/v1alpha1",
    "kind": "EmergencyStop",
    "metadata": {"name": "main"},
    "spec": {"cooldownSeconds": 60, "requireManualReset": True},
}


@pytest.fixture
async def controlled_portfolio(
    nats_server: EmbeddedNats, tmp_path: Path
) -> AsyncIterator[tuple[Worker, Bus]]:
    """A portfolio worker under the local control plane (in this process), as ``qtrader up``
    runs them."""
    bus = Bus(url=nats_server.url, client_name="test-control")
    await bus.connect()
    await bus.ensure_topology()
    await publish_policy(bus, parse_policy(POLICY))
    control = LocalControlPlane(bus, resource=parse_emergency_stop(STOP))
    await control.start()
    tasks = [
        asyncio.create_task(control.run()),
        asyncio.create_task(heartbeat_forever(bus, issued_by="test")),
    ]
    worker = start_worker("portfolio", nats_url=nats_server.url, log_dir=tmp_path)
    try:
        yield worker, bus
    finally:
        worker.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await bus.close()


async def _state_with_stop_and_health(port: int) -> dict[str, Any]:
    """The state a viewer gets on connect, once the portfolio has heard the stop and itself."""
    deadline = asyncio.get_running_loop().time() + 15
    while True:
        async with connect(f"ws://127.0.0.1:{port}/events") as ws:
            state: dict[str, Any] = (await _next(ws))["events"][0]
        if state["stops"] and state["workloads"]:
            return state
        assert asyncio.get_running_loop().time() < deadline, state
        await asyncio.sleep(0.5)


async def test_viewer_when_a_stop_trips_then_told_who_why_since_when_and_until_when(
    controlled_portfolio: tuple[Worker, Bus],
) -> None:
    worker, bus = controlled_portfolio
    state = await _state_with_stop_and_health(worker.port)
    [stop] = state["stops"]
    assert (stop["name"], stop["state"], stop["cooldown_until_ms"]) == ("main", "Armed", None)
    [report] = state["workloads"]
    assert (report["service"], report["interval_s"]) == ("portfolio", 2.0)
    assert {d["name"] for d in report["dependencies"]} >= {"nats", "policy", "ledger"}
    assert abs(state["now_ms"] - time.time() * 1000) < 5_000
    async with connect(f"ws://127.0.0.1:{worker.port}/events") as ws:
        await _next(ws)  # the state
        await ess_client.trip(
            bus, name="main", reason="viewer drill", mode=None, tripped_by="cli:t", timeout_s=3
        )
        view = await _next_of_kind(ws, "emergency_stop_view")
        reports = [await _next_of_kind(ws, "workload_health") for _ in range(2)]
    status = (await ess_client.read_record(bus, "main")).ess_status()
    assert status.tripped_at is not None
    assert (view["state"], view["tripped_by"], view["reason"]) == (
        "Tripped",
        "cli:t",
        "viewer drill",
    )
    assert view["tripped_at_ms"] == round(status.tripped_at.timestamp() * 1000)
    assert view["cooldown_until_ms"] - view["tripped_at_ms"] == 60_000
    assert view["require_manual_reset"] is True
    assert view["latch"] == "HALTED"
    assert 1.0 < (reports[1]["ts_ms"] - reports[0]["ts_ms"]) / 1000 < 4.0  # every 2 s


async def _next_of_kind(ws: ClientConnection, kind: str) -> dict[str, Any]:
    while True:
        batch = await _next(ws, timeout_s=10)
        for event in batch["events"]:
            if event["kind"] == kind:
                return dict(event)


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
