"""A real Prometheus scrapes the real exporter; promtool lints the exposition."""

from __future__ import annotations

import subprocess

import bcrypt
import httpx
import pytest

from tests.integration.components import require_binary

pytestmark = pytest.mark.integration


def test_prometheus_scrapes_the_exporter(exporter_process, prometheus_factory):
    exporter = exporter_process()
    prom = prometheus_factory(targets=[{"job": "a3mailer", "targets": [exporter.address]}])
    prom.wait_target_up("a3mailer")
    up = prom.wait_for_query('up{job="a3mailer"}')
    assert float(up[0]["value"][1]) == 1.0
    cpu = prom.wait_for_query('a3mailer_system_cpu_usage_ratio{job="a3mailer"}')
    assert 0.0 <= float(cpu[0]["value"][1]) <= 1.0
    info = prom.wait_for_query("a3mailer_exporter_build_info")
    assert info[0]["metric"]["python_version"].startswith("3.")
    health = prom.wait_for_query('a3mailer_health_status{component="state_dir",status="healthy"}')
    assert float(health[0]["value"][1]) == 1.0
    # the exporter counted Prometheus's scrapes
    scrapes = prom.wait_for_query(
        'a3mailer_exporter_http_requests_total{handler="/metrics",code="200"} > 0'
    )
    assert float(scrapes[0]["value"][1]) >= 1


def test_prometheus_scrapes_with_basic_auth(exporter_process, prometheus_factory, config_file):
    hashed = bcrypt.hashpw(b"scrape-pw", bcrypt.gensalt(rounds=4)).decode()
    exporter = exporter_process(
        config_file({"server": {"auth": {"basic_auth_users": {"prometheus": hashed}}}})
    )
    assert httpx.get(exporter.url + "/metrics").status_code == 401
    prom = prometheus_factory(
        targets=[
            {
                "job": "auth",
                "targets": [exporter.address],
                "basic_auth": {"username": "prometheus", "password": "scrape-pw"},
            },
            {"job": "noauth", "targets": [exporter.address]},
        ]
    )
    prom.wait_target_up("auth")
    assert float(prom.wait_for_query('up{job="auth"}')[0]["value"][1]) == 1.0
    down = prom.wait_for_query('up{job="noauth"} == 0')
    assert float(down[0]["value"][1]) == 0.0


def test_promtool_check_metrics_finds_no_problems(exporter_process):
    promtool = require_binary("promtool")
    exporter = exporter_process()
    httpx.get(exporter.url + "/livez")  # some traffic, so the HTTP metrics have series
    body = httpx.get(exporter.url + "/metrics").content
    result = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout.decode().strip() == "" and result.stderr.decode().strip() == ""


def test_openmetrics_output_parses_strictly(exporter_process):
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    exporter = exporter_process()
    r = httpx.get(
        exporter.url + "/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"}
    )
    families = {f.name for f in text_string_to_metric_families(r.text)}
    assert {"a3mailer_system_cpu_usage_ratio", "a3mailer_health_status"} <= families


def test_gzip_on_the_wire(exporter_process):
    import gzip

    exporter = exporter_process()
    with httpx.Client() as client:
        r = client.get(exporter.url + "/metrics", headers={"accept-encoding": "gzip"})
        assert r.headers["content-encoding"] == "gzip"
        raw = client.build_request(
            "GET", exporter.url + "/metrics", headers={"accept-encoding": "gzip"}
        )
        streamed = client.send(raw, stream=True)
        compressed = b"".join(streamed.iter_raw())
        streamed.close()
    assert b"a3mailer_system_cpu_usage_ratio" in gzip.decompress(compressed)
