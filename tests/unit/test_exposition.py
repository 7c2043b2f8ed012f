"""Our text renderer against prometheus_client.generate_latest, sample for sample."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.exposition import render_openmetrics, render_text


def samples(text: bytes) -> set:
    out = set()
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            value = "nan" if math.isnan(s.value) else s.value
            out.add((family.name, family.type, family.documentation, s.name,
                     tuple(sorted(s.labels.items())), value))
    return out


def test_same_samples_as_generate_latest():
    registry = CollectorRegistry()
    g = Gauge("g", "gauge help with \\ and\nnewline", ["a", "b"], registry=registry)
    g.labels('quote"d', "back\\slash").set(1.5)
    g.labels("new\nline", "plain").set(float("inf"))
    g.labels("neg", "inf").set(float("-inf"))
    g.labels("not", "number").set(float("nan"))
    g.labels("big", "value").set(1e22)
    Counter("c", "counter", registry=registry).inc(3)
    h = Histogram("h", "histogram", ["route"], registry=registry, buckets=(0.1, 1.0))
    h.labels("/x").observe(0.05)
    h.labels("/x").observe(5)
    ours, theirs = render_text(registry.collect()), generate_latest(registry)
    assert samples(ours) == samples(theirs)
    assert b"c_created" in ours  # OpenMetrics-only samples kept, as their own gauge
    assert b"# TYPE c_created gauge" in ours


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.text(min_size=0, max_size=20),
                          st.floats(allow_nan=False, width=64)), min_size=1, max_size=20,
                unique_by=lambda t: t[0]))
def test_any_label_value_and_number_round_trips(pairs):
    registry = CollectorRegistry()
    g = Gauge("prop", "p", ["v"], registry=registry)
    for label, value in pairs:
        g.labels(label).set(value)
    assert samples(render_text(registry.collect())) == samples(generate_latest(registry))


def openmetrics_samples(text: bytes) -> set:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse

    out = set()
    for family in parse(text.decode()):
        for s in family.samples:
            value = "nan" if math.isnan(s.value) else s.value
            exemplar = (tuple(sorted(s.exemplar.labels.items())), s.exemplar.value) if (
                s.exemplar) else None
            out.add((family.name, family.type, family.documentation, s.name,
                     tuple(sorted(s.labels.items())), value, exemplar))
    return out


def test_openmetrics_same_samples_as_prometheus_client():
    from prometheus_client.openmetrics.exposition import generate_latest as om_latest

    registry = CollectorRegistry()
    g = Gauge("g", 'gauge "help" with \\ and\nnewline', ["a"], registry=registry)
    g.labels('quote"d').set(1.5)
    g.labels("nan").set(float("nan"))
    Counter("c", "counter", registry=registry).inc(3)
    h = Histogram("h_seconds", "histogram", ["route"], registry=registry, buckets=(0.1, 1.0))
    h.labels("/x").observe(0.05, exemplar={"trace_id": "abc123"})
    h.labels("/x").observe(5)
    ours = render_openmetrics(registry.collect())
    assert ours.endswith(b"# EOF\n")
    assert b'# {trace_id="abc123"} 0.05' in ours
    assert openmetrics_samples(ours) == openmetrics_samples(om_latest(registry))
