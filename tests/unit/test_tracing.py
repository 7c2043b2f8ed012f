"""Tracing in process: sampling, propagation, drop counting, and every hook's spans.

Spans go to the SDK's InMemorySpanExporter (or a failing/blocking exporter for the
drop counters); the OTLP/HTTP path is tested against a real receiver in
tests/integration/test_tracing.py.
"""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
import yaml
from opentelemetry import baggage
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace import SpanKind, StatusCode

from exporter import tracing
from exporter.config import ConfigError, load_config, parse_headers
from exporter.http import create_app
from exporter.performance import PerformanceMonitor
from exporter.probes import build_probes
from exporter.probes.target import ProbeResult
from exporter.schedule import Periodic
from exporter.service import Exporter
from exporter.tracing import (
    ObservedStore,
    Tracing,
    TracingSettings,
    observe,
    outgoing_headers,
)
from security.attempts import Attempt
from security.engine import SecurityManager
from security.settings import Settings
from security.store import StoreUnavailable
from security.store.memory import MemoryStore
from security.store.sqlite import SqliteStore


@pytest.fixture
def traced():
    """make(rate, exporter) -> (tracing, monitor, exporter), installed for the test."""
    previous = tracing.installed()
    made: list[Tracing] = []

    def make(rate: float = 1.0, exporter: SpanExporter | None = None, **settings):
        spans = exporter or InMemorySpanExporter()
        t = Tracing(TracingSettings(enabled=True, sampling_rate=rate, batch_timeout=0.05,
                                    **settings), exporter=spans)
        monitor = PerformanceMonitor()
        tracing.install(monitor, t)
        made.append(t)
        return t, monitor, spans

    yield make
    tracing.install(*previous)
    for t in made:
        t.shutdown()


def finished(t: Tracing, spans: InMemorySpanExporter):
    assert t.force_flush()
    return spans.get_finished_spans()


def test_new_traces_sampled_at_the_rate_by_the_sdks_rule(traced):
    t, monitor, spans = traced(rate=0.25)
    for _ in range(2000):
        with observe("schedule", "probe-x"), observe("store", "get_lock", root=False):
            pass
    done = finished(t, spans)
    roots = [s for s in done if s.parent is None]
    children = [s for s in done if s.parent is not None]
    assert 400 <= len(roots) <= 600  # 500 expected
    bound = TraceIdRatioBased(0.25).bound
    for root in roots:
        assert root.context.trace_id & ((1 << 64) - 1) < bound
    assert sorted(c.parent.span_id for c in children) == sorted(r.context.span_id for r in roots)
    assert all(c.context.trace_id == p.context.trace_id
               for c in children for p in roots if p.context.span_id == c.parent.span_id)
    # every operation is a sample, traced or not
    assert monitor.stats("1m", "schedule").count == 2000
    assert monitor.stats("1m", "store").count == 2000


def test_store_calls_never_start_a_trace(traced):
    t, _, spans = traced(rate=1.0)
    with observe("store", "get_lock", root=False):
        pass
    assert finished(t, spans) == ()


def header(trace_id: str, span_id: str, sampled: bool) -> bytes:
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}".encode()


TRACE, PARENT = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"


def test_a_sampled_caller_is_followed_whatever_the_rate(traced):
    t, _, spans = traced(rate=0.0)
    parent = tracing.extract([(b"traceparent", header(TRACE, PARENT, True)),
                              (b"tracestate", b"mail=1"), (b"baggage", b"tenant=t1")])
    with observe("http", "/x", "GET /x", SpanKind.SERVER, parent=parent) as op:
        assert op.span is not None
        outgoing = outgoing_headers()
        with observe("security", "check"):
            pass
    server, = [s for s in finished(t, spans) if s.name == "GET /x"]
    assert format(server.context.trace_id, "032x") == TRACE
    assert format(server.parent.span_id, "016x") == PARENT and server.parent.is_remote
    assert server.context.trace_state.get("mail") == "1"
    # the trace and the baggage continue into a request made inside the operation
    assert outgoing["traceparent"] == (f"00-{TRACE}-{format(server.context.span_id, '016x')}"
                                       "-01")
    assert outgoing["baggage"] == "tenant=t1"
    check, = [s for s in finished(t, spans) if s.name == "security check"]
    assert check.parent.span_id == server.context.span_id


def test_an_unsampled_caller_is_never_traced_but_its_baggage_is_kept(traced):
    t, monitor, spans = traced(rate=1.0)
    parent = tracing.extract([(b"traceparent", header(TRACE, PARENT, False)),
                              (b"baggage", b"tenant=t2")])
    with observe("http", "/x", "GET /x", SpanKind.SERVER, parent=parent) as op:
        assert op.span is None
        assert baggage.get_baggage("tenant") == "t2"
        with observe("security", "check") as inner:
            assert inner.span is None  # children follow the parent
    assert baggage.get_baggage("tenant") is None  # detached again
    assert finished(t, spans) == ()
    assert monitor.stats("1m", "security").count == 1


def test_repeated_headers_as_w3c_says(traced):
    """Several tracestate or baggage headers are one list; two traceparents are none."""
    t, _, spans = traced(rate=1.0)
    parent = tracing.extract([(b"traceparent", header(TRACE, PARENT, True)),
                              (b"tracestate", b"a=1"), (b"baggage", b"k1=v1"),
                              (b"tracestate", b"b=2"), (b"baggage", b"k2=v2")])
    with observe("http", "/x", "GET /x", SpanKind.SERVER, parent=parent):
        assert baggage.get_baggage("k1") == "v1" and baggage.get_baggage("k2") == "v2"
    server, = finished(t, spans)
    assert format(server.context.trace_id, "032x") == TRACE
    assert list(server.context.trace_state.items()) == [("a", "1"), ("b", "2")]

    other = "1" * 32
    parent = tracing.extract([(b"traceparent", header(TRACE, PARENT, True)),
                              (b"tracestate", b"a=1"), (b"baggage", b"k=v"),
                              (b"traceparent", header(other, PARENT, True))])
    with observe("http", "/y", "GET /y", SpanKind.SERVER, parent=parent):
        assert baggage.get_baggage("k") == "v"  # baggage stands on its own
    root, = [s for s in finished(t, spans) if s.name == "GET /y"]
    assert format(root.context.trace_id, "032x") not in (TRACE, other)
    assert root.parent is None and not root.context.trace_state


def test_no_headers_no_context_and_tracing_off_costs_nothing(traced):
    t, _, _ = traced(rate=1.0)
    assert tracing.extract([(b"host", b"x"), (b"accept", b"*/*")]) is None
    monitor = PerformanceMonitor()
    tracing.install(monitor, Tracing(TracingSettings(enabled=False)))
    assert tracing.extract([(b"traceparent", header(TRACE, PARENT, True))]) is None
    with observe("collector", "system") as op:
        assert op.span is None
        assert outgoing_headers() == {}
    assert monitor.stats("1m", "collector", "system").count == 1


def test_errors_mark_the_span_and_the_sample(traced):
    t, monitor, spans = traced()
    with pytest.raises(KeyError), observe("collector", "broken"):
        raise KeyError("x")
    with observe("schedule", "probe-y") as op:
        op.fail("timeout")
    broken, probe = sorted(finished(t, spans), key=lambda s: s.name)
    assert broken.status.status_code == StatusCode.ERROR
    assert broken.attributes["error.type"] == "KeyError"
    assert probe.attributes["error.type"] == "timeout"
    assert monitor.stats("1m", "collector").errors == 1
    assert monitor.stats("1m", "schedule").error_rate == 1.0


class Blocking(SpanExporter):
    def __init__(self) -> None:
        self.release = threading.Event()
        self.exported = 0

    def export(self, spans):
        self.release.wait(10)
        self.exported += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()


def test_a_full_queue_drops_and_counts_instead_of_blocking(traced):
    blocking = Blocking()
    t, _, _ = traced(rate=1.0, exporter=blocking, batch_size=1)
    total = t.settings.queue_size + 200
    for _ in range(total):
        with observe("schedule", "x"):
            pass
    assert t.dropped["queue_full"] >= 199
    blocking.release.set()
    assert t.force_flush()
    assert t.exported + t.dropped["queue_full"] == total
    assert t.dropped["export_failed"] == 0
    assert t.pending == 0


class Refusing(SpanExporter):
    def export(self, spans):
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        return None


def test_failed_exports_are_counted_and_logged_once(traced, caplog):
    t, _, _ = traced(rate=1.0, exporter=Refusing())
    for _ in range(3):
        for _ in range(5):
            with observe("schedule", "x"):
                pass
        t.force_flush()
    assert t.dropped["export_failed"] == 15 and t.exported == 0
    failing = [r for r in caplog.records
               if r.message == "span export failing; spans are dropped until it recovers"]
    assert len(failing) == 1 and failing[0].error == "refused or unreachable"
    families = {f.name: f for f in t.collect()}
    dropped = {s.labels["reason"]: s.value
               for s in families["a3mailer_tracing_spans_dropped"].samples
               if s.name.endswith("_total")}
    assert dropped == {"queue_full": 0.0, "export_failed": 15.0}


async def test_observed_store_times_and_traces_each_call(traced, tmp_path):
    t, monitor, spans = traced()
    inner = SqliteStore(str(tmp_path / "s.db"))
    store = ObservedStore(inner)
    await store.open()
    with observe("security", "check"):
        assert await store.record_failure("p:x", "h1", 100.0, 60.0) == 1
        assert await store.failure_count("p:x", 100.0, 60.0) == 1
    assert store.tracked_keys() == inner.tracked_keys()  # passes through
    await store.close()
    done = {s.name: s for s in finished(t, spans)}
    record = done["store record_failure"]
    assert record.parent.span_id == done["security check"].context.span_id
    assert record.attributes == {"db.operation.name": "record_failure",
                                 "db.system.name": "sqlite"}
    assert record.kind == SpanKind.INTERNAL
    assert monitor.stats("1m", "store", "failure_count").count == 1


class DownStore(MemoryStore):
    def _lock(self, key, now):  # what get_lock and login_state read locks through
        raise StoreUnavailable("down")


async def test_the_security_engine_reports_decisions_through_its_observer(traced):
    t, monitor, spans = traced()
    engine = SecurityManager(Settings(trusted_networks=()), ObservedStore(DownStore()),
                             observer=tracing.security_observer)
    attempt = Attempt("dave@example.test", "203.0.113.9", "imap", pwhash="abc")
    decision = await engine.check(attempt)
    assert decision.reason == "store_unavailable"
    await engine.report(attempt, False)
    done = {s.name: s for s in finished(t, spans)}
    check = done["security check"]
    assert check.attributes["a3mailer.security.action"] == "allow"
    assert check.attributes["a3mailer.security.reason"] == "store_unavailable"
    assert check.attributes["a3mailer.security.protocol"] == "imap"
    assert check.attributes["error.type"] == "store_unavailable"
    # the one store call of a check, failing through the get_lock it starts with
    assert done["store login_state"].status.status_code == StatusCode.ERROR
    report = done["security report"]
    assert report.attributes["a3mailer.security.success"] is False
    assert report.attributes["error.type"] == "store_unavailable"
    for span in done.values():
        assert "dave" not in str(dict(span.attributes))
        assert "203.0.113.9" not in str(dict(span.attributes))
    assert monitor.stats("1m", "security", "check").errors == 1
    # without an observer the engine works as before
    plain = SecurityManager(Settings(trusted_networks=()), MemoryStore())
    assert (await plain.check(attempt)).action == "allow"


async def test_periodic_runs_are_root_spans_and_failed_probes_count_as_errors(traced):
    t, monitor, spans = traced()

    async def failing_probe() -> ProbeResult:
        return ProbeResult(success=False, reason="connection refused")

    async def slow() -> None:
        await asyncio.sleep(1)

    await Periodic("probe-a", failing_probe, 60, 5).once()
    await Periodic("dns", slow, 60, 0.01).once()
    done = {s.name: s for s in finished(t, spans)}
    assert done["probe-a"].parent is None
    assert done["probe-a"].attributes["a3mailer.schedule"] == "probe-a"
    assert done["probe-a"].attributes["error.type"] == "failed"
    assert done["dns"].attributes["error.type"] == "timeout"
    assert monitor.stats("1m", "schedule", "probe-a").errors == 1


REJECT_GREETING = (b"554 5.7.1 Service unavailable; Client host [127.0.0.1] blocked using "
                   b"zen.spamhaus.org; mail from postmaster@example.com refused\r\n")


@pytest.mark.parametrize(("greeting", "failure"), [
    (REJECT_GREETING, "server_answer"), (None, "connection_refused")])
async def test_a_failed_probes_span_names_the_class_not_the_servers_words(traced, greeting,
                                                                         failure):
    """The reason for /health quotes the server (an e-mail and a client address here);
    the span gets the failure's class only."""
    t, _, spans = traced()

    async def reject(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting or b"")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(reject, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    if greeting is None:
        server.close()
        await server.wait_closed()
    try:
        probes = build_probes({"probes": [{"name": "mx", "protocol": "smtp", "tls": "none",
                                           "host": "127.0.0.1", "port": port}]})
        outcome = await probes.runs["mx"].once()
    finally:
        server.close()
    assert outcome.value is not None and not outcome.value.success
    if greeting is not None:
        assert "postmaster@example.com" in outcome.value.reason  # /health keeps the words
    root, = [s for s in finished(t, spans) if s.name == "probe-mx"]
    assert root.attributes["a3mailer.probe.reason"] == failure
    for span in finished(t, spans):
        for value in span.attributes.values():
            assert "@" not in str(value) and "[127.0.0.1]" not in str(value)


@pytest.mark.parametrize("flags", ["01", "00"])
async def test_a_periodic_started_inside_a_request_still_runs_as_its_own_roots(traced, flags):
    """A probe added by POST /-/reload is started while that request is handled: its runs
    must neither join the request's trace (sampled) nor stay untraced with it (not)."""
    t, _, spans = traced(rate=1.0)
    runs = []

    async def probe() -> ProbeResult:
        runs.append(1)
        return ProbeResult(success=True)

    request = f"00-{'ab' * 16}-{'cd' * 8}-{flags}"
    periodic = Periodic("probe-added", probe, 0.01, 5)
    with observe("http", "/-/reload", "POST /-/reload", SpanKind.SERVER,
                 parent=tracing.extract([(b"traceparent", request.encode())])):
        periodic.start()
    while len(runs) < 3:
        await asyncio.sleep(0.01)
    await periodic.stop()
    done = [s for s in finished(t, spans) if s.name == "probe-added"]
    assert len(done) >= 3
    assert all(s.parent is None for s in done)
    assert len({s.context.trace_id for s in done}) == len(done)
    assert f"{done[0].context.trace_id:032x}" != "ab" * 16


def test_settings_from_config_read_secret_headers(config_file, tmp_path, monkeypatch):
    secret = tmp_path / "headers"
    secret.write_text("# comment\nAuthorization=Bearer%20abc, X-Extra=1\n")
    config = load_config(config_file({"tracing": {
        "enabled": True, "otlp_endpoint": "https://otel.example.test:4318/",
        "otlp_headers": {"X-Scope-OrgID": "t1", "X-Extra": "0"},
        "otlp_headers_file": str(secret), "batch_timeout": "250ms", "batch_size": 64}}))
    settings = TracingSettings.from_config(config["tracing"])
    assert settings.endpoint == "https://otel.example.test:4318/v1/traces"
    assert settings.headers == {"X-Scope-OrgID": "t1", "X-Extra": "1",
                                "Authorization": "Bearer abc"}
    assert settings.batch_timeout == 0.25 and settings.batch_size == 64
    assert settings.queue_size == 2048 and settings.sampling_rate == 0.1
    monkeypatch.setenv("OTLP_SECRET", "api-key=k1")
    config = load_config(config_file({"tracing": {"otlp_headers_env": "OTLP_SECRET"}}))
    assert TracingSettings.from_config(config["tracing"]).headers == {"api-key": "k1"}


def test_secrets_inline_and_bad_header_files_are_refused(config_file, tmp_path):
    with pytest.raises(ConfigError) as inline:
        load_config(config_file({"tracing": {"otlp_headers": {"Authorization": "Bearer x"}}}))
    assert "tracing.otlp_headers.Authorization: looks like a secret" in str(inline.value)
    bad = tmp_path / "bad"
    bad.write_text("Authorization Bearer-sekrit\n")
    with pytest.raises(ConfigError) as malformed:
        load_config(config_file({"tracing": {"otlp_headers_file": str(bad)}}))
    assert "tracing.otlp_headers_file: header 1: expected name=value" in str(malformed.value)
    assert "sekrit" not in str(malformed.value)
    with pytest.raises(ConfigError, match="cannot read secret"):
        load_config(config_file({"tracing": {"otlp_headers_file": str(tmp_path / "none")}}))
    with pytest.raises(ValueError, match="header 2"):
        parse_headers("a=1,=2")


class Raising(Refusing):
    def export(self, spans):
        raise ValueError("Invalid header value b'a\\nb'")


def test_an_export_that_raises_is_logged_with_its_cause(traced, caplog):
    t, _, _ = traced(rate=1.0, exporter=Raising())
    with observe("schedule", "x"):
        pass
    t.force_flush()
    assert t.dropped["export_failed"] == 1
    failing, = [r for r in caplog.records if r.message.startswith("span export failing")]
    assert failing.error == "ValueError"


def test_secret_headers_override_inline_ones_in_any_case(config_file, monkeypatch):
    monkeypatch.setenv("OTLP_SECRET", "x-scope-orgid=secret-tenant")
    config = load_config(config_file({"tracing": {
        "otlp_headers": {"X-Scope-OrgID": "mail", "X-Other": "1"},
        "otlp_headers_env": "OTLP_SECRET"}}))
    assert TracingSettings.from_config(config["tracing"]).headers == {
        "x-scope-orgid": "secret-tenant", "X-Other": "1"}  # one X-Scope-OrgID, not two


@pytest.mark.parametrize(("inline", "secret", "error"), [
    ({"X-Ok": "a\nb"}, "", "tracing.otlp_headers.X-Ok: the value may hold only visible ASCII"),
    ({"X-Ok": "caf\u00e9"}, "", "tracing.otlp_headers.X-Ok: the value may hold only"),
    ({"content-type": "text/plain"}, "", "tracing.otlp_headers.content-type: the exporter "
     "sets this header itself"),
    ({}, "X-A=line%0Abreak", "tracing.otlp_headers_env: header 1: the value may hold only"),
    ({}, "X-A=1,Host=x", "tracing.otlp_headers_env: header 2: the exporter sets this header"),
])
def test_header_values_that_http_cannot_send_are_refused_at_load(config_file, monkeypatch,
                                                                 inline, secret, error):
    """Caught at load, with the key and without the value, instead of every export
    failing later (http.client refuses a line break in a header)."""
    monkeypatch.setenv("OTLP_SECRET", secret)
    with pytest.raises(ConfigError) as refused:
        load_config(config_file({"tracing": {"otlp_headers": inline,
                                             "otlp_headers_env": "OTLP_SECRET"}}))
    assert error in str(refused.value)
    assert "break" not in str(refused.value).replace("line breaks", "")


def test_grpc_settings_keep_the_endpoint_and_send_headers_as_metadata(config_file,
                                                                      monkeypatch):
    monkeypatch.setenv("OTLP_SECRET", "x-api-key=k1")
    config = load_config(config_file({"tracing": {
        "otlp_protocol": "grpc", "otlp_endpoint": "https://collector.example.test:4317/",
        "otlp_headers": {"X-Scope-OrgID": "t1"}, "otlp_headers_env": "OTLP_SECRET"}}))
    settings = TracingSettings.from_config(config["tracing"])
    assert settings.protocol == "grpc"
    assert settings.endpoint == "https://collector.example.test:4317"  # no /v1/traces
    assert settings.headers == {"X-Scope-OrgID": "t1", "x-api-key": "k1"}
    default = TracingSettings.from_config(load_config(config_file({}))["tracing"])
    assert default.protocol == "http/protobuf"
    assert default.endpoint == "http://127.0.0.1:4318/v1/traces"


@pytest.mark.parametrize(("tracing", "secret", "error"), [
    ({"otlp_endpoint": "http://collector:4317/v1/traces"}, "x-ok=1",
     "tracing.otlp_endpoint: with otlp_protocol grpc the endpoint is a scheme, host and port"),
    ({"otlp_headers": {"grpc-timeout": "1S"}}, "x-ok=1",
     "tracing.otlp_headers.grpc-timeout: a gRPC metadata name holds only"),
    ({"otlp_headers": {"x-tenant-bin": "AAA"}}, "x-ok=1",
     "tracing.otlp_headers.x-tenant-bin: a gRPC metadata name holds only"),
    ({"otlp_headers": {"x~tenant": "a"}}, "x-ok=1",
     "tracing.otlp_headers.x~tenant: a gRPC metadata name holds only"),
    ({"otlp_headers": {"TE": "trailers"}}, "x-ok=1",
     "tracing.otlp_headers.TE: the exporter sets this header itself"),
    ({}, "x-ok=1,grpc-status=0", "tracing.otlp_headers_env: header 2: a gRPC metadata name"),
])
def test_what_grpc_cannot_send_is_refused_at_load(config_file, monkeypatch, tracing, secret,
                                                  error):
    """A path, and metadata names gRPC reserves or cannot carry as text, are config
    errors; over HTTP the same names are fine."""
    monkeypatch.setenv("OTLP_SECRET", secret)
    section = {"otlp_protocol": "grpc", "otlp_headers_env": "OTLP_SECRET", **tracing}
    with pytest.raises(ConfigError) as refused:
        load_config(config_file({"tracing": section}))
    assert error in str(refused.value)
    if "otlp_endpoint" not in tracing and "TE" not in tracing.get("otlp_headers", {}):
        load_config(config_file({"tracing": {**section, "otlp_protocol": "http/protobuf"}}))


async def test_http_spans_hide_path_parameters_and_queries(config_file, tmp_path, traced):
    data = {"server": {"state_dir": str(tmp_path / "state")},
            "security": {"admin_token_file": str(tmp_path / "token"),
                         "store": {"type": "memory"}}}
    (tmp_path / "token").write_text("t0ken-0123456789ab")
    exporter = Exporter(load_config(config_file(yaml.safe_load(yaml.safe_dump(data)))))
    t, monitor, spans = traced(rate=1.0)
    exporter.performance = monitor
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(exporter)),
                               base_url="http://exporter")
    auth = {"authorization": "Bearer t0ken-0123456789ab"}
    r = await client.delete("/api/v1/security/lockouts/erin@example.test?source=192.0.2.1",
                            headers=auth)
    assert r.status_code == 404
    assert (await client.get("/no/such/erin@example.test")).status_code == 404
    assert (await client.get("/livez")).status_code == 200
    assert (await client.request("PURGE", "/livez")).status_code == 405
    assert (await client.request("PURGE", "/no/such")).status_code == 404
    exporter.audit.close()
    done = {s.name: s for s in finished(t, spans)}
    # a method the semantic conventions do not know: _OTHER, its word kept beside it
    for name in ("HTTP /livez", "HTTP"):
        assert done[name].attributes["http.request.method"] == "_OTHER"
        assert done[name].attributes["http.request.method_original"] == "PURGE"
    unlock = done["DELETE /api/v1/security/lockouts/{account}"]
    assert unlock.kind == SpanKind.SERVER
    assert unlock.attributes["url.path"] == "/api/v1/security/lockouts/{account}"
    assert unlock.attributes["http.response.status_code"] == 404
    unrouted = done["GET"]
    assert "url.path" not in unrouted.attributes and "http.route" not in unrouted.attributes
    for span in done.values():
        text = str(dict(span.attributes))
        assert "erin" not in text and "192.0.2.1" not in text and "t0ken-0123456789ab" not in text
    assert done["GET /livez"].attributes["url.path"] == "/livez"
    assert monitor.stats("1m", "http", "/livez").count == 2  # GET and PURGE


def test_a_reload_swaps_the_tracer_and_keeps_the_monitor(config_file, tmp_path):
    previous = tracing.installed()
    exporter = Exporter(load_config(config_file({"security": {"enabled": False}})))
    try:
        assert not tracing.enabled() and tracing.installed()[0] is exporter.performance
        old = exporter.tracing
        config_file({"security": {"enabled": False}, "tracing": {
            "enabled": True, "sampling_rate": 0.5, "otlp_endpoint": "http://127.0.0.1:9",
            "batch_timeout": "1s"}})
        assert exporter.reload() == []
        assert tracing.enabled() and tracing.installed() == (exporter.performance,
                                                             exporter.tracing)
        assert exporter.tracing is not old
        assert exporter.tracing.settings.sampling_rate == 0.5
        assert exporter.tracing.settings.endpoint == "http://127.0.0.1:9/v1/traces"
        current = exporter.tracing
        assert exporter.reload() == [] and exporter.tracing is current  # unchanged: kept
        families = {f.name for f in exporter.scrape.collect()}
        assert {"a3mailer_tracing_sampling_ratio", "a3mailer_tracing_spans_dropped",
                "a3mailer_performance_operations_per_second"} <= families
    finally:
        tracing.install(*previous)
        exporter.tracing.shutdown()


def test_the_span_counters_go_on_across_a_reload(config_file):
    """A reload that changes tracing builds a new Tracing: its counters start where the
    old one's were, and what the old one still drops as it shuts down counts too."""
    previous = tracing.installed()
    section = {"enabled": True, "sampling_rate": 1.0, "otlp_endpoint": "http://127.0.0.1:9",
               "batch_timeout": "1s"}
    exporter = Exporter(load_config(config_file({"security": {"enabled": False},
                                                 "tracing": section})))
    try:
        old = exporter.tracing
        old._count("queue_full", 7)
        old.counts.exported = 5.0
        config_file({"security": {"enabled": False},
                     "tracing": {**section, "sampling_rate": 0.5}})
        assert exporter.reload() == []
        assert exporter.tracing is not old
        old._count("export_failed", 2)  # the old one's last batch, failing
        exporter.tracing._count("queue_full", 1)
        samples = {(s.name, s.labels.get("reason")): s.value
                   for f in exporter.scrape.collect() for s in f.samples
                   if s.name.startswith("a3mailer_tracing_spans_")}
        assert samples[("a3mailer_tracing_spans_exported_total", None)] == 5.0
        assert samples[("a3mailer_tracing_spans_dropped_total", "queue_full")] == 8.0
        assert samples[("a3mailer_tracing_spans_dropped_total", "export_failed")] == 2.0
    finally:
        tracing.install(*previous)
        exporter.tracing.shutdown()


def test_an_endpoint_with_credentials_in_it_is_refused(config_file):
    with pytest.raises(ConfigError, match="tracing.otlp_endpoint: no user:password@") as error:
        load_config(config_file({"tracing": {"otlp_endpoint": "http://u:pw@collector:4318"}}))
    assert "pw" not in str(error.value).replace("password", "")
