"""The chart under the real ``helm`` CLI, versions 3 and 4: what users and CI actually run.

helm-python-sdk (test_chart.py) renders more kindly than the CLI: it let a declared but
unvendored dependency through, which made ``helm lint``, ``helm template`` and ``helm install``
fail for everyone. These tests run the binaries (see ``support.helm_cli``) with no cluster and
assert only on what helm printed: its exit code, its messages and the manifests it rendered.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml

from qtrader.contracts.policy import parse_policy
from qtrader_operator import policy_core
from qtrader_operator.handlers import STOPS
from qtrader_operator.main import config_from_environment, refuse_early_reset
from support.helm_cli import HelmCli

ROOT = Path(__file__).resolve().parents[2]
CHART = str(ROOT / "charts" / "quantum-trader")
RELEASE, NAMESPACE = "qt", "trading"
KUBE_VERSION = "1.33.0"
MONITORING_API = "monitoring.coreos.com/v1"

# Value sets a user would install with, covering what values.yaml and its schema offer.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "paper-policy": {"tradingPolicy": {"create": True}},
    "testnet-policy": {
        "tradingPolicy": {
            "create": True,
            "name": "testnet",
            "spec": {"mode": "testnet", "symbols": ["BTCUSDT", "ETHUSDT"]},
        },
        "binance": {"existingSecret": "binance-testnet-keys"},
        "redis": {"url": "redis://redis.cache:6379/0"},
    },
    "stop-reducing": {
        "emergencyStop": {
            "name": "desk-stop",
            "spec": {"mode": "Reducing", "flattenOnTrip": True, "cooldownSeconds": 60},
        },
    },
    "stop-not-created": {"emergencyStop": {"create": False}},
    "nats-from-secret": {
        "externalNats": {
            "url": "nats://nats.messaging:4222",
            "existingSecret": "nats-url",
            "port": 4223,
        },
    },
    "operator-settings": {
        "operator": {
            "image": {"repository": "registry.example/qt-operator", "tag": "0.1.0"},
            "logLevel": "DEBUG",
            "extraEnv": [{"name": "QTRADER_EXTRA", "value": "1"}],
        },
        "essOperators": {"subjects": [{"kind": "Group", "name": "trading-oncall"}]},
        "rbac": {"watchCrds": True},
        "workloads": {"services": {"policies": ["alpha", "beta"]}},
    },
    "monitoring-on": {"monitoring": {"enabled": True, "labels": {"release": "kps"}}},
    "webhook-self-signed": {"webhook": {"enabled": True}},
    "webhook-cert-manager": {
        "webhook": {
            "enabled": True,
            "certManager": {"issuerRef": {"name": "cluster-ca", "kind": "ClusterIssuer"}},
        }
    },
    "lean": {
        "networkPolicy": {"enabled": False},
        "workloads": {"podDisruptionBudget": {"enabled": False}, "services": {"enabled": False}},
        "serviceAccount": {"create": False, "name": "existing"},
        "dashboards": {"enabled": False},
    },
}

# Values the schema must refuse, with the property helm must name in its message.
REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    # A trip or reason in values would let an upgrade or a GitOps resync reset a tripped stop.
    "stop-tripped": ({"emergencyStop": {"spec": {"tripped": True}}}, "tripped"),
    "stop-reason": ({"emergencyStop": {"spec": {"reason": "drill"}}}, "reason"),
    # Peering needs at least one replica; more than one lead one at a time.
    "operator-replicas": ({"operator": {"replicas": 0}}, "replicas"),
    # The removed nats subchart's switch: refused, not silently ignored.
    "nats-subchart": ({"nats": {"enabled": True}}, "nats"),
    "nats-url-scheme": ({"externalNats": {"url": "http://nats:4222"}}, "url"),
    "income-interval-negative": (
        {"binance": {"incomeIntervalSeconds": -1}},
        "incomeIntervalSeconds",
    ),
    "wallet-grace-text": ({"binance": {"walletGraceSeconds": "1m"}}, "walletGraceSeconds"),
}


def template_args(name: str) -> list[str]:
    """``helm template`` arguments for a value set (the monitoring objects need their API)."""
    args = ["template", RELEASE, CHART, "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
    if name == "monitoring-on":
        args += ["--api-versions", MONITORING_API]
    return args


def parse_manifests(text: str) -> list[dict[str, Any]]:
    docs = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    assert all(isinstance(doc, dict) for doc in docs), "a rendered document is not a mapping"
    return docs


def emergency_stops(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == "EmergencyStop"]


def assert_stop_carries_no_trip(docs: list[dict[str, Any]]) -> None:
    """Issue 13: a rendered stop never holds tripped/reason, so re-applying it resets nothing."""
    for stop in emergency_stops(docs):
        assert "tripped" not in stop["spec"], stop
        assert "reason" not in stop["spec"], stop
        assert stop["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def failure(done: Any) -> str:
    return f"exit {done.returncode}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"


# --- lint --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_lint_strict_is_clean(helm_cli: HelmCli, name: str) -> None:
    done = helm_cli.run(
        "lint", "--strict", "--kube-version", KUBE_VERSION, CHART, values=VALUE_SETS[name]
    )
    assert done.returncode == 0, failure(done)
    assert "1 chart(s) linted, 0 chart(s) failed" in done.stdout
    # --strict turns warnings into failures; say which, if any ever appear.
    findings = [line for line in done.stdout.splitlines() if line.startswith(("[WARNING]", "[E"))]
    assert findings == []


# --- template ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_template_renders_named_kubernetes_documents(helm_cli: HelmCli, name: str) -> None:
    done = helm_cli.run(*template_args(name), values=VALUE_SETS[name])
    assert done.returncode == 0, failure(done)
    docs = parse_manifests(done.stdout)
    assert docs
    for doc in docs:
        for field in (doc.get("apiVersion"), doc.get("kind"), doc.get("metadata", {}).get("name")):
            assert isinstance(field, str), doc
            assert field, doc
    names = [(doc["kind"], doc["metadata"]["name"]) for doc in docs]
    assert len(names) == len(set(names)), f"duplicate objects: {sorted(names)}"
    kinds = {doc["kind"] for doc in docs}
    assert "Deployment" in kinds
    assert_stop_carries_no_trip(docs)


def test_template_renders_the_stop_armed_without_trip_fields(helm_cli: HelmCli) -> None:
    done = helm_cli.run(*template_args("defaults"))
    assert done.returncode == 0, failure(done)
    (stop,) = emergency_stops(parse_manifests(done.stdout))
    assert stop["metadata"]["namespace"] == NAMESPACE
    assert set(stop["spec"]) >= {"mode", "cooldownSeconds", "requireManualReset"}
    assert_stop_carries_no_trip([stop])


def test_template_renders_no_stop_when_not_created(helm_cli: HelmCli) -> None:
    done = helm_cli.run(*template_args("stop-not-created"), values=VALUE_SETS["stop-not-created"])
    assert done.returncode == 0, failure(done)
    assert emergency_stops(parse_manifests(done.stdout)) == []


def test_template_renders_monitoring_only_with_its_api(helm_cli: HelmCli) -> None:
    values = VALUE_SETS["monitoring-on"]
    without = helm_cli.run(*template_args("defaults"), values=values)
    with_api = helm_cli.run(*template_args("monitoring-on"), values=values)
    assert without.returncode == 0, failure(without)
    assert with_api.returncode == 0, failure(with_api)
    monitoring = {"PodMonitor", "ServiceMonitor", "PrometheusRule"}
    assert not {doc["kind"] for doc in parse_manifests(without.stdout)} & monitoring
    assert {doc["kind"] for doc in parse_manifests(with_api.stdout)} & monitoring


# --- install --dry-run=client ------------------------------------------------------------------


def dry_run_install(helm_cli: HelmCli, values: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """The manifests and NOTES of ``helm install --dry-run=client``."""
    done = helm_cli.run(
        "install", RELEASE, CHART, "--namespace", NAMESPACE, "--dry-run=client", values=values
    )
    assert done.returncode == 0, failure(done)
    assert "STATUS: pending-install" in done.stdout
    manifest, notes_marker, notes = done.stdout.partition("\nNOTES:\n")
    assert notes_marker, "helm printed no NOTES"
    return parse_manifests(manifest.partition("\nMANIFEST:\n")[2]), notes


@pytest.mark.parametrize("helm_cli", [4], indirect=True, ids=["helm4"])
@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_install_dry_run_client_succeeds(helm_cli: HelmCli, name: str) -> None:
    docs, notes = dry_run_install(helm_cli, VALUE_SETS[name])
    assert any(doc["kind"] == "Deployment" for doc in docs)
    assert_stop_carries_no_trip(docs)
    assert "THE KILL SWITCH" in notes


@pytest.mark.parametrize("helm_cli", [3], indirect=True, ids=["helm3"])
def test_helm3_install_dry_run_client_still_needs_a_cluster(helm_cli: HelmCli) -> None:
    """Helm 3's ``install --dry-run=client`` asks the API server first, chart or not.

    It checks the cluster is reachable, reads its capabilities and looks for existing objects
    before it renders, so without a cluster it stops before the chart matters; helm 4 covers the
    client-side install, helm 3 covers lint and template. If this starts to pass, add helm 3 to
    test_install_dry_run_client_succeeds.
    """
    done = helm_cli.run(
        "install", RELEASE, CHART, "--namespace", NAMESPACE, "--dry-run=client", "--debug"
    )
    assert done.returncode != 0
    assert "Kubernetes cluster unreachable" in done.stderr, failure(done)
    assert "IsReachable" in done.stderr, failure(done)


# --- schema refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_schema_refusal_fails_template_and_lint(helm_cli: HelmCli, case: str) -> None:
    values, prop = REFUSED[case]
    for args in (
        template_args(case),
        ["lint", "--strict", "--kube-version", KUBE_VERSION, CHART],
    ):
        done = helm_cli.run(*args, values=values)
        assert done.returncode != 0, failure(done)
        output = done.stdout + done.stderr
        assert "don't meet the specifications of the schema" in output, failure(done)
        assert prop in output.split("schema", 1)[1], failure(done)


@pytest.mark.parametrize("helm_cli", [4], indirect=True, ids=["helm4"])
def test_schema_refuses_a_tripped_stop_at_install(helm_cli: HelmCli) -> None:
    values, _ = REFUSED["stop-tripped"]
    done = helm_cli.run(
        "install", RELEASE, CHART, "--namespace", NAMESPACE, "--dry-run=client", values=values
    )
    assert done.returncode != 0
    assert "emergencyStop/spec" in done.stderr, failure(done)
    assert "tripped" in done.stderr, failure(done)


# --- the validating webhook ----------------------------------------------------------------------


def _of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def test_the_webhook_reaches_the_operators_handler_with_a_certificate_its_ca_signs(
    helm_cli: HelmCli, tmp_path: Path
) -> None:
    done = helm_cli.run(
        *template_args("webhook-self-signed"), values=VALUE_SETS["webhook-self-signed"]
    )
    assert done.returncode == 0, failure(done)
    docs = parse_manifests(done.stdout)
    (config,) = _of_kind(docs, "ValidatingWebhookConfiguration")
    (webhook,) = config["webhooks"]
    assert webhook["failurePolicy"] == "Ignore"  # an operator outage never blocks a trip
    service_ref = webhook["clientConfig"]["service"]
    # kopf serves each admission handler at its id: the path must name ours.
    # Registered as the operator does when its webhook port is set (main._register_admission).
    registry = kopf.OperatorRegistry()
    kopf.on.validate(*STOPS, operations=["UPDATE"], registry=registry)(refuse_early_reset)
    handler_ids = {h.id for h in registry._webhooks.get_all_handlers()}
    assert service_ref["path"].lstrip("/") in handler_ids
    (service,) = [
        d for d in _of_kind(docs, "Service") if d["metadata"]["name"] == service_ref["name"]
    ]
    (operator,) = [
        d for d in _of_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-operator")
    ]
    (container,) = operator["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (service_port,) = service["spec"]["ports"]
    assert service_port["port"] == service_ref["port"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert int(env["QTRADER_WEBHOOK_PORT"]) == ports[service_port["targetPort"]]
    # The serving certificate: signed by the CA the API server is given, for the Service's name.
    (secret,) = [
        d for d in _of_kind(docs, "Secret") if d["metadata"]["name"].endswith("-webhook-tls")
    ]
    files = {}
    for key in ("tls.crt", "tls.key", "ca.crt"):
        files[key] = tmp_path / key
        files[key].write_bytes(base64.b64decode(secret["data"][key]))
    assert base64.b64decode(webhook["clientConfig"]["caBundle"]) == files["ca.crt"].read_bytes()
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", str(files["ca.crt"]), str(files["tls.crt"])],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    text = subprocess.run(
        ["openssl", "x509", "-in", str(files["tls.crt"]), "-noout", "-ext", "subjectAltName"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"DNS:{service_ref['name']}.{NAMESPACE}.svc" in text
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(Path(env["QTRADER_WEBHOOK_CERT"]).parent) in mounts


def test_the_webhook_with_cert_manager_asks_it_for_the_certificate(helm_cli: HelmCli) -> None:
    values = VALUE_SETS["webhook-cert-manager"]
    done = helm_cli.run(*template_args("webhook-cert-manager"), values=values)
    assert done.returncode == 0, failure(done)
    docs = parse_manifests(done.stdout)
    (certificate,) = _of_kind(docs, "Certificate")
    (config,) = _of_kind(docs, "ValidatingWebhookConfiguration")
    assert certificate["spec"]["issuerRef"] == {"name": "cluster-ca", "kind": "ClusterIssuer"}
    injected = config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
    assert injected == f"{NAMESPACE}/{certificate['metadata']['name']}"
    assert not [d for d in _of_kind(docs, "Secret") if d["metadata"]["name"].endswith("-tls")]


# --- the venue's income interval and the wallet's grace, from values to the workers -------------


def _worker_env(docs: list[dict[str, Any]], role: str) -> dict[str, str]:
    """A worker container's env as the operator would make it from what helm rendered: the
    operator reads its own Deployment's env, and builds the rendered policy's workloads."""
    operator = next(d for d in docs if d["kind"] == "Deployment")
    (container,) = operator["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    config = config_from_environment({**env, "QTRADER_NAMESPACE": NAMESPACE})
    (policy,) = [parse_policy(d) for d in docs if d["kind"] == "TradingPolicy"]
    settings = policy_core.WorkloadSettings(
        image=config.workload_image,
        nats_url=config.nats_url,
        income_interval_s=config.income_interval_s,
        wallet_grace_s=config.wallet_grace_s,
    )
    owner = policy_core.Owner(name=policy.metadata.name, namespace=NAMESPACE, uid="u")
    made = policy_core.desired_workloads(owner=owner, spec=policy.spec, settings=settings)
    workload = next(d for d in made if d["metadata"]["name"].endswith(f"-{role}"))
    (worker,) = workload["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in worker["env"] if "value" in e}


def _read_by_worker(role: str, option: str, env: dict[str, str]) -> str:
    """What the worker's own command line makes of that env (a process of its own: the env is
    the container's, not this test's)."""
    code = "from qtrader.cli import build_parser; print(build_parser().parse_args("
    code += f"[{role!r}]).{option})"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={"PATH": os.environ["PATH"], "PYTHONPATH": os.environ.get("PYTHONPATH", ""), **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout.strip()


@pytest.mark.parametrize(("seconds", "read"), [(None, "None"), (120, "120.0"), (0, "0.0")])
def test_income_interval_reaches_the_execution_worker_through_the_operator(
    helm_cli: HelmCli, seconds: float | None, read: str
) -> None:
    values = VALUE_SETS["testnet-policy"]
    binance = {**values["binance"], "incomeIntervalSeconds": seconds}
    done = helm_cli.run(*template_args("testnet-policy"), values={**values, "binance": binance})
    assert done.returncode == 0, failure(done)
    env = _worker_env(parse_manifests(done.stdout), "execution")
    assert ("QTRADER_INCOME_INTERVAL" in env) is (seconds is not None)
    assert _read_by_worker("execution", "income_interval", env) == read


@pytest.mark.parametrize(("seconds", "read"), [(None, "60.0"), (300, "300.0"), (0, "0.0")])
def test_wallet_grace_reaches_the_portfolio_worker_through_the_operator(
    helm_cli: HelmCli, seconds: float | None, read: str
) -> None:
    values = VALUE_SETS["testnet-policy"]
    binance = {**values["binance"], "walletGraceSeconds": seconds}
    done = helm_cli.run(*template_args("testnet-policy"), values={**values, "binance": binance})
    assert done.returncode == 0, failure(done)
    env = _worker_env(parse_manifests(done.stdout), "portfolio")
    assert ("QTRADER_WALLET_GRACE" in env) is (seconds is not None)
    assert _read_by_worker("portfolio", "wallet_grace", env) == read
