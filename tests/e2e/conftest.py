"""kind end-to-end fixtures: skip with the reason when Docker, kind, helm or kubectl is missing.

``QTRADER_E2E_CLUSTER`` names an existing kind cluster to use (CI: ``chart-testing``, created by
helm/kind-action); otherwise a cluster ``qtrader-e2e`` is created and deleted afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from .tools import missing_tool, run

DEFAULT_CLUSTER = "qtrader-e2e"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    e2e = [item for item in items if item.get_closest_marker("e2e")]
    if not e2e:
        return
    reason = missing_tool()
    if reason is not None:
        for item in e2e:
            item.add_marker(pytest.mark.skip(reason=f"e2e needs Docker and kind: {reason}"))


@pytest.fixture(scope="session")
def kind_cluster() -> Iterator[str]:
    name = os.environ.get("QTRADER_E2E_CLUSTER")
    if name:
        yield name
        return
    existing = run("kind", "get", "clusters").split()
    created = DEFAULT_CLUSTER not in existing
    if created:
        run("kind", "create", "cluster", "--name", DEFAULT_CLUSTER, "--wait", "120s")
    try:
        yield DEFAULT_CLUSTER
    finally:
        if created:
            run("kind", "delete", "cluster", "--name", DEFAULT_CLUSTER)
