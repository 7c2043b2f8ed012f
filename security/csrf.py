"""CSRF tokens: HMAC-SHA256 over the session id and the issue time, so a token is bound to
one session, expires after `lifetime`, and needs no storage.

A token reads `<issued, hex seconds>.<hex MAC>`; the MAC covers a label, the
session id and the issue time, so a token of one session never verifies for another
and a rotated session id invalidates the tokens of the old one. Verification compares
in constant time. Several replicas must share the key (a secret file); a key
generated into the state dir serves one process.
"""

from __future__ import annotations

import hmac
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from security.engine import Auditor
from security.identity import IdentityStats, audit_verification
from security.keyed_hmac import KeyedHmac

MAX_TOKEN_LENGTH = 128
CLOCK_SKEW = 60.0
"""Seconds a token's issue time may lie in the future (replicas' clocks differ)."""


def load_or_create_key(path: str | os.PathLike[str]) -> bytes:
    """The key in `path`, or a new 32-byte random key written there with mode 0600."""
    path = Path(path)
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32).encode("ascii")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key + b"\n")
        fh.flush()
        os.fsync(fh.fileno())
    return key


class CsrfTokens:
    def __init__(self, key: bytes, lifetime: float = 3600.0,
                 clock: Callable[[], float] = time.time, stats: IdentityStats | None = None,
                 audit: Auditor | None = None):
        if len(key) < 16:
            raise ValueError("the CSRF key must have at least 16 bytes")
        self.key = key
        self._mac_of = KeyedHmac(key, "sha256").hexdigest
        self.lifetime = lifetime
        self.clock = clock
        self.stats = stats or IdentityStats()
        self.audit = audit

    def _mac(self, session_id: str, issued: str) -> str:
        """HMAC-SHA256 (hex) of the label, the session id and the issue time."""
        return self._mac_of(
            f"a3m-csrf\0{session_id}\0{issued}".encode("utf-8", "surrogateescape"))

    def issue(self, session_id: str) -> str:
        issued = format(int(self.clock()), "x")
        return f"{issued}.{self._mac(session_id, issued)}"

    def verify(self, session_id: str, token: str) -> str:
        """'ok', or why not: malformed, expired, bad_mac."""
        issued, dot, mac = token.partition(".")
        if not dot or len(token) > MAX_TOKEN_LENGTH or not 0 < len(issued) <= 12:
            return "malformed"
        try:
            at = int(issued, 16)
        except ValueError:
            return "malformed"
        # the MAC first, so a forged token learns nothing about its time; a MAC is ASCII
        # hex, so any other text is simply wrong (compare_digest takes ASCII str only)
        expected = self._mac(session_id, issued)
        if not (mac.isascii() and hmac.compare_digest(expected, mac)):
            return "bad_mac"
        age = self.clock() - at
        if age > self.lifetime or age < -CLOCK_SKEW:
            return "expired"
        return "ok"

    def check(self, session_id: str, token: str, session_alive: bool = True) -> bool:
        """verify(), counted; a failure is audited. A token of a session that has ended
        (`session_alive` false) fails as no_session."""
        reason = self.verify(session_id, token) if session_alive else "no_session"
        ok = reason == "ok"
        self.stats.verified("csrf", ok, "" if ok else reason)
        if not ok:
            self.stats.csrf_failures[reason] = self.stats.csrf_failures.get(reason, 0.0) + 1
            audit_verification(self.audit, "csrf", False, "unknown", {"reason": reason})
        return ok
