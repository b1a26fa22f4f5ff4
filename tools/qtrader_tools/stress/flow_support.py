"""Helpers of the order-flow scenarios (signal flood, exchange instability): scraping a worker's
``/metrics`` into histograms and totals, and the candles a scenario feeds as the market.

A Prometheus histogram is a set of cumulative counters, so the histogram of what happened
between two scrapes is the difference of the two (``Histogram.minus``), and a quantile is
bounded by the bucket that holds its rank: ``quantile`` returns that bucket's upper edge, an
upper bound of the true figure (never an optimistic interpolation).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal

from prometheus_client.parser import text_string_to_metric_families

from qtrader.contracts.messages import Candle
from qtrader_tools.candles import flat_candle
from qtrader_tools.processes import Child
from qtrader_tools.stress.harness import Rig

CANDLE_EPOCH_MS = 1_700_000_000_000


@dataclass(frozen=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


@dataclass(frozen=True)
class Histogram:
    """Cumulative counts per upper bound (``+Inf`` last), the count and the sum."""

    buckets: tuple[tuple[float, float], ...]
    count: float
    total: float

    def minus(self, earlier: Histogram) -> Histogram:
        """What was observed after ``earlier`` (a scrape of the same histogram) was taken."""
        before = dict(earlier.buckets)
        return Histogram(
            buckets=tuple((le, n - before.get(le, 0.0)) for le, n in self.buckets),
            count=self.count - earlier.count,
            total=self.total - earlier.total,
        )

    def quantile(self, q: float) -> float | None:
        """An upper bound of the ``q`` quantile (0-1): the upper edge of the bucket holding the
        observation of that rank; None without observations, inf past the last finite edge."""
        if not 0 < q <= 1:
            raise ValueError(f"q must be in (0, 1], got {q}")
        if self.count <= 0:
            return None
        rank = math.ceil(q * self.count)
        for le, cumulative in self.buckets:
            if cumulative >= rank:
                return le
        return math.inf

    def above(self, edge: float) -> float:
        """How many observations were greater than ``edge`` (which must be a bucket edge)."""
        counts = dict(self.buckets)
        if edge not in counts:
            raise ValueError(f"{edge} is not a bucket edge of this histogram: {sorted(counts)}")
        return self.count - counts[edge]

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count > 0 else None


EMPTY = Histogram(buckets=(), count=0.0, total=0.0)


async def scrape(rig: Rig, worker: Child) -> list[Sample]:
    """Every sample of a worker's ``/metrics`` (families flattened)."""
    text = (await rig.http.get(worker.metrics_url)).text
    return [
        Sample(sample.name, dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def _matches(sample: Sample, name: str, labels: Mapping[str, str]) -> bool:
    return sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())


def total(samples: Iterable[Sample], name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` carrying ``labels`` (0.0 when there is none)."""
    return sum(s.value for s in samples if _matches(s, name, labels))


def histogram(samples: Iterable[Sample], name: str, **labels: str) -> Histogram:
    """The histogram ``name`` (its ``_bucket``, ``_count`` and ``_sum`` samples) for ``labels``;
    ``EMPTY`` when the worker has not observed anything with those labels yet."""
    listed = list(samples)
    buckets = sorted(
        (float(s.labels["le"]), s.value) for s in listed if _matches(s, f"{name}_bucket", labels)
    )
    if not buckets:
        return EMPTY
    return Histogram(
        buckets=tuple(buckets),
        count=total(listed, f"{name}_count", **labels),
        total=total(listed, f"{name}_sum", **labels),
    )


def overall_status(health: Mapping[str, object]) -> str:
    """The ``status`` of a ``/health`` body (OK, DEGRADED or CRITICAL)."""
    return str(health.get("status", "UNKNOWN"))


def candle(symbol: str, price: Decimal, index: int) -> Candle:
    """The ``index``-th closed 1m candle of a flat bar at ``price``."""
    return flat_candle(symbol, price, open_time_ms=CANDLE_EPOCH_MS + index * 60_000)


def now_ms() -> int:
    return int(time.time() * 1000)
