"""Reading a worker from the outside: the total of a metric family over its labels.

``Rig.metric`` reads one sample; a family spread over labels (candles per symbol, order updates
per status) is summed here. Both read the worker's own HTTP endpoints, which stay up while NATS
is down, so a scenario can watch a worker through a broker outage.
"""

from __future__ import annotations

from qtrader_tools.processes import Child
from qtrader_tools.stress.harness import Rig


async def family_total(rig: Rig, worker: Child, name: str) -> float:
    """The sum of every sample of the metric family ``name`` (0.0 when it has none yet)."""
    text = (await rig.http.get(worker.metrics_url)).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def labelled(rig: Rig, worker: Child, name: str) -> dict[str, float]:
    """Every sample of the family ``name`` by its label text (``reason="halted"``)."""
    text = (await rig.http.get(worker.metrics_url)).text
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1 :].rsplit(" ", 1)
            samples[labels.rstrip("}")] = float(value)
    return samples
