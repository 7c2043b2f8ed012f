"""Tracing end to end: the real exporter process exports OTLP/HTTP protobuf to a local
receiver that decodes it (opentelemetry-proto); a caller's traceparent continues
through the exporter; exemplars and the performance API reflect the same requests;
an unreachable receiver never costs a request."""

from __future__ import annotations

import http.server
import secrets
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_families
from prometheus_client.parser import text_string_to_metric_families

from exporter.otlp import Sender
from exporter.probes import build_probes
from tests.exporter_process import ExporterProcess
from tests.integration.components import (
    DribblingHTTPServer,
    OTLPReceiver,
    RecordingHTTPServer,
    free_port,
)

LOGIN = "carol@example.test"
REMOTE = "198.51.100.23"


def traceparent(sampled: bool = True) -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


def tracing_config(directory: Path, endpoint: str, **tracing: object) -> Path:
    headers = directory / "otlp-headers"
    headers.write_text("# secret headers\nAuthorization=Bearer%20s3cret-token\n")
    config = {
        "server": {"state_dir": str(directory / "state")},
        "security": {"trusted_networks": [], "store": {"type": "memory"}},
        "tracing": {"enabled": True, "service_name": "a3mailer-under-test",
                    "sampling_rate": 0.0, "otlp_endpoint": endpoint,
                    "otlp_headers": {"X-Scope-OrgID": "tenant-a"},
                    "otlp_headers_file": str(headers), "batch_timeout": "200ms", **tracing},
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def policy(url: str, command: str, headers: dict[str, str], **fields: object) -> httpx.Response:
    body = {"login": LOGIN, "remote": REMOTE, "pwhash": "5f4dcc3b", "protocol": "imap",
            "session_id": "sess-1", **fields}
    return httpx.post(f"{url}/dovecot/policy?command={command}", json=body, headers=headers,
                      timeout=10)


def metric(url: str, name: str, **labels: str) -> float | None:
    text = httpx.get(url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                return sample.value
    return None


def wait_for_metric(url: str, name: str, at_least: float, timeout: float = 20,
                    **labels: str) -> float:
    """The sample's value once it reaches `at_least` (or its last value at the timeout)."""
    deadline = time.monotonic() + timeout
    value = 0.0
    while time.monotonic() < deadline:
        value = metric(url, name, **labels) or 0.0
        if value >= at_least:
            break
        time.sleep(0.2)
    return value


@pytest.fixture(scope="module")
def receiver():
    with OTLPReceiver() as server:
        yield server


@pytest.fixture(scope="module")
def exporter(receiver, tmp_path_factory):
    directory = tmp_path_factory.mktemp("traced")
    proc = ExporterProcess(directory, tracing_config(directory, receiver.url))
    proc.start()
    yield proc
    proc.stop()


def test_a_callers_trace_continues_through_a_policy_decision(exporter, receiver):
    trace_id, caller_span, header = traceparent()
    headers = {"traceparent": header, "tracestate": "mail=frontend1",
               "baggage": "tenant=t1,session.origin=imap"}
    answer = policy(exporter.url, "allow", headers)
    assert answer.status_code == 200 and answer.json() == {"status": 0, "msg": ""}

    spans = receiver.wait_for_spans(lambda s: s.trace_id == trace_id, count=3)
    by_name = {span.name: span for span in spans}
    server = by_name["POST /dovecot/policy"]
    assert server.kind == "SPAN_KIND_SERVER"
    assert server.parent_span_id == caller_span  # the caller's span is our parent
    assert server.attributes["http.request.method"] == "POST"
    assert server.attributes["http.route"] == "/dovecot/policy"
    assert server.attributes["url.path"] == "/dovecot/policy"
    assert server.attributes["http.response.status_code"] == 200
    assert server.resource["service.name"] == "a3mailer-under-test"
    assert server.scope == "a3mailer-exporter"

    check = by_name["security check"]
    assert check.parent_span_id == server.span_id
    assert check.attributes["a3mailer.security.action"] == "allow"
    assert check.attributes["a3mailer.security.reason"] == "ok"
    assert check.attributes["a3mailer.security.protocol"] == "imap"

    store_spans = [s for s in spans if s.name.startswith("store ")]
    assert {s.name for s in store_spans} == {"store login_state"}  # one store call a check
    for span in store_spans:
        assert span.parent_span_id == check.span_id
        assert span.attributes["db.operation.name"] == span.name.removeprefix("store ")
        assert span.start_ns >= check.start_ns and span.end_ns <= check.end_ns

    # nothing personal or secret in any attribute
    for span in spans:
        for value in span.attributes.values():
            assert LOGIN not in str(value) and REMOTE not in str(value)
            assert "5f4dcc3b" not in str(value) and "sess-1" not in str(value)
    # export headers: inline for plain values, from the secret file for the token
    assert server.headers["x-scope-orgid"] == "tenant-a"
    assert server.headers["authorization"] == "Bearer s3cret-token"


def test_exemplars_and_the_performance_api_show_the_same_request(exporter, receiver):
    trace_id, _, header = traceparent()
    assert policy(exporter.url, "report", {"traceparent": header},
                  success=False).status_code == 200
    receiver.wait_for_spans(lambda s: s.trace_id == trace_id and s.name == "security report")
    text = httpx.get(exporter.url + "/metrics", timeout=10,
                     headers={"accept": "application/openmetrics-text"}).text
    exemplars = [sample.exemplar for family in om_families(text)
                 if family.name == "a3mailer_exporter_http_request_duration_seconds"
                 for sample in family.samples
                 if sample.labels.get("handler") == "/dovecot/policy" and sample.exemplar]
    assert trace_id in {e.labels["trace_id"] for e in exemplars}
    store_exemplars = [sample.exemplar.labels["trace_id"] for family in om_families(text)
                       if family.name == "a3mailer_security_store_operation_duration_seconds"
                       for sample in family.samples if sample.exemplar]
    assert store_exemplars

    body = httpx.get(exporter.url + "/api/v1/performance", timeout=10).json()
    operations = {(o["path"], o["operation"]): o["windows"] for o in body["operations"]}
    policy_1m = operations[("http", "/dovecot/policy")]["1m"]
    assert policy_1m["count"] >= 2 and policy_1m["errors"] == 0
    assert 0 < policy_1m["p50"] <= policy_1m["p99"]
    assert operations[("security", "report")]["1m"]["count"] >= 1
    assert operations[("store", "record_login_failure")]["1m"]["count"] >= 1
    assert body["relative_error"] == 0.02
    bad = httpx.get(exporter.url + "/api/v1/performance?path=nope", timeout=10)
    assert bad.status_code == 400 and bad.json()["error"] == "bad_request"
    assert metric(exporter.url, "a3mailer_tracing_spans_exported_total") >= 4


def test_prometheus_stores_the_trace_id_exemplars_it_scrapes(exporter, prometheus_factory):
    """Prometheus 2.42 asks for OpenMetrics first; with exemplar storage on it keeps our
    trace ids, so a dashboard can jump from a latency bucket to the trace."""
    prom = prometheus_factory(targets=[{"job": "traced", "targets": [exporter.address]}],
                              extra_args=["--enable-feature=exemplar-storage"])
    prom.wait_target_up("traced")
    trace_id, _, header = traceparent()
    assert policy(exporter.url, "allow", {"traceparent": header}).status_code == 200
    query = 'a3mailer_exporter_http_request_duration_seconds_bucket{handler="/dovecot/policy"}'
    deadline = time.monotonic() + 30
    seen: set[str] = set()
    while trace_id not in seen and time.monotonic() < deadline:
        now = time.time()
        series = prom._api("/api/v1/query_exemplars", query=query, start=str(now - 300),
                           end=str(now + 5))
        seen = {e["labels"]["trace_id"] for s in series for e in s["exemplars"]}
        time.sleep(0.5)
    assert trace_id in seen


def test_sampling_follows_the_callers_decision(exporter, receiver):
    """Rate 0 here: a new trace is never sampled, a caller's sampled one always is, an
    unsampled one never; the 'after' request flushes the batch that would hold them."""
    unsampled_id, _, unsampled = traceparent(sampled=False)
    assert policy(exporter.url, "allow", {"traceparent": unsampled}).status_code == 200
    assert httpx.get(exporter.url + "/livez", timeout=10).status_code == 200  # a new trace
    after_id, _, after = traceparent()
    assert policy(exporter.url, "allow", {"traceparent": after}).status_code == 200
    receiver.wait_for_spans(lambda s: s.trace_id == after_id, count=3)
    time.sleep(0.5)  # two more batch intervals: anything else queued has been sent
    assert receiver.trace(unsampled_id) == []
    assert not [s for s in receiver.spans if s.name == "GET /livez"]
    assert metric(exporter.url, "a3mailer_tracing_sampling_ratio") == 0.0


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_receiver_unreachable_requests_served_and_spans_counted(exporter_process, tmp_path,
                                                                protocol):
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = exporter_process(tracing_config(tmp_path, closed, sampling_rate=1.0,
                                           batch_timeout="1s", otlp_protocol=protocol))
    for _ in range(30):
        assert policy(proc.url, "allow", {}).status_code == 200
    dropped = wait_for_metric(proc.url, "a3mailer_tracing_spans_dropped_total", 30,
                              reason="export_failed")
    assert dropped >= 30  # at least the 30 server spans (their children too)
    assert metric(proc.url, "a3mailer_tracing_spans_exported_total") == 0
    assert policy(proc.url, "allow", {}).status_code == 200  # still serving
    assert "span export failing" in proc.log()


@pytest.mark.parametrize("body", [False, True], ids=["slow-headers", "slow-body"])
def test_the_http_export_time_bounds_the_whole_exchange(body):
    """A receiver that answers a header line (or a body byte) every 0.2 s is cut off at
    the export's time, 1 s here. Each read alone is quick, so a per-read timeout never
    fires: before, the send took 20 s (http.client's 100-header limit) or, for the body,
    100,000 bytes at 0.2 s each."""
    with DribblingHTTPServer(gap=0.2, body=body) as slow:
        sender = Sender(slow.url + "/v1/traces", {}, 1.0, threading.Event())
        started = time.monotonic()
        ok = sender.send(b"\x0a\x00")
        took = time.monotonic() - started
        sender.close()
    assert ok is False
    assert 0.9 < took < 2.5, f"the send took {took:.1f} s"


class _KeepAliveHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keeps the connection, as OTLP collectors do

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return None


def test_a_kept_alive_export_connection_gets_a_fresh_deadline_per_send():
    """The deadline moves on with each send: a connection kept alive for longer than
    the export's time still sends (and is the same connection)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _KeepAliveHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sender = Sender(f"http://127.0.0.1:{server.server_address[1]}/v1/traces", {}, 1.0,
                    threading.Event())
    try:
        assert sender.send(b"") is True
        first = sender._connection
        time.sleep(1.3)
        assert sender.send(b"") is True
        assert first is not None and sender._connection is first
    finally:
        sender.close()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_sigterm_is_not_held_up_by_a_receiver_that_never_answers(exporter_process, tmp_path,
                                                                 protocol):
    """Queued spans get one export at SIGTERM, for at most 5 s, whatever batch_timeout
    (the export's own time) is: here 30 s against a receiver that takes the request
    and never answers (the kernel accepts the connection; nobody reads it)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        proc = exporter_process(tracing_config(tmp_path, endpoint, sampling_rate=1.0,
                                               batch_timeout="30s", otlp_protocol=protocol))
        for _ in range(5):
            assert policy(proc.url, "allow", {}).status_code == 200
        assert proc.proc is not None
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        code = proc.proc.wait(25)
        took = time.monotonic() - started
    finally:
        silent.close()
    assert code == 0
    assert took < 12, f"exit took {took:.1f} s"  # 30 s before the fix


def test_a_postfix_policy_decision_is_a_span_of_its_own(exporter_process, receiver, tmp_path):
    """The Postfix policy server's decisions (bans, sending rate) are security decisions:
    each is a root span with its bounded outcome, and a latency sample."""
    port = free_port()
    config = tracing_config(tmp_path, receiver.url, sampling_rate=1.0,
                            service_name="a3mailer-postfix-spans")
    data = yaml.safe_load(config.read_text())
    data["security"]["postfix_policy"] = {"enabled": True, "listen": f"127.0.0.1:{port}"}
    config.write_text(yaml.safe_dump(data))
    proc = exporter_process(config)
    request = (f"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address={REMOTE}\n"
               f"sasl_username={LOGIN}\n\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(request)
        assert client.recv(100) == b"action=DUNNO\n\n"
    span, = receiver.wait_for_spans(
        lambda s: s.resource["service.name"] == "a3mailer-postfix-spans"
        and s.name == "security postfix_policy")
    assert span.parent_span_id == "" and span.status != "STATUS_CODE_ERROR"
    assert span.attributes["a3mailer.security.action"] == "dunno"
    assert span.attributes["a3mailer.security.protocol_state"] == "RCPT"
    assert LOGIN not in str(span.attributes) and REMOTE not in str(span.attributes)
    body = httpx.get(proc.url + "/api/v1/performance?path=security", timeout=10).json()
    windows = {o["operation"]: o["windows"]["1m"] for o in body["operations"]}
    assert windows["postfix_policy"]["count"] == 1


async def test_a_traced_http_probe_carries_its_trace_and_baggage_to_the_server(otlp_tracing):
    from opentelemetry import baggage
    from opentelemetry import context as otel_context

    traced, receiver = otlp_tracing
    with RecordingHTTPServer() as server:
        probes = build_probes({"probes": [{"name": "jmap", "protocol": "http",
                                           "host": server.host, "port": server.port,
                                           "path": "/.well-known/jmap"}]})
        token = otel_context.attach(baggage.set_baggage("deployment", "eu-1"))
        try:
            outcome = await probes.runs["jmap"].once()
        finally:
            otel_context.detach(token)
        assert outcome.value is not None and outcome.value.success, outcome.value
        request = server.wait_for_request(lambda r: r.path == "/.well-known/jmap")
    assert traced.force_flush()
    root, = receiver.wait_for_spans(lambda s: s.name == "probe-jmap")
    response, = receiver.wait_for_spans(lambda s: s.name == "http response")
    assert response.parent_span_id == root.span_id
    # the server sees the probe's trace, with the span that sent the request as parent
    version, trace_id, parent_id, flags = request.headers["traceparent"].split("-")
    assert (version, trace_id, parent_id) == ("00", root.trace_id, response.span_id)
    assert int(flags, 16) & 1  # sampled (the SDK also sets W3C level 2's random bit)
    assert request.headers["baggage"] == "deployment=eu-1"


def test_the_exporters_own_probe_runs_are_traced(exporter_process, receiver, tmp_path):
    """A probe scheduled by the real exporter: its run and phases reach the receiver, its
    request carries the run's trace to the server, its latency is in the monitor."""
    with RecordingHTTPServer() as web:
        config = tracing_config(tmp_path, receiver.url, sampling_rate=1.0)
        data = yaml.safe_load(config.read_text())
        data["monitoring"] = {"probes": [{"name": "web", "protocol": "http",
                                          "host": web.host, "port": web.port,
                                          "path": "/healthz/live", "interval": "1s"}]}
        config.write_text(yaml.safe_dump(data))
        proc = exporter_process(config)
        request = web.wait_for_request(lambda r: "traceparent" in r.headers)
    trace_id = request.headers["traceparent"].split("-")[1]
    spans = receiver.wait_for_spans(lambda s: s.trace_id == trace_id, count=3)
    root, = [s for s in spans if s.name == "probe-web"]
    assert root.parent_span_id == "" and root.attributes["a3mailer.schedule"] == "probe-web"
    assert root.attributes["server.port"] == web.port
    assert {s.name for s in spans if s.parent_span_id == root.span_id} == {
        "http connect", "http response"}
    body = httpx.get(proc.url + "/api/v1/performance?path=schedule", timeout=10).json()
    runs = {o["operation"]: o["windows"]["1m"] for o in body["operations"]}
    assert runs["probe-web"]["count"] >= 1
