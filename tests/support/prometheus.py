"""A real Prometheus server for a test: Debian's ``prometheus`` binary on a free loopback port.

``.ci/run`` installs the ``prometheus`` package (it brings ``promtool`` too). Without the binary a
test skips on a developer's machine and fails when ``CI`` is set, as the promtool tests do.
The server keeps its TSDB in the test's directory and is stopped (SIGTERM, then SIGKILL) when
the context ends, so nothing outlives the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from qtrader.local.nats_server import free_port

_NOT_CI = {"", "0", "false", "no"}
START_TIMEOUT_S = 60.0


def require_binary(name: str, *, package: str) -> str:
    """The path of ``name``; skips without it, but fails in CI, which must install it."""
    found = shutil.which(name)
    if found is not None:
        return found
    message = f"{name} is not installed (Debian/Ubuntu: apt-get install -y {package})"
    if os.environ.get("CI", "").strip().lower() not in _NOT_CI:
        pytest.fail(f"{message}; CI is set, so this test must not be skipped")
    pytest.skip(message)


@dataclass(frozen=True)
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def _get(self, path: str, **params: str) -> Any:
        response = httpx.get(self.url + path, params=params, timeout=5.0)
        response.raise_for_status()
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """``/api/v1/query``: the instant vector's samples (``metric``, ``value``)."""
        data = self._get("/api/v1/query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        if data["resultType"] == "scalar":  # e.g. a bare number: one unlabelled sample
            return [{"metric": {}, "value": result}]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        """``/api/v1/alerts``: every pending or firing alert (``labels``, ``state``, ...)."""
        alerts: list[dict[str, Any]] = self._get("/api/v1/alerts")["alerts"]
        return alerts

    def label_values(self, label: str, *, match: str) -> list[str]:
        """``/api/v1/label/LABEL/values`` of the series ``match`` selects (Grafana's
        ``label_values(match, label)``)."""
        values: list[str] = self._get(f"/api/v1/label/{label}/values", **{"match[]": match})
        return values

    def targets(self) -> list[dict[str, Any]]:
        """``/api/v1/targets``: the active scrape targets (``labels``, ``health``, ...)."""
        targets: list[dict[str, Any]] = self._get("/api/v1/targets")["activeTargets"]
        return targets

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def prometheus(config: dict[str, Any], *, directory: Path) -> Iterator[Prometheus]:
    """Prometheus with ``config`` (prometheus.yml as a dict), its TSDB in ``directory``."""
    binary = require_binary("prometheus", package="prometheus")
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    log_path = directory / "prometheus.log"
    command = [
        binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={directory / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    server = Prometheus(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    try:
        _wait_ready(server)
        yield server
    finally:
        _stop(process)


def _wait_ready(server: Prometheus) -> None:
    """Until ``/-/ready`` answers 200: the rules are loaded and the first scrapes scheduled."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"prometheus exited at start:\n{server.log()}")
        try:
            if httpx.get(server.url + "/-/ready", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.1)
    raise AssertionError(f"prometheus not ready after {START_TIMEOUT_S}s:\n{server.log()}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
