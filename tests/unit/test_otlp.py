"""The OTLP encoder (exporter/otlp.py) against the SDK's: our bytes, decoded with
opentelemetry-proto's classes, are the message encode_spans() makes of the same spans
(as the SDK's ReadableSpans that Tracing.readable builds from our records)."""

from __future__ import annotations

import math
import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.trace import SpanKind
from opentelemetry.trace.span import TraceState

from exporter import __version__
from exporter.otlp import Encoder
from exporter.tracing import SCOPE, Span, Trace, Tracing, TracingSettings, resource

TRACING = Tracing(TracingSettings())  # disabled: no thread; its readable() is used
TRACING.resource = resource("otlp-test")


def record(name: str = "store get_lock", kind: SpanKind = SpanKind.INTERNAL,
           attributes: dict[str, Any] | None = None, parent: int = 0, remote: bool = False,
           trace_state: TraceState | None = None, error: str = "",
           trace_id: int | None = None) -> Span:
    trace_id = trace_id or random.getrandbits(128) or 1
    trace = Trace(trace_id, 1, trace_state, parent if remote else -1)
    span = Span(trace, parent, "store", "x", name, kind, attributes, "")
    span.start_ns = 1_700_000_000_000_000_000 + random.getrandbits(30)
    span.end_ns = span.start_ns + random.getrandbits(20)
    span.error = error
    return span


def ours(spans: list[Span]) -> ExportTraceServiceRequest:
    assert TRACING.resource is not None
    encoder = Encoder(TRACING.resource.attributes, SCOPE, __version__)
    message = ExportTraceServiceRequest()
    message.ParseFromString(encoder.encode(spans))
    again = ExportTraceServiceRequest()
    again.ParseFromString(encoder.encode(spans))  # from the caches this time
    assert again == message
    return message


def sdks(spans: list[Span]) -> ExportTraceServiceRequest:
    return encode_spans([TRACING.readable(span) for span in spans])


def test_every_field_we_use_encodes_as_the_sdk_encodes_it():
    root = record("POST /dovecot/policy", SpanKind.SERVER, {
        "http.request.method": "POST", "server.port": 10587, "http.response.status_code": 200,
        "url.path": "/dovecot/policy"})
    spans = [
        root,
        record(attributes={"db.operation.name": "get_lock", "db.system.name": "sqlite"},
               parent=root.span_id, trace_id=root.trace.trace_id),
        record("store get_lock", SpanKind.CLIENT, {"db.system.name": "redis"},
               parent=root.span_id, trace_id=root.trace.trace_id, error="StoreUnavailable"),
        record("security check", attributes={"a3mailer.security.success": False,
                                             "a3mailer.security.ratio": 0.25,
                                             "a3mailer.security.none": None}),
        record("GET", SpanKind.SERVER, {"negative": -5, "big": 2 ** 63 - 1,
                                        "too.big": 2 ** 64, "list": ["a", "b"],
                                        "ints": (1, 2, 3), "mixed": [1, object()],
                                        "bytes": b"\x00\x01", "map": {"a": 1, "b": "x"},
                                        "object": object(), "empty": ""}),
        record("continued", SpanKind.SERVER, parent=0xB7AD6B7169203331, remote=True,
               trace_state=TraceState([("mail", "frontend1"), ("x", "1")])),
        record("", SpanKind.PRODUCER),
        record("consumer", SpanKind.CONSUMER, {"k": True}),
        record("consumer", SpanKind.CONSUMER, {"k": 1}),  # True == 1, encoded apart
        record("consumer", SpanKind.INTERNAL, {"k": 1.0}),  # a name with another kind
    ]
    mine, theirs = ours(spans), sdks(spans)
    assert mine == theirs
    decoded = mine.resource_spans[0].scope_spans[0]
    assert decoded.scope.name == SCOPE and decoded.scope.version == __version__
    assert {a.key for a in mine.resource_spans[0].resource.attributes} >= {
        "service.name", "service.version", "telemetry.sdk.language"}
    values = [span.attributes[0].value for span in decoded.spans[7:10]]
    assert [v.WhichOneof("value") for v in values] == ["bool_value", "int_value",
                                                       "double_value"]
    assert decoded.spans[5].flags == 0x300 and decoded.spans[0].flags == 0x100
    assert decoded.spans[5].trace_state == "mail=frontend1,x=1"
    assert decoded.spans[2].status.code == 2 and decoded.spans[2].status.message == (
        "StoreUnavailable")
    skipped = {a.key for a in decoded.spans[4].attributes}
    assert "too.big" not in skipped and "object" not in skipped and "mixed" not in skipped


scalars = st.one_of(st.text(max_size=20), st.booleans(),
                    st.integers(min_value=-(2 ** 63), max_value=2 ** 63 - 1),
                    st.floats(allow_nan=False), st.binary(max_size=10), st.none())
values = st.one_of(scalars, st.lists(st.one_of(st.text(max_size=5), st.integers(0, 9)),
                                     max_size=3))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(
    st.sampled_from(["store get_lock", "security check", "POST /x", ""]),
    st.sampled_from(list(SpanKind)),
    st.dictionaries(st.sampled_from(["a", "b", "db.operation.name", "k"]), values,
                    max_size=4),
    st.booleans(), st.booleans(), st.sampled_from(["", "timeout", "KeyError"])),
    min_size=1, max_size=8))
def test_random_spans_encode_as_the_sdk_encodes_them(shapes):
    spans = [record(name, kind, attributes, parent=random.getrandbits(64) or 1 if child else 0,
                    remote=child and remote, error=error)
             for name, kind, attributes, child, remote, error in shapes]
    mine, theirs = ours(spans), sdks(spans)
    assert mine == theirs
    for span, decoded in zip(spans, mine.resource_spans[0].scope_spans[0].spans, strict=True):
        assert decoded.trace_id == span.trace.trace_id.to_bytes(16, "big")
        assert decoded.end_time_unix_nano - decoded.start_time_unix_nano == (
            span.end_ns - span.start_ns)
        for attribute in decoded.attributes:
            if attribute.value.WhichOneof("value") == "double_value":
                assert not math.isnan(attribute.value.double_value)


def test_shared_attribute_mappings_are_kept_by_identity_and_the_cache_stays_bounded(
        monkeypatch):
    # the store's constant dicts and the middleware's per kind of answer are shared by
    # every span of their kind; one-off mappings (a collector run's) fill the cache
    monkeypatch.setattr("exporter.otlp.MAX_CACHED", 4)
    shared = {"db.operation.name": "get_lock", "db.system.name": "sqlite"}
    spans = [record(attributes=shared) for _ in range(3)]
    spans += [record(attributes={"a3mailer.collector": f"c{i}"}) for i in range(9)]
    spans += [record(attributes=shared)]
    owned = record(attributes=shared)
    owned.set_attribute("error.type", "timeout")  # copied: the shared one is untouched
    spans.append(owned)
    assert ours(spans) == sdks(spans)
    assert shared == {"db.operation.name": "get_lock", "db.system.name": "sqlite"}
    assert owned.owned and not spans[0].owned
