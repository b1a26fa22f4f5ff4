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
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from qtrader.contracts import subjects
from qtrader.contracts.messages import Fill, HaltLatch, TradingState, decode
from qtrader.local.nats_server import EmbeddedNats
from support.emulator import (
    CONFIGMAPS,
    DEPLOYMENTS,
    NAMESPACE,
    PEERINGS,
    POLICIES,
    SECRETS,
    STOPS,
    Cluster,
    eventually,
)
from support.helm_cli import HELM_SOURCES, HelmCli, helm_binary
from support.invariants import settle_portfolio
from support.kubelet import Image, Kubelet, read_as_pod_user
from support.streams import kv_get_raw, read_all

pytestmark = pytest.mark.integration

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
IMAGES = {
    "quantum-trader-operator": Image(
        entrypoint=(sys.executable, "-m", "qtrader_operator.main"), env=PYTHON_ENV
    ),
    "quantum-trader-workloads": Image(
        entrypoint=(sys.executable, "-m", "qtrader"),
        cmd=("--help",),
        env={
            **PYTHON_ENV,
            "QTRADER_HEALTH_PORT": "8080",
            "QTRADER_OUTBOX_DIR": "/tmp/qtrader-outbox",
        },
    ),
}


def chart_values(nats_url: str) -> dict[str, Any]:
    policy: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "policy.yaml").read_text())
    spec = policy["spec"]
    spec["risk"]["minConfidence"] = 0.0  # every signal is traded: fills come quickly
    spec["workloads"] = {"execution": {"replicas": 2}, "inference": {"replicas": 1}}
    return {
        "externalNats": {"url": nats_url},
        "operator": {"replicas": 1},  # peering on, one replica: the machine has two cores
        "binance": {"existingSecret": KEYS_SECRET},
        "emergencyStop": {"spec": {"cooldownSeconds": 3, "requireManualReset": True}},
        "tradingPolicy": {"create": True, "name": POLICY, "spec": spec},
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

    data = {"api-key": "k" * 64, "api-secret": "s" * 64}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": KEYS_SECRET},
        "type": "Opaque",
        "data": {k: b64encode(v.encode()).decode() for k, v in data.items()},
    }


def deployment(cluster: Cluster, role: str) -> dict[str, Any]:
    return cluster.get(DEPLOYMENTS, f"{POLICY}-{role}") or {}


def ready(cluster: Cluster, role: str) -> bool:
    found = deployment(cluster, role)
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
        logs = "\n".join(kubelet.logs(f"{POLICY}-{role}") for role in ROLES)
        operator = kubelet.logs(f"{RELEASE}-quantum-trader-operator")
        raise AssertionError(
            f"{exc}\nproblems: {kubelet.problems}\n{operator[-4000:]}\n{logs[-8000:]}"
        ) from None


async def until_filled(url: str, more_than: int, kubelet: Kubelet, *, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while (count := len(await fills(url))) <= more_than:
        if time.monotonic() > deadline:
            await until(
                lambda: False, timeout_s=0, what=f"fills beyond {more_than}", kubelet=kubelet
            )
        await asyncio.sleep(0.5)
    return count


@contextlib.asynccontextmanager
async def running(cluster: Cluster, root: Path, nats_url: str) -> AsyncIterator[Kubelet]:
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
            await settle_portfolio(nats_url, stack=STACK)


async def test_the_chart_on_the_emulator_trades_halts_and_resumes_with_pods_as_processes(
    nats_server: EmbeddedNats, cluster: Cluster, tmp_path: Path
) -> None:
    url = nats_server.url
    documents = await asyncio.to_thread(render_chart, chart_values(url), tmp_path / "helm")
    await cluster.apply(SECRETS, binance_keys())
    skipped = await apply_chart(cluster, documents)
    assert set(skipped) == SKIPPED, sorted(skipped)
    started = time.monotonic()
    async with running(cluster, tmp_path / "kubelet", url) as kubelet:
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
        stopped = [p for p in kubelet.stopped if p.deployment.endswith(HALTED_ROLES)]
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
    assert key == "k" * 64, key  # the pod's uid reads the mounted key (fsGroup, mode 0440)


async def reset_after_cooldown(cluster: Cluster) -> None:
    """A reset inside the cooldown is refused: wait it out, then reset."""
    until_s = datetime.fromisoformat(stop_status(cluster)["cooldownUntil"]).timestamp()
    await asyncio.sleep(max(0.0, until_s - datetime.now(UTC).timestamp()) + 0.5)
    await cluster.patch(STOPS, "main", {"spec": {"tripped": False}})
