"""Every metric name in the chart's alerts and dashboards is one the running workloads export.

The four workloads run as real processes on a real nats-server with a policy, an ACTIVE latch
and control-plane heartbeats; execution trades in testnet mode on the local Binance simulator
(paper mode never loads the exchange client and its rate limiter, whose metrics the exchange
dashboard and alerts use); candles flow for a few seconds; then each worker's /metrics is
scraped. A family that exists but has no sample yet (a labelled counter nothing incremented)
still shows as ``# HELP``/``# TYPE`` lines, which count. Names of the operator's own metrics
(``qtrader_operator_*``, the halt alert reads them while execution runs no replica) come from
its collector with one stop, one policy and a latch (tests/integration/test_operator.py scrapes
them from a running operator); ``up`` and ``ALERTS`` (which the health alerts read to stay
silent while an alert naming the cause fires) are Prometheus's own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from promql_names import (
    DASHBOARDS,
    HISTOGRAM_SUFFIXES,
    alert_expressions,
    dashboard_expressions,
    exported_names,
    names_in,
)

from qtrader.bus.nats_bus import Bus
from qtrader.contracts.messages import HaltLatch, TradingState
from qtrader.contracts.policy import TradingPolicy, parse_policy
from qtrader.control.ess_status import EssStatus
from qtrader.local.control import heartbeat_forever, publish_policy, write_latch
from qtrader.local.nats_server import EmbeddedNats
from qtrader_operator.metrics import OperatorMetrics, OperatorView, PolicyView, StopView
from qtrader_tools.simulators.binance_futures import SimConfig
from support.binance_sim import KEY, SECRET, sim_in_thread
from support.workers import Worker, eventually, start_worker

pytestmark = pytest.mark.integration

ROLES = ("marketdata", "inference", "execution", "portfolio")
DASHBOARD_FILES = {"trading-overview.json", "pipeline.json", "exchange.json", "ess.json"}
PROMETHEUS_OWN = {"up", "ALERTS"}  # a scrape's own series, and the rules' alerts


def _operator_names() -> set[str]:
    """What the operator's collector exports with every family filled once."""
    view = OperatorView(
        stops={"main": StopView(status=EssStatus(), pending_workers=0)},
        policies={"demo": PolicyView(revision=1, workloads={"execution": (1, 1)})},
        latch=HaltLatch(state=TradingState.ACTIVE, revision=1, issued_at_ms=1),
    )
    metrics = OperatorMetrics(lambda: view, now=lambda: datetime.now(UTC))
    return exported_names(generate_latest(metrics.registry).decode())


def _policy() -> TradingPolicy:
    return parse_policy(
        {
            "apiVersion": "qtrader.dev/v1alpha1",
            "kind": "TradingPolicy",
            "metadata": {"name": "metrics-test"},
            "spec": {
                "mode": "testnet",
                "symbols": ["BTCUSDT"],
                "risk": {"minConfidence": 0.0, "maxSlippageBps": 100},
            },
        }
    )


@pytest.fixture
async def control_plane(nats_server: EmbeddedNats) -> AsyncIterator[Bus]:
    bus = Bus(url=nats_server.url, client_name="test-control")
    await bus.connect()
    await bus.ensure_topology()
    await publish_policy(bus, _policy())
    await write_latch(bus, state=TradingState.ACTIVE, reason="test", issued_by="test")
    heartbeat = asyncio.create_task(heartbeat_forever(bus, issued_by="test"))
    try:
        yield bus
    finally:
        heartbeat.cancel()
        await asyncio.gather(heartbeat, return_exceptions=True)
        await bus.close()


@pytest.fixture
def exchange_url() -> Iterator[str]:
    with sim_in_thread(SimConfig.from_dict({"prices": {"BTCUSDT": "30000"}})) as url:
        yield url


@pytest.fixture
async def workers(
    nats_server: EmbeddedNats, control_plane: Bus, exchange_url: str, tmp_path: Path
) -> AsyncIterator[list[Worker]]:
    args = {
        "marketdata": ("--seed", "5", "--candles-per-second", "20", "--start-price", "30000"),
        "execution": ("--exchange-url", exchange_url),
    }
    env = {"QTRADER_BINANCE_API_KEY": KEY, "QTRADER_BINANCE_API_SECRET": SECRET}
    started: list[Worker] = []
    try:
        for role in ROLES:
            worker = start_worker(
                role, nats_url=nats_server.url, log_dir=tmp_path, args=args.get(role, ()), env=env
            )
            started.append(worker)
        yield started
    finally:
        for worker in started:
            worker.stop()


def _expressions() -> dict[str, str]:
    found = {f"alert {name}": expr for name, expr in alert_expressions().items()}
    for path in sorted(DASHBOARDS.glob("*.json")):
        for where, expr in dashboard_expressions(path).items():
            found[f"{path.name}: {where}"] = expr
    return found


def _is_exported(name: str, exported: set[str]) -> bool:
    if name in exported:
        return True
    base = next((name.removesuffix(s) for s in HISTOGRAM_SUFFIXES if name.endswith(s)), None)
    return base is not None and base in exported and f"{base}_bucket" in exported


def test_dashboards_and_alerts_when_loaded_then_every_query_names_a_metric() -> None:
    assert {p.name for p in DASHBOARDS.glob("*.json")} == DASHBOARD_FILES
    expressions = _expressions()
    assert len(expressions) > 50
    empty = [where for where, expr in expressions.items() if not names_in(expr)]
    assert not empty, f"queries without a metric name (tokenizer or query broken): {empty}"


async def test_metric_names_when_workloads_run_then_every_name_used_is_exported(
    workers: list[Worker],
) -> None:
    marketdata, _, execution, portfolio = workers
    await eventually(
        lambda: marketdata.metric("qtrader_candles_published_total", symbol="BTCUSDT") >= 20,
        timeout_s=60,
        what="candles to flow",
        worker=marketdata,
    )
    await eventually(
        lambda: portfolio.metric("qtrader_portfolio_drawdown_limit_ratio") > 0,
        timeout_s=30,
        what="the portfolio to read the policy",
        worker=portfolio,
    )
    await eventually(
        lambda: "qtrader_ratelimit_used_share" in execution.get("/metrics").text,
        timeout_s=30,
        what="execution to start its exchange client",
        worker=execution,
    )
    await eventually(
        lambda: execution.metric("qtrader_halt_acks_total") >= 1,
        timeout_s=30,
        what="execution to acknowledge the latch",
        worker=execution,
    )
    exported = PROMETHEUS_OWN | _operator_names()
    for worker in workers:
        exported |= exported_names(worker.get("/metrics").text)

    unknown = {
        where: sorted(n for n in names_in(expr) if not _is_exported(n, exported))
        for where, expr in _expressions().items()
    }
    unknown = {where: names for where, names in unknown.items() if names}
    assert not unknown, f"metric names no running workload exports: {unknown}"
    # The policy's 3% drawdown limit reaches the gauge the drawdown alert divides by.
    assert portfolio.metric("qtrader_portfolio_drawdown_limit_ratio") == pytest.approx(0.03)


def test_is_exported_when_name_missing_then_false() -> None:
    exported = {"qtrader_wait_seconds", "qtrader_wait_seconds_bucket", "qtrader_outbox_depth"}
    assert _is_exported("qtrader_wait_seconds_count", exported)
    assert not _is_exported("qtrader_outbox_depth_count", exported)
    assert not _is_exported("qtrader_made_up_total", exported)


async def test_ess_metrics_when_halted_then_one_revision_ack_and_only_the_new_latch_timed(
    workers: list[Worker], control_plane: Bus
) -> None:
    """The ESS dashboard's figures: the latch written before the workers started is acknowledged
    once (heartbeat answers do not count) and adds nothing to the halt latency; a halt issued
    while they run is acknowledged once as HALTED and timed once. The age gauge is per symbol."""
    marketdata, _, execution, _ = workers
    await eventually(
        lambda: execution.metric("qtrader_halt_acks_total") >= 3,  # heartbeats are answered
        timeout_s=30,
        what="execution to answer a few heartbeats",
        worker=execution,
    )
    assert execution.metric("qtrader_halt_revision_acks_total", state="ACTIVE") == 1
    assert execution.metric("qtrader_halt_apply_seconds_count") == 0
    assert (
        'qtrader_market_data_last_candle_age_seconds{symbol="BTCUSDT"}'
        in marketdata.get("/metrics").text
    )
    assert marketdata.metric("qtrader_market_data_last_candle_age_seconds", symbol="BTCUSDT") < 5
    # Already there at 0: increase() counts only from a series' first sample, so one that
    # appeared at 1 on the first HALTED acknowledgement showed no acknowledgement at all.
    exposition = execution.get("/metrics").text
    assert 'qtrader_halt_revision_acks_total{state="HALTED"} 0.0' in exposition
    assert 'qtrader_halt_revision_acks_total{state="REDUCING"} 0.0' in exposition
    assert "\nqtrader_halt_latch_state 0.0\n" in exposition  # the latch the control plane wrote

    await write_latch(control_plane, state=TradingState.HALTED, reason="test", issued_by="test")
    await eventually(
        lambda: execution.metric("qtrader_halt_revision_acks_total", state="HALTED") == 1,
        timeout_s=30,
        what="execution to acknowledge the halt",
        worker=execution,
    )
    await asyncio.sleep(3)  # a heartbeat or two more: still one acknowledgement per revision
    assert execution.metric("qtrader_halt_revision_acks_total", state="HALTED") == 1
    assert execution.metric("qtrader_halt_revision_acks_total", state="ACTIVE") == 1
    assert execution.metric("qtrader_halt_apply_seconds_count") == 1
    assert execution.metric("qtrader_halt_latch_state") == 2
    assert execution.metric("qtrader_halt_apply_seconds_sum") < 2.0
