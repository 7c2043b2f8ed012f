"""Listener authentication (like Prometheus's web config), the admin token and API keys.

Basic-auth passwords are stored as bcrypt hashes only; a verified pair is
remembered by its SHA-256 so bcrypt's deliberate slowness is paid once per
credential, not per scrape. Tokens are compared in constant time.

Admin and security routes are authorised by `identify()`: the bootstrap admin token
holds every scope, an API key (security/apikeys.py) the scopes it was created with.
Each route names the one scope it needs (`app.py` wraps it with `authorize`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import hmac
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import bcrypt

from exporter.config import read_secret
from security.apikeys import TOKEN_PREFIX, KeyCheck

if TYPE_CHECKING:
    from security.apikeys import ApiKeys

log = logging.getLogger(__name__)

_CACHE_SIZE = 1024
BCRYPT_MAX_BYTES = 72  # bcrypt reads no further; bcrypt 5 raises ValueError past it
SELF_AUTHENTICATED = ("/dovecot/policy", "/api/v1/webhooks/stalwart")


@functools.cache
def _dummy_hash() -> bytes:
    """Checked against for unknown users, so timing does not tell which users exist."""
    return bcrypt.hashpw(b"unknown-user", bcrypt.gensalt(rounds=10))


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8")).digest()


class ListenerAuth:
    def __init__(self, server: dict[str, Any], security: dict[str, Any]):
        auth = server["auth"]
        self.users: dict[str, bytes] = {
            user: hashed.encode("ascii") for user, hashed in auth["basic_auth_users"].items()}
        token = read_secret(auth, "bearer_token")
        admin = read_secret(security, "admin_token")
        self.bearer = _digest(token) if token else None
        self.admin = _digest(admin) if admin else None
        # these authenticate by themselves: an API key, an HMAC signature
        self.open_paths = frozenset([*auth["unauthenticated_paths"], *SELF_AUTHENTICATED])
        self.required = bool(self.users or self.bearer)
        self._verified: OrderedDict[bytes, None] = OrderedDict()
        self._bcrypt_slots = asyncio.Semaphore(2)

    def needs_auth(self, path: str) -> bool:
        return self.required and path not in self.open_paths

    async def allows(self, authorization: str | None) -> bool:
        """Whether the Authorization header passes the listener's authentication."""
        if not authorization:
            return False
        scheme, _, credentials = authorization.partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer":
            digest = _digest(credentials.strip())
            return any(hmac.compare_digest(digest, known)
                       for known in (self.bearer, self.admin) if known is not None)
        if scheme == "basic" and self.users:
            return await self._basic(credentials.strip())
        return False

    async def _basic(self, credentials: str) -> bool:
        try:
            user, sep, password = base64.b64decode(credentials, validate=True).decode(
                "utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        if not sep:
            return False
        key = hashlib.sha256(f"{user}\0{password}".encode()).digest()
        if key in self._verified:
            self._verified.move_to_end(key)
            return True
        secret = password.encode("utf-8")
        hashed = self.users.get(user) or _dummy_hash()
        too_long = len(secret) > BCRYPT_MAX_BYTES
        if too_long:  # refused as a wrong one, after the same bcrypt run (timing tells not)
            secret = secret[:BCRYPT_MAX_BYTES]
        async with self._bcrypt_slots:
            ok = await asyncio.to_thread(bcrypt.checkpw, secret, hashed)
        if ok and not too_long and user in self.users:
            self._verified[key] = None
            if len(self._verified) > _CACHE_SIZE:
                self._verified.popitem(last=False)
            return True
        return False

    def admin_status(self, authorization: str | None) -> int:
        """200 when the header carries the admin token, 401 when not, 403 when none is set."""
        if self.admin is None:
            return 403
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(_digest(token.strip()), self.admin):
            return 200
        return 401


@dataclass(frozen=True, slots=True)
class Identity:
    """Who sent an admin or security request: `admin` (the bootstrap token), `apikey`
    (check holds the outcome, valid or not) or `none`."""

    kind: str
    check: KeyCheck | None = None

    def allows(self, scope: str) -> bool:
        return self.kind == "admin" or (self.check is not None and self.check.allows(scope))

    @property
    def valid_key(self) -> bool:
        return self.check is not None and self.check.ok

    @property
    def actor(self) -> str:
        """How the audit log names the caller."""
        if self.kind == "apikey" and self.check is not None:
            return f"apikey:{self.check.key_id}"
        return self.kind


ADMIN = Identity("admin")
NOBODY = Identity("none")


async def identify(auth: ListenerAuth, apikeys: ApiKeys | None,
                   authorization: str | None) -> Identity:
    """The Identity of an `Authorization: Bearer ...` header (constant-time comparisons)."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return NOBODY
    if auth.admin is not None and hmac.compare_digest(_digest(token), auth.admin):
        return ADMIN
    if apikeys is not None and token.startswith(TOKEN_PREFIX):
        # the key records held in memory (memory, SQLite): decided at once; else read
        return Identity("apikey", apikeys.check(token) if apikeys.held
                        else await apikeys.authenticate(token))
    return NOBODY
