"""The Helm chart, rendered by Helm's own Go SDK (helm-python-sdk), no cluster and no helm binary.

Every value set is rendered, every manifest is validated against the Kubernetes schema
(kubernetes-validate, strict: unknown fields fail), the custom resources against the project's
own models, and the security properties (Restricted pod security, read-only root filesystem,
exact RBAC verbs, labels, probes) are checked on what Helm actually produced. The workloads'
Deployments come from the operator, not the chart: their pod labels are built with the
operator's own code and must be selected by the chart's Services, PDBs and NetworkPolicies.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (dev extra)")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed (dev extra)"
)

from qtrader.contracts.policy import parse_policy  # noqa: E402
from qtrader.control.ess_resource import parse_emergency_stop  # noqa: E402
from qtrader_operator import main as operator_main  # noqa: E402
from qtrader_operator import policy_core  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "quantum-trader"
KUBE_VERSION = "1.33"
RELEASE, NAMESPACE = "qt", "trading"
ROLES = ("marketdata", "inference", "execution", "portfolio")
CUSTOM_KINDS = {"TradingPolicy", "EmergencyStop", "KopfPeering"}  # not in the Kubernetes schema
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "default-policy": {"tradingPolicy": {"create": True}},
    "external-nats-secret": {
        "externalNats": {"url": "nats://nats.messaging:4222", "existingSecret": "nats-url"},
    },
    "external-nats-url": {"externalNats": {"url": "nats://nats.messaging:4222"}},
    "live-trading": {
        "redis": {"url": "redis://redis.cache:6379/0"},
        "binance": {"existingSecret": "binance-keys"},
        "tradingPolicy": {"create": True, "name": "live", "spec": {"mode": "testnet"}},
    },
    "several-policies": {
        "workloads": {"services": {"policies": ["alpha", "beta"]}},
        "essOperators": {"subjects": [{"kind": "Group", "name": "oncall"}]},
        "rbac": {"watchCrds": True},
    },
    "monitoring-on": {"monitoring": {"enabled": True, "labels": {"release": "kps"}}},
    "outbox-storage": {
        "workloads": {"outboxStorage": {"enabled": True, "size": "2Gi", "storageClassName": "ssd"}}
    },
    "lean": {
        "networkPolicy": {"enabled": False},
        "workloads": {"podDisruptionBudget": {"enabled": False}},
        "serviceAccount": {"create": False, "name": "existing"},
        "emergencyStop": {"create": False},
    },
}


def render(values: dict[str, Any] | None = None) -> dict[str, str]:
    chart = helm.Chart.load(str(CHART))
    rendered: dict[str, str] = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)
    return rendered


def documents(rendered: dict[str, str]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered_set(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    name: str = request.param
    return name, documents(render(VALUE_SETS[name]))


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def operator_deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = [
        d for d in of_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-operator")
    ]
    return deployment


# --- rendering, lint, schema ---------------------------------------------------------------


def test_every_manifest_is_valid_kubernetes(rendered_set: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered_set
    assert docs
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS | MONITORING_KINDS:
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_custom_resources_are_valid_for_the_operator(
    rendered_set: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = rendered_set
    for doc in of_kind(docs, "TradingPolicy"):
        policy = parse_policy(doc)
        assert policy.spec.emergency_stop_ref == "main"
    for doc in of_kind(docs, "EmergencyStop"):
        assert parse_emergency_stop(doc).metadata.name == "main"
        assert doc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_lint_reports_no_error_and_no_warning() -> None:
    report = helm.lint(str(CHART), kube_version="v1.33.0")
    assert report["errors"] == []
    findings = [m for m in report["messages"] if m["severity"] >= 2]
    assert findings == []


def test_chart_crds_are_byte_identical_to_the_projects() -> None:
    source = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    in_chart = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert in_chart == source
    for name in source:
        assert (CHART / "crds" / name).read_bytes() == (ROOT / "crds" / name).read_bytes(), name


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"operator": {"replicas": 0}}, "/operator/replicas"),
        ({"operator": {"peering": {"lifetimeSeconds": 10}}}, "/operator/peering"),
        ({"externalNats": {"url": "http://nats:4222"}}, "/externalNats/url"),
        ({"redis": {"url": "nats://x"}}, "/redis/url"),
        ({"workloads": {"healthPort": 9000}}, "/workloads/healthPort': value must be 8080"),
        (
            {"emergencyStop": {"spec": {"mode": "Stop"}}},
            "value must be one of 'Halted', 'Reducing'",
        ),
        ({"emergencyStop": {"name": "Main_Stop"}}, "/emergencyStop/name"),
        ({"tradingPolicy": {"spec": {"mode": "yolo"}}}, "/tradingPolicy/spec/mode"),
        ({"monitoring": {"enabled": "yes"}}, "/monitoring/enabled': got string, want boolean"),
        ({"monitoring": {"interval": "soon"}}, "/monitoring/interval"),
        ({"operator": {"image": {"pullPolicy": "Sometimes"}}}, "/operator/image/pullPolicy"),
        ({"essOperators": {"subjects": [{"kind": "Robot", "name": "r"}]}}, "/essOperators"),
        ({"networkPolicy": {"apiServerPorts": [70000]}}, "/networkPolicy/apiServerPorts/0"),
        ({"unknownKey": 1}, "additional properties 'unknownKey' not allowed"),
    ],
)
def test_invalid_values_are_rejected_with_the_path(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        render(values)
    assert message in str(caught.value)


# --- the kill switch belongs to its operators, not to the chart ----------------------------


def test_the_stop_is_rendered_without_the_fields_that_trip_and_reset_it(
    rendered_set: tuple[str, list[dict[str, Any]]],
) -> None:
    """An upgrade or a resync that re-applies the chart must never carry ``tripped: false``
    (the operator would take it for a reset) nor overwrite the reason of a trip."""
    _, docs = rendered_set
    for doc in of_kind(docs, "EmergencyStop"):
        assert {"tripped", "reason"}.isdisjoint(doc["spec"]), doc["spec"]
        sync_options = doc["metadata"]["annotations"]["argocd.argoproj.io/sync-options"]
        assert {"Prune=false", "Delete=false", "Replace=false"} <= set(sync_options.split(","))


@pytest.mark.parametrize("field", ["tripped", "reason"])
def test_values_cannot_set_the_stops_trip_state(field: str) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        render({"emergencyStop": {"spec": {field: False if field == "tripped" else "x"}}})
    assert f"additional properties '{field}' not allowed" in str(caught.value)


def test_the_stops_other_settings_come_from_values() -> None:
    values = {"emergencyStop": {"spec": {"mode": "Reducing", "cooldownSeconds": 60}}}
    (stop,) = of_kind(documents(render(values)), "EmergencyStop")
    assert stop["spec"]["mode"] == "Reducing"
    assert stop["spec"]["cooldownSeconds"] == 60
    assert parse_emergency_stop(stop).spec.tripped is False  # the CRD's default at creation


# --- the operator --------------------------------------------------------------------------


def test_operator_runs_two_peering_replicas_rolled_one_at_a_time_on_different_nodes() -> None:
    docs = documents(render())
    deployment = operator_deployment(docs)
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    env = env_of(deployment)
    assert env["QTRADER_PEERING_NAME"] == "qtrader"
    assert env["QTRADER_PEERING_LIFETIME"] == "3"
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    (peering,) = of_kind(docs, "KopfPeering")
    assert (peering["apiVersion"], peering["metadata"]["name"]) == ("kopf.dev/v1", "qtrader")
    (term,) = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == selector
    (budget,) = [p for p in of_kind(docs, "PodDisruptionBudget") if p["spec"].get("minAvailable")]
    assert budget["spec"] == {"minAvailable": 1, "selector": {"matchLabels": selector}}


def test_a_single_operator_replica_has_no_disruption_budget_and_its_affinity_is_the_users() -> None:
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "pool", "operator": "In", "values": ["control"]}]}]}}}  # fmt: skip
    docs = documents(render({"operator": {"replicas": 1, "affinity": affinity}}))
    assert operator_deployment(docs)["spec"]["template"]["spec"]["affinity"] == affinity
    operator_budgets = [p for p in of_kind(docs, "PodDisruptionBudget") if "operator" in
                        p["metadata"]["name"]]  # fmt: skip
    assert operator_budgets == []


def env_of(deployment: dict[str, Any]) -> dict[str, Any]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_operator_gets_what_its_configuration_requires() -> None:
    env = env_of(operator_deployment(documents(render())))
    assert env["QTRADER_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["QTRADER_NATS_URL"] == "nats://nats:4222"
    assert env["QTRADER_WORKLOAD_IMAGE"] == "quantum-trader-workloads:0.1.0"
    assert env["QTRADER_LIVENESS_URL"] == "http://0.0.0.0:8081/healthz"
    assert "QTRADER_REDIS_URL" not in env


def test_nats_url_from_a_secret_or_the_external_url() -> None:
    env = env_of(operator_deployment(documents(render(VALUE_SETS["external-nats-secret"]))))
    assert env["QTRADER_NATS_URL"] == {"secretKeyRef": {"name": "nats-url", "key": "url"}}
    env = env_of(operator_deployment(documents(render(VALUE_SETS["external-nats-url"]))))
    assert env["QTRADER_NATS_URL"] == "nats://nats.messaging:4222"


def test_redis_and_binance_secret_reach_the_operator() -> None:
    env = env_of(operator_deployment(documents(render(VALUE_SETS["live-trading"]))))
    assert env["QTRADER_REDIS_URL"] == "redis://redis.cache:6379/0"
    assert env["QTRADER_BINANCE_SECRET_NAME"] == "binance-keys"


# --- security ------------------------------------------------------------------------------


def test_every_pod_is_restricted_with_a_read_only_root(
    rendered_set: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = rendered_set
    specs = list(pod_specs(docs))
    assert specs
    for name, spec in specs:
        assert_restricted(name, spec)


def assert_restricted(name: str, spec: dict[str, Any]) -> None:
    pod = spec.get("securityContext", {})
    assert pod.get("runAsNonRoot") is True, name
    assert pod.get("runAsUser", 1) != 0, name
    assert pod["seccompProfile"]["type"] in {"RuntimeDefault", "Localhost"}, name
    assert not spec.get("hostNetwork")
    assert not spec.get("hostPID")
    assert not spec.get("hostIPC")
    allowed_volumes = {"emptyDir", "secret", "configMap", "projected", "persistentVolumeClaim"}
    for volume in spec.get("volumes", []):
        assert set(volume) - {"name"} <= allowed_volumes, (name, volume)
    for container in spec["containers"] + spec.get("initContainers", []):
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, name
        assert context["readOnlyRootFilesystem"] is True, name
        assert context["capabilities"]["drop"] == ["ALL"], name
        assert not context["capabilities"].get("add"), name
        assert not context.get("privileged"), name
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        assert "/tmp" in mounts, f"{name}: a read-only root needs a writable /tmp"


def test_the_operators_workload_pods_are_restricted_too() -> None:
    for deployment in operator_made_deployments("paper"):
        assert_restricted(deployment["metadata"]["name"], deployment["spec"]["template"]["spec"])


def test_no_role_has_a_wildcard(rendered_set: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered_set
    for role in of_kind(docs, "Role") + of_kind(docs, "ClusterRole"):
        for rule in role["rules"]:
            for field in ("verbs", "resources", "apiGroups"):
                assert "*" not in rule.get(field, []), (role["metadata"]["name"], rule)
            assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(rule["verbs"])


def rules_of(docs: list[dict[str, Any]], name: str) -> dict[tuple[str, str], list[str]]:
    (role,) = [r for r in of_kind(docs, "Role") if r["metadata"]["name"] == name]
    return {
        (group, resource): sorted(rule["verbs"])
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }


def test_operator_role_has_exactly_the_verbs_it_uses() -> None:
    rules = rules_of(documents(render()), "qt-quantum-trader-operator")
    assert rules == {
        ("qtrader.dev", "tradingpolicies"): ["get", "list", "patch", "watch"],
        ("qtrader.dev", "emergencystops"): ["get", "list", "patch", "watch"],
        ("qtrader.dev", "tradingpolicies/status"): ["get", "patch"],
        ("qtrader.dev", "emergencystops/status"): ["get", "patch"],
        # blockOwnerDeletion on the Deployments' owner reference (OpenShift enforces it)
        ("qtrader.dev", "tradingpolicies/finalizers"): ["update"],
        ("", "events"): ["create"],
        ("events.k8s.io", "events"): ["create"],
        ("apps", "deployments"): ["create", "delete", "get", "patch"],
        ("apps", "statefulsets"): ["create", "delete", "get", "patch"],
        # peering: kopf watches the object and patches its entry; the operator reads it
        ("kopf.dev", "kopfpeerings"): ["get", "list", "patch", "watch"],
    }
    assert not any(resource == "secrets" for _, resource in rules)


def test_ess_operator_role_may_only_read_and_patch_emergency_stops() -> None:
    docs = documents(render(VALUE_SETS["several-policies"]))
    assert rules_of(docs, "qt-quantum-trader-ess-operator") == {
        ("qtrader.dev", "emergencystops"): ["get", "list", "patch", "watch"]
    }
    (binding,) = [
        b for b in of_kind(docs, "RoleBinding") if b["metadata"]["name"].endswith("-ess-operator")
    ]
    assert binding["subjects"] == [{"kind": "Group", "name": "oncall"}]
    # Without subjects the Role exists but nobody is bound to it.
    default_bindings = of_kind(documents(render()), "RoleBinding")
    assert not [b for b in default_bindings if b["metadata"]["name"].endswith("-ess-operator")]


def test_every_object_carries_the_recommended_labels(
    rendered_set: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = rendered_set
    for doc in docs:
        labels = doc["metadata"].get("labels", {})
        for key in ("name", "instance", "managed-by", "part-of", "version"):
            assert f"app.kubernetes.io/{key}" in labels, (doc["kind"], doc["metadata"]["name"], key)
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert "helm.sh/chart" in labels


def test_probes_are_bound_to_the_health_contract(
    rendered_set: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = rendered_set
    for name, spec in pod_specs(docs):
        for container in spec["containers"]:
            ports = {p["name"] for p in container["ports"]}
            for probe in ("livenessProbe", "readinessProbe"):
                get = container[probe]["httpGet"]
                assert get["path"] in {"/healthz", "/readyz"}, (name, probe)
                assert get["port"] in ports, (name, probe)
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_monitoring_objects_need_the_api_even_when_enabled() -> None:
    # helm-python-sdk renders without a cluster and cannot pass --api-versions: the
    # monitoring.coreos.com/v1 capability is absent, so nothing may render even when enabled.
    for values in ({}, VALUE_SETS["monitoring-on"]):
        kinds = {doc["kind"] for doc in documents(render(values))}
        assert not kinds & MONITORING_KINDS


def test_values_provide_the_monitoring_and_dashboard_keys() -> None:
    values = helm.Chart.load(str(CHART)).values
    assert values["monitoring"] == {"enabled": False, "interval": "30s", "labels": {}}
    assert values["dashboards"] == {
        "enabled": True,
        "labelKey": "grafana_dashboard",
        "labelValue": "1",
    }


# --- the workloads the operator creates ----------------------------------------------------


def operator_made_deployments(policy_name: str) -> list[dict[str, Any]]:
    policy = parse_policy(yaml.safe_load((ROOT / "examples" / "policy.yaml").read_text()))
    owner = policy_core.Owner(name=policy_name, namespace=NAMESPACE, uid="uid-1")
    settings = policy_core.WorkloadSettings(image="img:1", nats_url="nats://nats:4222")
    return policy_core.desired_workloads(owner=owner, spec=policy.spec, settings=settings)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_services_pdbs_and_network_policies_select_the_operators_pods() -> None:
    docs = documents(render(VALUE_SETS["several-policies"]))
    for policy in ("alpha", "beta"):
        for deployment in operator_made_deployments(policy):
            pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
            role = pod_labels["app.kubernetes.io/component"]
            name = f"{policy}-{role}"
            (service,) = [s for s in of_kind(docs, "Service") if s["metadata"]["name"] == name]
            assert selects(service["spec"]["selector"], pod_labels)
            assert service["spec"]["ports"][0]["port"] == policy_core.HEALTH_PORT
            container_ports = deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
            assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in container_ports}
            (pdb,) = [
                p for p in of_kind(docs, "PodDisruptionBudget") if p["metadata"]["name"] == name
            ]
            assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
            matching = [
                n["metadata"]["name"]
                for n in of_kind(docs, "NetworkPolicy")
                if selects(n["spec"]["podSelector"]["matchLabels"], pod_labels)
            ]
            assert sorted(matching) == sorted(
                [f"qt-quantum-trader-{role}", "qt-quantum-trader-default-deny"]
            )
    # Services of one policy must not select the other policy's pods.
    alpha = [s for s in of_kind(docs, "Service") if s["metadata"]["name"].startswith("alpha-")]
    beta_pods = [
        d["spec"]["template"]["metadata"]["labels"] for d in operator_made_deployments("beta")
    ]
    assert not any(selects(s["spec"]["selector"], pod) for s in alpha for pod in beta_pods)


def egress_ports(policy: dict[str, Any]) -> set[int]:
    return {port["port"] for rule in policy["spec"]["egress"] for port in rule.get("ports", [])}


def test_network_policies_open_only_the_egress_each_part_needs() -> None:
    docs = documents(render(VALUE_SETS["live-trading"]))
    by_name = {
        n["metadata"]["name"].removeprefix("qt-quantum-trader-"): n
        for n in of_kind(docs, "NetworkPolicy")
    }
    deny = by_name["default-deny"]["spec"]
    assert deny["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in deny
    assert "egress" not in deny
    assert egress_ports(by_name["operator"]) == {53, 4222, 443, 6443}
    assert egress_ports(by_name["execution"]) == {53, 4222, 6379, 443}
    assert egress_ports(by_name["marketdata"]) == {53, 4222, 443}
    assert egress_ports(by_name["inference"]) == {53, 4222}
    assert egress_ports(by_name["portfolio"]) == {53, 4222}
    # Without Redis, execution has no Redis egress.
    plain = {n["metadata"]["name"]: n for n in of_kind(documents(render()), "NetworkPolicy")}
    assert egress_ports(plain["qt-quantum-trader-execution"]) == {53, 4222, 443}


def test_notes_say_how_to_trip_and_reset_the_emergency_stop() -> None:
    notes = render()["quantum-trader/templates/NOTES.txt"]
    trip = (
        "kubectl -n trading patch emergencystop main --type merge -p "
        """'{"spec":{"tripped":true,"reason":"""
    )
    assert trip in notes
    reset = (
        "kubectl -n trading patch emergencystop main --type merge -p "
        """'{"spec":{"tripped":false}}'"""
    )
    assert reset in notes
    crd = yaml.safe_load((ROOT / "crds" / "emergencystops.qtrader.dev.yaml").read_text())
    spec_fields = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert {"tripped", "reason"} <= set(spec_fields["properties"])


def _operator_config_from(values: dict[str, Any]) -> Any:
    """The operator's configuration, read by its own code from the env the chart renders."""
    env = env_of(operator_deployment(documents(render(values))))
    plain = {name: value for name, value in env.items() if isinstance(value, str)}
    plain["QTRADER_NAMESPACE"] = NAMESPACE  # a fieldRef in the pod
    return operator_main.config_from_environment(plain)


def test_a_redis_url_in_a_secret_reaches_execution_only_as_a_secret_reference() -> None:
    values = {"redis": {"existingSecret": "redis-auth", "existingSecretKey": "dsn"}}
    env = env_of(operator_deployment(documents(render(values))))
    assert "QTRADER_REDIS_URL" not in env  # not even the operator holds it
    config = _operator_config_from(values)
    made = policy_core.desired_workloads(
        owner=policy_core.Owner(name="p", namespace=NAMESPACE, uid="u"),
        spec=parse_policy(yaml.safe_load((ROOT / "examples" / "policy.yaml").read_text())).spec,
        settings=policy_core.WorkloadSettings(
            image=config.workload_image, nats_url=config.nats_url, redis_secret=config.redis_secret
        ),
    )
    execution = next(d for d in made if d["metadata"]["name"].endswith("-execution"))
    (container,) = execution["spec"]["template"]["spec"]["containers"]
    assert {
        "name": "QTRADER_REDIS_URL",
        "valueFrom": {"secretKeyRef": {"name": "redis-auth", "key": "dsn"}},
    } in container["env"]


def test_the_allowed_workload_images_reach_the_operator() -> None:
    assert _operator_config_from({}).allowed_images == frozenset()
    values = {"workloads": {"allowedImages": ["reg.example/qt:1.2", "reg.example/qt:1.3"]}}
    allowed = _operator_config_from(values).allowed_images
    assert allowed == frozenset({"reg.example/qt:1.2", "reg.example/qt:1.3"})


def test_workload_pod_defaults_reach_every_pod_and_a_policys_resources_win() -> None:
    values = {
        "workloads": {
            "imagePullSecrets": [{"name": "registry-creds"}],
            "nodeSelector": {"pool": "trading"},
            "tolerations": [{"key": "trading", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {
                "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}
            },
        }
    }
    config = _operator_config_from(values)
    raw = yaml.safe_load((ROOT / "examples" / "policy.yaml").read_text())
    raw["spec"].setdefault("workloads", {})["execution"] = {
        "replicas": 1,
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}},
    }
    made = policy_core.desired_workloads(
        owner=policy_core.Owner(name="p", namespace=NAMESPACE, uid="u"),
        spec=parse_policy(raw).spec,
        settings=policy_core.WorkloadSettings(
            image=config.workload_image, nats_url=config.nats_url, pod_defaults=config.pod_defaults
        ),
    )
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["workloads"]["resources"]
    for deployment in made:
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert pod["imagePullSecrets"] == [{"name": "registry-creds"}]
        assert pod["nodeSelector"] == {"pool": "trading"}
        assert pod["tolerations"] == values["workloads"]["tolerations"]
        assert pod["affinity"] == values["workloads"]["affinity"]
        if deployment["metadata"]["name"].endswith("-execution"):
            # the policy's requests replace the default requests; the default limits stay
            assert container["resources"] == {
                "requests": {"cpu": "500m", "memory": "512Mi"},
                "limits": defaults["limits"],
            }
        else:
            assert container["resources"] == defaults


def test_outbox_storage_makes_every_workload_a_stateful_set_with_a_claim_per_replica() -> None:
    """The chart's value reaches the operator, which then makes StatefulSets: stable pod names
    (the outbox file is named by the host), a claim per replica kept at scale-down, the worker
    pointed at it; without the value, Deployments with the outbox on /tmp's emptyDir."""
    owner = policy_core.Owner(name="p", namespace=NAMESPACE, uid="u")
    spec = parse_policy(yaml.safe_load((ROOT / "examples" / "policy.yaml").read_text())).spec

    def made(values: dict[str, Any]) -> list[dict[str, Any]]:
        config = _operator_config_from(values)
        settings = policy_core.WorkloadSettings(
            image=config.workload_image, nats_url=config.nats_url, pod_defaults=config.pod_defaults
        )
        return policy_core.desired_workloads(owner=owner, spec=spec, settings=settings)

    assert {w["kind"] for w in made({})} == {"Deployment"}
    for workload in made(VALUE_SETS["outbox-storage"]):
        assert workload["kind"] == "StatefulSet"
        workload_spec = workload["spec"]
        assert workload_spec["serviceName"] == workload["metadata"]["name"]
        assert workload_spec["podManagementPolicy"] == "Parallel"
        assert workload_spec["persistentVolumeClaimRetentionPolicy"] == {
            "whenDeleted": "Retain",
            "whenScaled": "Retain",
        }
        (claim,) = workload_spec["volumeClaimTemplates"]
        assert claim["metadata"]["name"] == policy_core.OUTBOX_CLAIM
        assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
        assert claim["spec"]["storageClassName"] == "ssd"
        (container,) = workload_spec["template"]["spec"]["containers"]
        mount = {"name": policy_core.OUTBOX_CLAIM, "mountPath": policy_core.OUTBOX_DIR}
        assert mount in container["volumeMounts"]
        assert {"name": "QTRADER_OUTBOX_DIR", "value": policy_core.OUTBOX_DIR} in container["env"]
    with pytest.raises(Exception, match="outboxStorage"):
        render({"workloads": {"outboxStorage": {"enabled": True, "size": "a lot"}}})


def test_the_operator_may_read_only_the_secrets_execution_uses() -> None:
    values = {"binance": {"existingSecret": "binance-keys"}, "redis": {"existingSecret": "redis"}}
    rules = rules_of(documents(render(values)), "qt-quantum-trader-operator")
    assert rules[("", "secrets")] == ["get"]
    (role,) = [
        r
        for r in of_kind(documents(render(values)), "Role")
        if r["metadata"]["name"] == "qt-quantum-trader-operator"
    ]
    (rule,) = [r for r in role["rules"] if r["resources"] == ["secrets"]]
    assert sorted(rule["resourceNames"]) == ["binance-keys", "redis"]
    assert ("", "secrets") not in rules_of(documents(render()), "qt-quantum-trader-operator")
