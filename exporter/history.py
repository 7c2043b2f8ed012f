"""The monitoring history (the seed's MonitoringManager with retention).

A ring buffer of system snapshots and health statuses taken every
collection_interval and kept for retention_period, never more than
history_max_entries (about 1.5 KiB each: 10,000 entries stay under 16 MiB).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import Metric

from exporter import catalogue


class History:
    def __init__(self, retention: float, interval: float, max_entries: int):
        self._entries: deque[dict[str, Any]] = deque()
        self.configure(retention, interval, max_entries)

    def configure(self, retention: float, interval: float, max_entries: int) -> None:
        self.retention = retention
        self.interval = interval
        self.capacity = max(1, min(max_entries, math.ceil(retention / interval) + 1))
        self._entries = deque(self._entries, maxlen=self.capacity)

    def add(self, entry: dict[str, Any], now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._entries.append({"timestamp": now, **entry})
        cutoff = now - self.retention
        while self._entries and self._entries[0]["timestamp"] < cutoff:
            self._entries.popleft()

    def query(self, start: float | None = None, end: float | None = None,
              limit: int | None = None) -> list[dict[str, Any]]:
        """Entries with start <= timestamp <= end, oldest first; with limit, the newest ones."""
        out = [e for e in self._entries
               if (start is None or e["timestamp"] >= start)
               and (end is None or e["timestamp"] <= end)]
        return out[-limit:] if limit else out

    def __len__(self) -> int:
        return len(self._entries)

    def collect(self) -> Iterator[Metric]:
        yield catalogue.single("a3mailer_monitoring_history_entries", len(self._entries))
