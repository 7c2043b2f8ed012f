"""PerformanceMonitor: sliding-window latency, rate and error statistics for every engine.

Every instrumented operation (exporter/tracing.py `observe`) records one sample:
its path (what kind of work), its operation (which one, a bounded name), its
duration, whether it failed and, when its span was sampled, the trace id.

Paths (`PATHS`), the operation names on each, and the histogram that holds
their latencies with the trace id of a sampled sample as its bucket's exemplar:
- http: the route template (label handler),
  a3mailer_exporter_http_request_duration_seconds;
- security: check and report; the engine keeps its own histogram of checks
  (a3mailer_security_decision_duration_seconds, no exemplars);
- store: the store method (login_state, record_login_failure, ...),
  a3mailer_security_store_operation_duration_seconds;
- collector: the collector's name, a3mailer_exporter_collector_run_duration_seconds;
- schedule: the Periodic's name (probe-<name>, delivery-roundtrip, dns, dnsbl,
  queue-*, stalwart), a3mailer_exporter_schedule_run_duration_seconds.

Windows: 1m, 5m and 15m, from a ring of 10-second slots. Each slot holds, per
(path, operation), the count, the errors, the sum and a sparse log-scale bucket
map (DDSketch's mapping): bucket i holds values in (gamma^(i-1), gamma^i] with
gamma = (1 + a) / (1 - a), and a quantile is answered with the bucket's
2 gamma^i / (gamma + 1), which is within a = RELATIVE_ERROR (2 %) of the true
nearest-rank quantile of the samples in the window. Values are clamped to
[1 us, 1 h], so a slot holds at most 551 buckets per operation; the ring keeps 91
slots; operations are capped at MAX_OPERATIONS (more go to "other"), so memory
is bounded whatever the traffic. Rates divide by the seconds the window really
covers (from 50 to 60 s for 1m, as the current slot fills; less right after start).

Windows are read by GET /api/v1/performance, by the gauges below (per path) and
by whatever evaluates thresholds (`stats()`: error rate, p95/p99 per path or per
operation), never by reaching into the slots.

Recording takes no lock: it runs on the event loop, and from the scrape's worker
thread for collector and store samples; a thread switch in the middle of one
record can, rarely, lose that one sample's count. benchmarks/bench_tracing.py
measures the cost per sample against prometheus_client's Histogram.observe().
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client.core import Metric

from exporter import catalogue
from exporter.instruments import HistogramVec

RELATIVE_ERROR = 0.02
GAMMA = (1 + RELATIVE_ERROR) / (1 - RELATIVE_ERROR)
_INV_LOG_GAMMA = 1.0 / math.log(GAMMA)
MIN_SECONDS, MAX_SECONDS = 1e-6, 3600.0
_MIN_INDEX = math.ceil(math.log(MIN_SECONDS) * _INV_LOG_GAMMA)
_MAX_INDEX = math.ceil(math.log(MAX_SECONDS) * _INV_LOG_GAMMA)

SLOT_SECONDS = 10
WINDOWS = {"1m": 60, "5m": 300, "15m": 900}
_SLOTS = max(WINDOWS.values()) // SLOT_SECONDS  # sealed slots kept beside the current one
QUANTILES = (0.5, 0.95, 0.99)
MAX_OPERATIONS = 1000
OTHER = "other"

# Histogram buckets (seconds) suited to each path, documented in the README.
# HTTP: the Dovecot policy answers in well under a millisecond, a scrape takes
# milliseconds, an admin call or a reload up to seconds.
HTTP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                5.0, 10.0)
# Store calls: 1-10 microseconds in memory (memory, SQLite's cache: a review found 98 % of
# login_state calls under 10 µs), about 0.1-1 ms to Redis, milliseconds when SQLite
# writes through.
STORE_BUCKETS = (0.000001, 0.0000025, 0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025,
                 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# Collectors: 10 µs (the custom, history and MFA ones) and 0.1 ms (process) to tens of ms
# (system, with many mounts and sockets).
COLLECTOR_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025,
                     0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Scheduled runs: a local probe takes milliseconds, a remote one or a DNSBL sweep
# seconds, a delivery round trip up to minutes.
SCHEDULE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0)


@dataclass(frozen=True)
class PathSpec:
    histogram: str | None  # the catalogued histogram this monitor records, if any
    buckets: tuple[float, ...] = ()
    about: str = ""
    # the path's histogram in /metrics when another part keeps it (the engine's, of checks)
    elsewhere: str | None = None

    @property
    def exposed(self) -> str | None:
        """The histogram that holds this path's latencies in /metrics, whoever keeps it."""
        return self.histogram or self.elsewhere


PATHS: dict[str, PathSpec] = {
    "http": PathSpec("a3mailer_exporter_http_request_duration_seconds", HTTP_BUCKETS,
                     "HTTP requests, by route template"),
    "security": PathSpec(None, (), "security engine decisions (check) and reports",
                         "a3mailer_security_decision_duration_seconds"),
    "store": PathSpec("a3mailer_security_store_operation_duration_seconds", STORE_BUCKETS,
                      "security store calls, by method"),
    "collector": PathSpec("a3mailer_exporter_collector_run_duration_seconds",
                          COLLECTOR_BUCKETS, "collector runs during a scrape"),
    "schedule": PathSpec("a3mailer_exporter_schedule_run_duration_seconds", SCHEDULE_BUCKETS,
                         "scheduled runs: probes, delivery round trip, DNS, DNSBL, queues"),
}


@dataclass(frozen=True)
class WindowStats:
    """One window's figures for an operation, a path (all its operations) or everything."""

    window: str
    covered_seconds: float  # how much time the window covers now
    count: int
    errors: int
    rate: float  # operations per second
    error_rate: float  # errors / count, 0..1 (0 with no samples)
    mean: float | None  # seconds; None with no samples
    p50: float | None
    p95: float | None
    p99: float | None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


Key = tuple[str, str]  # (path, operation)
# [count, errors, sum of seconds, {log bucket index: count}, HistogramVec, its series]
Cell = list[Any]


class _Merged:
    """Counts and log buckets summed over slots (and operations)."""

    __slots__ = ("buckets", "count", "errors", "total")

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.total = 0.0
        self.buckets: dict[int, int] = {}

    def add(self, cell: Cell) -> None:
        self.count += cell[0]
        self.errors += cell[1]
        self.total += cell[2]
        buckets = self.buckets
        # a copy taken in one C call: the loop thread may add a bucket to the current
        # slot's cell meanwhile (iterating the dict itself then raises RuntimeError)
        for index, n in tuple(cell[3].items()):
            buckets[index] = buckets.get(index, 0) + n

    def merge(self, other: _Merged) -> None:
        self.add([other.count, other.errors, other.total, other.buckets])

    def stats(self, window: str, seconds: float) -> WindowStats:
        count = self.count
        quantiles = quantiles_of(self.buckets, count, QUANTILES)
        return WindowStats(
            window=window, covered_seconds=round(seconds, 3), count=count, errors=self.errors,
            rate=count / seconds if seconds > 0 else 0.0,
            error_rate=self.errors / count if count else 0.0,
            mean=self.total / count if count else None,
            p50=quantiles[0], p95=quantiles[1], p99=quantiles[2])


def bucket_index(seconds: float) -> int:
    if seconds <= MIN_SECONDS:
        return _MIN_INDEX
    if seconds >= MAX_SECONDS:
        return _MAX_INDEX
    return math.ceil(math.log(seconds) * _INV_LOG_GAMMA)


def bucket_value(index: int) -> float:
    """The estimate for every value in bucket `index`: within RELATIVE_ERROR of each."""
    return 2.0 * GAMMA ** index / (GAMMA + 1.0)


def quantiles_of(buckets: dict[int, int], count: int,
                 qs: tuple[float, ...]) -> list[float | None]:
    """Nearest-rank quantiles (rank ceil(q * count)) from log buckets."""
    if not count:
        return [None] * len(qs)
    ranks = [max(1, math.ceil(q * count)) for q in qs]
    out: list[float | None] = [None] * len(qs)
    seen, want = 0, 0
    for index in sorted(buckets):
        seen += buckets[index]
        while want < len(ranks) and seen >= ranks[want]:
            out[want] = bucket_value(index)
            want += 1
        if want == len(ranks):
            break
    return out


class PerformanceMonitor:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._started = clock()
        now_slot = int(self._started // SLOT_SECONDS)
        self._current_no = now_slot
        self._slot_end = (now_slot + 1) * SLOT_SECONDS
        self._current: dict[Key, Cell] = {}
        self._sealed: deque[tuple[int, dict[Key, Cell]]] = deque()
        self._known: set[Key] = set()
        self._rotate_lock = threading.Lock()
        self.histograms: dict[str, HistogramVec] = {
            path: HistogramVec(spec.histogram, spec.buckets)
            for path, spec in PATHS.items() if spec.histogram is not None}

    # --- recording (the hot path)

    def record(self, path: str, operation: str, seconds: float, error: bool = False,
               trace_id: str | None = None) -> None:
        """One finished operation. trace_id (32 hex digits) becomes the histogram
        bucket's exemplar."""
        now = self._clock()
        if now >= self._slot_end:
            self._rotate(now)
        key = (path, operation)
        cell = self._current.get(key)
        if cell is None:
            if key not in self._known and not self._admit(key):
                self.record(path, OTHER, seconds, error, trace_id)
                return
            cell = self._current[key] = self._cell(path, operation)
        cell[0] += 1
        if error:
            cell[1] += 1
        cell[2] += seconds
        buckets = cell[3]
        # bucket_index(), inlined: this is the hot path
        if MIN_SECONDS < seconds < MAX_SECONDS:
            index = math.ceil(math.log(seconds) * _INV_LOG_GAMMA)
        else:
            index = _MIN_INDEX if seconds <= MIN_SECONDS else _MAX_INDEX
        buckets[index] = buckets.get(index, 0) + 1
        histogram = cell[4]
        if histogram is not None:
            histogram.observe_into(cell[5], seconds, trace_id)

    def _cell(self, path: str, operation: str) -> Cell:
        """A slot's new cell; it also holds the key's (cumulative) histogram series, so a
        record looks nothing else up."""
        histogram = self.histograms.get(path)
        series = histogram.series((operation,)) if histogram is not None else None
        return [0, 0, 0.0, {}, histogram, series]

    def _admit(self, key: Key) -> bool:
        if key[0] not in PATHS:
            raise ValueError(f"unknown performance path {key[0]!r}")
        if len(self._known) >= MAX_OPERATIONS and key[1] != OTHER:
            return False
        self._known.add(key)
        return True

    def _rotate(self, now: float) -> None:
        with self._rotate_lock:
            number = int(now // SLOT_SECONDS)
            if number <= self._current_no:
                return
            if self._current:
                self._sealed.append((self._current_no, self._current))
            oldest = number - _SLOTS
            while self._sealed and self._sealed[0][0] < oldest:
                self._sealed.popleft()
            self._current = {}
            self._current_no = number
            self._slot_end = (number + 1) * SLOT_SECONDS

    # --- reading

    def operations(self) -> list[Key]:
        return sorted(self._known)

    def _merged(self, select: Callable[[Key], str | None]
                ) -> dict[str, dict[str, _Merged]]:
        """Window name -> group -> merged figures, for the keys `select` maps to a group
        (None leaves a key out). One pass over the slots, newest first."""
        now = self._clock()
        if now >= self._slot_end:
            self._rotate(now)
        slots = [(self._current_no, dict(self._current)), *reversed(list(self._sealed))]
        out: dict[str, dict[str, _Merged]] = {window: {} for window in WINDOWS}
        groups: dict[Key, str | None] = {}
        for number, cells in slots:
            age = self._current_no - number  # slots back from the current one
            for key, cell in list(cells.items()):
                group = groups[key] if key in groups else groups.setdefault(key, select(key))
                if group is None:
                    continue
                for window, seconds in WINDOWS.items():
                    if age < seconds // SLOT_SECONDS:
                        merged = out[window].get(group)
                        if merged is None:
                            merged = out[window][group] = _Merged()
                        merged.add(cell)
        return out

    def covered(self, window: str) -> float:
        """Seconds the window spans now: its full slots plus the current slot so far, and
        never more than the monitor has run (at least 1 s, so a rate right after the
        start is not absurd)."""
        now = self._clock()
        span = WINDOWS[window] - SLOT_SECONDS + (now - self._current_no * SLOT_SECONDS)
        return max(1.0, min(span, now - self._started))

    def stats(self, window: str = "5m", path: str | None = None,
              operation: str | None = None) -> WindowStats:
        """One window over one operation, one path's operations, or everything."""
        if window not in WINDOWS:
            raise ValueError(f"unknown window {window!r}; one of {', '.join(WINDOWS)}")

        def select(key: Key) -> str | None:
            if path is not None and key[0] != path:
                return None
            if operation is not None and key[1] != operation:
                return None
            return "all"

        merged = self._merged(select)[window].get("all", _Merged())
        return merged.stats(window, self.covered(window))

    def snapshot(self, path: str | None = None) -> dict[str, object]:
        """The document GET /api/v1/performance serves."""
        if path is not None and path not in PATHS:
            raise ValueError(f"unknown path {path[:40]!r}; one of {', '.join(PATHS)}")
        keys = [key for key in self.operations() if path is None or key[0] == path]
        by_key = self._merged(lambda key: f"{key[0]}\0{key[1]}" if key in keys else None)
        by_path = self._merged(lambda key: key[0] if key in keys else None)
        covered = {window: self.covered(window) for window in WINDOWS}

        def windows(merged: dict[str, dict[str, _Merged]], group: str) -> dict[str, object]:
            return {window: merged[window].get(group, _Merged()).stats(window, covered[window])
                    .as_dict() for window in WINDOWS}

        return {
            "relative_error": RELATIVE_ERROR,
            "slot_seconds": SLOT_SECONDS,
            "windows": dict(WINDOWS),
            "paths": [{"path": name, "description": PATHS[name].about,
                       "histogram": PATHS[name].exposed,
                       "windows": windows(by_path, name)}
                      for name in PATHS if path is None or name == path],
            "operations": [{"path": p, "operation": op, "windows": windows(by_key, f"{p}\0{op}")}
                           for p, op in keys],
        }

    def collect(self) -> Iterator[Metric]:
        """The path histograms, and each path's windows as gauges."""
        for histogram in self.histograms.values():
            yield from histogram.collect()
        merged = self._merged(lambda key: key[0])
        rate = catalogue.family("a3mailer_performance_operations_per_second")
        errors = catalogue.family("a3mailer_performance_error_ratio")
        latency = catalogue.family("a3mailer_performance_latency_seconds")
        paths = sorted({key[0] for key in self._known})
        for window in WINDOWS:
            seconds = self.covered(window)
            for path in paths:
                stats = merged[window].get(path, _Merged()).stats(window, seconds)
                rate.add_metric([path, window], stats.rate)
                errors.add_metric([path, window], stats.error_rate)
                for q, value in zip(QUANTILES, (stats.p50, stats.p95, stats.p99), strict=True):
                    if value is not None:  # "percentile": promtool keeps "quantile" for summaries
                        latency.add_metric([path, window, f"{q * 100:g}"], value)
        yield from (rate, errors, latency)
