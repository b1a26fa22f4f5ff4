"""The simulator as a process of its own (its CLI), for tests, benchmarks and stress scenarios.

A separate process serves several worker processes at once and keeps the simulator's work off
the caller's event loop. ``sim_process`` writes the config to a JSON file, starts
``python -m qtrader_tools.simulators.binance_futures --port 0``, reads the one ``listening on URL``
line and yields the URL; leaving the ``with`` block stops it (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qtrader.local.stopping import stop_processes

STOP_GRACE_S = 10.0


class SimProcessError(RuntimeError):
    """The simulator process did not start (its stderr is in ``sim.log`` of the work dir)."""


@contextmanager
def sim_process(config: Mapping[str, Any], work_dir: Path) -> Iterator[str]:
    """The simulator's CLI in its own process with ``config`` (SimConfig fields); yields its URL."""
    work_dir.mkdir(parents=True, exist_ok=True)
    config_path = work_dir / "sim-config.json"
    config_path.write_text(json.dumps(dict(config)))
    log_path = work_dir / "sim.log"
    command = [sys.executable, "-m", "qtrader_tools.simulators.binance_futures"]
    command += ["--port", "0", "--config", str(config_path)]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()  # "" if it exited first
        if not line.startswith("listening on "):
            raise SimProcessError(f"simulator did not start: {line!r}; see {log_path}")
        yield line.removeprefix("listening on ")
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[str]) -> None:
    stop_processes([process], grace_s=STOP_GRACE_S)
    if process.stdout is not None:
        process.stdout.close()
