"""The real helm CLI, 3 and 4, for the chart tests (see ``support.helm_cli``)."""

from __future__ import annotations

import pytest

from support.helm_cli import HELM_SOURCES, HelmCli, HelmUnavailableError, helm_binary


@pytest.fixture(scope="session", params=sorted(HELM_SOURCES), ids=lambda major: f"helm{major}")
def helm_cli(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> HelmCli:
    """One helm per major version; fails (never skips) when it cannot be obtained."""
    major: int = request.param
    source = HELM_SOURCES[major]
    try:
        binary = helm_binary(source)
    except HelmUnavailableError as exc:
        pytest.fail(f"helm {major} is needed by the chart tests and could not be set up: {exc}")
    cli = HelmCli(major=major, binary=binary, home=tmp_path_factory.mktemp(f"helm{major}-home"))
    version = cli.version()
    assert version.startswith(source.helm_version_prefix), (binary, version)
    return cli
