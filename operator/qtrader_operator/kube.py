"""The operator's one door to the Kubernetes API besides kopf itself: Deployments and patches.

kopf owns watching, status patching and events for our custom resources. The few other calls
(create or patch the workloads' Deployments, read a sibling resource, patch an EmergencyStop's
spec on an automatic trip) go through this small async client, so there is exactly one place
that knows URLs, credentials and the API's error shapes.

Errors: ``KubeError`` (with the HTTP status) and its subclass ``KubeNotFound``.
"""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import kopf

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
    """Where the API server is and how to prove who we are.

    ``token_file`` is read again whenever it changes: a pod's bound service-account token is
    rotated (about hourly) and the old one expires, so a token read once stops working.
    ``ca_file``/``ca_data`` None (and not ``insecure``) trusts the system's roots; the tests'
    emulator speaks plain HTTP.
    """

    server: str
    token: str | None = None
    token_file: Path | None = None
    ca_file: str | None = None
    ca_data: str | None = None
    client_cert: tuple[str, str] | None = None  # (certificate file, key file)
    insecure: bool = False

    @classmethod
    def in_cluster(cls) -> KubeEndpoint:
        host = os.environ["KUBERNETES_SERVICE_HOST"]
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        return cls(
            server=f"https://{host}:{port}",
            token_file=SERVICE_ACCOUNT / "token",
            ca_file=str(SERVICE_ACCOUNT / "ca.crt"),
        )

    @classmethod
    def discover(cls) -> KubeEndpoint:
        """In a pod its service account, elsewhere the kubeconfig (``KUBECONFIG`` or
        ``~/.kube/config``), read the way kopf reads it for its own connection."""
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            return cls.in_cluster()
        info = kopf.login_with_kubeconfig(settings=kopf.OperatorSettings())
        if info is None:
            raise KubeError(0, "no in-cluster service account and no kubeconfig to log in with")
        return cls.from_connection_info(info)

    @classmethod
    def from_connection_info(cls, info: kopf.ConnectionInfo) -> KubeEndpoint:
        cert, key = info.certificate_path, info.private_key_path
        if info.certificate_data or info.private_key_data:
            cert, key = _write_private(info.certificate_data, info.private_key_data)
        # kubeconfig's *-data fields are base64 of the PEM text
        ca_data = base64.b64decode(info.ca_data).decode() if info.ca_data else None
        return cls(
            server=info.server,
            token=info.token,
            ca_file=os.fsdecode(info.ca_path) if info.ca_path else None,
            ca_data=ca_data,
            client_cert=(os.fsdecode(cert), os.fsdecode(key)) if cert and key else None,
            insecure=bool(info.insecure),
        )

    def verify(self) -> ssl.SSLContext | bool:
        if self.insecure:
            return False
        if self.ca_file or self.ca_data:
            context = ssl.create_default_context(cafile=self.ca_file, cadata=self.ca_data)
        else:
            context = ssl.create_default_context()
        if self.client_cert is not None:
            context.load_cert_chain(*self.client_cert)
        return context


def _write_private(cert: str | bytes | None, key: str | bytes | None) -> tuple[str, str]:
    """Client certificate and key given inline in a kubeconfig, as files only we can read
    (the TLS library loads a chain from files)."""
    directory = Path(tempfile.mkdtemp(prefix="qtrader-kube-"))
    paths = []
    for name, data in (("client.crt", cert), ("client.key", key)):
        path = directory / name
        path.write_bytes(base64.b64decode(data) if data else b"")
        os.chmod(path, 0o600)
        paths.append(str(path))
    return paths[0], paths[1]


class _Bearer(httpx.Auth):
    """The endpoint's token, the file re-read when its modification time changes."""

    def __init__(self, endpoint: KubeEndpoint) -> None:
        self._endpoint = endpoint
        self._token = endpoint.token
        self._read_at: float | None = None

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self._current()
        if token:
            request.headers["Authorization"] = f"Bearer {token}"
        yield request

    def _current(self) -> str | None:
        path = self._endpoint.token_file
        if path is None:
            return self._token
        changed = path.stat().st_mtime
        if changed != self._read_at:
            self._token, self._read_at = path.read_text().strip(), changed
        return self._token


class KubeApi:
    def __init__(self, endpoint: KubeEndpoint, *, timeout_s: float = 10.0) -> None:
        self._client = httpx.AsyncClient(
            base_url=endpoint.server,
            auth=_Bearer(endpoint),
            verify=endpoint.verify(),
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

    async def delete(self, path: str) -> dict[str, Any]:
        return await self._call("DELETE", path)

    async def apply_workload(
        self, plural: str, manifest: dict[str, Any]
    ) -> tuple[dict[str, Any], bool]:
        """Create the Deployment or StatefulSet (``plural``), or merge-patch it to the
        manifest if it exists; returns the object and whether it was created."""
        namespace = manifest["metadata"]["namespace"]
        name = manifest["metadata"]["name"]
        try:
            await self.get(workload_path(plural, namespace, name))
        except KubeNotFound:
            return await self.create(workload_path(plural, namespace), manifest), True
        return await self.merge_patch(workload_path(plural, namespace, name), manifest), False

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


def workload_path(plural: str, namespace: str, name: str | None = None) -> str:
    """A Deployment's or a StatefulSet's path (``plural``: deployments, statefulsets)."""
    base = f"/apis/apps/v1/namespaces/{namespace}/{plural}"
    return f"{base}/{name}" if name else base


def custom_path(plural: str, namespace: str, name: str | None = None) -> str:
    base = f"{CUSTOM_API}/namespaces/{namespace}/{plural}"
    return f"{base}/{name}" if name else base
