"""E-mail one-time codes through an SMTP relay (STARTTLS or implicit TLS, AUTH).

smtplib runs in a worker thread. The relay's certificate is verified (against `ca_file`
when set, else the system CAs); AUTH is only sent over TLS, unless tls is "none" and the
relay is on loopback.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from security.mfa.delivery import DeliveryError, check_template, fill

_ADDRESS = re.compile(r"[^@\s<>\"',;]{1,64}@[A-Za-z0-9.-]{1,253}")


@dataclass(frozen=True)
class SmtpRelay:
    host: str = "127.0.0.1"
    port: int = 587
    tls: str = "starttls"  # starttls | implicit | none
    username: str = ""
    password: str | None = None
    ca_file: str = ""
    from_address: str = "no-reply@localhost"
    subject: str = "Your login code"
    body: str = "Your login code is $code. It expires in $minutes minutes."
    timeout: float = 10.0


class EmailSender:
    channel = "email"

    def __init__(self, relay: SmtpRelay):
        check_template(relay.body, "security.mfa.email.body_template")
        if relay.username and relay.tls == "none" and not _loopback(relay.host):
            raise ValueError("security.mfa.email: AUTH without TLS is only allowed to loopback")
        self.relay = relay

    def _context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.relay.ca_file or None)

    def check(self, destination: str) -> None:
        if not _ADDRESS.fullmatch(destination):
            raise DeliveryError("bad_destination", "not an e-mail address")

    async def send(self, destination: str, code: str, lifetime: float) -> None:
        self.check(destination)
        message = EmailMessage()
        message["From"] = self.relay.from_address
        message["To"] = destination
        message["Subject"] = fill(self.relay.subject, code, lifetime)
        message["Date"] = formatdate(localtime=False)
        message["Message-ID"] = make_msgid(domain=self.relay.from_address.rpartition("@")[2]
                                           or None)
        message["Auto-Submitted"] = "auto-generated"
        message.set_content(fill(self.relay.body, code, lifetime))
        try:
            await asyncio.to_thread(self._submit, message)
        except (smtplib.SMTPException, OSError, ssl.SSLError) as exc:
            # the text names the relay's answer, never the message
            raise DeliveryError("failed", f"SMTP relay {self.relay.host}:{self.relay.port}: "
                                          f"{type(exc).__name__}: {_brief(exc)}") from None

    def _submit(self, message: EmailMessage) -> None:
        relay = self.relay
        smtp: smtplib.SMTP
        if relay.tls == "implicit":
            smtp = smtplib.SMTP_SSL(relay.host, relay.port, timeout=relay.timeout,
                                    context=self._context())
        else:
            smtp = smtplib.SMTP(relay.host, relay.port, timeout=relay.timeout)
        with smtp:
            smtp.ehlo()
            if relay.tls == "starttls":
                smtp.starttls(context=self._context())
                smtp.ehlo()
            if relay.username:
                smtp.login(relay.username, relay.password or "")
            smtp.send_message(message)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _brief(exc: Exception) -> str:
    if isinstance(exc, smtplib.SMTPResponseException):
        text = exc.smtp_error.decode("utf-8", "replace") if isinstance(
            exc.smtp_error, bytes) else str(exc.smtp_error)
        return f"{exc.smtp_code} {text}"[:200]
    return str(exc)[:200]
