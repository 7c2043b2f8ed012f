"""A real Postfix 3.7 asks our PostfixPolicyServer at RCPT time (check_policy_service).

The policy server runs in this test process, on its own event loop in a thread,
so the blocking smtplib clients and the Postfix wrapper stay plain. Loopback is
not trusted here: every client binds its own 127.0.0.x address.
"""

from __future__ import annotations

import asyncio
import smtplib
import threading
from collections.abc import Coroutine, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

import pytest

from security.engine import SecurityManager
from security.protocols.postfix import PostfixPolicyServer
from security.ratelimit import Limit
from security.settings import Settings
from security.store.memory import MemoryStore
from tests.integration.components import MailStack, next_loopback_ip, wait_until

pytestmark = pytest.mark.integration

T = TypeVar("T")
ALICE, BOB = "alice@example.test", "bob@example.test"
REJECT_TEXT = "Blocked by a3mailer security policy"
SEND_LIMIT = Limit(rate=1, window=3600, burst=1)  # two recipients at once, then one an hour


class PolicyThread:
    """A SecurityManager (memory store) and a PostfixPolicyServer on a loop in a thread."""

    def __init__(self, limits: Limit | None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="postfix-policy",
                                       daemon=True)
        self.thread.start()
        self.engine = SecurityManager(Settings(trusted_networks=(), reject_message=REJECT_TEXT),
                                      MemoryStore())
        # longer than any test: Postfix, not us, closes its idle policy connections
        self.server = PostfixPolicyServer(self.engine, limits, idle_timeout=600)
        self.call(self.engine.start(maintenance_interval=3600))
        self.host, self.port = self.call(self.server.start("127.0.0.1", 0))

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=15)

    def stop(self) -> None:
        try:
            self.call(self.server.stop())
            self.call(self.engine.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()


@pytest.fixture
def policy() -> Iterator[PolicyThread]:
    running = PolicyThread(SEND_LIMIT)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def stack(tmp_path: Path, policy: PolicyThread) -> Iterator[MailStack]:
    """The mail stack with our policy check on every recipient, for both smtpd services."""
    main = {"smtpd_recipient_restrictions":
            f"check_policy_service inet:{policy.host}:{policy.port}"}
    mail = MailStack.start(tmp_path / "mail", postfix_main=main)
    try:
        yield mail
    finally:
        mail.stop()


def message(sender: str, recipients: list[str], subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, ", ".join(recipients), subject
    msg.set_content("policy test body\n")
    return msg


def delivered(stack: MailStack, user: str, subject: str) -> bool:
    new = stack.dovecot.maildir(user) / "new"
    return new.is_dir() and any(f"Subject: {subject}" in path.read_text(errors="replace")
                                for path in new.iterdir())


def wait_delivered(stack: MailStack, user: str, subject: str) -> None:
    wait_until(lambda: delivered(stack, user, subject), 30, f"{subject!r} in {user}'s Maildir",
               interval=0.1)


def smtp(stack: MailStack, source: str, port: int | None = None) -> smtplib.SMTP:
    return smtplib.SMTP(stack.postfix.host, port or stack.postfix.smtp_port, timeout=15,
                        source_address=(source, 0))


def test_banned_client_is_rejected_at_rcpt_and_a_clean_one_delivers(
        stack: MailStack, policy: PolicyThread) -> None:
    banned, clean = next_loopback_ip(), next_loopback_ip()
    policy.call(policy.engine.ban(banned, "test", 3600))
    with smtp(stack, banned) as client, pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        client.send_message(message("sender@example.test", [ALICE], "from banned"))
    code, text = refused.value.recipients[ALICE]
    assert code == 554
    assert text.decode() == f"5.7.1 <{ALICE}>: Recipient address rejected: {REJECT_TEXT}"

    with smtp(stack, clean) as client:
        assert client.send_message(message("sender@example.test", [ALICE], "from clean")) == {}
    wait_delivered(stack, ALICE, "from clean")
    assert not delivered(stack, ALICE, "from banned")
    assert policy.server.stats.requests == {"dunno": 1.0, "reject": 1.0, "defer": 0.0}
    assert policy.server.stats.errors == {}
    log = stack.postfix.log()
    assert f"reject: RCPT from unknown[{banned}]: 554 5.7.1" in log
    assert REJECT_TEXT in log


def test_sasl_sender_over_its_rate_is_deferred_per_user(stack: MailStack,
                                                        policy: PolicyThread) -> None:
    port = stack.postfix.submission_port
    # two recipients fit (burst 1 + 1), from any address: the limit follows the user
    with smtp(stack, next_loopback_ip(), port) as client:
        client.login(BOB, stack.users[BOB])
        assert client.send_message(message(BOB, [ALICE], "bob one")) == {}
    with smtp(stack, next_loopback_ip(), port) as client:
        client.login(BOB, stack.users[BOB])
        assert client.send_message(message(BOB, [ALICE], "bob two")) == {}
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.send_message(message(BOB, [ALICE], "bob three"))
    code, text = refused.value.recipients[ALICE]
    assert code == 450
    assert text.decode().startswith(f"4.7.1 <{ALICE}>: Recipient address rejected: "
                                    "Sending rate limit exceeded (retry in ")
    # another user has a budget of her own
    with smtp(stack, next_loopback_ip(), port) as client:
        client.login(ALICE, stack.users[ALICE])
        assert client.send_message(message(ALICE, [BOB], "alice one")) == {}
    for user, subject in ((ALICE, "bob one"), (ALICE, "bob two"), (BOB, "alice one")):
        wait_delivered(stack, user, subject)
    assert not delivered(stack, ALICE, "bob three")
    assert policy.server.stats.requests == {"dunno": 3.0, "reject": 0.0, "defer": 1.0}
    assert f"sasl_username={BOB}" in stack.postfix.log()


def test_postfix_reuses_one_policy_connection_for_many_requests(
        stack: MailStack, policy: PolicyThread) -> None:
    with smtp(stack, next_loopback_ip()) as client:
        for n in range(3):
            subject = f"reuse {n}"
            assert client.send_message(message("sender@example.test", [ALICE, BOB],
                                               subject)) == {}
    for n in range(3):
        wait_delivered(stack, ALICE, f"reuse {n}")
        wait_delivered(stack, BOB, f"reuse {n}")
    stats = policy.server.stats
    assert stats.requests["dunno"] == 6  # one request per RCPT
    assert stats.connections == 1
    assert stats.active == 1  # still open, waiting for Postfix's next request


def test_the_exporter_process_serves_postfix_from_its_config(exporter_process, config_file,
                                                             tmp_path: Path) -> None:
    """End to end: security.postfix_policy in the YAML, a ban through the admin API."""
    import httpx

    from tests.exporter_process import free_port

    token = tmp_path / "admin.token"
    token.write_text("pf-admin-token-0123")
    port = free_port()
    exporter = exporter_process(config_file({"security": {
        "admin_token_file": str(token), "trusted_networks": [], "reject_message": REJECT_TEXT,
        "postfix_policy": {"enabled": True, "listen": f"127.0.0.1:{port}"}}}))
    banned, clean = next_loopback_ip(), next_loopback_ip()
    r = httpx.post(exporter.url + "/api/v1/security/blocklist", json={"network": banned},
                   headers={"authorization": "Bearer pf-admin-token-0123"})
    assert r.status_code == 201
    mail = MailStack.start(tmp_path / "mail", postfix_main={
        "smtpd_recipient_restrictions": f"check_policy_service inet:127.0.0.1:{port}"})
    try:
        with smtp(mail, banned) as client, pytest.raises(
                smtplib.SMTPRecipientsRefused) as refused:
            client.send_message(message("sender@example.test", [ALICE], "via exporter"))
        assert refused.value.recipients[ALICE][0] == 554
        with smtp(mail, clean) as client:
            assert client.send_message(message("sender@example.test", [ALICE], "ok")) == {}
        wait_delivered(mail, ALICE, "ok")
    finally:
        mail.stop()
    metrics = httpx.get(exporter.url + "/metrics").text
    assert 'a3mailer_security_postfix_requests_total{action="reject"} 1.0' in metrics
    assert 'a3mailer_security_postfix_requests_total{action="dunno"} 1.0' in metrics
