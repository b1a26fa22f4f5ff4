"""A worker keeps what it made while starting out of the garbage collector's walks.

A full collection walked every module, schema and object of the app: 75-170 ms in an execution
worker, in which it acknowledged no halt (``qtrader bench halt``: p99 2-9x the raw fan-out's).
After ``gc.freeze`` at start the halt p99 is within 2x (bench/README.md); this checks each
worker kind does it, from its own ``/metrics``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qtrader.local.nats_server import EmbeddedNats
from qtrader_tools import metrics
from support.workers import Worker, eventually, start_worker

pytestmark = pytest.mark.integration

# A started worker holds 85,000-99,000 objects, most of them from its imports; a bare
# interpreter about 8,000. Far fewer frozen would mean the freeze came before the start.
AT_LEAST = 50_000


@pytest.mark.parametrize("role", ["execution", "portfolio", "inference", "marketdata"])
async def test_a_started_worker_has_frozen_its_startup_objects(
    nats_server: EmbeddedNats, tmp_path: Path, role: str
) -> None:
    worker = start_worker(role, nats_url=nats_server.url, log_dir=tmp_path)
    try:

        def frozen() -> float:
            found = metrics.find(metrics.parse(_metrics(worker)), "qtrader_gc_frozen_objects")
            return found or 0.0

        await eventually(lambda: frozen() > 0, timeout_s=30, what="the freeze", worker=worker)
        assert frozen() >= AT_LEAST
    finally:
        worker.stop()


def _metrics(worker: Worker) -> str:
    return worker.get("/metrics").text
