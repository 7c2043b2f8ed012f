"""Tracing over the OpenTelemetry SDK, and `observe`, the one hook every engine calls.

`with observe(path, operation, ...)` times a piece of work, records it in the
PerformanceMonitor (exporter/performance.py) and, with tracing enabled, makes it
a span. The hooks: the HTTP middleware (a SERVER span per request, continuing a
caller's W3C traceparent), the security engine (its observer), the security
store (`ObservedStore`), the scrape (a span per collector) and `Periodic` (a span
per scheduled run; probe phases are child spans through `phase`).

Sampling is parent-based with a ratio for new traces: the SDK's
ParentBased(TraceIdRatioBased(rate)). Most new traces are not sampled, so a root
is decided here first, exactly as TraceIdRatioBased would (on the low 64 bits of
a fresh random trace id); a dropped root never reaches the SDK and its children
cost a context-variable lookup. A kept root hands its trace id to the SDK (the id
generator below), whose sampler then keeps it too.

Sampled spans go to a batch processor (tracing.batch_size, tracing.batch_timeout)
and out over OTLP/HTTP protobuf to tracing.otlp_endpoint + /v1/traces, on the
processor's own thread: a request only appends to a queue. A queue that is full
drops the span; an export that fails (the receiver down, or refusing) drops the
batch; both are counted in a3mailer_tracing_spans_dropped_total{reason}.

Span attributes follow the OpenTelemetry semantic conventions (http.*, url.*,
db.*, server.*, error.type) plus a3mailer.* ones. They never carry a login, an
e-mail or client address, a password hash, a token or a query string; a URL path
with a parameter (an account name) is reported as its route template.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client.core import Metric

from exporter import __version__, catalogue
from exporter.config import parse_duration, parse_headers, read_secret
from exporter.performance import PerformanceMonitor

log = logging.getLogger(__name__)

TRACES_PATH = "/v1/traces"
MIN_QUEUE = 2048  # spans that may wait for export; at least 4 batches
MIN_EXPORT_TIMEOUT = 1.0
_LOW_64 = (1 << 64) - 1
PROPAGATOR = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])
_PROPAGATED = {b"traceparent": "traceparent", b"tracestate": "tracestate", b"baggage": "baggage"}

# True inside a trace whose root was not sampled: nothing below it records a span.
_unsampled: ContextVar[bool] = ContextVar("a3mailer_unsampled", default=False)


@dataclass(frozen=True)
class TracingSettings:
    enabled: bool = False
    service_name: str = "a3mailer-exporter"
    sampling_rate: float = 0.1
    endpoint: str = "http://127.0.0.1:4318" + TRACES_PATH
    headers: Mapping[str, str] = field(default_factory=dict)
    batch_timeout: float = 5.0
    batch_size: int = 512

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> TracingSettings:
        """The tracing config section; secret headers are read from their file or
        variable now (the loader has checked they can be)."""
        headers = dict(section["otlp_headers"])
        headers.update(parse_headers(read_secret(section, "otlp_headers") or ""))
        return cls(enabled=section["enabled"], service_name=section["service_name"],
                   sampling_rate=float(section["sampling_rate"]),
                   endpoint=section["otlp_endpoint"].rstrip("/") + TRACES_PATH,
                   headers=headers, batch_timeout=parse_duration(section["batch_timeout"]),
                   batch_size=section["batch_size"])

    @property
    def queue_size(self) -> int:
        return max(MIN_QUEUE, 4 * self.batch_size)


class Tracing:
    """The TracingManager: one TracerProvider with its sampler, batch processor and
    OTLP exporter, built from TracingSettings, and the counts of what became of the
    sampled spans."""

    def __init__(self, settings: TracingSettings, exporter: SpanExporter | None = None):
        self.settings = settings
        self.tracer: Any = None
        self.bound = 0
        self.exported = 0.0
        self.dropped = {"queue_full": 0.0, "export_failed": 0.0}
        self.pending = 0
        self._lock = threading.Lock()
        self._failing = False
        self._provider: TracerProvider | None = None
        self._ids: _PreDrawnIds | None = None
        if settings.enabled:
            self._build(exporter)

    def _build(self, exporter: SpanExporter | None) -> None:
        s = self.settings
        if exporter is None:
            # imported here: it brings requests and protobuf, needless while tracing is off
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=s.endpoint, headers=dict(s.headers),
                                        timeout=max(MIN_EXPORT_TIMEOUT, s.batch_timeout))
            # Failed exports are counted and logged once per outage below; the SDK's own
            # retry warnings would log every batch.
            for name in ("opentelemetry.exporter.otlp.proto.http",
                         "opentelemetry.exporter.otlp.common.http",
                         "opentelemetry.sdk._shared_internal"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
        sampler = TraceIdRatioBased(s.sampling_rate)
        self.bound = sampler.bound
        self._ids = _PreDrawnIds()
        self._provider = TracerProvider(
            sampler=ParentBased(sampler), id_generator=self._ids,
            resource=Resource.create({"service.name": s.service_name,
                                      "service.version": __version__}))
        batch = BatchSpanProcessor(_CountingExporter(exporter, self),
                                   max_queue_size=s.queue_size,
                                   schedule_delay_millis=s.batch_timeout * 1000,
                                   max_export_batch_size=min(s.batch_size, s.queue_size))
        self._provider.add_span_processor(_Admission(batch, self))
        self.tracer = self._provider.get_tracer("a3mailer-exporter", __version__)

    def admit(self) -> bool:
        """A sampled span ended: may it join the queue? Counts it dropped otherwise."""
        with self._lock:
            if self.pending >= self.settings.queue_size:
                self.dropped["queue_full"] += 1
                return False
            self.pending += 1
            return True

    def exporting(self, count: int) -> None:
        with self._lock:
            self.pending -= count

    def exported_batch(self, count: int, ok: bool) -> None:
        with self._lock:
            if ok:
                self.exported += count
            else:
                self.dropped["export_failed"] += count
        if ok and self._failing:
            log.info("span export recovered", extra={"endpoint": self.settings.endpoint})
        elif not ok and not self._failing:
            log.warning("span export failing; spans are dropped until it recovers",
                        extra={"endpoint": self.settings.endpoint})
        self._failing = not ok

    def force_flush(self, timeout: float = 5.0) -> bool:
        return bool(self._provider.force_flush(int(timeout * 1000))) if self._provider else True

    def shutdown(self) -> None:
        """Exports what is queued (bounded by the export timeout) and stops the thread."""
        if self._provider is not None:
            self._provider.shutdown()
            self._provider = None

    def collect(self) -> Iterator[Metric]:
        rate = self.settings.sampling_rate if self.tracer is not None else 0.0
        yield catalogue.single("a3mailer_tracing_sampling_ratio", rate)
        yield catalogue.single("a3mailer_tracing_spans_exported_total", self.exported)
        dropped = catalogue.family("a3mailer_tracing_spans_dropped_total")
        for reason, count in self.dropped.items():
            dropped.add_metric([reason], count)
        yield dropped
        yield catalogue.single("a3mailer_tracing_queue_spans", float(max(0, self.pending)))


class _PreDrawnIds(RandomIdGenerator):
    """Hands the SDK the trace id a root was already sampled by (see observe)."""

    def __init__(self) -> None:
        self._next = threading.local()

    def set_next(self, trace_id: int) -> None:
        self._next.trace_id = trace_id

    def generate_trace_id(self) -> int:
        trace_id: int | None = getattr(self._next, "trace_id", None)
        if trace_id is not None:
            self._next.trace_id = None
            return trace_id
        return int(super().generate_trace_id())


class _Admission(SpanProcessor):
    """In front of the batch processor: a span joins the queue only while there is room
    (the SDK would silently push out the oldest one instead), so drops are counted."""

    def __init__(self, batch: Any, tracing: Tracing):
        self.batch = batch
        self.tracing = tracing

    def on_start(self, span: Any, parent_context: Context | None = None) -> None:
        return None

    def on_end(self, span: Any) -> None:
        if self.tracing.admit():
            self.batch.on_end(span)

    def shutdown(self) -> None:
        self.batch.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return bool(self.batch.force_flush(timeout_millis))


class _CountingExporter(SpanExporter):
    def __init__(self, inner: SpanExporter, tracing: Tracing):
        self.inner = inner
        self.tracing = tracing

    def export(self, spans: Any) -> SpanExportResult:
        count = len(spans)
        self.tracing.exporting(count)
        try:
            result = self.inner.export(spans)
        except Exception:
            result = SpanExportResult.FAILURE
        self.tracing.exported_batch(count, result == SpanExportResult.SUCCESS)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


# --- the hook ------------------------------------------------------------------------

_monitor: PerformanceMonitor | None = None
_tracing: Tracing | None = None  # None, or one whose tracer is set: tracing is on


def install(monitor: PerformanceMonitor | None, tracing: Tracing | None) -> None:
    """Makes these the process's monitor and tracer (the exporter does, at start and on
    reload); observe() reads them. None switches either off."""
    global _monitor, _tracing
    _monitor = monitor
    _tracing = tracing if tracing is not None and tracing.tracer is not None else None


def installed() -> tuple[PerformanceMonitor | None, Tracing | None]:
    return _monitor, _tracing


def enabled() -> bool:
    """Whether spans are being made (an installed Tracing with tracing.enabled)."""
    return _tracing is not None


class Operation:
    """One timed piece of work: a sample for the monitor and, when traced, a span.

    `path` None makes a span only (a probe phase); `root` False never starts a trace
    (store calls: only inside a request, a decision or a run). Use `set` for span
    attributes (prefixed with `prefix`; a no-op when not traced), `fail` to mark the
    outcome an error without raising.
    """

    __slots__ = ("_context_token", "_start", "_unsampled_token", "attributes", "error", "kind",
                 "name", "operation", "parent", "path", "prefix", "root", "span")

    def __init__(self, path: str | None, operation: str, name: str | None = None,
                 kind: SpanKind = SpanKind.INTERNAL,
                 attributes: Mapping[str, Any] | None = None, parent: Context | None = None,
                 root: bool = True, prefix: str = ""):
        self.path = path
        self.operation = operation
        self.name = name
        self.kind = kind
        self.attributes = attributes
        self.parent = parent
        self.root = root
        self.prefix = prefix
        self.error = ""
        self.span: Any = None
        self._context_token: Token[Context] | None = None
        self._unsampled_token: Token[bool] | None = None
        self._start = 0.0

    def __enter__(self) -> Operation:
        tracing = _tracing
        if tracing is not None:
            self._begin_span(tracing)
        self._start = time.perf_counter()
        return self

    def _begin_span(self, tracing: Tracing) -> None:
        parent = self.parent
        if parent is not None:
            # an incoming request: its traceparent decides, its baggage stays current
            remote = trace.get_current_span(parent).get_span_context()
            if remote.is_valid and not remote.trace_flags.sampled:
                self._context_token = otel_context.attach(parent)
                self._unsampled_token = _unsampled.set(True)
                return
            if remote.is_valid:
                self._start_span(tracing, parent)
                return
        elif _unsampled.get():
            return
        elif trace.get_current_span().get_span_context().is_valid:
            self._start_span(tracing, None)
            return
        if not self.root or self.path is None:
            if parent is not None:
                self._context_token = otel_context.attach(parent)
            return
        trace_id = random.getrandbits(128) or 1
        if trace_id & _LOW_64 >= tracing.bound:
            if parent is not None:
                self._context_token = otel_context.attach(parent)
            self._unsampled_token = _unsampled.set(True)
            return
        assert tracing._ids is not None
        tracing._ids.set_next(trace_id)
        self._start_span(tracing, parent)

    def _start_span(self, tracing: Tracing, parent: Context | None) -> None:
        span = tracing.tracer.start_span(self.name or f"{self.path} {self.operation}",
                                         context=parent, kind=self.kind,
                                         attributes=self.attributes)
        self.span = span
        self._context_token = otel_context.attach(trace.set_span_in_context(span, parent))

    def set(self, key: str, value: Any) -> None:
        span = self.span
        if span is not None:
            span.set_attribute(self.prefix + key, value)

    def fail(self, error_type: str) -> None:
        self.error = error_type

    def rename(self, name: str) -> None:
        if self.span is not None:
            self.span.update_name(name)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        seconds = time.perf_counter() - self._start
        error = self.error
        if exc_type is not None and not error:
            error = exc_type.__name__
        trace_id = None
        span = self.span
        if span is not None:
            if error:
                span.set_attribute("error.type", error)
                span.set_status(Status(StatusCode.ERROR, error))
            span.end()
            trace_id = format(span.get_span_context().trace_id, "032x")
        if self._context_token is not None:
            otel_context.detach(self._context_token)
        if self._unsampled_token is not None:
            _unsampled.reset(self._unsampled_token)
        monitor = _monitor
        if monitor is not None and self.path is not None:
            monitor.record(self.path, self.operation, seconds, bool(error), trace_id)


class Timed:
    """What observe() gives while tracing is off: the same interface, only timed."""

    __slots__ = ("_start", "error", "operation", "path")
    span = None

    def __init__(self, path: str | None, operation: str):
        self.path = path
        self.operation = operation
        self.error = ""

    def __enter__(self) -> Timed:
        self._start = time.perf_counter()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        seconds = time.perf_counter() - self._start
        monitor = _monitor
        if monitor is not None and self.path is not None:
            monitor.record(self.path, self.operation, seconds,
                           bool(self.error) or exc_type is not None)

    def set(self, key: str, value: Any) -> None:
        return None

    def fail(self, error_type: str) -> None:
        self.error = error_type

    def rename(self, name: str) -> None:
        return None


def observe(path: str | None, operation: str, name: str | None = None,
            kind: SpanKind = SpanKind.INTERNAL, attributes: Mapping[str, Any] | None = None,
            parent: Context | None = None, root: bool = True,
            prefix: str = "") -> Operation | Timed:
    """`with observe("collector", "system"):` times the block, records it in the monitor
    and, with tracing on, makes it a span (see Operation for the arguments)."""
    if _tracing is None:
        return Timed(path, operation)
    return Operation(path, operation, name, kind, attributes, parent, root, prefix)


def phase(name: str, phase_name: str) -> Operation | Timed:
    """A child span for one phase of a traced run (probe connect, tls, banner, ...)."""
    return observe(None, phase_name, name, attributes={"a3mailer.probe.phase": phase_name},
                   root=False)


def security_observer(operation: str) -> Operation | Timed:
    """The security engine's observer (security/engine.py `Observer`)."""
    return observe("security", operation, f"security {operation}",
                   prefix="a3mailer.security.")


def annotate(key: str, value: Any) -> None:
    """Sets an attribute on the current span, when there is a traced one."""
    if _tracing is not None:
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attribute(key, value)


def extract(headers: list[tuple[bytes, bytes]]) -> Context | None:
    """The caller's trace context and baggage from ASGI headers; None when it sent none
    (or tracing is off)."""
    if _tracing is None:
        return None
    carrier: dict[str, str] | None = None
    for key, value in headers:
        name = _PROPAGATED.get(key)
        if name is not None:
            if carrier is None:
                carrier = {}
            carrier[name] = value.decode("latin-1")
    return PROPAGATOR.extract(carrier) if carrier is not None else None


def outgoing_headers() -> dict[str, str]:
    """traceparent, tracestate and baggage for a request this process makes (the HTTP
    probe), continuing the current trace; empty when there is none to continue."""
    if _tracing is None:
        return {}
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier)
    return carrier


# --- the security store, observed ----------------------------------------------------

STORE_OPERATIONS = ("login_state", "record_login_failure", "record_failure",
                    "failure_count", "clear_failures", "get_lock", "put_lock", "delete_lock",
                    "locks", "bump_offences", "put_ban", "delete_ban", "bans", "refresh")
_DB_SYSTEMS = {"RedisStore": "redis", "SqliteStore": "sqlite"}


class ObservedStore:
    """A security store whose calls are timed (path store) and traced as child spans
    (`store <method>`, db.system.name, db.operation.name); everything else passes
    through to `inner`."""

    def __init__(self, inner: Any):
        self.inner = inner
        system = _DB_SYSTEMS.get(type(inner).__name__)
        kind = SpanKind.CLIENT if system == "redis" else SpanKind.INTERNAL
        for name in STORE_OPERATIONS:
            attributes = {"db.operation.name": name}
            if system is not None:
                attributes["db.system.name"] = system
            setattr(self, name, _observed(getattr(inner, name), name, kind, attributes))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _observed(method: Any, name: str, kind: SpanKind, attributes: dict[str, str]) -> Any:
    span_name = f"store {name}"

    async def call(*args: Any, **kwargs: Any) -> Any:
        with observe("store", name, span_name, kind, attributes, root=False):
            return await method(*args, **kwargs)

    call.__name__ = name
    return call
