"""SMTP probe (RFC 5321, 3207 STARTTLS, 4954 AUTH): port 25, submission 587, implicit TLS 465.

Speaks the protocol: reads the 220 banner as a (possibly multi-line) reply, EHLO,
STARTTLS and EHLO again when tls is starttls, optional AUTH PLAIN (or LOGIN) with
the target's credentials, QUIT. `SMTPClient` is reused by the delivery round trip.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from dataclasses import dataclass, field

from exporter.probes.session import ProbeFailed, Session, run_probe
from exporter.probes.target import Credentials, ProbeResult, Target

MAX_REPLY_LINES = 200  # a longer reply is garbage, not a server
QUIT_GRACE = 2.0


@dataclass
class Reply:
    code: int
    lines: list[str] = field(default_factory=list)  # the text after the code, one per line

    def __str__(self) -> str:
        return f"{self.code} {self.lines[0] if self.lines else ''}".strip()[:300]


def parse_reply_line(line: str) -> tuple[int, bool, str]:
    """'250-SIZE 10240000' -> (250, False, 'SIZE 10240000'); a space or nothing after the
    code marks the last line. Anything else is not SMTP."""
    code = line[:3]
    if (len(code) != 3 or not code.isdigit() or code[0] not in "2345"
            or (len(line) > 3 and line[3] not in " -")):
        raise ProbeFailed(f"not an SMTP reply: {line[:100]!r}")
    return int(code), len(line) == 3 or line[3] == " ", line[4:]


async def read_reply(session: Session) -> Reply:
    """A whole reply; every line must carry the same code."""
    reply: Reply | None = None
    for _ in range(MAX_REPLY_LINES):
        code, last, text = parse_reply_line(await session.readline())
        if reply is None:
            reply = Reply(code)
        elif code != reply.code:
            raise ProbeFailed(f"SMTP reply changed code from {reply.code} to {code}")
        reply.lines.append(text)
        if last:
            return reply
    raise ProbeFailed(f"SMTP reply longer than {MAX_REPLY_LINES} lines")


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper case) to their parameters; the first line is the greeting."""
    capabilities = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            capabilities[keyword.upper()] = params.strip()
    return capabilities


class SMTPClient:
    """The client side of one SMTP session, over a connected Session."""

    def __init__(self, session: Session):
        self.session = session
        self.capabilities: dict[str, str] = {}
        self.banner: Reply | None = None

    async def command(self, line: str) -> Reply:
        await self.session.send(line.encode("utf-8") + b"\r\n")
        return await read_reply(self.session)

    async def greeting(self) -> Reply:
        with self.session.timed("banner"):
            self.banner = await read_reply(self.session)
        if self.banner.code != 220:
            raise ProbeFailed(f"server refused the session: {self.banner}")
        return self.banner

    async def ehlo(self, name: str) -> None:
        self.session.step("ehlo")
        reply = await self.command(f"EHLO {name}")
        if reply.code != 250:
            raise ProbeFailed(f"EHLO refused: {reply}")
        self.capabilities = parse_ehlo(reply)

    async def starttls(self, name: str) -> None:
        if "STARTTLS" not in self.capabilities:
            raise ProbeFailed("server does not offer STARTTLS")
        with self.session.timed("tls"):
            reply = await self.command("STARTTLS")
        if reply.code != 220:
            raise ProbeFailed(f"STARTTLS refused: {reply}")
        await self.session.upgrade()
        await self.ehlo(name)

    async def authenticate(self, credentials: Credentials) -> None:
        """AUTH PLAIN, or LOGIN when PLAIN is not offered. The commands carry the secret,
        so errors quote only the server's replies."""
        if "AUTH" not in self.capabilities:
            raise ProbeFailed("server offers no AUTH" + (
                "" if self.session.result.tls else " (some servers offer it only after STARTTLS)"))
        mechanisms = self.capabilities["AUTH"].upper().split()
        with self.session.timed("auth"):
            if "PLAIN" in mechanisms:
                token = f"\0{credentials.username}\0{credentials.password}".encode()
                reply = await self.command("AUTH PLAIN " + base64.b64encode(token).decode())
            elif "LOGIN" in mechanisms:
                reply = await self.command("AUTH LOGIN")
                for value in (credentials.username, credentials.password):
                    if reply.code != 334:
                        break
                    reply = await self.command(base64.b64encode(value.encode()).decode())
            else:
                raise ProbeFailed("no supported AUTH mechanism (PLAIN, LOGIN); server offers "
                                  + (" ".join(mechanisms) or "none"))
        if reply.code != 235:
            raise ProbeFailed(f"authentication failed: {reply}")

    async def quit(self) -> None:
        """QUIT, politely but briefly: a slow goodbye does not fail a probe that succeeded."""
        with contextlib.suppress(ProbeFailed, OSError, TimeoutError):
            async with asyncio.timeout(QUIT_GRACE):
                await self.command("QUIT")


async def open_session(session: Session, target: Target,
                       credentials: Credentials | None) -> SMTPClient:
    """Connected session -> banner, EHLO, STARTTLS + EHLO, AUTH: ready for MAIL FROM."""
    client = SMTPClient(session)
    await client.greeting()
    await client.ehlo(target.ehlo)
    if target.tls == "starttls":
        await client.starttls(target.ehlo)
    if credentials is not None:
        await client.authenticate(credentials)
    return client


async def probe(target: Target) -> ProbeResult:
    async def dialog(session: Session, credentials: Credentials | None) -> None:
        client = await open_session(session, target, credentials)
        details = session.result.details
        caps = client.capabilities
        details["banner"] = str(client.banner)
        details["capabilities"] = sorted(caps)
        details["auth_mechanisms"] = caps.get("AUTH", "").upper().split()
        details["pipelining"] = "PIPELINING" in caps
        if caps.get("SIZE", "").isdigit():
            details["size_limit_bytes"] = int(caps["SIZE"])
        await client.quit()

    return await run_probe(target, dialog)
