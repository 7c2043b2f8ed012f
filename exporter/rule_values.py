"""The value of a threshold alert row, computed from scraped samples as Prometheus computes it.

The threshold rows of exporter/generate/alerts.py say everything their rules say
(metric, matchers, rate window, ratio, quantile, `sum by`, scale, comparison); this
module evaluates them the way Prometheus 2.42 evaluates the generated expressions,
so the in-process engine and Prometheus see the same numbers:

- a scrape's samples get the target labels (job, instance) as Prometheus's scrape
  gives them (a clashing scraped label becomes exported_<name>, honor_labels false);
- counters the rate rows read are kept per series in a ring buffer for their
  longest window, like the TSDB's samples under a range selector (both ends of
  [t - window, t] included, as in Prometheus 2.x);
- `rate()` is Prometheus's extrapolatedRate (counter resets, extrapolation to the
  range boundaries, no extrapolation below zero), `histogram_quantile()` its
  bucketQuantile, `sum by (cluster, namespace, instance)` a sum per group with only
  the non-empty grouping labels kept;
- a ratio is `(rate(failed) or rate(all) * 0) / rate(all)`, as its recording rule.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from prometheus_client.core import Metric

from exporter.config import parse_duration
from exporter.generate.alerts import Alert, recording_of
from exporter.generate.promql import BY

GROUP_BY = tuple(label.strip() for label in BY.split(","))
Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs: a series' identity
_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*')


@dataclass(frozen=True)
class Matcher:
    name: str
    op: str
    value: str

    def matches(self, labels: Mapping[str, str]) -> bool:
        have = labels.get(self.name, "")
        if self.op == "=":
            return have == self.value
        if self.op == "!=":
            return have != self.value
        found = _regex(self.value).fullmatch(have) is not None  # PromQL anchors regexes
        return found if self.op == "=~" else not found


@cache
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


@cache
def parse_matchers(text: str) -> tuple[Matcher, ...]:
    """`state="established", code=~"5.."` as matchers; raises ValueError on anything else."""
    matchers, pos = [], 0
    while pos < len(text):
        match = _MATCHER.match(text, pos)
        if match is None:
            raise ValueError(f"bad label matchers: {text!r}")
        value = re.sub(r"\\(.)", r"\1", match.group(3))
        matchers.append(Matcher(match.group(1), match.group(2), value))
        pos = match.end()
        if pos < len(text):
            if text[pos] != ",":
                raise ValueError(f"bad label matchers: {text!r}")
            pos += 1
    for matcher in matchers:
        if matcher.op in ("=~", "!~"):
            _regex(matcher.value)  # a bad regex raises re.error, a ValueError
    return tuple(matchers)


class Samples:
    """One scrape's samples by name, each with the target labels, as Prometheus stores them."""

    def __init__(self, families: Iterable[Metric], target_labels: Mapping[str, str]):
        self.by_name: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in families:
            for sample in family.samples:
                labels = dict(sample.labels)
                for name, value in target_labels.items():
                    if name in labels:
                        labels["exported_" + name] = labels[name]
                    labels[name] = value
                self.by_name.setdefault(sample.name, []).append((labels, float(sample.value)))

    def select(self, name: str, matchers: tuple[Matcher, ...] = ()
               ) -> list[tuple[dict[str, str], float]]:
        """name{matchers}, in the TSDB's order (sorted by labels)."""
        found = [(labels, value) for labels, value in self.by_name.get(name, ())
                 if all(m.matches(labels) for m in matchers)]
        return sorted(found, key=lambda s: sorted(s[0].items()))


class CounterHistory:
    """The counter samples of the rate rows, per series, for their longest window."""

    def __init__(self) -> None:
        self.series: dict[str, dict[Labels, deque[tuple[int, float]]]] = {}

    def record(self, samples: Samples, names: Iterable[str], t_ms: int, keep_ms: int) -> None:
        for name in names:
            series = self.series.setdefault(name, {})
            for labels, value in samples.by_name.get(name, ()):
                key = tuple(sorted(labels.items()))
                points = series.get(key)
                if points is None:
                    points = series[key] = deque()
                if points and points[-1][0] >= t_ms:
                    continue  # one sample per timestamp
                points.append((t_ms, value))
        for series in self.series.values():
            for key in list(series):
                points = series[key]
                while points and points[0][0] < t_ms - keep_ms:
                    points.popleft()
                if not points:
                    del series[key]

    def dump(self) -> dict[str, list[Any]]:
        """The samples as JSON: name -> [[label pairs, [[t_ms, value], ...]], ...]."""
        return {name: [[list(key), list(points)] for key, points in series.items()]
                for name, series in self.series.items()}

    def load(self, data: Any) -> None:
        """Samples from dump() (a restart's: the counters it reads next start again from
        zero, which rate() takes as a reset, as Prometheus's TSDB holds both sides).
        ValueError or TypeError, and nothing loaded, when the data is not dump()'s."""
        loaded: dict[str, dict[Labels, deque[tuple[int, float]]]] = {}
        for name, series in dict(data).items():
            loaded[str(name)] = {
                tuple((str(k), str(v)) for k, v in key): deque(
                    (int(t), float(value)) for t, value in points)
                for key, points in series}
        self.series = loaded

    def rates(self, name: str, matchers: tuple[Matcher, ...], t_ms: int, window_s: float
              ) -> Iterator[tuple[dict[str, str], float]]:
        """rate(name{matchers}[window]) at t, per series (series with < 2 points left out),
        in the TSDB's order (sorted by labels)."""
        start = t_ms - round(window_s * 1000)
        for key, points in sorted(self.series.get(name, {}).items()):
            labels = dict(key)
            if not all(m.matches(labels) for m in matchers):
                continue
            window = [p for p in points if start <= p[0] <= t_ms]
            value = extrapolated_rate(window, start, t_ms, window_s)
            if value is not None:
                yield labels, value


def extrapolated_rate(points: list[tuple[int, float]], start_ms: int, end_ms: int,
                      range_s: float) -> float | None:
    """Prometheus 2.42's rate() of one counter series over [start, end] (ms timestamps)."""
    if len(points) < 2:
        return None
    first_t, first_v = points[0]
    last_t, last_v = points[-1]
    result = last_v - first_v
    previous = 0.0
    for _, value in points:
        if value < previous:  # a counter reset: the value before it was lost
            result += previous
        previous = value
    to_start = (first_t - start_ms) / 1000
    to_end = (end_ms - last_t) / 1000
    sampled = (last_t - first_t) / 1000
    average = sampled / (len(points) - 1)
    if result > 0 and first_v >= 0:
        to_zero = sampled * (first_v / result)  # a counter never was below zero
        if to_zero < to_start:
            to_start = to_zero
    threshold = average * 1.1
    extrapolate_to = sampled
    extrapolate_to += to_start if to_start < threshold else average / 2
    extrapolate_to += to_end if to_end < threshold else average / 2
    factor = extrapolate_to / sampled
    factor /= range_s
    return result * factor


def bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus 2.42's histogram_quantile over (upper bound, cumulative count) pairs."""
    if math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    ordered = sorted(buckets, key=lambda b: b[0])
    if not ordered or not math.isinf(ordered[-1][0]):
        return math.nan
    merged: list[list[float]] = []  # coalesce equal upper bounds
    for bound, count in ordered:
        if merged and merged[-1][0] == bound:
            merged[-1][1] += count
        else:
            merged.append([bound, count])
    highest = -math.inf  # ensure monotonic counts
    for bucket in merged:
        if bucket[1] > highest:
            highest = bucket[1]
        elif bucket[1] < highest:
            bucket[1] = highest
    if len(merged) < 2:
        return math.nan
    observations = merged[-1][1]
    if observations == 0:
        return math.nan
    rank = q * observations
    b = next((i for i in range(len(merged) - 1) if merged[i][1] >= rank), len(merged) - 1)
    if b == len(merged) - 1:
        return merged[-2][0]
    if b == 0 and merged[0][0] <= 0:
        return merged[0][0]
    start, end, count = 0.0, merged[b][0], merged[b][1]
    if b > 0:
        start = merged[b - 1][0]
        count -= merged[b - 1][1]
        rank -= merged[b - 1][1]
    return start + (end - start) * (rank / count)


def _group(labels: Mapping[str, str], extra: tuple[str, ...] = ()) -> Labels:
    """The `sum by (cluster, namespace, instance[, extra])` group of a series: only the
    non-empty labels, as Prometheus drops empty ones."""
    return tuple((n, labels[n]) for n in (*GROUP_BY, *extra) if labels.get(n, ""))


def _sum_by(series: Iterable[tuple[dict[str, str], float]], extra: tuple[str, ...] = ()
            ) -> dict[Labels, float]:
    sums: dict[Labels, float] = {}
    for labels, value in series:
        key = _group(labels, extra)
        sums[key] = sums.get(key, 0.0) + value
    return sums


def windows(alert: Alert) -> dict[str, float]:
    """The counter sample names a row rates, with its window in seconds."""
    if not alert.rate:
        return {}
    name = f"{alert.metric}_bucket" if alert.quantile else alert.metric
    return {name: parse_duration(alert.rate)}


def row_values(alert: Alert, samples: Samples, history: CounterHistory, t_ms: int
               ) -> list[tuple[dict[str, str], float]]:
    """The row's value per output series at t (before the comparison): the labels the alert
    takes from its expression, and the value Prometheus would compute."""
    matchers = parse_matchers(alert.matchers)
    out: list[tuple[dict[str, str], float]]
    if alert.rate:
        window = next(iter(windows(alert).values()))
        record_labels = dict(recording_of(alert).labels)
        if alert.quantile:
            rates = _sum_by(history.rates(f"{alert.metric}_bucket", matchers, t_ms, window),
                            ("le",))
            groups: dict[Labels, list[tuple[float, float]]] = {}
            for key, value in rates.items():
                group = tuple(p for p in key if p[0] != "le")
                try:
                    bound = float(dict(key)["le"])
                except (KeyError, ValueError):
                    continue
                groups.setdefault(group, []).append((bound, value))
            values = {k: bucket_quantile(alert.quantile, b) for k, b in groups.items()}
        elif alert.ratio:
            total = _sum_by(history.rates(alert.metric, matchers, t_ms, window))
            failed = _sum_by(history.rates(alert.metric, matchers + parse_matchers(alert.ratio),
                                           t_ms, window))
            values = {k: _divide(failed.get(k, v * 0), v) for k, v in total.items()}
        else:
            values = _sum_by(history.rates(alert.metric, matchers, t_ms, window))
        out = [({**dict(k), **record_labels}, v) for k, v in values.items()]
    else:
        selected = samples.select(alert.metric, matchers)
        out = [(dict(k), v) for k, v in _sum_by(selected).items()] if alert.total else selected
        if alert.until:
            now = t_ms / 1000
            out = [(labels, value - now) for labels, value in out]
    return [(labels, scaled(alert, value)) for labels, value in out]


def _divide(a: float, b: float) -> float:
    """IEEE division as PromQL does it: x/0 is ±Inf, 0/0 NaN."""
    try:
        return a / b
    except ZeroDivisionError:
        return math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a)


def scaled(alert: Alert, value: float) -> float:
    """The value in the threshold's unit, with the operation the rule writes (* 100, / 86400)."""
    if alert.scale > 1:
        return value * alert.scale
    if alert.scale < 1:
        return value / round(1 / alert.scale)
    return value


def compare(op: str, value: float, threshold: float) -> bool:
    if op == ">":
        return value > threshold
    if op == "<":
        return value < threshold
    if op == ">=":
        return value >= threshold
    return value <= threshold
