"""IMAP probe (RFC 3501/9051): 143 with STARTTLS, 993 with implicit TLS.

Reads the greeting, asks CAPABILITY, upgrades with STARTTLS (and asks again), then
with credentials LOGIN and SELECT INBOX, and LOGOUT. Responses are parsed by tag,
with literals ({n}) read by length. `IMAPClient` is reused by the delivery round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass, field

from exporter.probes.session import ProbeFailed, Session, run_probe
from exporter.probes.target import Credentials, ProbeResult, Target

MAX_UNTAGGED = 10_000  # untagged lines accepted for one command
MAX_LITERAL = 1024 * 1024
# bytes one response (a greeting, or a command's lines and literals) may hold: literal
# after literal, each within MAX_LITERAL, once took a probe to 2 GB
MAX_RESPONSE = 4 * 1024 * 1024
LOGOUT_GRACE = 2.0
_LITERAL = re.compile(r"\{(\d+)\+?\}$")
_EXISTS = re.compile(r"^\* (\d+) EXISTS$", re.IGNORECASE)


@dataclass
class Response:
    status: str  # OK, NO or BAD
    text: str
    untagged: list[str] = field(default_factory=list)  # without the leading "* "

    def __str__(self) -> str:
        return f"{self.status} {self.text}".strip()[:300]


def parse_greeting(line: str) -> tuple[str, str]:
    """'* OK [CAPABILITY ...] ready' -> ('OK', '[CAPABILITY ...] ready'); also PREAUTH, BYE."""
    kind, _, text = line[2:].partition(" ") if line.startswith("* ") else ("", "", "")
    kind = kind.upper()
    if kind not in ("OK", "PREAUTH", "BYE"):
        raise ProbeFailed(f"not an IMAP greeting: {line[:100]!r}")
    return kind, text


def parse_tagged(line: str, tag: str) -> tuple[str, str] | None:
    """The (status, text) of `tag`'s completion line; None for an untagged line; anything
    else (another tag, garbage) fails the probe."""
    if line.startswith("* "):
        return None
    head, _, rest = line.partition(" ")
    if head != tag:
        raise ProbeFailed(f"unexpected IMAP response: {line[:100]!r}")
    status, _, text = rest.partition(" ")
    status = status.upper()
    if status not in ("OK", "NO", "BAD"):
        raise ProbeFailed(f"bad IMAP completion: {line[:100]!r}")
    return status, text


def parse_capabilities(untagged: list[str]) -> set[str]:
    """Capability names (upper case) from '* CAPABILITY ...' lines (given without '* ')."""
    caps: set[str] = set()
    for line in untagged:
        words = line.split()
        if words and words[0].upper() == "CAPABILITY":
            caps.update(word.upper() for word in words[1:])
    return caps


def quote(value: str) -> str:
    """An IMAP quoted string; LOGIN takes ASCII only (literals would need a round trip)."""
    if not value.isascii() or any(c in value for c in "\r\n\0"):
        raise ProbeFailed("IMAP LOGIN needs credentials in printable ASCII")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class IMAPClient:
    """The client side of one IMAP session, over a connected Session."""

    def __init__(self, session: Session):
        self.session = session
        self.capabilities: set[str] = set()
        self.greeting_kind = ""
        self._tags = 0
        self._left = MAX_RESPONSE  # of the response being read

    def _spend(self, size: int) -> None:
        self._left -= size
        if self._left < 0:
            raise ProbeFailed(f"IMAP response larger than {MAX_RESPONSE} bytes")

    async def read_line(self) -> str:
        """One response line with any literals joined in (as CRLF-separated text)."""
        line = await self.session.readline()
        self._spend(len(line))
        parts = [line]
        while match := _LITERAL.search(line):
            size = int(match.group(1))
            if size > MAX_LITERAL:
                raise ProbeFailed(f"IMAP literal of {size} bytes is too large")
            self._spend(size)
            parts.append((await self.session.read_exactly(size)).decode("utf-8", "replace"))
            line = await self.session.readline()
            self._spend(len(line))
            parts.append(line)
        return "\r\n".join(parts)

    async def greeting(self) -> str:
        self._left = MAX_RESPONSE
        with self.session.timed("banner"):
            kind, text = parse_greeting(await self.read_line())
        if kind == "BYE":
            raise ProbeFailed(f"server refused the session: BYE {text}"[:300])
        self.greeting_kind = kind
        return text

    async def command(self, text: str) -> Response:
        self._tags += 1
        tag = f"a{self._tags}"
        await self.session.send(f"{tag} {text}\r\n".encode())
        self._left = MAX_RESPONSE
        untagged: list[str] = []
        for _ in range(MAX_UNTAGGED):
            line = await self.read_line()
            if line.startswith("+"):
                raise ProbeFailed("IMAP server asked for a continuation it was not offered")
            completion = parse_tagged(line, tag)
            if completion is not None:
                return Response(completion[0], completion[1], untagged)
            untagged.append(line[2:])
        raise ProbeFailed(f"more than {MAX_UNTAGGED} untagged IMAP responses")

    async def expect_ok(self, text: str, what: str) -> Response:
        response = await self.command(text)
        if response.status != "OK":
            raise ProbeFailed(f"{what} failed: {response}")
        return response

    async def capability(self) -> set[str]:
        self.session.step("capability")
        response = await self.expect_ok("CAPABILITY", "CAPABILITY")
        self.capabilities = parse_capabilities(response.untagged)
        return self.capabilities

    async def starttls(self) -> None:
        if "STARTTLS" not in self.capabilities:
            raise ProbeFailed("server does not offer STARTTLS")
        with self.session.timed("tls"):
            await self.expect_ok("STARTTLS", "STARTTLS")
        await self.session.upgrade()
        await self.capability()

    async def login(self, credentials: Credentials) -> None:
        """LOGIN; the command carries the password, so errors quote only the server."""
        if "LOGINDISABLED" in self.capabilities:
            raise ProbeFailed("server disables LOGIN here (LOGINDISABLED); use TLS")
        command = f"LOGIN {quote(credentials.username)} {quote(credentials.password)}"
        with self.session.timed("auth"):
            response = await self.command(command)
        if response.status != "OK":
            raise ProbeFailed(f"login failed: {response}")
        # many servers announce the post-login capabilities in the OK's response code
        if response.text.upper().startswith("[CAPABILITY "):
            self.capabilities = parse_capabilities([response.text[1:].split("]", 1)[0]])

    async def select(self, mailbox: str = "INBOX") -> int:
        """SELECT; returns the message count (EXISTS)."""
        with self.session.timed("select"):
            response = await self.expect_ok(f"SELECT {quote(mailbox)}", f"SELECT {mailbox}")
        for line in response.untagged:
            match = _EXISTS.match("* " + line)
            if match:
                return int(match.group(1))
        return 0

    async def logout(self) -> None:
        with contextlib.suppress(ProbeFailed, OSError, TimeoutError):
            async with asyncio.timeout(LOGOUT_GRACE):
                await self.command("LOGOUT")


async def open_session(session: Session, target: Target,
                       credentials: Credentials | None) -> IMAPClient:
    """Connected session -> greeting, CAPABILITY, STARTTLS, LOGIN: ready for SELECT."""
    client = IMAPClient(session)
    await client.greeting()
    await client.capability()
    if target.tls == "starttls":
        await client.starttls()
    if credentials is not None:
        await client.login(credentials)
    return client


async def probe(target: Target) -> ProbeResult:
    async def dialog(session: Session, credentials: Credentials | None) -> None:
        client = await open_session(session, target, credentials)
        details = session.result.details
        details["capabilities"] = sorted(client.capabilities)
        if credentials is not None:
            details["messages"] = await client.select("INBOX")
        await client.logout()

    return await run_probe(target, dialog)
