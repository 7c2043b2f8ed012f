"""The threshold alert engine's pure logic: PromQL's rate and histogram_quantile, Go's
template printing, the alert state machine (for, keep_firing_for, resolved retention, resends),
saved states and reloads, and /api/v1/alerts. Agreement with Prometheus itself is
tests/integration/test_alert_agreement.py; the push to a real Alertmanager is
tests/integration/test_alert_engine.py."""

from __future__ import annotations

import asyncio
import json
import math
import time

import httpx
import pytest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from exporter.alert_templates import expand, go_float, humanize, humanize_duration, printf
from exporter.alerts import (
    EVALUATION_TIMEOUT_S,
    OUTAGE_TOLERANCE_S,
    ActiveAlert,
    AlertEngine,
    build_rules,
)
from exporter.config import ConfigError, load_config
from exporter.generate.alerts import THRESHOLD_ALERTS
from exporter.http import create_app
from exporter.rule_values import bucket_quantile, extrapolated_rate, parse_matchers
from exporter.service import Exporter

TARGET = {"job": "a3mailer-exporter", "instance": "mail1:10587"}


# --------------------------------------------------------------------------- PromQL


def test_rate_matches_prometheus_extrapolation():
    # samples every 60 s over a 5m window that starts and ends on samples: increase / 300
    points = [(t * 60_000, 10.0 * t) for t in range(6)]
    assert extrapolated_rate(points, 0, 300_000, 300.0) == pytest.approx(50 / 300)
    # a series that starts inside the window: extrapolated towards zero, not beyond it
    late = [(120_000, 5.0), (180_000, 15.0), (240_000, 25.0), (300_000, 35.0)]
    # 30 over 180 s; 30 s to zero (5 / (30/180) s) < the 120 s to the window's start
    assert extrapolated_rate(late, 0, 300_000, 300.0) == pytest.approx(30 * (210 / 180) / 300)
    # a counter reset adds the value before it
    reset = [(0, 100.0), (60_000, 120.0), (120_000, 3.0), (180_000, 13.0)]
    assert extrapolated_rate(reset, 0, 180_000, 180.0) == pytest.approx((13 - 100 + 120) / 180)
    assert extrapolated_rate([(0, 1.0)], 0, 60_000, 60.0) is None


def test_histogram_quantile_matches_prometheus():
    buckets = [(0.1, 0.0), (1.0, 0.0), (10.0, 10.0), (math.inf, 10.0)]
    assert bucket_quantile(0.95, buckets) == pytest.approx(1 + 9 * 0.95)
    # in the +Inf bucket: the highest finite bound
    assert bucket_quantile(0.99, [(1.0, 1.0), (math.inf, 10.0)]) == 1.0
    assert math.isnan(bucket_quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]))
    assert math.isnan(bucket_quantile(0.5, [(1.0, 3.0)]))  # no +Inf bucket
    # non-monotonic counts (a scrape between bucket updates) are made monotonic
    assert bucket_quantile(0.5, [(1.0, 6.0), (2.0, 5.0), (math.inf, 10.0)]) == pytest.approx(
        5 / 6)


def test_label_matchers():
    matchers = parse_matchers('code=~"5..", handler!="/metrics", a="x\\"y"')
    assert [m.matches(labels) for m in matchers for labels in (
        {"code": "503", "handler": "/p", "a": 'x"y'},)] == [True, True, True]
    assert not matchers[0].matches({"code": "5000"})  # regexes are anchored
    with pytest.raises(ValueError):
        parse_matchers("code=5..")


# --------------------------------------------------------------------------- templates


@pytest.mark.parametrize("value, text", [
    (1500.0, "1500"), (1e6, "1e+06"), (123456.0, "123456"), (1234567.0, "1.234567e+06"),
    (0.0001, "0.0001"), (0.00001, "1e-05"), (0.1, "0.1"), (0.0, "0"), (-2.5, "-2.5"),
    (math.inf, "+Inf"), (math.nan, "NaN")])
def test_value_prints_as_go_prints_a_float64(value, text):
    assert go_float(value) == text


def test_templates_expand_as_prometheus_does():
    labels = {"instance": "mail1:10587", "mountpoint": "/var"}
    text = ('{{ $labels.mountpoint }} on {{ $labels.instance }} is '
            '{{ $value | printf "%.1f" }}% ({{ $value }}), {{ .Labels.missing }}.')
    assert expand(text, labels, 93.25) == "/var on mail1:10587 is 93.2% (93.25), ."
    assert expand('{{ printf "%.0f ms" $value }}', {}, 9550.4) == "9550 ms"
    assert expand("{{ $value | humanizePercentage }}", {}, 0.1234) == "12.34%"
    assert expand("x {{- $value -}} y", {}, 1.0) == "x1y"
    assert expand("{{ range $labels }}x{{ end }}", {}, 1.0).startswith(
        "<error expanding template:")
    assert humanize(1234567) == "1.235M" and humanize(0.0012) == "1.2m"
    assert humanize_duration(3725) == "1h 2m 5s" and humanize_duration(0.25) == "250ms"
    assert printf("%5.1f|%-4d|%s|%q", 3.14159, 7, "a", "b") == "  3.1|7   |a|\"b\""
    assert printf("%d", 1.5) == "%!d(float64=1.5)"


# --------------------------------------------------------------------------- the engine


def gauge(name: str, value: float | None, **labels: str) -> list[Metric]:
    family = GaugeMetricFamily(name, "test", labels=list(labels))
    if value is not None:
        family.add_metric(list(labels.values()), value)
    return [family]


@pytest.fixture
def engine_for(config_file, tmp_path):
    def build(overrides: dict | None = None, state: str = "state",
              clock=time.time) -> AlertEngine:
        data = {"alerting": {"keep_firing_for": "3m", "engine": {"target_labels": TARGET,
                                                                 "evaluation_interval": "1m"}}}
        for key, value in (overrides or {}).items():
            data["alerting"][key] = {**data["alerting"].get(key, {}), **value} if isinstance(
                value, dict) else value
        config = load_config(config_file(data, name=f"{state}.yaml"))
        engine = AlertEngine(tmp_path / state, clock=clock)
        (tmp_path / state).mkdir(exist_ok=True)
        engine.configure(config, lambda: ())
        return engine
    return build


def cpu_timeline(engine: AlertEngine, values: list[float], start: int = 0) -> list[str]:
    """The CPU alert's state after each 1-minute step ('' when none)."""
    states = []
    for step, value in enumerate(values, start):
        engine.evaluate(gauge("a3mailer_system_cpu_usage_ratio", value), step * 60.0)
        found = [a for a in engine.snapshot() if a["name"] == "A3MailerHighCpuUsage"]
        states.append(found[0]["state"] if found else "")
    return states


def test_for_and_keep_firing_for_step_as_prometheus(engine_for):
    engine = engine_for()
    states = cpu_timeline(engine, [0.5, 0.9] + [0.9] * 11 + [0.5, 0.5, 0.9, 0.5, 0.5, 0.5, 0.5])
    # pending from step 1, firing at 11 (10m for); the dip at 13-14 is kept; back at 16:
    # kept 16, 17, 18 (3m), resolved at 19
    assert states == ["", *["pending"] * 10, *["firing"] * 8, ""]


def test_alert_fields_labels_and_annotations(engine_for):
    engine = engine_for({"alerts": {"A3MailerHighCpuUsage": {
        "severity": "critical", "for": "2m", "labels": {"page": "yes"},
        "annotations": {"hint": "{{ $labels.instance }} at {{ $value }}"}}},
        "labels": {"team": "mail"}})
    cpu_timeline(engine, [0.9, 0.9, 0.95])
    [alert] = engine.snapshot("firing")
    assert alert["labels"] == {"alertname": "A3MailerHighCpuUsage", "severity": "critical",
                               "page": "yes", "team": "mail", **TARGET}
    assert alert["annotations"]["description"] == (
        "CPU usage on mail1:10587 has been 95.0% for 2m, above the threshold of 80%.")
    assert alert["annotations"]["hint"] == "mail1:10587 at 95"
    assert alert["annotations"]["runbook_url"].endswith("system.md#a3mailerhighcpuusage")
    assert (alert["value"], alert["threshold"], alert["since"], alert["active_at"]) == (
        95.0, 80.0, 120.0, 0.0)
    assert alert["for_seconds"] == 120 and alert["keep_firing_for_seconds"] == 180


def test_disabled_alerts_and_rules_as_configured(engine_for):
    engine = engine_for({"alerts": {"A3MailerHighCpuUsage": {"enabled": False}}})
    names = {r.name for r in engine.rules}
    assert "A3MailerHighCpuUsage" not in names
    assert names == {a.name for a in THRESHOLD_ALERTS} - {"A3MailerHighCpuUsage"}
    assert cpu_timeline(engine, [0.99] * 15)[-1] == ""


def test_sends_follow_prometheus_resend_and_resolve(engine_for):
    engine = engine_for({"engine": {"alertmanager": {"url": "http://127.0.0.1:1",
                                                     "resend_interval": "2m"}},
                         "keep_firing_for": "0s",
                         "alerts": {"A3MailerHighCpuUsage": {"for": "1m"}}})
    sent = []
    for step, value in enumerate([0.9, 0.9, 0.9, 0.9, 0.9, 0.5, 0.5, 0.5, 0.5]):
        sends = engine.evaluate(gauge("a3mailer_system_cpu_usage_ratio", value), step * 60.0)
        sent.append([(a["startsAt"], a["endsAt"]) for a in sends.values()])
    assert sent[0] == []  # pending is never sent
    assert sent[1] == [("1970-01-01T00:01:00.000Z", "1970-01-01T00:09:00.000Z")]  # 4 x 2m
    assert sent[2] == sent[3] == []  # resent only after resend_interval (not at exactly 2m)
    assert sent[4] == [("1970-01-01T00:01:00.000Z", "1970-01-01T00:12:00.000Z")]
    assert sent[5] == [("1970-01-01T00:01:00.000Z", "1970-01-01T00:05:00.000Z")]  # resolved
    assert sent[6] == sent[7] == [] and sent[8] == sent[5]  # resolved, resent
    assert engine.snapshot() == []


def test_rate_rows_read_counters_over_their_window(engine_for):
    engine = engine_for()
    for step in range(12):  # 120 failed logins a minute, 500 successes
        families = [GaugeMetricFamily("x", "t")]
        family = Metric("a3mailer_security_attempts", "t", "counter")
        family.add_sample("a3mailer_security_attempts_total",
                          {"protocol": "imap", "result": "failure"}, 120.0 * step)
        family.add_sample("a3mailer_security_attempts_total",
                          {"protocol": "imap", "result": "success"}, 500.0 * step)
        engine.evaluate([*families, family], step * 60.0)
    [alert] = [a for a in engine.snapshot() if a["name"] == "A3MailerBruteForceSurge"]
    assert alert["state"] == "firing" and alert["value"] == pytest.approx(120.0)
    assert alert["labels"] == {"alertname": "A3MailerBruteForceSurge", "severity": "warning",
                               "instance": "mail1:10587"}
    # only the longest window of samples is kept
    points = engine.history.series["a3mailer_security_attempts_total"]
    assert all(len(p) == 6 for p in points.values())


def test_states_survive_a_restart_within_the_outage_tolerance(engine_for, tmp_path):
    engine = engine_for()
    cpu_timeline(engine, [0.9] * 12)
    engine.save()
    path = tmp_path / "state/alerts.json"
    saved = json.loads(path.read_text())
    assert [a["state"] for a in saved["alerts"]] == ["firing"]
    # a new process: still firing at once, with the same firing time (Alertmanager sees the
    # same alert), not pending for another 10 minutes
    again = engine_for()
    assert cpu_timeline(again, [0.9], start=12) == ["firing"]
    assert again.snapshot()[0]["fired_at"] == 600.0
    # down for longer than the outage tolerance: states start afresh
    saved["saved_at"] -= OUTAGE_TOLERANCE_S + 1
    path.write_text(json.dumps(saved))
    late = engine_for()
    assert cpu_timeline(late, [0.9], start=100) == ["pending"]


def attempts(failures: float, successes: float) -> list[Metric]:
    family = Metric("a3mailer_security_attempts", "t", "counter")
    family.add_sample("a3mailer_security_attempts_total",
                      {"protocol": "imap", "result": "failure"}, failures)
    family.add_sample("a3mailer_security_attempts_total",
                      {"protocol": "imap", "result": "success"}, successes)
    return [family]


def test_a_restart_does_not_resolve_a_rate_alert_before_its_rate_is_back(engine_for):
    """Right after a restart a rate has no two samples: the restored alert stays as it
    was at that first evaluation (no resolve to Alertmanager, no new startsAt), and the
    rate decides from the second on, as Prometheus, whose TSDB spans the restart, does."""
    overrides = {"keep_firing_for": "0s",
                 "engine": {"alertmanager": {"url": "http://127.0.0.1:1"}}}
    engine = engine_for(overrides)
    for step in range(12):
        engine.evaluate(attempts(120.0 * step, 500.0 * step), step * 60.0)
    [before] = [a for a in engine.snapshot() if a["name"] == "A3MailerBruteForceSurge"]
    assert before["state"] == "firing"
    engine.save(force=True)
    again = engine_for(overrides)  # the new process: its counters start from 0
    first = again.evaluate(attempts(0.0, 0.0), 12 * 60.0)
    second = again.evaluate(attempts(120.0, 500.0), 13 * 60.0)
    [after] = [a for a in again.snapshot() if a["name"] == "A3MailerBruteForceSurge"]
    assert after["state"] == "firing" and after["fired_at"] == before["fired_at"]
    for sends in (first, second):
        assert all(a["endsAt"] > "1970-01-01T00:14" for a in sends.values())  # no resolve
    # without the rate's condition at the second evaluation, it resolves then
    third = engine_for(overrides, state="state")
    third.evaluate(attempts(0.0, 0.0), 14 * 60.0)
    third.evaluate(attempts(0.0, 500.0), 15 * 60.0)
    assert [a for a in third.snapshot() if a["name"] == "A3MailerBruteForceSurge"] == []


@pytest.mark.parametrize(("second", "state"), [(0.9, "firing"), (0.05, "")])
def test_a_restored_alert_outlasts_the_first_cpu_reading(engine_for, second, state):
    """The first CPU reading after start is the share since boot (5 % here, on a host
    that is busy now): it neither resolves a restored alert nor restarts its `for`; the
    second reading decides."""
    engine = engine_for({"keep_firing_for": "0s"})
    cpu_timeline(engine, [0.9] * 12)
    engine.save(force=True)
    again = engine_for({"keep_firing_for": "0s"})
    assert cpu_timeline(again, [0.05, second], start=12) == ["firing", state]


def test_the_outage_tolerance_counts_from_the_last_evaluation_not_the_last_change(
        engine_for):
    """An alert firing unchanged for 80 minutes, then a 10 s restart: still firing (the
    file is rewritten every STATE_REFRESH_S, and at stop)."""
    now = [0.0]
    engine = engine_for(clock=lambda: now[0])
    for step in range(80):
        now[0] = step * 60.0
        engine.evaluate(gauge("a3mailer_system_cpu_usage_ratio", 0.9), now[0])
        engine.save()
    now[0] += 10
    again = engine_for(clock=lambda: now[0])
    assert cpu_timeline(again, [0.9], start=81) == ["firing"]
    assert asyncio.run(_stopped(again)) and json.loads(
        (again.state_path).read_text())["saved_at"] == now[0]


async def _stopped(engine: AlertEngine) -> bool:
    await engine.stop()
    return True


@pytest.mark.parametrize("content", ["[]", "null", '{"version": 1, "saved_at": NOW, '
                                     '"alerts": [1]}', '{"version": 1, "saved_at": NOW, '
                                     '"alerts": [{"rule": "x", "labels": []}]}'])
def test_a_state_file_of_the_wrong_shape_starts_afresh(engine_for, tmp_path, caplog, content):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "alerts.json").write_text(content.replace("NOW", str(time.time())))
    engine = engine_for()
    assert engine.snapshot() == [] and engine._held == set()
    assert "cannot read saved alert states; starting afresh" in caplog.text


def test_reload_keeps_states_of_unchanged_rules(engine_for, config_file):
    engine = engine_for()
    cpu_timeline(engine, [0.9] * 12)
    same = load_config(config_file({"alerting": {"keep_firing_for": "3m", "engine": {
        "target_labels": TARGET}}}, name="same.yaml"))
    engine.configure(same, lambda: ())
    assert engine.snapshot()[0]["state"] == "firing"
    other = load_config(config_file({"alerting": {"alerts": {"A3MailerHighCpuUsage": {
        "severity": "critical"}}, "engine": {"target_labels": TARGET}}}, name="other.yaml"))
    engine.configure(other, lambda: ())  # another label set: another rule, state dropped
    assert engine.snapshot() == []


def test_instance_defaults_to_host_and_listen_port(config_file):
    import socket

    config = load_config(config_file({"server": {"listen_address": "0.0.0.0:10999"}}))
    engine = AlertEngine(None)
    engine.configure(config, lambda: ())
    assert engine.settings.target_labels == {"job": "a3mailer-exporter",
                                             "instance": f"{socket.gethostname()}:10999"}
    assert len(build_rules(config)) == len(THRESHOLD_ALERTS)


def test_push_credentials_are_checked(config_file):
    section = "alerting.engine.alertmanager"
    for push, message in (({"username": "am"}, "username and password_file/password_env go "
                                                "together"),
                          ({"username": "am", "password_env": "X", "bearer_token_env": "Y"},
                           "bearer_token_env: Basic auth or a bearer token, not both"),
                          ({"url": "http://user:pw@127.0.0.1:9093"},
                           "url: must be an http:// or https:// URL without user:password@"),
                          ({"password_file": "/nonexistent/pw", "username": "am"},
                           "cannot read secret"),
                          ({"url": "https://127.0.0.1:9093", "ca_file": "/nonexistent/ca.pem"},
                           "ca_file: cannot read CA certificates: No such file or directory")):
        with pytest.raises(ConfigError) as info:
            load_config(config_file({"alerting": {"engine": {"alertmanager": push}}}))
        assert section in str(info.value) and message in str(info.value), str(info.value)


# --------------------------------------------------------------------------- HTTP


@pytest.fixture
def served(make_exporter):
    """(exporter, client) for a config; the client talks to the app in process."""
    exporters: list[Exporter] = []

    def build(data: dict):
        exporter = make_exporter(data)
        exporters.append(exporter)
        return exporter, httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(exporter)), base_url="http://exporter")

    yield build
    for exporter in exporters:
        if exporter.audit is not None:
            exporter.audit.close()


async def test_api_and_metrics_show_the_engines_alerts(served):
    # memory above 0.001 % is always true: pending at the first evaluation, firing at the
    # next (for 1ms)
    exporter, client = served({
        "monitoring": {"alert_thresholds": {"memory_usage_threshold": 0.001}},
        "alerting": {"alerts": {"A3MailerHighMemoryUsage": {"for": "1ms"}},
                     "engine": {"target_labels": TARGET}}})
    await exporter.alerts.evaluate_once()
    answer = await client.get("/api/v1/alerts")
    assert answer.status_code == 200
    body = answer.json()
    assert body["enabled"] is True and body["rules"] == len(THRESHOLD_ALERTS)
    [pending] = [a for a in body["alerts"] if a["name"] == "A3MailerHighMemoryUsage"]
    assert pending["state"] == "pending" and pending["labels"]["instance"] == "mail1:10587"
    exporter.alerts.clock = lambda: exporter.alerts.last_evaluation + 1
    await exporter.alerts.evaluate_once()
    firing = (await client.get("/api/v1/alerts?state=firing")).json()["alerts"]
    assert [a["name"] for a in firing] == ["A3MailerHighMemoryUsage"]
    assert firing[0]["value"] > 0.001 and firing[0]["threshold"] == 0.001
    pending_now = (await client.get("/api/v1/alerts?state=pending")).json()["alerts"]
    assert "A3MailerHighMemoryUsage" not in {a["name"] for a in pending_now}
    bad = await client.get("/api/v1/alerts?state=resolved")
    assert bad.status_code == 400 and bad.json()["error"] == "bad_request"
    text = (await client.get("/metrics")).text
    values = {(s.labels["alert"], s.labels["severity"]): s.value
              for f in text_string_to_metric_families(text) if f.name == "a3mailer_alert_active"
              for s in f.samples}
    assert values["A3MailerHighMemoryUsage", "warning"] == 1
    assert values["A3MailerHighCpuUsage", "warning"] == 0
    assert len(values) == len(THRESHOLD_ALERTS)
    spec = (await client.get("/openapi.json")).json()["paths"]["/api/v1/alerts"]["get"]
    assert "400" in spec["responses"] and "404" in spec["responses"]


async def test_api_says_when_the_engine_is_disabled(served):
    exporter, client = served({"alerting": {"engine": {"enabled": False}}})
    answer = await client.get("/api/v1/alerts")
    assert answer.status_code == 404 and "alerting.engine.enabled" in answer.json()["message"]
    assert "a3mailer_alert_active" not in (await client.get("/metrics")).text
    assert await exporter.alerts.evaluate_once() == 0


def test_a_failing_rule_leaves_the_others_evaluated_and_is_logged_once(engine_for, caplog):
    """A corrupt alert of the first rule (resolved_at a string) raised in its step and the
    rules after it were never evaluated, nothing saved, nothing logged above debug."""
    caplog.set_level("INFO", logger="exporter.alerts")
    engine = engine_for()
    first = engine.rules[0]
    engine.active[first.key]["x"] = ActiveAlert({"alertname": first.name}, {}, 1.0, "firing",
                                                0, 1, "yesterday")  # type: ignore[arg-type]
    engine.collect_source = lambda: gauge("a3mailer_queue_total_messages", 50000)
    for _ in range(2):
        outcome = asyncio.run(engine.periodic.once())
        assert f"{first.name}: TypeError: unsupported operand" in outcome.error
    assert [(a["name"], a["state"]) for a in engine.snapshot()
            if a["name"] != first.name] == [("A3MailerMailQueueLarge", "pending")]
    assert engine.periodic.last.failures == 2 and engine.state_path.exists()
    assert caplog.text.count("alert evaluation failing") == 1
    del engine.active[first.key]["x"]
    assert asyncio.run(engine.periodic.once()).error == ""
    assert "alert evaluation recovered" in caplog.text


def test_a_short_interval_does_not_time_the_evaluation_out(engine_for):
    """The timeout was the interval: an evaluation longer than the shortest interval the
    config allows (1s) timed out, every time."""
    engine = engine_for({"engine": {"evaluation_interval": "1s"}})

    def slow() -> list[Metric]:
        time.sleep(1.1)
        return gauge("a3mailer_queue_total_messages", 50000)

    engine.collect_source = slow
    assert engine.periodic.interval == 1.0 and engine.periodic.timeout == EVALUATION_TIMEOUT_S
    outcome = asyncio.run(engine.periodic.once())
    assert outcome.error == "" and outcome.value == 0
