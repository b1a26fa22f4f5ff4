"""The operator's own API client logs in like kopf: a rotating service-account token, a
kubeconfig outside a pod. A real HTTP server records what the client sends."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from aiohttp import web

from qtrader_operator.kube import KubeApi, KubeEndpoint, KubeError


@pytest.fixture
async def api_server() -> AsyncIterator[tuple[str, list[str]]]:
    """An API server stand-in answering every GET with {} and recording the Authorization."""
    seen: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


async def test_a_rotated_token_file_is_used_from_the_next_request(
    api_server: tuple[str, list[str]], tmp_path: Path
) -> None:
    url, seen = api_server
    token = tmp_path / "token"
    token.write_text("first\n")
    api = KubeApi(KubeEndpoint(server=url, token_file=token))
    try:
        await api.get("/api")
        token.write_text("second\n")  # what the kubelet does about hourly
        stat = token.stat()
        os.utime(token, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        await api.get("/api")
    finally:
        await api.close()
    assert seen == ["Bearer first", "Bearer second"]


async def test_outside_a_pod_the_kubeconfig_is_used(
    api_server: tuple[str, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, seen = api_server
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "dev",
                "contexts": [{"name": "dev", "context": {"cluster": "c", "user": "u"}}],
                "clusters": [{"name": "c", "cluster": {"server": url}}],
                "users": [{"name": "u", "user": {"token": "from-kubeconfig"}}],
            }
        )
    )
    # The environment is the input here (where a developer's shell points), not the code.
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    api = KubeApi(KubeEndpoint.discover())
    try:
        await api.get("/api")
    finally:
        await api.close()
    assert seen == ["Bearer from-kubeconfig"]


def test_with_neither_a_service_account_nor_a_kubeconfig_the_error_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config
    with pytest.raises(KubeError, match="no kubeconfig"):
        KubeEndpoint.discover()
