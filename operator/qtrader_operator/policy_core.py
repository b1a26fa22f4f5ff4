"""The TradingPolicy reconcile core: pure functions from the resource to what must run.

- ``validate`` turns the raw spec into a ``TradingPolicySpec`` or a reason it is Invalid (a
  schema the API server let through can still name a symbol the exchange does not list, limits
  that contradict each other, or a workload image the operator's allowlist does not hold: who
  may patch a policy must not choose what runs beside the Binance keys);
- ``desired_workloads`` is the full manifest of each workload's Deployment (a StatefulSet
  when the outbox has storage of its own), with owner references, ``app.kubernetes.io/*``
  labels, replicas and resources from the spec, and the replicas of execution and inference
  set to 0 while the EmergencyStop halts trading, and
  ``QTRADER_STACK`` naming the policy's stack (``subjects.stack_id``): the workloads of one
  policy speak only its NATS names, so two policies never read each other's messages. The
  market data source follows the mode (the live feed for live and testnet, synthetic prices
  only on paper), the mode is a pod template annotation (a change of mode rolls every pod), the
  pods run as the image's user with that group owning mounted Secret files (``fsGroup``), and a
  Redis URL with credentials comes from its Secret (``secretKeyRef``), never as plain text;
- ``policy_conditions`` are the status conditions, shaped like ``metav1.Condition``.

No I/O here: the kopf handlers read, call these, and apply the difference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from qtrader.contracts import subjects
from qtrader.contracts.policy import (
    API_GROUP,
    API_VERSION,
    POLICY_KIND,
    TradingMode,
    TradingPolicySpec,
    WorkloadSpec,
    format_validation_error,
)
from qtrader.control.conditions import Condition, Evaluated, build_conditions
from qtrader.instruments import ExchangeInfo

ROLES = ("marketdata", "inference", "execution", "portfolio")
# While the EmergencyStop halts trading (Halted mode) these run no replicas at all; in
# Reducing mode execution keeps running, since reducing orders still have to be sent.
HALTED_ROLES = frozenset({"inference", "execution"})
REDUCING_ROLES = frozenset({"inference"})
HEALTH_PORT = 8080
# The workload image's user and group (docker/workloads.Dockerfile: USER 10001:10001).
WORKLOAD_UID = 10001
MODE_ANNOTATION = "qtrader.dev/mode"
# The resourceVersion of each Secret execution reads, so a changed key rolls its pods.
SECRETS_ANNOTATION = "qtrader.dev/secrets-version"


@dataclass(frozen=True, kw_only=True)
class Owner:
    name: str
    namespace: str
    uid: str


@dataclass(frozen=True, kw_only=True)
class WorkloadSettings:
    """What the operator's own configuration adds to every workload."""

    image: str
    nats_url: str
    image_pull_policy: str = "IfNotPresent"
    # Execution only: the Redis shared by its replicas' rate limiter (a URL without credentials
    # as a value, or the Secret key holding one), and the Secret holding the Binance keys
    # (files api-key, api-secret), mounted read-only.
    redis_url: str | None = None
    redis_secret: SecretKey | None = None
    binance_secret: str | None = None
    exchange_url: str | None = None  # execution's Binance base URL (None: by the mode)
    # Execution's reads of the venue's income history (None: execution's own default).
    income_interval_s: float | None = None
    # Portfolio only: how long the wallet may differ from the venue's (None: its own default).
    wallet_grace_s: float | None = None
    # Secret name -> its resourceVersion ("absent" when missing), for execution_secrets
    secret_versions: Mapping[str, str] = field(default_factory=dict)
    pod_defaults: PodDefaults = field(default_factory=lambda: PodDefaults())


@dataclass(frozen=True, kw_only=True)
class SecretKey:
    name: str
    key: str


@dataclass(frozen=True, kw_only=True)
class PodDefaults:
    """What the chart's values add to every workload pod: resources where the policy sets none
    (per field: a policy's requests replace the default requests), image pull Secrets and
    scheduling. Kubernetes shapes, passed through."""

    resources: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    image_pull_secrets: Sequence[str] = ()
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: Sequence[Mapping[str, Any]] = ()
    affinity: Mapping[str, Any] = field(default_factory=dict)
    # None: the outbox on the pod's emptyDir (lost with the pod). Set: the workloads run as
    # StatefulSets, each replica with a claim of its own that outlives the pod.
    outbox_storage: OutboxStorage | None = None


@dataclass(frozen=True, kw_only=True)
class OutboxStorage:
    """A PersistentVolumeClaim per workload replica for its disk outbox: what a worker could
    not publish while NATS was unreachable survives the pod's eviction or deletion (the
    replacement pod, same name, same claim, replays it)."""

    size: str
    storage_class: str | None = None


# Where a persistent outbox is mounted (QTRADER_OUTBOX_DIR); without one, /tmp's emptyDir.
OUTBOX_DIR = "/var/lib/qtrader/outbox"
OUTBOX_CLAIM = "outbox"


BINANCE_SECRET_DIR = "/var/run/secrets/binance"


def parse_spec(raw_spec: Mapping[str, Any]) -> TradingPolicySpec | str:
    """The typed spec by its schema alone, or why not (enough to scale its workloads)."""
    try:
        return TradingPolicySpec.model_validate(dict(raw_spec))
    except ValidationError as exc:
        return f"invalid spec: {format_validation_error(exc)}"


def validate(
    raw_spec: Mapping[str, Any],
    listings: Mapping[TradingMode, ExchangeInfo],
    *,
    allowed_images: frozenset[str] = frozenset(),
) -> TradingPolicySpec | str:
    """The typed spec, or the reason it is invalid. ``listings[mode]`` is the listing of the
    venue the policy trades on (a live venue's may be fetched: ``ListingUnavailable``)."""
    spec = parse_spec(raw_spec)
    if isinstance(spec, str):
        return spec
    unlisted = listings[spec.mode].unlisted(list(spec.symbols))
    if unlisted:
        return f"symbols not listed by the {spec.mode.value} exchange: {', '.join(unlisted)}"
    refused = [
        f"{role} {image}"
        for role in ROLES
        if (image := getattr(spec.workloads, role).image) and image not in allowed_images
    ]
    if refused:
        return (
            f"workload images not in the operator's allowlist (the chart's "
            f"workloads.allowedImages): {', '.join(refused)}"
        )
    return spec


def labels(owner: Owner, role: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "quantum-trader",
        "app.kubernetes.io/instance": owner.name,
        "app.kubernetes.io/component": role,
        "app.kubernetes.io/part-of": "quantum-trader",
        "app.kubernetes.io/managed-by": "qtrader-operator",
    }


def workload_name(owner: Owner, role: str) -> str:
    return f"{owner.name}-{role}"


def workload_plural(defaults: PodDefaults) -> str:
    """The kind the workloads run as: StatefulSets when the outbox has storage of its own."""
    return "statefulsets" if defaults.outbox_storage else "deployments"


def other_workload_plural(defaults: PodDefaults) -> str:
    """The kind not in use, whose objects a change of the outbox setting leaves behind."""
    return "deployments" if defaults.outbox_storage else "statefulsets"


def desired_replicas(spec: TradingPolicySpec, role: str, *, stopped_roles: frozenset[str]) -> int:
    workload: WorkloadSpec = getattr(spec.workloads, role)
    return 0 if role in stopped_roles else workload.replicas


def desired_workloads(
    *,
    owner: Owner,
    spec: TradingPolicySpec,
    settings: WorkloadSettings,
    stopped_roles: frozenset[str] = frozenset(),
) -> list[dict[str, Any]]:
    """One Deployment per role, or one StatefulSet per role with a persistent outbox."""
    return [
        _workload(owner=owner, spec=spec, settings=settings, role=role, stopped_roles=stopped_roles)
        for role in ROLES
    ]


def _workload(
    *,
    owner: Owner,
    spec: TradingPolicySpec,
    settings: WorkloadSettings,
    role: str,
    stopped_roles: frozenset[str],
) -> dict[str, Any]:
    workload: WorkloadSpec = getattr(spec.workloads, role)
    selector = {
        "app.kubernetes.io/instance": owner.name,
        "app.kubernetes.io/component": role,
    }
    manifest: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": workload_name(owner, role),
            "namespace": owner.namespace,
            "labels": labels(owner, role),
            "ownerReferences": [
                {
                    "apiVersion": f"{API_GROUP}/{API_VERSION}",
                    "kind": POLICY_KIND,
                    "name": owner.name,
                    "uid": owner.uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "replicas": desired_replicas(spec, role, stopped_roles=stopped_roles),
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {
                    "labels": labels(owner, role),
                    # Workers read the mode and their Secrets when they start: a new mode or
                    # a changed Secret must restart them.
                    "annotations": _template_annotations(role, spec, settings),
                },
                "spec": _pod_spec(
                    role=role,
                    workload=workload,
                    settings=settings,
                    stack=stack_of(owner),
                    mode=spec.mode,
                ),
            },
        },
    }
    storage = settings.pod_defaults.outbox_storage
    if storage is not None:
        _as_stateful_set(manifest, storage)
    return manifest


def _as_stateful_set(manifest: dict[str, Any], storage: OutboxStorage) -> None:
    """The Deployment made a StatefulSet: stable pod names (the outbox file is named by the
    host) and a claim per replica, mounted where the worker keeps its outbox. Claims are kept
    when a trip scales to 0 (and when the policy goes: a person deletes them once drained).
    Pods start and stop in parallel, as a Deployment's do: a halt must not wait on ordinals."""
    manifest["kind"] = "StatefulSet"
    spec = manifest["spec"]
    spec["serviceName"] = manifest["metadata"]["name"]
    spec["podManagementPolicy"] = "Parallel"
    spec["persistentVolumeClaimRetentionPolicy"] = {"whenDeleted": "Retain", "whenScaled": "Retain"}
    claim: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": storage.size}},
    }
    if storage.storage_class:
        claim["storageClassName"] = storage.storage_class
    spec["volumeClaimTemplates"] = [{"metadata": {"name": OUTBOX_CLAIM}, "spec": claim}]
    (container,) = spec["template"]["spec"]["containers"]
    container["env"].append({"name": "QTRADER_OUTBOX_DIR", "value": OUTBOX_DIR})
    container["volumeMounts"].append({"name": OUTBOX_CLAIM, "mountPath": OUTBOX_DIR})


def execution_secrets(settings: WorkloadSettings) -> list[str]:
    """The Secrets execution reads at start (the Binance keys, a Redis URL)."""
    names = [settings.binance_secret] if settings.binance_secret else []
    if settings.redis_secret is not None:
        names.append(settings.redis_secret.name)
    return sorted(set(names))


def _template_annotations(
    role: str, spec: TradingPolicySpec, settings: WorkloadSettings
) -> dict[str, str]:
    annotations = {MODE_ANNOTATION: spec.mode.value}
    secrets = execution_secrets(settings) if role == "execution" else []
    if secrets:
        versions = (f"{name}={settings.secret_versions.get(name, 'unknown')}" for name in secrets)
        annotations[SECRETS_ANNOTATION] = ",".join(versions)
    return annotations


def stack_of(owner: Owner) -> str:
    """The NATS stack the policy's workloads and the operator speak for it."""
    return subjects.stack_id(owner.namespace, owner.name)


def stack_problem(owner: Owner) -> str | None:
    """Why the policy cannot have a stack, or None. A Kubernetes name may hold dots and run to
    253 characters; a stack's parts are DNS labels (they become NATS subject tokens)."""
    try:
        stack_of(owner)
    except subjects.InvalidStack as exc:
        return f"the policy's name cannot name its NATS stack: {exc}"
    return None


def _pod_spec(
    *, role: str, workload: WorkloadSpec, settings: WorkloadSettings, stack: str, mode: TradingMode
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": role,
        "image": workload.image or settings.image,  # validate allowed it
        "imagePullPolicy": settings.image_pull_policy,
        "args": [role, *_market_source(mode)] if role == "marketdata" else [role],
        "env": [
            {"name": "QTRADER_NATS_URL", "value": settings.nats_url},
            {"name": "QTRADER_STACK", "value": stack},
            {"name": "QTRADER_HEALTH_PORT", "value": str(HEALTH_PORT)},
            {
                "name": "QTRADER_WORKER_ID",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
            },
        ],
        "ports": [{"name": "health", "containerPort": HEALTH_PORT}],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "health"}, "periodSeconds": 5},
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "health"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    resources = _resources(workload, settings.pod_defaults)
    if resources:
        container["resources"] = resources
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,  # workloads never talk to the Kubernetes API
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": WORKLOAD_UID,
            "runAsGroup": WORKLOAD_UID,
            # Mounted Secret files belong to this group, so the pod's user can read them.
            "fsGroup": WORKLOAD_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    }
    _add_scheduling(pod, settings.pod_defaults)
    if role == "execution":
        _add_exchange_access(pod, container, settings)
    if role == "portfolio" and settings.wallet_grace_s is not None:
        value = f"{settings.wallet_grace_s:g}"
        container["env"].append({"name": "QTRADER_WALLET_GRACE", "value": value})
    if role == "marketdata" and mode is not TradingMode.PAPER and settings.exchange_url:
        # The live feed's venue (its streams on the same host) and its REST backfill.
        container["env"].append({"name": "QTRADER_BINANCE_URL", "value": settings.exchange_url})
    return pod


def _resources(workload: WorkloadSpec, defaults: PodDefaults) -> dict[str, Any]:
    """The policy's requests and limits, each falling back to the chart's default."""
    own = {k: v for k, v in workload.resources.model_dump(exclude_none=True).items() if v}
    merged = {**{k: dict(v) for k, v in defaults.resources.items() if v}, **own}
    return merged


def _add_scheduling(pod: dict[str, Any], defaults: PodDefaults) -> None:
    if defaults.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": name} for name in defaults.image_pull_secrets]
    if defaults.node_selector:
        pod["nodeSelector"] = dict(defaults.node_selector)
    if defaults.tolerations:
        pod["tolerations"] = [dict(t) for t in defaults.tolerations]
    if defaults.affinity:
        pod["affinity"] = dict(defaults.affinity)


def _market_source(mode: TradingMode) -> list[str]:
    """Synthetic prices only on paper: a live or testnet policy trades on the venue's feed."""
    if mode is TradingMode.PAPER:
        return ["--source", "synthetic"]
    if mode is TradingMode.TESTNET:
        return ["--source", "live", "--testnet"]
    return ["--source", "live"]


def _add_exchange_access(
    pod: dict[str, Any], container: dict[str, Any], settings: WorkloadSettings
) -> None:
    if settings.exchange_url:
        container["env"].append({"name": "QTRADER_BINANCE_URL", "value": settings.exchange_url})
    if settings.income_interval_s is not None:
        value = f"{settings.income_interval_s:g}"
        container["env"].append({"name": "QTRADER_INCOME_INTERVAL", "value": value})
    if settings.redis_secret is not None:
        reference = {"name": settings.redis_secret.name, "key": settings.redis_secret.key}
        container["env"].append(
            {"name": "QTRADER_REDIS_URL", "valueFrom": {"secretKeyRef": reference}}
        )
    elif settings.redis_url:
        container["env"].append({"name": "QTRADER_REDIS_URL", "value": settings.redis_url})
    if settings.binance_secret:
        container["env"].append({"name": "QTRADER_BINANCE_SECRET_DIR", "value": BINANCE_SECRET_DIR})
        container["volumeMounts"].append(
            {"name": "binance-keys", "mountPath": BINANCE_SECRET_DIR, "readOnly": True}
        )
        pod["volumes"].append(
            {
                "name": "binance-keys",
                # Owner read-only, group read: the group is the pod's fsGroup.
                "secret": {"secretName": settings.binance_secret, "defaultMode": 0o440},
            }
        )


@dataclass(frozen=True, kw_only=True)
class WorkloadReadiness:
    desired: int
    ready: int


def policy_conditions(
    *,
    invalid_reason: str | None,
    workloads: Mapping[str, WorkloadReadiness],
    halted: bool,
    generation: int | None,
    now: str,
    previous: Sequence[Mapping[str, Any]],
) -> list[Condition]:
    return build_conditions(
        _evaluate(invalid_reason=invalid_reason, workloads=workloads, halted=halted),
        generation=generation,
        now=now,
        previous=previous,
    )


def _evaluate(
    *, invalid_reason: str | None, workloads: Mapping[str, WorkloadReadiness], halted: bool
) -> list[Evaluated]:
    halt = ("Halted", halted, "EmergencyStop" if halted else "Armed", _halt_message(halted))
    if invalid_reason is not None:
        return [
            ("Ready", False, "Invalid", invalid_reason),
            ("Progressing", False, "Invalid", "nothing is changed while the spec is invalid"),
            ("Degraded", True, "Invalid", invalid_reason),
            halt,
        ]
    lagging = sorted(r for r, w in workloads.items() if w.ready < w.desired)
    ready = not lagging
    waiting = ", ".join(f"{r} {workloads[r].ready}/{workloads[r].desired}" for r in lagging)
    return [
        ("Ready", ready, "AllWorkloadsReady" if ready else "WorkloadsNotReady", waiting),
        ("Progressing", not ready, "ScalingWorkloads" if not ready else "Stable", waiting),
        ("Degraded", False, "Valid", ""),
        halt,
    ]


def _halt_message(halted: bool) -> str:
    return "the EmergencyStop halts trading: execution and inference stopped" if halted else ""
