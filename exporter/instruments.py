"""Counters and histograms for the exporter's own hot paths.

Recording is a dict update on the event-loop thread, with no lock and no
per-child object (prometheus_client's Counter takes a lock and a label lookup
per call); a scrape copies the dict and builds catalogued families. Record from
one thread only: the event loop. benchmarks/bench_record.py measures the cost.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.core import Exemplar, Metric

from exporter import catalogue

# Prometheus client default buckets, in seconds: suited to request latencies.
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


class CounterVec:
    """A catalogued counter, one value per label tuple."""

    def __init__(self, name: str):
        self.spec = catalogue.METRICS[name]
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, labels: tuple[str, ...] = (), amount: float = 1.0) -> None:
        values = self._values
        values[labels] = values.get(labels, 0.0) + amount

    def value(self, labels: tuple[str, ...] = ()) -> float:
        return self._values.get(labels, 0.0)

    def collect(self) -> Iterator[Metric]:
        fam = catalogue.family(self.spec.name)
        for labels, value in tuple(self._values.items()):
            fam.add_metric(list(labels), value)
        yield fam


class HistogramVec:
    """A catalogued histogram, one set of bucket counts per label tuple.

    An observation given a trace id becomes its bucket's exemplar (the latest one
    wins), which the OpenMetrics output shows as `# {trace_id="..."} value time`.
    """

    def __init__(self, name: str, buckets: Sequence[float] = DEFAULT_BUCKETS):
        self.spec = catalogue.METRICS[name]
        self.bounds = tuple(sorted(buckets))
        # label tuple -> [count per bucket (non-cumulative, last is +Inf)..., sum] and,
        # once an observation came with a trace id, [per bucket: (trace id, value, Unix
        # time) or None]
        self._series: dict[tuple[str, ...], list[Any]] = {}

    def observe(self, labels: tuple[str, ...], value: float,
                trace_id: str | None = None) -> None:
        self.observe_into(self.series(labels), value, trace_id)

    def series(self, labels: tuple[str, ...]) -> list[Any]:
        """The label tuple's series, created when new: [count per bucket..., sum], with the
        bucket exemplars in a list appended once the first arrives."""
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = [0.0] * (len(self.bounds) + 2)
        return series

    def observe_into(self, series: list[Any], value: float, trace_id: str | None = None
                     ) -> None:
        """observe() on a series already looked up (the performance monitor keeps it)."""
        index = bisect_left(self.bounds, value)
        series[index] += 1
        series[len(self.bounds) + 1] += value
        if trace_id is not None:
            if len(series) == len(self.bounds) + 2:
                series.append([None] * (len(self.bounds) + 1))
            series[-1][index] = (trace_id, value, time.time())

    def collect(self) -> Iterator[Metric]:
        fam = catalogue.family(self.spec.name)
        bounds = [*(repr(float(b)) for b in self.bounds), "+Inf"]
        size = len(self.bounds) + 1
        for labels, series in tuple(self._series.items()):
            counts = series[:size]
            exemplars = series[size + 1] if len(series) > size + 1 else [None] * size
            cumulative: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
            running = 0.0
            for bound, count, exemplar in zip(bounds, counts, exemplars, strict=True):
                running += count
                if exemplar is None:
                    cumulative.append((bound, running))
                else:
                    trace_id, value, stamp = exemplar
                    cumulative.append((bound, running,
                                       Exemplar({"trace_id": trace_id}, value, stamp)))
            fam.add_metric(list(labels), cumulative, series[size])
        yield fam
