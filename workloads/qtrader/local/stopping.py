"""Stopping child processes, the one way everything here does it.

SIGTERM (or SIGKILL when asked) to every process at once, then one grace period for all of
them, then SIGKILL for whatever still runs, and a wait for each so none is left a zombie. One
deadline for the group, not one per process: stopping four workloads takes one grace period at
most, not four. ``qtrader up`` and the embedded nats-server stop their processes with it, and so
do the tooling's process groups and the tests' workers.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterable
from typing import Any


def stop_processes(
    processes: Iterable[subprocess.Popen[Any]], *, grace_s: float, kill: bool = False
) -> None:
    """Stop ``processes``: SIGTERM (SIGKILL with ``kill``), SIGKILL after ``grace_s``."""
    group = list(processes)
    for process in group:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in group:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
