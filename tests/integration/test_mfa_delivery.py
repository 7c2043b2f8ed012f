"""One-time codes delivered for real: e-mail through Postfix (submission, STARTTLS, AUTH via
Dovecot) into Dovecot, read back over IMAP and verified; SMS through a local provider
webhook, with retries, the provider down, and the circuit breaker."""

from __future__ import annotations

import email
import json
import re
import socket
import time
import uuid
from collections.abc import Iterator
from email.policy import default as default_policy

import pytest

from security.mfa.delivery import DeliveryError
from security.mfa.email import EmailSender, SmtpRelay
from security.mfa.manager import MfaManager
from security.mfa.sealing import Sealer
from security.mfa.settings import MfaSettings
from security.mfa.sms import SmsProvider, SmsSender
from security.ratelimit import Limit
from security.store.memory import MemoryStore
from tests.integration.components import (
    LOOPBACK,
    BoundIMAP4,
    DribblingHTTPServer,
    MailStack,
    RecordedRequest,
    RecordingHTTPServer,
    next_loopback_ip,
    wait_until,
)
from tests.unit.test_http import serve  # noqa: F401 - the in-process app fixture
from tests.unit.test_mfa_totp import KEY, Clock

pytestmark = pytest.mark.integration

ALICE, BOB = "alice@example.test", "bob@example.test"
SETTINGS = MfaSettings(send_limit=Limit(100, 1.0, 100), verify_limit=Limit(100, 1.0, 100))


@pytest.fixture(scope="module")
def mail(tmp_path_factory) -> Iterator[MailStack]:
    stack = MailStack.start(tmp_path_factory.mktemp("mfa-mail"), tls=True)
    try:
        yield stack
    finally:
        stack.stop()


def relay(mail: MailStack, **changes) -> SmtpRelay:
    settings = {"host": LOOPBACK, "port": mail.postfix.submission_port, "tls": "starttls",
                "username": BOB, "password": mail.users[BOB],
                "ca_file": str(mail.dovecot.cert_path), "from_address": BOB,
                "subject": f"Login code {uuid.uuid4().hex[:8]}", "timeout": 15.0}
    return SmtpRelay(**{**settings, **changes})


def manager_with(sender, clock: Clock | None = None) -> MfaManager:
    return MfaManager(SETTINGS, MemoryStore(), Sealer(KEY), senders={sender.channel: sender},
                      clock=clock or Clock())


def read_code(mail: MailStack, user: str, subject: str) -> str:
    """Waits for the message with subject in user's INBOX and returns the code in it."""
    def fetch() -> str | None:
        imap = BoundIMAP4(mail.dovecot.host, mail.dovecot.imap_port, next_loopback_ip())
        try:
            imap.login(user, mail.users[user])
            imap.select("INBOX", readonly=True)
            _, data = imap.search(None, "SUBJECT", f'"{subject}"')
            for num in data[0].split():
                _, parts = imap.fetch(num, "(BODY.PEEK[])")
                message = email.message_from_bytes(parts[0][1], policy=default_policy)
                found = re.search(r"code is (\d{6})", message.get_content())
                if found:
                    assert message["From"] == BOB and message["Auto-Submitted"]
                    return found.group(1)
            return None
        finally:
            imap.logout()

    return wait_until(fetch, 30, f"the code message {subject!r} in {user}'s INBOX",
                      interval=0.2)


async def test_an_emailed_code_is_read_over_imap_and_verified(mail):
    smtp = relay(mail)
    clock = Clock()
    manager = manager_with(EmailSender(smtp), clock)
    answer = await manager.send_code(ALICE, "email", ALICE)
    assert answer == {"sent": True, "channel": "email", "expires_in": 600.0, "max_attempts": 5}
    code = read_code(mail, ALICE, smtp.subject)
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    miss = await manager.verify_code(ALICE, "email", wrong)
    assert miss.reason == "invalid" and miss.details["attempts_left"] == 4
    hit = await manager.verify_code(ALICE, "email", code)
    assert hit.valid and hit.method == "email"
    again = await manager.verify_code(ALICE, "email", code)
    assert not again.valid and again.reason == "no_code"  # single use
    assert manager.stats.deliveries == {("email", "sent"): 1}


async def test_an_emailed_code_expires(mail):
    smtp = relay(mail)
    clock = Clock()
    manager = manager_with(EmailSender(smtp), clock)
    await manager.send_code(ALICE, "email", ALICE)
    code = read_code(mail, ALICE, smtp.subject)
    clock.now += SETTINGS.code_lifetime
    assert (await manager.verify_code(ALICE, "email", code)).reason == "expired"


async def test_wrong_smtp_credentials_fail_and_leave_no_code(mail):
    manager = manager_with(EmailSender(relay(mail, password="wrong")))
    with pytest.raises(DeliveryError) as failed:
        await manager.send_code(ALICE, "email", ALICE)
    assert failed.value.reason == "failed" and "535" in str(failed.value)
    assert (await manager.verify_code(ALICE, "email", "000000")).reason == "no_code"
    assert manager.stats.deliveries == {("email", "failed"): 1}


async def test_the_relay_certificate_is_verified(mail):
    manager = manager_with(EmailSender(relay(mail, ca_file="")))  # system CAs only
    with pytest.raises(DeliveryError, match="CERTIFICATE_VERIFY_FAILED|certificate"):
        await manager.send_code(ALICE, "email", ALICE)


async def test_bad_addresses_are_refused_before_sending(mail):
    manager = manager_with(EmailSender(relay(mail)))
    for bad in ("no-at-sign", "a@b\r\nBcc: x@y", "a b@c.d"):
        with pytest.raises(DeliveryError) as refused:
            await manager.send_code(ALICE, "email", bad)
        assert refused.value.reason == "bad_destination"


def test_auth_without_tls_is_refused_except_to_loopback():
    with pytest.raises(ValueError, match="loopback"):
        EmailSender(SmtpRelay(host="smtp.example.org", tls="none", username="u"))
    EmailSender(SmtpRelay(host="127.0.0.1", tls="none", username="u"))


# --- SMS through a provider webhook


class Provider:
    """A local SMS provider: answers with the statuses given, then 200."""

    def __init__(self, *statuses: int):
        self.statuses = list(statuses)

    def __call__(self, request: RecordedRequest) -> tuple[int, str, bytes | str]:
        status = self.statuses.pop(0) if self.statuses else 200
        return status, "application/json", json.dumps({"status": status})


def sms_sender(url: str, **changes) -> SmsSender:
    settings = {"url": url, "auth_value": "Bearer provider-token", "retries": 2,
                "retry_backoff": 0.01, "failure_threshold": 2, "reset_timeout": 60.0,
                "timeout": 2.0}
    return SmsSender(SmsProvider(**{**settings, **changes}))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


async def test_an_sms_code_reaches_the_provider_with_auth_and_template():
    with RecordingHTTPServer(Provider()) as provider:
        manager = manager_with(sms_sender(provider.url + "/send"))
        await manager.send_code("carol", "sms", "+4915112345678")
        request = provider.wait_for_request()
        assert request.method == "POST" and request.path == "/send"
        assert request.headers["authorization"] == "Bearer provider-token"
        assert request.headers["content-type"] == "application/json"
        body = request.json()
        assert body["to"] == "+4915112345678"
        code = re.search(r"code is (\d{6})", body["text"]).group(1)
        assert (await manager.verify_code("carol", "sms", code)).valid


async def test_a_send_that_sends_nothing_keeps_the_code_already_delivered():
    """A bad number is refused before the rate limit and before a new code is made; a
    delivery that fails puts back the code the user already has, with its attempts."""
    with RecordingHTTPServer(Provider(200, 500, 500, 500)) as provider:
        manager = manager_with(sms_sender(provider.url, failure_threshold=5))
        manager.settings = MfaSettings(send_limit=Limit(1, 30.0, 2),
                                       verify_limit=SETTINGS.verify_limit)
        await manager.send_code("mona", "sms", "+4915112345678")
        code = re.search(r"code is (\d{6})", provider.wait_for_request().json()["text"])[1]
        assert (await manager.verify_code("mona", "sms", f"{(int(code) + 1) % 10**6:06d}")
                ).reason == "invalid"  # one attempt used
        for _ in range(3):
            with pytest.raises(DeliveryError) as refused:
                await manager.send_code("mona", "sms", "0151")
            assert refused.value.reason == "bad_destination"
        with pytest.raises(DeliveryError) as failed:  # the burst's second send: provider 500s
            await manager.send_code("mona", "sms", "+4915112345678")
        assert failed.value.reason == "failed"
        check = await manager.codes.check("mona", "sms", "000000" if code != "000000"
                                          else "111111", manager.clock())
        assert check.attempts_left == manager.settings.code_max_attempts - 2  # kept: 1 + this
        assert (await manager.verify_code("mona", "sms", code)).valid


async def test_one_wrong_code_against_each_new_code_reaches_the_lock():
    """Failures count distinct per issued code: the same guess sent against every new
    code is a new guess each time (it never locked before)."""
    with RecordingHTTPServer(Provider()) as provider:
        clock = Clock()
        manager = MfaManager(MfaSettings(send_limit=Limit(100, 1.0, 100),
                                         verify_limit=Limit(100, 1.0, 100), max_failures=3),
                             MemoryStore(), Sealer(KEY),
                             senders={"sms": sms_sender(provider.url)}, clock=clock)
        reasons = []
        for _ in range(4):
            await manager.send_code("nick", "sms", "+4915112345678")
            code = re.search(r"code is (\d{6})", provider.snapshot()[-1].json()["text"])[1]
            guess = "000000" if code != "000000" else "111111"
            reasons.append((await manager.verify_code("nick", "sms", guess)).reason)
            clock.now += 1
        assert reasons == ["invalid", "invalid", "invalid", "locked"]


async def test_sms_retries_5xx_and_429_then_delivers():
    with RecordingHTTPServer(Provider(503, 429)) as provider:
        manager = manager_with(sms_sender(provider.url))
        await manager.send_code("carol", "sms", "+4915112345678")
        assert len(provider.snapshot()) == 3
        assert manager.senders["sms"].breaker.state == "closed"


async def test_a_provider_refusal_is_not_retried_nor_held_against_it():
    with RecordingHTTPServer(Provider(400, 400, 400)) as provider:
        manager = manager_with(sms_sender(provider.url, failure_threshold=1))
        for _ in range(2):
            with pytest.raises(DeliveryError) as refused:
                await manager.send_code("carol", "sms", "+4915112345678")
            assert refused.value.reason == "rejected"
        assert len(provider.snapshot()) == 2
        assert manager.senders["sms"].breaker.state == "closed"


async def test_the_provider_down_opens_the_circuit_and_a_trial_closes_it():
    port = closed_port()
    sender = sms_sender(f"http://{LOOPBACK}:{port}/send")
    manager = manager_with(sender)
    for _ in range(2):  # failure_threshold sends, each after its retries
        with pytest.raises(DeliveryError) as down:
            await manager.send_code("dave", "sms", "+4915112345678")
        assert down.value.reason == "failed" and "3 tries" in str(down.value)
    assert sender.breaker.state == "open"
    with pytest.raises(DeliveryError) as fast:
        await manager.send_code("dave", "sms", "+4915112345678")
    assert fast.value.reason == "circuit_open"
    assert (await manager.verify_code("dave", "sms", "123456")).reason == "no_code"
    assert manager.stats.deliveries == {("sms", "failed"): 2, ("sms", "circuit_open"): 1}
    # the provider comes back; after reset_timeout one trial send closes the circuit
    with RecordingHTTPServer(Provider()) as provider:
        sender.provider = SmsProvider(**{**sender.provider.__dict__, "url": provider.url})
        sender.breaker.opened_at -= 61
        assert sender.breaker.state == "half_open"
        await manager.send_code("dave", "sms", "+4915112345678")
        assert sender.breaker.state == "closed" and len(provider.snapshot()) == 1


async def test_a_provider_that_dribbles_its_answer_is_cut_off_at_the_timeout():
    """A header line every 0.1s keeps each read within the 0.5s timeout; the timeout
    bounds the whole POST, so the send fails at 0.5s, not after the provider's whim."""
    with DribblingHTTPServer(gap=0.1) as provider:
        sender = sms_sender(provider.url, timeout=0.5, retries=0)
        start = time.monotonic()
        with pytest.raises(DeliveryError) as failed:
            await sender.send("+4915112345678", "123456", 600)
        assert time.monotonic() - start < 1.0
    assert failed.value.reason == "failed" and "TimeoutError" in str(failed.value)


async def test_a_provider_answering_outside_http_is_a_failed_send():
    """More than http.client's 100 header lines (or a bad status line) is an
    HTTPException, which is not an OSError: a failed send, counted by the breaker."""
    with DribblingHTTPServer(gap=0.001) as provider:
        sender = sms_sender(provider.url, retries=0, failure_threshold=1)
        with pytest.raises(DeliveryError) as failed:
            await sender.send("+4915112345678", "123456", 600)
    assert failed.value.reason == "failed" and "got more than 100 headers" in str(failed.value)
    assert sender.breaker.state == "open"


async def test_form_encoded_bodies_escape_the_values():
    with RecordingHTTPServer(Provider()) as provider:
        sender = sms_sender(provider.url, content_type="application/x-www-form-urlencoded",
                            body_template="to=$phone&msg=$message")
        await manager_with(sender).send_code("erin", "sms", "+4915112345678")
        body = provider.wait_for_request().body.decode()
        assert body.startswith("to=%2B4915112345678&msg=Your+login+code+is+")


async def test_bad_phone_numbers_are_refused():
    sender = sms_sender("http://127.0.0.1:9/")
    for bad in ("12345", "+0123456789", "+49 151 1234", "+" + "1" * 16):
        with pytest.raises(DeliveryError) as refused:
            await sender.send(bad, "123456", 600)
        assert refused.value.reason == "bad_destination"


# --- the same through the exporter's API, configured from YAML


async def test_codes_through_the_api_as_configured(mail, serve, tmp_path):  # noqa: F811
    from tests.unit.test_http import ADMIN
    from tests.unit.test_mfa_routes import mfa_config

    password, auth = tmp_path / "smtp.password", tmp_path / "sms.auth"
    password.write_text(mail.users[BOB] + "\n")
    auth.write_text("Bearer from-a-file\n")
    subject = f"API code {uuid.uuid4().hex[:8]}"
    with RecordingHTTPServer(Provider()) as provider:
        _, client = await serve(mfa_config(
            tmp_path,
            email={"enabled": True, "smtp_host": LOOPBACK,
                   "smtp_port": mail.postfix.submission_port, "username": BOB,
                   "password_file": str(password), "ca_file": str(mail.dovecot.cert_path),
                   "from_address": BOB, "subject": subject},
            sms={"enabled": True, "url": provider.url, "auth_value_file": str(auth)}))
        r = await client.post("/api/v1/mfa/email/send", json={"user": ALICE, "address": ALICE},
                              headers=ADMIN)
        assert r.status_code == 202 and r.json()["sent"] is True
        code = read_code(mail, ALICE, subject)
        r = await client.post("/api/v1/mfa/email/verify", json={"user": ALICE, "code": code},
                              headers=ADMIN)
        assert r.json() == {"valid": True, "method": "email", "reason": "ok"}
        r = await client.post("/api/v1/mfa/sms/send", json={"user": ALICE,
                                                             "phone": "+4915112345678"},
                              headers=ADMIN)
        assert r.status_code == 202
        request = provider.wait_for_request()
        assert request.headers["authorization"] == "Bearer from-a-file"
        sms_code = re.search(r"code is (\d{6})", request.json()["text"]).group(1)
        r = await client.post("/api/v1/mfa/sms/verify", json={"user": ALICE, "code": sms_code},
                              headers=ADMIN)
        assert r.json()["valid"] is True
        r = await client.post("/api/v1/mfa/sms/send", json={"user": ALICE, "phone": "12"},
                              headers=ADMIN)
        assert r.status_code == 400 and r.json()["error"] == "bad_request"
        metrics = (await client.get("/metrics")).text
        assert 'a3mailer_mfa_code_deliveries_total{channel="email",result="sent"} 1.0' in metrics
        assert "a3mailer_mfa_sms_circuit_open 0.0" in metrics
        assert code not in metrics and ALICE not in metrics


async def test_one_destination_gets_at_most_destination_rate_codes_whatever_the_user(
        serve, tmp_path):  # noqa: F811
    """SMS pumping: one number asked for under many user names (each within its own resend
    limit) gets destination_rate codes per destination_window, then the same 429 as a
    resend; the limiter holds a keyed hash, never the number."""
    from tests.unit.test_http import ADMIN, metric_value
    from tests.unit.test_mfa_routes import mfa_config

    auth = tmp_path / "sms.auth"
    auth.write_text("Bearer from-a-file\n")
    victim, other = "+4915112345678", "+4915187654321"
    with RecordingHTTPServer(Provider()) as provider:
        exporter, client = await serve(mfa_config(
            tmp_path, codes={"destination_rate": 3, "destination_window": "1h"},
            sms={"enabled": True, "url": provider.url, "auth_value_file": str(auth)}))

        async def send(user: str, phone: str):
            return await client.post("/api/v1/mfa/sms/send",
                                     json={"user": user, "phone": phone}, headers=ADMIN)

        assert [(await send(f"user{n}", victim)).status_code for n in range(3)] == [202] * 3
        refused = await send("user3", victim)
        assert refused.status_code == 429 and refused.json()["error"] == "rate_limited"
        assert 1150 <= int(refused.headers["retry-after"]) <= 1200  # one send per 20 min
        assert (await send("user3", other)).status_code == 202  # the user is not refused
        assert (await send("user4", victim)).status_code == 429
        assert [json.loads(r.body)["to"] for r in provider.requests] == [victim] * 3 + [other]
        metrics = (await client.get("/metrics")).text
        assert metric_value(metrics, "a3mailer_mfa_code_deliveries_total", channel="sms",
                            result="destination_limited") == 2
        assert metric_value(metrics, "a3mailer_mfa_code_deliveries_total", channel="sms",
                            result="sent") == 4
        assert victim[1:] not in metrics
        state = repr(exporter.mfa.limiter._tats)
        assert victim[1:] not in state and other[1:] not in state
        assert sum(klass == "send-destination:sms" for klass, _ in exporter.mfa.limiter._tats) == 2
