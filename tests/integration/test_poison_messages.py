"""Poison on every subject of a running stack: nothing crashes, nothing trades, all is counted.

Real worker processes (inference, execution, portfolio with its viewer feed) on a real
nats-server, and in this process the local control plane, which is what the operator is in local
mode: the risk monitor and the consumer of risk alerts. Raw bytes are published with nats-py
straight onto each subject: deeply nested JSON, bytes that are not UTF-8, payloads over the size
cap, NaN, wrong kinds, and each message type's valid body with one Decimal replaced by
``"1e999"``, ``"NaN"``, ``"Infinity"`` or ``"1e-999"`` and its timestamps pushed past year 9999.

Then: every process is alive, none became CRITICAL, every consumer counted its rejections in
``qtrader_messages_rejected_total``, no order was sent, the portfolio applied no fill and no
account entry and its equity is unchanged, and the EmergencyStop did not trip (the latch is the
one written before).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from nats.aio.client import Client
from prometheus_client import REGISTRY

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import HaltLatch, TradingState
from qtrader.contracts.policy import parse_policy
from qtrader.control.ess_resource import parse_emergency_stop
from qtrader.local.control import heartbeat_forever, publish_policy, write_latch
from qtrader.local.control_plane import LocalControlPlane
from qtrader.local.nats_server import EmbeddedNats
from qtrader_tools import metrics
from qtrader_tools.stress.poison import published_poison
from support.workers import Worker, eventually, start_worker, stop_pipeline

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SYMBOL = "BTCUSDT"
POLICY = parse_policy(
    {
        "apiVersion": "qtrader.dev/v1alpha1",
        "kind": "TradingPolicy",
        "metadata": {"name": "poison-test"},
        "spec": {"symbols": [SYMBOL], "policyRefreshSeconds": 1, "risk": {"minConfidence": 0.0}},
    }
)


def _rejected(worker: Worker) -> float:
    """The sum of ``qtrader_messages_rejected_total`` over all its labels."""
    return metrics.total(worker.samples(), "qtrader_messages_rejected_total")


def _rejected_here() -> float:
    """The same counter in this process: the control plane's risk monitor and alert consumer."""
    total = 0.0
    for metric in REGISTRY.collect():
        if metric.name == "qtrader_messages_rejected":
            total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return total


async def _publish_all(url: str, poison: list[tuple[str, bytes]]) -> None:
    client = Client()
    await client.connect(url)
    try:
        for subject, payload in poison:
            await client.publish(subject, payload)
        await client.flush(timeout=10)
    finally:
        await client.close()


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel until each has ended: nats-py 2.16 swallows a cancellation that arrives while a
    publish waits in its flush queue (``_flush_pending``: ``except CancelledError: pass``), so a
    heartbeat loop cancelled there just goes on; a second request lands in its sleep."""
    while pending := [task for task in tasks if not task.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=1.0)
    await asyncio.gather(*tasks, return_exceptions=True)


def _emergency_stop() -> Any:
    """The example EmergencyStop without the stale-data trip: this stack has no market data."""
    document = yaml.safe_load((ROOT / "examples/emergencystop.yaml").read_text())
    del document["spec"]["triggers"]["staleMarketDataSeconds"]
    return parse_emergency_stop(document)


async def test_poison_on_every_subject_crashes_nothing_changes_nothing_and_is_counted(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    url = nats_server.url
    bus = Bus(url=url, client_name="test-control")
    await bus.connect()
    await bus.ensure_topology()
    await publish_policy(bus, POLICY)
    await write_latch(bus, state=TradingState.ACTIVE, reason="test", issued_by="test")
    control = LocalControlPlane(bus, resource=_emergency_stop())
    await control.start()
    tasks = [
        asyncio.create_task(control.run()),
        asyncio.create_task(heartbeat_forever(bus, issued_by="test", interval_s=0.3)),
    ]
    workers = [
        start_worker("inference", nats_url=url, log_dir=tmp_path),
        start_worker("execution", nats_url=url, log_dir=tmp_path, args=("--worker-id", "ex-p")),
        start_worker("portfolio", nats_url=url, log_dir=tmp_path),
    ]
    inference, execution, portfolio = workers
    try:
        for worker in workers:
            await eventually(
                lambda: worker.get("/readyz").status_code == 200,  # noqa: B023  # awaited here
                timeout_s=30,
                what=f"{worker.role} ready",
                worker=worker,
            )
        await asyncio.sleep(1.0)  # a snapshot and a heartbeat or two: the quiet baseline
        status_before = {w.role: w.health()["status"] for w in workers}
        assert "CRITICAL" not in status_before.values(), status_before
        equity_before = portfolio.metric("qtrader_portfolio_equity_usd")
        here_before = _rejected_here()
        latch = await bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch)
        assert isinstance(latch, HaltLatch)

        poison = published_poison()
        await _publish_all(url, poison)

        for worker in workers:
            await eventually(
                lambda: _rejected(worker) > 0,  # noqa: B023  # awaited here
                timeout_s=20,
                what=f"{worker.role} to count rejections",
                worker=worker,
            )
        await eventually(
            lambda: _rejected_here() > here_before, timeout_s=20, what="the control plane"
        )
        await asyncio.sleep(2.0)  # redeliveries, snapshots, a round of every control loop

        for worker in workers:
            assert worker.process.poll() is None, f"{worker.role} exited:\n{worker.log()[-3000:]}"
            assert worker.health()["status"] != "CRITICAL", (worker.role, worker.health())
            assert "Traceback" not in worker.log(), worker.log()[-3000:]
        assert all(not task.done() for task in tasks), "the control plane stopped"
        assert execution.metric("qtrader_orders_sent_total", exchange="paper") == 0
        assert execution.metric("qtrader_order_intents_total", side="BUY") == 0
        assert execution.metric("qtrader_order_intents_total", side="SELL") == 0
        assert portfolio.metric("qtrader_portfolio_fills_applied_total") == 0
        assert portfolio.metric("qtrader_portfolio_entries_applied_total") == 0
        assert portfolio.metric("qtrader_portfolio_equity_usd") == equity_before
        assert inference.process.poll() is None
        kept = await bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch)
        assert isinstance(kept, HaltLatch)
        assert (kept.revision, kept.state) == (latch.revision, latch.state), "the ESS tripped"
    finally:
        await _cancel(tasks)
        await stop_pipeline(workers, nats_url=url)
        await bus.close()
