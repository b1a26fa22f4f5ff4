"""The real kopf runtime against kmock's Kubernetes emulator, with a real nats-server.

Resources are created and patched over HTTP, as kubectl would; assertions read the objects the
emulator stores (it has no controllers: a Deployment never gets pods, so readiness stays 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import kopf
import nats.js.errors
import pytest

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import (
    EmergencyStopView,
    HaltLatch,
    OrderStatus,
    PolicyRevision,
    PortfolioSnapshot,
    RiskAlert,
    RiskAlertKind,
    TradingState,
)
from qtrader.control.ess_status import parse_time
from qtrader.instruments import ExchangeInfo
from qtrader.local.nats_server import EmbeddedNats
from qtrader_operator.policy_core import OutboxStorage, PodDefaults
from qtrader_tools import metrics
from qtrader_tools.candles import flat_candle
from support.binance_sim import sim_in_thread
from support.emulator import (
    DEPLOYMENTS,
    NAMESPACE,
    POLICIES,
    SECRETS,
    STACK,
    STATEFULSETS,
    STOPS,
    Cluster,
)
from support.emulator import eventually as _eventually
from support.emulator import operator as _operator
from support.emulator import policy as _policy
from support.emulator import stop as _stop
from support.flow import flowing, order_updates
from support.streams import read_all
from support.workers import Worker, start_worker, stop_pipeline

pytestmark = pytest.mark.integration


def _condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    for condition in ((obj or {}).get("status") or {}).get("conditions") or []:
        if condition["type"] == kind:
            found: dict[str, Any] = condition
            return found
    return None


def _with_condition(cluster: Cluster, kind: str) -> dict[str, Any] | None:
    policy = cluster.get(POLICIES, "paper-demo")
    return policy if _condition(policy, kind) else None


def _in_stack(worker: str, stack: str = STACK) -> str:
    """A worker as the stop's status names it: every stack's workers are listed together."""
    return f"{stack}/{worker}"


def _acknowledged(cluster: Cluster) -> set[str]:
    return {a["worker"] for a in _stop_status(cluster).get("acknowledgements") or []}


def _has_event(cluster: Cluster, reason: str) -> bool:
    return any(e.get("reason") == reason for e in cluster.events())


def _replicas(cluster: Cluster, role: str) -> int | None:
    deployment = cluster.get(DEPLOYMENTS, f"paper-demo-{role}")
    return None if deployment is None else int(deployment["spec"]["replicas"])


async def test_policy_when_applied_then_deployments_status_and_revision(
    nats_server: EmbeddedNats, cluster: Cluster
) -> None:
    async with _operator(nats_server.url):
        await cluster.apply(STOPS, _stop())
        await cluster.apply(POLICIES, _policy())
        await _eventually(
            lambda: cluster.names(DEPLOYMENTS) >= {f"paper-demo-{r}" for r in ROLES},
            timeout_s=10,
            what="four deployments",
        )
        execution = cluster.get(DEPLOYMENTS, "paper-demo-execution")
        assert execution is not None
        assert execution["spec"]["replicas"] == 2
        labels = execution["metadata"]["labels"]
        assert labels["app.kubernetes.io/component"] == "execution"
        assert labels["app.kubernetes.io/instance"] == "paper-demo"
        owner = execution["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["controller"]) == (
            "TradingPolicy",
            "paper-demo",
            True,
        )
        container = execution["spec"]["template"]["spec"]["containers"][0]
        assert container["args"] == ["execution"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        policy = await _eventually(
            lambda: _with_condition(cluster, "Ready"),
            timeout_s=10,
            what="policy conditions",
        )
        status = policy["status"]
        assert status["workloads"]["execution"] == {"desired": 2, "ready": 0}
        assert _condition(policy, "Ready")["reason"] == "WorkloadsNotReady"  # type: ignore[index]
        assert _condition(policy, "Progressing")["status"] == "True"  # type: ignore[index]
        published = await _kv_policy(nats_server.url)
        assert published is not None
        assert status["publishedRevision"] == published.revision
        assert published.spec.workloads.execution.replicas == 2

        await cluster.patch(
            POLICIES, "paper-demo", {"spec": {"workloads": {"execution": {"replicas": 3}}}}
        )
        await _eventually(
            lambda: _replicas(cluster, "execution") == 3, timeout_s=10, what="scaled to 3"
        )
        for _ in range(50):  # the revision is published right after the Deployments
            newer = await _kv_policy(nats_server.url)
            if newer is not None and newer.revision > published.revision:
                break
            await asyncio.sleep(0.1)
        assert newer is not None
        assert newer.revision == published.revision + 1
        assert newer.spec.workloads.execution.replicas == 3


async def test_policy_when_invalid_then_marked_invalid_and_nothing_changes(
    nats_server: EmbeddedNats, cluster: Cluster
) -> None:
    async with _operator(nats_server.url):
        await cluster.apply(STOPS, _stop())
        bad = _policy()
        bad["spec"]["symbols"] = ["BTCUSDT", "NOPEUSDT"]
        await cluster.apply(POLICIES, bad)
        policy = await _eventually(
            lambda: _with_condition(cluster, "Ready"),
            timeout_s=10,
            what="policy conditions",
        )
        ready = _condition(policy, "Ready")
        assert ready is not None
        assert (ready["status"], ready["reason"]) == ("False", "Invalid")
        assert "NOPEUSDT" in policy["status"]["invalidReason"]
        await asyncio.sleep(1.0)
        assert cluster.names(DEPLOYMENTS) == set()
        assert await _kv_policy(nats_server.url) is None
        await _eventually(
            lambda: _has_event(cluster, "Invalid"), timeout_s=5, what="a Invalid event"
        )


ROLES = ("marketdata", "inference", "execution", "portfolio")


async def _kv_policy(url: str, stack: str = STACK) -> PolicyRevision | None:
    bus = Bus(url=url, client_name="test-reader", stack=stack)
    await bus.connect()
    try:
        return await bus.kv_get(subjects.POLICY_BUCKET, subjects.POLICY_KEY, PolicyRevision)
    finally:
        await bus.close()


async def _kv_latch(url: str, stack: str = STACK) -> HaltLatch | None:
    bus = Bus(url=url, client_name="test-reader", stack=stack)
    await bus.connect()
    try:
        return await bus.kv_get(subjects.HALT_BUCKET, subjects.HALT_KEY, HaltLatch)
    finally:
        await bus.close()


def _stop_status(cluster: Cluster) -> dict[str, Any]:
    stop = cluster.get(STOPS, "main") or {}
    status: dict[str, Any] = stop.get("status") or {}
    return status


async def test_stop_when_tripped_while_signals_flow_then_acks_no_orders_after_and_scaled_down(
    nats_server: EmbeddedNats, cluster: Cluster, tmp_path: Path
) -> None:
    url = nats_server.url
    async with _operator(url):
        await cluster.apply(STOPS, _stop())
        await cluster.apply(POLICIES, _policy())
        await _eventually(
            lambda: _stop_status(cluster).get("state") == "Armed", timeout_s=10, what="Armed"
        )
        await _eventually(
            lambda: _replicas(cluster, "execution") == 2, timeout_s=10, what="deployments"
        )
        workers = await _start_pipeline(url, tmp_path)
        bus = Bus(url=url, client_name="test-flow", stack=STACK)
        await bus.connect()
        try:
            async with flowing(bus):
                await _eventually(
                    lambda: _acknowledged(cluster) >= {_in_stack("exec-1"), _in_stack("exec-2")},
                    timeout_s=20,
                    what="both workers present",
                )
                await _wait_for_fills(url, workers=("exec-1", "exec-2"))
                await cluster.patch(
                    STOPS, "main", {"spec": {"tripped": True, "reason": "test trip"}}
                )
                status = await _eventually(
                    lambda: (
                        _stop_status(cluster).get("state") == "Tripped"
                        and not _stop_status(cluster).get("pendingWorkers")
                        and _stop_status(cluster)
                    ),
                    timeout_s=10,
                    what="Tripped and acknowledged",
                )
                await asyncio.sleep(2.0)  # signals keep coming after the acknowledgements
            latch = await _kv_latch(url)
            assert latch is not None
            assert latch.state is TradingState.HALTED
            assert latch.revision == status["latchRevision"]
            acked_at = {a["worker"]: a["at"] for a in status["acknowledgements"]}
            assert {_in_stack("exec-1"), _in_stack("exec-2")} <= set(acked_at)
            await _assert_no_fill_after_ack(url, status)
            await _eventually(
                lambda: _replicas(cluster, "execution") == 0, timeout_s=10, what="execution 0"
            )
            assert _replicas(cluster, "inference") == 0
            assert _replicas(cluster, "portfolio") == 1
            assert _condition(cluster.get(STOPS, "main"), "Halted")["status"] == "True"  # type: ignore[index]
            await _eventually(
                lambda: _has_event(cluster, "Tripped"), timeout_s=5, what="a Tripped event"
            )

            # A reset inside the cooldown is refused and set back; after it, trading resumes.
            await cluster.patch(STOPS, "main", {"spec": {"tripped": False}})
            await _eventually(
                lambda: (cluster.get(STOPS, "main") or {}).get("spec", {}).get("tripped") is True,
                timeout_s=5,
                what="the refused reset to be set back",
            )
            assert _stop_status(cluster)["state"] == "Tripped"
            await _eventually(
                lambda: _has_event(cluster, "ResetRefused"),
                timeout_s=5,
                what="a ResetRefused event",
            )
            assert _replicas(cluster, "execution") == 0
            await asyncio.sleep(3.0)  # the cooldown (3 s) has now passed
            await cluster.patch(STOPS, "main", {"spec": {"tripped": False}})
            await _eventually(
                lambda: _stop_status(cluster).get("state") == "Armed", timeout_s=10, what="Armed"
            )
            await _eventually(
                lambda: _replicas(cluster, "execution") == 2, timeout_s=10, what="restored"
            )
            assert _replicas(cluster, "inference") == 1
            restored = await _kv_latch(url)
            assert restored is not None
            assert restored.state is TradingState.ACTIVE
            assert _stop_status(cluster)["tripCount"] == 1
            assert _stop_status(cluster)["resetCount"] == 1
        finally:
            await bus.close()
            await stop_pipeline(workers, nats_url=url)


async def test_operator_when_restarted_while_tripped_then_still_tripped(
    nats_server: EmbeddedNats, cluster: Cluster
) -> None:
    async with _operator(nats_server.url):
        await cluster.apply(STOPS, _stop(cooldownSeconds=600))
        await cluster.apply(POLICIES, _policy())
        await _eventually(
            lambda: _stop_status(cluster).get("state") == "Armed", timeout_s=10, what="Armed"
        )
        await cluster.patch(STOPS, "main", {"spec": {"tripped": True, "reason": "before restart"}})
        before = await _eventually(
            lambda: _stop_status(cluster).get("state") == "Tripped" and _stop_status(cluster),
            timeout_s=10,
            what="Tripped",
        )
    async with _operator(nats_server.url):
        await asyncio.sleep(2.0)
        after = _stop_status(cluster)
        assert after["state"] == "Tripped"
        assert after["trippedAt"] == before["trippedAt"]
        assert after["tripCount"] == 1
        assert after["latchRevision"] == before["latchRevision"]
        latch = await _kv_latch(nats_server.url)
        assert latch is not None
        assert latch.state is TradingState.HALTED
        assert _replicas(cluster, "execution") == 0


async def _start_pipeline(url: str, tmp_path: Path) -> list[Worker]:
    stack = ("--stack", STACK)
    workers = [start_worker("portfolio", nats_url=url, log_dir=tmp_path, args=stack)]
    for worker_id in ("exec-1", "exec-2"):
        workers.append(
            start_worker(
                "execution", nats_url=url, log_dir=tmp_path, args=(*stack, "--worker-id", worker_id)
            )
        )
    return workers


async def _wait_for_fills(url: str, *, workers: tuple[str, ...]) -> None:
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        updates = await order_updates(url, stack=STACK)
        if {u.worker_id for u in updates if u.status is OrderStatus.FILLED} >= set(workers):
            return
        assert asyncio.get_running_loop().time() < deadline, "both workers should trade first"
        await asyncio.sleep(0.2)


async def _assert_no_fill_after_ack(url: str, status: dict[str, Any]) -> None:
    from qtrader.control.ess_status import parse_time

    acked_ms = {
        a["worker"]: int(parse_time(a["at"]).timestamp() * 1000) for a in status["acknowledgements"]
    }
    for update in await order_updates(url, stack=STACK):
        worker = _in_stack(update.worker_id)
        if update.status is OrderStatus.FILLED and worker in acked_ms:
            assert update.ts_ms <= acked_ms[worker], (
                f"{update.client_order_id} filled after {update.worker_id} acknowledged"
            )


@pytest.mark.parametrize(
    ("kind", "detail"),
    [
        (RiskAlertKind.DRAWDOWN, "drawdown 3.4% beyond 3%"),
        (RiskAlertKind.EXCHANGE_BAN, "exchange banned this IP for 120 s"),  # always trips
    ],
)
async def test_risk_alert_when_its_trigger_is_set_then_the_stop_trips_visibly(
    nats_server: EmbeddedNats, cluster: Cluster, kind: RiskAlertKind, detail: str
) -> None:
    async with _operator(nats_server.url):
        await cluster.apply(STOPS, _stop())
        await cluster.apply(POLICIES, _policy())
        await _eventually(
            lambda: _stop_status(cluster).get("state") == "Armed", timeout_s=10, what="Armed"
        )
        bus = Bus(url=nats_server.url, client_name="test-risk", stack=STACK)
        await bus.connect()
        try:
            alert = RiskAlert(
                alert_id=f"{kind.value}-1",
                alert_kind=kind,
                source="test",
                value=Decimal("3.4"),
                threshold=Decimal("3"),
                detail=detail,
                ts_ms=1,
            )
            await bus.publish(subjects.risk_alert_subject(alert.alert_kind.value), alert)
        finally:
            await bus.close()
        status = await _eventually(
            lambda: _stop_status(cluster).get("state") == "Tripped" and _stop_status(cluster),
            timeout_s=10,
            what="the automatic trip",
        )
        stop = cluster.get(STOPS, "main")
        assert stop is not None
        assert stop["spec"]["tripped"] is True
        assert detail in stop["spec"]["reason"]
        assert stop["metadata"]["annotations"]["qtrader.dev/tripped-by"] == f"risk:{kind.value}"
        assert status["automatic"] is True
        assert status["trippedBy"] == f"risk:{kind.value}"
        latch = await _kv_latch(nats_server.url)
        assert latch is not None
        assert latch.state is TradingState.HALTED


async def test_a_price_fall_beyond_the_stops_flash_crash_trigger_trips_it_by_itself(
    nats_server: EmbeddedNats, cluster: Cluster
) -> None:
    """The operator's own risk monitor reads the candles (the example stop: 15% within 60 s)."""
    async with _operator(nats_server.url):
        await cluster.apply(STOPS, _stop())
        await cluster.apply(POLICIES, _policy())
        await _eventually(
            lambda: _stop_status(cluster).get("state") == "Armed", timeout_s=10, what="Armed"
        )
        bus = Bus(url=nats_server.url, client_name="test-crash", stack=STACK)
        await bus.connect()
        try:
            for second, close in enumerate(["50000", "49000", "45000", "42400"]):  # -15.2%
                candle = flat_candle(
                    "BTCUSDT",
                    close,
                    open_time_ms=1_700_000_000_000 + second * 1000,
                    interval="1s",
                )
                await bus.publish(subjects.candle_subject("BTCUSDT"), candle)
        finally:
            await bus.close()
        status = await _eventually(
            lambda: _stop_status(cluster).get("state") == "Tripped" and _stop_status(cluster),
            timeout_s=10,
            what="the flash-crash trip",
        )
        assert status["trippedBy"] == "risk:flash_crash"
        stop = cluster.get(STOPS, "main")
        assert stop is not None
        assert "BTCUSDT drop of 15.2000% in 3 s" in stop["spec"]["reason"]
        latch = await _kv_latch(nats_server.url)
        assert latch is not None
        assert latch.state is TradingState.HALTED


async def _publish_alert(
    url: str, kind: RiskAlertKind, *, value: str, alert_id: str, stack: str = STACK
) -> None:
    bus = Bus(url=url, client_name="test-risk", stack=stack)
    await bus.connect()
    try:
        alert = RiskAlert(
            alert_id=alert_id,
            alert_kind=kind,
            source="test",
            value=Decimal(value),
            threshold=Decimal("3"),
            detail=f"{kind.value} {value}",
            ts_ms=1,
        )
        await bus.publish(subjects.risk_alert_subject(alert.alert_kind.value), alert)
    finally:
        await bus.close()


async def test_a_manual_trip_after_an_automatic_one_is_kubectls_and_never_resets_itself(
    nats_server: EmbeddedNats, cluster: Cluster
) -> None:
    async with _operator(nats_server.url):
        await cluster.apply(STOPS, _stop(requireManualReset=False, cooldownSeconds=1))
        await cluster.apply(POLICIES, _policy())
        await _eventually(
            lambda: _stop_status(cluster).get("state") == "Armed", timeout_s=10, what="Armed"
        )
        await _publish_alert(nats_server.url, RiskAlertKind.EXCHANGE_BAN, value="5", alert_id="b1")
        await _eventually(
            lambda: _stop_status(cluster).get("tripCount") == 1, timeout_s=10, what="auto trip"
        )
        await _eventually(
            lambda: _stop_status(cluster).get("resetCount") == 1, timeout_s=10, what="auto reset"
        )
        stop = cluster.get(STOPS, "main") or {}
        annotations = stop["metadata"].get("annotations") or {}
        assert annotations.get("qtrader.dev/tripped-by") is None, annotations

        await cluster.patch(STOPS, "main", {"spec": {"tripped": True, "reason": "by hand"}})
        status = await _eventually(
            lambda: _stop_status(cluster).get("tripCount") == 2 and _stop_status(cluster),
            timeout_s=10,
            what="the manual trip",
        )
        assert (status["trippedBy"], status["automatic"]) == ("kubectl", False)
        await asyncio.sleep(2.5)  # well past the 1 s cooldown
        after = _stop_status(cluster)
        assert (after["state"], after["resetCount"]) == ("Tripped", 1)
        assert (cluster.get(STOPS, "main") or {})["spec"]["tripped"] is True
        latch = await _kv_latch(nats_server.url)
        assert latch is not None
        assert latch.state is TradingState.HALTED


async def test_a_reconciliation_alert_trips_to_reducing_and_the_reset_puts_the_mode_back(
    nats_server: EmbeddedNats, cluster: Cluster
) -> None:
    url = nats_server.url
    async with _operator(url):
        await cluster.apply(STOPS, _stop(cooldownSeconds=1))  # mode Halted
        await cluster.apply(POLICIES, _policy())
        await _eventually(lambda: _published(cluster, "paper-demo"), timeout_s=10, what="policy")
        await _eventually(
            lambda: _stop_status(cluster).get("state") == "Armed", timeout_s=10, what="Armed"
        )
        await _publish_alert(url, RiskAlertKind.RECONCILIATION, value="1", alert_id="recon-1")
        await _eventually(
            lambda: _stop_status(cluster).get("state") == "Reducing",
            timeout_s=10,
            what="the stop Reducing",
        )
        stop = cluster.get(STOPS, "main") or {}
        assert stop["spec"]["mode"] == "Reducing"
        assert stop["metadata"]["annotations"]["qtrader.dev/mode-before-trip"] == "Halted"
        assert _stop_status(cluster)["trippedBy"] == "risk:reconciliation"
        latch = await _kv_latch(url)
        assert latch is not None
        assert latch.state is TradingState.REDUCING
        await _eventually(
            lambda: _replicas(cluster, "execution") == 2 and _replicas(cluster, "inference") == 0,
            timeout_s=10,
            what="execution kept to reduce, inference at 0",
        )

        await asyncio.sleep(1.2)  # past the cooldown
        await cluster.patch(STOPS, "main", {"spec": {"tripped": False}})
        await _eventually(
            lambda: (
                _stop_status(cluster).get("state") == "Armed"
                and (cluster.get(STOPS, "main") or {})["spec"]["mode"] == "Halted"
            ),
            timeout_s=10,
            what="reset, with the stop's own mode back",
        )
        annotations = (cluster.get(STOPS, "main") or {})["metadata"].get("annotations") or {}
        assert "qtrader.dev/mode-before-trip" not in annotations
        assert "qtrader.dev/tripped-by" not in annotations
        await cluster.patch(STOPS, "main", {"spec": {"tripped": True, "reason": "by hand"}})
        await _eventually(  # a person's next trip is in the stop's own mode again
            lambda: _stop_status(cluster).get("state") == "Tripped",
            timeout_s=10,
            what="a person's trip halting",
        )


def _snapshot(drawdown: str, sequence: int) -> PortfolioSnapshot:
    equity = Decimal(10_000) * (1 - Decimal(drawdown) / 100)
    return PortfolioSnapshot(
        sequence=sequence,
        ts_ms=1_700_000_000_000 + sequence,
        fills_applied=sequence,
        initial_capital=Decimal(10_000),
        realized_pnl=equity - 10_000,
        unrealized_pnl=Decimal(0),
        fees=Decimal(0),
        equity=equity,
        peak_equity=Decimal(10_000),
        drawdown_pct=Decimal(drawdown),
        max_drawdown_pct=Decimal(drawdown),
        positions=(),
    )


async def _publish_snapshot(url: str, drawdown: str, sequence: int) -> None:
    bus = Bus(url=url, client_name="test-portfolio", stack=STACK)
    await bus.connect()
    try:
        await bus.publish(subjects.PORTFOLIO_SNAPSHOT, _snapshot(drawdown, sequence))
    finally:
        await bus.close()


def _spec_tripped(cluster: Cluster) -> bool | None:
    tripped = ((cluster.get(STOPS, "main") or {}).get("spec") or {}).get("tripped")
    return None if tripped is None else bool(tripped)


async def test_a_reset_while_the_drawdown_still_holds_is_refused_and_trading_never_resumes(
    nats_server: EmbeddedNats, cluster: Cluster
) -> None:
    url = nats_server.url
    async with _operator(url):
        await cluster.apply(STOPS, _stop(cooldownSeconds=1, triggers={"drawdownPct": "3"}))
        await cluster.apply(POLICIES, _policy())
        await _eventually(
            lambda: _stop_status(cluster).get("state") == "Armed", timeout_s=10, what="Armed"
        )
        await _publish_snapshot(url, "9.35", 1)
        await _eventually(
            lambda: _stop_status(cluster).get("state") == "Tripped", timeout_s=10, what="trip"
        )
        await asyncio.sleep(1.5)  # past the cooldown: only the drawdown can refuse the reset
        await cluster.patch(STOPS, "main", {"spec": {"tripped": False}})
        await _eventually(lambda: _has_event(cluster, "ResetRefused"), timeout_s=10, what="refusal")
        refusal = next(e for e in cluster.events() if e.get("reason") == "ResetRefused")
        assert "drawdown 9.35% still beyond the 3% trigger" in refusal["message"]
        await _eventually(lambda: _spec_tripped(cluster) is True, timeout_s=5, what="set back")
        for _ in range(10):  # it never reaches Armed, not even for a moment
            assert _stop_status(cluster)["state"] == "Tripped"
            latch = await _kv_latch(url)
            assert latch is not None
            assert latch.state is TradingState.HALTED
            await asyncio.sleep(0.2)
        assert _replicas(cluster, "execution") == 0

        await _publish_snapshot(url, "1.5", 2)  # recovered below the trigger: a reset goes through
        await asyncio.sleep(0.5)
        await cluster.patch(STOPS, "main", {"spec": {"tripped": False}})
        await _eventually(
            lambda: _stop_status(cluster).get("state") == "Armed", timeout_s=10, what="Armed"
        )


# --- many stops, one meaning -------------------------------------------------------------------


def _named_stop(name: str, **spec: Any) -> dict[str, Any]:
    document = _stop(**spec)
    document["metadata"] = {**document["metadata"], "name": name}
    return document


def _status_of(cluster: Cluster, name: str) -> dict[str, Any]:
    status: dict[str, Any] = (cluster.get(STOPS, name) or {}).get("status") or {}
    return status


@contextlib.asynccontextmanager
async def _latch_watch(url: str) -> AsyncIterator[list[HaltLatch]]:
    """Every latch in force, sampled every 50 ms, while the block runs."""
    seen: list[HaltLatch] = []
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            try:
                latch = await _kv_latch(url)
            except nats.js.errors.BucketNotFoundError:  # the stack's topology is not made yet
                latch = None
            if latch is not None and (not seen or seen[-1] != latch):
                seen.append(latch)
            await asyncio.sleep(0.05)

    task = asyncio.create_task(sample())
    try:
        yield seen
    finally:
        # Stopped by the event, not by cancelling: nats-py 2.16 swallows a cancellation that
        # lands in its flush queue, and the sampler then went on forever (a test hung so in CI,
        # its teardown waiting for this task).
        stop.set()
        await asyncio.wait({task}, timeout=30)
        assert task.done(), "the latch sampler did not stop"
        task.result()  # a sampler that died would leave ``seen`` short: say why


def _worker_state(cluster: Cluster, stop: str, worker: str) -> str | None:
    for ack in _status_of(cluster, stop).get("acknowledgements") or []:
        if ack["worker"] == worker:
            return str(ack["state"])
    return None


async def test_two_stops_when_the_second_is_created_reset_and_deleted_across_a_restart_then_halted(
    nats_server: EmbeddedNats, cluster: Cluster, tmp_path: Path
) -> None:
    url = nats_server.url
    args = ("--stack", STACK, "--worker-id", "x-1")
    worker = start_worker("execution", nats_url=url, log_dir=tmp_path, args=args)
    try:
        async with _latch_watch(url) as seen:
            async with _operator(url):
                await cluster.apply(STOPS, _named_stop("main", cooldownSeconds=600))
                await cluster.apply(POLICIES, _policy())
                await _eventually(
                    lambda: _status_of(cluster, "main").get("state") == "Armed",
                    timeout_s=10,
                    what="Armed",
                )
                await cluster.patch(STOPS, "main", {"spec": {"tripped": True, "reason": "first"}})
                await _eventually(
                    lambda: _worker_state(cluster, "main", _in_stack("x-1")) == "HALTED",
                    timeout_s=10,
                    what="the worker halted by main",
                )
                # The sampler polls every 50 ms: it may not have seen the trip's latch yet.
                await _eventually(
                    lambda: any(latch.state is TradingState.HALTED for latch in seen),
                    timeout_s=10,
                    what="the sampler seeing the trip",
                )
                halted_at = [latch.state for latch in seen].index(TradingState.HALTED)
                await cluster.apply(STOPS, _named_stop("second", cooldownSeconds=1))
                await _eventually(
                    lambda: _status_of(cluster, "second").get("heldBy") == ["main"],
                    timeout_s=10,
                    what="the second stop to show main holding the halt",
                )
                assert _status_of(cluster, "second")["state"] == "Armed"
                await cluster.patch(STOPS, "second", {"spec": {"tripped": True, "reason": "2nd"}})
                await _eventually(
                    lambda: _status_of(cluster, "second").get("state") == "Tripped",
                    timeout_s=10,
                    what="second tripped",
                )
            async with _operator(url):  # restarted with both tripped: second is reset, deleted
                await asyncio.sleep(1.0)  # past second's cooldown
                await cluster.patch(STOPS, "second", {"spec": {"tripped": False}})
                await _eventually(
                    lambda: _status_of(cluster, "second").get("state") == "Armed",
                    timeout_s=10,
                    what="second reset",
                )
                await cluster.delete(STOPS, "second")
                await _eventually(
                    lambda: not cluster.get(STOPS, "second"), timeout_s=10, what="deleted"
                )
                await asyncio.sleep(2.0)  # the keeper has run since
                assert _worker_state(cluster, "main", _in_stack("x-1")) == "HALTED"
                assert _replicas(cluster, "execution") == 0
        after_trip = seen[halted_at:]
        assert {latch.state for latch in after_trip} == {TradingState.HALTED}, seen
        assert seen[-1].held_by == ("main",)
        assert [latch.revision for latch in seen] == sorted({latch.revision for latch in seen})
    finally:
        worker.stop()


async def test_a_reducing_trip_then_a_new_armed_stop_and_a_restart_then_still_reducing(
    nats_server: EmbeddedNats, cluster: Cluster
) -> None:
    url = nats_server.url
    async with _operator(url):
        await cluster.apply(STOPS, _named_stop("main", cooldownSeconds=600))
        await cluster.apply(POLICIES, _policy())
        await _eventually(
            lambda: _status_of(cluster, "main").get("state") == "Armed", timeout_s=10, what="Armed"
        )
        body = {"spec": {"tripped": True, "reason": "reduce", "mode": "Reducing"}}
        await cluster.patch(STOPS, "main", body)
        await _eventually(
            lambda: _status_of(cluster, "main").get("state") == "Reducing", timeout_s=10, what="R"
        )
    async with _latch_watch(url) as seen, _operator(url):
        await cluster.apply(STOPS, _named_stop("second"))
        await _eventually(
            lambda: _status_of(cluster, "second").get("heldBy") == ["main"],
            timeout_s=10,
            what="second showing main's halt",
        )
        await asyncio.sleep(1.5)
    assert {(latch.state, latch.held_by) for latch in seen} == {
        (TradingState.REDUCING, ("main",))
    }, seen


async def test_a_frozen_worker_during_a_trip_stays_pending_with_ack_timeout_until_it_answers(
    nats_server: EmbeddedNats, cluster: Cluster, tmp_path: Path
) -> None:
    url = nats_server.url
    args = ("--stack", STACK, "--worker-id", "x-2")
    worker = start_worker("execution", nats_url=url, log_dir=tmp_path, args=args)
    try:
        async with _operator(url):
            await cluster.apply(STOPS, _stop(cooldownSeconds=600, ackTimeoutSeconds=1))
            await cluster.apply(POLICIES, _policy())
            await _eventually(
                lambda: _worker_state(cluster, "main", _in_stack("x-2")) == "ACTIVE",
                timeout_s=10,
                what="the worker present",
            )
            os.kill(worker.process.pid, signal.SIGSTOP)
            try:
                await cluster.patch(STOPS, "main", {"spec": {"tripped": True, "reason": "x"}})
                await asyncio.sleep(6.0)  # past the 5 s presence timeout: still pending
                status = _stop_status(cluster)
                assert status["state"] == "Tripped"
                assert status["pendingWorkers"] == [_in_stack("x-2")]
                condition = _condition(cluster.get(STOPS, "main"), "AckTimeout")
                assert condition is not None
                assert condition["status"] == "True"
                assert "x-2" in condition["message"]
                assert _has_event(cluster, "AckTimeout")
            finally:
                os.kill(worker.process.pid, signal.SIGCONT)
            await _eventually(
                lambda: (
                    _worker_state(cluster, "main", _in_stack("x-2")) == "HALTED"
                    and not _stop_status(cluster)["pendingWorkers"]
                ),
                timeout_s=10,
                what="the resumed worker's acknowledgement",
            )
            condition = _condition(cluster.get(STOPS, "main"), "AckTimeout")
            assert condition is not None
            assert condition["status"] == "False"
    finally:
        worker.stop()


# --- two policies, two stacks ------------------------------------------------------------------

OTHER = "paper-two"
OTHER_STACK = subjects.stack_id(NAMESPACE, OTHER)


def _other_policy() -> dict[str, Any]:
    """A second policy in the namespace, with a spec of its own (one execution replica)."""
    document = _policy()
    document["metadata"] = {**document["metadata"], "name": OTHER}
    document["spec"]["workloads"]["execution"] = {"replicas": 1}
    return document


def _published(cluster: Cluster, name: str) -> int | None:
    revision = ((cluster.get(POLICIES, name) or {}).get("status") or {}).get("publishedRevision")
    return None if revision is None else int(revision)


def _stack_env(cluster: Cluster, deployment: str) -> str | None:
    found = cluster.get(DEPLOYMENTS, deployment) or {}
    (container,) = found["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    return env.get("QTRADER_STACK")


async def _latches(url: str) -> tuple[HaltLatch | None, HaltLatch | None]:
    return await _kv_latch(url, STACK), await _kv_latch(url, OTHER_STACK)


async def _until_latches(url: str, state: TradingState, *, what: str) -> HaltLatch:
    """Wait until both stacks hold the same latch, in ``state``; returns it."""
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        first, second = await _latches(url)
        if first is not None and first == second and first.state is state:
            return first
        assert asyncio.get_running_loop().time() < deadline, f"{what}: {first} / {second}"
        await asyncio.sleep(0.1)


async def test_two_policies_each_publish_to_their_own_stack_and_share_every_stops_latch(
    nats_server: EmbeddedNats, cluster: Cluster
) -> None:
    url = nats_server.url
    async with _operator(url):
        await cluster.apply(STOPS, _stop(cooldownSeconds=1))
        await cluster.apply(POLICIES, _policy())
        await cluster.apply(POLICIES, _other_policy())
        await _eventually(
            lambda: _published(cluster, "paper-demo") and _published(cluster, OTHER),
            timeout_s=10,
            what="both policies published",
        )
        assert _stack_env(cluster, "paper-demo-execution") == STACK
        assert _stack_env(cluster, f"{OTHER}-marketdata") == OTHER_STACK
        first, second = await _kv_policy(url, STACK), await _kv_policy(url, OTHER_STACK)
        assert first is not None
        assert second is not None
        assert (first.name, second.name) == ("paper-demo", OTHER)
        assert second.spec.workloads.execution.replicas == 1
        assert await _kv_policy_unscoped(url) is None  # nothing in local mode's names
        for _ in range(30):  # past a round of both policies' timers (every 5 s)
            await asyncio.sleep(0.2)
            assert await _kv_policy(url, STACK) == first
            assert await _kv_policy(url, OTHER_STACK) == second
        assert (_published(cluster, "paper-demo"), _published(cluster, OTHER)) == (
            first.revision,
            second.revision,
        )

        await _until_latches(url, TradingState.ACTIVE, what="both stacks armed")
        await cluster.patch(STOPS, "main", {"spec": {"tripped": True, "reason": "both"}})
        halted = await _until_latches(url, TradingState.HALTED, what="both stacks halted")
        assert halted.held_by == ("main",)
        await _eventually(
            lambda: _stop_status(cluster).get("latchRevision") == halted.revision,
            timeout_s=10,
            what="the stop's status at the latch revision",
        )
        await asyncio.sleep(1.2)  # past the cooldown
        await cluster.patch(STOPS, "main", {"spec": {"tripped": False}})
        await _until_latches(url, TradingState.ACTIVE, what="both stacks reset")

        # An alert in one policy's stack trips the stop, which halts both.
        await _publish_alert(
            url, RiskAlertKind.EXCHANGE_BAN, value="1", alert_id="other-ban", stack=OTHER_STACK
        )
        await _until_latches(url, TradingState.HALTED, what="both halted by the other's alert")
        # The latch is written within the stop's round; its status only when the round ends.
        await _eventually(
            lambda: _stop_status(cluster).get("trippedBy") == "risk:exchange_ban",
            timeout_s=10,
            what="the stop's status naming the alert",
        )


def _labelled(document: dict[str, Any], **labels: str) -> dict[str, Any]:
    document["metadata"] = {**document["metadata"], "labels": labels}
    return document


async def _until_states(
    url: str, first: TradingState, second: TradingState, *, what: str
) -> tuple[HaltLatch, HaltLatch]:
    """Wait until the two stacks hold latches in these states, at one revision."""

    async def reached() -> tuple[HaltLatch, HaltLatch] | None:
        one, two = await _latches(url)
        if one is None or two is None or one.revision != two.revision:
            return None
        return (one, two) if (one.state, two.state) == (first, second) else None

    found: tuple[HaltLatch, HaltLatch] = await _eventually(reached, timeout_s=10, what=what)
    return found


async def test_a_stop_with_a_policy_selector_halts_only_the_policies_it_selects(
    nats_server: EmbeddedNats, cluster: Cluster
) -> None:
    """``main`` covers both policies; ``btc-desk`` only those labelled desk=btc. Its trip halts
    the btc policy and leaves the other trading; relabelled, the other joins and leaves the
    halt; an operator restart changes nothing; an alert in one stack trips only the stops that
    cover it."""
    url = nats_server.url
    btc_desk = {"matchLabels": {"desk": "btc"}}
    async with _latch_watch(url) as seen:  # the btc policy's stack
        async with _operator(url):
            await cluster.apply(STOPS, _named_stop("main", cooldownSeconds=1))
            await cluster.apply(
                STOPS, _named_stop("btc-desk", cooldownSeconds=1, policySelector=btc_desk)
            )
            await cluster.apply(POLICIES, _labelled(_policy(), desk="btc"))
            await cluster.apply(POLICIES, _labelled(_other_policy(), desk="eth"))
            await _eventually(
                lambda: _published(cluster, "paper-demo") and _published(cluster, OTHER),
                timeout_s=10,
                what="both policies published",
            )
            await _until_latches(url, TradingState.ACTIVE, what="both stacks armed")

            await cluster.patch(STOPS, "btc-desk", {"spec": {"tripped": True, "reason": "desk"}})
            btc, eth = await _until_states(
                url, TradingState.HALTED, TradingState.ACTIVE, what="only the btc policy halted"
            )
            assert (btc.held_by, eth.held_by) == (("btc-desk",), ())
            await _eventually(
                lambda: _replicas_of(cluster, "paper-demo", "execution") == 0,
                timeout_s=10,
                what="the btc policy's execution at 0",
            )
            await _eventually(
                lambda: (
                    _status_of(cluster, "btc-desk").get("heldBy") == ["btc-desk"]
                    and _status_of(cluster, "main").get("heldBy") == ["btc-desk"]
                ),
                timeout_s=10,
                what="both stops showing btc-desk's halt",
            )
            assert _replicas_of(cluster, OTHER, "execution") == 1

            await cluster.patch(POLICIES, OTHER, {"metadata": {"labels": {"desk": "btc"}}})
            btc, eth = await _until_states(
                url, TradingState.HALTED, TradingState.HALTED, what="the relabelled one halted"
            )
            assert eth.held_by == ("btc-desk",)
            await _eventually(
                lambda: _replicas_of(cluster, OTHER, "execution") == 0,
                timeout_s=15,
                what="the relabelled policy's execution at 0",
            )
        async with _operator(url):  # restarted: the same latches, nothing lifted
            await asyncio.sleep(2.0)  # the keeper and both stops' first rounds have run
            assert await _latches(url) == (btc, eth)
            await cluster.patch(POLICIES, OTHER, {"metadata": {"labels": {"desk": "eth"}}})
            await _until_states(
                url, TradingState.HALTED, TradingState.ACTIVE, what="relabelled back, out of it"
            )
            await _eventually(
                lambda: _replicas_of(cluster, OTHER, "execution") == 1,
                timeout_s=15,
                what="the other policy's execution restored",
            )
            reset_at = len(seen)
            await cluster.patch(STOPS, "btc-desk", {"spec": {"tripped": False}})
            await _until_latches(url, TradingState.ACTIVE, what="btc-desk reset")

            # An exchange ban always trips, but only the stops covering the stack it came from.
            await _publish_alert(
                url, RiskAlertKind.EXCHANGE_BAN, value="1", alert_id="eth-ban", stack=OTHER_STACK
            )
            await _until_latches(url, TradingState.HALTED, what="main tripped by the alert")
            await _eventually(
                lambda: _status_of(cluster, "main").get("state") == "Tripped",
                timeout_s=10,
                what="main's status Tripped",
            )
            # The alert's trips are patched one stop after the other, before any reconcile.
            assert (cluster.get(STOPS, "btc-desk") or {})["spec"]["tripped"] is False
            assert _status_of(cluster, "btc-desk")["state"] == "Armed"
    held = seen[: max(reset_at, 1)]
    first_halt = next(i for i, latch in enumerate(held) if latch.state is TradingState.HALTED)
    assert {latch.state for latch in held[first_halt:]} == {TradingState.HALTED}, seen
    assert [latch.revision for latch in seen] == sorted({latch.revision for latch in seen})


async def test_the_stops_view_reaches_the_viewers_of_every_stack_with_its_cooldown(
    nats_server: EmbeddedNats, cluster: Cluster
) -> None:
    url = nats_server.url
    views: dict[str, list[EmergencyStopView]] = {STACK: [], OTHER_STACK: []}
    readers = [Bus(url=url, client_name=f"test-viewer-{stack}", stack=stack) for stack in views]
    tasks = []
    for reader, stack in zip(readers, views, strict=True):
        await reader.connect()

        async def seen(view: EmergencyStopView, stack: str = stack) -> None:
            views[stack].append(view)

        tasks.append(
            asyncio.create_task(
                reader.subscribe(subjects.CONTROL_ESS_STATUS, EmergencyStopView, seen, label="t")
            )
        )
    try:
        async with _operator(url):
            await cluster.apply(STOPS, _stop(cooldownSeconds=60))
            await cluster.apply(POLICIES, _policy())
            await cluster.apply(POLICIES, _other_policy())

            def in_both(state: str) -> bool:
                return all(any(v.state == state for v in seen) for seen in views.values())

            await _eventually(lambda: in_both("Armed"), timeout_s=15, what="Armed in both stacks")
            await cluster.patch(STOPS, "main", {"spec": {"tripped": True, "reason": "viewers"}})
            await _eventually(lambda: in_both("Tripped"), timeout_s=10, what="Tripped in both")
            # kopf patches the status once the handler that sent the view has returned.
            status = await _eventually(
                lambda: _stop_status(cluster).get("trippedAt") and _stop_status(cluster),
                timeout_s=10,
                what="the stop's status",
            )
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for reader in readers:
            await reader.close()
    for seen in views.values():
        view = next(v for v in seen if v.state == "Tripped")
        assert (view.name, view.reason, view.tripped_by) == ("main", "viewers", "kubectl")
        assert view.latch is TradingState.HALTED
        assert view.cooldown_until_ms is not None
        assert view.tripped_at_ms is not None
        assert view.cooldown_until_ms - view.tripped_at_ms == 60_000
        assert view.tripped_at_ms == round(parse_time(status["trippedAt"]).timestamp() * 1000)


async def _kv_policy_unscoped(url: str) -> PolicyRevision | None:
    bus = Bus(url=url, client_name="test-reader")
    await bus.connect()
    try:
        return await bus.kv_get(subjects.POLICY_BUCKET, subjects.POLICY_KEY, PolicyRevision)
    finally:
        await bus.close()


async def test_a_policy_created_while_tripped_gets_the_latch_in_force_at_once(
    nats_server: EmbeddedNats, cluster: Cluster
) -> None:
    url = nats_server.url
    async with _operator(url):
        await cluster.apply(STOPS, _stop(cooldownSeconds=600))
        await cluster.apply(POLICIES, _policy())
        await _eventually(
            lambda: _stop_status(cluster).get("state") == "Armed", timeout_s=10, what="Armed"
        )
        await cluster.patch(STOPS, "main", {"spec": {"tripped": True, "reason": "before"}})
        await _eventually(
            lambda: _stop_status(cluster).get("state") == "Tripped", timeout_s=10, what="Tripped"
        )
        await cluster.apply(POLICIES, _other_policy())
        latch = await _until_latches(url, TradingState.HALTED, what="the new stack halted")
        assert latch.revision == _stop_status(cluster)["latchRevision"]
        await _eventually(
            lambda: _replicas_of(cluster, OTHER, "execution") == 0,
            timeout_s=10,
            what="the new policy's execution held at 0",
        )


def _replicas_of(cluster: Cluster, policy: str, role: str) -> int | None:
    deployment = cluster.get(DEPLOYMENTS, f"{policy}-{role}")
    return None if deployment is None else int(deployment["spec"]["replicas"])


async def test_two_policies_workers_trade_only_their_own_stacks_signals(
    nats_server: EmbeddedNats, cluster: Cluster, tmp_path: Path
) -> None:
    """Real execution workers started with ``--stack``: a signal published in one stack never
    reaches the other stack's worker, and the stop's status lists both stacks' workers."""
    url = nats_server.url
    workers: list[Worker] = []
    buses = {stack: Bus(url=url, client_name=f"test-{stack}", stack=stack) for stack in STACKS}
    try:
        async with _operator(url):
            await cluster.apply(STOPS, _stop(cooldownSeconds=600))
            await cluster.apply(POLICIES, _policy())
            await cluster.apply(POLICIES, _other_policy())
            for stack, worker_id in zip(STACKS, ("w-1", "w-1"), strict=True):  # same id twice
                workers += _stack_pipeline(url, tmp_path / stack, stack, worker_id)
            expected = {_in_stack("w-1", stack) for stack in STACKS}
            await _eventually(
                lambda: _acknowledged(cluster) >= expected, timeout_s=20, what="both workers"
            )
            for bus in buses.values():
                await bus.connect()
            async with flowing(buses[STACK]):
                await _until_filled(url, STACK)
            await asyncio.sleep(1.0)  # what the worker had in hand is settled
            assert await order_updates(url, stack=OTHER_STACK) == []
            first = await order_updates(url, stack=STACK)
            # The same signal ids again, in the other stack: only its own worker answers them.
            async with flowing(buses[OTHER_STACK]):
                await _until_filled(url, OTHER_STACK)
            await asyncio.sleep(1.0)
            assert await order_updates(url, stack=STACK) == first

            await cluster.patch(STOPS, "main", {"spec": {"tripped": True, "reason": "both"}})
            await _eventually(
                lambda: all(_worker_state(cluster, "main", w) == "HALTED" for w in expected),
                timeout_s=10,
                what="both stacks' workers halted",
            )
    finally:
        for bus in buses.values():
            await bus.close()
        await stop_pipeline(workers, nats_url=url)


STACKS = (STACK, OTHER_STACK)


def _stack_pipeline(url: str, log_dir: Path, stack: str, worker_id: str) -> list[Worker]:
    log_dir.mkdir(parents=True, exist_ok=True)
    args = ("--stack", stack)
    return [
        start_worker("portfolio", nats_url=url, log_dir=log_dir, args=args),
        start_worker(
            "execution", nats_url=url, log_dir=log_dir, args=(*args, "--worker-id", worker_id)
        ),
    ]


async def _until_filled(url: str, stack: str) -> None:
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        updates = await order_updates(url, stack=stack)
        if any(u.status is OrderStatus.FILLED for u in updates):
            return
        assert asyncio.get_running_loop().time() < deadline, f"{stack}'s worker should trade"
        await asyncio.sleep(0.2)


# --- the operator's metrics (issue 15): readable while execution runs no replica ---------------


async def _scrape(memo: kopf.Memo) -> list[metrics.Sample]:
    """The operator's /metrics over HTTP."""
    runtime = await _eventually(lambda: getattr(memo, "runtime", None), timeout_s=10, what="up")
    port = runtime.metrics.port
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    response.raise_for_status()
    return metrics.parse(response.text)


def _sample(scraped: list[metrics.Sample], name: str, **labels: str) -> float | None:
    return metrics.find(scraped, name, **labels)


async def test_operator_metrics_show_the_stop_the_latch_and_the_policy_through_a_trip(
    nats_server: EmbeddedNats, cluster: Cluster
) -> None:
    async with _operator(nats_server.url) as memo:
        await cluster.apply(STOPS, _stop(cooldownSeconds=600))
        await cluster.apply(POLICIES, _policy())
        await _eventually(
            lambda: _stop_status(cluster).get("state") == "Armed", timeout_s=10, what="Armed"
        )
        await _eventually(lambda: _published(cluster, "paper-demo"), timeout_s=10, what="policy")
        armed = await _scrape(memo)
        assert (
            _sample(armed, "qtrader_operator_emergency_stop_state", stop="main", state="Armed") == 1
        )
        assert (
            _sample(armed, "qtrader_operator_emergency_stop_state", stop="main", state="Tripped")
            == 0
        )
        assert _sample(armed, "qtrader_operator_trading_state") == 0
        assert (
            _sample(armed, "qtrader_operator_policy_revision", policy="paper-demo")
            == (cluster.get(POLICIES, "paper-demo")["status"]["publishedRevision"])
        )
        desired = dict(policy="paper-demo", workload="execution", kind="desired")
        replicas = _replicas(cluster, "execution")
        assert replicas
        assert _sample(armed, "qtrader_operator_workload_replicas", **desired) == replicas

        await cluster.patch(STOPS, "main", {"spec": {"tripped": True, "reason": "metrics"}})
        await _eventually(lambda: _replicas(cluster, "execution") == 0, timeout_s=15, what="0")
        tripped = await _scrape(memo)
        revision = _sample(tripped, "qtrader_operator_halt_latch_revision")
        # kopf patches the status once the handler returns (after it scaled): wait for it
        await _eventually(
            lambda: _stop_status(cluster).get("latchRevision") == revision,
            timeout_s=10,
            what="the status at the latch revision the metrics show",
        )
        status = _stop_status(cluster)
        tripped_state = _sample(
            tripped, "qtrader_operator_emergency_stop_state", stop="main", state="Tripped"
        )
        assert tripped_state == 1
        assert _sample(tripped, "qtrader_operator_trading_state") == 2  # execution has 0 replicas
        trips = _sample(tripped, "qtrader_operator_emergency_stop_trips", stop="main")
        assert trips == status["tripCount"] == 1
        cooldown = _sample(
            tripped, "qtrader_operator_emergency_stop_cooldown_remaining_seconds", stop="main"
        )
        assert cooldown is not None
        assert 0 < cooldown <= 600

        # What the operator set, once its patch was answered (the emulator holds it a moment
        # before the operator reads the answer).
        async def scaled_to_0() -> bool:
            metrics = await _scrape(memo)
            return _sample(metrics, "qtrader_operator_workload_replicas", **desired) == 0

        await _eventually(scaled_to_0, timeout_s=5, what="the scaling to 0 in the metrics")


# --- a testnet policy in a cluster (issue 15): its venue's listing, its live feed --------------


def _testnet_policy(name: str, symbols: list[str]) -> dict[str, Any]:
    policy = _policy()
    policy["metadata"]["name"] = name
    policy["spec"]["mode"] = "testnet"
    policy["spec"]["symbols"] = symbols
    return policy


def _container(cluster: Cluster, deployment: str) -> dict[str, Any]:
    found = cluster.get(DEPLOYMENTS, deployment) or {}
    (container,) = found["spec"]["template"]["spec"]["containers"]
    return dict(container)


async def test_a_testnet_policy_is_checked_against_its_venue_and_runs_its_live_feed(
    nats_server: EmbeddedNats, cluster: Cluster
) -> None:
    """The local Binance server lists what its exchangeInfo says: a symbol it does not list
    makes the policy Invalid (the paper listing would have taken XRPUSDT-like names it lacks,
    and the other way round); a listed one deploys marketdata on the live feed (testnet) and
    execution pointed at that venue."""
    with sim_in_thread() as venue:
        async with httpx.AsyncClient() as client:
            listing = (await client.get(f"{venue}/fapi/v1/exchangeInfo")).json()
        listed = sorted(ExchangeInfo.from_binance(listing).instruments)
        async with _operator(nats_server.url, exchange_url=venue):
            await cluster.apply(STOPS, _stop())
            await cluster.apply(POLICIES, _testnet_policy("unlisted", [listed[0], "NOPEUSDT"]))
            await cluster.apply(POLICIES, _testnet_policy("listed", [listed[0]]))
            await _eventually(
                lambda: (
                    "NOPEUSDT"
                    in ((cluster.get(POLICIES, "unlisted") or {}).get("status") or {}).get(
                        "invalidReason", ""
                    )
                ),
                timeout_s=10,
                what="the unlisted symbol refused",
            )
            reason = cluster.get(POLICIES, "unlisted")["status"]["invalidReason"]
            assert "not listed by the testnet exchange" in reason
            await _eventually(lambda: _published(cluster, "listed"), timeout_s=10, what="listed")
    marketdata = _container(cluster, "listed-marketdata")
    assert marketdata["args"] == ["marketdata", "--source", "live", "--testnet"]
    assert {"name": "QTRADER_BINANCE_URL", "value": venue} in marketdata["env"]  # and its streams
    execution = _container(cluster, "listed-execution")
    assert {"name": "QTRADER_BINANCE_URL", "value": venue} in execution["env"]
    assert not cluster.get(DEPLOYMENTS, "unlisted-execution")


async def test_a_changed_binance_secret_rolls_execution_and_nothing_else(
    nats_server: EmbeddedNats, cluster: Cluster
) -> None:
    """The operator reads the Secret's resourceVersion (never its data) into execution's pod
    template: a new key there restarts execution, and only it."""
    keys = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "binance-keys", "namespace": NAMESPACE},
        "data": {"api-key": "a2V5LTE=", "api-secret": "c2VjcmV0LTE="},
    }
    await cluster.apply(SECRETS, keys)
    async with _operator(nats_server.url, binance_secret="binance-keys"):
        await cluster.apply(STOPS, _stop())
        await cluster.apply(POLICIES, _policy())
        await _eventually(lambda: _published(cluster, "paper-demo"), timeout_s=10, what="policy")

        def annotations() -> dict[str, dict[str, str]]:
            return {
                role: (cluster.get(DEPLOYMENTS, f"paper-demo-{role}") or {})["spec"]["template"][
                    "metadata"
                ]["annotations"]
                for role in ROLES
            }

        before = annotations()
        version = cluster.get(SECRETS, "binance-keys")["metadata"]["resourceVersion"]
        assert before["execution"]["qtrader.dev/secrets-version"] == f"binance-keys={version}"
        await cluster.patch(
            SECRETS, "binance-keys", {"data": {"api-key": "a2V5LTI="}}, new_version=True
        )
        after = await _eventually(
            lambda: (now := annotations())["execution"] != before["execution"] and now,
            timeout_s=15,
            what="execution's template to change with the Secret",
        )
        assert {role for role in ROLES if after[role] != before[role]} == {"execution"}


async def test_a_policy_reconcile_that_read_the_stops_before_a_trip_never_scales_back_up(
    nats_server: EmbeddedNats, cluster: Cluster
) -> None:
    """A policy's reconcile reads the stops, then applies its Deployments. When a trip lands in
    between (here: the API holds the reconcile's read of the Binance Secret), the scaling after
    the trip must not be undone by the reconcile's stale replicas: execution stays at 0."""
    keys = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "binance-keys", "namespace": NAMESPACE},
        "data": {"api-key": "a2V5LTE=", "api-secret": "c2VjcmV0LTE="},
    }
    await cluster.apply(SECRETS, keys)
    async with _operator(nats_server.url, binance_secret="binance-keys") as memo:
        await cluster.apply(STOPS, _stop(cooldownSeconds=600))
        await cluster.apply(POLICIES, _policy())
        await _eventually(lambda: _published(cluster, "paper-demo"), timeout_s=10, what="policy")
        assert _replicas(cluster, "execution")
        held = cluster.hold(SECRETS, "binance-keys")
        await asyncio.wait_for(held.waiting.wait(), timeout=15)  # the policy's next reconcile

        await cluster.patch(STOPS, "main", {"spec": {"tripped": True, "reason": "race"}})
        await _eventually(
            lambda: _kv_latch_is_halted(nats_server.url), timeout_s=10, what="the latch halted"
        )
        await asyncio.sleep(1.0)  # the workers' acknowledgements and the trip's scaling
        held.release()
        await _eventually(lambda: _replicas(cluster, "execution") == 0, timeout_s=15, what="0")
        for _ in range(10):  # and it stays there: no stale reconcile puts replicas back
            assert _replicas(cluster, "execution") == 0
            metrics = await _scrape(memo)
            desired = dict(policy="paper-demo", workload="execution", kind="desired")
            assert _sample(metrics, "qtrader_operator_workload_replicas", **desired) == 0
            await asyncio.sleep(0.2)


async def _kv_latch_is_halted(url: str) -> bool:
    latch = await _kv_latch(url)
    return latch is not None and latch.state is TradingState.HALTED


async def test_a_workload_left_of_the_other_kind_is_removed_after_a_restart(
    nats_server: EmbeddedNats, cluster: Cluster
) -> None:
    # The workloads' kind follows the outbox's storage (Deployments, or StatefulSets with a
    # volume each). A reconcile ended between creating the new kind and deleting the old (a
    # stop cancels the reconciles in progress) leaves both; the next operator must still
    # remove the old one, or two sets of pods run, one of them never scaled by a trip.
    defaults = PodDefaults(outbox_storage=OutboxStorage(size="1Gi"))
    async with _operator(nats_server.url, pod_defaults=defaults):
        await cluster.apply(STOPS, _stop())
        await cluster.apply(POLICIES, _policy())
        await _eventually(
            lambda: cluster.names(STATEFULSETS) >= {f"paper-demo-{r}" for r in ROLES},
            timeout_s=10,
            what="four statefulsets",
        )
    leftover = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "paper-demo-execution", "namespace": NAMESPACE},
        "spec": {"replicas": 2},
    }
    await cluster.apply(DEPLOYMENTS, leftover)
    async with _operator(nats_server.url, pod_defaults=defaults):
        await _eventually(
            lambda: not cluster.get(DEPLOYMENTS, "paper-demo-execution"),  # deleted: empty
            timeout_s=15,
            what="the leftover Deployment removed",
        )
        assert cluster.names(STATEFULSETS) >= {f"paper-demo-{r}" for r in ROLES}


async def test_a_trip_that_flattens_shows_the_open_positions_until_they_are_closed(
    nats_server: EmbeddedNats, cluster: Cluster, tmp_path: Path
) -> None:
    """The stop's PositionsOpen condition (and Positions column) tells what the portfolio holds:
    Open with each position while trading, Flat once the trip's flatten closed them all."""
    url = nats_server.url
    async with _operator(url):
        await cluster.apply(STOPS, _stop(flattenOnTrip=True))
        await cluster.apply(POLICIES, _policy())
        await _eventually(
            lambda: _stop_status(cluster).get("state") == "Armed", timeout_s=10, what="Armed"
        )
        workers = await _start_pipeline(url, tmp_path)
        bus = Bus(url=url, client_name="test-flow", stack=STACK)
        await bus.connect()
        try:
            async with flowing(bus):
                await _wait_for_fills(url, workers=("exec-1", "exec-2"))
                opened = await _eventually(
                    lambda: _positions_condition(cluster, reason="Open"),
                    timeout_s=10,
                    what="PositionsOpen: Open",
                )
                assert opened["status"] == "True"
                await cluster.patch(
                    STOPS, "main", {"spec": {"tripped": True, "reason": "flatten test"}}
                )
                flat = await _eventually(
                    lambda: _positions_condition(cluster, reason="Flat"),
                    timeout_s=30,
                    what="PositionsOpen: Flat",
                )
            assert flat["status"] == "False"
            snapshots = await read_all(
                url,
                stream=subjects.scoped_stream(STACK, subjects.PORTFOLIO).name,
                subject=subjects.scoped_subject(STACK, subjects.PORTFOLIO_SNAPSHOT),
                message_type=PortfolioSnapshot,
            )
            assert [p for p in snapshots[-1].positions if p.quantity] == []
            symbols = {s for s in opened["message"].split() if s.endswith("USDT")}
            assert symbols, opened
        finally:
            await bus.close()
            await stop_pipeline(workers, nats_url=url)


def _positions_condition(cluster: Cluster, *, reason: str) -> dict[str, Any] | None:
    found = _condition(cluster.get(STOPS, "main"), "PositionsOpen")
    return found if found is not None and found["reason"] == reason else None
