"""POP3 probe (RFC 1939, 2449 CAPA, 2595 STLS): 110 with STLS, 995 with implicit TLS.

Reads the +OK greeting, CAPA, STLS (and CAPA again), optional USER/PASS and STAT,
then QUIT.
"""

from __future__ import annotations

import asyncio
import contextlib

from exporter.probes.session import ProbeFailed, Session, run_probe
from exporter.probes.target import Credentials, ProbeResult, Target

MAX_LIST_LINES = 1000
QUIT_GRACE = 2.0


def parse_status(line: str) -> tuple[bool, str]:
    """'+OK text' -> (True, 'text'), '-ERR text' -> (False, 'text'); anything else fails."""
    head, _, text = line.partition(" ")
    if head.upper() == "+OK":
        return True, text
    if head.upper() == "-ERR":
        return False, text
    raise ProbeFailed(f"not a POP3 response: {line[:100]!r}")


def parse_multiline(lines: list[str]) -> list[str]:
    """The body of a multi-line response (terminator excluded) with dot-stuffing undone."""
    return [line[1:] if line.startswith("..") else line for line in lines]


class POP3Client:
    def __init__(self, session: Session):
        self.session = session
        self.capabilities: set[str] = set()

    async def command(self, text: str) -> tuple[bool, str]:
        await self.session.send(text.encode("utf-8") + b"\r\n")
        return parse_status(await self.session.readline())

    async def read_list(self) -> list[str]:
        lines: list[str] = []
        for _ in range(MAX_LIST_LINES):
            line = await self.session.readline()
            if line == ".":
                return parse_multiline(lines)
            lines.append(line)
        raise ProbeFailed(f"POP3 list longer than {MAX_LIST_LINES} lines")

    async def greeting(self) -> str:
        with self.session.timed("banner"):
            ok, text = parse_status(await self.session.readline())
        if not ok:
            raise ProbeFailed(f"server refused the session: -ERR {text}"[:300])
        return text

    async def capa(self) -> set[str]:
        """CAPA's names (upper case); an empty set when the server has no CAPA."""
        self.session.step("capa")
        ok, _ = await self.command("CAPA")
        lines = await self.read_list() if ok else []
        self.capabilities = {line.split()[0].upper() for line in lines if line.split()}
        return self.capabilities

    async def stls(self) -> None:
        if "STLS" not in self.capabilities:
            raise ProbeFailed("server does not offer STLS")
        with self.session.timed("tls"):
            ok, text = await self.command("STLS")
        if not ok:
            raise ProbeFailed(f"STLS refused: -ERR {text}"[:300])
        await self.session.upgrade()
        await self.capa()

    async def login(self, credentials: Credentials) -> None:
        """USER/PASS; errors quote only the server, never the password."""
        for value in (credentials.username, credentials.password):
            if any(c in value for c in "\r\n\0"):
                raise ProbeFailed("POP3 credentials must not contain line breaks")
        with self.session.timed("auth"):
            ok, text = await self.command(f"USER {credentials.username}")
            if not ok:
                raise ProbeFailed(f"USER refused: -ERR {text}"[:300])
            ok, text = await self.command(f"PASS {credentials.password}")
        if not ok:
            raise ProbeFailed(f"login failed: -ERR {text}"[:300])

    async def stat(self) -> tuple[int, int]:
        """(messages, bytes) in the maildrop."""
        ok, text = await self.command("STAT")
        parts = text.split()
        if not ok or len(parts) < 2 or not (parts[0].isdigit() and parts[1].isdigit()):
            raise ProbeFailed(f"bad STAT answer: {text[:100]!r}")
        return int(parts[0]), int(parts[1])

    async def quit(self) -> None:
        with contextlib.suppress(ProbeFailed, OSError, TimeoutError):
            async with asyncio.timeout(QUIT_GRACE):
                await self.command("QUIT")


async def probe(target: Target) -> ProbeResult:
    async def dialog(session: Session, credentials: Credentials | None) -> None:
        client = POP3Client(session)
        await client.greeting()
        await client.capa()
        if target.tls == "starttls":
            await client.stls()
        details = session.result.details
        details["capabilities"] = sorted(client.capabilities)
        if credentials is not None:
            await client.login(credentials)
            details["messages"], details["mailbox_bytes"] = await client.stat()
        await client.quit()

    return await run_probe(target, dialog)
