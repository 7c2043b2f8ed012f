"""The generated bundle end to end, with examples/full.yaml.

One environment serves the module: a real Postfix and Dovecot (TLS, SASL, LMTP), our
NSD for the mail DNS and DNSBL zones, an MTA-STS policy server, a stand-in for
A3Mailer/Stalwart's HTTP API, the real exporter running examples/full.yaml (addresses,
files and intervals pointed at those servers), a real Prometheus loading the rules that
`generate` wrote for that config and scraping the exporter, and a real Alertmanager
loading the generated example config, routed to a webhook receiver of the test.

- metric contract: every series a dashboard query or rule uses is catalogued and on the
  exporter's live /metrics;
- breach: messages held in Postfix's queue push it over queue_size_threshold; the
  webhook gets A3MailerMailQueueLarge with the right labels and annotations; released,
  the queue drains and the webhook gets the resolved notification;
- every dashboard query runs against that Prometheus, and returns data wherever its
  series have samples.
"""

from __future__ import annotations

import imaplib
import json
import os
import re
import shutil
import smtplib
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from exporter import catalogue
from exporter.config import load_config
from exporter.config.loader import merge
from exporter.generate import alerts, dashboards, generate, promql
from tests.exporter_process import ExporterProcess
from tests.integration.components import (
    DEFAULT_MAIL_USERS,
    LOOPBACK,
    MAIL_DOMAIN,
    Alertmanager,
    BoundIMAP4,
    MailStack,
    Prometheus,
    RecordedRequest,
    RecordingHTTPServer,
    find_binary,
    free_port,
    make_traversable,
    next_loopback_ip,
    require_binary,
    wait_until,
)
from tests.integration.dns_server import Nsd, PolicyHttpsServer, make_test_ca
from tests.integration.test_dns_checks import POLICIES, REVERSE_V4, REVERSE_V6, TEST_ZONE
from tests.unit.test_stalwart import STALWART_PAGE

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples/full.yaml"
ALICE = f"alice@{MAIL_DOMAIN}"
HELD_SENDER = f"queue-test@{MAIL_DOMAIN}"
QUEUE_THRESHOLD = 3
ADMIN_TOKEN = "e2e-admin-token-0123456789"
JOB = "a3mailer-exporter"


class StalwartStandIn:
    """A3Mailer/Stalwart's HTTP listener as the exporter reads it: /metrics/prometheus
    (a realistic page whose counters grow on every poll), /healthz/ready, the queue API
    and JMAP's well-known URL."""

    def __init__(self) -> None:
        self.polls = 0
        self.server = RecordingHTTPServer(self.respond)

    def respond(self, request: RecordedRequest) -> tuple[int, str, bytes | str]:
        if request.path == "/metrics/prometheus":
            self.polls += 1
            return 200, "text/plain; version=0.0.4", self._page()
        if request.path == "/healthz/ready":
            return 200, "text/plain", ""
        if request.path == "/api/queue/messages":
            return 200, "application/json", '{"data": {"items": [], "total": 0}}'
        if request.path == "/.well-known/jmap":
            return 401, "application/json", '{"status": 401}'
        return 404, "application/json", '{"status": 404}'

    def _page(self) -> str:
        lines = []
        for line in STALWART_PAGE.splitlines():
            match = re.fullmatch(r"([a-z_]+(?:_sum|_count)?|[a-z_]+) (\d+)", line)
            if match and not line.startswith("#"):
                line = f"{match.group(1)} {int(match.group(2)) + 10 * self.polls}"
            lines.append(line)
        return "\n".join(lines) + "\n"

    def stop(self) -> None:
        self.server.stop()


@dataclass
class Env:
    exporter: ExporterProcess
    prometheus: Prometheus
    alertmanager: Alertmanager
    mail: MailStack
    bundle: Path
    config: dict[str, Any]


def local_config(example: dict[str, Any], mail: MailStack, nsd: Nsd, policy_port: int,
                 policy_ca: Path, stalwart_url: str, state: Path, policy_listen: str,
                 webhook_url: str, exporter_address: str) -> dict[str, Any]:
    """examples/full.yaml pointed at the test's servers: only addresses, files, intervals
    and the queue threshold change; every feature it enables stays enabled."""
    dovecot, postfix = mail.dovecot, mail.postfix
    credentials = state.parent.parent / "probe.credentials"
    credentials.write_text(f"{ALICE}:{DEFAULT_MAIL_USERS[ALICE]}\n")
    password = state.parent.parent / "smtp.password"
    password.write_text(DEFAULT_MAIL_USERS[ALICE] + "\n")
    assert dovecot.cert_path is not None
    ports = {"smtp": postfix.smtp_port, "submission": postfix.submission_port,
             "imap": dovecot.imap_port, "imaps": dovecot.imaps_port,
             "pop3s": dovecot.pop3s_port, "jmap": int(stalwart_url.rsplit(":", 1)[1])}
    probes = []
    for probe in example["monitoring"]["probes"]:
        probe = {**probe, "port": ports[probe["name"]], "interval": "5s", "timeout": "10s"}
        probe.pop("server_name", None)
        if probe.get("tls", "none") != "none":
            probe["ca_file"] = str(dovecot.cert_path)
        if probe.get("credentials_file"):
            probe["credentials_file"] = str(credentials)
        probes.append(probe)
    delivery = example["monitoring"]["delivery"]
    local = {
        "monitoring": {
            "health_check_interval": "2s", "health_check_timeout": "2s",
            "alert_thresholds": {"queue_size_threshold": QUEUE_THRESHOLD},
            "probes": probes,
            "delivery": {
                "submission": {**delivery["submission"], "port": postfix.submission_port,
                               "server_name": ""},
                "imap": {**delivery["imap"], "port": dovecot.imaps_port, "server_name": ""},
                "credentials_file": str(credentials), "from_address": ALICE,
                "to_address": ALICE, "interval": "10s", "timeout": "30s",
                "ca_file": str(dovecot.cert_path)},
            "dns": {"interval": "10s", "timeout": "3s", "nameservers": [LOOPBACK],
                    "port": nsd.port, "mta_sts_ca_file": str(policy_ca),
                    "mta_sts_port": policy_port,
                    "domains": [{"name": "good.test", "dkim_selectors": ["sel1", "sel2"],
                                 "sending_ips": ["192.0.2.10"]}]},
            "dnsbl": {"interval": "10s", "timeout": "3s", "nameservers": [LOOPBACK],
                      "port": nsd.port, "zones": ["bl.test", "clean.test"],
                      "ip_sets": [{"name": "outbound", "ips": ["192.0.2.10"]}]},
            "stalwart": {"url": stalwart_url, "interval": "2s", "username": "",
                         "password_env": ""},
            "queues": {"postfix": {"postqueue_path": require_binary("postqueue"),
                                   "config_dir": str(postfix.config_dir), "interval": "2s"},
                       "stalwart": {"interval": "2s"}},
            "logs": {"files": [{**example["monitoring"]["logs"]["files"][0],
                                "path": str(postfix.maillog_path), "start_at": "beginning"}]},
        },
        "security": {"postfix_policy": {"listen": policy_listen},
                     "mfa": {"email": {**example["security"]["mfa"]["email"],
                                       "smtp_port": postfix.submission_port,
                                       "ca_file": str(dovecot.cert_path), "username": ALICE,
                                       "password_file": str(password), "from_address": ALICE}}},
        "alerting": {
            "alerts": {"A3MailerMailQueueLarge": {"for": "1s", "keep_firing_for": "2s"}},
            # the engine's alerts carry the labels Prometheus gives this target
            "engine": {"evaluation_interval": "2s",
                       "target_labels": {"job": JOB, "instance": exporter_address},
                       "alertmanager": {"resend_interval": "2s"}},
            "alertmanager": {"webhook_url": webhook_url, "group_wait": "1s",
                             "group_interval": "1s",
                             "smarthost": f"{LOOPBACK}:{free_port()}"}},
        "server": {"state_dir": str(state)},
        # nothing listens there: spans are dropped (and counted), as with a receiver gone
        "tracing": {"otlp_endpoint": f"http://{LOOPBACK}:{free_port()}"},
    }
    return merge(example, local)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    # Not below pytest's base temp dir: another pytest run as root (a parallel session on
    # this machine) tightens that to 0700, and Dovecot's and Postfix's users lose access.
    work = Path(tempfile.mkdtemp(prefix="a3mailer-bundle-e2e-"))
    make_traversable(work)
    example = yaml.safe_load(EXAMPLE.read_text())
    exporter_port = free_port()
    policy_listen = f"{LOOPBACK}:{free_port()}"
    cleanup: list[Any] = []
    try:
        nsd = Nsd(work / "nsd", {"test": TEST_ZONE, "2.0.192.in-addr.arpa": REVERSE_V4,
                                 "8.b.d.0.1.0.0.2.ip6.arpa": REVERSE_V6}).start()
        cleanup.append(nsd)
        ca, cert, key = make_test_ca(work / "ca", list(POLICIES))
        policy = PolicyHttpsServer(cert, key, POLICIES)
        cleanup.append(policy)
        stalwart = StalwartStandIn()
        cleanup.append(stalwart)
        mail = MailStack.start(work / "mail", dict(DEFAULT_MAIL_USERS), tls=True,
                               policy_url=f"http://{LOOPBACK}:{exporter_port}/dovecot/policy",
                               postfix_main={
                                   "smtpd_sender_restrictions":
                                       f"check_sender_access inline:{{{HELD_SENDER}=HOLD}}",
                                   "lmtp_destination_concurrency_limit": "1",
                                   "smtpd_recipient_restrictions":
                                       f"check_policy_service inet:{policy_listen}, "
                                       "permit_mynetworks, permit_sasl_authenticated, "
                                       "reject_unauth_destination"})
        cleanup.append(mail)
        built: dict[str, Any] = {}

        def alertmanager_config(webhook_url: str) -> dict[str, Any]:
            config = local_config(example, mail, nsd, policy.port, ca,
                                  stalwart.server.url, work / "exporter/state",
                                  policy_listen, webhook_url, f"{LOOPBACK}:{exporter_port}")
            path = work / "full.local.yaml"
            path.write_text(yaml.safe_dump(config))
            load_config(path)  # valid as it stands
            assert generate(work / "bundle", config_path=path)
            built.update(config=config, path=path)
            return dict(yaml.safe_load(
                (work / "bundle/alert-rules/alertmanager.example.yml").read_text()))

        am = Alertmanager(work / "alertmanager", config=alertmanager_config)
        cleanup.append(am)
        am.start()
        # the alert engine pushes to the same Alertmanager (its URL is known only now; the
        # engine's keys do not change the bundle)
        built["config"]["alerting"]["engine"]["alertmanager"]["url"] = am.url
        built["path"].write_text(yaml.safe_dump(built["config"]))
        load_config(built["path"])
        os.environ["A3MAILER_ADMIN_TOKEN"] = ADMIN_TOKEN
        (work / "exporter").mkdir(exist_ok=True)
        exporter = ExporterProcess(work / "exporter", built["path"], port=exporter_port)
        cleanup.append(exporter)
        exporter.start()
        prometheus = Prometheus(
            work / "prometheus", [{"job": JOB, "targets": [exporter.address]}],
            [work / "bundle/alert-rules/alerts.yaml",
             work / "bundle/alert-rules/recording-rules.yaml"], alertmanager=am.address,
            scrape_interval="2s")
        cleanup.append(prometheus)
        prometheus.start()
        prometheus.wait_target_up(JOB)
        yield Env(exporter, prometheus, am, mail, work / "bundle", built["config"])
    finally:
        os.environ.pop("A3MAILER_ADMIN_TOKEN", None)
        for part in reversed(cleanup):
            part.stop()
        shutil.rmtree(work, ignore_errors=True)


def send(mail: MailStack, sender: str, recipient: str, subject: str) -> None:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = sender, recipient, subject
    message.set_content("queue test\n")
    with smtplib.SMTP(LOOPBACK, mail.postfix.smtp_port, timeout=60) as smtp:
        smtp.send_message(message)


def postsuper(mail: MailStack, *args: str) -> None:
    subprocess.run([require_binary("postsuper"), "-c", str(mail.postfix.config_dir), *args],
                   check=True, capture_output=True, timeout=30)


def exporter_families(env: Env) -> dict[str, bool]:
    """Metric family -> whether it has samples, from the exporter's live /metrics."""
    text = httpx.get(env.exporter.url + "/metrics", timeout=10).text
    families: dict[str, bool] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            families.setdefault(line.split()[2], False)
        elif line and not line.startswith("#"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            families[promql.base_metric(name, families)] = True
    return families


def drive_events(env: Env) -> None:
    """The events that make event-driven series appear: a rejected recipient (log
    rejects, Postfix policy), rate-limited API calls, a custom metric and its rejection."""
    with smtplib.SMTP(LOOPBACK, env.mail.postfix.smtp_port, timeout=60) as smtp:
        smtp.ehlo()
        smtp.mail(ALICE)
        code, _ = smtp.rcpt(f"nobody@{MAIL_DOMAIN}")
        assert code >= 500
    send(env.mail, ALICE, ALICE, "e2e delivered")
    client = BoundIMAP4(LOOPBACK, env.mail.dovecot.imap_port, next_loopback_ip())
    with pytest.raises(imaplib.IMAP4.error):
        client.login(ALICE, "not-the-password")
    client.logout()
    codes = [httpx.get(env.exporter.url + "/api/v1/monitoring/history?limit=1",
                       timeout=5).status_code for _ in range(15)]
    assert 429 in codes
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    ok = httpx.post(env.exporter.url + "/api/v1/metrics/custom/spam_score", headers=auth,
                    json={"value": 2.5, "labels": {"listener": "smtp"}}, timeout=5)
    assert ok.status_code == 200, ok.text
    bad = httpx.post(env.exporter.url + "/api/v1/metrics/custom/spam_score", headers=auth,
                     json={"value": 1, "labels": {"nope": "x"}}, timeout=5)
    assert bad.status_code == 400
    # MFA: an enrolment and a wrong code; identity: a session, an unknown one, a CSRF
    # token that is not one, a weak password
    api = env.exporter.url + "/api/v1"
    for path, body in (("/mfa/totp/enroll", {"user": ALICE}),
                       ("/mfa/totp/verify", {"user": ALICE, "code": "000000"}),
                       ("/mfa/email/send", {"user": ALICE, "address": ALICE}),
                       ("/sessions", {"user": ALICE}),
                       ("/passwords/check", {"user": ALICE, "password": "password"})):
        answer = httpx.post(api + path, headers=auth, json=body, timeout=10)
        assert answer.status_code in (200, 201, 202), (path, answer.text)
    session = httpx.post(api + "/sessions", headers=auth, json={"user": ALICE}, timeout=10)
    assert httpx.get(api + "/sessions/not-a-session", headers=auth,
                     timeout=10).status_code == 404
    csrf = httpx.post(api + "/csrf/verify", headers=auth, timeout=10,
                      json={"session_id": session.json()["session_id"], "token": "forged"})
    assert csrf.status_code == 200 and csrf.json() == {"valid": False, "required": True}


def bundle_series(env: Env) -> dict[str, set[str]]:
    """Series name -> where the generated rules and dashboards use it."""
    used: dict[str, set[str]] = {}
    for rel in ("alert-rules/alerts.yaml", "alert-rules/recording-rules.yaml"):
        for name in alerts.referenced_series(yaml.safe_load((env.bundle / rel).read_text())):
            used.setdefault(name, set()).add(rel)
    for key in dashboards.KEYS:
        rel = f"dashboards/{key}.json"
        for name in dashboards.referenced_series((env.bundle / rel).read_text()):
            used.setdefault(name, set()).add(rel)
    return used


def recorded(env: Env) -> set[str]:
    data = yaml.safe_load((env.bundle / "alert-rules/recording-rules.yaml").read_text())
    return {r["record"] for g in data["groups"] for r in g["rules"]}


# --------------------------------------------------------------------------- tests


def test_full_example_enables_every_feature(env, tmp_path, monkeypatch):
    # the example as shipped, but for its credentials file, which the loader reads (it
    # names /etc/a3mailer-exporter/probe.credentials), and the variable it names for
    # Stalwart's password, which must be set
    monkeypatch.setenv("A3MAILER_STALWART_PASSWORD", "stalwart-secret")
    credentials = tmp_path / "probe.credentials"
    credentials.write_text("probe:s3cret\n")
    copy = tmp_path / "full.yaml"
    copy.write_text(EXAMPLE.read_text().replace("/etc/a3mailer-exporter/probe.credentials",
                                                str(credentials)))
    example = load_config(copy)
    mon, sec = example["monitoring"], example["security"]
    assert all(mon["collectors"].values())
    assert {p["protocol"] for p in mon["probes"]} == {"smtp", "imap", "pop3", "http"}
    assert mon["delivery"]["enabled"] and mon["stalwart"]["enabled"]
    assert mon["dns"]["domains"] and mon["dnsbl"]["ip_sets"] and mon["logs"]["files"]
    assert mon["queues"]["postfix"]["enabled"] and mon["queues"]["stalwart"]["enabled"]
    assert mon["custom_metrics"]
    assert all(sec[k]["enabled"] for k in ("dovecot_policy", "stalwart_webhook",
                                            "postfix_policy", "audit_config", "mfa"))
    assert sec["mfa"]["email"]["enabled"]
    engine = example["alerting"]["engine"]
    assert engine["enabled"] and engine["alertmanager"]["url"]
    # the local copy changed addresses and intervals only
    local = env.config
    for path in (("monitoring", "delivery", "enabled"), ("monitoring", "stalwart", "enabled"),
                 ("security", "postfix_policy", "enabled")):
        value: Any = local
        for key in path:
            value = value[key]
        assert value is True
    assert len(local["monitoring"]["probes"]) == len(mon["probes"])


def test_metric_contract(env):
    """Every series of the rules and dashboards is catalogued and on the live /metrics."""
    drive_events(env)
    used = bundle_series(env)
    records = recorded(env)
    wanted = {promql.base_metric(n, catalogue.METRICS) for n in used} - records - set(
        promql.SYNTHETIC)
    assert not wanted - set(catalogue.METRICS), "not catalogued"

    def missing() -> set[str]:
        return wanted - set(exporter_families(env))

    try:
        wait_until(lambda: not missing(), 60, "every bundle metric on /metrics", interval=1)
    except Exception:
        pytest.fail(f"on no /metrics: {sorted(missing())}\n{env.exporter.log()[-3000:]}")
    # Prometheus's own series that the bundle reads exist too
    for name in set(used) & promql.SYNTHETIC - {"ALERTS", "ALERTS_FOR_STATE"}:
        assert env.prometheus.query(f'{name}{{job="{JOB}"}}'), name
    # every rule (alerting and recording) evaluates without error
    rules = [r for g in env.prometheus.rules() for r in g["rules"]]
    assert len(rules) == sum(len(g["rules"]) for rel in ("alerts.yaml", "recording-rules.yaml")
                             for g in yaml.safe_load(
                                 (env.bundle / "alert-rules" / rel).read_text())["groups"])
    wait_until(lambda: all(r.get("lastEvaluation", "").startswith("20") for r in
                           (x for g in env.prometheus.rules() for x in g["rules"])), 30,
               "every rule evaluated")
    bad = [(r["name"], r.get("lastError")) for g in env.prometheus.rules()
           for r in g["rules"] if r["health"] != "ok"]
    assert not bad


def test_queue_breach_alerts_through_alertmanager_and_resolves(env):
    am, prom = env.alertmanager, env.prometheus
    for index in range(QUEUE_THRESHOLD + 2):
        send(env.mail, HELD_SENDER, ALICE, f"held {index}")
    prom.wait_for_query(f'a3mailer_queue_total_messages{{job="{JOB}"}} > {QUEUE_THRESHOLD}',
                        timeout=60)

    def queue_alert(payload: dict[str, Any], status: str) -> bool:
        return any(a["labels"]["alertname"] == "A3MailerMailQueueLarge" and a["status"] == status
                   for a in payload["alerts"])

    firing = am.wait_for_notification(lambda p: queue_alert(p, "firing"), timeout=90)
    [alert] = [a for a in firing["alerts"] if a["labels"]["alertname"] ==
               "A3MailerMailQueueLarge"]
    instance = env.exporter.address
    assert alert["labels"] == {"alertname": "A3MailerMailQueueLarge", "severity": "warning",
                               "team": "mail", "job": JOB, "instance": instance}
    assert firing["receiver"] == "warning"
    # the Overview dashboard's alert panels show it while it fires
    overview = json.loads((env.bundle / "dashboards/overview.json").read_text())
    alert_queries = [re.sub(r"\$(cluster|namespace|instance)", ".*", t["expr"])
                     for p in overview["panels"]
                     for t in p.get("targets", []) if "ALERTS" in t["expr"]]
    assert len(alert_queries) == 2
    table = next(q for q in alert_queries if "vector(0)" not in q)
    # the notification may be the exporter's own engine's (it pushes to this Alertmanager
    # too, every 2 s): Prometheus's ALERTS follow at its own next evaluation
    prom.wait_for_query(table, lambda rows: "A3MailerMailQueueLarge" in {
        r["metric"]["alertname"] for r in rows}, timeout=60)
    count = next(q for q in alert_queries if "vector(0)" in q)
    assert float(prom.query(count)[0]["value"][1]) >= 1
    # the held messages, and a round-trip test message if one was passing through
    queued = re.fullmatch(rf"(\d+) messages are queued on {re.escape(instance)}, above the "
                          rf"threshold of {QUEUE_THRESHOLD}\.", alert["annotations"]["description"])
    assert queued and int(queued.group(1)) >= QUEUE_THRESHOLD + 2, alert["annotations"]
    assert alert["annotations"] == {
        "summary": f"The mail queue on {instance} is large.",
        "description": queued.group(0),
        "runbook_url": "https://github.com/a3mailer/a3mailer-exporter/blob/main/docs/runbooks/"
                       "application.md#a3mailermailqueuelarge",
        "dashboard_url": f"http://localhost:3000/d/a3mailer-mail/a3mailer-mail-services"
                         f"?var-instance={instance}",
        "hint": "postqueue -p | tail",
    }
    # the exporter's own engine fires the same alert, with the same labels (Alertmanager,
    # which both push to, shows one alert)
    def engine_alert() -> list[dict[str, Any]]:
        body = httpx.get(env.exporter.url + "/api/v1/alerts?state=firing", timeout=10).json()
        return [a for a in body["alerts"] if a["name"] == "A3MailerMailQueueLarge"]

    [mine] = wait_until(engine_alert, 30, "the engine fires A3MailerMailQueueLarge")
    assert mine["labels"] == alert["labels"]
    assert {k: v for k, v in mine["annotations"].items() if k != "description"} == {
        k: v for k, v in alert["annotations"].items() if k != "description"}
    assert re.fullmatch(rf"\d+ messages are queued on {re.escape(instance)}, above the "
                        rf"threshold of {QUEUE_THRESHOLD}\.", mine["annotations"]["description"])
    assert [a["labels"] for a in am.alerts() if a["labels"]["alertname"] ==
            "A3MailerMailQueueLarge"] == [alert["labels"]]
    # the cause goes away: the held messages are released and delivered
    postsuper(env.mail, "-H", "ALL")

    def drained() -> bool:
        # flush: a delivery deferred by a transient LMTP error is retried at once
        subprocess.run([require_binary("postqueue"), "-c", str(env.mail.postfix.config_dir),
                        "-f"], check=True, capture_output=True, timeout=30)
        # (a round-trip test message may be passing through the queue at any moment)
        return bool(prom.query(
            f'a3mailer_queue_total_messages{{job="{JOB}"}} < {QUEUE_THRESHOLD}'))

    try:
        wait_until(drained, 90, "the released messages delivered", interval=2)
    except Exception as exc:
        queue = subprocess.run([require_binary("postqueue"), "-c",
                                str(env.mail.postfix.config_dir), "-j"],
                               capture_output=True, text=True).stdout
        pytest.fail(f"{exc}\nqueue: {queue[:3000]}\nlog: {env.mail.postfix.log()[-3000:]}"
                    f"\ndovecot: {env.mail.dovecot.log()[-6000:]}")
    resolved = am.wait_for_notification(lambda p: queue_alert(p, "resolved"), timeout=90)
    [done] = [a for a in resolved["alerts"] if a["labels"]["alertname"] ==
              "A3MailerMailQueueLarge"]
    assert done["labels"] == alert["labels"]
    assert done["endsAt"] > done["startsAt"]
    wait_until(lambda: not engine_alert(), 30, "the engine resolved it too")


# Series that exist only after an event the environment does not cause (a failure)
EVENT_ONLY = {
    "a3mailer_security_store_errors_total",  # a failing security store
    "a3mailer_security_postfix_errors_total",  # a malformed policy request
    "a3mailer_tls_failures_total",  # a failed TLS handshake in the log
}
# ... and series whose HELP says they are absent at times (before a first run, after a
# failed one): a round trip that timed out on a loaded machine drops its _last_seconds
MAY_BE_ABSENT = {name for name, spec in catalogue.METRICS.items() if "absent" in spec.help.lower()}
FIRING = 'ALERTS{alertstate="firing", alertname=~"A3Mailer.+", alertname!="A3MailerInfoInhibitor"}'


def test_every_dashboard_query_runs_and_active_panels_have_data(env):
    """A panel's source is active when every series it reads has samples in Prometheus;
    then its query must return data (a wrong label value or function shows up here)."""
    prom = env.prometheus
    drive_events(env)
    with_samples = {n for n, has in exporter_families(env).items() if has}
    assert not (with_samples & EVENT_ONLY), with_samples & EVENT_ONLY
    records = recorded(env)
    queried, empty, inactive = 0, [], set()
    for key in dashboards.KEYS:
        board = json.loads((env.bundle / f"dashboards/{key}.json").read_text())
        for var in board["templating"]["list"][1:]:
            query = re.fullmatch(r"label_values\((.+), (\w+)\)", var["query"])
            assert query, var["query"]
            expr = query.group(1).replace("$cluster", ".*").replace("$namespace", ".*")
            assert prom.query(expr), (key, var["name"])
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                expr = re.sub(r"\$(cluster|namespace|instance)", ".*",
                              target["expr"].replace("$__rate_interval", "30s"))
                result = prom.query(expr)  # raises on a query error
                queried += 1
                if result:
                    continue
                if "ALERTS" in expr and not prom.query(FIRING):
                    continue  # shows data while an alert fires (checked in the breach test)
                names = {promql.base_metric(n, catalogue.METRICS)
                         for n in promql.metric_names(expr)} - records - set(promql.SYNTHETIC)
                idle = {n for n in names if not prom.query(
                    f'count({{__name__=~"{n}(_bucket|_sum|_count)?", job="{JOB}"}})')}
                if idle:
                    assert idle <= EVENT_ONLY | MAY_BE_ABSENT, (key, panel["title"], idle)
                    inactive |= idle
                    continue
                empty.append(f"{key}: {panel['title']}: {expr}")
    assert not empty, "no data although every series it reads has samples:\n" + "\n".join(
        empty)
    assert queried > 100
    assert inactive <= EVENT_ONLY | {"a3mailer_delivery_roundtrip_last_seconds"}, inactive


def test_alertmanager_loaded_the_generated_routes(env):
    with urllib.request.urlopen(f"{env.alertmanager.url}/api/v2/status", timeout=10) as r:
        status = json.load(r)
    loaded = yaml.safe_load(status["config"]["original"])
    routes = {r["receiver"] for r in loaded["route"]["routes"]}
    assert routes == {"null", "critical", "warning", "info"}
    assert len(loaded["inhibit_rules"]) == 2
    assert find_binary("amtool")
