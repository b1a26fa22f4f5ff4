"""The operator's one door to the Kubernetes API besides kopf itself: Deployments and patches.

kopf owns watching, status patching and events for our custom resources. The few other calls
(create or patch the workloads' Deployments, read a sibling resource, patch an EmergencyStop's
spec on an automatic trip) go through this small async client, so there is exactly one place
that knows URLs, credentials and the API's error shapes.

Errors: ``KubeError`` (with the HTTP status) and its subclass ``KubeNotFound``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from qtrader.contracts.policy import API_GROUP, API_VERSION

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
CUSTOM_API = f"/apis/{API_GROUP}/{API_VERSION}"


class KubeError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Kubernetes API {status}: {message}")
        self.status = status


class KubeNotFound(KubeError):
    pass


@dataclass(frozen=True, kw_only=True)
class KubeEndpoint:
    server: str
    token: str
    ca_file: str | None = None  # None: no TLS verification (test servers only)

    @classmethod
    def in_cluster(cls) -> KubeEndpoint:
        host = os.environ["KUBERNETES_SERVICE_HOST"]
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        return cls(
            server=f"https://{host}:{port}",
            token=(SERVICE_ACCOUNT / "token").read_text().strip(),
            ca_file=str(SERVICE_ACCOUNT / "ca.crt"),
        )


class KubeApi:
    def __init__(self, endpoint: KubeEndpoint, *, timeout_s: float = 10.0) -> None:
        self._client = httpx.AsyncClient(
            base_url=endpoint.server,
            headers={"Authorization": f"Bearer {endpoint.token}"},
            verify=endpoint.ca_file if endpoint.ca_file else False,
            timeout=timeout_s,
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def get(self, path: str) -> dict[str, Any]:
        return await self._call("GET", path)

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._call("POST", path, json=body)

    async def merge_patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/merge-patch+json"}
        return await self._call("PATCH", path, json=body, headers=headers)

    async def apply_deployment(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Create the Deployment, or merge-patch it to the manifest if it exists."""
        namespace = manifest["metadata"]["namespace"]
        name = manifest["metadata"]["name"]
        try:
            await self.get(deployment_path(namespace, name))
        except KubeNotFound:
            return await self.create(deployment_path(namespace), manifest)
        return await self.merge_patch(deployment_path(namespace, name), manifest)

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        try:
            response = await self._client.request(method, path, json=json, headers=headers)
        except httpx.HTTPError as exc:
            raise KubeError(0, f"{method} {path}: {exc!r}") from exc
        if response.status_code == 404:
            raise KubeNotFound(404, f"{method} {path}: not found")
        if response.status_code >= 400:
            raise KubeError(response.status_code, f"{method} {path}: {response.text[:500]}")
        body: dict[str, Any] = response.json()
        return body


def deployment_path(namespace: str, name: str | None = None) -> str:
    base = f"/apis/apps/v1/namespaces/{namespace}/deployments"
    return f"{base}/{name}" if name else base


def custom_path(plural: str, namespace: str, name: str | None = None) -> str:
    base = f"{CUSTOM_API}/namespaces/{namespace}/{plural}"
    return f"{base}/{name}" if name else base
