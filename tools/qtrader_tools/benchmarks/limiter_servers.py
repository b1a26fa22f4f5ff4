"""The flood processes ``qtrader bench limiter`` starts, each a ``limiter_flood`` of its own.

They start together in the benchmark's temporary directory and are stopped by their process ids
when the run ends, also on failure or Ctrl-C (``stop_processes``). The redis-server and the
simulator the floods hit are the tooling's own (``qtrader_tools.redis_server``, the simulator's
``process.sim_process``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qtrader.local.stopping import stop_processes
from qtrader_tools.processes import tail

STOP_GRACE_S = 5.0


class ServerError(RuntimeError):
    """A flood process failed, printed no summary or ran out of time."""


def run_floods(
    url: str,
    redis_url: str | None,
    *,
    requests: int,
    seeds: Sequence[int],
    work_dir: Path,
    timeout_s: float,
) -> list[dict[str, Any]]:
    """One ``limiter_flood`` process per seed, all at once; their JSON summaries, in seed order.

    Raises ``ServerError`` when one exits non-zero, prints no summary or runs out of time.
    """
    processes: list[tuple[subprocess.Popen[str], Path]] = []
    try:
        for seed in seeds:
            command = [
                sys.executable, "-m", "qtrader_tools.benchmarks.limiter_flood",
                "--url", url, "--requests", str(requests), "--seed", str(seed),
                "--replicas", str(len(seeds)),
            ]  # fmt: skip
            if redis_url is not None:
                command += ["--redis-url", redis_url]
            log_path = work_dir / f"flood-{seed}.log"
            with log_path.open("w") as log_file:
                process = subprocess.Popen(
                    command, stdout=subprocess.PIPE, stderr=log_file, text=True
                )
            processes.append((process, log_path))
        deadline = time.monotonic() + timeout_s
        return [_summary(p, log, deadline) for p, log in processes]
    finally:
        for process, _ in processes:
            stop_processes([process], grace_s=STOP_GRACE_S)
            if process.stdout is not None:
                process.stdout.close()


def _summary(process: subprocess.Popen[str], log_path: Path, deadline: float) -> dict[str, Any]:
    try:
        out, _ = process.communicate(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise ServerError(f"a flood process ran out of time; see {log_path}") from None
    lines = out.strip().splitlines()
    if process.returncode != 0 or not lines:
        last = lines[-1] if lines else "(no output)"
        raise ServerError(f"a flood process exited {process.returncode}: {last}\n{tail(log_path)}")
    summary: dict[str, Any] = json.loads(lines[-1])
    return summary
