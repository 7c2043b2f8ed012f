"""Collectors: one file per source, registered in one table (node_exporter's collector/).

A collector is a small object with a `name` and a `collect()` that yields fresh
metric families built from the catalogue. The framework (`Scrape`) times every
collector, emits a3mailer_exporter_collector_{duration_seconds,success}, and
isolates failures: one collector raising never fails the scrape. Each run is also
a sample for the performance monitor and a span (`collector <name>`, a child of
the /metrics request's span).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from prometheus_client.core import Metric

from exporter import catalogue, tracing
from exporter.collectors.process import ProcessCollector
from exporter.collectors.system import SystemCollector

log = logging.getLogger(__name__)


class Collector(Protocol):
    name: str

    def collect(self) -> Iterable[Metric]: ...


# monitoring.collectors.<name> -> factory taking the monitoring config section.
# Defaults (on/off) live in the config schema.
COLLECTORS: dict[str, Callable[[dict[str, Any]], Collector]] = {
    "system": SystemCollector,
    "process": ProcessCollector,
}


def enabled_collectors(monitoring: dict[str, Any]) -> list[Collector]:
    """The configurable collectors switched on in monitoring.collectors."""
    if not monitoring["enabled"]:
        return []
    switches = monitoring["collectors"]
    return [factory(monitoring) for name, factory in COLLECTORS.items() if switches.get(name)]


class Scrape:
    """What /metrics serves: every collector, timed and isolated, in a fixed order.

    Implements prometheus_client's collector interface so a CollectorRegistry
    (and generate_latest, in the benchmark) can read it too.
    """

    def __init__(self, collectors: Iterable[Collector] = ()):
        self.collectors: list[Collector] = list(collectors)

    def collect(self) -> Iterator[Metric]:
        duration = catalogue.family("a3mailer_exporter_collector_duration_seconds")
        success = catalogue.family("a3mailer_exporter_collector_success")
        for collector in self.collectors:
            start = time.perf_counter()
            with tracing.observe("collector", collector.name, f"collector {collector.name}",
                                 attributes={"a3mailer.collector": collector.name}) as run:
                try:
                    families = list(collector.collect())
                    ok = 1.0
                except Exception as exc:
                    log.exception("collector failed", extra={"collector": collector.name})
                    families, ok = [], 0.0
                    run.fail(type(exc).__name__)
            duration.add_metric([collector.name], time.perf_counter() - start)
            success.add_metric([collector.name], ok)
            yield from families
        yield duration
        yield success

    def describe(self) -> list[Metric]:
        return []
