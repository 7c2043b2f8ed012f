"""Stalwart / A3Mailer metrics: conversion of a realistic /metrics/prometheus page, the
catalogue rule, the series budget, and every way the endpoint can fail."""

from __future__ import annotations

import asyncio
import base64
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter import catalogue
from exporter.collectors.stalwart import (
    OWN_METRICS,
    StalwartClient,
    StalwartCollector,
    StalwartMetrics,
    exported_name,
    stalwart_metrics_source,
    stalwart_ready_check,
    zero_filled,
)
from exporter.exposition import render_text
from exporter.health import Status
from exporter.schedule import Periodic, Worker
from tests.integration.components import (
    DribblingHTTPServer,
    RecordedRequest,
    RecordingHTTPServer,
)

# What Stalwart 0.1x writes (the Rust prometheus crate's TextEncoder): counters,
# gauges and histograms only, names from event ids, no labels, no _total, a series
# only once its event happened. Histogram buckets as Stalwart fills them: each
# bucket holds the SUM of the values observed in it, not a cumulative count
# (stalwartlabs/stalwart#1079), the last bound (u64::MAX) written as +Inf.
# imap_request_time is written as a fixed fork would (valid cumulative counts).
# Odd ones at the end: a name already ending in _total, an untyped gauge-like and an
# untyped counter-like name, a labelled series, a name our own metric uses, a summary.
STALWART_PAGE = """\
# HELP auth_success Authentication successful
# TYPE auth_success counter
auth_success 1520
# HELP auth_failed Authentication failed
# TYPE auth_failed counter
auth_failed 37
# HELP security_authentication_ban Banned due to authentication errors
# TYPE security_authentication_ban counter
security_authentication_ban 2
# HELP smtp_connection_start SMTP connection started
# TYPE smtp_connection_start counter
smtp_connection_start 911
# HELP smtp_connection_end SMTP connection ended
# TYPE smtp_connection_end counter
smtp_connection_end 905
# HELP imap_connection_start IMAP connection started
# TYPE imap_connection_start counter
imap_connection_start 4410
# HELP delivery_delivered Message delivered
# TYPE delivery_delivered counter
delivery_delivered 640
# HELP queue_queue_message Queued message for delivery
# TYPE queue_queue_message counter
queue_queue_message 702
# HELP jmap_method_call JMAP method call
# TYPE jmap_method_call counter
jmap_method_call 12055
# HELP store_rocksdb_error RocksDB error
# TYPE store_rocksdb_error counter
store_rocksdb_error 1
# HELP server_memory Server memory usage
# TYPE server_memory gauge
server_memory 187432960
# HELP queue_count Total number of messages in the queue
# TYPE queue_count gauge
queue_count 14
# HELP smtp_active_connections Active SMTP connections
# TYPE smtp_active_connections gauge
smtp_active_connections 6
# HELP imap_active_connections Active IMAP connections
# TYPE imap_active_connections gauge
imap_active_connections 41
# HELP delivery_total_time Total message delivery time from submission to delivery
# TYPE delivery_total_time histogram
delivery_total_time_bucket{le="1000"} 0
delivery_total_time_bucket{le="30000"} 4512
delivery_total_time_bucket{le="300000"} 0
delivery_total_time_bucket{le="600000"} 0
delivery_total_time_bucket{le="1800000"} 0
delivery_total_time_bucket{le="3600000"} 0
delivery_total_time_bucket{le="14400000"} 0
delivery_total_time_bucket{le="28800000"} 0
delivery_total_time_bucket{le="43200000"} 0
delivery_total_time_bucket{le="86400000"} 0
delivery_total_time_bucket{le="604800000"} 0
delivery_total_time_bucket{le="+Inf"} 0
delivery_total_time_sum 4512
delivery_total_time_count 3
# HELP smtp_request_time SMTP request duration
# TYPE smtp_request_time histogram
smtp_request_time_bucket{le="5"} 7
smtp_request_time_bucket{le="10"} 7
smtp_request_time_bucket{le="50"} 40
smtp_request_time_bucket{le="100"} 0
smtp_request_time_bucket{le="500"} 120
smtp_request_time_bucket{le="1000"} 0
smtp_request_time_bucket{le="2000"} 0
smtp_request_time_bucket{le="5000"} 0
smtp_request_time_bucket{le="10000"} 0
smtp_request_time_bucket{le="30000"} 0
smtp_request_time_bucket{le="60000"} 0
smtp_request_time_bucket{le="+Inf"} 0
smtp_request_time_sum 174
smtp_request_time_count 5
# HELP imap_request_time IMAP request duration
# TYPE imap_request_time histogram
imap_request_time_bucket{le="5"} 3
imap_request_time_bucket{le="10"} 5
imap_request_time_bucket{le="50"} 9
imap_request_time_bucket{le="+Inf"} 10
imap_request_time_sum 250
imap_request_time_count 10
# HELP message_size Received message size
# TYPE message_size histogram
message_size_bucket{le="500"} 0
message_size_bucket{le="1000"} 0
message_size_bucket{le="10000"} 15200
message_size_bucket{le="100000"} 61000
message_size_bucket{le="1000000"} 0
message_size_bucket{le="+Inf"} 0
message_size_sum 76200
message_size_count 4
# HELP legacy_thing_total Already suffixed
# TYPE legacy_thing_total counter
legacy_thing_total 3
ws_active_connections 2
spam_classify 88
# HELP weird A labelled series
# TYPE weird gauge
weird{ip="192.0.2.1"} 1
# HELP up Not ours
# TYPE up gauge
up 1
# HELP rpc_latency A summary
# TYPE rpc_latency summary
rpc_latency_sum 1
rpc_latency_count 1
"""


def section(url: str = "http://127.0.0.1:1", **over) -> dict:
    base = {"enabled": True, "url": url, "username": "", "password_file": "",
            "password_env": "", "interval": "30s", "timeout": "2s", "max_series": 2000}
    return {**base, **over}


def metrics(max_series: int = 2000) -> StalwartMetrics:
    return StalwartMetrics(StalwartClient("http://127.0.0.1:1", 2.0), max_series)


def by_name(snapshot) -> dict:
    return {s.spec.name: s for s in snapshot.series}


def test_counters_gain_total_and_gauges_pass_through():
    series = by_name(metrics().convert(STALWART_PAGE))
    assert series["a3mailer_stalwart_auth_success_total"].value == 1520
    assert series["a3mailer_stalwart_auth_failed_total"].value == 37
    assert series["a3mailer_stalwart_security_authentication_ban_total"].value == 2
    assert series["a3mailer_stalwart_queue_queue_message_total"].value == 702
    assert series["a3mailer_stalwart_smtp_active_connections"].value == 6
    assert series["a3mailer_stalwart_queue_count"].value == 14
    # server.memory is in bytes: the name says so
    assert series["a3mailer_stalwart_server_memory_bytes"].value == 187432960
    # uncatalogued families are re-exported by the same rule, with Stalwart's HELP
    jmap = series["a3mailer_stalwart_jmap_method_call_total"]
    assert jmap.value == 12055 and jmap.spec.type == "counter"
    assert "JMAP method call" in jmap.spec.help and jmap.spec.source == "stalwart"
    assert series["a3mailer_stalwart_legacy_thing_total"].value == 3  # no _total_total


def test_millisecond_histograms_become_seconds_without_invalid_buckets():
    snapshot = metrics().convert(STALWART_PAGE)
    series = by_name(snapshot)
    # Stalwart's buckets hold sums of values, not cumulative counts: only +Inf, sum, count
    delivery = series["a3mailer_stalwart_delivery_total_time_seconds"]
    assert delivery.spec.type == "histogram"
    assert delivery.buckets == (("+Inf", 3.0),)
    assert delivery.value == pytest.approx(4.512)
    smtp = series["a3mailer_stalwart_smtp_request_time_seconds"]
    assert smtp.buckets == (("+Inf", 5.0),) and smtp.value == pytest.approx(0.174)
    size = series["a3mailer_stalwart_message_size_bytes"]
    assert size.buckets == (("+Inf", 4.0),) and size.value == 76200
    assert sorted(snapshot.bucketless_histograms) == ["delivery_total_time", "message_size",
                                                      "smtp_request_time"]
    # valid cumulative buckets are kept, bounds divided by 1000
    imap = series["a3mailer_stalwart_imap_request_time_seconds"]
    assert imap.buckets == (("0.005", 3.0), ("0.01", 5.0), ("0.05", 9.0), ("+Inf", 10.0))
    assert imap.value == pytest.approx(0.25)


def test_absent_documented_series_are_zero_and_unknown_gauges_stay_absent():
    series = by_name(metrics().convert(STALWART_PAGE))
    for name in ("a3mailer_stalwart_security_scan_ban_total",
                 "a3mailer_stalwart_pop3_connection_start_total",
                 "a3mailer_stalwart_http_connection_start_total",
                 "a3mailer_stalwart_delivery_dsn_perm_fail_total",
                 "a3mailer_stalwart_queue_rescheduled_total",
                 "a3mailer_stalwart_pop3_active_connections"):
        assert series[name].value == 0, name
    sieve = series["a3mailer_stalwart_sieve_request_time_seconds"]
    assert sieve.buckets == (("+Inf", 0.0),) and sieve.value == 0
    # absent here means unknown (enterprise-only counts), not zero
    assert "a3mailer_stalwart_user_count" not in series
    assert "a3mailer_stalwart_domain_count" not in series
    documented = {n for n, s in catalogue.METRICS.items()
                  if s.source == "stalwart" and n not in OWN_METRICS}
    assert {n for n in documented if zero_filled(catalogue.METRICS[n])} <= set(series)


def test_empty_page_gives_the_zero_filled_set():
    series = by_name(metrics().convert(""))
    assert series["a3mailer_stalwart_auth_failed_total"].value == 0
    assert "a3mailer_stalwart_server_memory_bytes" not in series


def test_odd_series_are_handled_or_dropped_by_reason():
    snapshot = metrics().convert(STALWART_PAGE)
    series = by_name(snapshot)
    assert series["a3mailer_stalwart_ws_active_connections"].spec.type == "gauge"  # untyped
    assert series["a3mailer_stalwart_spam_classify_total"].value == 88  # untyped counter
    assert not any("weird" in name for name in series)  # a label (an IP!) never passes
    assert snapshot.dropped == {"labelled": 1, "unsupported_type": 1, "name_conflict": 1,
                                "max_series": 0}


def test_every_documented_name_follows_the_naming_rule():
    """The catalogue is written by hand; exported_name() must reach every entry from
    the Stalwart event id its HELP names."""
    for name, spec in catalogue.METRICS.items():
        if spec.source != "stalwart" or name in OWN_METRICS:
            continue
        event = spec.help.split()[1]  # "Stalwart's <event> ..."
        source = "".join(c if c.isalnum() else "_" for c in event)
        assert exported_name(source, spec.type)[0] == name, event
        # HELP promises 0 exactly where zero_filled() does
        if spec.type == "gauge":
            assert ("0 until the first event" in spec.help) == zero_filled(spec), name


def test_max_series_bounds_uncatalogued_names_and_keeps_the_first_ones():
    converter = metrics(max_series=2)
    page = "".join(f"# TYPE extra_{c} counter\nextra_{c} 1\n" for c in "abc")
    names = set(by_name(converter.convert(page)))
    assert {"a3mailer_stalwart_extra_a_total", "a3mailer_stalwart_extra_b_total"} <= names
    assert "a3mailer_stalwart_extra_c_total" not in names
    # next poll: a and b keep their places even when a new name comes first
    page = "".join(f"# TYPE extra_{c} counter\nextra_{c} 2\n" for c in "0cba")
    snapshot = converter.convert(page)
    names = set(by_name(snapshot))
    assert {"a3mailer_stalwart_extra_a_total", "a3mailer_stalwart_extra_b_total"} <= names
    assert not names & {"a3mailer_stalwart_extra_0_total", "a3mailer_stalwart_extra_c_total"}
    assert snapshot.dropped["max_series"] == 2
    # max_series 0: only the catalogue
    strict = by_name(metrics(max_series=0).convert(STALWART_PAGE))
    assert all(catalogue.METRICS.get(n) for n in strict)


def test_not_the_text_format_is_an_error():
    with pytest.raises(Exception, match="not the Prometheus text format"):
        metrics().convert('auth_success{le="1" 1\n')


async def test_collector_output_is_valid_and_catalogued_or_prefixed():
    source = stalwart_metrics_source(section())
    source.last.value = metrics().convert(STALWART_PAGE)
    source.last.runs = 1
    text = render_text(StalwartCollector(source).collect()).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["a3mailer_stalwart_up"].samples[0].value == 1
    for fam in families.values():
        assert fam.name.startswith("a3mailer_stalwart_")
        spec = catalogue.METRICS.get(fam.name) or catalogue.METRICS.get(fam.name + "_total")
        if spec is not None:
            assert fam.documentation == spec.help
            assert fam.type == spec.type
    assert "a3mailer_stalwart_jmap_method_call_total 12055.0" in text
    assert 'a3mailer_stalwart_delivery_total_time_seconds_bucket{le="+Inf"} 3.0' in text
    assert "a3mailer_stalwart_delivery_total_time_seconds_sum 4.512" in text
    assert 'a3mailer_stalwart_dropped_series{reason="labelled"} 1.0' in text


def test_collector_before_the_first_poll_says_down_and_nothing_else():
    source = stalwart_metrics_source(section())
    families = list(StalwartCollector(source).collect())
    assert [f.name for f in families] == ["a3mailer_stalwart_up",
                                          "a3mailer_stalwart_scrape_duration_seconds",
                                          "a3mailer_stalwart_dropped_series"]
    assert families[0].samples[0].value == 0


def test_client_auth_from_config(tmp_path, monkeypatch):
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    client = StalwartClient.from_config(section(username="metrics",
                                                password_file=str(secret)))
    assert client.authorization == "Basic " + base64.b64encode(b"metrics:s3cret").decode()
    monkeypatch.setenv("STALWART_TOKEN", "api_abc")
    client = StalwartClient.from_config(section(token_file="", token_env="STALWART_TOKEN",
                                                username="ignored"))
    assert client.authorization == "Bearer api_abc"
    assert StalwartClient.from_config(section()).authorization is None
    with pytest.raises(ValueError, match="http:// or https://"):
        StalwartClient.from_config(section(url="file:///etc/passwd"))


# --------------------------------------------------------------------------- over HTTP

USER, PASSWORD = "metrics", "right-password"
GOOD_AUTH = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


def stalwart_responder(request: RecordedRequest) -> tuple[int, str, bytes | str]:
    """Stalwart's listener with metrics.prometheus.auth set."""
    if request.path == "/healthz/ready":
        return 200, "text/plain", ""
    if request.path != "/metrics/prometheus":
        return 404, "application/problem+json", '{"status":404}'
    if request.headers.get("authorization") != GOOD_AUTH:
        return 401, "application/problem+json", (
            '{"type":"about:blank","status":401,"title":"Unauthorized",'
            '"detail":"You have to authenticate first."}')
    return 200, "text/plain; version=0.0.4", STALWART_PAGE


@pytest.fixture
def stalwart_http() -> Iterator[RecordingHTTPServer]:
    with RecordingHTTPServer(stalwart_responder) as server:
        yield server


@pytest.fixture
def password_file(tmp_path):
    def write(password: str) -> str:
        path = tmp_path / "stalwart-password"
        path.write_text(password + "\n")
        return str(path)

    return write


async def test_poll_with_basic_auth(stalwart_http, password_file):
    source = stalwart_metrics_source(section(stalwart_http.url, username=USER,
                                             password_file=password_file(PASSWORD)))
    outcome = await source.once()
    assert outcome.ok, outcome.error
    request = stalwart_http.wait_for_request()
    assert request.path == "/metrics/prometheus"
    assert request.headers["authorization"] == GOOD_AUTH
    families = {f.name: f for f in StalwartCollector(source).collect()}
    assert families["a3mailer_stalwart_up"].samples[0].value == 1
    assert families["a3mailer_stalwart_auth_failed"].samples[0].value == 37
    assert families["a3mailer_stalwart_scrape_duration_seconds"].samples[0].value > 0


def up(source) -> float:
    families = {f.name: f for f in StalwartCollector(source).collect()}
    assert set(families) == {"a3mailer_stalwart_up", "a3mailer_stalwart_scrape_duration_seconds",
                             "a3mailer_stalwart_dropped_series"}  # no stale or made-up series
    return families["a3mailer_stalwart_up"].samples[0].value


async def test_401_without_credentials(stalwart_http):
    source = stalwart_metrics_source(section(stalwart_http.url))
    outcome = await source.once()
    assert "HTTP 401" in outcome.error and "none are configured" in outcome.error
    assert up(source) == 0


async def test_401_with_wrong_credentials(stalwart_http, password_file):
    source = stalwart_metrics_source(section(stalwart_http.url, username=USER,
                                             password_file=password_file("wrong")))
    outcome = await source.once()
    assert "HTTP 401" in outcome.error and "credentials were refused" in outcome.error
    assert up(source) == 0


async def test_an_html_page_is_refused():
    page = "<!DOCTYPE html><html><body><h1>Stalwart Login</h1></body></html>"
    with RecordingHTTPServer(lambda _: (200, "text/html; charset=utf-8", page)) as server:
        source = stalwart_metrics_source(section(server.url))
        outcome = await source.once()
    assert "HTML page" in outcome.error
    assert up(source) == 0


async def test_connection_refused():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    source = stalwart_metrics_source(section(f"http://127.0.0.1:{port}"))
    outcome = await source.once()
    assert "connection refused" in outcome.error
    assert up(source) == 0


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts TCP connections (the kernel's backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_a_server_that_never_answers_is_cut_off_at_the_timeout(silent_server):
    source = stalwart_metrics_source(section(silent_server, timeout="500ms"))
    start = time.monotonic()
    outcome = await source.once()
    elapsed = time.monotonic() - start
    assert "no complete answer within 0.5s" in outcome.error
    assert 0.4 < elapsed < 1.5
    assert up(source) == 0


@pytest.mark.parametrize("body", [False, True], ids=["headers", "body"])
async def test_a_server_that_dribbles_its_answer_is_cut_off_at_the_timeout(body):
    """A header line (or a body byte) every 0.2s keeps each socket read well within the
    timeout; the deadline is on the whole exchange, so the poll still ends at 0.5s and
    its thread with it (the server sees the connection closed)."""
    with DribblingHTTPServer(gap=0.2, body=body) as server:
        source = stalwart_metrics_source(section(server.url, timeout="500ms"))
        start = time.monotonic()
        outcome = await source.once()
        elapsed = time.monotonic() - start
        assert "no complete answer within 0.5s" in outcome.error
        assert 0.4 < elapsed < 1.0
        assert up(source) == 0
        result = await stalwart_ready_check(section(server.url, timeout="500ms"))()
        assert result.status is Status.UNHEALTHY
        assert "no complete answer within 0.5s" in result.message
        deadline = time.monotonic() + 2
        while server.open_connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert (server.connections, server.open_connections) == (2, 0)


async def test_a_poll_is_not_started_while_the_last_ones_thread_still_runs():
    """The Periodic stops awaiting at its timeout, but a thread cannot be stopped: the
    next run is refused (and counted), not stacked on another thread."""
    release = threading.Event()
    worker = Worker("stalwart-poll")
    calls = []

    def stuck() -> str:
        calls.append(threading.current_thread().name)
        release.wait(10)
        return "answer"

    source = Periodic("stalwart", lambda: worker.run(stuck), 60, 0.1)
    try:
        assert (await source.once()).error == "timed out after 0.1s"
        second = await source.once()
        assert second.error == ("Busy: the previous stalwart-poll call is still running (its "
                                "thread has not returned); not started")
        assert (second.failures, worker.busy, len(calls)) == (2, 1, 1)
        assert threading.current_thread().name not in calls  # its own thread, not the loop's
        assert calls[0].startswith("stalwart-poll")
    finally:
        release.set()
    deadline = time.monotonic() + 2
    while (await source.once()).error and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert source.last.ok and source.last.value == "answer" and len(calls) == 2


async def test_ready_check(stalwart_http, silent_server):
    check = stalwart_ready_check(section(stalwart_http.url))
    result = await check()
    assert result.status is Status.HEALTHY
    with RecordingHTTPServer(lambda _: (503, "text/plain", "")) as server:
        result = await stalwart_ready_check(section(server.url))()
    assert result.status is Status.UNHEALTHY and "503" in result.message
    result = await stalwart_ready_check(section(silent_server, timeout="300ms"))()
    assert result.status is Status.UNHEALTHY and "no complete answer" in result.message
