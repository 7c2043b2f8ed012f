"""Delivery round trip: send a tagged message through submission, wait for it in IMAP.

Each scheduled run:
  login    IMAP connect, (STARTTLS,) LOGIN, SELECT the mailbox - before sending, so
           the login does not count towards the round trip
  cleanup  delete round-trip messages of earlier runs that arrived late (their tokens
           are remembered for cleanup_window) and any older than cleanup_window
           (left by a restarted or vanished exporter)
  submit   SMTP connect, EHLO, STARTTLS, AUTH, MAIL/RCPT/DATA with a unique token in
           the X-A3Mailer-Roundtrip header
  deliver  from the server's 250 to DATA until an IMAP search finds the token (the
           round trip: the seconds the mail system took to deliver), polled every
           poll_interval with NOOP + UID SEARCH
  then the message is deleted (UID EXPUNGE when the server has UIDPLUS). A message
  that has not arrived within `timeout` (counted from the start of the run) fails the
  run; its token stays pending and a later run deletes it when it shows up. Use a
  dedicated account: without UIDPLUS, EXPUNGE removes every message flagged \\Deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.policy
import re
import secrets
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

from exporter import tracing
from exporter.instruments import HistogramVec
from exporter.probes import imap, smtp, tlsinfo
from exporter.probes.session import (
    CertificateNotVerified,
    ProbeFailed,
    Session,
    explain,
)
from exporter.probes.target import (
    DEFAULT_PORTS,
    ProbeResult,
    Target,
    duration_seconds,
    host_name,
    read_credentials,
)

HEADER = "X-A3Mailer-Roundtrip"
ROUNDTRIP_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)
FINISH_GRACE = 5.0  # seconds for delete + LOGOUT after the message arrived
MAX_SWEEP = 500  # round-trip messages examined per cleanup
_TOKEN = re.compile(r"^(\d{10,16})\.([0-9a-f]{16})$")
_FETCH_UID = re.compile(r"\bUID (\d+)", re.IGNORECASE)
_FETCH_TOKEN = re.compile(HEADER + r":\s*(\S+)", re.IGNORECASE)
_ADDRESS = re.compile(r"^[^\s<>@]+@[^\s<>@]+$")

# The defaults of monitoring.delivery; they must equal the schema's (a unit test compares
# them once the schema has the section).
DELIVERY_DEFAULTS: dict[str, Any] = {
    "enabled": False,
    "submission": {"host": "localhost", "port": 587, "tls": "starttls", "server_name": ""},
    "imap": {"host": "localhost", "port": 993, "tls": "implicit", "server_name": ""},
    "mailbox": "INBOX",
    "credentials_file": "",
    "imap_credentials_file": "",
    "from_address": "",
    "to_address": "",
    "interval": "5m",
    "timeout": "2m",
    "poll_interval": "1s",
    "cleanup_window": "24h",
    "insecure_skip_verify": False,
    "ca_file": "",
}


def required_problems(section: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(key, problem) for each required key of monitoring.delivery missing or malformed:
    all of them, so a config check names every one at once."""
    values = {**DELIVERY_DEFAULTS, **section}
    found = [(key, "is required when enabled") for key in
             ("credentials_file", "from_address", "to_address") if not values[key]]
    found += [(key, "is not an e-mail address") for key in ("from_address", "to_address")
              if values[key] and not _ADDRESS.match(str(values[key]))]
    return found


@dataclass(frozen=True)
class DeliverySettings:
    submission: Target
    imap: Target
    mailbox: str
    credentials_file: str
    imap_credentials_file: str  # empty: credentials_file
    from_address: str
    to_address: str
    interval: float
    timeout: float
    poll_interval: float
    cleanup_window: float

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> DeliverySettings:
        """Settings from monitoring.delivery (defaults filled in); ValueError on bad values."""
        values = {**DELIVERY_DEFAULTS, **section}
        for key, problem in required_problems(values):
            raise ValueError(f"monitoring.delivery.{key} {problem}")
        timeout = duration_seconds(values["timeout"])

        def endpoint(kind: str, protocol: str) -> Target:
            spec = {**DELIVERY_DEFAULTS[kind], **values[kind]}
            if spec["tls"] not in ("none", "starttls", "implicit"):
                raise ValueError(f"monitoring.delivery.{kind}.tls: none, starttls or implicit")
            return Target(
                name=f"delivery-{kind}", protocol=protocol, host=host_name(spec["host"]),
                port=int(spec["port"]) or DEFAULT_PORTS[(protocol, spec["tls"])],
                tls=spec["tls"], timeout=timeout, interval=duration_seconds(values["interval"]),
                insecure_skip_verify=bool(values["insecure_skip_verify"]),
                ca_file=str(values["ca_file"]), server_name=str(spec["server_name"]))

        return cls(
            submission=endpoint("submission", "smtp"), imap=endpoint("imap", "imap"),
            mailbox=str(values["mailbox"]), credentials_file=str(values["credentials_file"]),
            imap_credentials_file=str(values["imap_credentials_file"]),
            from_address=str(values["from_address"]), to_address=str(values["to_address"]),
            interval=duration_seconds(values["interval"]), timeout=timeout,
            poll_interval=duration_seconds(values["poll_interval"]),
            cleanup_window=duration_seconds(values["cleanup_window"]))


def new_token(now: float | None = None) -> str:
    """Milliseconds since the epoch (so any later run can tell its age) and 64 random bits."""
    millis = int((time.time() if now is None else now) * 1000)
    return f"{millis}.{secrets.token_hex(8)}"


def token_time(token: str) -> float | None:
    """The Unix time a token was made, or None when it is not one of ours."""
    match = _TOKEN.match(token)
    return int(match.group(1)) / 1000.0 if match else None


def message_bytes(from_address: str, to_address: str, token: str) -> bytes:
    """The DATA payload: CRLF lines, dot-stuffed, ending with the lone dot."""
    msg = EmailMessage()
    msg["From"] = from_address
    msg["To"] = to_address
    msg["Subject"] = "a3mailer-exporter delivery round trip"
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = make_msgid("roundtrip", domain=from_address.rpartition("@")[2])
    msg["Auto-Submitted"] = "auto-generated"
    msg[HEADER] = token
    msg.set_content("This message measures mail delivery time for a3mailer-exporter.\n"
                    "It is deleted as soon as it arrives.\n")
    data = msg.as_bytes(policy=email.policy.SMTP)
    lines = [b"." + line if line.startswith(b".") else line for line in data.split(b"\r\n")]
    body = b"\r\n".join(lines)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body + b".\r\n"


def parse_search(untagged: list[str]) -> list[int]:
    """UIDs from '* SEARCH 3 7' lines (given without '* ')."""
    uids: list[int] = []
    for line in untagged:
        words = line.split()
        if words and words[0].upper() == "SEARCH":
            uids += [int(w) for w in words[1:] if w.isdigit()]
    return uids


def parse_fetch_tokens(untagged: list[str]) -> dict[int, str]:
    """UID -> round-trip token from FETCH responses of BODY.PEEK[HEADER.FIELDS (...)]."""
    tokens = {}
    for line in untagged:
        uid, token = _FETCH_UID.search(line), _FETCH_TOKEN.search(line)
        if " FETCH " in line.upper() and uid and token:
            tokens[int(uid.group(1))] = token.group(1)
    return tokens


def _uid_set(uids: list[int]) -> str:
    return ",".join(str(u) for u in sorted(uids))


@contextlib.contextmanager
def _timed(result: ProbeResult, phase: str) -> Iterator[None]:
    result.phase = phase
    start = time.perf_counter()
    try:
        with tracing.phase(f"delivery {phase}", phase):
            yield
    finally:
        result.phases[phase] = result.phases.get(phase, 0.0) + time.perf_counter() - start


class DeliveryRoundtrip:
    """The round-trip engine: runs scheduled by a Periodic; keeps tokens and the histogram."""

    def __init__(self, settings: DeliverySettings):
        self.settings = settings
        self.pending: dict[str, float] = {}  # token -> Unix time sent, not arrived yet
        self.roundtrips = HistogramVec("a3mailer_delivery_roundtrip_seconds", ROUNDTRIP_BUCKETS)
        self.deleted_late = 0  # late arrivals deleted since start

    @property
    def schedule_timeout(self) -> float:
        """The Periodic's bound: the run's own timeout plus the grace to finish up."""
        return self.settings.timeout + FINISH_GRACE + 5.0

    def _session(self, target: Target) -> Session:
        """A session on a throwaway result: its per-connection phases are not exported."""
        if target.tls == "none":
            return Session(target, ProbeResult())
        if target.insecure_skip_verify:
            return Session(target, ProbeResult(), tlsinfo.unverified_context())
        return Session(target, ProbeResult(), tlsinfo.verifying_context(target.ca_file),
                       verifying=True)

    async def run(self) -> ProbeResult:
        """One round trip; never raises (the reason says what failed)."""
        s = self.settings
        result = ProbeResult()
        start = time.perf_counter()
        endpoint = s.imap
        mailbox: Session | None = None
        submission: Session | None = None
        try:
            try:
                smtp_credentials = read_credentials(s.credentials_file)
                imap_credentials = read_credentials(s.imap_credentials_file
                                                    or s.credentials_file)
            except ValueError as exc:
                raise ProbeFailed(str(exc)) from None
            async with asyncio.timeout(s.timeout):
                with _timed(result, "login"):
                    mailbox = self._session(s.imap)
                    await mailbox.connect()
                    client = await imap.open_session(mailbox, s.imap, imap_credentials)
                    await client.select(s.mailbox)
                with _timed(result, "cleanup"):
                    await self._sweep(client, result)
                token = new_token()
                sent_at = time.time()
                endpoint = s.submission
                with _timed(result, "submit"):
                    submission = self._session(s.submission)
                    await submission.connect()
                    sender = await smtp.open_session(submission, s.submission, smtp_credentials)
                    reply = await self._submit(sender, token)
                    accepted = time.perf_counter()
                    # awaited only once the server took it: a refused message never comes
                    self.pending[token] = sent_at
                    result.details["queued_as"] = str(reply)
                    await sender.quit()
                    await submission.close()
                endpoint = s.imap
                result.phase = "deliver"
                uids = await self._wait_for(client, token)
                seconds = time.perf_counter() - accepted
                result.phases["deliver"] = seconds
            result.success = True
            result.details["roundtrip_seconds"] = seconds
            self.roundtrips.observe((), seconds)
            try:
                async with asyncio.timeout(FINISH_GRACE):
                    with _timed(result, "cleanup"):
                        await self._delete(client, uids)
                    self.pending.pop(token, None)
                    await client.logout()
                    await mailbox.close()
            except Exception as exc:  # arrived in time: a failed delete is noted, not failed
                result.details["cleanup_error"] = explain(exc, s.imap, result.phase)
        except TimeoutError:
            if result.phase == "deliver":
                result.reason = (f"message not delivered within {s.timeout:g}s; it is deleted "
                                 "if it arrives later")
            else:
                result.reason = f"timed out after {s.timeout:g}s during {result.phase}"
        except CertificateNotVerified as exc:
            result.reason = (f"{endpoint.name}: TLS certificate not verified: {exc} "
                             "(set ca_file, or insecure_skip_verify)")
        except Exception as exc:
            where = result.phase
            result.reason = f"{endpoint.name} ({where}): {explain(exc, endpoint, '')}"
        finally:
            for session in (mailbox, submission):
                if session is not None:
                    session.abort()
            await asyncio.sleep(0)  # let the transports close their sockets
        result.details["pending_messages"] = len(self.pending)
        result.phases["total"] = time.perf_counter() - start
        return result

    async def _submit(self, client: smtp.SMTPClient, token: str) -> smtp.Reply:
        s = self.settings
        for command, accepted in ((f"MAIL FROM:<{s.from_address}>", (250,)),
                                  (f"RCPT TO:<{s.to_address}>", (250, 251)),
                                  ("DATA", (354,))):
            reply = await client.command(command)
            if reply.code not in accepted:
                raise ProbeFailed(f"{command.split(':')[0]} refused: {reply}")
        await client.session.send(message_bytes(s.from_address, s.to_address, token))
        reply = await smtp.read_reply(client.session)
        if reply.code != 250:
            raise ProbeFailed(f"message refused: {reply}")
        return reply

    async def _wait_for(self, client: imap.IMAPClient, token: str) -> list[int]:
        """Polls until the token's message is in the mailbox; the run's timeout bounds it."""
        while True:
            await client.expect_ok("NOOP", "NOOP")
            found = await client.expect_ok(f'UID SEARCH HEADER {HEADER} "{token}"', "SEARCH")
            uids = parse_search(found.untagged)
            if uids:
                return uids
            await asyncio.sleep(self.settings.poll_interval)

    async def _delete(self, client: imap.IMAPClient, uids: list[int]) -> None:
        uid_set = _uid_set(uids)
        await client.expect_ok(f"UID STORE {uid_set} +FLAGS.SILENT (\\Deleted)", "STORE")
        if "UIDPLUS" in client.capabilities:
            await client.expect_ok(f"UID EXPUNGE {uid_set}", "UID EXPUNGE")
        else:
            await client.expect_ok("EXPUNGE", "EXPUNGE")

    async def _sweep(self, client: imap.IMAPClient, result: ProbeResult) -> None:
        """Deletes late arrivals of earlier runs and round-trip messages past cleanup_window."""
        now, window = time.time(), self.settings.cleanup_window
        for token, sent_at in list(self.pending.items()):
            if now - sent_at > window:
                del self.pending[token]
        found = await client.expect_ok(f'UID SEARCH HEADER {HEADER} ""', "SEARCH")
        uids = parse_search(found.untagged)[:MAX_SWEEP]
        tokens: dict[int, str] = {}
        if uids:
            fetched = await client.expect_ok(
                f"UID FETCH {_uid_set(uids)} (UID BODY.PEEK[HEADER.FIELDS ({HEADER})])", "FETCH")
            tokens = parse_fetch_tokens(fetched.untagged)
        late = [uid for uid, token in tokens.items() if token in self.pending]
        stale = [uid for uid, token in tokens.items() if token not in self.pending
                 and (sent := token_time(token)) is not None and now - sent > window]
        if late or stale:
            await self._delete(client, late + stale)
            for uid in late:
                self.pending.pop(tokens[uid], None)
            self.deleted_late += len(late)
        result.details["deleted_late"] = len(late)
        result.details["deleted_stale"] = len(stale)
