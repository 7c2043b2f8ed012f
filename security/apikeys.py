"""API keys: scoped, expiring bearer secrets for the JSON API, stored only as hashes.

A key reads `a3m_<id>_<secret>`: `a3m_<id>` is the visible prefix (listed, logged,
audited), the secret is 32 random bytes. The key is shown once, at creation; the
store keeps SHA-256 of the whole key (HMAC-SHA256 with a pepper when one is set,
so a copy of the store alone cannot even test guesses). A check hashes the
presented key, finds the record of its id and compares in constant time; an
unknown id is compared against a dummy hash, and revoked, expired, unknown and
wrong keys take the same path and give the caller the same answer.

Where the record is found: on a store this process alone writes (memory, SQLite) every
key's record is held in an in-memory index, loaded from the store at the first check and
changed together with the store by create, revoke and rotate, so a check is a dict
lookup, a hash and a compare, with nothing awaited. Every ApiKeys on one store shares
that store's index, so a change through one is seen by the others at the next check. On
a shared store (Redis: several replicas write it) every check reads the record from the
store, so a key revoked through another replica is refused at its very next check; no
staleness on either.

Last-used times are kept in memory and written behind every
`last_used_write_interval`, together with one `auth.success` audit record per key
and interval (with the number of uses), so a busy key costs no disk write per
request. Each key has its own GCRA rate limit (1000 requests/min by default),
counted in this process: its state is one float beside the key's use count.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from security.engine import Auditor, record_audit
from security.identity import IdentityStats, LocalTable, audit_verification, local_table
from security.ratelimit import Limit, Result, gcra
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


class KeyCheck(NamedTuple):
    """The outcome of one check. `reason`: ok, malformed, unknown, wrong, revoked,
    expired or rate_limited; callers answer every failure but rate_limited alike.

    An immutable record (a named tuple: one is built per request, it must be cheap)."""

    ok: bool
    reason: str
    key_id: str = ""
    scopes: frozenset[str] = frozenset()
    limit: Result | None = None

    def allows(self, scope: str) -> bool:
        return self.ok and (scope in self.scopes or "admin" in self.scopes)


_new = tuple.__new__  # a named tuple's own constructor, without the keyword-argument layer


class _Key(NamedTuple):
    """What a check needs of a key's record: a new one whenever the record changes."""

    hash: str
    ends: float  # the first of revoked, expires and gone: a check after it fails
    revoked: float | None
    expires: float
    gone: float  # when the store drops the record: from then on the id is unknown
    per_minute: int
    scopes: frozenset[str]


def _entry(record: Record) -> _Key:
    d = record.data
    revoked, expires = d["revoked"], d["expires"]
    gone = math.inf if record.expires is None else record.expires
    ends = min(expires, gone) if revoked is None else min(revoked, expires, gone)
    return _new(_Key, (d["hash"], ends, revoked, expires, gone, d["rate_limit_per_minute"],
                         frozenset(d["scopes"])))


def _reason(key: _Key, matched: bool, now: float) -> str:
    """Why a key that was found fails, in the order a check asks."""
    if key.gone <= now:
        return "unknown"  # as the store answers once it has dropped the record
    if not matched:
        return "wrong"
    return "revoked" if key.revoked is not None and key.revoked <= now else "expired"


class _Use:
    """This process's use of one key: its GCRA state, its last use, uses not yet written."""

    __slots__ = ("key", "limit", "tat", "last", "uses")

    def __init__(self, key: _Key, limit: Limit) -> None:
        self.key, self.limit = key, limit
        self.tat: float | None = None
        self.last = 0.0
        self.uses = 0


_HEX = frozenset("0123456789abcdef")
_sha256 = hashlib.sha256


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
        self._index = local_table(store, KIND)  # None: every check reads the store
        self._limits: dict[int, Limit] = {}  # by requests per minute
        self._uses: dict[str, _Use] = {}  # by id: the keys this process checked
        self.settings = settings or ApiKeySettings()
        self.audit = audit
        self.stats = stats or IdentityStats()
        self.clock = clock
        self.active = 0

    @property
    def settings(self) -> ApiKeySettings:
        return self._settings

    @settings.setter
    def settings(self, settings: ApiKeySettings) -> None:
        """New settings (a reload): the rate limits derived from the old ones go (the
        keys' GCRA states stay)."""
        self._settings = settings
        self._pepper = settings.pepper
        self._limits.clear()
        for use in self._uses.values():
            use.limit = self._limit(use.key.per_minute)

    def _limit(self, per_minute: int) -> Limit:
        limit = self._limits.get(per_minute)
        if limit is None:
            limit = self._limits[per_minute] = Limit(per_minute, 60.0,
                                                     self._settings.rate_limit_burst)
        return limit

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
        record = Record(KIND, key.id, data, key.expires + self.settings.keep_after_expiry)
        await self.store.put_record(record)
        if self._index is not None:  # after the store: a failed write changes neither
            self._index.rows[key.id] = _entry(record)

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
        record_audit(self.audit, type_, actor, key.prefix, {"id": key.id, "name": key.name,
                                                            **details})

    # --- reading

    async def get(self, key_id: str) -> ApiKey | None:
        now = self.clock()
        record = await self.store.get_record(KIND, key_id, now)
        if record is None:
            return None
        return _key_from(record, await self._last_used(key_id, now))

    async def list(self) -> list[ApiKey]:
        """Every key the store still holds (IdentityServices lists them every cleanup
        interval, which also drops the index's entries of records the store dropped)."""
        now = self.clock()
        if self._index is not None:
            rows = self._index.rows
            for key_id in [k for k, key in rows.items() if key.gone <= now]:
                del rows[key_id]
        used = {r.key: r.data["t"] for r in await self.store.list_records(USED_KIND, now)}
        keys = []
        for record in await self.store.list_records(KIND, now):
            use = self._uses.get(record.key)
            last = max(used.get(record.key, 0.0), use.last if use else 0.0) or None
            keys.append(_key_from(record, last))
        self.active = sum(1 for k in keys if k.state(now) == "active")
        return sorted(keys, key=lambda k: (k.created, k.id))

    async def _last_used(self, key_id: str, now: float) -> float | None:
        use = self._uses.get(key_id)
        stored = await self.store.get_record(USED_KIND, key_id, now)
        last = max(stored.data["t"] if stored else 0.0, use.last if use else 0.0)
        return last or None

    # --- the check

    async def authenticate(self, token: str) -> KeyCheck:
        """Checks a presented key; counts, rate-limits and (written behind) audits it.

        The record comes from the index on a store only this process writes, else from
        the store itself (see the module's docstring): either way a revoke or rotation
        counts at the very next check.
        """
        now = self.clock()
        # a3m_<12 hex>_<43 base64url>: any other shape cannot be a key (and needs no lookup)
        if len(token) == TOKEN_LENGTH and token[16] == "_" and token.startswith(TOKEN_PREFIX):
            key_id = token[4:16]
            raw = token.encode("utf-8", "surrogateescape")
            pepper = self._pepper
            digest = (hmac.digest(pepper, raw, "sha256").hex() if pepper
                      else _sha256(raw).hexdigest())  # self._hash(token)
            index = self._index
            if index is None:
                record = await self.store.get_record(KIND, key_id, now)
                key = None if record is None else _entry(record)
            else:
                if not index.loaded:
                    await self._load(index, now)
                key = index.rows.get(key_id)
        else:
            key_id, key = "", None
            digest = self._hash(token if len(token) <= MAX_TOKEN_LENGTH else "")
        if key is None:
            hmac.compare_digest(digest, _DUMMY_HASH)  # the work a known id costs
            return self._failed("unknown" if key_id else "malformed",
                                key_id if _is_hex(key_id) else "")
        matched = hmac.compare_digest(digest, key.hash)
        if not matched or key.ends <= now:
            return self._failed(_reason(key, matched, now), key_id)
        use = self._uses.get(key_id)
        if use is None:
            use = self._uses[key_id] = _Use(key, self._limit(key.per_minute))
        elif use.key is not key:  # the record changed (or was read anew from a shared store)
            use.key, use.limit = key, self._limit(key.per_minute)
        result, tat = gcra(use.tat, now, use.limit)
        if tat is None:
            self.stats.verified("apikey", False, "rate_limited")
            return _new(KeyCheck, (False, "rate_limited", key_id, key.scopes, result))
        use.tat, use.last = tat, now
        use.uses += 1
        counts = self.stats.verifications
        counts[_SUCCESS] = counts.get(_SUCCESS, 0.0) + 1
        return _new(KeyCheck, (True, "ok", key_id, key.scopes, result))

    async def _load(self, index: LocalTable, now: float) -> None:
        """Fills the index from the store, once; entries written meanwhile are newer."""
        records = await self.store.list_records(KIND, now)
        if not index.loaded:
            for record in records:
                index.rows.setdefault(record.key, _entry(record))
            index.loaded = True

    def _failed(self, reason: str, key_id: str) -> KeyCheck:
        self.stats.verified("apikey", False, reason)
        audit_verification(self.audit, "apikey", False,
                           f"{TOKEN_PREFIX}{key_id}" if key_id else "unknown",
                           {"reason": reason})
        return KeyCheck(False, reason, key_id)

    # --- write-behind

    async def flush(self) -> None:
        """Writes last-used times and audits the uses since the last flush; forgets the
        keys with nothing pending whose rate-limit bucket is full again."""
        now = self.clock()
        for key_id, use in list(self._uses.items()):
            uses, last = use.uses, use.last
            if uses:  # a failed write leaves this key's uses and the later ones pending
                await self.store.put_record(Record(
                    USED_KIND, key_id, {"t": last},
                    use.key.expires + self.settings.keep_after_expiry))
                use.uses -= uses  # checks made while the write was awaited stay pending
                audit_verification(self.audit, "apikey", True, f"{TOKEN_PREFIX}{key_id}",
                                   {"uses": uses, "last_used": last})
            elif use.tat is None or use.tat <= now:
                del self._uses[key_id]
