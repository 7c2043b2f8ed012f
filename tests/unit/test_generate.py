"""The generated bundle: deterministic, checked, built only from the config and the catalogue,
and every config knob that affects it changes it (one case per knob)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import certifi
import pytest
import yaml

from exporter import catalogue
from exporter.cli import main
from exporter.config import ConfigError, load_config, load_schema
from exporter.generate import OUTPUTS, alerts, dashboards, generate, promql
from exporter.generate.values import configured, helm_template, lookup

ROOT = Path(__file__).resolve().parents[2]
T = "monitoring.alert_thresholds."


def render(tmp_path: Path, overrides: dict[str, Any] | None = None) -> dict[str, str]:
    """Every bundle output for the defaults merged with `overrides`."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(overrides or {}))
    config = load_config(path)
    return {rel: fn(config) for rel, fn in OUTPUTS.items() if not rel.startswith(("docs/",
                                                                                     "exporter/"))}


def rules(out: dict[str, str]) -> dict[tuple[str, str], dict[str, Any]]:
    data = yaml.safe_load(out["alert-rules/alerts.yaml"])
    return {(r["alert"], r["labels"]["severity"]): r for g in data["groups"] for r in g["rules"]}


def nested(path: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for key in reversed(path.split(".")):
        out = {key: out}
    return dict(out)


@pytest.fixture(scope="module")
def default_out(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return render(tmp_path_factory.mktemp("defaults"))


# --------------------------------------------------------------------------- the command


def test_committed_bundle_is_current_and_rerun_is_byte_identical(tmp_path):
    assert generate(ROOT, check=True) == []
    first, second = tmp_path / "a", tmp_path / "b"
    assert sorted(generate(first)) == sorted(OUTPUTS)
    generate(second)
    for rel in OUTPUTS:
        assert (first / rel).read_bytes() == (second / rel).read_bytes() == (
            ROOT / rel).read_bytes(), rel
    assert generate(first) == []  # a rerun writes nothing


def test_check_names_stale_files_and_exits_1(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["generate", "--out", str(out)]) == 0
    (out / "dashboards/mail.json").write_text("{}")
    (out / "alert-rules/alerts.yaml").unlink()
    assert main(["generate", "--out", str(out), "--check"]) == 1
    err = capsys.readouterr().err
    assert "stale: dashboards/mail.json" in err and "stale: alert-rules/alerts.yaml" in err
    assert "stale: dashboards/system.json" not in err
    assert main(["generate", "--out", str(out)]) == 0
    assert main(["generate", "--out", str(out), "--check"]) == 0


def test_generate_with_config_writes_its_thresholds(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("monitoring:\n  alert_thresholds:\n    queue_size_threshold: 321\n")
    assert main(["generate", "--config", str(config), "--out", str(tmp_path / "o")]) == 0
    text = (tmp_path / "o/alert-rules/alerts.yaml").read_text()
    assert 'a3mailer_queue_total_messages{job="a3mailer-exporter"} > 321' in text


def test_invalid_config_is_refused_with_exit_2(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("alerting:\n  alerts:\n    A3MailerHighCpuUsag: {enabled: false}\n")
    assert main(["generate", "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "alerting.alerts.A3MailerHighCpuUsag: unknown alert (did you mean " \
           "'A3MailerHighCpuUsage'?)" in err
    assert not (tmp_path / "o").exists()


def test_unknown_dashboard_uid_key_is_a_config_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dashboards:\n  uids: {overveiw: x}\n")
    with pytest.raises(ConfigError, match="dashboards.uids.overveiw: unknown dashboard"):
        load_config(path)


# --------------------------------------------------------------------------- the tables


def test_tables_are_consistent():
    assert alerts.check_tables() == []


def test_at_least_25_alerts_over_every_family(default_out):
    found = rules(default_out)
    names = {name for name, _ in found}
    assert len(names - {"A3MailerInfoInhibitor"}) >= 25
    groups = yaml.safe_load(default_out["alert-rules/alerts.yaml"])["groups"]
    assert [g["name"] for g in groups] == [f"a3mailer-{f}" for f in alerts.FAMILIES]
    for (name, severity), rule in found.items():
        assert name.startswith("A3Mailer") and name[8].isupper()
        if name != "A3MailerInfoInhibitor":
            assert severity in ("critical", "warning", "info")
            assert rule["for"]
        assert set(rule["annotations"]) == {"summary", "description", "runbook_url",
                                            "dashboard_url"}
        assert "<<" not in json.dumps(rule)
    # the two levels of the certificate alert
    assert ("A3MailerTlsCertificateExpiring", "warning") in found
    assert ("A3MailerTlsCertificateExpiring", "critical") in found


def test_a_family_whose_alerts_are_all_disabled_has_no_group(tmp_path):
    """No `rules: []` group (linters refuse it; the chart leaves it out too); with every
    alert disabled the file is kept with `groups: []`, so rule_files and --check find it."""
    system = {a.name: {"enabled": False} for a in alerts.ALERTS if a.family == "system"}
    out = render(tmp_path, {"alerting": {"alerts": system}})
    groups = yaml.safe_load(out["alert-rules/alerts.yaml"])["groups"]
    assert [g["name"] for g in groups] == [
        "a3mailer-application", "a3mailer-mail", "a3mailer-security", "a3mailer-exporter"]
    assert all(g["rules"] for g in groups)
    every = {name: {"enabled": False} for name in alerts.ALERT_NAMES}
    out = render(tmp_path, {"alerting": {"alerts": every}})
    assert yaml.safe_load(out["alert-rules/alerts.yaml"]) == {"groups": []}


def test_threshold_table_is_what_an_evaluator_needs():
    by_name = {(a.name, a.severity): a for a in alerts.THRESHOLD_ALERTS}
    cpu = by_name["A3MailerHighCpuUsage", "warning"]
    assert (cpu.metric, cpu.op, cpu.threshold, cpu.scale, cpu.for_) == (
        "a3mailer_system_cpu_usage_ratio", ">", T + "cpu_usage_threshold", 100, "10m")
    surge = by_name["A3MailerBruteForceSurge", "warning"]
    assert (surge.metric, surge.matchers, surge.rate, surge.scale) == (
        "a3mailer_security_attempts_total", 'result="failure"', "5m", 60)
    for alert in alerts.THRESHOLD_ALERTS:
        assert alert.metric in catalogue.METRICS
        assert alert.op in alerts.COMPARISONS
        lookup(load_config(), alert.threshold)  # a real key


def test_value_renderer_writes_helm_templates_instead_of_numbers():
    config = load_config()
    helm = alerts.render_rules(config, helm_template())
    baked = alerts.render_rules(config, configured(config))
    by_name = {r["alert"]: r for g in helm["groups"] for r in g["rules"]}
    cpu = by_name["A3MailerHighCpuUsage"]
    assert cpu["expr"] == ('a3mailer_system_cpu_usage_ratio{job="a3mailer-exporter"} * 100 > '
                           "{{ .Values.config.monitoring.alert_thresholds.cpu_usage_threshold }}")
    assert "{{ .Values.config.monitoring.alert_thresholds.cpu_usage_threshold }}%" in (
        cpu["annotations"]["description"])
    assert by_name["A3MailerProbeFailing"] == next(
        r for g in baked["groups"] for r in g["rules"] if r["alert"] == "A3MailerProbeFailing")


def test_metric_names_reads_series_out_of_promql():
    expr = ('histogram_quantile(0.95, sum by (le, instance) (rate(a3mailer_x_bucket{job="a", '
            'code=~"5.."}[5m]))) * 1000 > 2.5e3 and on (instance) up{job="b"} == 1 unless '
            'instance:a3mailer_y:rate5m offset 5m or vector(0) or predict_linear(z[6h], 24 * 3600)')
    assert promql.metric_names(expr) == {"a3mailer_x_bucket", "up", "instance:a3mailer_y:rate5m",
                                         "z"}
    assert promql.base_metric("a3mailer_security_decision_duration_seconds_bucket",
                              catalogue.METRICS) == "a3mailer_security_decision_duration_seconds"


def test_every_referenced_series_is_catalogued_or_recorded(default_out):
    recorded = {r["record"] for g in yaml.safe_load(
        default_out["alert-rules/recording-rules.yaml"])["groups"] for r in g["rules"]}
    for rel, text in default_out.items():
        if rel.startswith("helm/"):
            continue  # the chart's copies, with placeholders: test_helm_chart.py compares
        if rel.endswith(".json"):  # their renders with these files
            names = dashboards.referenced_series(text)
        elif rel.endswith("rules.yaml") or rel.endswith("alerts.yaml"):
            names = set(alerts.referenced_series(yaml.safe_load(text)))
        else:
            continue
        for name in names:
            base = promql.base_metric(name, catalogue.METRICS)
            assert base in catalogue.METRICS or base in recorded or base in promql.SYNTHETIC, (
                rel, name)


# --------------------------------------------------------------------------- knobs
# Every key of the three sections the bundle reads: set it, regenerate, find it.


def _threshold_case(key: str) -> tuple[str, Any, Any]:
    value = 37 if key.endswith(("usage_threshold", "rate_threshold", "days")) else 4321
    if key == "disk_full_prediction_hours":
        value = 37

    def check(out: dict[str, str]) -> None:
        found = rules(out)
        users = [a for a in [*alerts.ALERTS] if a.threshold == T + key]
        assert users, key
        for alert in users:
            rule = found[alert.name, alert.severity]
            assert f" {value}" in rule["expr"], (key, rule["expr"])
            assert str(value) in rule["annotations"]["description"] + rule[
                "annotations"]["summary"]
        panels = [p for d in dashboards.DASHBOARDS for r in d.rows for p in r.panels
                  if T + key in (p.threshold, p.warning)]
        for panel in panels:
            board = next(d for d in dashboards.DASHBOARDS if any(panel in r.panels
                                                                  for r in d.rows))
            data = json.loads(out[f"dashboards/{board.key}.json"])
            mine = next(p for p in data["panels"] if p["title"] == panel.title
                        and p["description"] == panel.description)
            steps = mine["fieldConfig"]["defaults"]["thresholds"]["steps"]
            assert value in [s["value"] for s in steps], (key, panel.title)

    return T + key, value, check


def _rule(out: dict[str, str], name: str, severity: str = "warning") -> dict[str, Any]:
    return rules(out)[name, severity]


def _am(out: dict[str, str]) -> dict[str, Any]:
    return dict(yaml.safe_load(out["alert-rules/alertmanager.example.yml"]))


def _board(out: dict[str, str], key: str) -> dict[str, Any]:
    return dict(json.loads(out[f"dashboards/{key}.json"]))


def _exprs(out: dict[str, str]) -> list[str]:
    found = [r["expr"] for r in rules(out).values()]
    for key in dashboards.KEYS:
        found += [t["expr"] for p in _board(out, key)["panels"] for t in p.get("targets", [])]
    return found


def _selector_check(out: dict[str, str]) -> None:
    exprs = _exprs(out)
    assert sum('job="mail-exporter"' in e for e in exprs) > 60
    assert not any('job="a3mailer-exporter"' in e for e in exprs)


OTHER_KNOBS: list[tuple[str, Any, Any]] = [
    ("alerting.selector", 'job="mail-exporter"', _selector_check),
    ("alerting.runbook_url", "https://wiki.example/{family}/{alertname}",
     lambda out: _rule(out, "A3MailerHighCpuUsage")["annotations"]["runbook_url"]
     == "https://wiki.example/system/A3MailerHighCpuUsage"),
    ("alerting.dashboard_url", "https://grafana.example/d/{uid}/{slug}",
     lambda out: _rule(out, "A3MailerMailQueueLarge")["annotations"]["dashboard_url"]
     == "https://grafana.example/d/a3mailer-mail/a3mailer-mail-services"),
    ("alerting.keep_firing_for", "9m",
     lambda out: all(r.get("keep_firing_for") == ("9m" if (name, sev) in {
         (a.name, a.severity) for a in alerts.THRESHOLD_ALERTS} else None)
         for (name, sev), r in rules(out).items())),
    ("alerting.labels", {"team": "mail"},
     lambda out: all(r["labels"]["team"] == "mail" for r in rules(out).values())),
    ("alerting.alerts", {"A3MailerProbeFailing": {"enabled": False},
                         "A3MailerHighCpuUsage": {"severity": "critical", "for": "3m",
                                                  "labels": {"page": "yes"},
                                                  "annotations": {"hint": "call Bob"},
                                                  "keep_firing_for": "0s"},
                         "A3MailerStalwartDown": {"keep_firing_for": "2m"}},
     lambda out: ("A3MailerProbeFailing", "critical") not in rules(out)
     and _rule(out, "A3MailerHighCpuUsage", "critical")["for"] == "3m"
     and "for 3m" in _rule(out, "A3MailerHighCpuUsage", "critical")["annotations"]["description"]
     and _rule(out, "A3MailerHighCpuUsage", "critical")["labels"]["page"] == "yes"
     and _rule(out, "A3MailerHighCpuUsage", "critical")["annotations"]["hint"] == "call Bob"
     and "keep_firing_for" not in _rule(out, "A3MailerHighCpuUsage", "critical")
     and _rule(out, "A3MailerStalwartDown", "critical")["keep_firing_for"] == "2m"),
    ("alerting.alertmanager.webhook_url", "http://127.0.0.9:9/hook",
     lambda out: all(r.get("webhook_configs", [{"url": "http://127.0.0.9:9/hook"}])[0]["url"]
                     == "http://127.0.0.9:9/hook" for r in _am(out)["receivers"])),
    ("alerting.alertmanager.email_to", "noc@mail.example",
     lambda out: _am(out)["receivers"][2]["email_configs"][0]["to"] == "noc@mail.example"),
    ("alerting.alertmanager.email_from", "am@mail.example",
     lambda out: _am(out)["global"]["smtp_from"] == "am@mail.example"),
    ("alerting.alertmanager.smarthost", "smtp.mail.example:25",
     lambda out: _am(out)["global"]["smtp_smarthost"] == "smtp.mail.example:25"),
    ("alerting.alertmanager.group_wait", "7s",
     lambda out: _am(out)["route"]["group_wait"] == "7s"),
    ("alerting.alertmanager.group_interval", "7m",
     lambda out: _am(out)["route"]["group_interval"] == "7m"),
    ("alerting.alertmanager.repeat_interval", "7h",
     lambda out: _am(out)["route"]["repeat_interval"] == "7h"),
    ("dashboards.uids", {"mail": "my-mail"},
     lambda out: _board(out, "mail")["uid"] == "my-mail"
     and "/d/my-mail/" in _rule(out, "A3MailerMailQueueLarge")["annotations"]["dashboard_url"]),
    ("dashboards.multi_cluster", True,
     lambda out: next(v for v in _board(out, "system")["templating"]["list"]
                      if v["name"] == "cluster")["hide"] == 0),
    ("dashboards.refresh", "1m", lambda out: _board(out, "security")["refresh"] == "1m"),
]


def _bundle_keys() -> list[str]:
    schema = load_schema()["properties"]
    keys = [T + k for k in schema["monitoring"]["properties"]["alert_thresholds"]["properties"]]
    for section in ("alerting", "dashboards"):
        for key, prop in schema[section]["properties"].items():
            if (section, key) == ("alerting", "engine"):
                continue  # the in-process engine's keys: the bundle ignores them (tested below)
            if "properties" in prop:
                keys += [f"{section}.{key}.{sub}" for sub in prop["properties"]]
            else:
                keys.append(f"{section}.{key}")
    return keys


THRESHOLD_KEYS = list(load_schema()["properties"]["monitoring"]["properties"][
    "alert_thresholds"]["properties"])
KNOBS = [_threshold_case(k) for k in THRESHOLD_KEYS] + OTHER_KNOBS


def test_every_bundle_knob_has_a_case():
    assert sorted(path for path, _, _ in KNOBS) == sorted(_bundle_keys())


@pytest.mark.parametrize("path, value, check", KNOBS, ids=[k[0] for k in KNOBS])
def test_knob_changes_the_bundle(tmp_path, default_out, path, value, check):
    out = render(tmp_path, nested(path, value))
    assert out != default_out
    result = check(out)
    assert result is None or result is True


def test_bundle_ignores_keys_outside_its_sections(tmp_path, default_out):
    out = render(tmp_path, {"monitoring": {"collection_interval": "5s"},
                            "security": {"max_login_attempts": 9}})
    assert out == default_out


def test_bundle_ignores_the_alert_engine_keys(tmp_path, default_out, monkeypatch):
    monkeypatch.setenv("AM_PASSWORD", "am-secret")  # a variable the config names is set
    engine = load_schema()["properties"]["alerting"]["properties"]["engine"]["properties"]
    changed = {"enabled": False, "evaluation_interval": "7s",
               "target_labels": {"job": "x", "instance": "y:1"},
               "alertmanager": {"url": "http://127.0.0.9:9093", "timeout": "3s",
                                "resend_interval": "2m", "username": "am",
                                "password_env": "AM_PASSWORD", "ca_file": certifi.where()}}
    assert set(changed) == set(engine)
    out = render(tmp_path, {"alerting": {"engine": changed}})
    assert out == default_out



def test_url_patterns_fill_every_placeholder_as_the_chart_does(tmp_path):
    """{alertname}, {family}, {anchor}, {uid} and {slug} in either pattern (the chart's
    PrometheusRule fills the same five; test_helm_chart.py compares the two)."""
    pattern = "https://wiki.example/{family}/{alertname}/{anchor}/{uid}/{slug}"
    out = render(tmp_path, {"alerting": {"runbook_url": pattern,
                                         "dashboard_url": pattern + "?x={{ $labels.instance }}"}})
    annotations = _rule(out, "A3MailerMailQueueLarge")["annotations"]
    filled = ("https://wiki.example/application/A3MailerMailQueueLarge/a3mailermailqueuelarge/"
              "a3mailer-mail/a3mailer-mail-services")
    assert annotations["runbook_url"] == filled
    assert annotations["dashboard_url"] == filled + "?x={{ $labels.instance }}"


def test_every_alert_has_a_runbook_section_and_its_url_points_there(default_out):
    for (name, _), rule in rules(default_out).items():
        alert = next(a for a in [*alerts.ALERTS, alerts.INFO_INHIBITOR] if a.name == name)
        page = ROOT / "docs/runbooks" / f"{alert.family}.md"
        headings = [line[3:].strip() for line in page.read_text().splitlines()
                    if line.startswith("## ")]
        assert name in headings, f"{name}: no section in {page.name}"
        assert rule["annotations"]["runbook_url"].endswith(
            f"/docs/runbooks/{alert.family}.md#{name.lower()}")
