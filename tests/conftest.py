"""Fixtures for real servers: each test gets its own nats-server on a free port and store dir."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qtrader.local.nats_server import EmbeddedNats


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(store_dir=tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()
