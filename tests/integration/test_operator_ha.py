"""Two operator replicas, one leading: a crashed leader is followed without halting trading.

Each replica is its own process (``support.operator_process``: the operator's own ``run`` with
peering from the environment) against kmock's emulator, with a real nats-server and real
portfolio and execution workers trading on paper. The leader is SIGKILLed while signals flow;
the test measures the takeover (kill to the standby's first heartbeat) and the largest gap
between heartbeats, and checks the worker never halted, the latch history only rose and never
changed meaning, and a trip after the takeover still halts the worker. Each replica keeps its
start-up heap out of the garbage collector's walks (``qtrader.startup_heap``), from its /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import ControlHeartbeat, HaltLatch, OrderStatus, TradingState
from qtrader.local.nats_server import EmbeddedNats
from qtrader_tools import metrics
from support.emulator import NAMESPACE, PEERINGS, POLICIES, STACK, STOPS, Cluster, eventually
from support.emulator import policy as example_policy
from support.emulator import stop as example_stop
from support.flow import flowing, order_updates
from support.operator_process import OperatorProcess, start_operator
from support.streams import kv_history_raw
from support.workers import Worker, start_worker, stop_pipeline

pytestmark = pytest.mark.integration

PEERING = "qtrader"
WORKER_HEARTBEAT_TIMEOUT_S = 10.0  # execution's default: it halts after this long without one


@dataclass
class Heartbeats:
    """Every control heartbeat of the stack, with when it arrived (monotonic)."""

    seen: list[tuple[float, str]] = field(default_factory=list)

    async def on_heartbeat(self, heartbeat: ControlHeartbeat) -> None:
        self.seen.append((time.monotonic(), heartbeat.issued_by))

    def issuers(self, since: float = 0.0) -> set[str]:
        return {issuer for at, issuer in self.seen if at >= since}

    def first_from(self, issuer: str, since: float) -> float | None:
        return next((at for at, who in self.seen if who == issuer and at >= since), None)

    def largest_gap(self) -> float:
        times = [at for at, _ in self.seen]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


@contextlib.asynccontextmanager
async def _heartbeats(url: str) -> AsyncIterator[Heartbeats]:
    bus = Bus(url=url, client_name="test-heartbeats", stack=STACK)
    await bus.connect()
    heartbeats = Heartbeats()
    task = asyncio.create_task(
        bus.subscribe(
            subjects.CONTROL_HEARTBEAT, ControlHeartbeat, heartbeats.on_heartbeat, label="test"
        )
    )
    try:
        yield heartbeats
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await bus.close()


@contextlib.asynccontextmanager
async def _health_samples(worker: Worker) -> AsyncIterator[list[str]]:
    """The worker's halt-latch check (``/health``), every 200 ms, while the block runs."""
    details: list[str] = []

    async def sample() -> None:
        while True:
            found = await asyncio.to_thread(worker.dependency, "halt-latch")
            details.append(str(found.get("detail")))
            await asyncio.sleep(0.2)

    task = asyncio.create_task(sample())
    try:
        yield details
    finally:
        if task.done():
            task.result()  # a sampler that died would leave the list short: say why
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _frozen_objects(replica: OperatorProcess) -> float:
    """What the replica's start kept out of the garbage collector's walks (its /metrics)."""
    try:
        text = httpx.get(replica.metrics_url, timeout=3).text
    except httpx.HTTPError:
        return 0.0
    return metrics.value(metrics.parse(text), "qtrader_gc_frozen_objects")


async def _latch_history(url: str) -> list[HaltLatch]:
    """Every latch value the stack's KV key still holds (the bucket keeps 16), oldest first."""
    key = subjects.scoped_key(STACK, subjects.HALT_KEY)
    values = await kv_history_raw(url, subjects.HALT_BUCKET, key)
    return [HaltLatch.model_validate_json(value) for value in values if value]


def _peers(cluster: Cluster) -> dict[str, Any]:
    peering = cluster.get(PEERINGS, PEERING) or {}
    return {k: v for k, v in (peering.get("status") or {}).items() if v}


def _stop_status(cluster: Cluster) -> dict[str, Any]:
    status: dict[str, Any] = (cluster.get(STOPS, "main") or {}).get("status") or {}
    return status


async def _start_replicas(
    cluster: Cluster, url: str, log_dir: Path
) -> tuple[OperatorProcess, OperatorProcess]:
    await cluster.apply(PEERINGS, {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering",
                                   "metadata": {"name": PEERING}})  # fmt: skip
    kube_url = cluster.url
    replicas = tuple(
        start_operator(
            identity=identity,
            priority=priority,
            kube_url=kube_url,
            nats_url=url,
            namespace=NAMESPACE,
            log_dir=log_dir,
            peering=PEERING,
        )
        for identity, priority in (("op-a", 200), ("op-b", 100))
    )
    await eventually(
        lambda: set(_peers(cluster)) >= {"op-a", "op-b"}, timeout_s=30, what="both replicas"
    )
    return replicas[0], replicas[1]


async def _trading_worker(url: str, log_dir: Path) -> list[Worker]:
    stack = ("--stack", STACK)
    portfolio = await asyncio.to_thread(
        start_worker, "portfolio", nats_url=url, log_dir=log_dir, args=stack
    )
    execution = await asyncio.to_thread(
        start_worker,
        "execution",
        nats_url=url,
        log_dir=log_dir,
        args=(*stack, "--worker-id", "x-1"),
    )
    return [portfolio, execution]


async def _filled_since(url: str, since_ms: int) -> bool:
    updates = await order_updates(url, stack=STACK)
    return any(u.status is OrderStatus.FILLED and u.ts_ms >= since_ms for u in updates)


async def _until_filled(url: str, since_ms: int, what: str) -> None:
    deadline = time.monotonic() + 30
    while not await _filled_since(url, since_ms):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


async def test_a_killed_leader_is_followed_within_the_heartbeat_timeout_and_trading_never_halts(
    nats_server: EmbeddedNats, cluster: Cluster, tmp_path: Path
) -> None:
    url = nats_server.url
    await cluster.apply(STOPS, example_stop(cooldownSeconds=600))
    await cluster.apply(POLICIES, example_policy())
    leader, standby = await _start_replicas(cluster, url, tmp_path)
    workers: list[Worker] = []
    bus = Bus(url=url, client_name="test-flow", stack=STACK)
    try:
        await eventually(
            lambda: _stop_status(cluster).get("state") == "Armed", timeout_s=30, what="Armed"
        )
        for replica in (leader, standby):  # a trip waits on no walk of their start-up heap
            await eventually(
                lambda r=replica: _frozen_objects(r) >= 50_000,  # type: ignore[misc]
                timeout_s=10,
                what=f"{replica.identity}'s start-up heap frozen",
            )
        workers = await _trading_worker(url, tmp_path)
        execution = workers[1]
        await bus.connect()
        async with _heartbeats(url) as heartbeats, flowing(bus):
            await _until_filled(url, 0, "the worker's first fill")
            async with _health_samples(execution) as health:
                await asyncio.sleep(3.0)  # both replicas up: only the leader may heartbeat
                assert heartbeats.issuers() == {"qtrader-operator/op-a"}, heartbeats.issuers()
                before = await _latch_history(url)

                killed_at, killed_ms = time.monotonic(), int(time.time() * 1000)
                await asyncio.to_thread(leader.kill)
                await eventually(
                    lambda: heartbeats.first_from("qtrader-operator/op-b", killed_at) is not None,
                    timeout_s=WORKER_HEARTBEAT_TIMEOUT_S,
                    what="the standby's first heartbeat",
                )
                takeover = heartbeats.first_from("qtrader-operator/op-b", killed_at)
                assert takeover is not None
                await _until_filled(url, killed_ms + 500, "a fill after the takeover")
                await asyncio.sleep(2.0)
            gap = heartbeats.largest_gap()
            print(f"\ntakeover {takeover - killed_at:.2f} s, largest heartbeat gap {gap:.2f} s")
            assert gap < WORKER_HEARTBEAT_TIMEOUT_S - 3, gap
            assert heartbeats.issuers(since=takeover) == {"qtrader-operator/op-b"}
            halted = [d for d in health if not d.endswith(": ACTIVE")]
            assert not halted, halted
            assert len(health) > 10
            after = await _latch_history(url)
            assert after == before, (before, after)  # the takeover wrote no latch
            revisions = [latch.revision for latch in after]
            assert revisions == sorted(set(revisions)), revisions
            assert {latch.state for latch in after} == {TradingState.ACTIVE}

            # The new leader works: a trip halts the worker, with a higher revision.
            await cluster.patch(STOPS, "main", {"spec": {"tripped": True, "reason": "after"}})
            await eventually(
                lambda: "HALTED" in str(execution.dependency("halt-latch").get("detail")),
                timeout_s=10,
                what="the worker halted by the new leader",
            )
            await eventually(
                lambda: (
                    _stop_status(cluster).get("state") == "Tripped"
                    and not _stop_status(cluster).get("pendingWorkers")
                ),
                timeout_s=10,
                what="Tripped and acknowledged",
            )
        tripped = await _latch_history(url)
        revisions = [latch.revision for latch in tripped]
        assert revisions == sorted(set(revisions)), revisions
        assert tripped[-1].state is TradingState.HALTED
        assert tripped[-1].revision == _stop_status(cluster)["latchRevision"]
    finally:
        await bus.close()
        await stop_pipeline(workers, nats_url=url)
        for replica in (leader, standby):
            await asyncio.to_thread(replica.stop)


def _terminating(cluster: Cluster, plural: str, name: str) -> bool:
    found = cluster.get(plural, name) or {}
    return bool((found.get("metadata") or {}).get("deletionTimestamp"))


async def test_deletes_complete_across_a_takeover_and_while_no_replica_runs(
    nats_server: EmbeddedNats, cluster: Cluster, tmp_path: Path
) -> None:
    """No handler needs a finalizer (the delete handlers are optional, the timers are told
    they need none): a stop or a policy is deleted at once, with a leader, after a takeover,
    and with no operator replica running at all; one carrying the finalizer an earlier
    version put there has it removed by the operator."""
    url = nats_server.url
    await cluster.apply(STOPS, example_stop(cooldownSeconds=1))
    extra = example_stop(cooldownSeconds=1)
    extra["metadata"] = {**extra["metadata"], "name": "extra"}
    await cluster.apply(STOPS, extra)
    await cluster.apply(POLICIES, example_policy())
    leader, standby = await _start_replicas(cluster, url, tmp_path)
    replacement: OperatorProcess | None = None
    try:
        async with _heartbeats(url) as heartbeats:
            await eventually(
                lambda: _stop_status(cluster).get("state") == "Armed", timeout_s=30, what="Armed"
            )
            killed_at = time.monotonic()
            await asyncio.to_thread(leader.kill)
            await eventually(
                lambda: heartbeats.first_from("qtrader-operator/op-b", killed_at) is not None,
                timeout_s=WORKER_HEARTBEAT_TIMEOUT_S,
                what="the standby leading",
            )
        await cluster.delete(STOPS, "extra")
        await cluster.delete(POLICIES, "paper-demo")
        await eventually(
            lambda: not cluster.get(STOPS, "extra") and not cluster.get(POLICIES, "paper-demo"),
            timeout_s=15,
            what="both deleted by the new leader",
        )

        assert not (cluster.get(STOPS, "main") or {})["metadata"].get("finalizers")
        await asyncio.to_thread(standby.stop)  # no replica runs now
        await cluster.delete(STOPS, "main")
        await eventually(lambda: not cluster.get(STOPS, "main"), timeout_s=5, what="main deleted")

        # A policy from an earlier version, still carrying its finalizer: released once the
        # operator is back, so its deletion completes too.
        held = example_policy()
        held["metadata"] = {**held["metadata"], "finalizers": ["qtrader.dev/finalizer"]}
        await cluster.apply(POLICIES, held)
        await cluster.delete(POLICIES, "paper-demo")
        await asyncio.sleep(1.0)
        assert _terminating(cluster, POLICIES, "paper-demo")
        replacement = start_operator(
            identity="op-c",
            priority=300,
            kube_url=cluster.url,
            nats_url=url,
            namespace=NAMESPACE,
            log_dir=tmp_path,
            peering=PEERING,
        )
        await eventually(
            lambda: not cluster.get(POLICIES, "paper-demo"),
            timeout_s=30,
            what="the held policy deleted once an operator is back",
        )
    finally:
        for replica in (leader, standby, replacement):
            if replica is not None:
                await asyncio.to_thread(replica.stop)
