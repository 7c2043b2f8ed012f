"""The exporter's own process_* metrics (CPU, memory, file descriptors, start time)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client.core import Metric
from prometheus_client.process_collector import ProcessCollector as _ClientProcessCollector


class ProcessCollector:
    """Delegates to prometheus_client's Linux /proc reader: the standard names dashboards know."""

    name = "process"

    def __init__(self, monitoring: dict[str, Any] | None = None):
        self._inner = _ClientProcessCollector(registry=None)

    def collect(self) -> Iterable[Metric]:
        return self._inner.collect()
