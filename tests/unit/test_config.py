"""Config loading: defaults, merging, secrets, and every kind of error with FILE:LINE: key."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from exporter.cli import main
from exporter.config import ConfigError, load_config, load_schema, parse_duration
from exporter.config.loader import merge


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return [str(p) for p in info.value.problems]


def test_embedded_defaults_follow_the_seed():
    config = load_config()
    mon = config["monitoring"]
    assert mon["collection_interval"] == "30s"
    assert mon["health_check_interval"] == "10s"
    assert mon["retention_period"] == "24h"
    seed = {"cpu_usage_threshold": 80, "memory_usage_threshold": 85, "disk_usage_threshold": 90,
            "error_rate_threshold": 5, "response_time_threshold": 5000,
            "connection_count_threshold": 1000, "queue_size_threshold": 10000}
    assert {k: mon["alert_thresholds"][k] for k in seed} == seed
    sec = config["security"]
    assert (sec["max_login_attempts"], sec["login_attempt_window"], sec["lockout_duration"]) == (
        5, "5m", "15m")
    assert sec["rate_limits"] == {"authenticated_requests_per_minute": 300,
                                  "anonymous_requests_per_minute": 60, "burst_allowance": 10,
                                  "window_duration": "60s"}
    assert config.seconds("monitoring", "retention_period") == 86400


def test_user_file_is_merged_over_defaults(tmp_path):
    path = write(tmp_path, """
        monitoring:
          alert_thresholds:
            cpu_usage_threshold: 65
          custom_metrics:
            - {name: queue_depth, type: gauge, help: Messages waiting}
    """)
    config = load_config(path)
    thresholds = config["monitoring"]["alert_thresholds"]
    assert thresholds["cpu_usage_threshold"] == 65
    assert thresholds["memory_usage_threshold"] == 85  # untouched default survives
    assert config["monitoring"]["custom_metrics"][0]["name"] == "queue_depth"
    assert config.source == str(path)


def test_overrides_win_over_file(tmp_path):
    path = write(tmp_path, "server:\n  listen_address: 127.0.0.1:1111\n")
    config = load_config(path, {"server": {"listen_address": "127.0.0.1:2222"}})
    assert config["server"]["listen_address"] == "127.0.0.1:2222"


def test_merge_replaces_lists_and_merges_maps():
    assert merge({"a": {"b": 1, "c": [1, 2]}}, {"a": {"c": [3]}}) == {"a": {"b": 1, "c": [3]}}


def test_unknown_key_names_file_line_path_and_suggests(tmp_path):
    path = write(tmp_path, """
        monitoring:
          alert_thresholds:
            cpu_usage_treshold: 70
    """)
    assert problems(path) == [
        f"{path}:3: monitoring.alert_thresholds.cpu_usage_treshold: unknown key "
        "(did you mean 'cpu_usage_threshold'?)"]


def test_wrong_type(tmp_path):
    path = write(tmp_path, """
        security:
          max_login_attempts: five
    """)
    assert problems(path) == [
        f"{path}:2: security.max_login_attempts: wrong type: expected integer, got string 'five'"]


@pytest.mark.parametrize("value", ["5 minutes", "-5s", "0s", "10", "1.5h"])
def test_bad_durations(tmp_path, value):
    path = write(tmp_path, f"monitoring:\n  collection_interval: '{value}'\n")
    [problem] = problems(path)
    assert problem.startswith(f"{path}:2: monitoring.collection_interval: bad duration '{value}'")


@pytest.mark.parametrize("value", ["5 m", "-1s", "0"])
def test_bad_durations_that_may_be_zero(tmp_path, value):
    path = write(tmp_path, f"alerting:\n  keep_firing_for: '{value}'\n")
    [problem] = problems(path)
    assert problem == (f"{path}:2: alerting.keep_firing_for: bad duration '{value}': expected "
                       "0 (0s, 0m, ...) or a positive number followed by ms, s, m, h, d or w "
                       "(e.g. 30s, 5m, 24h)")


def test_a_zero_in_any_unit_turns_hysteresis_off(tmp_path):
    from exporter.generate.alerts import THRESHOLD_ALERTS, keep_firing_for

    for zero in ("0s", "0m", "0h"):
        config = load_config(write(tmp_path, f"alerting:\n  keep_firing_for: {zero}\n"))
        assert keep_firing_for(config, THRESHOLD_ALERTS[0]) == ""


def test_a_bad_key_name_is_named(tmp_path):
    path = write(tmp_path, """
        alerting:
          labels:
            team: mail
            bad-label: x
    """)
    assert problems(path) == [
        f"{path}:4: alerting.labels.bad-label: the name 'bad-label' must be a Prometheus "
        "label name "
        "(letters, digits and _, not starting with a digit)"]


def test_rules_prometheus_would_refuse_and_a_port_taken_twice_are_config_errors(tmp_path):
    path = write(tmp_path, """
        alerting:
          selector: 'job="a"}, env="b"'
          labels: {severity: page}
          alerts:
            A3MailerHighCpuUsage: {labels: {alertname: x}}
    """)
    found = problems(path)
    assert found[0].startswith(f"{path}:2: alerting.selector: must be PromQL label matchers")
    assert found[1] == (f"{path}:3: alerting.labels.severity: the name 'severity' is every "
                        "rule's own (an alert's severity has a key of its own: "
                        "alerting.alerts.NAME.severity)")
    assert found[2] == (f"{path}:5: alerting.alerts.A3MailerHighCpuUsage.labels.alertname: "
                        "the name 'alertname' is every rule's own")
    clash = write(tmp_path, """
        server: {listen_address: 127.0.0.1:26010}
        security: {postfix_policy: {enabled: true, listen: 0.0.0.0:26010}}
    """, name="clash.yaml")
    assert problems(clash) == [f"{clash}:2: security.postfix_policy.listen: the port of "
                               "server.listen_address: each listener needs its own"]
    fine = write(tmp_path, """
        server: {listen_address: 127.0.0.1:26010}
        security: {postfix_policy: {enabled: true, listen: 127.0.0.2:26010}}
        alerting: {selector: 'job="mail", env=~"prod|test"'}
    """, name="fine.yaml")
    load_config(fine)  # another address, and matchers with a regex: fine


def test_ports_past_65535_or_0_are_config_errors_naming_the_key(tmp_path):
    """The pattern took five digits: 127.0.0.1:99999 loaded and bound port 34463."""
    path = write(tmp_path, """
        server: {listen_address: 127.0.0.1:99999}
        security: {postfix_policy: {listen: "[::1]:0"}}
        alerting: {alertmanager: {smarthost: "smtp.example.com:65536"}}
    """)
    assert problems(path) == [
        f"{path}:1: server.listen_address: port 99999 is out of range: must be 1 to 65535",
        f"{path}:2: security.postfix_policy.listen: port 0 is out of range: must be 1 to 65535",
        f"{path}:3: alerting.alertmanager.smarthost: port 65536 is out of range: must be 1 "
        "to 65535"]
    bad_form = write(tmp_path, "server: {listen_address: nonsense}\n", name="form.yaml")
    assert problems(bad_form) == [
        f"{bad_form}:1: server.listen_address: must be HOST:PORT (127.0.0.1:10587, "
        "[::1]:10587, or :10587 for every address)"]
    edge = write(tmp_path, """
        server: {listen_address: ":65535"}
        security: {postfix_policy: {enabled: true, listen: "127.0.0.1:1"}}
    """, name="edge.yaml")
    load_config(edge)


def test_a_listen_override_is_checked_like_the_file(tmp_path):
    """Overrides are merged after the schema check: a bad one reached split_listen."""
    with pytest.raises(ConfigError) as info:
        load_config(None, {"server": {"listen_address": "nonsense"},
                           "security": {"postfix_policy": {"enabled": True}}})
    assert [p.path for p in info.value.problems] == ["server.listen_address"]


@pytest.mark.parametrize("path", ["/metrics", "/livez", "/readyz/", "/openapi.json",
                                  "/-/reload", "/-", "/api", "/api/v1/health",
                                  "/dovecot/policy", "/dovecot/status"])
def test_a_health_path_that_takes_a_built_in_route_is_a_config_error(tmp_path, path):
    """/metrics as the health path answered the health document on /metrics (it comes
    first in the route table); /api/... took the API's auth and rate limits."""
    config = write(tmp_path, f"monitoring:\n  health_endpoint_path: {path}\n")
    assert problems(config) == [
        f"{config}:2: monitoring.health_endpoint_path: {path} is a built-in route: the health "
        "document needs a path of its own (not /metrics, /livez, /readyz, /openapi.json, "
        "/api/..., /dovecot/..., /-/...)"]


@pytest.mark.parametrize("path", ["/health", "/status/health", "/apis", "/metrics-health",
                                  "/healthz", "/"])
def test_a_health_path_of_its_own_loads(tmp_path, path):
    config = write(tmp_path, f"monitoring:\n  health_endpoint_path: {path}\n")
    assert load_config(config)["monitoring"]["health_endpoint_path"] == path


def test_an_alert_template_prometheus_cannot_parse_is_a_config_error(tmp_path):
    path = write(tmp_path, """
        alerting:
          alerts:
            A3MailerHighCpuUsage:
              annotations:
                hint: "{{ $labels.instance "
                fine: "{{ $labels.instance }} at {{ $value }}"
    """)
    assert problems(path) == [
        f"{path}:5: alerting.alerts.A3MailerHighCpuUsage.annotations.hint: an unclosed {{{{ "
        "action (Prometheus would refuse every rule)"]


def test_a_jobs_interval_below_a_second_is_a_config_error(tmp_path):
    """1ms (a slip for 1m) had probes and health checks run a thousand times a second,
    and every alert evaluation fail with "timed out after 0.001s"."""
    path = write(tmp_path, """
        monitoring:
          health_check_interval: 1ms
          health_check_timeout: 1ms
          probes:
            - {name: smtp, protocol: smtp, host: 127.0.0.1, interval: 500ms}
            - {name: imap, protocol: imap, host: 127.0.0.1, interval: 1s}
          logs: {poll_interval: 100ms}
        alerting:
          engine: {evaluation_interval: 999ms}
    """)
    assert problems(path) == [
        f"{path}:2: monitoring.health_check_interval: 1ms is below the 1s floor of a job's "
        "interval (a slip for 1m?)",
        f"{path}:5: monitoring.probes[0].interval: 500ms is below the 1s floor of a job's "
        "interval (a slip for 1m?)",
        f"{path}:9: alerting.engine.evaluation_interval: 999ms is below the 1s floor of a "
        "job's interval (a slip for 1m?)"]


PATH_RULE = "must be a path starting with /, in visible ASCII (percent-encode the rest)"
EHLO_RULE = "must be a host name or an address literal such as [192.0.2.1]"


@pytest.mark.parametrize(("key", "value", "message"), [
    ("path", '"/x HTTP/1.1\\r\\nX-Injected: yes\\r\\nY:"', PATH_RULE),
    ("path", '"/a b"', PATH_RULE),
    ("path", "healthz", PATH_RULE),
    ("ehlo", '"mx.example.org\\r\\nMAIL FROM:<x@y>"', EHLO_RULE),
    ("ehlo", '"two words"', EHLO_RULE),
])
def test_a_probe_line_that_would_reach_the_wire_unchecked_is_a_config_error(
        tmp_path, key, value, message):
    """A CR LF in an HTTP probe's path had sent the server an extra header line."""
    protocol = "http" if key == "path" else "smtp"
    path = write(tmp_path, f"""
        monitoring:
          probes:
            - {{name: p, protocol: {protocol}, host: 127.0.0.1, {key}: {value}}}
    """)
    assert problems(path) == [f"{path}:3: monitoring.probes[0].{key}: {message}"]


@pytest.mark.parametrize(("key", "value", "message"), [
    ("path", "/x", "path must start with / and hold only visible ASCII (percent-encode the "
     "rest)"),
    ("ehlo", "mx", "ehlo must be a host name or an address literal such as [192.0.2.1]")])
def test_a_probe_line_ending_in_a_newline_is_a_config_error(tmp_path, key, value, message):
    """A schema pattern's $ (Python's re) also matches before a last newline; the probe's
    own check matches the whole value."""
    protocol = "http" if key == "path" else "smtp"
    path = write(tmp_path, f"""
        monitoring:
          probes:
            - {{name: p, protocol: {protocol}, host: 127.0.0.1, {key}: "{value}\\n"}}
    """)
    assert problems(path) == [f"{path}:3: monitoring.probes[0]: probe p: {message}"]


@pytest.mark.parametrize("ehlo", ["mx1.example.org", "a3mailer-exporter.invalid", "localhost",
                                  "[192.0.2.1]", "[IPv6:2001:db8::1]"])
def test_a_probe_ehlo_name_or_address_literal_loads(tmp_path, ehlo):
    path = write(tmp_path, f"""
        monitoring:
          probes:
            - {{name: p, protocol: smtp, host: 127.0.0.1, ehlo: "{ehlo}"}}
    """)
    assert load_config(path)["monitoring"]["probes"][0]["ehlo"] == ehlo


def test_settings_that_cannot_work_together_are_config_errors(tmp_path):
    path = write(tmp_path, """
        security:
          lockout_duration: 10m
          lockout: {max_duration: 2s}
          session_config: {cookie_same_site: None, secure_cookies: false}
    """)
    assert problems(path) == [
        f"{path}:3: security.lockout.max_duration: must not be below security.lockout_duration",
        f"{path}:4: security.session_config.cookie_same_site: None needs secure_cookies: true "
        "(browsers drop a SameSite=None cookie without Secure)"]


def test_out_of_range_percentage(tmp_path):
    path = write(tmp_path, """
        monitoring:
          alert_thresholds:
            disk_usage_threshold: 120
    """)
    assert problems(path) == [f"{path}:3: monitoring.alert_thresholds.disk_usage_threshold: "
                              "out of range: 120 must be <= 100"]


def test_negative_count(tmp_path):
    path = write(tmp_path, "monitoring:\n  failure_threshold: -1\n")
    assert problems(path) == [f"{path}:2: monitoring.failure_threshold: out of range: -1 "
                              "must be >= 1"]


def test_all_problems_reported_at_once_in_line_order(tmp_path):
    path = write(tmp_path, """
        server:
          listen_adress: 0.0.0.0:1
        monitoring:
          health_check_interval: soon
          alert_thresholds:
            cpu_usage_threshold: 101
        security:
          lockout_duration: 15
        logging:
          level: loud
    """)
    found = problems(path)
    assert [p.split(": ")[0] for p in found] == [f"{path}:{n}" for n in (2, 4, 6, 8, 10)]
    assert "server.listen_adress: unknown key (did you mean 'listen_address'?)" in found[0]
    assert "monitoring.health_check_interval: bad duration 'soon'" in found[1]
    assert "out of range: 101 must be <= 100" in found[2]
    assert "security.lockout_duration: wrong type: expected string, got integer 15" in found[3]
    assert "logging.level: must be one of 'debug', 'info', 'warning', 'error', got 'loud'" in (
        found[4])


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "monitoring:\n  enabled: true\n   broken: [\n")
    [problem] = problems(path)
    assert problem.startswith(f"{path}:3: (top level): invalid YAML")


def test_an_unclosed_quote_names_where_it_opened(tmp_path):
    path = write(tmp_path, 'monitoring:\n  collection_interval: "30s\n')
    assert problems(path) == [f"{path}:3: (top level): invalid YAML: found unexpected end "
                              "of stream (while scanning a quoted scalar started on line 2)"]


def test_a_tag_safe_yaml_refuses_is_a_config_error(tmp_path):
    path = write(tmp_path, 'monitoring: !!python/object/apply:os.system ["true"]\n')
    [problem] = problems(path)
    assert problem.startswith(f"{path}:1: (top level): invalid YAML: could not determine a "
                              "constructor for the tag")


def test_a_file_that_is_not_utf8_names_the_line(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"monitoring:\n  # caf\xe9\n  collection_interval: 30s\n")
    assert problems(path) == [f"{path}:2: (top level): not UTF-8: byte 0xe9 cannot be decoded"]
    assert main(["check-config", str(path)]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_a_secret_file_that_is_not_utf8_is_a_config_error(tmp_path):
    secret = tmp_path / "token"
    secret.write_bytes(b"\xff\xfe\xfa")
    path = write(tmp_path, f"security:\n  admin_token_file: {secret}\n")
    assert problems(path) == [f"{path}:2: security.admin_token_file: cannot read secret: the "
                              "file is not UTF-8 text"]


def test_duplicate_keys_are_errors(tmp_path):
    path = write(tmp_path, "monitoring:\n  enabled: true\n  enabled: false\n")
    assert problems(path) == [f"{path}:3: monitoring.enabled: duplicate key"]


def test_list_item_paths(tmp_path):
    path = write(tmp_path, """
        monitoring:
          custom_metrics:
            - name: ok_metric
              type: gauge
              help: fine
            - name: bad-name
              type: histogram
              help: no
    """)
    found = problems(path)
    assert any(p.startswith(f"{path}:6: monitoring.custom_metrics[1].name:") for p in found)
    assert any(p.startswith(f"{path}:7: monitoring.custom_metrics[1].type: must be one of")
               for p in found)


def test_semantic_checks_point_at_the_key(tmp_path):
    path = write(tmp_path, """
        monitoring:
          health_check_interval: 2s
          health_check_timeout: 5s
    """)
    assert problems(path) == [f"{path}:3: monitoring.health_check_timeout: must not exceed "
                              "monitoring.health_check_interval"]


def test_missing_secret_file_is_a_config_error(tmp_path):
    path = write(tmp_path, f"security:\n  admin_token_file: {tmp_path}/nope\n")
    [problem] = problems(path)
    assert problem.startswith(f"{path}:2: security.admin_token_file: cannot read secret")


def test_too_short_keys_and_tokens_are_config_errors_without_their_value(tmp_path,
                                                                          monkeypatch):
    """A 5-byte CSRF or MFA key passed check-config, then `run` died with a traceback and a
    reload half-applied; a 1-character admin token was accepted."""
    for name, text in (("admin", "tok1"), ("csrf", "short"), ("mfa", "x" * 31)):
        (tmp_path / name).write_text(text + "\n")
    path = write(tmp_path, f"""
        security:
          admin_token_file: {tmp_path}/admin
          csrf_key_file: {tmp_path}/csrf
          mfa:
            encryption_key_file: {tmp_path}/mfa
    """)
    assert sorted(problems(path)) == [
        f"{path}:2: security.admin_token_file: the secret has 4 characters; at least 16 are "
        "needed",
        f"{path}:3: security.csrf_key_file: the secret has 5 characters; at least 16 are needed",
        f"{path}:5: security.mfa.encryption_key_file: the secret has 31 characters; at least "
        "32 are needed"]
    monkeypatch.setenv("A3MAILER_ADMIN_TOKEN", "short-env")
    [problem] = problems(write(tmp_path, "security:\n  enabled: true\n"))
    assert problem.endswith("security.admin_token_env: the secret ($A3MAILER_ADMIN_TOKEN) has "
                            "9 characters; at least 16 are needed")
    assert "short-env" not in problem
    monkeypatch.setenv("A3MAILER_ADMIN_TOKEN", "x" * 16)
    load_config(write(tmp_path, "security:\n  enabled: true\n"))


def fail_to_apply(monkeypatch, exporter, reject_message: str) -> None:
    """Makes applying a config with this reject_message raise, as a check the loader
    lacks would (the identity services are configured late in _apply)."""
    assert exporter.identity is not None
    real_configure = exporter.identity.configure

    def configure(config):
        if config["security"]["reject_message"] == reject_message:
            raise ValueError("a key the loader let through")
        real_configure(config)

    monkeypatch.setattr(exporter.identity, "configure", configure)


def test_a_reload_that_fails_while_applying_restores_the_old_config(tmp_path, monkeypatch):
    """A check the loader lacks used to leave the config half-applied (the new
    reject_message served), answer 500 and keep last_reload_successful at 1."""
    from exporter.service import Exporter

    path = write(tmp_path, f"server:\n  state_dir: {tmp_path}/state\n")
    exporter = Exporter(load_config(path))
    fail_to_apply(monkeypatch, exporter, "HALF APPLIED")
    try:
        write(tmp_path, f"""
            server:
              state_dir: {tmp_path}/state
            security:
              reject_message: HALF APPLIED
        """)
        [problem] = exporter.reload()
        assert problem == (f"{path}: applying the config failed: ValueError: a key the loader "
                           "let through")
        assert exporter.security.settings.reject_message == "Authentication temporarily refused"
        assert exporter.config["security"]["reject_message"] != "HALF APPLIED"
        assert not exporter.reload_ok
        [record] = exporter.audit.query(types=["config.reload"])[0]
        assert record["details"]["ok"] is False
    finally:
        if exporter.audit is not None:
            exporter.audit.close()


def test_urls_with_a_password_are_config_errors_that_do_not_quote_it(tmp_path):
    """http://admin:SECRET@host in monitoring.stalwart.url passed, and the password then
    showed in the unauthenticated /health and in the log."""
    path = write(tmp_path, """
        monitoring:
          stalwart:
            url: http://admin:SECRETSTAL@127.0.0.1:8080
        security:
          store:
            redis_url: redis://:SECRETREDIS@127.0.0.1:6379/0
          mfa:
            sms:
              url: https://user:SECRETSMS@sms.example/send
    """)
    found = problems(path)
    assert found == [
        f"{path}:3: monitoring.stalwart.url: no user:password@ in the URL: put credentials in "
        "monitoring.stalwart.token_file, or username and password_file",
        f"{path}:9: security.mfa.sms.url: no user:password@ in the URL: put credentials in "
        "security.mfa.sms.auth_header and auth_value_file",
        f"{path}:6: security.store.redis_url: no user:password@ in the URL: put credentials "
        "in security.store.redis_password_file or redis_password_env"]
    assert "SECRET" not in "".join(found)
    # a Redis ACL user name alone is no secret
    load_config(write(tmp_path, """
        security:
          store:
            redis_url: redis://exporter@127.0.0.1:6379/0
    """))


def test_a_string_that_breaks_a_pattern_is_not_quoted_back(tmp_path):
    """A plain password where a bcrypt hash belongs was quoted whole into stderr, the
    reload answer, the log and the audit log."""
    path = write(tmp_path, """
        server:
          auth:
            basic_auth_users:
              prom: MyPlainPassw0rd
    """)
    [problem] = problems(path)
    assert problem.startswith(f"{path}:4: server.auth.basic_auth_users.prom: does not match "
                              "the pattern '^")
    assert "MyPlainPassw0rd" not in problem


def test_secrets_from_file_and_env(tmp_path, monkeypatch):
    from exporter.config import read_secret

    (tmp_path / "token").write_text("s3cret\n")
    assert read_secret({"admin_token_file": str(tmp_path / "token")}, "admin_token") == "s3cret"
    monkeypatch.setenv("A3_TOKEN", "from-env")
    assert read_secret({"admin_token_env": "A3_TOKEN"}, "admin_token") == "from-env"
    assert read_secret({}, "admin_token") is None
    assert read_secret({"admin_token_env": "A3_UNSET_VARIABLE"}, "admin_token") is None


def test_secrets_have_no_inline_keys():
    security = load_schema()["properties"]["security"]["properties"]
    assert "admin_token" not in security
    assert {"admin_token_file", "admin_token_env"} <= set(security)
    assert security["admin_token_env"]["default"] == "A3MAILER_ADMIN_TOKEN"


def test_parse_duration():
    assert parse_duration("30s") == 30
    assert parse_duration("1h30m") == 5400
    assert parse_duration("250ms") == 0.25
    assert parse_duration("2w") == 1209600
    with pytest.raises(ValueError):
        parse_duration("30 s")


def test_check_config_cli_exit_codes(tmp_path, capsys):
    good = write(tmp_path, "monitoring:\n  enabled: true\n", "good.yaml")
    bad = write(tmp_path, "monitoring:\n  enabeld: true\n", "bad.yaml")
    assert main(["check-config", str(good)]) == 0
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: monitoring.enabeld: unknown key (did you mean 'enabled'?)" in err
    assert main(["check-config", str(tmp_path / "missing.yaml")]) == 2


def _walk(node, schema, path=()):
    for key, prop in node.get("properties", {}).items():
        yield (*path, key), prop
        if prop.get("type") == "object":
            yield from _walk(prop, schema, (*path, key))


def test_every_schema_key_has_description_and_default():
    import jsonschema

    schema = load_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    for path, prop in _walk(schema, schema):
        assert prop.get("description"), f"{'.'.join(path)} has no description"
        assert "default" in prop, f"{'.'.join(path)} has no default"


def test_defaults_yaml_holds_exactly_the_schema_defaults():
    from exporter.config import DEFAULTS_PATH

    schema = load_schema()
    data = yaml.safe_load(DEFAULTS_PATH.read_text())
    for path, prop in _walk(schema, schema):
        if prop.get("type") == "object" and "properties" in prop:
            continue
        value = data
        for key in path:
            value = value[key]
        assert value == prop["default"], ".".join(path)


def test_control_characters_are_a_config_error(tmp_path):
    """Found by tests/reliability/test_fuzz_parsers.py: PyYAML refuses them at once."""
    path = tmp_path / "config.yaml"
    path.write_text("monitoring:\n  enabled: true\n  \x1f\n")
    assert problems(path) == [f"{path}:3: (top level): invalid YAML: character #x001f is not "
                              "allowed"]


def test_every_schema_secret_is_checked_at_load(tmp_path):
    """The secrets come from the schema (every *_file typed secret_file), not a list."""
    from exporter.config.loader import secret_paths

    paths = {".".join((*section, name)) for section, name in secret_paths()}
    assert {"security.admin_token", "security.api_keys.pepper", "tracing.otlp_headers",
            "security.mfa.encryption_key", "monitoring.stalwart.token"} <= paths
    data: dict = {}
    for section, name in secret_paths():
        node = data
        for part in section:
            node = node.setdefault(part, {})
        node[f"{name}_file"] = str(tmp_path / f"missing-{name}")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    found = problems(path)
    assert len([p for p in found if "cannot read secret" in p]) == len(paths), found


def test_networks_that_are_not_addresses_or_cidrs_are_config_errors(tmp_path):
    path = write(tmp_path, """
        security:
          trusted_networks: [127.0.0.0/8, 300.1.2.0/24]
          allowlist: ["192.0.2.7", "2001:db8::/32", nope]
          mfa:
            policy:
              risky_networks: [198.51.100.0/33]
    """)
    assert problems(path) == [
        f"{path}:2: security.trusted_networks[1]: not an IP address or CIDR: '300.1.2.0/24'",
        f"{path}:3: security.allowlist[2]: not an IP address or CIDR: 'nope'",
        f"{path}:6: security.mfa.policy.risky_networks[0]: not an IP address or CIDR: "
        "'198.51.100.0/33'"]


def test_a_reload_with_a_bad_network_changes_nothing(tmp_path):
    """It used to apply the settings read before the engine met the network (a new
    reject_message served), answer 500 and keep last_reload_successful at 1."""
    from exporter.service import Exporter

    path = write(tmp_path, f"server:\n  state_dir: {tmp_path}/state\n")
    exporter = Exporter(load_config(path))
    try:
        write(tmp_path, f"""
            server:
              state_dir: {tmp_path}/state
            security:
              reject_message: HALF APPLIED
              trusted_networks: [300.1.2.0/24]
        """)
        found = exporter.reload()
        assert found and "not an IP address or CIDR: '300.1.2.0/24'" in found[0]
        assert exporter.security.settings.reject_message == "Authentication temporarily refused"
        assert not exporter.reload_ok
    finally:
        if exporter.audit is not None:
            exporter.audit.close()


def test_a_trusted_network_of_every_address_is_a_config_error(tmp_path):
    """trusted_networks: [0.0.0.0/0] loaded, and no client was ever delayed, locked or
    banned; a mapped prefix below /96 (no IPv4 network) stopped the engine at start."""
    path = write(tmp_path, """
        security:
          trusted_networks: [127.0.0.0/8, 0.0.0.0/0, "::/0", "::ffff:0:0/96"]
          allowlist: ["::ffff:10.0.0.0/80", "::/0"]
    """)
    every = "address: trusted, no client would ever be delayed, locked or banned"
    assert problems(path) == [
        f"{path}:2: security.trusted_networks[1]: '0.0.0.0/0' is every IPv4 {every}",
        f"{path}:2: security.trusted_networks[2]: '::/0' is every IPv6 {every}",
        f"{path}:2: security.trusted_networks[3]: '::ffff:0:0/96' is every IPv4 {every}",
        f"{path}:3: security.allowlist[0]: an IPv4-mapped network needs a prefix of /96 or "
        "longer (/96 is all of IPv4): '::ffff:10.0.0.0/80'",
        f"{path}:3: security.allowlist[1]: '::/0' is every IPv6 address: allowlisted, no "
        "client would ever be banned"]


def test_aliases_that_expand_beyond_bounds_or_into_themselves_are_refused(tmp_path):
    """Ten references a level, eight levels deep (380 bytes), took check-config minutes
    and 11 GB; an alias inside what it names raised RecursionError; a list as a key and
    nesting too deep for PyYAML raised tracebacks."""
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
    bomb = write(tmp_path, "\n".join(levels) + "\n", "bomb.yaml")
    assert problems(bomb) == [
        f"{bomb}: (top level): with its aliases expanded the file holds more than 100,000 "
        "values"]
    cycle = write(tmp_path, "x: &a [*a]\n", "cycle.yaml")
    assert problems(cycle) == [
        f"{cycle}: (top level): an alias refers to a node that contains it (or the nesting "
        "is too deep): such a value has no end"]
    key = write(tmp_path, "? [a, b]\n: c\n", "key.yaml")
    [problem] = problems(key)
    assert problem.startswith(f"{key}:1: (top level): invalid YAML: found unhashable key")
    deep = write(tmp_path, "monitoring: {probes: " + "[" * 600 + "]" * 600 + "}\n",
                 "deep.yaml")
    assert problems(deep) == [
        f"{deep}: (top level): invalid YAML: lists or mappings nested too deep to read"]


def test_aliases_a_config_uses_still_load_with_the_alias_line(tmp_path):
    path = write(tmp_path, """
        monitoring:
          probes:
            - &web {name: a, protocol: http, host: 127.0.0.1, port: 80}
            - {<<: *web, name: b}
            - {<<: *web, name: c, extra: 1}
    """)
    assert problems(path) == [f"{path}:5: monitoring.probes[2].extra: unknown key"]
    path = write(tmp_path, """
        monitoring:
          probes:
            - &web {name: a, protocol: http, host: 127.0.0.1, port: 80}
            - {<<: *web, name: b}
    """)
    assert [p["name"] for p in load_config(path)["monitoring"]["probes"]] == ["a", "b"]


def test_a_variable_named_by_the_operator_must_be_set(tmp_path, monkeypatch):
    """server.auth.bearer_token_env naming an unset variable passed check-config and left
    /metrics open; an unset variable under its default name is the feature off."""
    monkeypatch.delenv("NOPE_UNSET", raising=False)
    monkeypatch.delenv("A3MAILER_ADMIN_TOKEN", raising=False)
    path = write(tmp_path, """
        server:
          auth:
            bearer_token_env: NOPE_UNSET
        security:
          admin_token_env: ALSO_UNSET
    """)
    monkeypatch.setenv("ALSO_UNSET", "")
    assert problems(path) == [
        f"{path}:3: server.auth.bearer_token_env: $NOPE_UNSET is not set or is empty",
        f"{path}:5: security.admin_token_env: $ALSO_UNSET is not set or is empty"]
    monkeypatch.setenv("NOPE_UNSET", "t" * 32)
    monkeypatch.setenv("ALSO_UNSET", "a" * 32)
    load_config(path)
    load_config(write(tmp_path, "security:\n  admin_token_env: A3MAILER_ADMIN_TOKEN\n"))


def test_tls_pair_and_attestation_roots_are_read_at_load(tmp_path):
    """Both passed check-config; `run` then died after saying it had started."""
    import subprocess

    for stem in ("a", "b"):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                        f"/CN={stem}", "-keyout", str(tmp_path / f"{stem}.key"), "-out",
                        str(tmp_path / f"{stem}.pem")], check=True, capture_output=True)
    (tmp_path / "text").write_text("hello\n")

    def config(cert: str, key: str, roots: str) -> Path:
        return write(tmp_path, f"""
            server:
              tls: {{cert_file: {tmp_path}/{cert}, key_file: {tmp_path}/{key}}}
            security:
              mfa:
                webauthn: {{attestation_roots_file: {tmp_path}/{roots}}}
        """)

    load_config(config("a.pem", "a.key", "b.pem"))
    wrong = ("server.tls.cert_file: the certificate and key_file are not a PEM certificate "
             "and its unencrypted private key")
    path = config("text", "text", "text")
    assert problems(path) == [
        f"{path}:2: {wrong}",
        f"{path}:5: security.mfa.webauthn.attestation_roots_file: no PEM certificates in the "
        "file"]
    path = config("a.pem", "b.key", "none.pem")
    assert problems(path) == [
        f"{path}:2: {wrong}",
        f"{path}:5: security.mfa.webauthn.attestation_roots_file: cannot read CA "
        "certificates: No such file or directory"]
    path = config("a.pem", "none.key", "a.pem")
    assert problems(path) == [
        f"{path}:2: server.tls.cert_file: cannot read the certificate or key: No such file "
        "or directory"]


def test_nan_and_inf_are_refused_wherever_they_stand(tmp_path):
    """A cpu_usage_threshold of .nan passed the schema's bounds and wrote rules that
    compare with nan, which never fire."""
    path = write(tmp_path, """
        monitoring:
          alert_thresholds:
            cpu_usage_threshold: .nan
            response_time_threshold: .inf
    """)
    assert problems(path) == [
        f"{path}:3: monitoring.alert_thresholds.cpu_usage_threshold: must be a finite "
        "number, got nan",
        f"{path}:4: monitoring.alert_thresholds.response_time_threshold: must be a finite "
        "number, got inf"]


def test_a_reload_refused_while_applying_keeps_custom_values_and_history(tmp_path,
                                                                        monkeypatch):
    """The custom metric values and the history ring were cut to the new config before
    the step that failed; the rollback restored the declarations, not the data."""
    from exporter.service import Exporter

    declared = """
        server:
          state_dir: {state}
        monitoring:
          history_max_entries: {entries}
          custom_metrics:{custom}
        security:
          reject_message: {message}
    """
    gauge = ('\n            - {name: queue_depth, type: gauge, help: Waiting, '
             'labels: [queue]}')

    def config(entries: int, custom: str, message: str) -> Path:
        return write(tmp_path, declared.format(state=tmp_path / "state", entries=entries,
                                               custom=custom, message=message))

    exporter = Exporter(load_config(config(100, gauge, "steady")))
    fail_to_apply(monkeypatch, exporter, "FAILS")
    try:
        exporter.custom.update("queue_depth", {"value": 42, "labels": {"queue": "active"}})
        for n in range(10):
            exporter.history.add({"n": n})
        config(1, " []", "FAILS")
        [problem] = exporter.reload()
        assert "applying the config failed: ValueError" in problem
        assert exporter.custom.metrics["queue_depth"].values == {("active",): 42.0}
        assert len(exporter.history) == 10
        config(1, " []", "steady")
        assert exporter.reload() == []  # applied: now the data follows the new config
        assert "queue_depth" not in exporter.custom.metrics and len(exporter.history) == 1
    finally:
        exporter.audit.close()


def test_a_loader_that_raises_is_a_refused_reload_not_a_500(tmp_path, monkeypatch):
    from exporter import service

    path = write(tmp_path, f"server:\n  state_dir: {tmp_path}/state\n")
    exporter = service.Exporter(load_config(path))

    def broken(*args, **kwargs):
        raise TypeError("unhashable type: 'list'")

    monkeypatch.setattr(service, "load_config", broken)
    try:
        assert exporter.reload() == [f"{path}: reading the config failed: TypeError"]
        assert exporter.reload_ok is False
        [record] = exporter.audit.query(types=["config.reload"])[0]
        assert record["details"]["ok"] is False
    finally:
        exporter.audit.close()


def test_a_reload_keeps_restart_only_keys_and_applies_logging(tmp_path, caplog):
    import logging

    from exporter.service import RESTART_ONLY, Exporter

    start = f"""
        server:
          state_dir: {tmp_path}/state
          graceful_shutdown_timeout: 10s
        monitoring:
          health_endpoint_path: /health
        security:
          audit_config: {{stdout: false, fsync_interval: 1s}}
    """
    path = write(tmp_path, start)
    exporter = Exporter(load_config(path))
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        write(tmp_path, start.replace("10s", "3s").replace("/health", "/healthz")
              .replace("stdout: false", "stdout: true").replace("1s}", "5s}").rstrip()
              + "\n        logging: {level: error, format: json}\n")
        with caplog.at_level(logging.WARNING, logger="exporter.service"):
            assert exporter.reload() == []
        kept = {r.getMessage() for r in caplog.records}
        for key in ("server.graceful_shutdown_timeout", "monitoring.health_endpoint_path",
                    "security.audit_config.stdout", "security.audit_config.fsync_interval"):
            assert f"changing {key} needs a restart; keeping the old value" in kept
        assert exporter.config["monitoring"]["health_endpoint_path"] == "/health"
        assert ("monitoring", "health_endpoint_path") in RESTART_ONLY
        assert root.level == logging.ERROR  # logging is applied by a reload
        assert type(root.handlers[0].formatter).__name__ == "JsonFormatter"
    finally:
        root.handlers[:], root.level = handlers, level
        exporter.audit.close()
