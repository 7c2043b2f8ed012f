"""API keys: scoped, expiring bearer secrets for the JSON API, stored only as hashes.

A key reads `a3m_<id>_<secret>`: `a3m_<id>` is the visible prefix (listed, logged,
audited), the secret is 32 random bytes. The key is shown once, at creation; the
store keeps SHA-256 of the whole key (HMAC-SHA256 with a pepper when one is set,
so a copy of the store alone cannot even test guesses). A check hashes the
presented key, loads the record of its id and compares in constant time; an
unknown id is compared against a dummy hash, and revoked, expired, unknown and
wrong keys take the same path and give the caller the same answer.

Last-used times are kept in memory and written behind every
`last_used_write_interval`, together with one `auth.success` audit record per key
and interval (with the number of uses), so a busy key costs no disk write per
request. Each key has its own GCRA rate limit (1000 requests/min by default),
counted in this process.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from security.engine import Auditor
from security.identity import IdentityStats, audit_verification
from security.ratelimit import Limit, RateLimiter, Result
from security.store import Record, Store

KIND = "apikey"
USED_KIND = "apikey_used"
TOKEN_PREFIX = "a3m_"  # noqa: S105 - a prefix, not a secret
SCOPES = ("admin", "security:read", "security:write", "metrics:write")
"""`admin` implies every other scope."""
MAX_TOKEN_LENGTH = 128
TOKEN_LENGTH = len(TOKEN_PREFIX) + 12 + 1 + 43
_DUMMY_HASH = "0" * 64
_SUCCESS = ("apikey", "success")  # IdentityStats.verifications key of a good check
PARSED_CACHE = 10_000  # keys whose parsed record is kept (oldest dropped first)


@dataclass(frozen=True)
class ApiKeySettings:
    default_lifetime: float = 365 * 86400.0
    max_lifetime: float = 5 * 365 * 86400.0
    rate_limit_per_minute: int = 1000
    rate_limit_burst: int = 50
    last_used_write_interval: float = 60.0
    keep_after_expiry: float = 30 * 86400.0
    """How long a revoked or expired key stays listed (and answers like a wrong one)."""
    pepper: bytes | None = None


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    scopes: tuple[str, ...]
    created: float
    expires: float
    revoked: float | None = None
    last_used: float | None = None
    rate_limit_per_minute: int = 1000
    created_by: str = ""

    @property
    def prefix(self) -> str:
        return f"{TOKEN_PREFIX}{self.id}"

    def state(self, now: float) -> str:
        if self.revoked is not None and self.revoked <= now:
            return "revoked"
        return "expired" if self.expires <= now else "active"

    def as_dict(self, now: float) -> dict[str, Any]:
        """Everything but the hash: what listing shows."""
        return {"id": self.id, "name": self.name, "prefix": self.prefix,
                "scopes": list(self.scopes), "created": self.created, "expires": self.expires,
                "revoked": self.revoked, "last_used": self.last_used,
                "rate_limit_per_minute": self.rate_limit_per_minute,
                "created_by": self.created_by, "state": self.state(now)}


@dataclass(slots=True)
class KeyCheck:
    """The outcome of one check. `reason`: ok, malformed, unknown, wrong, revoked,
    expired or rate_limited; callers answer every failure but rate_limited alike."""

    ok: bool
    reason: str
    key_id: str = ""
    scopes: frozenset[str] = frozenset()
    limit: Result | None = None

    def allows(self, scope: str) -> bool:
        return self.ok and (scope in self.scopes or "admin" in self.scopes)


@dataclass(slots=True)
class _Parsed:
    """What a check needs of a key's record, read out once per record object."""

    record: Record
    hash: str
    revoked: float | None
    expires: float
    limit: Limit
    scopes: frozenset[str]


_HEX = frozenset("0123456789abcdef")


def _is_hex(text: str) -> bool:
    return bool(text) and _HEX.issuperset(text)


def _key_from(record: Record, last_used: float | None = None) -> ApiKey:
    d = record.data
    return ApiKey(id=record.key, name=d["name"], scopes=tuple(d["scopes"]), created=d["created"],
                  expires=d["expires"], revoked=d.get("revoked"),
                  last_used=last_used, rate_limit_per_minute=d["rate_limit_per_minute"],
                  created_by=d.get("created_by", ""))


class ApiKeys:
    def __init__(self, store: Store, settings: ApiKeySettings | None = None,
                 audit: Auditor | None = None, stats: IdentityStats | None = None,
                 clock: Callable[[], float] = time.time):
        self.store = store
        self._parsed: dict[str, _Parsed] = {}  # by id: what authenticate() needs of a record
        self._limits: dict[int, Limit] = {}  # by requests per minute
        self.settings = settings or ApiKeySettings()
        self.audit = audit
        self.stats = stats or IdentityStats()
        self.clock = clock
        self.limiter = RateLimiter()
        self.active = 0
        self._used: dict[str, list[Any]] = {}  # id -> [last, expires, uses]

    @property
    def settings(self) -> ApiKeySettings:
        return self._settings

    @settings.setter
    def settings(self, settings: ApiKeySettings) -> None:
        """New settings (a reload): the rate limits derived from the old ones go."""
        self._settings = settings
        self._pepper = settings.pepper
        self._parsed.clear()
        self._limits.clear()

    def _hash(self, token: str) -> str:
        raw = token.encode("utf-8", "surrogateescape")
        pepper = self._pepper
        if pepper:
            return hmac.digest(pepper, raw, "sha256").hex()
        return hashlib.sha256(raw).hexdigest()

    # --- changes

    async def create(self, name: str, scopes: Iterable[str], expires_in: float | None = None,
                     *, actor: str = "admin", rate_limit_per_minute: int | None = None
                     ) -> tuple[ApiKey, str]:
        """A new key and its secret token (shown this once)."""
        scopes = tuple(dict.fromkeys(scopes))
        unknown = [s for s in scopes if s not in SCOPES]
        if not scopes or unknown:
            raise ValueError(f"scopes must be some of {', '.join(SCOPES)}"
                             + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
        lifetime = self.settings.default_lifetime if expires_in is None else float(expires_in)
        if not 0 < lifetime <= self.settings.max_lifetime:
            raise ValueError(f"expires_in must be between 1 and {self.settings.max_lifetime:.0f}"
                             " seconds")
        now = self.clock()
        key_id = secrets.token_hex(6)
        token = f"{TOKEN_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        key = ApiKey(key_id, name, scopes, now, now + lifetime, None, None,
                     rate_limit_per_minute or self.settings.rate_limit_per_minute, actor)
        await self._save(key, self._hash(token))
        self.active += 1
        self._audit("apikey.create", actor, key, {"scopes": list(scopes),
                                                  "expires": key.expires})
        return key, token

    async def _save(self, key: ApiKey, digest: str) -> None:
        data = {"name": key.name, "scopes": list(key.scopes), "created": key.created,
                "expires": key.expires, "revoked": key.revoked, "hash": digest,
                "rate_limit_per_minute": key.rate_limit_per_minute,
                "created_by": key.created_by}
        await self.store.put_record(Record(KIND, key.id, data,
                                           key.expires + self.settings.keep_after_expiry))

    async def revoke(self, key_id: str, *, actor: str = "admin", at: float | None = None
                     ) -> ApiKey | None:
        """Revokes a key now (or at `at`); None when there is no such key."""
        now = self.clock()
        record = await self.store.get_record(KIND, key_id, now)
        if record is None:
            return None
        key = _key_from(record)
        if key.state(now) != "active":
            return key
        when = now if at is None else max(now, at)
        revoked = ApiKey(key.id, key.name, key.scopes, key.created, key.expires, when, None,
                         key.rate_limit_per_minute, key.created_by)
        await self._save(revoked, record.data["hash"])
        if when <= now:
            self.active = max(0, self.active - 1)
        self._audit("apikey.revoke", actor, revoked, {"at": when})
        return revoked

    async def rotate(self, key_id: str, *, actor: str = "admin", grace: float = 0.0,
                     expires_in: float | None = None) -> tuple[ApiKey, str, ApiKey] | None:
        """A new key with the old one's name, scopes and rate limit; the old one is revoked
        after `grace` seconds (0: at once). Returns (new, token, old) or None."""
        record = await self.store.get_record(KIND, key_id, self.clock())
        if record is None or _key_from(record).state(self.clock()) != "active":
            return None
        old = _key_from(record)
        new, token = await self.create(old.name, old.scopes, expires_in, actor=actor,
                                       rate_limit_per_minute=old.rate_limit_per_minute)
        revoked = await self.revoke(old.id, actor=actor, at=self.clock() + grace)
        assert revoked is not None
        self._audit("apikey.rotate", actor, new, {"replaces": old.id, "grace": grace})
        return new, token, revoked

    def _audit(self, type_: str, actor: str, key: ApiKey, details: dict[str, Any]) -> None:
        if self.audit is not None:
            self.audit.record(type_, actor, key.prefix, {"id": key.id, "name": key.name,
                                                         **details})

    # --- reading

    async def get(self, key_id: str) -> ApiKey | None:
        now = self.clock()
        record = await self.store.get_record(KIND, key_id, now)
        if record is None:
            return None
        return _key_from(record, await self._last_used(key_id, now))

    async def list(self) -> list[ApiKey]:
        now = self.clock()
        used = {r.key: r.data["t"] for r in await self.store.list_records(USED_KIND, now)}
        keys = []
        for record in await self.store.list_records(KIND, now):
            pending = self._used.get(record.key)
            last = max(used.get(record.key, 0.0), pending[0] if pending else 0.0) or None
            keys.append(_key_from(record, last))
        self.active = sum(1 for k in keys if k.state(now) == "active")
        return sorted(keys, key=lambda k: (k.created, k.id))

    async def _last_used(self, key_id: str, now: float) -> float | None:
        pending = self._used.get(key_id)
        stored = await self.store.get_record(USED_KIND, key_id, now)
        last = max(stored.data["t"] if stored else 0.0, pending[0] if pending else 0.0)
        return last or None

    # --- the check

    async def authenticate(self, token: str) -> KeyCheck:
        """Checks a presented key; counts, rate-limits and (written behind) audits it.

        The record is read from the store on every check, so a key revoked through
        another replica is refused at once; only what is derived from a record (its
        scopes and rate limit) is kept, by record object, which a store hands back
        unchanged until the record changes (Redis decodes a new one every time).
        """
        now = self.clock()
        # a3m_<12 hex>_<43 base64url>: any other shape cannot be a key (and needs no lookup)
        if len(token) == TOKEN_LENGTH and token[16] == "_" and token.startswith(TOKEN_PREFIX):
            key_id = token[4:16]
            digest = self._hash(token)
            record = await self.store.get_record(KIND, key_id, now)
        else:
            key_id, record = "", None
            digest = self._hash(token if len(token) <= MAX_TOKEN_LENGTH else "")
        if record is None:
            hmac.compare_digest(digest, _DUMMY_HASH)  # the work a known id costs
            return self._failed("unknown" if key_id else "malformed",
                                key_id if _is_hex(key_id) else "")
        parsed = self._parsed.get(key_id)
        if parsed is None or parsed.record is not record:
            parsed = self._parse(key_id, record)
        if not hmac.compare_digest(digest, parsed.hash):
            return self._failed("wrong", key_id)
        if parsed.revoked is not None and parsed.revoked <= now:
            return self._failed("revoked", key_id)
        if parsed.expires <= now:
            return self._failed("expired", key_id)
        result = self.limiter.hit("apikey", key_id, parsed.limit, now)
        if not result.allowed:
            self.stats.verified("apikey", False, "rate_limited")
            return KeyCheck(False, "rate_limited", key_id, parsed.scopes, result)
        used = self._used.get(key_id)
        if used is None:
            self._used[key_id] = [now, parsed.expires, 1]
        else:
            used[0] = now
            used[2] += 1
        counts = self.stats.verifications
        counts[_SUCCESS] = counts.get(_SUCCESS, 0.0) + 1
        return KeyCheck(True, "ok", key_id, parsed.scopes, result)

    def _parse(self, key_id: str, record: Record) -> _Parsed:
        data = record.data
        per_minute, burst = data["rate_limit_per_minute"], self.settings.rate_limit_burst
        limit = self._limits.get(per_minute)
        if limit is None:
            limit = self._limits[per_minute] = Limit(per_minute, 60.0, burst)
        if len(self._parsed) >= PARSED_CACHE:
            del self._parsed[next(iter(self._parsed))]
        parsed = self._parsed[key_id] = _Parsed(record, data["hash"], data["revoked"],
                                                data["expires"], limit,
                                                frozenset(data["scopes"]))
        return parsed

    def _failed(self, reason: str, key_id: str) -> KeyCheck:
        self.stats.verified("apikey", False, reason)
        audit_verification(self.audit, "apikey", False,
                           f"{TOKEN_PREFIX}{key_id}" if key_id else "unknown",
                           {"reason": reason})
        return KeyCheck(False, reason, key_id)

    # --- write-behind

    async def flush(self) -> None:
        """Writes last-used times and audits the uses since the last flush."""
        pending = list(self._used.items())
        self._used = {}
        for i, (key_id, (last, expires, uses)) in enumerate(pending):
            try:
                await self.store.put_record(Record(
                    USED_KIND, key_id, {"t": last}, expires + self.settings.keep_after_expiry))
            except BaseException:  # keep what was not written for the next flush
                for k, (t, e, n) in pending[i:]:
                    later = self._used.get(k)
                    self._used[k] = [max(t, later[0]), e, n + later[2]] if later else [t, e, n]
                raise
            audit_verification(self.audit, "apikey", True, f"{TOKEN_PREFIX}{key_id}",
                               {"uses": uses, "last_used": last})
