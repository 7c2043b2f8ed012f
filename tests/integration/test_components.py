"""Smoke tests: each real component starts, answers and is wired as the
integration tests expect. They assert values, so a broken wrapper fails here
first instead of in an exporter test."""

from __future__ import annotations

import base64
import imaplib
import poplib
import smtplib
import ssl
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

import pytest
import redis

from tests.integration.components import (
    Alertmanager,
    BoundIMAP4,
    BoundPOP3,
    Dovecot,
    MailStack,
    Prometheus,
    RecordedRequest,
    RecordingHTTPServer,
    Redis,
    next_loopback_ip,
    pid_alive,
    text_responder,
    wait_until,
)

pytestmark = pytest.mark.integration

METRICS = "# HELP smoke_value A fixed value.\n# TYPE smoke_value gauge\nsmoke_value 42\n"


# --------------------------------------------------------------------------- clients
# Dovecot delays repeated auth failures per client IP, so each client binds its
# own 127.0.0.x source address.


def message(sender: str, recipient: str, subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, recipient, subject
    msg.set_content("smoke test body\n")
    return msg


def inbox_subjects(dovecot: Dovecot, user: str, password: str) -> list[str]:
    imap = BoundIMAP4(dovecot.host, dovecot.imap_port, next_loopback_ip())
    try:
        imap.login(user, password)
        imap.select("INBOX", readonly=True)
        _, data = imap.search(None, "ALL")
        subjects = []
        for num in data[0].split():
            _, parts = imap.fetch(num, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            header = parts[0][1].decode()  # type: ignore[index,union-attr]
            subjects.append(header.split(":", 1)[1].strip())
        return subjects
    finally:
        imap.logout()


def wait_for_subject(dovecot: Dovecot, user: str, password: str, subject: str) -> None:
    wait_until(
        lambda: subject in inbox_subjects(dovecot, user, password),
        30,
        f"message {subject!r} in {user}'s INBOX",
        interval=0.2,
    )


# --------------------------------------------------------------------------- Prometheus


def test_prometheus_scrapes_a_target_and_answers_queries(
    prometheus_factory: Callable[..., Prometheus],
) -> None:
    with RecordingHTTPServer(text_responder(METRICS)) as target:
        prom = prometheus_factory(
            targets=[
                {"job": "smoke", "targets": [target.address]},
                {
                    "job": "basic",
                    "targets": [target.address],
                    "metrics_path": "/basic",
                    "basic_auth": {"username": "scraper", "password": "s3cret"},
                },
                {
                    "job": "bearer",
                    "targets": [target.address],
                    "metrics_path": "/bearer",
                    "bearer_token": "api_smoke",
                },
            ]
        )
        up = prom.wait_target_up("smoke")
        assert up[0]["scrapeUrl"] == f"{target.url}/metrics"
        result = prom.wait_for_query('smoke_value{job="smoke"}')
        assert len(result) == 1
        assert result[0]["metric"]["instance"] == target.address
        assert float(result[0]["value"][1]) == 42.0

        prom.wait_target_up("basic")
        prom.wait_target_up("bearer")
        seen = {r.path: r.headers.get("authorization") for r in target.snapshot()}
        assert seen["/metrics"] is None
        assert seen["/basic"] == "Basic " + base64.b64encode(b"scraper:s3cret").decode()
        assert seen["/bearer"] == "Bearer api_smoke"


def test_prometheus_rule_fires_and_reaches_alertmanager(
    prometheus_factory: Callable[..., Prometheus],
    alertmanager: Alertmanager,
    tmp_path: Any,
) -> None:
    rules = tmp_path / "smoke.rules.yml"
    rules.write_text(
        "groups:\n"
        "  - name: smoke\n"
        "    rules:\n"
        "      - alert: SmokeValueHigh\n"
        "        expr: smoke_value > 40\n"
        "        labels: {severity: warning}\n"
        "        annotations: {summary: 'smoke value is {{ $value }}'}\n"
    )
    with RecordingHTTPServer(text_responder(METRICS)) as target:
        prom = prometheus_factory(
            targets=[{"job": "smoke", "targets": [target.address]}],
            rule_files=[rules],
            alertmanager=alertmanager.address,
        )
        assert [g["name"] for g in prom.rules()] == ["smoke"]
        prom.wait_for_query("ALERTS{alertname='SmokeValueHigh', alertstate='firing'}")
        assert [a["labels"]["alertname"] for a in prom.alerts()] == ["SmokeValueHigh"]
        payload = alertmanager.wait_for_notification(
            lambda p: any(a["labels"]["alertname"] == "SmokeValueHigh" for a in p["alerts"]),
            timeout=60,
        )
    alert = payload["alerts"][0]
    assert alert["status"] == "firing"
    assert alert["labels"]["severity"] == "warning"
    assert alert["labels"]["job"] == "smoke"
    assert alert["annotations"]["summary"] == "smoke value is 42"


# --------------------------------------------------------------------------- Alertmanager


def test_alertmanager_delivers_posted_alert_to_webhook(alertmanager: Alertmanager) -> None:
    alertmanager.post_alerts(
        [
            {
                "labels": {"alertname": "SmokeTest", "severity": "critical", "component": "smoke"},
                "annotations": {"summary": "posted by the smoke test"},
            }
        ]
    )
    assert [a["labels"]["alertname"] for a in alertmanager.alerts()] == ["SmokeTest"]
    payload = alertmanager.wait_for_notification(
        lambda p: p["commonLabels"].get("alertname") == "SmokeTest", timeout=30
    )
    assert payload["receiver"] == "webhook"
    assert payload["status"] == "firing"
    assert payload["alerts"][0]["labels"] == {
        "alertname": "SmokeTest",
        "severity": "critical",
        "component": "smoke",
    }
    assert payload["alerts"][0]["annotations"]["summary"] == "posted by the smoke test"
    assert len(alertmanager.received()) >= 1


# --------------------------------------------------------------------------- Dovecot


def test_dovecot_imap_login_good_and_bad_password(dovecot: Dovecot) -> None:
    user, password = "alice@example.test", dovecot.users["alice@example.test"]

    good_ip = next_loopback_ip()
    imap = BoundIMAP4(dovecot.host, dovecot.imap_port, good_ip)
    assert imap.login(user, password)[0] == "OK"
    assert imap.select("INBOX") == ("OK", [b"0"])
    imap.logout()

    bad_ip = next_loopback_ip()
    imap = BoundIMAP4(dovecot.host, dovecot.imap_port, bad_ip)
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        imap.login(user, "wrong-password")
    imap.logout()

    wait_until(lambda: f"rip={bad_ip}" in dovecot.log(), 10, "the failed login in Dovecot's log")
    log = dovecot.log()
    assert f"user=<{user}>, method=PLAIN, rip={good_ip}" in log
    assert "Password mismatch" in log  # auth_verbose = yes


def test_dovecot_lmtp_delivery_and_pop3(dovecot: Dovecot) -> None:
    user, password = "bob@example.test", dovecot.users["bob@example.test"]
    with smtplib.LMTP(dovecot.host, dovecot.lmtp_port) as lmtp:
        refused = lmtp.send_message(message("smoke@example.test", user, "via lmtp"))
    assert refused == {}
    assert len(list((dovecot.maildir(user) / "new").iterdir())) == 1

    pop = BoundPOP3(dovecot.host, dovecot.pop3_port, next_loopback_ip())
    assert pop.user(user).startswith(b"+OK")
    assert pop.pass_(password).startswith(b"+OK")
    count, size = pop.stat()
    assert count == 1 and size > 0
    _, lines, _ = pop.retr(1)
    assert b"Subject: via lmtp" in lines
    pop.quit()


def test_dovecot_restart_on_same_directory(dovecot: Dovecot) -> None:
    user, password = "alice@example.test", dovecot.users["alice@example.test"]
    with smtplib.LMTP(dovecot.host, dovecot.lmtp_port) as lmtp:
        lmtp.send_message(message("smoke@example.test", user, "before restart"))
    first_pid = dovecot.proc.pid if dovecot.proc else None

    dovecot.restart()

    assert dovecot.proc is not None and dovecot.proc.pid != first_pid
    assert first_pid is not None and not pid_alive(first_pid)
    assert inbox_subjects(dovecot, user, password) == ["before restart"]
    assert dovecot.log().count("starting up for imap, pop3, lmtp") == 2


def test_dovecot_calls_the_auth_policy_endpoint(
    dovecot_factory: Callable[..., Dovecot],
) -> None:
    verdict = {"status": 0, "msg": ""}

    def policy(req: RecordedRequest) -> tuple[int, str, str]:
        import json

        return 200, "application/json", json.dumps(verdict)

    with RecordingHTTPServer(policy) as server:
        dc = dovecot_factory(policy_url=f"{server.url}/dovecot/policy")
        user, password = "alice@example.test", dc.users["alice@example.test"]
        client = next_loopback_ip()

        imap = BoundIMAP4(dc.host, dc.imap_port, client)
        assert imap.login(user, password)[0] == "OK"
        imap.logout()
        allow = server.wait_for_request(lambda r: r.query.get("command") == ["allow"])
        body = allow.json()
        assert allow.method == "POST" and allow.path == "/dovecot/policy"
        assert body["login"] == user and body["remote"] == client and body["protocol"] == "imap"
        assert body["tls"] is False  # a JSON boolean, like "success" and "policy_reject"
        assert len(body["pwhash"]) > 0 and password not in allow.body.decode()
        report = server.wait_for_request(lambda r: r.query.get("command") == ["report"])
        assert report.json()["success"] is True

        verdict.update(status=-1, msg="blocked by smoke policy")
        imap = BoundIMAP4(dc.host, dc.imap_port, next_loopback_ip())
        with pytest.raises(imaplib.IMAP4.error, match="blocked by smoke policy"):
            imap.login(user, password)
        imap.logout()


# --------------------------------------------------------------------------- Postfix


def test_postfix_smtp_delivers_to_dovecot_inbox(mail_stack: MailStack) -> None:
    alice = "alice@example.test"
    with smtplib.SMTP(mail_stack.postfix.host, mail_stack.postfix.smtp_port, timeout=15) as smtp:
        code, banner = smtp.ehlo("client.example.test")
        assert code == 250
        refused = smtp.send_message(message("sender@example.test", alice, "smoke over smtp"))
        assert refused == {}
        with pytest.raises(smtplib.SMTPRecipientsRefused) as unknown:
            smtp.sendmail("sender@example.test", ["nobody@example.test"], "Subject: x\r\n\r\nx")
        assert unknown.value.recipients["nobody@example.test"][0] == 550
    wait_for_subject(mail_stack.dovecot, alice, mail_stack.users[alice], "smoke over smtp")
    assert "status=sent" in mail_stack.postfix.log()


def test_postfix_submission_requires_and_accepts_auth(mail_stack: MailStack) -> None:
    alice, bob = "alice@example.test", "bob@example.test"
    port = mail_stack.postfix.submission_port
    with smtplib.SMTP(
        mail_stack.postfix.host, port, timeout=15, source_address=(next_loopback_ip(), 0)
    ) as smtp:
        smtp.ehlo()
        assert "PLAIN" in smtp.esmtp_features["auth"]
        with pytest.raises(smtplib.SMTPRecipientsRefused):  # no AUTH, no relay
            smtp.sendmail(bob, [alice], "Subject: x\r\n\r\nx")
    with smtplib.SMTP(
        mail_stack.postfix.host, port, timeout=15, source_address=(next_loopback_ip(), 0)
    ) as smtp:
        smtp.ehlo()
        smtp.user, smtp.password = bob, "wrong-password"
        with pytest.raises(smtplib.SMTPAuthenticationError):  # one attempt: PLAIN only
            smtp.auth("PLAIN", smtp.auth_plain)
    with smtplib.SMTP(
        mail_stack.postfix.host, port, timeout=15, source_address=(next_loopback_ip(), 0)
    ) as smtp:
        smtp.login(bob, mail_stack.users[bob])
        assert smtp.send_message(message(bob, alice, "smoke over submission")) == {}
    wait_for_subject(mail_stack.dovecot, alice, mail_stack.users[alice], "smoke over submission")
    assert f"sasl_username={bob}" in mail_stack.postfix.log()


def test_mail_stack_with_tls(tmp_path: Any) -> None:
    stack = MailStack.start(tmp_path / "tls", tls=True)
    try:
        alice, bob = "alice@example.test", "bob@example.test"
        assert stack.dovecot.cert_path is not None
        ctx = ssl.create_default_context(cafile=str(stack.dovecot.cert_path))

        imap = imaplib.IMAP4_SSL(stack.dovecot.host, stack.dovecot.imaps_port, ssl_context=ctx)
        assert imap.login(alice, stack.users[alice])[0] == "OK"
        imap.logout()
        pop = poplib.POP3(stack.dovecot.host, stack.dovecot.pop3_port, timeout=15)
        pop.stls(ctx)
        assert pop.user(bob).startswith(b"+OK") and pop.pass_(stack.users[bob]).startswith(b"+OK")
        pop.quit()

        with smtplib.SMTP(stack.postfix.host, stack.postfix.submission_port, timeout=15) as smtp:
            smtp.starttls(context=ctx)
            smtp.login(bob, stack.users[bob])
            assert smtp.send_message(message(bob, alice, "smoke over tls")) == {}
        wait_for_subject(stack.dovecot, alice, stack.users[alice], "smoke over tls")
        log = stack.postfix.log()
        assert "TLS connection established from localhost[127.0.0.1]" in log
        assert "starttls=1 auth=1" in log
    finally:
        stack.stop()


# --------------------------------------------------------------------------- Redis


def test_redis_round_trip_and_stop(redis_server: Redis) -> None:
    client = redis.Redis.from_url(redis_server.url)
    assert client.set("smoke:key", "value-1", ex=60)
    assert client.get("smoke:key") == b"value-1"
    assert client.incr("smoke:counter") == 1
    client.close()

    pid = redis_server.pid
    assert pid is not None and pid_alive(pid)
    redis_server.stop()
    assert not pid_alive(pid)
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(redis_server.url, socket_connect_timeout=1).ping()
