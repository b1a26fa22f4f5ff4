"""``qtrader-operator``: run the operator in a cluster (configuration from the environment).

Environment: ``QTRADER_NAMESPACE`` (or ``POD_NAMESPACE``) the namespace it manages,
``QTRADER_NATS_URL``, ``QTRADER_WORKLOAD_IMAGE``, ``QTRADER_REDIS_URL`` and
``QTRADER_BINANCE_SECRET_NAME`` (optional, passed on to execution), ``QTRADER_LIVENESS_URL``
(default ``http://0.0.0.0:8081/healthz``), and for the optional admission webhook
``QTRADER_WEBHOOK_PORT``, ``QTRADER_WEBHOOK_CERT``, ``QTRADER_WEBHOOK_KEY``.

High availability (``leadership``): ``QTRADER_PEERING_NAME`` names the ``KopfPeering`` object
in the namespace; set, the replicas peer and only one leads; unset, the operator runs
standalone (one replica). ``POD_NAME`` is the replica's identity (else host name and process
id), ``QTRADER_PEERING_PRIORITY`` its priority (default: the earlier started, the higher),
``QTRADER_PEERING_LIFETIME`` (seconds, default 3) how long a replica that stopped renewing
still counts as alive, which bounds a takeover after a crash.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import kopf

from qtrader.startup_heap import freeze_startup_heap
from qtrader_operator.admission import early_reset_refusal
from qtrader_operator.handlers import STOPS, registry
from qtrader_operator.leadership import PeeringConfig, priority_from_start
from qtrader_operator.policy_core import OutboxStorage, PodDefaults, SecretKey
from qtrader_operator.runtime import OperatorConfig

log = logging.getLogger(__name__)


def _required(environ: Mapping[str, str], *names: str) -> str:
    for name in names:
        value = environ.get(name)
        if value:
            return value
    raise SystemExit(f"qtrader-operator: set {' or '.join(names)}")


def config_from_environment(environ: Mapping[str, str] = os.environ) -> OperatorConfig:
    return OperatorConfig(
        namespace=_required(environ, "QTRADER_NAMESPACE", "POD_NAMESPACE"),
        nats_url=_required(environ, "QTRADER_NATS_URL"),
        workload_image=_required(environ, "QTRADER_WORKLOAD_IMAGE"),
        allowed_images=frozenset(_listed(environ.get("QTRADER_WORKLOAD_ALLOWED_IMAGES", ""))),
        redis_url=environ.get("QTRADER_REDIS_URL") or None,
        redis_secret=_redis_secret(environ),
        binance_secret=environ.get("QTRADER_BINANCE_SECRET_NAME") or None,
        metrics_port=_port(environ.get("QTRADER_METRICS_PORT")),
        exchange_url=environ.get("QTRADER_BINANCE_URL") or None,
        income_interval_s=_seconds(
            "QTRADER_INCOME_INTERVAL", environ.get("QTRADER_INCOME_INTERVAL")
        ),
        wallet_grace_s=_seconds("QTRADER_WALLET_GRACE", environ.get("QTRADER_WALLET_GRACE")),
        pod_defaults=_pod_defaults(environ.get("QTRADER_WORKLOAD_POD_DEFAULTS")),
        peering=peering_from_environment(environ),
    )


def peering_from_environment(environ: Mapping[str, str] = os.environ) -> PeeringConfig | None:
    name = environ.get("QTRADER_PEERING_NAME")
    if not name:
        return None
    identity = environ.get("POD_NAME") or f"{socket.gethostname()}/{os.getpid()}"
    priority = environ.get("QTRADER_PEERING_PRIORITY")
    return PeeringConfig(
        name=name,
        identity=identity,
        priority=int(priority) if priority else priority_from_start(),
        lifetime_s=int(environ.get("QTRADER_PEERING_LIFETIME") or 3),
    )


def _pod_defaults(value: str | None) -> PodDefaults:
    """The chart's workload pod defaults, a JSON object (``toJson`` of the values)."""
    if not value:
        return PodDefaults()
    try:
        raw = json.loads(value)
        return PodDefaults(
            resources=raw.get("resources") or {},
            image_pull_secrets=[s["name"] for s in raw.get("imagePullSecrets") or []],
            node_selector=raw.get("nodeSelector") or {},
            tolerations=raw.get("tolerations") or [],
            affinity=raw.get("affinity") or {},
            outbox_storage=_outbox_storage(raw.get("outboxStorage") or {}),
        )
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise SystemExit(f"qtrader-operator: QTRADER_WORKLOAD_POD_DEFAULTS: {exc!r}") from None


def _outbox_storage(raw: Mapping[str, Any]) -> OutboxStorage | None:
    """``workloads.outboxStorage`` of the chart: a claim per replica when enabled."""
    if not raw.get("enabled"):
        return None
    size = str(raw["size"])
    return OutboxStorage(size=size, storage_class=raw.get("storageClassName") or None)


def _port(value: str | None) -> int | None:
    if not value:
        return None
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise SystemExit(f"qtrader-operator: QTRADER_METRICS_PORT {value!r} is not a port")
    return int(value)


def _seconds(name: str, value: str | None) -> float | None:
    """A non-negative number of seconds, or None when unset; anything else stops the start."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise SystemExit(f"qtrader-operator: {name} {value!r} is not a number of seconds")
    return seconds


def _listed(value: str) -> list[str]:
    """A comma-separated setting's items."""
    return [item.strip() for item in value.split(",") if item.strip()]


def _redis_secret(environ: Mapping[str, str]) -> SecretKey | None:
    name = environ.get("QTRADER_REDIS_SECRET_NAME")
    if not name:
        return None
    return SecretKey(name=name, key=environ.get("QTRADER_REDIS_SECRET_KEY") or "url")


def refuse_early_reset(**kwargs: Any) -> None:
    old, new = kwargs.get("old") or {}, kwargs.get("new") or {}
    reason = early_reset_refusal(old=old, new=new, now=datetime.now(UTC))
    if reason is not None:
        raise kopf.AdmissionError(reason, code=409)


def _register_admission(environ: Mapping[str, str]) -> None:
    """The webhook only when it is configured: kopf refuses to run with an admission handler
    but no admission server (the operator then stopped at once)."""
    port = environ.get("QTRADER_WEBHOOK_PORT")
    if not port:
        return
    server = kopf.WebhookServer(
        port=int(port),
        certfile=_required(environ, "QTRADER_WEBHOOK_CERT"),
        pkeyfile=_required(environ, "QTRADER_WEBHOOK_KEY"),
    )

    def admission_server(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.admission.server = server

    kopf.on.startup(registry=registry)(admission_server)
    kopf.on.validate(*STOPS, operations=["UPDATE"], registry=registry)(refuse_early_reset)


@kopf.on.login(registry=registry)
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod: the service account; elsewhere (a developer's shell): the kubeconfig."""
    info: kopf.ConnectionInfo | None = kopf.login_with_service_account(**kwargs)
    return info or kopf.login_with_kubeconfig(**kwargs)


def kopf_options(config: OperatorConfig) -> dict[str, Any]:
    """What ``kopf.run`` (or ``kopf.operator``) needs besides the liveness endpoint: the
    namespace, the memo, and peering (standalone without it)."""
    options: dict[str, Any] = {
        "registry": registry,
        "namespaces": [config.namespace],
        "memo": kopf.Memo(config=config),
    }
    peering = config.peering
    if peering is None:
        return {**options, "standalone": True}
    return {
        **options,
        "peering_name": peering.name,  # mandatory: paused while the object is missing
        "priority": peering.priority,
        "identity": peering.identity,
    }


def run(config: OperatorConfig) -> None:
    _register_admission(os.environ)
    kopf.configure(verbose=False)
    # A trip waits on every full collection (``qtrader.startup_heap``): its imports are
    # walked no more. (Not in the startup handler: tests run that inside their own process.)
    log.info("start-up heap frozen: %d objects", freeze_startup_heap())
    kopf.run(
        liveness_endpoint=os.environ.get("QTRADER_LIVENESS_URL", "http://0.0.0.0:8081/healthz"),
        **kopf_options(config),
    )


def main() -> int:
    run(config_from_environment())
    return 0


if __name__ == "__main__":
    sys.exit(main())
