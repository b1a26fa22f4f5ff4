"""The real helm CLI, 3 and 4, for the chart tests (see ``support.helm_cli``)."""

from __future__ import annotations

import os

import pytest

from support.helm_cli import (
    HELM_SOURCES,
    HelmCli,
    HelmUnavailableError,
    HelmUnsupportedPlatformError,
    helm_binary,
)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}


@pytest.fixture(scope="session", params=sorted(HELM_SOURCES), ids=lambda major: f"helm{major}")
def helm_cli(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> HelmCli:
    """One helm per major version; a helm that cannot be set up fails the tests.

    Only a machine that cannot run the Linux x86_64 binary skips, and only outside CI.
    """
    major: int = request.param
    source = HELM_SOURCES[major]
    try:
        binary = helm_binary(source)
    except HelmUnsupportedPlatformError as exc:
        if not in_ci():
            pytest.skip(str(exc))
        pytest.fail(f"helm {major} cannot run on this CI machine: {exc}")
    except HelmUnavailableError as exc:
        pytest.fail(f"helm {major} is needed by the chart tests and could not be set up: {exc}")
    cli = HelmCli(major=major, binary=binary, home=tmp_path_factory.mktemp(f"helm{major}-home"))
    version = cli.version()
    assert version.startswith(source.helm_version_prefix), (binary, version)
    return cli
