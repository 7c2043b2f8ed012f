"""OTLP/HTTP protobuf for the tracer's span records (exporter/tracing.py): the encoder
and the sender.

The encoder writes an ExportTraceServiceRequest (opentelemetry-proto's
collector/trace/v1) directly from the records: each span's bytes as it ends (on the
thread that ends it), the request around a batch of them on the export thread;
one ResourceSpans with the resource and one ScopeSpans, the scope and the spans,
with exactly the fields the SDK's encoder (opentelemetry-exporter-otlp-proto-common
`encode_spans`) sets for the same span: ids, trace state, parent, name, kind, start
and end, attributes, status and flags (SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE, and
IS_REMOTE for a remote parent). Name, kind, status and flags (per name, error and
remote parent) and attributes (key and value) are encoded once and kept, in bounded
caches: spans of one kind differ mostly in their ids and times, written with one
struct.pack each. A mapping of attributes that spans share (a store call's
constants, the HTTP middleware's per kind of answer) is kept encoded whole, by
identity. The caches are plain dicts read and filled under the GIL by whichever
thread ends a span; a race at worst encodes a piece twice.

Why not the SDK's OTLPSpanExporter: its export() takes ReadableSpans and builds a
protobuf object for every span, attribute and value, 20 to 30 times the CPU of
writing the bytes here (benchmarks/bench_tracing.py, part "encode"), and all of it
holds the GIL the requests need; the part of it that sends bytes is private API.
tests/unit/test_otlp.py decodes our output with opentelemetry-proto's classes and
compares it with encode_spans() of the same spans.

The sender (tracing.otlp_protocol http/protobuf) POSTs the bytes over one kept-alive
http.client connection, with the SDK exporter's rules: 2xx is success; 429, 502, 503,
504 and connection errors are retried with exponential backoff (1 s, 2 s, ... with
20 % jitter) or after Retry-After, while the export's time lasts; anything else fails
at once. GrpcSender (grpc) makes the same bytes the request of a unary call to
TraceService/Export, which is all OTLP/gRPC is: grpcio is handed bytes, not a
protobuf object. It retries the codes the OTLP specification calls retryable, after
the RetryInfo delay when the receiver gives one.
"""

from __future__ import annotations

import abc
import http.client
import random
import ssl
import struct
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.trace import SpanKind
from opentelemetry.trace.span import TraceState

from exporter.config import merge_headers
from security import no_redirect

CONTENT_TYPE = "application/x-protobuf"
RETRYABLE = frozenset({429, 502, 503, 504})
MAX_ATTEMPTS = 6
JITTER = 0.2
MAX_CACHED = 4096  # encoded names, and attributes, kept

# Span.SpanKind in trace.proto: the API's enum shifted by one (0 is UNSPECIFIED)
# (Span.kind, field 6), indexed by the API enum's value
SPAN_KINDS = tuple(b"\x30" + bytes((kind.value + 1,)) for kind in sorted(SpanKind,
                                                                        key=lambda k: k.value))
# Span.flags (field 16, fixed32): SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK, | IS_REMOTE
_LOCAL_FLAGS = b"\x85\x01" + struct.pack("<I", 0x100)
_REMOTE_FLAGS = b"\x85\x01" + struct.pack("<I", 0x300)
_UNSET_STATUS = b"\x7a\x00"  # Span.status, an empty Status (code UNSET), as the SDK sends it
_ERROR_CODE = b"\x18\x02"  # Status.code = STATUS_CODE_ERROR

# trace_id, span_id (fields 1, 2: tag, length, big-endian bytes as the SDK writes ids) and
# parent_span_id (4); the trace id as its high and low 64 bits
_IDS = struct.Struct(">2sQQ2sQ")
_IDS_WITH_PARENT = struct.Struct(">2sQQ2sQ2sQ")
_TIMES = struct.Struct("<cQcQ")  # start and end time (fixed64 fields 7 and 8)
_LOW = (1 << 64) - 1
_TRACE_ID, _SPAN_ID, _PARENT_ID = b"\x0a\x10", b"\x12\x08", b"\x22\x08"
_START, _END = b"\x39", b"\x41"
_FIXED = _IDS.size + _TIMES.size  # the bytes of the ids and times
_FIXED_WITH_PARENT = _IDS_WITH_PARENT.size + _TIMES.size
_DOUBLE = struct.Struct("<d")
_EMPTY: dict[Any, bytes] = {}


class TraceRecord(Protocol):
    """What the encoder reads from a span's trace (exporter.tracing.Trace)."""

    @property
    def trace_id(self) -> int: ...
    @property
    def state(self) -> TraceState | None: ...
    @property
    def remote_parent(self) -> int: ...  # the caller's span id, for a caller's trace


class SpanRecord(Protocol):
    """What the encoder reads from a finished span (exporter.tracing.Span)."""

    @property
    def trace(self) -> TraceRecord: ...
    @property
    def span_id(self) -> int: ...
    @property
    def parent_id(self) -> int: ...  # 0: a root
    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> SpanKind: ...
    @property
    def start_ns(self) -> int: ...
    @property
    def end_ns(self) -> int: ...
    @property
    def attributes(self) -> Mapping[str, Any]: ...
    @property
    def owned(self) -> bool: ...  # False: `attributes` is a mapping spans share, never changed
    @property
    def error(self) -> str: ...  # "": status UNSET; else ERROR with this message


def varint(n: int) -> bytes:
    if n < 0:
        n &= (1 << 64) - 1  # int64 as protobuf writes it: ten bytes of two's complement
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_VARINTS = [varint(n) for n in range(16384)]


def _length(n: int) -> bytes:
    return _VARINTS[n] if n < 16384 else varint(n)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    return tag + _length(len(payload)) + payload


def any_value(value: Any) -> bytes | None:
    """An AnyValue's body, as the SDK's _encode_value makes it; None for a type it cannot
    encode (the SDK logs those and leaves the attribute out; so do we)."""
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _field(b"\x0a", value.encode())
    if isinstance(value, int):
        if not -(1 << 63) <= value < 1 << 63:
            return None
        return b"\x18" + varint(value)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE.pack(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if isinstance(value, Sequence):
        items = [any_value(item) for item in value]
        if any(item is None for item in items):
            return None
        return _field(b"\x2a", b"".join(_field(b"\x0a", item or b"") for item in items))
    if isinstance(value, Mapping):
        pairs = [key_value(str(k), v, b"\x0a") for k, v in value.items()]
        if any(pair is None for pair in pairs):
            return None
        return _field(b"\x32", b"".join(pair or b"" for pair in pairs))
    return None


def key_value(key: str, value: Any, tag: bytes) -> bytes | None:
    """A KeyValue as a field with `tag` (Span.attributes is 9, Resource.attributes 1)."""
    body = any_value(value)
    if body is None:
        return None
    return _field(tag, _field(b"\x0a", key.encode()) + _field(b"\x12", body))


class Encoder:
    """ExportTraceServiceRequest bytes for batches of span records of one resource and
    one instrumentation scope."""

    def __init__(self, resource: Mapping[str, Any], scope_name: str, scope_version: str):
        attributes = b"".join(kv for kv in (key_value(k, v, b"\x0a")
                                            for k, v in resource.items()) if kv is not None)
        self._resource = _field(b"\x0a", attributes)  # ResourceSpans.resource
        scope = _field(b"\x0a", scope_name.encode()) + _field(b"\x12", scope_version.encode())
        self._scope = _field(b"\x0a", scope)  # ScopeSpans.scope
        # (name, error message, remote parent) -> kind, and Span.name, kind, status and flags
        self._heads: dict[tuple[str, str, bool], tuple[SpanKind, bytes]] = {}
        # encoded Span.attributes entries: value type -> key -> value -> bytes (by type,
        # as True == 1 == 1.0 but they encode differently)
        self._attributes: dict[type, dict[str, dict[Any, bytes]]] = {
            str: {}, int: {}, bool: {}, float: {}}
        self._cached = 0
        # id of a shared attribute mapping -> the mapping (held, so the id stays its own)
        # and its Span.attributes bytes; emptied when full, so one-off mappings (a
        # collector run's) cannot crowd the request paths' out for good
        self._shared: dict[int, tuple[Mapping[str, Any], bytes]] = {}

    def _head(self, key: tuple[str, str, bool], kind: SpanKind) -> bytes:
        """Span.name, kind, status and flags for (name, error message, remote) and kind."""
        name, error, remote = key
        head = (_field(b"\x2a", name.encode()) if name else b"") + SPAN_KINDS[kind.value]
        if error:
            head += _field(b"\x7a", _field(b"\x12", error.encode()) + _ERROR_CODE)
        else:
            head += _UNSET_STATUS
        head += _REMOTE_FLAGS if remote else _LOCAL_FLAGS
        if len(self._heads) < MAX_CACHED:
            self._heads[key] = (kind, head)
        return head

    def _attribute(self, key: str, value: Any) -> bytes:
        encoded = key_value(key, value, b"\x4a") or b""
        by_key = self._attributes.get(value.__class__)
        if by_key is not None and self._cached < MAX_CACHED:
            by_key.setdefault(key, {})[value] = encoded
            self._cached += 1
        return encoded

    def _attributes_of(self, attributes: Mapping[str, Any]) -> bytes:
        """The Span.attributes entries, each from the cache when it has been seen."""
        cache = self._attributes
        parts = []
        for key, value in attributes.items():
            by_key = cache.get(value.__class__)
            encoded = by_key.get(key, _EMPTY).get(value) if by_key is not None else None
            parts.append(encoded if encoded is not None else self._attribute(key, value))
        return b"".join(parts)

    def span(self, span: SpanRecord) -> bytes:
        """One span as its ScopeSpans.spans field (tag, length, Span message)."""
        trace = span.trace
        parent = span.parent_id
        # keyed without the kind: an enum's hash is a Python call; kinds rarely differ
        key = (span.name, span.error, parent == trace.remote_parent)
        entry = self._heads.get(key)
        kind = span.kind
        head = entry[1] if entry is not None and entry[0] is kind else self._head(key, kind)
        attributes = span.attributes
        if not attributes:
            body = b""
        elif span.owned:
            body = self._attributes_of(attributes)
        else:
            shared = self._shared.get(id(attributes))
            if shared is None or shared[0] is not attributes:
                if len(self._shared) >= MAX_CACHED:
                    self._shared.clear()
                shared = self._shared[id(attributes)] = (
                    attributes, self._attributes_of(attributes))
            body = shared[1]
        if trace.state:
            body += _field(b"\x1a", ",".join(
                f"{k}={v}" for k, v in trace.state.items()).encode())
        trace_id = trace.trace_id
        if parent:
            return b"".join((
                b"\x12", _length(_FIXED_WITH_PARENT + len(head) + len(body)),
                _IDS_WITH_PARENT.pack(_TRACE_ID, trace_id >> 64, trace_id & _LOW, _SPAN_ID,
                                      span.span_id, _PARENT_ID, parent),
                head, body, _TIMES.pack(_START, span.start_ns, _END, span.end_ns)))
        return b"".join((
            b"\x12", _length(_FIXED + len(head) + len(body)),
            _IDS.pack(_TRACE_ID, trace_id >> 64, trace_id & _LOW, _SPAN_ID, span.span_id),
            head, body, _TIMES.pack(_START, span.start_ns, _END, span.end_ns)))

    def request(self, spans: Iterable[bytes]) -> bytes:
        """The ExportTraceServiceRequest of spans encoded by span()."""
        scope_spans = self._scope + b"".join(spans)
        resource_spans = self._resource + b"\x12" + _length(len(scope_spans)) + scope_spans
        return b"\x0a" + _length(len(resource_spans)) + resource_spans

    def encode(self, spans: Iterable[SpanRecord]) -> bytes:
        return self.request([self.span(span) for span in spans])


class _Retrying(abc.ABC):
    """The OTLP exporters' retry rule around one attempt (`_attempt`): retryable
    failures are tried again with exponential backoff (1 s, 2 s, ... with 20 % jitter)
    or after the delay the receiver asked for, while the export's time lasts; `stop`
    (set at shutdown) cuts a backoff short."""

    def __init__(self, endpoint: str, timeout: float, stop: threading.Event):
        self.endpoint = endpoint
        self.timeout = timeout
        self.stop = stop

    def send(self, body: bytes) -> bool:
        deadline = time.monotonic() + self.timeout
        for attempt in range(MAX_ATTEMPTS):
            backoff = 2 ** attempt * random.uniform(1 - JITTER, 1 + JITTER)  # noqa: S311 - jitter
            done, retry_after = self._attempt(body, deadline)
            if done is not None:
                return done
            backoff = retry_after if retry_after is not None else backoff
            if backoff > deadline - time.monotonic() or self.stop.wait(backoff):
                return False
        return False

    @abc.abstractmethod
    def _attempt(self, body: bytes, deadline: float) -> tuple[bool | None, float | None]:
        """(True: sent, False: refused for good, None: retryable; the delay asked for)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Lets go of the connection (at shutdown)."""


class Sender(_Retrying):
    """POSTs encoded requests to the OTLP/HTTP traces endpoint over one kept-alive
    connection: 2xx is success; 429, 502, 503, 504 and connection errors are retried,
    after Retry-After when given."""

    def __init__(self, endpoint: str, headers: Mapping[str, str], timeout: float,
                 stop: threading.Event):
        super().__init__(endpoint, timeout, stop)
        url = urllib.parse.urlsplit(endpoint)
        self._https = url.scheme == "https"
        self._host = url.hostname or "localhost"
        self._port = url.port or (443 if self._https else 80)
        self._path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        self._headers = merge_headers(headers, {"Content-Type": CONTENT_TYPE})
        self._connection: http.client.HTTPConnection | None = None

    def _attempt(self, body: bytes, deadline: float) -> tuple[bool | None, float | None]:
        try:
            status, retry_after = self._post(body, deadline)
        except (OSError, http.client.HTTPException):
            return None, None  # refused, reset, timed out: retried like a 503
        if 200 <= status < 300:
            return True, None
        return (None, retry_after) if status in RETRYABLE else (False, None)

    def _post(self, body: bytes, deadline: float) -> tuple[int, float | None]:
        """One POST; a kept-alive connection the receiver has closed meanwhile is
        replaced and the POST sent again at once."""
        for fresh in (self._connection is None, True):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("export timed out")
            connection = self._connection
            if connection is None:
                connection = self._connection = no_redirect.bounded_connection(
                    self._host, self._port, deadline, https=self._https,
                    context=ssl.create_default_context() if self._https else None)
            connection.deadline = deadline  # type: ignore[attr-defined]
            connection.timeout = remaining  # the connect's, per step
            try:
                connection.request("POST", self._path, body, self._headers)
                response = connection.getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                self.close()
                if fresh:
                    raise
                continue
            if response.will_close:
                self.close()
            return response.status, _retry_after(response.getheader("retry-after"))
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (an HTTP date is not honoured: the backoff applies)."""
    try:
        seconds = float(value or "")
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


# OTLP/gRPC: the service method, and the status codes the OTLP specification calls
# retryable (RESOURCE_EXHAUSTED only when the receiver says when to retry, in RetryInfo)
EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
GRPC_RETRYABLE = frozenset({"CANCELLED", "DEADLINE_EXCEEDED", "ABORTED", "OUT_OF_RANGE",
                            "UNAVAILABLE", "DATA_LOSS"})


class GrpcSender(_Retrying):
    """Sends encoded requests as TraceService/Export calls over one gRPC channel
    (http://: plaintext, https://: TLS with gRPC's root certificates, or the file
    GRPC_DEFAULT_SSL_ROOTS_FILE_PATH names)."""

    def __init__(self, endpoint: str, headers: Mapping[str, str], timeout: float,
                 stop: threading.Event):
        import grpc  # imported here: only a gRPC export needs it (and its threads)

        super().__init__(endpoint, timeout, stop)
        url = urllib.parse.urlsplit(endpoint)
        https = url.scheme == "https"
        host = url.hostname or "localhost"
        target = f"[{host}]:" if ":" in host else f"{host}:"
        target += str(url.port or (443 if https else 80))
        self._channel = (grpc.secure_channel(target, grpc.ssl_channel_credentials())
                         if https else grpc.insecure_channel(target))
        # no serializers: the request goes out as the bytes given, the answer is not parsed
        self._export = self._channel.unary_unary(EXPORT_METHOD)
        self._metadata = tuple((name.lower(), value) for name, value in headers.items())
        self._error = grpc.RpcError

    def _attempt(self, body: bytes, deadline: float) -> tuple[bool | None, float | None]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None, None
        try:
            self._export(body, timeout=remaining, metadata=self._metadata)
        except self._error as error:
            code = error.code().name if hasattr(error, "code") else "UNKNOWN"
            delay = _retry_delay(error)
            if code in GRPC_RETRYABLE or (code == "RESOURCE_EXHAUSTED" and delay is not None):
                return None, delay
            return False, None
        return True, None

    def close(self) -> None:
        self._channel.close()


def _retry_delay(error: Any) -> float | None:
    """The RetryInfo delay in a gRPC error's status details, if the receiver sent one."""
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailers or ():
        if key != "grpc-status-details-bin":
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except DecodeError:
            return None
        for detail in status.details:
            info = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                delay = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
                return delay if delay >= 0 else None
    return None
