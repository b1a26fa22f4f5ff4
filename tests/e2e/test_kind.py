"""The whole platform on a kind cluster: images, chart, a TradingPolicy, the kill switch.

Create (or reuse) a cluster, build both images and load them, install NATS with JetStream from
the official chart (as the README does, with examples/nats-values.yaml), install the chart into
a namespace that enforces the Restricted pod security standard, apply a TradingPolicy, wait for
its four workloads; trip the EmergencyStop with kubectl patch (execution and inference scaled to
0) and reset it after the cooldown (replicas restored).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from .tools import run

# Building images and a kind cluster takes minutes: beyond the suite's per-test limit.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "qtrader-e2e"
TAG = "e2e"
OPERATOR_IMAGE = f"quantum-trader-operator:{TAG}"
WORKLOADS_IMAGE = f"quantum-trader-workloads:{TAG}"
POLICY = "paper-demo"
COOLDOWN_S = 20

# NATS the way the README installs it: the official chart with examples/nats-values.yaml, in
# its own namespace (the chart's pods are not written for the Restricted standard that the
# platform's namespace enforces). --repo instead of `helm repo add` leaves the user's helm
# repositories alone. Needs network (GitHub Actions has it).
NATS_NAMESPACE = "qtrader-e2e-nats"
NATS_REPO = "https://nats-io.github.io/k8s/helm/charts/"
NATS_CHART_VERSION = "2.14.2"


def kubectl(*args: str, stdin: str | None = None, timeout: float = 120) -> str:
    return run("kubectl", "-n", NAMESPACE, *args, stdin=stdin, timeout=timeout)


def wait_for(what: str, check: object, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        last = check()  # type: ignore[operator]
        if last is True:
            return
        time.sleep(2)
    raise AssertionError(f"timed out waiting for {what}; last: {last}")


def replicas(role: str) -> tuple[int, int]:
    body = json.loads(kubectl("get", "deployment", f"{POLICY}-{role}", "-o", "json"))
    return int(body["spec"].get("replicas", 0)), int(body["status"].get("readyReplicas") or 0)


def all_ready() -> bool | str:
    try:
        states = {
            role: replicas(role) for role in ("marketdata", "inference", "execution", "portfolio")
        }
    except AssertionError as exc:
        return str(exc)[:200]
    return all(want > 0 and ready == want for want, ready in states.values()) or str(states)


def stop_state() -> dict[str, object]:
    body: dict[str, object] = json.loads(kubectl("get", "emergencystop", "main", "-o", "json"))
    return body


def install_nats() -> None:
    """One NATS server with JetStream from the official chart, ready before the platform."""
    run(
        "helm",
        "upgrade",
        "--install",
        "nats",
        "nats",
        "--repo",
        NATS_REPO,
        "--version",
        NATS_CHART_VERSION,
        "--namespace",
        NATS_NAMESPACE,
        "--create-namespace",
        "--values",
        str(ROOT / "examples" / "nats-values.yaml"),
        # kind's local-path volumes ignore the size; keep the claim small anyway.
        "--set",
        "config.jetstream.fileStore.pvc.size=1Gi",
        "--wait",
        "--timeout",
        "5m",
        timeout=400,
    )


@pytest.fixture(scope="module")
def installed(kind_cluster: str) -> Iterator[None]:
    for image, dockerfile in (
        (OPERATOR_IMAGE, "docker/operator.Dockerfile"),
        (WORKLOADS_IMAGE, "docker/workloads.Dockerfile"),
    ):
        run("docker", "build", "-f", str(ROOT / dockerfile), "-t", image, str(ROOT), timeout=1800)
        run("kind", "load", "docker-image", image, "--name", kind_cluster)
    run("kubectl", "create", "namespace", NAMESPACE)
    run(
        "kubectl",
        "label",
        "namespace",
        NAMESPACE,
        "pod-security.kubernetes.io/enforce=restricted",
    )
    try:
        install_nats()
        values = {
            "operator": {"image": {"repository": "quantum-trader-operator", "tag": TAG}},
            "workloads": {
                "image": {"repository": "quantum-trader-workloads", "tag": TAG},
                "services": {"policies": [POLICY]},
            },
            "externalNats": {"url": f"nats://nats.{NATS_NAMESPACE}:4222"},
            "emergencyStop": {"spec": {"cooldownSeconds": COOLDOWN_S, "requireManualReset": True}},
        }
        run(
            "helm",
            "install",
            "qt",
            str(ROOT / "charts" / "quantum-trader"),
            "--namespace",
            NAMESPACE,
            "--values",
            "-",
            "--wait",
            "--timeout",
            "5m",
            stdin=yaml.safe_dump(values),
            timeout=400,
        )
        yield
    finally:
        run(
            "kubectl",
            "delete",
            "namespace",
            NAMESPACE,
            NATS_NAMESPACE,
            "--ignore-not-found",
            "--wait=false",
        )


def test_policy_runs_and_the_kill_switch_halts_and_restores(installed: None) -> None:
    kubectl("apply", "-f", str(ROOT / "examples" / "policy.yaml"))
    wait_for("the four workloads ready", all_ready)
    # The chart's Service for execution reaches its health port.
    endpoints = json.loads(kubectl("get", "endpoints", f"{POLICY}-execution", "-o", "json"))
    assert endpoints.get("subsets"), "the execution Service selects no ready pod"

    trip = '{"spec":{"tripped":true,"reason":"e2e drill"}}'
    kubectl("patch", "emergencystop", "main", "--type", "merge", "-p", trip)
    wait_for(
        "execution and inference scaled to 0",
        lambda: (replicas("execution")[0], replicas("inference")[0]) == (0, 0) or "running",
    )
    assert replicas("marketdata")[0] > 0
    status = stop_state()["status"]
    assert isinstance(status, dict)
    assert status.get("state") != "Armed"

    time.sleep(COOLDOWN_S + 2)
    kubectl("patch", "emergencystop", "main", "--type", "merge", "-p", '{"spec":{"tripped":false}}')
    wait_for("execution and inference restored", all_ready)
    wait_for(
        "the stop armed again",
        lambda: (stop_state().get("status") or {}).get("state") == "Armed" or "not armed",
    )
