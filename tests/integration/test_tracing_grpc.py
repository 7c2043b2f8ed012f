"""OTLP over gRPC (tracing.otlp_protocol: grpc): the real exporter process exports to a
local grpcio receiver that decodes the calls with opentelemetry-proto; the sender's
retry rules against the status codes a receiver answers; TLS that is checked."""

from __future__ import annotations

import os
import threading
import time

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from exporter.otlp import GrpcSender
from tests.integration.components import OTLPGrpcReceiver, make_self_signed_cert
from tests.integration.test_tracing import (
    LOGIN,
    REMOTE,
    policy,
    traceparent,
    tracing_config,
    wait_for_metric,
)


def grpc_config(directory, endpoint: str, **tracing: object):
    return tracing_config(directory, endpoint, otlp_protocol="grpc", **tracing)


def test_a_callers_trace_continues_through_a_policy_decision_over_grpc(exporter_process,
                                                                       tmp_path):
    with OTLPGrpcReceiver() as receiver:
        proc = exporter_process(grpc_config(tmp_path, receiver.url))
        trace_id, caller_span, header = traceparent()
        answer = policy(proc.url, "allow", {"traceparent": header})
        assert answer.status_code == 200 and answer.json() == {"status": 0, "msg": ""}
        spans = receiver.wait_for_spans(lambda s: s.trace_id == trace_id, count=3)
    by_name = {span.name: span for span in spans}
    server = by_name["POST /dovecot/policy"]
    assert server.kind == "SPAN_KIND_SERVER" and server.parent_span_id == caller_span
    assert server.attributes["http.route"] == "/dovecot/policy"
    assert server.resource["service.name"] == "a3mailer-under-test"
    assert by_name["security check"].parent_span_id == server.span_id
    assert by_name["store login_state"].parent_span_id == by_name["security check"].span_id
    for span in spans:
        assert LOGIN not in str(span.attributes) and REMOTE not in str(span.attributes)
    # the export headers are the call's metadata (lower case), the secret one included
    assert server.headers["x-scope-orgid"] == "tenant-a"
    assert server.headers["authorization"] == "Bearer s3cret-token"
    assert receiver.errors == []
    # counted once the call has returned, which may be a moment after the receiver has them
    assert wait_for_metric(proc.url, "a3mailer_tracing_spans_exported_total",
                           len(receiver.spans)) == len(receiver.spans)


def test_grpc_export_over_tls_checks_the_receivers_certificate(exporter_process, tmp_path):
    """https:// is TLS: trusted through GRPC_DEFAULT_SSL_ROOTS_FILE_PATH the spans arrive;
    without it the same self-signed receiver is refused and its spans counted dropped."""
    cert, key = make_self_signed_cert(tmp_path)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    with OTLPGrpcReceiver(credentials=credentials) as receiver:
        assert receiver.url.startswith("https://127.0.0.1:")
        trusting = {**os.environ, "PYTHONUNBUFFERED": "1",
                    "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(cert)}
        (tmp_path / "trusting").mkdir()
        proc = exporter_process(grpc_config(tmp_path / "trusting", receiver.url,
                                            sampling_rate=1.0), env=trusting)
        assert policy(proc.url, "allow", {}).status_code == 200
        receiver.wait_for_spans(lambda s: s.name == "POST /dovecot/policy")

        untrusting = {k: v for k, v in trusting.items()
                      if k != "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"}
        (tmp_path / "untrusting").mkdir()
        other = exporter_process(grpc_config(tmp_path / "untrusting", receiver.url,
                                             sampling_rate=1.0, service_name="untrusting"),
                                 env=untrusting)
        assert policy(other.url, "allow", {}).status_code == 200
        dropped = wait_for_metric(other.url, "a3mailer_tracing_spans_dropped_total", 3,
                                  reason="export_failed")
        assert dropped >= 3  # the request's three spans
        assert not [s for s in receiver.spans if s.resource["service.name"] == "untrusting"]


def retry_info(seconds: float) -> tuple[tuple[str, bytes], ...]:
    """Trailing metadata asking the client to retry after `seconds` (google.rpc)."""
    detail = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="slow down")
    info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(
        seconds=int(seconds), nanos=int(seconds % 1 * 1e9)))
    detail.details.add().Pack(info)
    return (("grpc-status-details-bin", detail.SerializeToString()),)


@pytest.mark.parametrize(("code", "trailers", "sent", "calls", "waited"), [
    # retryable: tried again after the first backoff (1 s with 20 % jitter)
    (grpc.StatusCode.UNAVAILABLE, (), True, 2, (0.8, 1.3)),
    (grpc.StatusCode.DEADLINE_EXCEEDED, (), True, 2, (0.8, 1.3)),
    # not retryable: dropped at once
    (grpc.StatusCode.INVALID_ARGUMENT, (), False, 1, (0, 0.5)),
    (grpc.StatusCode.UNAUTHENTICATED, (), False, 1, (0, 0.5)),
    # RESOURCE_EXHAUSTED: only with RetryInfo, and after the delay it asks for
    (grpc.StatusCode.RESOURCE_EXHAUSTED, (), False, 1, (0, 0.5)),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, retry_info(0.3), True, 2, (0.3, 0.75)),
    (grpc.StatusCode.UNAVAILABLE, retry_info(0.3), True, 2, (0.3, 0.75)),
])
def test_grpc_sender_retries_what_the_otlp_specification_calls_retryable(
        code, trailers, sent, calls, waited):
    with OTLPGrpcReceiver() as receiver:
        receiver.refuse, receiver.refusals = (code, trailers), 1
        sender = GrpcSender(receiver.url, {"X-Scope-OrgID": "t1"}, 5.0, threading.Event())
        started = time.monotonic()
        try:
            assert sender.send(b"") is sent  # an empty ExportTraceServiceRequest
        finally:
            sender.close()
        took = time.monotonic() - started
    assert receiver.calls == calls
    assert waited[0] <= took < waited[1], f"took {took:.2f} s"

