"""OTLP/HTTP protobuf for the tracer's span records (exporter/tracing.py): the encoder
and the sender.

The encoder writes an ExportTraceServiceRequest (opentelemetry-proto's
collector/trace/v1) directly from the records, in batches, on the export thread:
one ResourceSpans with the resource and one ScopeSpans, the scope and the spans,
with exactly the fields the SDK's encoder (opentelemetry-exporter-otlp-proto-common
`encode_spans`) sets for the same span: ids, trace state, parent, name, kind, start
and end, attributes, status and flags (SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE, and
IS_REMOTE for a remote parent). Encoded names and string attributes are kept (a
bounded cache), so a span costs a few struct packs and joins.

Why not the SDK's OTLPSpanExporter: its export() takes ReadableSpans and builds a
protobuf object for every span, attribute and value, 20 to 30 times the CPU of
writing the bytes here (benchmarks/bench_tracing.py, part "encode"), and all of it
holds the GIL the requests need; the part of it that sends bytes is private API.
tests/unit/test_otlp.py decodes our output with opentelemetry-proto's classes and
compares it with encode_spans() of the same spans.

The sender POSTs the bytes with httpx (the SDK's rules: 2xx is success; 429, 502,
503, 504 and connection errors are retried with exponential backoff and jitter, or
after Retry-After, while the export's time lasts; anything else fails at once).
"""

from __future__ import annotations

import random
import struct
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import httpx
from opentelemetry.trace import SpanKind
from opentelemetry.trace.span import TraceState

CONTENT_TYPE = "application/x-protobuf"
RETRYABLE = frozenset({429, 502, 503, 504})
MAX_ATTEMPTS = 6
JITTER = 0.2
MAX_CACHED = 4096  # encoded names and string attributes kept

# Span.SpanKind in trace.proto: the API's enum shifted by one (0 is UNSPECIFIED)
SPAN_KINDS = {SpanKind.INTERNAL: b"\x30\x01", SpanKind.SERVER: b"\x30\x02",
              SpanKind.CLIENT: b"\x30\x03", SpanKind.PRODUCER: b"\x30\x04",
              SpanKind.CONSUMER: b"\x30\x05"}
# Span.flags (field 16, fixed32): SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK, | IS_REMOTE
_LOCAL_FLAGS = b"\x85\x01" + struct.pack("<I", 0x100)
_REMOTE_FLAGS = b"\x85\x01" + struct.pack("<I", 0x300)
_UNSET_STATUS = b"\x7a\x00"  # Span.status, an empty Status (code UNSET), as the SDK sends it
_ERROR_CODE = b"\x18\x02"  # Status.code = STATUS_CODE_ERROR

# trace_id (1, 16 bytes), span_id (2, 8 bytes), parent_span_id (4, 8 bytes) as one pack
_IDS = struct.Struct(">2sQQ2sQ")
_IDS_PARENT = struct.Struct(">2sQQ2sQ2sQ")
_TIMES = struct.Struct("<sQsQ")  # start_time_unix_nano (7), end_time_unix_nano (8)
_TRACE_ID, _SPAN_ID, _PARENT_ID = b"\x0a\x10", b"\x12\x08", b"\x22\x08"
_START, _END = b"\x39", b"\x41"
_LOW_64 = (1 << 64) - 1
_DOUBLE = struct.Struct("<d")


class SpanRecord(Protocol):
    """What the encoder reads from a finished span (exporter.tracing.Span)."""

    trace_id: int
    span_id: int
    parent_id: int  # 0: a root
    remote: bool  # the parent is another process's span
    trace_state: TraceState | None
    name: str
    kind: SpanKind
    start_ns: int
    end_ns: int
    attributes: Mapping[str, Any]
    error: str  # "": status UNSET; else ERROR with this message


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
        self._names: dict[str, bytes] = {}
        self._strings: dict[tuple[str, str], bytes] = {}

    def _name(self, name: str) -> bytes:
        encoded = _field(b"\x2a", name.encode()) if name else b""
        if len(self._names) < MAX_CACHED:
            self._names[name] = encoded
        return encoded

    def _attributes(self, attributes: Mapping[str, Any]) -> bytes:
        strings = self._strings
        parts = []
        for key, value in attributes.items():
            if value.__class__ is str:
                encoded = strings.get((key, value))
                if encoded is None:
                    encoded = key_value(key, value, b"\x4a")
                    if len(strings) < MAX_CACHED:
                        strings[(key, value)] = encoded  # type: ignore[assignment]
            else:
                encoded = key_value(key, value, b"\x4a")
            if encoded is not None:
                parts.append(encoded)
        return b"".join(parts)

    def encode(self, spans: Iterable[SpanRecord]) -> bytes:
        names = self._names
        out = [self._scope]
        append = out.append
        for span in spans:
            trace_id = span.trace_id
            if span.parent_id:
                ids = _IDS_PARENT.pack(_TRACE_ID, trace_id >> 64, trace_id & _LOW_64, _SPAN_ID,
                                       span.span_id, _PARENT_ID, span.parent_id)
            else:
                ids = _IDS.pack(_TRACE_ID, trace_id >> 64, trace_id & _LOW_64, _SPAN_ID,
                                span.span_id)
            name = names.get(span.name)
            if name is None:
                name = self._name(span.name)
            error = span.error
            if error:
                status = _field(b"\x7a", _field(b"\x12", error.encode()) + _ERROR_CODE)
            else:
                status = _UNSET_STATUS
            parts = [ids, name, SPAN_KINDS[span.kind],
                     _TIMES.pack(_START, span.start_ns, _END, span.end_ns),
                     self._attributes(span.attributes) if span.attributes else b"", status,
                     _REMOTE_FLAGS if span.remote else _LOCAL_FLAGS]
            trace_state = span.trace_state
            if trace_state:
                parts.append(_field(b"\x1a", ",".join(
                    f"{key}={value}" for key, value in trace_state.items()).encode()))
            body = b"".join(parts)
            append(b"\x12")  # ScopeSpans.spans
            append(_length(len(body)))
            append(body)
        scope_spans = b"".join(out)
        resource_spans = self._resource + b"\x12" + _length(len(scope_spans)) + scope_spans
        return b"\x0a" + _length(len(resource_spans)) + resource_spans


class Sender:
    """POSTs encoded requests to the OTLP/HTTP traces endpoint; `stop` (set at shutdown)
    cuts a backoff short."""

    def __init__(self, endpoint: str, headers: Mapping[str, str], timeout: float,
                 stop: threading.Event):
        self.endpoint = endpoint
        self.timeout = timeout
        self.stop = stop
        self.client = httpx.Client(headers={**headers, "content-type": CONTENT_TYPE},
                                   timeout=timeout)

    def send(self, body: bytes) -> bool:
        deadline = time.monotonic() + self.timeout
        for attempt in range(MAX_ATTEMPTS):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            backoff = 2 ** attempt * random.uniform(1 - JITTER, 1 + JITTER)  # noqa: S311 - jitter
            try:
                response = self.client.post(self.endpoint, content=body, timeout=remaining)
            except httpx.TransportError:
                pass
            else:
                if 200 <= response.status_code < 300:
                    return True
                if response.status_code not in RETRYABLE:
                    return False
                backoff = _retry_after(response) or backoff
            if backoff > deadline - time.monotonic() or self.stop.wait(backoff):
                return False
        return False

    def close(self) -> None:
        self.client.close()


def _retry_after(response: httpx.Response) -> float | None:
    try:
        seconds = float(response.headers.get("retry-after", ""))
    except ValueError:
        return None
    return seconds if seconds >= 0 else None
