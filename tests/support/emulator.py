"""The operator on kmock's Kubernetes emulator: what the operator tests share.

``declare_resources`` makes the emulator serve what kopf and the operator use (our CRDs,
Deployments, Events, and kopf's ``KopfPeering``) and what pods read (Secrets, ConfigMaps),
``Cluster`` is kubectl in a few lines, ``operator`` runs the real kopf runtime in this process
(standalone), and ``example``, ``policy``, ``stop`` build the objects from examples/.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import io
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import kmock as kmock_lib
import kopf
import pytest
import yaml

from qtrader_operator.handlers import registry
from qtrader_operator.kube import KubeEndpoint
from qtrader_operator.runtime import OperatorConfig

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "trading"
POLICIES = "qtrader.dev/v1alpha1/tradingpolicies"
STOPS = "qtrader.dev/v1alpha1/emergencystops"
DEPLOYMENTS = "apps/v1/deployments"
STATEFULSETS = "apps/v1/statefulsets"
STACK = "trading.paper-demo"  # the example policy's stack: its workers speak only its names
PEERINGS = "kopf.dev/v1/kopfpeerings"
SECRETS = "v1/secrets"
CONFIGMAPS = "v1/configmaps"
_server: dict[str, str] = {}


def serve(kmock: Any) -> str:
    """Declare the resources and remember the emulator's URL (kopf's login reads it)."""
    declare_resources(kmock)
    _server["url"] = str(kmock.url).rstrip("/")
    return _server["url"]


@kopf.on.login(registry=registry)
def login_to_emulator(**_: Any) -> kopf.ConnectionInfo:
    return kopf.ConnectionInfo(server=_server["url"], scheme="Bearer", token="test", insecure=True)


def declare_resources(kmock: Any) -> None:
    info = kmock_lib.ResourceInfo
    readable = {"list", "watch", "get"}
    writable = {"list", "watch", "get", "patch", "create", "update", "delete"}
    kmock.resources["v1/namespaces"] = info(
        kind="Namespace", singular="namespace", verbs=readable, namespaced=False
    )
    kmock.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = info(
        kind="CustomResourceDefinition",
        singular="customresourcedefinition",
        verbs=readable,
        namespaced=False,
    )
    kmock.resources["v1/events"] = info(
        kind="Event", singular="event", verbs=readable | {"create"}, namespaced=True
    )
    for plural, kind in ((POLICIES, "TradingPolicy"), (STOPS, "EmergencyStop")):
        kmock.resources[plural] = info(
            kind=kind,
            singular=kind.lower(),
            verbs=writable,
            namespaced=True,
            subresources={"status"},
        )
    kmock.resources[DEPLOYMENTS] = info(
        kind="Deployment", singular="deployment", verbs=writable, namespaced=True
    )
    kmock.resources[STATEFULSETS] = info(
        kind="StatefulSet", singular="statefulset", verbs=writable, namespaced=True
    )
    # kopf's peering object: its status holds one entry per replica (no status subresource).
    kmock.resources[PEERINGS] = info(
        kind="KopfPeering", singular="kopfpeering", verbs=writable, namespaced=True
    )
    # What pods read (support.kubelet), and the operator's Secret versions: Binance keys, the
    # chart's dashboards.
    kmock.resources[SECRETS] = info(
        kind="Secret", singular="secret", verbs=writable, namespaced=True
    )
    kmock.resources[CONFIGMAPS] = info(
        kind="ConfigMap", singular="configmap", verbs=writable, namespaced=True
    )


class Cluster:
    """kubectl, in a few lines: create and patch objects over HTTP, read what is stored."""

    def __init__(self, kmock: Any) -> None:
        self._kmock = kmock
        self.url = _server["url"]
        self._http = httpx.AsyncClient(base_url=self.url, timeout=5)

    def _path(self, plural: str, name: str | None = None) -> str:
        group_version, resource = plural.rsplit("/", 1)
        prefix = "/api" if group_version == "v1" else "/apis"
        base = f"{prefix}/{group_version}/namespaces/{NAMESPACE}/{resource}"
        return f"{base}/{name}" if name else base

    async def apply(self, plural: str, document: dict[str, Any]) -> None:
        # The emulator assigns neither a uid nor a resourceVersion, as an API server would:
        # kopf tells objects apart by uid, and its JSON patches test the resourceVersion.
        metadata = {
            **document["metadata"],
            "namespace": NAMESPACE,
            "uid": str(uuid.uuid4()),
            "resourceVersion": "1",
        }
        document = {**document, "metadata": metadata}
        response = await self._http.post(self._path(plural), json=document)
        assert response.status_code < 300, response.text

    async def patch(
        self, plural: str, name: str, body: dict[str, Any], *, new_version: bool = False
    ) -> None:
        """A merge patch. ``new_version``: give the object the next resourceVersion, as an API
        server does on every write and the emulator does not (only where a test reads it: kopf's
        own patches of our resources test the version they last saw)."""
        if new_version:
            current = int((self.get(plural, name) or {})["metadata"]["resourceVersion"])
            metadata = {**body.get("metadata", {}), "resourceVersion": str(current + 1)}
            body = {**body, "metadata": metadata}
        headers = {"Content-Type": "application/merge-patch+json"}
        response = await self._http.patch(self._path(plural, name), json=body, headers=headers)
        assert response.status_code < 300, response.text

    async def delete(self, plural: str, name: str) -> None:
        response = await self._http.delete(self._path(plural, name))
        assert response.status_code < 300, response.text

    def get(self, plural: str, name: str) -> dict[str, Any] | None:
        try:
            return plain(self._kmock.objects[plural, NAMESPACE, name])
        except KeyError:
            return None

    def names(self, plural: str) -> set[str]:
        return {key[2] for key in self._kmock.objects.keys() if key[0] == plural}  # noqa: SIM118

    def events(self) -> list[dict[str, Any]]:
        """Every Event the operator posted. The emulator stores only the first (it does not
        honour generateName, so later ones conflict), hence read them from its request log."""
        return [
            request.data
            for request in list(self._kmock._requests)
            if str(request.method).upper().endswith("POST")
            and request.url.path.endswith("/events")
            and isinstance(request.data, dict)
        ]

    def hold(self, plural: str, name: str) -> Held:
        """Hold every GET of one object until ``release()``: an API server slow to answer one
        read, so a test can put an event between a handler's read and its write."""
        held = Held()

        async def wait_then_serve() -> None:
            held.waiting.set()
            await held.released.wait()
            raise NotImplementedError  # not this reaction's to answer: the emulator serves it

        self._kmock[f"get {self._path(plural, name)}"] << wait_then_serve
        return held

    async def close(self) -> None:
        await self._http.aclose()


@dataclass
class Held:
    waiting: asyncio.Event = field(default_factory=asyncio.Event)  # a read arrived and waits
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self) -> None:
        self.released.set()


def plain(value: Any) -> Any:
    if isinstance(value, dict) or hasattr(value, "items"):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


async def eventually(check: Callable[[], Any], *, timeout_s: float, what: str) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def operator(nats_url: str, **settings: Any) -> AsyncIterator[kopf.Memo]:
    """The operator from its own handlers, with ``/metrics`` on a free port (the memo the
    handlers fill: ``memo.runtime`` once started); ``settings`` override its configuration."""
    config = OperatorConfig(
        namespace=NAMESPACE,
        nats_url=nats_url,
        workload_image="qtrader:test",
        kube=KubeEndpoint(server=_server["url"], token="test"),
        heartbeat_interval_s=0.2,
        watch_timeout_s=2.0,
        metrics_host="127.0.0.1",
        metrics_port=0,
        **settings,
    )
    stop_flag = asyncio.Event()
    memo = kopf.Memo(config=config)
    task = asyncio.create_task(
        kopf.operator(
            registry=registry,
            namespaces=[NAMESPACE],
            standalone=True,
            stop_flag=stop_flag,
            memo=memo,
        )
    )
    try:
        yield memo
    finally:
        stop_flag.set()
        await operator_ended(task)
        await close_sessions_kopf_left()


async def operator_ended(task: asyncio.Task[None], timeout_s: float = 60) -> None:
    """Wait for kopf to stop; if it does not, fail naming where every task waits (a
    ``wait_for`` would cancel it and could wait forever on a task that ignores the cancel)."""
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if done:
        task.result()
        return
    stuck = io.StringIO()
    for other in asyncio.all_tasks():
        print(f"--- {other.get_name()}", file=stuck)
        other.print_stack(limit=12, file=stuck)
    pytest.fail(f"kopf did not stop within {timeout_s} s; tasks:\n{stuck.getvalue()}")


async def close_sessions_kopf_left() -> None:
    """Close the aiohttp sessions kopf left open when it stopped.

    kopf (1.37) closes its API sessions through its credentials vault at the end; a session of a
    vault item it had already replaced (a watch cut mid-request on the emulator, under load) is
    sometimes left to the collector, whose "Unclosed client session" the leak guard would then
    blame on this test. They are kopf's, not ours (the operator's own client is httpx), and the
    operator is gone by now, so closing them here changes nothing it does.
    """
    # ``type`` and not ``isinstance``: the latter asks every object for its ``__class__``, and
    # some modules' deprecated attributes warn when asked (torch's, once imported).
    sessions = [o for o in gc.get_objects() if type(o) is aiohttp.ClientSession]
    for session in sessions:
        if not session.closed:
            await session.close()


def example(name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "examples" / name).read_text())
    return document


def policy(**risk: Any) -> dict[str, Any]:
    document = example("policy.yaml")
    document["spec"]["risk"].update({"minConfidence": 0.0, **risk})
    document["spec"]["workloads"] = {"execution": {"replicas": 2}, "inference": {"replicas": 1}}
    return document


def stop(**spec: Any) -> dict[str, Any]:
    document = example("emergencystop.yaml")
    document["spec"].update({"cooldownSeconds": 3, "requireManualReset": True, **spec})
    return document
