"""Recording instruments produce what prometheus_client would for the same observations."""

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.exposition import render_text
from exporter.instruments import DEFAULT_BUCKETS, CounterVec, HistogramVec


def parsed(text: bytes) -> dict:
    return {(s.name.split("_bucket")[-1], tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text.decode()) for s in f.samples
            if not s.name.endswith("_created")}


def test_histogram_matches_prometheus_client():
    values = [0.0, 0.005, 0.0051, 0.3, 1.0, 7.5, 11, 0.02]
    ours = HistogramVec("a3mailer_exporter_http_request_duration_seconds")
    registry = CollectorRegistry()
    theirs = Histogram("a3mailer_exporter_http_request_duration_seconds", "h", ["handler"],
                       buckets=DEFAULT_BUCKETS, registry=registry)
    for v in values:
        ours.observe(("/metrics",), v)
        theirs.labels("/metrics").observe(v)
    assert parsed(render_text(ours.collect())) == parsed(generate_latest(registry))


def test_counter_accumulates_per_label_set():
    counter = CounterVec("a3mailer_exporter_http_requests_total")
    counter.inc(("/metrics", "200"))
    counter.inc(("/metrics", "200"), 2)
    counter.inc(("/livez", "200"))
    text = render_text(counter.collect()).decode()
    assert 'a3mailer_exporter_http_requests_total{handler="/metrics",code="200"} 3.0' in text
    assert 'a3mailer_exporter_http_requests_total{handler="/livez",code="200"} 1.0' in text
