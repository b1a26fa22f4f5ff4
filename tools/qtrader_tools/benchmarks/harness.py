"""What every benchmark shares: its failure, its percentile, and the way a run ends.

A run ends the same way in every benchmark, because ``qtrader bench all`` and the tests read it:
the table, then the figures as one JSON object on the last line (also written to ``--json``),
then, if a correctness figure does not hold, one line on stderr saying why and exit code 1.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import httpx

from qtrader_tools.processes import Child, Children

Result = dict[str, Any]


class BenchFailure(Exception):
    """The benchmark could not produce its figures (a process died, an answer never came)."""


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ms(seconds: float) -> float:
    """Seconds as milliseconds, to the microsecond."""
    return round(seconds * 1000, 3)


def sigterm_as_interrupt(signum: int, frame: FrameType | None) -> None:
    """A SIGTERM handler: unwind like Ctrl-C, so every process a benchmark started is stopped
    on the way out."""
    raise KeyboardInterrupt


def publish(table: str, result: Mapping[str, Any], *, json_path: Path | None, out: TextIO) -> None:
    """The table, then ``result`` as one JSON line; also written to ``json_path``."""
    line = json.dumps(result)
    if json_path is not None:
        json_path.write_text(line + "\n")
    out.write(table + "\n" + line + "\n")
    out.flush()


def report(
    name: str,
    result: Result,
    *,
    render: Callable[[Result], str],
    verdict: Callable[[Result], str | None],
    json_path: Path | None,
    out: TextIO,
) -> int:
    """Publish ``result``; the exit code of ``qtrader bench NAME``: 1 with the reason on stderr
    when ``verdict`` finds one, else 0."""
    publish(render(result), result, json_path=json_path, out=out)
    failure = verdict(result)
    if failure:
        print(f"qtrader bench {name}: {failure}", file=sys.stderr)
    return 1 if failure else 0


async def wait_healthy(
    client: httpx.AsyncClient, workloads: Sequence[Child], children: Children, *, timeout_s: float
) -> None:
    """Until every workload answers ``/healthz``; ``BenchFailure`` after ``timeout_s``, and
    ``ChildExited`` as soon as one of the benchmark's processes has died."""
    deadline = time.monotonic() + timeout_s
    waiting = list(workloads)
    while waiting:
        children.check_alive()
        if time.monotonic() > deadline:
            names = [c.name for c in waiting]
            raise BenchFailure(f"not healthy after {timeout_s:g}s: {names}")
        waiting = [c for c in waiting if not await _healthy(client, c)]
        if waiting:
            await asyncio.sleep(0.1)


async def _healthy(client: httpx.AsyncClient, child: Child) -> bool:
    try:
        response = await client.get(f"{child.base_url}/healthz")
    except httpx.HTTPError:
        return False
    return response.status_code == 200
