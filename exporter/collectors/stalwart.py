"""Stalwart / A3Mailer: its Prometheus metrics re-exported, its HTTP API, its readiness.

Stalwart serves GET /metrics/prometheus (optional Basic auth) with one series per
event or metric id, named after the id with every non-alphanumeric turned into
`_`, no prefix, no labels and no `_total` (`auth_success`, `smtp_request_time`).
A series appears only after its first event. A `Periodic` fetches and converts
that page every monitoring.stalwart.interval; the scrape reads the last result.

How a Stalwart family becomes ours (`exported_name`):

| Stalwart TYPE | exported as | values |
| --- | --- | --- |
| counter | `a3mailer_stalwart_<name>_total` (a trailing `_total` is not doubled) | as is |
| gauge | `a3mailer_stalwart_<name>`, plus `_bytes` for the byte gauges in UNITS | as is |
| histogram in milliseconds | `a3mailer_stalwart_<name>_seconds` | bounds and sum / 1000 |
| histogram in bytes | `a3mailer_stalwart_<name>_bytes` | as is |
| other histogram | `a3mailer_stalwart_<name>` | as is |
| untyped | a gauge if named like one (see below), else a counter | as is |

Stalwart always writes TYPE lines; untyped series (another exporter in front,
an old version) are gauges when named like Stalwart's gauges
(`*_active_connections`, `*_count`, `server_memory`) and counters otherwise.

Units (Stalwart's own table, crates/trc MetricType::unit): histograms named
`*_time` are milliseconds, `*_size` are bytes; the gauge `server_memory` is bytes.

Stalwart's histogram buckets are not Prometheus buckets: each bucket holds the
sum of the values observed in it, not cumulative counts (stalwartlabs/stalwart
issue #1079). A histogram is re-exported with its buckets only when they are
valid (non-decreasing, +Inf equal to the count); otherwise only its sum, count
and the +Inf bucket, so rate(sum)/rate(count) (the mean) is right and
histogram_quantile() is never computed from wrong buckets.

Which names are emitted (the catalogue rule): the documented set in the catalogue
(source "stalwart") always, as 0 while absent (no event yet) where `zero_filled()`
says so; any other Stalwart family is re-exported under the same
naming rule through `stalwart_spec()` (like custom_spec(): a prefix, not a list),
at most monitoring.stalwart.max_series of them. The first names seen keep their
place, so the set does not flap. Series with labels, names taken by another
metric, and types other than the three are dropped; a3mailer_stalwart_dropped_series
counts every drop by reason.
"""

from __future__ import annotations

import base64
import logging
import math
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from exporter import catalogue
from exporter.catalogue import MetricSpec
from exporter.config import parse_duration, read_secret
from exporter.health import Check, CheckResult, Status
from exporter.schedule import Busy, Periodic, Worker
from security import no_redirect

log = logging.getLogger(__name__)

PREFIX = "a3mailer_stalwart_"
METRICS_PATH = "/metrics/prometheus"
READY_PATH = "/healthz/ready"
MAX_BODY_BYTES = 16 * 1024 * 1024

# Stalwart metric units by name; histograms by suffix (MetricType::unit in crates/trc).
UNITS = {"server_memory": "bytes"}
UNIT_SUFFIXES = (("_time", "milliseconds"), ("_size", "bytes"))
_GAUGE_NAME = re.compile(r"(_active_connections|_count|^server_memory)$")
_INVALID_CHARS = re.compile(r"[^a-zA-Z0-9_]")



def zero_filled(spec: MetricSpec) -> bool:
    """Whether a documented series is exported as 0 while Stalwart has not sent it yet.

    Counters and histograms (no event yet) and the connection and queue gauges
    are; memory, user and domain counts are not: there, absent means unknown.
    """
    return spec.type != "gauge" or spec.name.endswith(("_active_connections", "_queue_count"))


# Our own metrics: never the name of a re-exported series.
OWN_METRICS = frozenset({f"{PREFIX}up", f"{PREFIX}scrape_duration_seconds",
                         f"{PREFIX}dropped_series"})
DROP_REASONS = ("labelled", "unsupported_type", "name_conflict", "max_series")


# --------------------------------------------------------------------------- HTTP


class StalwartError(Exception):
    """Stalwart could not be read; the message says why, for /health and the logs."""


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes


@dataclass
class StalwartClient:
    """GETs from Stalwart's HTTP listener with one authorization, bounded in time and size."""

    url: str  # base URL of the HTTP listener, e.g. http://127.0.0.1:8080
    timeout: float
    authorization: str | None = None  # Authorization header value

    def __post_init__(self) -> None:
        if urllib.parse.urlsplit(self.url).scheme not in ("http", "https"):
            raise ValueError(f"Stalwart url must start with http:// or https://: {self.url!r}")

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> StalwartClient:
        """url, timeout, and username + password_* (Basic) or token_* (Bearer api_...)."""
        token = read_secret(section, "token")
        password = read_secret(section, "password")
        if token:
            authorization: str | None = f"Bearer {token}"
        elif section.get("username") or password:
            pair = f"{section.get('username', '')}:{password or ''}".encode()
            authorization = "Basic " + base64.b64encode(pair).decode("ascii")
        else:
            authorization = None
        return cls(section["url"].rstrip("/"), parse_duration(section["timeout"]), authorization)

    def get(self, path: str, accept: str, max_bytes: int = MAX_BODY_BYTES) -> Response:
        """Blocking GET; any HTTP status is returned, transport failures raise StalwartError.

        The whole exchange (connect, headers, body), not each socket read, is bounded by
        `timeout`: a Stalwart that dribbles its answer is cut off there. Direct
        connections only (no HTTP(S)_PROXY: Stalwart sits next to the exporter), and a
        redirect is an error: following it could send the credentials elsewhere.
        """
        url = self.url + path
        request = urllib.request.Request(  # noqa: S310 - the scheme is checked on creation
            url, headers={"Accept": accept, "User-Agent": "a3mailer-exporter"})
        if self.authorization:
            request.add_header("Authorization", self.authorization)
        try:
            try:
                response = no_redirect.open_within(request, self.timeout,
                                                   proxies_from_environment=False)
            except urllib.error.HTTPError as exc:
                response = exc  # a status other than 2xx: still an answer
            with response:
                status = int(response.status or 0)
                content_type = response.headers.get("Content-Type", "")
                chunks, size = [], 0
                while chunk := response.read1(65536):
                    size += len(chunk)
                    if size > max_bytes:
                        raise StalwartError(f"GET {url}: answer larger than {max_bytes} bytes")
                    chunks.append(chunk)
        except TimeoutError as exc:
            raise StalwartError(f"GET {url}: no complete answer within {self.timeout:g}s"
                                ) from exc
        except urllib.error.URLError as exc:
            raise StalwartError(f"GET {url}: {_reason(exc.reason)}") from exc
        except (ConnectionError, OSError) as exc:
            raise StalwartError(f"GET {url}: {_reason(exc)}") from exc
        return Response(status, content_type, b"".join(chunks))

    def get_ok(self, path: str, accept: str, max_bytes: int = MAX_BODY_BYTES) -> Response:
        """GET that must answer 200; any other status raises StalwartError saying why."""
        response = self.get(path, accept, max_bytes)
        if response.status != 200:
            raise StalwartError(_status_reason(self.url + path, response,
                                               self.authorization is not None))
        return response


def _reason(reason: object) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (is Stalwart listening there?)"
    if isinstance(reason, TimeoutError):
        return "connection timed out"
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve the host name ({reason.strerror})"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def _status_reason(url: str, response: Response, with_credentials: bool) -> str:
    if response.status == 401:
        return (f"GET {url}: HTTP 401 Unauthorized: "
                + ("the credentials were refused" if with_credentials
                   else "Stalwart wants credentials and none are configured"))
    if response.status == 403:
        return f"GET {url}: HTTP 403 Forbidden: the account lacks the permission"
    if 300 <= response.status < 400:
        return f"GET {url}: HTTP {response.status} redirect (not followed: check url)"
    return f"GET {url}: HTTP {response.status}"


def require_content(url: str, response: Response, expected: str) -> None:
    """Refuses an HTML page (a login page, a proxy's error page) where data was expected."""
    ctype = response.content_type.split(";")[0].strip().lower()
    if ctype == "text/html" or response.body.lstrip()[:1] == b"<":
        raise StalwartError(f"GET {url}: expected {expected}, got an HTML page "
                            f"(Content-Type {ctype or 'missing'}): is url Stalwart's "
                            "HTTP listener?")


# --------------------------------------------------------------------------- conversion


def stalwart_unit(name: str, kind: str) -> str:
    """milliseconds, bytes or "" for a Stalwart metric name (already `_`-separated)."""
    if name in UNITS:
        return UNITS[name]
    if kind == "histogram":
        for suffix, unit in UNIT_SUFFIXES:
            if name.endswith(suffix):
                return unit
    return ""


def exported_name(source: str, kind: str) -> tuple[str, float]:
    """Our name for a Stalwart family of type kind, and the factor for bounds and sums."""
    base = _INVALID_CHARS.sub("_", source)
    if kind == "counter":
        return f"{PREFIX}{base.removesuffix('_total')}_total", 1.0
    unit = stalwart_unit(base, kind)
    if unit == "milliseconds" and kind == "histogram":
        return f"{PREFIX}{base}_seconds", 0.001
    if unit == "bytes" and not base.endswith("_bytes"):
        return f"{PREFIX}{base}_bytes", 1.0
    return PREFIX + base, 1.0


def stalwart_spec(name: str, kind: str, unit: str, source_help: str, source: str) -> MetricSpec:
    """The catalogue entry of an uncatalogued Stalwart family re-exported as is."""
    text = source_help.strip().rstrip(".") or "no description"
    return MetricSpec(name, kind, {"milliseconds": "seconds"}.get(unit, unit),
                      f"Stalwart's {source}: {text}. Re-exported from its /metrics/prometheus "
                      "every monitoring.stalwart.interval.", (), "stalwart")


def catalogued() -> dict[str, MetricSpec]:
    """The documented Stalwart set: catalogue entries of source stalwart that are not ours."""
    return {name: spec for name, spec in catalogue.METRICS.items()
            if spec.source == "stalwart" and name not in OWN_METRICS}


@dataclass(frozen=True)
class Series:
    """One re-exported series: a value, or cumulative buckets and a sum."""

    spec: MetricSpec
    value: float = 0.0
    buckets: tuple[tuple[str, float], ...] = ()

    def family(self) -> Metric:
        fam = catalogue.family(self.spec.name, self.spec)
        if self.spec.type == "histogram":
            fam.add_metric([], list(self.buckets), self.value)
        else:
            fam.add_metric([], self.value)
        return fam


@dataclass
class StalwartSnapshot:
    series: list[Series]
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    bucketless_histograms: list[str] = field(default_factory=list)  # Stalwart names


def _histogram(samples: list[Any], factor: float) -> tuple[tuple[tuple[str, float], ...],
                                                           float, bool] | None:
    """(cumulative buckets, sum, buckets kept) from parsed samples; None if no count."""
    bounds: list[tuple[float, float]] = []
    total = count = None
    for s in samples:
        if s.name.endswith("_bucket"):
            try:
                bounds.append((float(s.labels["le"]), s.value))
            except (KeyError, ValueError):
                return None
        elif s.name.endswith("_sum"):
            total = s.value
        elif s.name.endswith("_count"):
            count = s.value
    bounds.sort()
    inf = bounds[-1][1] if bounds and math.isinf(bounds[-1][0]) else None
    if count is None:
        count = inf
    if count is None:
        return None
    values = [v for _, v in bounds]
    valid = inf == count and all(a <= b for a, b in zip(values, values[1:], strict=False))
    if valid:
        buckets = tuple((floatToGoString(bound * factor), v) for bound, v in bounds)
    else:
        buckets = (("+Inf", count),)
    return buckets, (total or 0.0) * factor, valid


class StalwartMetrics:
    """Converts Stalwart's exposition text; remembers which extra names were admitted."""

    def __init__(self, client: StalwartClient, max_series: int):
        self.client = client
        self.max_series = max_series
        self.documented = catalogued()
        self._admitted: set[str] = set()
        self._last_error = ""
        self._noted_bucketless: set[str] = set()
        self.worker = Worker("stalwart-poll")

    async def fetch(self) -> StalwartSnapshot:
        """One poll (run by the Periodic): GET, check, parse and convert, in the poll's own
        thread; skipped (Busy) while the previous poll's thread has not returned."""
        try:
            snapshot = await self.worker.run(self._fetch)
        except (StalwartError, Busy) as exc:
            if str(exc) != self._last_error:
                log.warning("stalwart metrics unavailable", extra={"error": str(exc)})
            self._last_error = str(exc)
            raise
        self._last_error = ""
        new = set(snapshot.bucketless_histograms) - self._noted_bucketless
        if new:
            self._noted_bucketless |= new
            log.info("stalwart histograms re-exported without buckets (they are not cumulative "
                     "counts)", extra={"histograms": ",".join(sorted(new))})
        return snapshot

    def _fetch(self) -> StalwartSnapshot:
        response = self.client.get_ok(METRICS_PATH, "text/plain;version=0.0.4")
        url = self.client.url + METRICS_PATH
        require_content(url, response, "the Prometheus text format")
        try:
            text = response.body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StalwartError(f"GET {url}: the answer is not UTF-8 text") from exc
        return self.convert(text, url)

    def convert(self, text: str, url: str = METRICS_PATH) -> StalwartSnapshot:
        try:
            families = list(text_string_to_metric_families(text))
        except Exception as exc:  # the parser raises ValueError, IndexError, ...
            raise StalwartError(f"GET {url}: not the Prometheus text format ({exc})") from exc
        snapshot = StalwartSnapshot([])
        taken: set[str] = set(OWN_METRICS)
        for fam in families:
            reason = self._add(fam, snapshot, taken)
            if reason:
                snapshot.dropped[reason] += 1
        for name, spec in self.documented.items():
            if name not in taken and zero_filled(spec):
                buckets = (("+Inf", 0.0),) if spec.type == "histogram" else ()
                snapshot.series.append(Series(spec, 0.0, buckets))
        return snapshot

    def _add(self, fam: Any, snapshot: StalwartSnapshot, taken: set[str]) -> str:
        """Adds one parsed family; returns the drop reason, or "" when it was added."""
        kind = fam.type
        if kind in ("unknown", "untyped"):
            if fam.name.endswith(("_bucket", "_sum")):
                return "unsupported_type"  # a histogram's pieces without its TYPE line
            kind = "gauge" if _GAUGE_NAME.search(fam.name) else "counter"
        if kind not in ("counter", "gauge", "histogram"):
            return "unsupported_type"
        if not fam.samples:
            return ""
        if any(set(s.labels) - {"le"} for s in fam.samples):
            return "labelled"
        name, factor = exported_name(fam.name, kind)
        if name in taken:
            return "name_conflict"
        spec = self.documented.get(name)
        if spec is not None and spec.type != kind:
            return "name_conflict"
        if spec is None:
            if name not in self._admitted:
                if len(self._admitted) >= self.max_series:
                    return "max_series"
                self._admitted.add(name)
            spec = stalwart_spec(name, kind, stalwart_unit(_INVALID_CHARS.sub("_", fam.name),
                                                           kind), fam.documentation, fam.name)
        if kind == "histogram":
            parsed = _histogram(fam.samples, factor)
            if parsed is None:
                return "unsupported_type"
            buckets, total, valid = parsed
            if not valid:
                snapshot.bucketless_histograms.append(fam.name)
            series = Series(spec, total, buckets)
        else:
            series = Series(spec, float(fam.samples[0].value))
        taken.add(name)
        snapshot.series.append(series)
        return ""


def stalwart_metrics_source(section: Mapping[str, Any]) -> Periodic[StalwartSnapshot]:
    """The Periodic polling /metrics/prometheus, from monitoring.stalwart.

    The client bounds each fetch by `timeout`; the Periodic's own timeout, one
    second longer, is only a backstop.
    """
    client = StalwartClient.from_config(section)
    metrics = StalwartMetrics(client, section["max_series"])
    return Periodic("stalwart", metrics.fetch, parse_duration(section["interval"]),
                    client.timeout + 1.0)


class StalwartCollector:
    """Reads the last poll: a3mailer_stalwart_up, the duration, drops, the series."""

    name = "stalwart"

    def __init__(self, source: Periodic[StalwartSnapshot]):
        self.source = source

    def collect(self) -> Iterator[Metric]:
        last = self.source.last
        snapshot = last.value if last.ok else None
        yield catalogue.single(f"{PREFIX}up", 1.0 if snapshot is not None else 0.0)
        yield catalogue.single(f"{PREFIX}scrape_duration_seconds", last.duration)
        dropped = catalogue.family(f"{PREFIX}dropped_series")
        counts = snapshot.dropped if snapshot is not None else dict.fromkeys(DROP_REASONS, 0)
        for reason in DROP_REASONS:
            dropped.add_metric([reason], counts.get(reason, 0))
        yield dropped
        if snapshot is not None:
            for series in snapshot.series:
                yield series.family()


# --------------------------------------------------------------------------- health


def stalwart_ready_check(section: Mapping[str, Any]) -> Check:
    """Stalwart's own readiness (GET /healthz/ready: 503 while it has no data store).

    Unhealthy when not ready or unreachable. Meant as a non-critical component:
    the exporter stays ready (and keeps reporting) while the mail server is down.
    """
    client = StalwartClient.from_config(section)
    worker = Worker("stalwart-ready")

    async def check() -> CheckResult:
        details: dict[str, Any] = {"url": client.url + READY_PATH}
        try:
            response = await worker.run(client.get, READY_PATH, "*/*", 65536)
        except (StalwartError, Busy) as exc:
            return CheckResult(Status.UNHEALTHY, str(exc), details)
        details["status_code"] = response.status
        if response.status == 200:
            return CheckResult(Status.HEALTHY, "Stalwart is ready", details)
        if response.status == 503:
            return CheckResult(Status.UNHEALTHY,
                               "Stalwart is not ready (503: its data store is not available)",
                               details)
        return CheckResult(Status.UNHEALTHY, _status_reason(client.url + READY_PATH, response,
                                                            client.authorization is not None),
                           details)

    return check
