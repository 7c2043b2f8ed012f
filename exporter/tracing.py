"""Tracing with OpenTelemetry's sampling, propagation and data model, and `observe`,
the one hook every engine calls.

`with observe(path, operation, ...)` times a piece of work, records it in the
PerformanceMonitor (exporter/performance.py) and, with tracing enabled, makes it
a span. The hooks: the HTTP middleware (a SERVER span per request, continuing a
caller's W3C traceparent), the security engine (its observer), the security
store (`ObservedStore`), the scrape (a span per collector) and `Periodic` (a span
per scheduled run; probe phases are child spans through `phase`).

What is the SDK's and what is ours (README "Tracing" says why):
- Sampling is the SDK's ParentBased(TraceIdRatioBased(rate)). A caller's
  traceparent is handed to that sampler object. A new trace is decided here with
  the SDK sampler's own bound on the low 64 bits of a fresh trace id, which is
  TraceIdRatioBased's whole rule (tests/unit/test_tracing.py checks the two agree),
  so that the nine requests in ten it drops cost two random bits and a context
  variable, not a sampler call; children follow their parent, as ParentBased's
  local-parent samplers (ALWAYS_ON, ALWAYS_OFF) do.
- Propagation is the SDK's W3C TraceContext and Baggage propagators (`extract`,
  `outgoing_headers`); an incoming context is attached as OpenTelemetry's current
  context for the request, so its baggage is there.
- A sampled span is ours: a slots object (`Span`) with the ids (random.getrandbits,
  like the SDK's RandomIdGenerator), time.time_ns() start and end, its attributes
  and status, current in a context variable while it runs. Ending it encodes it
  as its OTLP protobuf bytes (exporter/otlp.py, the same message the SDK's encoder
  makes, mostly from cached pieces) and appends those to a bounded queue: a waiting
  span is one bytes object, nothing for the garbage collector to walk.
- Export is ours: one thread takes the queue in full batches (tracing.batch_size)
  as they fill and what is left every tracing.batch_timeout, like the SDK's
  BatchSpanProcessor, joins each batch into an ExportTraceServiceRequest and POSTs
  it to tracing.otlp_endpoint + /v1/traces (or, with otlp_protocol grpc, sends it
  as a TraceService/Export call). Given an SDK SpanExporter instead (the
  tests' in-memory one), the queue holds the records and the thread hands it SDK
  ReadableSpans built from them.
A full queue drops the new span; an export that fails (the receiver down, or
refusing) drops the batch; both are counted in
a3mailer_tracing_spans_dropped_total{reason}.

Span attributes follow the OpenTelemetry semantic conventions (http.*, url.*,
db.*, server.*, error.type) plus a3mailer.* ones. They never carry a login, an
e-mail or client address, a password hash, a token or a query string; a URL path
with a parameter (an account name) is reported as its route template.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterator, Mapping
from contextlib import AbstractContextManager
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from random import getrandbits
from types import TracebackType
from typing import Any, Final, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.span import TraceState
from prometheus_client.core import Metric

from exporter import __version__, catalogue
from exporter.config import merge_headers, parse_duration, parse_headers, read_secret
from exporter.performance import PerformanceMonitor

log = logging.getLogger(__name__)
T = TypeVar("T")

TRACES_PATH = "/v1/traces"
SCOPE = "a3mailer-exporter"  # the instrumentation scope of every span
MIN_QUEUE = 2048  # spans that may wait for export; at least 4 batches
MIN_EXPORT_TIMEOUT = 1.0
PROPAGATOR = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])
_PROPAGATED = {b"traceparent": "traceparent", b"tracestate": "tracestate", b"baggage": "baggage"}
# W3C trace flags of a new trace: sampled, and (trace context level 2) a random trace id,
# as the SDK sets them with its RandomIdGenerator
_SAMPLED, _RANDOM = 0x01, 0x02
_ROOT_FLAGS = _SAMPLED | _RANDOM


class _Marker(enum.Enum):
    UNSAMPLED = "unsampled"  # the current span inside a trace that is not sampled


UNSAMPLED: Final = _Marker.UNSAMPLED
# The running sampled Span, UNSAMPLED inside a trace that is not sampled, or None.
_current: ContextVar[Span | _Marker | None] = ContextVar("a3mailer_span", default=None)
@dataclass(frozen=True)
class TracingSettings:
    enabled: bool = False
    service_name: str = "a3mailer-exporter"
    sampling_rate: float = 0.1
    endpoint: str = "http://127.0.0.1:4318" + TRACES_PATH  # for gRPC: scheme, host, port
    headers: Mapping[str, str] = field(default_factory=dict)
    protocol: str = "http/protobuf"  # or "grpc"
    batch_timeout: float = 5.0
    batch_size: int = 512

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> TracingSettings:
        """The tracing config section; secret headers are read from their file or
        variable now (the loader has checked they can be)."""
        protocol = section["otlp_protocol"]
        grpc = protocol == "grpc"
        headers = merge_headers(section["otlp_headers"], parse_headers(
            read_secret(section, "otlp_headers") or "", grpc))
        endpoint = section["otlp_endpoint"].rstrip("/")
        return cls(enabled=section["enabled"], service_name=section["service_name"],
                   sampling_rate=float(section["sampling_rate"]),
                   endpoint=endpoint if grpc else endpoint + TRACES_PATH, protocol=protocol,
                   headers=headers, batch_timeout=parse_duration(section["batch_timeout"]),
                   batch_size=section["batch_size"])

    @property
    def queue_size(self) -> int:
        return max(MIN_QUEUE, 4 * self.batch_size)




class Tracing:
    """The TracingManager: the sampler, the queue of finished spans and the thread that
    exports them, built from TracingSettings, and the counts of what became of the
    sampled spans. `exporter`, an SDK SpanExporter, replaces the OTLP/HTTP export."""

    def __init__(self, settings: TracingSettings, exporter: SpanExporter | None = None,
                 counts: SpanCounts | None = None):
        self.settings = settings
        self.active = False
        self.bound = 0
        self.sampler: ParentBased | None = None
        self.resource: Resource | None = None
        self.scope = InstrumentationScope(SCOPE, __version__)
        # a reload's new Tracing takes the old one's: the counters go on, and what the old
        # one still exports while it shuts down counts in them too
        self.counts = counts if counts is not None else SpanCounts()
        # what finished spans became: OTLP protobuf bytes (the encoder's Span field), or
        # the Span records themselves for an SDK SpanExporter
        self._queue: deque[Any] = deque()
        self._record: Callable[[Span], Any] = _itself
        self._capacity = settings.queue_size
        self._batch_size = min(settings.batch_size, settings.queue_size)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._export_lock = threading.Lock()  # one batch at a time: the thread or a flush
        self._failing = False
        self._send: Callable[[list[Any]], bool] = _refuse
        self._close: Callable[[], None] = _nothing
        self._thread: threading.Thread | None = None
        if settings.enabled:
            self._build(exporter)

    def _build(self, exporter: SpanExporter | None) -> None:
        s = self.settings
        root = TraceIdRatioBased(s.sampling_rate)
        self.sampler = ParentBased(root)
        self.bound = root.bound
        self.resource = resource(s.service_name)
        if exporter is None:
            # imported here: it brings httpx's client, needless while tracing is off
            from exporter.otlp import Encoder, GrpcSender, Sender

            encoder = Encoder(self.resource.attributes, SCOPE, __version__)
            sender = (GrpcSender if s.protocol == "grpc" else Sender)(
                s.endpoint, s.headers, max(MIN_EXPORT_TIMEOUT, s.batch_timeout), self._stop)
            self._record = encoder.span
            self._send = lambda spans: sender.send(encoder.request(spans))
            self._close = sender.close
        else:
            sdk_exporter = exporter
            self._send = lambda spans: sdk_exporter.export(
                [self.readable(span) for span in spans]) == SpanExportResult.SUCCESS
            self._close = sdk_exporter.shutdown
        self._thread = threading.Thread(target=self._run, name="tracing-export", daemon=True)
        self._thread.start()
        self.active = True

    @property
    def pending(self) -> int:
        """Finished spans waiting for export."""
        return len(self._queue)

    def finish(self, span: Span) -> None:
        """A sampled span ended: into the queue, encoded, if there is room, else counted
        dropped. Encoded now, it waits as bytes: no object for the garbage collector to
        walk while a batch fills, and the export thread holds the GIL only to join them."""
        queue = self._queue
        if len(queue) >= self._capacity:
            self._count("queue_full")
            return
        try:
            queue.append(self._record(span))
        except Exception:  # a bug in the encoder must not fail the request
            log.debug("span encoding raised", exc_info=True)
            self._count("export_failed")
            return
        if len(queue) >= self._batch_size and not self._wake.is_set():
            self._wake.set()

    @property
    def exported(self) -> float:
        return self.counts.exported

    @property
    def dropped(self) -> dict[str, float]:
        return self.counts.dropped

    def _count(self, reason: str, spans: int = 1) -> None:
        counts = self.counts
        with counts.lock:
            counts.dropped[reason] += spans

    def _run(self) -> None:
        delay = self.settings.batch_timeout
        while not self._stop.is_set():
            full = self._wake.wait(delay)
            self._wake.clear()
            with self._export_lock:
                self._drain(full)

    def _drain(self, full_only: bool = False) -> None:
        """Exports, in batches, the spans queued now (the caller holds the export lock).
        Woken by a full batch, it sends full batches only: the few spans that ended
        meanwhile wait for the next one (or batch_timeout) instead of going out as a
        request of their own, which costs the export as much as a full one."""
        queue, size = self._queue, self._batch_size
        left = len(queue)
        while left >= (size if full_only else 1):
            batch = [queue.popleft() for _ in range(min(left, size))]
            left -= len(batch)
            self._export(batch)

    def _export(self, batch: list[Any]) -> None:
        error = "refused or unreachable"  # the sender's own failures (it retried them)
        try:
            ok = self._send(batch)
        except Exception as exc:  # not one the sender handles: say which, once
            log.debug("span export raised", exc_info=True)
            ok, error = False, type(exc).__name__
        counts = self.counts
        with counts.lock:
            if ok:
                counts.exported += len(batch)
            else:
                counts.dropped["export_failed"] += len(batch)
        if ok and self._failing:
            log.info("span export recovered", extra={"endpoint": self.settings.endpoint})
        elif not ok and not self._failing:
            log.warning("span export failing; spans are dropped until it recovers",
                        extra={"endpoint": self.settings.endpoint, "error": error})
        self._failing = not ok

    def force_flush(self, timeout: float = 5.0) -> bool:
        """Exports what is queued now, on the caller's thread; False if the export
        thread's batch did not finish within `timeout`."""
        if not self._export_lock.acquire(timeout=timeout):
            return False
        try:
            self._drain()
        finally:
            self._export_lock.release()
        return True

    def shutdown(self) -> None:
        """Exports what is queued (bounded by the export timeout) and stops the thread."""
        if self._thread is None:
            return
        thread, self._thread = self._thread, None
        self.active = False
        self._stop.set()
        self._wake.set()
        thread.join(max(MIN_EXPORT_TIMEOUT, self.settings.batch_timeout))
        self.force_flush(max(MIN_EXPORT_TIMEOUT, self.settings.batch_timeout))
        self._close()

    def readable(self, span: Span) -> ReadableSpan:
        """The SDK's ReadableSpan for a finished span (for an SDK SpanExporter)."""
        t = span.trace
        flags = TraceFlags(t.flags)
        context = SpanContext(t.trace_id, span.span_id, False, flags, t.state)
        parent = (SpanContext(t.trace_id, span.parent_id, span.remote, flags, t.state)
                  if span.parent_id else None)
        status = Status(StatusCode.ERROR, span.error) if span.error else Status(StatusCode.UNSET)
        return ReadableSpan(name=span.name, context=context, parent=parent,
                            resource=self.resource, attributes=dict(span.attributes),
                            kind=span.kind, status=status, start_time=span.start_ns,
                            end_time=span.end_ns, instrumentation_scope=self.scope)

    def collect(self) -> Iterator[Metric]:
        rate = self.settings.sampling_rate if self.active else 0.0
        yield catalogue.single("a3mailer_tracing_sampling_ratio", rate)
        yield catalogue.single("a3mailer_tracing_spans_exported_total", self.exported)
        dropped = catalogue.family("a3mailer_tracing_spans_dropped_total")
        for reason, count in self.dropped.items():
            dropped.add_metric([reason], count)
        yield dropped
        yield catalogue.single("a3mailer_tracing_queue_spans", float(self.pending))


class SpanCounts:
    """What became of the sampled spans, for a3mailer_tracing_spans_*_total."""

    def __init__(self) -> None:
        self.exported = 0.0
        self.dropped = {"queue_full": 0.0, "export_failed": 0.0}
        self.lock = threading.Lock()


def resource(service_name: str) -> Resource:
    """The SDK's Resource of every span: service.name and .version, telemetry.sdk.*,
    and what OTEL_RESOURCE_ATTRIBUTES adds."""
    return Resource.create({"service.name": service_name, "service.version": __version__})


def _refuse(spans: list[Any]) -> bool:
    return False


def _itself(span: Span) -> Span:
    return span


def _nothing() -> None:
    return None


# --- the hook ------------------------------------------------------------------------

_monitor: PerformanceMonitor | None = None
_tracing: Tracing | None = None  # None, or an active one: tracing is on


def install(monitor: PerformanceMonitor | None, tracing: Tracing | None) -> None:
    """Makes these the process's monitor and tracer (the exporter does, at start and on
    reload); observe() reads them. None switches either off."""
    global _monitor, _tracing
    _monitor = monitor
    _tracing = tracing if tracing is not None and tracing.active else None


def installed() -> tuple[PerformanceMonitor | None, Tracing | None]:
    return _monitor, _tracing


def enabled() -> bool:
    """Whether spans are being made (an installed Tracing with tracing.enabled)."""
    return _tracing is not None


class Timed:
    """An operation that is not traced (tracing off, or its trace not sampled): the same
    interface as Span, only timed for the monitor."""

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

    def set_attribute(self, key: str, value: Any) -> None:
        return None

    def update(self, attributes: Mapping[str, Any]) -> None:
        return None

    def fail(self, error_type: str) -> None:
        self.error = error_type

    def rename(self, name: str) -> None:
        return None


class _UnsampledRoot(Timed):
    """The root of a trace that is not sampled: nothing below it makes a span."""

    __slots__ = ("_token",)

    def __enter__(self) -> _UnsampledRoot:
        self._token = _current.set(UNSAMPLED)
        self._start = time.perf_counter()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        seconds = time.perf_counter() - self._start
        _current.reset(self._token)
        monitor = _monitor
        if monitor is not None and self.path is not None:
            monitor.record(self.path, self.operation, seconds,
                           bool(self.error) or exc_type is not None)


class Trace:
    """What the spans of one sampled trace share: its id (and as hex, for exemplars),
    W3C flags and trace state, and the caller's span id when it continues a caller's
    trace (-1 when it does not)."""

    __slots__ = ("flags", "hex", "remote_parent", "state", "trace_id")

    def __init__(self, trace_id: int, flags: int, state: TraceState | None,
                 remote_parent: int):
        self.trace_id = trace_id
        self.hex = trace_id.to_bytes(16, "big").hex()
        self.flags = flags
        self.state = state
        self.remote_parent = remote_parent


class Span:
    """A sampled operation: the span record the export thread encodes, and the context
    manager that times it, makes it the current span and, at the end, queues it and
    records the sample (with the trace id, for exemplars).

    `set` adds an attribute named `prefix` + key, `set_attribute` one named key;
    `fail` marks the outcome an error without raising; `rename` changes the name.
    The attributes given are shared (a caller's constant) until the first is set;
    `owned` says whether they are the span's own dict by now. A shared mapping is the
    same object for every span of its kind, which lets the encoder keep its bytes.
    """

    __slots__ = ("_token", "attributes", "end_ns", "error", "kind", "name",
                 "operation", "owned", "parent_id", "path", "prefix", "span_id", "start_ns",
                 "trace")
    _token: Token[Span | _Marker | None] | None

    def __init__(self, trace: Trace, parent_id: int, path: str | None, operation: str,
                 name: str | None, kind: SpanKind, attributes: Mapping[str, Any] | None,
                 prefix: str):
        self.trace = trace
        self.parent_id = parent_id
        self.span_id = getrandbits(64) or 1
        self.path = path
        self.operation = operation
        self.name = name or f"{path} {operation}"
        self.kind = kind
        self.attributes: Mapping[str, Any] = attributes or _NO_ATTRIBUTES
        self.owned = False
        self.prefix = prefix
        self.error = ""

    @property
    def span(self) -> Span:
        return self

    @property
    def remote(self) -> bool:
        """Whether the parent is another process's span."""
        return self.parent_id == self.trace.remote_parent

    def __enter__(self) -> Span:
        self._token = _current.set(self)
        self.start_ns = time.time_ns()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # the SDK's clock: time_ns() at both ends, one call each (a step of the wall clock
        # inside the span would make it negative: the monitor takes 0)
        end = self.end_ns = time.time_ns()
        nanoseconds = max(0, end - self.start_ns)
        token = self._token
        if token is not None:
            _current.reset(token)
        error = self.error
        if exc_type is not None and not error:
            error = self.error = exc_type.__name__
        if error:
            self.set_attribute("error.type", error)
        tracing = _tracing  # the installed one: after a reload, the new one exports it
        if tracing is not None:
            tracing.finish(self)
        monitor = _monitor
        if monitor is not None and self.path is not None:
            monitor.record(self.path, self.operation, nanoseconds / 1e9, bool(error),
                           self.trace.hex)

    def set_attribute(self, key: str, value: Any) -> None:
        if not self.owned:
            self.attributes = dict(self.attributes)
            self.owned = True
        self.attributes[key] = value  # type: ignore[index]

    def set(self, key: str, value: Any) -> None:
        if not self.owned:
            self.attributes = dict(self.attributes)
            self.owned = True
        self.attributes[self.prefix + key] = value  # type: ignore[index]

    def update(self, attributes: Mapping[str, Any]) -> None:
        """Sets several attributes (named as given) at once. A span without attributes
        yet shares `attributes` rather than copying it: pass a constant."""
        if self.owned:
            self.attributes.update(attributes)  # type: ignore[attr-defined]
        elif not self.attributes:
            self.attributes = attributes
        else:
            self.attributes = {**self.attributes, **attributes}
            self.owned = True

    def fail(self, error_type: str) -> None:
        self.error = error_type

    def rename(self, name: str) -> None:
        self.name = name


class _Leaf(Span):
    """A sampled span inside which nothing is observed (a store call): it never becomes
    the current span, which saves setting the context variable twice."""

    __slots__ = ()

    def __enter__(self) -> Span:
        self._token = None
        self.start_ns = time.time_ns()
        return self


_NO_ATTRIBUTES: Mapping[str, Any] = {}
# what observe() gives: `with observe(...) as op`, op is a Span or a Timed
Observed = AbstractContextManager["Span | Timed"]


class _InContext:
    """An operation run in a caller's context (from `extract`), which is OpenTelemetry's
    current context meanwhile, so that its baggage (and an unsampled traceparent) goes
    on into requests this one makes."""

    __slots__ = ("context", "operation", "token")

    def __init__(self, operation: Span | Timed, context: Context):
        self.operation = operation
        self.context = context

    def __enter__(self) -> Span | Timed:
        self.token = otel_context.attach(self.context)
        return self.operation.__enter__()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.operation.__exit__(exc_type, exc, tb)
        finally:
            otel_context.detach(self.token)


def detached_task(coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
    """A background task that outlives whatever starts it, in a context of its own.

    A task copies the context it is created in: one started while a request is handled
    (a probe added by POST /-/reload) would run every later run inside that request's
    trace, or, when the request was not sampled, never be traced at all.
    """
    return asyncio.create_task(coro, name=name, context=contextvars.Context())


def observe(path: str | None, operation: str, name: str | None = None,
            kind: SpanKind = SpanKind.INTERNAL, attributes: Mapping[str, Any] | None = None,
            parent: Context | None = None, root: bool = True, prefix: str = "",
            leaf: bool = False) -> Observed:
    """`with observe("collector", "system") as op:` times the block, records it in the
    monitor and, with tracing on and the trace sampled, makes it a span named `name`
    (default "<path> <operation>") with `kind` and `attributes` (shared, not copied:
    a constant). `path` None makes a span only (a probe phase); `root` False never
    starts a trace (store calls: only inside a request, a decision or a run);
    `parent`, a caller's context from `extract`, is continued; `prefix` goes before
    the keys `op.set` is given; `leaf` says nothing inside is observed."""
    tracing = _tracing
    if tracing is None:
        return Timed(path, operation)
    current = _current.get()
    if parent is not None:
        return _InContext(_continued(tracing, path, operation, name, kind, attributes, parent,
                                     root, prefix, leaf), parent)
    if current is UNSAMPLED:
        return Timed(path, operation)
    if current is None:
        if not root or path is None:
            return Timed(path, operation)
        low = getrandbits(64)  # the bits TraceIdRatioBased decides by
        if low >= tracing.bound:
            return _UnsampledRoot(path, operation)
        trace_id = (getrandbits(64) << 64 | low) or 1 << 64
        return (_Leaf if leaf else Span)(Trace(trace_id, _ROOT_FLAGS, None, -1), 0, path,
                                         operation, name, kind, attributes, prefix)
    return (_Leaf if leaf else Span)(current.trace, current.span_id, path, operation, name,
                                     kind, attributes, prefix)


def _continued(tracing: Tracing, path: str | None, operation: str, name: str | None,
               kind: SpanKind, attributes: Mapping[str, Any] | None, parent: Context,
               root: bool, prefix: str, leaf: bool) -> Span | Timed:
    """The operation for a caller's context: with a traceparent, the SDK's sampler
    decides on it; without one (baggage only) it is a new trace, decided as above."""
    remote = trace.get_current_span(parent).get_span_context()
    if not remote.is_valid:
        op = observe(path, operation, name, kind, attributes, None, root, prefix, leaf)
        assert isinstance(op, (Span, Timed))  # without a parent: never _InContext
        return op
    assert tracing.sampler is not None
    result = tracing.sampler.should_sample(parent, remote.trace_id,
                                           name or f"{path} {operation}", kind)
    if not result.decision.is_sampled():
        return _UnsampledRoot(path, operation)
    caller = Trace(remote.trace_id, _SAMPLED | (remote.trace_flags & _RANDOM),
                   result.trace_state, remote.span_id)
    return (_Leaf if leaf else Span)(caller, remote.span_id, path, operation, name, kind,
                                     attributes, prefix)


def phase(name: str, phase_name: str) -> Observed:
    """A child span for one phase of a traced run (probe connect, tls, banner, ...)."""
    return observe(None, phase_name, name, attributes={"a3mailer.probe.phase": phase_name},
                   root=False)


_SECURITY_NAMES = {"check": "security check", "report": "security report"}


def security_observer(operation: str) -> Observed:
    """The security engine's observer (security/engine.py `Observer`)."""
    return observe("security", operation,
                   _SECURITY_NAMES.get(operation) or f"security {operation}",
                   prefix="a3mailer.security.")


def annotate(key: str, value: Any) -> None:
    """Sets an attribute on the current span, when there is a sampled one."""
    current = _current.get()
    if isinstance(current, Span):
        current.set_attribute(key, value)


def extract(headers: list[tuple[bytes, bytes]]) -> Context | None:
    """The caller's trace context and baggage from ASGI headers; None when it sent none
    (or tracing is off). As W3C Trace Context and Baggage say: several tracestate (or
    baggage) headers are one list, joined in order; two traceparent headers are no
    parent at all (the request starts a trace of its own, and its tracestate goes with
    the traceparent)."""
    if _tracing is None:
        return None
    carrier: dict[str, str] | None = None
    for key, value in headers:
        name = _PROPAGATED.get(key)
        if name is not None:
            text = value.decode("latin-1")
            if carrier is None:
                carrier = {name: text}
            elif name not in carrier:
                carrier[name] = text
            elif name == "traceparent":
                carrier[name] = ""  # a duplicate: invalid, the propagator ignores it
            else:
                carrier[name] += "," + text
    if carrier is None:
        return None
    if carrier.get("traceparent") == "":
        del carrier["traceparent"]
        carrier.pop("tracestate", None)
    return PROPAGATOR.extract(carrier)


def outgoing_headers() -> dict[str, str]:
    """traceparent, tracestate and baggage for a request this process makes (the HTTP
    probe), continuing the current trace; empty when there is none to continue."""
    if _tracing is None:
        return {}
    current = _current.get()
    context = None
    if isinstance(current, Span):
        t = current.trace
        span_context = SpanContext(t.trace_id, current.span_id, False, TraceFlags(t.flags),
                                   t.state)
        context = trace.set_span_in_context(NonRecordingSpan(span_context))
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier, context=context)
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
        with observe("store", name, span_name, kind, attributes, root=False, leaf=True):
            return await method(*args, **kwargs)

    call.__name__ = name
    return call
