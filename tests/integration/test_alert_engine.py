"""The threshold alert engine against real components.

- The real exporter process with a breached threshold (lockouts in force above
  active_lockouts_threshold 0, caused through the security API), pushing to a real
  Alertmanager behind Basic auth: the webhook receiver gets the firing notification with
  the rule's labels and annotations, /api/v1/alerts shows it (and the hysteresis after the
  cause is removed), then the resolved notification arrives. A real Prometheus loading the
  rules generated from the same config and scraping the same exporter fires the same alert
  with the same labels and annotations.
- Alertmanager unreachable, hanging, refusing: the engine keeps evaluating, a push never
  holds up an evaluation, failures are counted by reason; a bearer token is sent as
  configured.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.core import GaugeMetricFamily

from exporter.alerts import AlertEngine
from exporter.config import load_config
from exporter.generate import alerts as tables
from exporter.generate.yaml_dump import dump_yaml
from tests.exporter_process import ExporterProcess
from tests.integration.components import (
    Alertmanager,
    Prometheus,
    RecordedRequest,
    RecordingHTTPServer,
    free_port,
    wait_until,
)

ADMIN = "alert-engine-admin-token-0123456789"
JOB = "a3mailer-exporter"
AM_USER, AM_PASSWORD = "engine", "am-secret-0123"


@pytest.fixture
def alertmanager(tmp_path: Path):
    am = Alertmanager(tmp_path / "am", basic_auth=(AM_USER, AM_PASSWORD))
    am.start()
    yield am
    am.stop()


def report_failures(url: str, login: str, source: str, count: int) -> None:
    auth = {"Authorization": f"Bearer {ADMIN}"}
    for n in range(count):
        answer = httpx.post(url + "/api/v1/security/report", headers=auth, timeout=10, json={
            "login": login, "remote_ip": source, "protocol": "imap", "pwhash": f"wrong{n}",
            "success": False})
        assert answer.status_code == 200, answer.text


def engine_alerts(url: str, name: str) -> list[dict[str, Any]]:
    body = httpx.get(url + "/api/v1/alerts", timeout=10).json()
    return [a for a in body["alerts"] if a["name"] == name]


def notified(alertmanager: Alertmanager, status: str,
             name: str = "A3MailerLockoutSpike") -> dict[str, Any]:
    """The alert in the first webhook notification with that status."""

    def mine(alert: dict[str, Any]) -> bool:
        return bool(alert["labels"]["alertname"] == name and alert["status"] == status)

    note = alertmanager.wait_for_notification(lambda p: any(mine(a) for a in p["alerts"]),
                                              timeout=60)
    [alert] = [a for a in note["alerts"] if mine(a)]
    return alert


def test_breach_reaches_alertmanager_and_agrees_with_prometheus(tmp_path, alertmanager):
    port = free_port()
    address = f"127.0.0.1:{port}"
    (tmp_path / "am.password").write_text(AM_PASSWORD + "\n")
    config: dict[str, Any] = {
        "server": {"listen_address": address, "state_dir": str(tmp_path / "state")},
        "security": {"store": {"type": "memory"}, "max_login_attempts": 3},
        "monitoring": {"alert_thresholds": {"active_lockouts_threshold": 0}},
        "alerting": {
            "labels": {"team": "mail"},
            "keep_firing_for": "3s",
            "alerts": {"A3MailerLockoutSpike": {"for": "1s"}},
            "engine": {
                "evaluation_interval": "1s",
                "target_labels": {"job": JOB, "instance": address},
                "alertmanager": {"url": alertmanager.url, "username": AM_USER,
                                 "password_file": str(tmp_path / "am.password"),
                                 "resend_interval": "1s", "timeout": "5s"}}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    loaded = load_config(path)
    rules = tmp_path / "alerts.yaml"
    rules.write_text(dump_yaml(tables.render_rules(loaded)))
    recording = tmp_path / "recording-rules.yaml"
    recording.write_text(dump_yaml(tables.render_recording_rules(loaded)))
    os.environ["A3MAILER_ADMIN_TOKEN"] = ADMIN
    exporter = ExporterProcess(tmp_path / "exporter", path, port=port)
    (tmp_path / "exporter").mkdir()
    prometheus = Prometheus(tmp_path / "prometheus", [{"job": JOB, "targets": [address]}],
                            [rules, recording])
    try:
        exporter.start()
        prometheus.start()
        prometheus.wait_target_up(JOB)
        assert engine_alerts(exporter.url, "A3MailerLockoutSpike") == []
        # the cause: three distinct wrong passwords lock alice from 192.0.2.7
        report_failures(exporter.url, "alice", "192.0.2.7", 3)

        alert = notified(alertmanager, "firing")
        labels = {"alertname": "A3MailerLockoutSpike", "severity": "warning", "team": "mail",
                  "instance": address}
        assert alert["labels"] == labels
        annotations = {
            "summary": f"Many lockouts are in force on {address}.",
            "description": f"1 lockouts are in force on {address}, above the threshold of 0: "
                           "a password-guessing campaign, or a client with a stale password.",
            "runbook_url": "https://github.com/a3mailer/a3mailer-exporter/blob/main/docs/"
                           "runbooks/security.md#a3mailerlockoutspike",
            "dashboard_url": "http://localhost:3000/d/a3mailer-security/a3mailer-security"
                             f"?var-instance={address}"}
        assert alert["annotations"] == annotations
        [mine] = engine_alerts(exporter.url, "A3MailerLockoutSpike")
        assert mine["state"] == "firing" and mine["value"] == 1 and mine["threshold"] == 0
        # Prometheus, on the same scrapes with the generated rules, says the same
        theirs = prometheus.wait_for_query(
            'ALERTS{alertname="A3MailerLockoutSpike", alertstate="firing"}', timeout=60)
        assert {k: v for k, v in theirs[0]["metric"].items()
                if k not in ("__name__", "alertstate")} == labels
        [prom_alert] = [a for a in prometheus.alerts()
                        if a["labels"]["alertname"] == "A3MailerLockoutSpike"]
        assert prom_alert["labels"] == mine["labels"] == labels
        assert prom_alert["annotations"] == mine["annotations"] == annotations
        # the cause goes: unlocked; kept firing for keep_firing_for, then resolved
        unlock = httpx.delete(exporter.url + "/api/v1/security/lockouts/alice", timeout=10,
                              headers={"Authorization": f"Bearer {ADMIN}"})
        assert unlock.status_code == 200, unlock.text
        kept = wait_until(lambda: [a for a in engine_alerts(exporter.url, "A3MailerLockoutSpike")
                                   if a["keep_firing_since"]], 20, "kept firing", interval=0.1)
        assert kept[0]["state"] == "firing"

        gone = notified(alertmanager, "resolved")
        assert gone["labels"] == labels and gone["endsAt"] > gone["startsAt"]
        assert engine_alerts(exporter.url, "A3MailerLockoutSpike") == []
        wait_until(lambda: not prometheus.query('ALERTS{alertname="A3MailerLockoutSpike"}'),
                   30, "Prometheus resolved it too", interval=0.25)
        metrics = httpx.get(exporter.url + "/metrics", timeout=10).text
        assert "a3mailer_alert_pushes_total" in metrics
        assert 'a3mailer_alert_push_failures_total{reason="rejected"} 0.0' in metrics
    finally:
        os.environ.pop("A3MAILER_ADMIN_TOKEN", None)
        prometheus.stop()
        exporter.stop()


def engine_status(url: str) -> dict[str, Any]:
    return dict(httpx.get(url + "/api/v1/alerts", timeout=10).json())


def test_a_state_file_with_a_wrong_typed_field_is_refused_and_evaluation_goes_on(tmp_path):
    """A restored alert with resolved_at "yesterday" failed every evaluation (TypeError),
    stayed firing and stopped the rules after it; the file is now unreadable: logged, and
    the engine starts afresh."""
    port = free_port()
    workdir = tmp_path / "exporter"
    (workdir / "state").mkdir(parents=True)
    labels = {"alertname": "A3MailerTooManyConnections", "severity": "warning",
              "instance": f"127.0.0.1:{port}", "job": JOB}
    rule = json.dumps(["A3MailerTooManyConnections", {"severity": "warning"}], sort_keys=True)
    now = int(time.time() * 1000)
    (workdir / "state" / "alerts.json").write_text(json.dumps({
        "version": 1, "saved_at": time.time(), "history": {}, "alerts": [{
            "rule": rule, "labels": labels, "annotations": {}, "value": 1.0,
            "state": "firing", "active_at": now - 60000, "fired_at": now - 30000,
            "resolved_at": "yesterday", "keep_firing_since": 0, "last_sent_at": None,
            "valid_until": 0}]}))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"alerting": {"engine": {"evaluation_interval": "1s"}}}))
    exporter = ExporterProcess(workdir, path, port=port)
    try:
        exporter.start()
        wait_until(lambda: engine_status(exporter.url)["evaluations"] >= 3, 20,
                   "three evaluations", interval=0.2)
        status = engine_status(exporter.url)
        assert status["evaluation_failures"] == 0 and status["last_error"] is None
        assert [a for a in status["alerts"] if a["name"] == "A3MailerTooManyConnections"] == []
        log = exporter.log()
        assert "cannot read saved alert states; starting afresh" in log
        assert "resolved_at" in log and "alert states restored" not in log
    finally:
        exporter.stop()


def test_a_reload_that_drops_a_firing_rule_resolves_it_in_alertmanager(tmp_path, alertmanager):
    """Memory use above 0 % fires at once (for: 0s); a reload that disables the alert sends
    its resolution at once, not at its endsAt four minutes on."""
    port = free_port()
    (tmp_path / "am.password").write_text(AM_PASSWORD + "\n")
    engine = {"evaluation_interval": "1s",
              "alertmanager": {"url": alertmanager.url, "username": AM_USER,
                               "password_file": str(tmp_path / "am.password"),
                               "resend_interval": "1m", "timeout": "5s"}}
    config: dict[str, Any] = {
        "monitoring": {"alert_thresholds": {"memory_usage_threshold": 0}},
        "alerting": {"labels": {"team": "mail", "empty": ""},
                     "alerts": {"A3MailerHighMemoryUsage": {"for": "0s"}}, "engine": engine}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    (tmp_path / "exporter").mkdir()
    exporter = ExporterProcess(tmp_path / "exporter", path, port=port)
    try:
        exporter.start()
        firing = notified(alertmanager, "firing", "A3MailerHighMemoryUsage")
        assert firing["labels"]["team"] == "mail" and "empty" not in firing["labels"]
        [mine] = engine_alerts(exporter.url, "A3MailerHighMemoryUsage")
        assert mine["state"] == "firing" and mine["for_seconds"] == 0
        assert mine["fired_at"] == mine["active_at"]  # fired at its first evaluation
        assert "empty" not in mine["labels"]
        config["alerting"]["alerts"]["A3MailerHighMemoryUsage"]["enabled"] = False
        path.write_text(yaml.safe_dump(config))
        reloaded = time.time()
        exporter.signal(signal.SIGHUP)
        gone = notified(alertmanager, "resolved", "A3MailerHighMemoryUsage")
        assert time.time() - reloaded < 15
        assert gone["labels"] == firing["labels"]
        ends = datetime.fromisoformat(gone["endsAt"].replace("Z", "+00:00")).timestamp()
        assert abs(ends - reloaded) < 10  # now, not four resend intervals on
        assert engine_alerts(exporter.url, "A3MailerHighMemoryUsage") == []
    finally:
        exporter.stop()


# --------------------------------------------------------------------------- push faults


def breached_engine(tmp_path: Path, push: dict[str, Any]) -> AlertEngine:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"alerting": {
        "alerts": {"A3MailerMailQueueLarge": {"for": "1ms"}},
        "engine": {"evaluation_interval": "1s", "alertmanager": {"resend_interval": "1ms",
                                                                 **push}}}}))
    engine = AlertEngine(None)
    queue = GaugeMetricFamily("a3mailer_queue_total_messages", "t", value=50000)
    engine.configure(load_config(path), lambda: [queue])
    return engine


async def pushed(engine: AlertEngine) -> None:
    """Waits for the push in flight, if any."""
    if engine.pusher._task is not None:
        await asyncio.wait_for(asyncio.shield(engine.pusher._task), 10)


async def test_unreachable_alertmanager_counts_failures_and_evaluation_goes_on(tmp_path):
    engine = breached_engine(tmp_path, {"url": f"http://127.0.0.1:{free_port()}"})
    for _ in range(3):  # pending, then firing: each firing evaluation pushes again
        await engine.evaluate_once()
        await asyncio.sleep(0.01)
        await pushed(engine)
    assert [a["state"] for a in engine.snapshot()] == ["firing"]
    assert engine.pusher.failures.value(("unreachable",)) == engine.pusher.pushes >= 2
    assert engine.status()["alertmanager"]["last_error"].startswith("unreachable")
    await engine.stop()


async def test_a_hanging_alertmanager_never_holds_up_an_evaluation(tmp_path):
    release = threading.Event()

    def hang(request: RecordedRequest) -> tuple[int, str, str]:
        release.wait(20)
        return 200, "application/json", ""

    server = RecordingHTTPServer(hang)
    try:
        engine = breached_engine(tmp_path, {"url": server.url, "timeout": "1s"})
        await engine.evaluate_once()
        await asyncio.sleep(0.01)
        await engine.evaluate_once()  # firing: a push starts and hangs
        await asyncio.to_thread(server.wait_for_request, lambda r: r.path == "/api/v2/alerts", 10)
        task = engine.pusher._task
        assert task is not None and not task.done()
        # evaluations go on while the push waits; their alerts wait for the next push
        for _ in range(3):
            assert await engine.evaluate_once() == 1
        assert not task.done() and engine.pusher._pending
        await pushed(engine)
        assert engine.pusher.failures.value(("timeout",)) >= 1
        await engine.stop()
    finally:
        release.set()
        server.stop()


async def test_refusing_alertmanager_and_bearer_token(tmp_path):
    server = RecordingHTTPServer(lambda r: (401, "text/plain", "unauthorized"))
    token = tmp_path / "token"
    token.write_text("am-bearer-0123\n")
    try:
        engine = breached_engine(tmp_path, {"url": server.url + "/",
                                            "bearer_token_file": str(token)})
        await engine.evaluate_once()
        await asyncio.sleep(0.01)
        await engine.evaluate_once()
        request = await asyncio.to_thread(server.wait_for_request,
                                          lambda r: r.path == "/api/v2/alerts", 10)
        assert request.headers["authorization"] == "Bearer am-bearer-0123"
        [sent] = request.json()
        assert sent["labels"]["alertname"] == "A3MailerMailQueueLarge"
        assert set(sent) == {"labels", "annotations", "startsAt", "endsAt"}
        await pushed(engine)
        assert engine.pusher.failures.value(("rejected",)) == 1
        assert "HTTP 401" in engine.status()["alertmanager"]["last_error"]
        assert "am-bearer" not in repr(engine.pusher.settings)
        await engine.stop()
    finally:
        server.stop()
