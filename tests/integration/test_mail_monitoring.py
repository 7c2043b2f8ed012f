"""Mail monitoring end to end against a real Postfix 3.7 and Dovecot 2.3 on loopback:

- Postfix's real queues (messages deferred to a relay that refuses, one put on hold)
  read through `postqueue -j` by the exporter's queues collector and health check;
- the real exporter process probing both servers (SMTP 25 and submission with STARTTLS
  and AUTH, IMAP STARTTLS and implicit, POP3 and POP3S), running the delivery round trip
  through both, reading the queues and ingesting both servers' own log files, then a
  probe pointed at a closed port by a SIGHUP reload;
- log ingestion feeding the security engine: failed IMAP logins seen only through
  Dovecot's log file (no auth policy configured) lock the account for that source and
  ban it at the engine's thresholds; `feed_security: false` on the file stops that.

One mail stack serves the module: Dovecot with TLS and no failure delays, Postfix with
STARTTLS, AUTH on submission and a relayhost that refuses connections (mail for other
domains is deferred there). Postfix logs to its maillog_file through postlogd, Dovecot
to its log_path, both in the stack's directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import json
import signal
import smtplib
import subprocess
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from exporter.collectors.logs import Auth, parse_dovecot
from exporter.collectors.queues import POSTFIX_QUEUES
from exporter.config import load_config
from exporter.exposition import render_text
from exporter.health import Status
from exporter.service import Exporter
from tests.integration.components import (
    DEFAULT_MAIL_USERS,
    LOOPBACK,
    MAIL_DOMAIN,
    BoundIMAP4,
    Dovecot,
    MailStack,
    Postfix,
    cert_not_after,
    free_port,
    imap_login,
    next_loopback_ip,
    pop3_login,
    require_binary,
    wait_until,
)

pytestmark = pytest.mark.integration

ALICE = f"alice@{MAIL_DOMAIN}"
BOB = f"bob@{MAIL_DOMAIN}"
NO_PENALTY = "service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n}\n"
ADMIN_TOKEN = "log-test-admin-token"


@pytest.fixture(scope="module")
def mail(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailStack]:
    refusing_relay = free_port()  # nobody listens there: mail to other domains is deferred
    stack = MailStack.start(
        tmp_path_factory.mktemp("monitoring-mail"), dict(DEFAULT_MAIL_USERS), tls=True,
        postfix_main={"relayhost": f"[{LOOPBACK}]:{refusing_relay}"},
        dovecot_options={"auth_failure_delay": "0", "extra_config": NO_PENALTY})
    try:
        yield stack
    finally:
        stack.stop()


# --------------------------------------------------------------------------- helpers


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


def scrape(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=10).text


def components(url: str) -> dict[str, dict[str, Any]]:
    return {c["component"]: c for c in httpx.get(url + "/health", timeout=10).json()[
        "components"]}


def postqueue(postfix: Postfix) -> list[dict[str, Any]]:
    """What Postfix holds, as postqueue -j says (read here independently of the exporter)."""
    out = subprocess.run([require_binary("postqueue"), "-c", str(postfix.config_dir), "-j"],
                         check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def postsuper(postfix: Postfix, *args: str) -> None:
    subprocess.run([require_binary("postsuper"), "-c", str(postfix.config_dir), *args],
                   check=True, capture_output=True)


def send(postfix: Postfix, recipient: str, body: str = "queued for the test") -> None:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = ALICE, recipient, "queue test"
    message.set_content(body)
    with smtplib.SMTP(LOOPBACK, postfix.smtp_port, timeout=15) as client:
        client.send_message(message)


# --------------------------------------------------------------------------- a. queues


async def test_postfix_queues_from_the_real_postqueue(mail, config_file):
    postfix = mail.postfix
    try:
        for n in range(3):
            send(postfix, f"far{n}@elsewhere.test", body="x" * (1000 * (n + 1)))
        wait_until(lambda: [m["queue_name"] for m in postqueue(postfix)] == ["deferred"] * 3,
                   30, "three messages deferred by the refusing relay")
        held = postqueue(postfix)[0]["queue_id"]
        postsuper(postfix, "-h", held)
        queued = wait_until(lambda: (lambda q: q if sorted(m["queue_name"] for m in q) == [
            "deferred", "deferred", "hold"] else None)(postqueue(postfix)), 10,
            "one message on hold")
        exporter = Exporter(load_config(config_file({"monitoring": {
            "alert_thresholds": {"queue_size_threshold": 2},
            "queues": {"postfix": {"enabled": True, "config_dir": str(postfix.config_dir),
                                   "interval": "1h"}}}})))
        await exporter.start()
        try:
            source = exporter.mail.queues["postfix"]
            await asyncio.to_thread(wait_until, lambda: source.last.runs > 0, 15,
                                    "the first queue check")
            await exporter.health.run_once()
            text = render_text(exporter.scrape.collect()).decode()
            health = exporter.health.components["queues"]
        finally:
            await exporter.stop()
    finally:
        postsuper(postfix, "-d", "ALL")
    by_queue: dict[str, list[dict[str, Any]]] = {q: [] for q in POSTFIX_QUEUES}
    for message in queued:
        by_queue[message["queue_name"]].append(message)
    assert value(text, "a3mailer_queue_check_success", source="postfix") == 1
    for queue, messages in by_queue.items():
        assert value(text, "a3mailer_queue_messages", queue=queue) == len(messages)
        assert value(text, "a3mailer_queue_size_bytes", queue=queue) == sum(
            m["message_size"] for m in messages)
        assert value(text, "a3mailer_queue_recipients", queue=queue) == sum(
            len(m["recipients"]) for m in messages)
        assert value(text, "a3mailer_queue_message_age_seconds_count",
                     queue=queue) == len(messages)
        assert value(text, "a3mailer_queue_message_size_bytes_count",
                     queue=queue) == len(messages)
        oldest = value(text, "a3mailer_queue_oldest_message_age_seconds", queue=queue)
        assert oldest is not None and 0 <= oldest < 120
    assert value(text, "a3mailer_queue_messages", queue="deferred") == 2
    assert value(text, "a3mailer_queue_messages", queue="hold") == 1
    assert 1000 < value(text, "a3mailer_queue_size_bytes", queue="hold") < 5000
    # one recipient each, deferred with Postfix's reason
    assert all(m["recipients"][0].get("delay_reason", "").find("Connection refused") >= 0
               for m in by_queue["deferred"])
    assert value(text, "a3mailer_queue_total_messages") == 3
    assert health.status is Status.DEGRADED
    assert health.message == "3 messages queued > queue_size_threshold 2"
    assert health.details["postfix"] == {"active": 0, "deferred": 2, "hold": 1,
                                         "incoming": 0, "maildrop": 0}
    assert postqueue(postfix) == []


# --------------------------------------------------------------------------- b. the exporter


def monitoring_config(mail: MailStack, tmp_path: Path, closed_imap: int | None = None
                      ) -> dict[str, Any]:
    cert = str(mail.dovecot.cert_path)
    credentials = tmp_path / "alice.credentials"
    credentials.write_text(f"{ALICE}:{DEFAULT_MAIL_USERS[ALICE]}\n")
    pf, dc = mail.postfix, mail.dovecot
    every = {"host": LOOPBACK, "interval": "1s", "timeout": "5s", "ca_file": cert}
    login = {**every, "credentials_file": str(credentials)}
    return {
        "security": {"admin_token_file": str(admin_token(tmp_path))},
        "monitoring": {
            "health_check_interval": "1s", "health_check_timeout": "1s", "failure_threshold": 2,
            "probes": [
                {"name": "smtp-25", "protocol": "smtp", "port": pf.smtp_port,
                 "tls": "starttls", **every},
                {"name": "submission", "protocol": "smtp", "port": pf.submission_port,
                 "tls": "starttls", **login},
                {"name": "imap-starttls", "protocol": "imap",
                 "port": closed_imap or dc.imap_port, "tls": "starttls", **login},
                {"name": "imaps", "protocol": "imap", "port": dc.imaps_port,
                 "tls": "implicit", **login},
                {"name": "pop3", "protocol": "pop3", "port": dc.pop3_port, "tls": "none",
                 **login},
                {"name": "pop3s", "protocol": "pop3", "port": dc.pop3s_port,
                 "tls": "implicit", **login},
            ],
            "delivery": {
                "enabled": True, "credentials_file": str(credentials), "from_address": ALICE,
                "to_address": ALICE, "ca_file": cert, "interval": "2s", "timeout": "20s",
                "poll_interval": "200ms",
                "submission": {"host": LOOPBACK, "port": pf.submission_port,
                               "tls": "starttls"},
                "imap": {"host": LOOPBACK, "port": dc.imaps_port, "tls": "implicit"}},
            "queues": {"postfix": {"enabled": True, "config_dir": str(pf.config_dir),
                                   "interval": "1s"}},
            "logs": {"poll_interval": "200ms", "files": [
                {"name": "postfix", "path": str(pf.maillog_path), "format": "postfix"},
                {"name": "dovecot", "path": str(dc.log_path), "format": "dovecot"}]},
        },
    }


def reload(exporter: Any, path: Path, config: dict[str, Any]) -> None:
    """Rewrites the config (keeping its state dir) and waits until SIGHUP applied it."""
    stamp = "a3mailer_exporter_config_last_reload_success_timestamp_seconds"
    before = value(scrape(exporter.url), stamp)
    path.write_text(yaml.safe_dump({**config, "server": yaml.safe_load(path.read_text())[
        "server"]}))
    exporter.signal(signal.SIGHUP)
    wait_until(lambda: value(scrape(exporter.url), stamp) != before, 15, "the reload")


def admin_token(tmp_path: Path) -> Path:
    path = tmp_path / "admin.token"
    path.write_text(ADMIN_TOKEN)
    return path


PROBES = {"smtp-25": ("smtp", {"connect", "banner", "tls", "total"}),
          "submission": ("smtp", {"connect", "banner", "tls", "auth", "total"}),
          "imap-starttls": ("imap", {"connect", "banner", "tls", "auth", "select", "total"}),
          "imaps": ("imap", {"connect", "tls", "banner", "auth", "select", "total"}),
          "pop3": ("pop3", {"connect", "banner", "auth", "total"}),
          "pop3s": ("pop3", {"connect", "tls", "banner", "auth", "total"})}


def test_the_exporter_monitors_the_real_servers(mail, exporter_process, config_file, tmp_path):
    config = monitoring_config(mail, tmp_path)
    path = config_file(config)
    exporter = exporter_process(path)
    url = exporter.url

    def everything_ran() -> str | None:
        text = scrape(url)
        ready = all(value(text, "a3mailer_probe_success", probe=name, protocol=protocol) == 1
                    for name, (protocol, _) in PROBES.items())
        ready = ready and value(text, "a3mailer_delivery_roundtrip_success") == 1
        ready = ready and (value(text, "a3mailer_mail_deliveries_total", source="postfix",
                                 status="sent") or 0) >= 1
        ready = ready and (value(text, "a3mailer_auth_events_total", source="postfix",
                                 service="submission", result="success") or 0) >= 1
        return text if ready else None

    text = wait_until(everything_ran, 60, "every probe, the round trip and the logs")
    # probes: per target success and phases; the certificate made for the test
    not_after = cert_not_after(mail.dovecot.cert_path)
    for name, (protocol, phases) in PROBES.items():
        seen = {dict(labels)["phase"] for (metric, labels) in samples(text)
                if metric == "a3mailer_probe_duration_seconds" and dict(labels)["probe"] == name}
        assert phases <= seen, (name, seen)
        assert value(text, "a3mailer_probe_duration_seconds", probe=name, protocol=protocol,
                     phase="total") > 0
        if name != "pop3":
            assert value(text, "a3mailer_tls_cert_not_after_timestamp_seconds",
                         probe=name) == not_after
            assert value(text, "a3mailer_probe_tls_verified", probe=name) == 1
    # the round trip went through Postfix and Dovecot
    assert 0 < value(text, "a3mailer_delivery_roundtrip_last_seconds") < 20
    assert value(text, "a3mailer_delivery_roundtrip_seconds_count") >= 1
    # the queues, all five
    for queue in POSTFIX_QUEUES:
        assert value(text, "a3mailer_queue_messages", queue=queue) is not None
    assert value(text, "a3mailer_queue_check_success", source="postfix") == 1
    assert value(text, "a3mailer_queue_total_messages") == sum(
        value(text, "a3mailer_queue_messages", queue=q) for q in POSTFIX_QUEUES)
    # the real servers' log lines are all understood
    for source in ("postfix", "dovecot"):
        assert value(text, "a3mailer_log_lines_total", source=source, result="unparsed") == 0
        assert value(text, "a3mailer_log_lines_total", source=source, result="parsed") > 0
    for service in ("imap", "pop3"):
        assert value(text, "a3mailer_auth_events_total", source="dovecot", service=service,
                     result="success") >= 1
    wanted = [*PROBES, "delivery_roundtrip", "queues"]
    wait_until(lambda: all(components(url)[name]["status"] == "healthy" for name in wanted),
               15, f"{wanted} healthy")

    # real logins that fail: counted from the log, exactly, and handed to the engine
    source = next_loopback_ip()
    before = {service: value(text, "a3mailer_auth_events_total", source="dovecot",
                             service=service, result="failure") or 0
              for service in ("imap", "pop3")}
    assert "AUTHENTICATIONFAILED" in imap_login(mail.dovecot, ALICE, "wrong-1", source)
    assert "AUTHENTICATIONFAILED" in imap_login(mail.dovecot, BOB, "wrong-2", source)
    assert "Authentication failed" in pop3_login(mail.dovecot, ALICE, "wrong-3", source)

    def failures_counted() -> str | None:
        text = scrape(url)
        imap = value(text, "a3mailer_auth_events_total", source="dovecot", service="imap",
                     result="failure")
        pop3 = value(text, "a3mailer_auth_events_total", source="dovecot", service="pop3",
                     result="failure")
        return text if (imap, pop3) == (before["imap"] + 2, before["pop3"] + 1) else None

    text = wait_until(failures_counted, 15, "the failed logins in Dovecot's log")
    assert value(text, "a3mailer_security_attempts_total", protocol="imap",
                 result="failure") == 2
    assert value(text, "a3mailer_security_attempts_total", protocol="pop3",
                 result="failure") == 1
    for secret in (ALICE, BOB, source):
        assert secret not in text

    # a target goes away: the probe fails with a clear reason, the process keeps serving
    closed = free_port()
    reload(exporter, path, monitoring_config(mail, tmp_path, closed_imap=closed))
    wait_until(lambda: value(scrape(url), "a3mailer_probe_success", probe="imap-starttls",
                             protocol="imap") == 0, 15, "the probe of the closed port")
    component = wait_until(lambda: (lambda c: c if c["status"] == "unhealthy" else None)(
        components(url)["imap-starttls"]), 15, "the component unhealthy")
    assert component["message"] == f"connection refused by {LOOPBACK}:{closed}"
    text = scrape(url)
    assert value(text, "a3mailer_exporter_config_last_reload_successful") == 1
    assert value(text, "a3mailer_probe_success", probe="imaps", protocol="imap") == 1
    # the log sources were kept across the reload (same files): their counters too
    assert value(text, "a3mailer_auth_events_total", source="dovecot", service="pop3",
                 result="failure") == before["pop3"] + 1
    assert httpx.get(url + "/livez").status_code == 200
    assert exporter.proc is not None and exporter.proc.poll() is None


# --------------------------------------------------------------------------- c. security


def test_logged_failures_lock_and_ban_unless_feed_security_is_off(mail, exporter_process,
                                                                   config_file, tmp_path):
    """Dovecot here calls no auth policy: the engine hears of logins only from its log."""
    config = {
        "security": {"admin_token_file": str(admin_token(tmp_path)), "trusted_networks": [],
                     "max_login_attempts": 3, "tarpit": {"enabled": False},
                     "auto_ban": {"threshold": 5}},
        "monitoring": {"logs": {"poll_interval": "200ms", "files": [
            {"name": "dovecot", "path": str(mail.dovecot.log_path), "format": "dovecot"}]}},
    }
    path = config_file(config)
    exporter = exporter_process(path)
    url, admin = exporter.url, {"authorization": f"Bearer {ADMIN_TOKEN}"}

    def api(what: str, **params: str) -> Any:
        response = httpx.get(f"{url}/api/v1/security/{what}", headers=admin, params=params)
        assert response.status_code == 200, response.text
        return response.json()

    attacker = next_loopback_ip()
    for n in range(3):
        assert "AUTHENTICATIONFAILED" in imap_login(mail.dovecot, ALICE, f"guess-{n}", attacker)
    locks = wait_until(lambda: api("lockouts")["lockouts"], 15, "the lockout")
    assert [(lock["account"], lock["source"], lock["scope"]) for lock in locks] == [
        (ALICE, f"{attacker}/32", "source_account")]
    assert api("blocklist")["bans"] == []
    for n in range(2):  # five distinct wrong passwords from one source: banned
        assert "AUTHENTICATIONFAILED" in imap_login(mail.dovecot, BOB, f"guess-{n}", attacker)
    bans = wait_until(lambda: api("blocklist")["bans"], 15, "the ban")
    assert [(ban["network"], ban["source"]) for ban in bans] == [(f"{attacker}/32",
                                                                   "automatic")]
    audit = api("audit", type="lockout.")["records"]
    assert [(r["type"], r["subject"]) for r in audit] == [("lockout.lock",
                                                           f"{ALICE}@{attacker}/32")]
    assert [r["type"] for r in api("audit", type="blocklist.")["records"]] == [
        "blocklist.ban"]
    failures = [r for r in api("audit", type="auth.failure")["records"]]
    assert len(failures) == 5 and all(r["details"]["protocol"] == "imap" for r in failures)
    text = scrape(url)
    assert value(text, "a3mailer_security_active_lockouts", scope="source_account") == 1
    assert value(text, "a3mailer_security_active_bans", source="automatic") == 1

    # the same file with feed_security off: counted, never reported
    config["monitoring"]["logs"]["files"][0]["feed_security"] = False
    reload(exporter, path, config)
    elsewhere = next_loopback_ip()
    before = value(scrape(url), "a3mailer_auth_events_total", source="dovecot",
                   service="imap", result="failure")
    for n in range(6):
        assert "AUTHENTICATIONFAILED" in imap_login(mail.dovecot, ALICE, f"other-{n}", elsewhere)
    wait_until(lambda: value(scrape(url), "a3mailer_auth_events_total", source="dovecot",
                             service="imap", result="failure") == before + 6, 15,
               "the failures counted from the log")
    assert [lock["source"] for lock in api("lockouts")["lockouts"]] == [f"{attacker}/32"]
    assert [ban["network"] for ban in api("blocklist")["bans"]] == [f"{attacker}/32"]
    assert len(api("audit", type="auth.failure")["records"]) == 5


def _authenticate_plain(server: Dovecot, user: str, password: str, source: str) -> str:
    """AUTHENTICATE PLAIN: unlike LOGIN, any user name (spaces, quotes, "<>") gets through."""
    imap = BoundIMAP4(server.host, server.imap_port, source)
    try:
        return imap.authenticate("PLAIN", lambda _: f"\0{user}\0{password}".encode())[0]
    except imaplib.IMAP4.error as exc:
        return str(exc)
    finally:
        with contextlib.suppress(imaplib.IMAP4.abort, OSError):
            imap.logout()


@pytest.mark.parametrize("elements", [
    "user=<%u> method=%m rip=%r lip=%l mpid=%e %c session=<%{session}>",  # the default
    "rip=%r lip=%l user=<%u> method=%m mpid=%e %c session=<%{session}>",
])
def test_a_user_name_never_sets_the_address_read_from_dovecots_log(elements, tmp_path):
    """Dovecot writes the client's user name unescaped inside <>: whatever the name holds,
    in either order of login_log_format_elements the address read is the client's and the
    login the whole name."""
    dovecot = Dovecot(tmp_path / "dovecot", dict(DEFAULT_MAIL_USERS), auth_failure_delay="0",
                      extra_config=NO_PENALTY + f"login_log_format_elements = {elements}\n")
    dovecot.start()
    try:
        names = ["x>, rip=10.9.9.9, lip=10.9.9.8, user=<victim", 'a", rip=10.9.9.9 "b>',
                 "y>, method=PLAIN, rip=10.9.9.9, session=<z"]
        sent = {}
        for name in names:
            source = next_loopback_ip()
            assert "AUTHENTICATIONFAILED" in _authenticate_plain(dovecot, name, "x", source)
            sent[(name, False)] = source
        source = next_loopback_ip()
        assert _authenticate_plain(dovecot, ALICE, DEFAULT_MAIL_USERS[ALICE], source) == "OK"
        sent[(ALICE, True)] = source

        def parsed() -> dict[tuple[str, bool], str]:
            events = [parse_dovecot(line) for line in dovecot.log().splitlines()]
            return {(e.login, e.success): e.remote_ip for e in events if isinstance(e, Auth)}

        wait_until(lambda: len(parsed()) == len(sent), 10, "the logins in Dovecot's log")
        assert parsed() == sent
        login = next(line for line in dovecot.log().splitlines() if "Login: " in line)
        assert login.split("Login: ")[1].startswith(elements.split("%")[0])  # the order used
    finally:
        dovecot.stop()
