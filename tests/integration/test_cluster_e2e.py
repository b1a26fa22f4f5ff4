"""The cluster end to end, without Docker: the chart's objects on kmock's emulator, every pod a
local process run by a test kubelet (``support.kubelet``), a real nats-server.

``helm template`` (the real helm 4) renders the chart with a paper TradingPolicy and the
EmergencyStop; what the emulator serves is applied to it (the kinds it does not serve are
listed and skipped), with the Binance key Secret a user would create. The kubelet runs the
operator's own Deployment (``qtrader-operator``), the operator creates the policy's four
workload Deployments, and the kubelet runs their pods as the manifests say and reports their
readiness back. The scenario: the paper policy trades; a merge patch of the stop halts, the
operator scales execution and inference to 0 and their processes end; a reset after the
cooldown brings them back, ready and trading.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from qtrader.bus.nats_bus import Bus
from qtrader.contracts import subjects
from qtrader.contracts.messages import Candle, CandleSource, Fill, HaltLatch, TradingState, decode
from qtrader.local.nats_server import EmbeddedNats
from qtrader_tools.simulators.binance_futures import SimAdmin
from support.binance_sim import KEY, SECRET, sim_in_thread
from support.emulator import (
    CONFIGMAPS,
    DEPLOYMENTS,
    NAMESPACE,
    PEERINGS,
    POLICIES,
    SECRETS,
    STATEFULSETS,
    STOPS,
    Cluster,
    eventually,
)
from support.helm_cli import HELM_SOURCES, HelmCli, helm_binary
from support.invariants import settle_portfolio
from support.kubelet import Image, Kubelet, read_as_pod_user
from support.streams import kv_get_raw, read_all, read_raw

pytestmark = [
    pytest.mark.integration,
    # Each pod gets a mount namespace of its own (unshare, mount), as CI's root user may.
    pytest.mark.skipif(os.geteuid() != 0, reason="the test kubelet needs root for mounts"),
]

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "quantum-trader"
RELEASE = "qt"
POLICY = "paper"
STACK = subjects.stack_id(NAMESPACE, POLICY)
KEYS_SECRET = "binance-keys"
ROLES = ("marketdata", "inference", "execution", "portfolio")
HALTED_ROLES = ("inference", "execution")
# The chart's kinds the emulator serves, and where; every other kind it renders is skipped.
SERVED = {
    "TradingPolicy": POLICIES,
    "EmergencyStop": STOPS,
    "KopfPeering": PEERINGS,
    "Deployment": DEPLOYMENTS,
    "ConfigMap": CONFIGMAPS,
    "Secret": SECRETS,
}
SKIPPED = {
    "NetworkPolicy",  # nothing enforces them here: every pod shares this machine's network
    "PodDisruptionBudget",  # nothing evicts pods
    "Role",  # the emulator authorizes nothing
    "RoleBinding",
    "Service",  # pods are reached on their mapped loopback ports
    "ServiceAccount",
}
# The images as the Dockerfiles build them: ENTRYPOINT, CMD and ENV, the source tree standing
# for the image's installed packages.
SOURCE = {"PYTHONPATH": f"{ROOT / 'workloads'}:{ROOT / 'operator'}"}
PYTHON_ENV = {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "HOME": "/tmp", **SOURCE}
# The interpreter's folders and the source tree: this machine's stand-in for the image's files.
IMAGE_FILES = (Path(sys.prefix), Path(sys.base_prefix), ROOT)
IMAGES = {
    "quantum-trader-operator": Image(
        entrypoint=(sys.executable, "-m", "qtrader_operator.main"),
        env=PYTHON_ENV,
        host_paths=IMAGE_FILES,
    ),
    "quantum-trader-workloads": Image(
        entrypoint=(sys.executable, "-m", "qtrader"),
        host_paths=IMAGE_FILES,
        cmd=("--help",),
        env={
            **PYTHON_ENV,
            "QTRADER_HEALTH_PORT": "8080",
            "QTRADER_OUTBOX_DIR": "/tmp/qtrader-outbox",
        },
    ),
}


def policy_spec(**changes: Any) -> dict[str, Any]:
    policy: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "policy.yaml").read_text())
    spec: dict[str, Any] = policy["spec"]
    spec["risk"]["minConfidence"] = 0.0  # every signal is traded: fills come quickly
    spec["workloads"] = {"execution": {"replicas": 2}, "inference": {"replicas": 1}}
    return {**spec, **changes}


def chart_values(
    nats_url: str, *, name: str = POLICY, spec: Mapping[str, Any], exchange_url: str = ""
) -> dict[str, Any]:
    return {
        "externalNats": {"url": nats_url},
        "operator": {"replicas": 1},  # peering on, one replica: the machine has two cores
        "binance": {"existingSecret": KEYS_SECRET, "url": exchange_url},
        "emergencyStop": {"spec": {"cooldownSeconds": 3, "requireManualReset": True}},
        "tradingPolicy": {"create": True, "name": name, "spec": dict(spec)},
    }


def render_chart(values: Mapping[str, Any], home: Path) -> list[dict[str, Any]]:
    home.mkdir()
    helm = HelmCli(major=4, binary=helm_binary(HELM_SOURCES[4]), home=home)
    done = helm.run("template", RELEASE, str(CHART), "--namespace", NAMESPACE, values=dict(values))
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


async def apply_chart(cluster: Cluster, documents: list[dict[str, Any]]) -> list[str]:
    """Apply what the emulator serves; returns the kinds skipped."""
    skipped = []
    for document in documents:
        plural = SERVED.get(document["kind"])
        if plural is None:
            skipped.append(document["kind"])
        else:
            await cluster.apply(plural, document)
    return skipped


def binance_keys() -> dict[str, Any]:
    """The Secret a user creates (``kubectl create secret generic --from-file``)."""
    from base64 import b64encode

    data = {"api-key": KEY, "api-secret": SECRET}  # the local Binance server's account
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": KEYS_SECRET},
        "type": "Opaque",
        "data": {k: b64encode(v.encode()).decode() for k, v in data.items()},
    }


def deployment(
    cluster: Cluster, role: str, policy: str = POLICY, plural: str = DEPLOYMENTS
) -> dict[str, Any]:
    """The workload's object: a Deployment, or a StatefulSet (``plural``)."""
    return cluster.get(plural, f"{policy}-{role}") or {}


def ready(cluster: Cluster, role: str, policy: str = POLICY, plural: str = DEPLOYMENTS) -> bool:
    found = deployment(cluster, role, policy, plural)
    wanted = (found.get("spec") or {}).get("replicas")
    ready_replicas = (found.get("status") or {}).get("readyReplicas")
    return bool(wanted) and ready_replicas == wanted


def stop_status(cluster: Cluster) -> dict[str, Any]:
    status: dict[str, Any] = (cluster.get(STOPS, "main") or {}).get("status") or {}
    return status


async def fills(url: str) -> list[Fill]:
    return await read_all(
        url,
        stream=subjects.scoped_stream(STACK, subjects.FILLS).name,
        subject=subjects.scoped_subject(STACK, subjects.all_of(subjects.FILL_PREFIX)),
        message_type=Fill,
    )


async def latch(url: str) -> HaltLatch | None:
    key = subjects.scoped_key(STACK, subjects.HALT_KEY)
    raw = await kv_get_raw(url, subjects.HALT_BUCKET, key)
    return None if raw is None else decode(raw, HaltLatch)


async def until(check: Callable[[], Any], *, timeout_s: float, what: str, kubelet: Kubelet) -> None:
    """``eventually``, failing with what the kubelet saw (its problems, the pods' logs)."""
    try:
        await eventually(check, timeout_s=timeout_s, what=what)
    except AssertionError as exc:
        pods = [*kubelet.stopped, *kubelet.pods.values()]
        logs = "\n".join(kubelet.logs(name)[-3000:] for name in sorted({p.workload for p in pods}))
        raise AssertionError(f"{exc}\nproblems: {kubelet.problems}\n{logs}") from None


async def until_filled(url: str, more_than: int, kubelet: Kubelet, *, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while (count := len(await fills(url))) <= more_than:
        if time.monotonic() > deadline:
            await until(
                lambda: False, timeout_s=0, what=f"fills beyond {more_than}", kubelet=kubelet
            )
        await asyncio.sleep(0.5)
    return count


async def install(cluster: Cluster, values: Mapping[str, Any], tmp_path: Path) -> None:
    """What a user does: create the key Secret, then apply what the chart renders."""
    documents = await asyncio.to_thread(render_chart, values, tmp_path / "helm")
    await cluster.apply(SECRETS, binance_keys())
    skipped = await apply_chart(cluster, documents)
    assert set(skipped) == SKIPPED, sorted(skipped)


@contextlib.asynccontextmanager
async def running(
    cluster: Cluster, root: Path, nats_url: str, stack: str
) -> AsyncIterator[Kubelet]:
    """The kubelet, drained in an order that leaves the stack's records whole: the operator
    first (nothing rescales meanwhile), then the trading pods, then the portfolio once it
    applied every fill (the end-of-test invariants compare its account with FILLS)."""
    kubelet = Kubelet(api_url=cluster.url, namespace=NAMESPACE, images=IMAGES, root=root)
    async with kubelet:
        try:
            yield kubelet
        finally:
            await kubelet.drain(
                lambda p: p.labels.get("app.kubernetes.io/component") == "operator",
                lambda p: p.labels.get("app.kubernetes.io/component") != "portfolio",
            )
            await settle_portfolio(nats_url, stack=stack)


async def test_the_chart_on_the_emulator_trades_halts_and_resumes_with_pods_as_processes(
    nats_server: EmbeddedNats, cluster: Cluster, tmp_path: Path
) -> None:
    url = nats_server.url
    await install(cluster, chart_values(url, spec=policy_spec()), tmp_path)
    started = time.monotonic()
    async with running(cluster, tmp_path / "kubelet", url, STACK) as kubelet:
        await until(
            lambda: all(ready(cluster, role) for role in ROLES),
            timeout_s=60,
            what="the paper policy's four workloads ready",
            kubelet=kubelet,
        )
        to_ready = time.monotonic() - started
        first = await until_filled(url, 0, kubelet, timeout_s=45)
        await check_pods(kubelet)

        tripped_at = time.monotonic()
        await cluster.patch(STOPS, "main", {"spec": {"tripped": True, "reason": "e2e"}})
        await until(
            lambda: all(kubelet.gone(f"{POLICY}-{role}") for role in HALTED_ROLES),
            timeout_s=30,
            what="execution and inference pods gone",
            kubelet=kubelet,
        )
        halt_to_gone = time.monotonic() - tripped_at
        halted = await latch(url)
        assert halted is not None
        assert halted.state is TradingState.HALTED
        assert stop_status(cluster)["state"] == "Tripped"
        for role in HALTED_ROLES:
            assert deployment(cluster, role)["spec"]["replicas"] == 0
        stopped = [p for p in kubelet.stopped if p.workload.endswith(HALTED_ROLES)]
        assert len(stopped) == 3, [p.name for p in stopped]  # two execution, one inference
        assert all(ready(cluster, role) for role in ("marketdata", "portfolio"))

        await reset_after_cooldown(cluster)
        reset_at = time.monotonic()
        await until(
            lambda: all(ready(cluster, role) for role in ROLES),
            timeout_s=60,
            what="the four workloads ready again",
            kubelet=kubelet,
        )
        back = time.monotonic() - reset_at
        restored = await latch(url)
        assert restored is not None
        assert restored.state is TradingState.ACTIVE
        total = await until_filled(url, len(await fills(url)), kubelet, timeout_s=45)
        print(
            f"\nready {to_ready:.1f} s after the chart was applied, {first} fills first; "
            f"trip to pods gone {halt_to_gone:.1f} s; reset to ready {back:.1f} s; "
            f"{total} fills in all"
        )


async def check_pods(kubelet: Kubelet) -> None:
    """What the manifests asked for, as the processes got it."""
    (execution, _) = kubelet.pods_of(f"{POLICY}-execution")
    assert execution.env["QTRADER_WORKER_ID"] == execution.name  # fieldRef metadata.name
    assert execution.env["QTRADER_STACK"] == STACK
    key = await read_as_pod_user(execution, "/var/run/secrets/binance/api-key")
    assert key == KEY, key  # the pod's uid reads the mounted key (fsGroup, mode 0440)


async def reset_after_cooldown(cluster: Cluster) -> None:
    """A reset inside the cooldown is refused: wait it out, then reset."""
    until_s = datetime.fromisoformat(stop_status(cluster)["cooldownUntil"]).timestamp()
    await asyncio.sleep(max(0.0, until_s - datetime.now(UTC).timestamp()) + 0.5)
    await cluster.patch(STOPS, "main", {"spec": {"tripped": False}})


TESTNET = "testnet"
TESTNET_STACK = subjects.stack_id(NAMESPACE, TESTNET)


async def test_a_testnet_policy_trades_on_the_local_binance_server_with_keys_from_a_secret(
    nats_server: EmbeddedNats, cluster: Cluster, tmp_path: Path
) -> None:
    """The chart with ``binance.url`` naming the local Binance-compatible server and the key
    Secret: execution loads the mounted keys and trades there; the verdict is the server's own
    trades (and the end-of-test invariants, from its records). marketdata runs as the manifest
    says (``--source live --testnet``, the venue's URL from the chart), on the server's kline
    stream; a 1m kline closes once a minute on its clock, so the test also publishes candles
    of its own on the policy's stack, for trading to start at once."""
    url = nats_server.url
    spec = policy_spec(mode="testnet", symbols=["BTCUSDT"])
    spec["workloads"]["execution"]["replicas"] = 1
    with sim_in_thread() as exchange:
        values = chart_values(url, name=TESTNET, spec=spec, exchange_url=exchange)
        await install(cluster, values, tmp_path)
        async with running(cluster, tmp_path / "kubelet", url, TESTNET_STACK) as kubelet:
            trading = ("inference", "execution", "portfolio")
            await until(
                lambda: all(ready(cluster, role, TESTNET) for role in trading),
                timeout_s=60,
                what="the testnet policy's inference, execution and portfolio ready",
                kubelet=kubelet,
            )
            async with candles(url, TESTNET_STACK, "BTCUSDT"):
                await until_venue_trades(exchange, kubelet, timeout_s=45)
            # marketdata runs its live feed on the venue's kline stream (the URL the chart gave)
            with SimAdmin(exchange) as admin:
                streams = [s for c in admin.websockets()["connections"] for s in c["streams"]]
            assert "btcusdt@kline_1m" in streams, streams
            trades = await asyncio.to_thread(venue_trades, exchange)
            print(f"\n{len(trades)} trades on the local Binance server")


def venue_trades(base_url: str) -> list[dict[str, Any]]:
    with SimAdmin(base_url) as admin:
        return admin.trades()


async def until_venue_trades(base_url: str, kubelet: Kubelet, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(venue_trades, base_url):
        if time.monotonic() > deadline:
            await until(lambda: False, timeout_s=0, what="a trade on the venue", kubelet=kubelet)
        await asyncio.sleep(0.5)


@contextlib.asynccontextmanager
async def candles(url: str, stack: str, symbol: str) -> AsyncIterator[None]:
    """Closed candles on the stack's market subject, 10 a second, near the local server's
    price (100) so that orders stay inside the slippage bound. Their times start a day ahead:
    the klines marketdata takes from the venue's stream (one a minute) are then older, and the
    models' windows ignore them instead of being reset by them."""
    bus = Bus(url=url, client_name="test-candles", stack=stack)
    await bus.connect()
    stop = asyncio.Event()

    async def feed() -> None:
        index = 0
        start_ms = int(time.time() * 1000) // 60_000 * 60_000 + 1_440 * 60_000
        while not stop.is_set():
            price = Decimal(100) + Decimal((index * 7) % 11 - 5) / 100
            open_ms = start_ms + index * 60_000
            candle = Candle(symbol=symbol, interval="1m", open_time_ms=open_ms,
                            close_time_ms=open_ms + 59_999, open=price, high=price + 1,
                            low=price - 1, close=price, volume=Decimal(1),
                            source=CandleSource.SYNTHETIC)  # fmt: skip
            await bus.publish(subjects.candle_subject(symbol), candle)
            index += 1
            await asyncio.sleep(0.1)

    task = asyncio.create_task(feed())
    try:
        yield
    finally:
        stop.set()
        await task
        await bus.close()


async def test_with_outbox_storage_a_pod_deleted_during_a_nats_outage_loses_nothing(
    nats_server: EmbeddedNats, cluster: Cluster, tmp_path: Path
) -> None:
    """``workloads.outboxStorage``: the workloads run as StatefulSets with a claim each. NATS
    stops; marketdata buffers its candles in the outbox on its claim; its pod is deleted (an
    eviction) and its replacement, same name, same claim, starts while NATS is still down. Once
    NATS is back, every candle the deleted pod buffered is on the MARKET stream (on an emptyDir
    they would have gone with the pod), and the end-of-test check finds none twice."""
    url = nats_server.url
    values = chart_values(url, spec=policy_spec())
    values["workloads"] = {"outboxStorage": {"enabled": True, "size": "1Gi"}}
    await install(cluster, values, tmp_path)
    market = subjects.scoped_stream(STACK, subjects.MARKET).name
    candle_subject = subjects.scoped_subject(STACK, subjects.all_of(subjects.CANDLE_PREFIX))

    async def stored() -> set[bytes]:
        return set(await read_raw(url, stream=market, subject=candle_subject))

    async with running(cluster, tmp_path / "kubelet", url, STACK) as kubelet:
        await until(
            lambda: all(ready(cluster, role, plural=STATEFULSETS) for role in ROLES),
            timeout_s=60,
            what="the four StatefulSets ready",
            kubelet=kubelet,
        )
        assert not any(cluster.get(DEPLOYMENTS, f"{POLICY}-{role}") for role in ROLES)
        await until(stored, timeout_s=30, what="candles on the stream", kubelet=kubelet)

        await asyncio.to_thread(nats_server.stop)
        pod_name = f"{POLICY}-marketdata-0"
        outbox = kubelet.claim_path("outbox", pod_name) / f"marketdata-{pod_name}.db"
        await until(
            lambda: len(buffered_in(outbox)) >= 5,
            timeout_s=30,
            what="candles buffered in marketdata's outbox",
            kubelet=kubelet,
        )
        deleted = kubelet.pods[pod_name]
        await kubelet.delete_pod(pod_name)
        left = buffered_in(outbox)  # all the deleted pod could not publish
        await until(
            lambda: (
                (pod := kubelet.pods.get(pod_name)) is not None
                and pod is not deleted
                and pod.running
            ),
            timeout_s=30,
            what="the replacement pod running, NATS still down",
            kubelet=kubelet,
        )
        await asyncio.to_thread(nats_server.start)
        await until(
            lambda: _holds_all(stored(), left),
            timeout_s=60,
            what=f"the {len(left)} candles the deleted pod buffered on the stream",
            kubelet=kubelet,
        )
        print(f"\n{len(left)} candles buffered by the deleted pod, all delivered by its successor")


async def _holds_all(stored: Awaitable[set[bytes]], wanted: list[bytes]) -> bool:
    return set(wanted) <= await stored


def buffered_in(outbox: Path) -> list[bytes]:
    """The payloads waiting in an outbox file (read-only: its worker may still write)."""
    if not outbox.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{outbox}?mode=ro", uri=True)) as db:
        return [bytes(row[0]) for row in db.execute("SELECT payload FROM outbox ORDER BY seq")]
