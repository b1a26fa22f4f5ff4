"""Reading a worker from the outside: the total of a metric family over its labels.

``Rig.metric`` reads one sample; a family spread over labels (candles per symbol, order updates
per status) is summed here. Both read the worker's own HTTP endpoints, which stay up while NATS
is down, so a scenario can watch a worker through a broker outage.
"""

from __future__ import annotations

from qtrader_tools import metrics
from qtrader_tools.processes import Child
from qtrader_tools.stress.harness import Rig


async def family_total(rig: Rig, worker: Child, name: str) -> float:
    """The sum of every sample of the metric family ``name`` (0.0 when it has none yet)."""
    return metrics.total(await rig.scrape(worker), name)


async def labelled(rig: Rig, worker: Child, name: str) -> dict[str, float]:
    """Every sample of the family ``name`` by its label text (``reason="halted"``)."""
    return metrics.labelled(await rig.scrape(worker), name)
