"""Reading a process's ``/metrics`` page (the Prometheus text format), one way for the tooling
and the tests: a stress scenario, a benchmark or a test reads a worker from the outside.

``parse`` flattens the families into samples with prometheus_client's own parser, so labels are
read as the server wrote them. ``value`` is the one sample with exactly the labels given;
``total`` sums the samples of a name over every label set that includes the labels given;
``histogram`` rebuilds a histogram. A sample that is not exported (yet) reads as 0.0: a counter
nothing has incremented has no labelled sample.

A Prometheus histogram is a set of cumulative counters, so the histogram of what happened
between two scrapes is the difference of the two (``Histogram.minus``), and a quantile is
bounded by the bucket that holds its rank: ``quantile`` returns that bucket's upper edge, an
upper bound of the true figure (never an optimistic interpolation).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float

    @property
    def label_text(self) -> str:
        """The labels as the page writes them: ``consumer="x",reason="y"``."""
        return ",".join(f'{key}="{value}"' for key, value in self.labels.items())


def parse(text: str) -> list[Sample]:
    """Every sample of a ``/metrics`` page, the families flattened."""
    return [
        Sample(sample.name, dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def find(samples: Iterable[Sample], name: str, **labels: str) -> float | None:
    """The sample ``name`` with exactly ``labels`` (no more, no fewer); None when absent."""
    if "{" in name:  # the text form, 'name{label="x"}', would never match: say so, not 0.0
        raise ValueError(f"a sample name without labels, the labels as keywords: {name!r}")
    for sample in samples:
        if sample.name == name and sample.labels == labels:
            return sample.value
    return None


def value(samples: Iterable[Sample], name: str, **labels: str) -> float:
    """``find``, reading an absent sample as 0.0 (a counter nothing has incremented yet)."""
    found = find(samples, name, **labels)
    return 0.0 if found is None else found


def labelled(samples: Iterable[Sample], name: str) -> dict[str, float]:
    """Every labelled sample ``name`` by its label text (``reason="halted"``)."""
    return {s.label_text: s.value for s in samples if s.name == name and s.labels}


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
