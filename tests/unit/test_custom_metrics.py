"""Custom metrics: declared type, labels and series budget are enforced."""

import pytest

from exporter.custom_metrics import CustomMetrics, UpdateError
from exporter.exposition import render_text

DECLS = [
    {"name": "queue_depth", "type": "gauge", "help": "Messages waiting", "labels": ["queue"],
     "max_series": 2},
    {"name": "deliveries", "type": "counter", "help": "Deliveries", "labels": []},
]


def refused(custom, name, body) -> UpdateError:
    with pytest.raises(UpdateError) as info:
        custom.update(name, body)
    return info.value


def test_gauge_set_inc_dec_and_counter_inc():
    custom = CustomMetrics(DECLS)
    assert custom.update("queue_depth", {"value": 5, "labels": {"queue": "active"}}) == 5
    assert custom.update("queue_depth", {"value": 2, "op": "inc",
                                         "labels": {"queue": "active"}}) == 7
    assert custom.update("queue_depth", {"value": 3, "op": "dec",
                                         "labels": {"queue": "active"}}) == 4
    assert custom.update("deliveries", {"value": 1, "op": "inc"}) == 1
    text = render_text(custom.collect()).decode()
    assert 'a3mailer_custom_queue_depth{queue="active"} 4.0' in text
    assert "# TYPE a3mailer_custom_deliveries_total counter" in text
    assert "a3mailer_custom_deliveries_total 1.0" in text


def test_wrong_type_operations():
    custom = CustomMetrics(DECLS)
    assert refused(custom, "deliveries", {"value": 3}).status == 400  # set on a counter
    assert refused(custom, "deliveries", {"value": -1, "op": "inc"}).status == 400


def test_a_result_out_of_range_is_refused_and_nothing_changes():
    """1e308 + 1e308 was stored as +Inf and answered 500; a counter stayed there."""
    custom = CustomMetrics(DECLS)
    assert custom.update("deliveries", {"value": 1e308, "op": "inc"}) == 1e308
    error = refused(custom, "deliveries", {"value": 1e308, "op": "inc"})
    assert (error.status, error.code) == (400, "bad_value")
    assert custom.update("deliveries", {"value": 1, "op": "inc"}) == 1e308 + 1
    assert "+Inf" not in render_text(custom.collect()).decode()


def test_names_exposed_alike_are_a_config_error(config_file):
    """A counter x and a gauge x_total are both a3mailer_custom_x_total: two families of
    one name, and Prometheus drops the whole scrape."""
    from exporter.config import ConfigError, load_config

    with pytest.raises(ConfigError) as clash:
        load_config(config_file({"monitoring": {"custom_metrics": [
            {"name": "deliveries", "type": "counter", "help": "d", "labels": []},
            {"name": "deliveries_total", "type": "gauge", "help": "g", "labels": []}]}}))
    assert ("monitoring.custom_metrics[1].name: exposed as a3mailer_custom_deliveries_total, "
            "as 'deliveries' is already") in str(clash.value)


def test_labels_must_match_declaration():
    custom = CustomMetrics(DECLS)
    err = refused(custom, "queue_depth", {"value": 1, "labels": {"queue": "a", "host": "x"}})
    assert err.status == 400 and "undeclared labels ['host']" in err.reason
    err = refused(custom, "queue_depth", {"value": 1})
    assert err.status == 400 and "missing labels ['queue']" in err.reason


@pytest.mark.parametrize("value", [
    "alice@example.test", "192.0.2.7", "2001:db8::1", "10.0.0.0/8",
    # inside a longer text (these were accepted and exported)
    "Alice <alice@example.org>", "alice@example.org ", " 198.51.100.7", "198.51.100.7:25",
    "[2001:db8::7]", "[2001:db8::1]:25", "client=198.51.100.7", "client 10.0.0.1",
    "alice%40example.org", "from ::ffff:192.0.2.1",
    # zero-padded: ipaddress refuses the form, inet_aton reads the address
    "192.168.001.001", "010.000.000.001", "client=192.168.001.001:25", "10.0.0.0/08"])
def test_personal_data_is_refused_in_labels(value):
    custom = CustomMetrics(DECLS)
    err = refused(custom, "queue_depth", {"value": 1, "labels": {"queue": value}})
    assert err.code == "personal_data"
    assert not custom.metrics["queue_depth"].values


@pytest.mark.parametrize("value", ["imap", "std::vector", "v1.2.3", "12:30", "eu-west-1",
                                   "2026-12-02", "/api/v1/jobs", "node01", "1.5",
                                   "v1.02.3", "2026.01.02", "build 0042"])
def test_label_values_that_only_resemble_addresses_are_taken(value):
    custom = CustomMetrics(DECLS)
    custom.update("queue_depth", {"value": 1, "labels": {"queue": value}})
    assert custom.metrics["queue_depth"].values == {(value,): 1.0}


def test_series_budget():
    custom = CustomMetrics(DECLS)
    custom.update("queue_depth", {"value": 1, "labels": {"queue": "a"}})
    custom.update("queue_depth", {"value": 1, "labels": {"queue": "b"}})
    custom.update("queue_depth", {"value": 9, "labels": {"queue": "a"}})  # existing series: fine
    err = refused(custom, "queue_depth", {"value": 1, "labels": {"queue": "c"}})
    assert err.status == 422 and "budget of 2" in err.reason
    assert custom.rejections.value(("queue_depth", "series_budget")) == 1


def test_undeclared_metric_is_404():
    assert refused(CustomMetrics(DECLS), "nope", {"value": 1}).status == 404


def test_reload_keeps_values_of_unchanged_declarations():
    custom = CustomMetrics(DECLS)
    custom.update("queue_depth", {"value": 3, "labels": {"queue": "a"}})
    custom.update("deliveries", {"value": 2, "op": "inc"})
    custom.configure([DECLS[0], {**DECLS[1], "labels": ["kind"]}])
    assert custom.metrics["queue_depth"].values == {("a",): 3}
    assert custom.metrics["deliveries"].values == {}
