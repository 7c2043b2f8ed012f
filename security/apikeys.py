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
lookup, a hash and a compare: once the index is loaded (`held`) the HTTP layer calls the
synchronous check(), which awaits nothing. Every ApiKeys on one store shares that
store's index, so a change through one is seen by the others at the next check. On a
shared store (Redis: several replicas write it) every check is authenticate(), which
reads the record from the store, so a key revoked through another replica is refused at
its very next check; no staleness on either.

Last-used times are kept in memory and written behind every
`last_used_write_interval`, together with one `auth.success` audit record per key
and interval (with the number of uses), so a busy key costs no disk write per
request. Each key has its own GCRA rate limit (1000 requests/min by default),
counted in this process: its state is one float beside the key's use count, and a check
makes the decision with gcra()'s arithmetic written out (the Result for the RateLimit
headers is worked out by gcra() itself when asked: KeyCheck.limit).
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import math
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from security.engine import Auditor, record_audit
from security.identity import (
    IdentityStats,
    LocalTable,
    audit_verification,
    is_number,
    local_table,
    malformed,
)
from security.ratelimit import SLACK, Limit, Result, gcra
from security.store import Record, Store

KIND = "apikey"
USED_KIND = "apikey_used"
TOKEN_PREFIX = "a3m_"  # noqa: S105 - a prefix, not a secret
SCOPES = ("admin", "security:read", "security:write", "metrics:write")
"""`admin` implies every other scope."""
MAX_TOKEN_LENGTH = 128
TOKEN_LENGTH = len(TOKEN_PREFIX) + 12 + 1 + 43
_DUMMY_HASH = bytes(32)  # what an unknown id's digest is compared against


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

    @property
    def ends(self) -> float:
        """When it stops being active: the first of its expiry and its revocation."""
        return self.expires if self.revoked is None else min(self.expires, self.revoked)

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

    An immutable record. A passing check is made once per key record and handed out
    again: its `usage` is the key's use in this process, which keeps the inputs of its
    latest allowed request, and `limit` (for the RateLimit headers) works that decision's
    Result out of them with gcra() when asked. So a passing check's `limit` is its own
    decision until the key passes again: read it before the next check of the key (the
    HTTP layer reads it at once). A refusal keeps its own inputs (a _Decision)."""

    ok: bool
    reason: str
    key_id: str = ""
    scopes: frozenset[str] = frozenset()
    usage: _Use | _Decision | None = None

    def allows(self, scope: str) -> bool:
        return self.ok and (scope in self.scopes or "admin" in self.scopes)

    @property
    def limit(self) -> Result | None:
        """The key's latest rate-limit decision (None: the check did not reach it)."""
        use = self.usage
        return None if use is None else gcra(use.before, use.at, use.limit)[0]


class _Key:
    """What a check needs of a key's record: a new one whenever the record changes (slots,
    not a named tuple: a check reads them, and slot reads are the interpreter's fastest)."""

    __slots__ = ("hash", "ends", "revoked", "expires", "gone", "per_minute", "scopes", "use")

    def __init__(self, record: Record) -> None:
        d = record.data
        self.hash: bytes = bytes.fromhex(d["hash"])  # the stored hex digest, as bytes
        self.revoked: float | None = d["revoked"]
        self.expires: float = d["expires"]
        # when the store drops the record: from then on the id is unknown
        self.gone = math.inf if record.expires is None else record.expires
        # the first of revoked, expires and gone: a check after it fails
        self.ends = min(self.expires, self.gone, math.inf if self.revoked is None
                        else self.revoked)
        self.per_minute: int = d["rate_limit_per_minute"]
        self.scopes = frozenset(d["scopes"])
        self.use: _Use | None = None  # the last check's use of it (ApiKeys._use)


def _reason(key: _Key, matched: bool, now: float) -> str:
    """Why a key that was found fails, in the order a check asks."""
    if key.gone <= now:
        return "unknown"  # as the store answers once it has dropped the record
    if not matched:
        return "wrong"
    return "revoked" if key.revoked is not None and key.revoked <= now else "expired"


class _Decision(NamedTuple):
    """What a rate-limit decision is made from: gcra(before, at, limit)."""

    before: float
    at: float
    limit: Limit


class _Use:
    """One ApiKeys' use of one key: its GCRA state (`tat`), the inputs of its latest
    allowed request (`before`, the TAT then, and `at`, its time: the key's last use), the
    uses not yet written, and the answer a passing check of it gives (`passed`)."""

    __slots__ = ("owner", "key", "limit", "tat", "before", "at", "uses", "passed")

    def __init__(self, owner: object, key_id: str, key: _Key, limit: Limit) -> None:
        self.owner = owner  # the ApiKeys counting it
        self.tat = self.before = -math.inf  # no state: a full bucket, as gcra()'s None
        self.at = 0.0
        self.uses = 0
        self.key, self.limit = key, limit
        self.passed = KeyCheck(True, "ok", key_id, key.scopes, self)

    def renew(self, key: _Key, limit: Limit) -> None:
        """For a new record of the key (or new settings); the GCRA state stays."""
        self.key, self.limit = key, limit
        passed = self.passed
        if passed.scopes != key.scopes:  # (a shared store's record is new at every read)
            self.passed = KeyCheck(True, "ok", passed.key_id, key.scopes, self)


_HEX = frozenset("0123456789abcdef")
_sha256 = hashlib.sha256
_compare = hmac.compare_digest  # constant time


def _key_id(token: str) -> str:
    """The id of a key-shaped token (a3m_<12>_<43>), else ""."""
    if len(token) == TOKEN_LENGTH and token[16] == "_" and token.startswith(TOKEN_PREFIX):
        return token[4:16]
    return ""


def _is_hex(text: str) -> bool:
    return bool(text) and _HEX.issuperset(text)


def _checked(record: Record | None) -> Record | None:
    """The record when it holds a key as _save writes it, else None (logged once): a
    record of another shape is no key, and would fail every route that reads it."""
    if record is None:
        return None
    d = record.data
    if (isinstance(d.get("hash"), str) and len(d["hash"]) == 64 and _is_hex(d["hash"])
            and isinstance(d.get("name"), str) and isinstance(d.get("created_by", ""), str)
            and isinstance(d.get("scopes"), list)
            and all(isinstance(scope, str) for scope in d["scopes"])
            and is_number(d.get("created")) and is_number(d.get("expires"))
            and (d.get("revoked") is None or is_number(d["revoked"]))
            and type(d.get("rate_limit_per_minute")) is int and d["rate_limit_per_minute"] > 0):
        return record
    malformed(KIND, record.key, "not an API key (hash, name, scopes, times or rate limit)")
    return None


def _used_at(record: Record) -> float:
    """A last-used record's time (0 for one of another shape, logged once)."""
    at = record.data.get("t")
    if is_number(at):
        return float(at)
    malformed(USED_KIND, record.key, "t is not a number")
    return 0.0


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
        # what a check finds a key's record in: the index, or on a shared store the record
        # authenticate() has just read
        self._rows: dict[str, _Key] = {} if self._index is None else self._index.rows
        self.held = False
        """True once this ApiKeys has found every key's record held in memory (a store
        only this process writes, its index loaded): from then on check() decides."""
        self._limits: dict[int, Limit] = {}  # by requests per minute
        self._uses: dict[str, _Use] = {}  # by id: the keys this process checked
        self.settings = settings or ApiKeySettings()
        self.audit = audit
        self.stats = stats or IdentityStats()
        self.clock = clock
        # id -> when it ends, of the keys active when this process last wrote or listed
        # them, and a heap of the same (end, id) pairs: `active` drops each as it passes
        self._ending: dict[str, float] = {}
        self._ends: list[tuple[float, str]] = []

    @property
    def active(self) -> int:
        """Keys neither expired nor revoked now, of those this process created, revoked
        or last listed (list() recounts them from the store every cleanup interval). A
        key drops out at its expiry, not at the next listing; a scrape costs one heap pop
        per key ended since the last one."""
        now = self.clock()
        ends, ending = self._ends, self._ending
        while ends and ends[0][0] <= now:
            end, key_id = heapq.heappop(ends)
            if ending.get(key_id) == end:  # else the key was written again since
                del ending[key_id]
        return len(ending)

    def _track(self, key: ApiKey) -> None:
        """Counts a key just written, until it ends."""
        self._ending[key.id] = key.ends
        heapq.heappush(self._ends, (key.ends, key.id))

    @property
    def stats(self) -> IdentityStats:
        return self._stats

    @stats.setter
    def stats(self, stats: IdentityStats) -> None:
        self._stats, self._passes = stats, stats.successes("apikey")

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
            use.renew(use.key, self._limit(use.key.per_minute))

    def _limit(self, per_minute: int) -> Limit:
        limit = self._limits.get(per_minute)
        if limit is None:
            limit = self._limits[per_minute] = Limit(per_minute, 60.0,
                                                     self._settings.rate_limit_burst)
        return limit

    def _hash(self, token: str) -> str:
        return self._digest(token).hex()

    def _digest(self, token: str) -> bytes:
        try:  # a valid token without the error handler's cost; a lone surrogate as ever
            raw = token.encode()
        except UnicodeEncodeError:
            raw = token.encode("utf-8", "surrogateescape")
        pepper = self._pepper
        return hmac.digest(pepper, raw, "sha256") if pepper else _sha256(raw).digest()

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
        self._track(key)
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
            self._index.rows[key.id] = _Key(record)

    async def revoke(self, key_id: str, *, actor: str = "admin", at: float | None = None
                     ) -> ApiKey | None:
        """Revokes a key now (or at `at`); None when there is no such key."""
        now = self.clock()
        record = _checked(await self.store.get_record(KIND, key_id, now))
        if record is None:
            return None
        key = _key_from(record, await self._last_used(key_id, now))
        if key.state(now) != "active":
            return key
        when = now if at is None else max(now, at)
        revoked = ApiKey(key.id, key.name, key.scopes, key.created, key.expires, when,
                         key.last_used, key.rate_limit_per_minute, key.created_by)
        await self._save(revoked, record.data["hash"])
        self._track(revoked)
        self._audit("apikey.revoke", actor, revoked, {"at": when})
        return revoked

    async def rotate(self, key_id: str, *, actor: str = "admin", grace: float = 0.0,
                     expires_in: float | None = None) -> tuple[ApiKey, str, ApiKey] | None:
        """A new key with the old one's name, scopes and rate limit; the old one is revoked
        after `grace` seconds (0: at once). Returns (new, token, old) or None."""
        record = _checked(await self.store.get_record(KIND, key_id, self.clock()))
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
        record = _checked(await self.store.get_record(KIND, key_id, now))
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
        used = {r.key: _used_at(r) for r in await self.store.list_records(USED_KIND, now)}
        keys = []
        for record in await self.store.list_records(KIND, now):
            if _checked(record) is None:
                continue
            use = self._uses.get(record.key)
            last = max(used.get(record.key, 0.0), use.at if use else 0.0) or None
            keys.append(_key_from(record, last))
        self._ending = {k.id: k.ends for k in keys if k.state(now) == "active"}
        self._ends = [(end, key_id) for key_id, end in self._ending.items()]
        heapq.heapify(self._ends)
        return sorted(keys, key=lambda k: (k.created, k.id))

    async def _last_used(self, key_id: str, now: float) -> float | None:
        use = self._uses.get(key_id)
        stored = await self.store.get_record(USED_KIND, key_id, now)
        last = max(_used_at(stored) if stored else 0.0, use.at if use else 0.0)
        return last or None

    # --- the check

    def check(self, token: str) -> KeyCheck:
        """authenticate() without awaiting anything, for when `held` (the HTTP layer's
        path): the same decision, counting, rate limit and last-used bookkeeping."""
        clock = self.clock  # an attribute, not a method: read, then called
        now = clock()
        # a3m_<12 hex>_<43 base64url>. A token of that length is hashed and the id in it
        # looked up; the rest of its shape is checked if it fails (_refused): a token that
        # matches a key's digest is that key, so its shape is right.
        if len(token) == TOKEN_LENGTH:
            key_id = token[4:16]
            try:  # self._digest(token), written out
                raw = token.encode()
            except UnicodeEncodeError:
                raw = token.encode("utf-8", "surrogateescape")
            pepper = self._pepper
            digest = hmac.digest(pepper, raw, "sha256") if pepper else _sha256(raw).digest()
            key = self._rows.get(key_id)
        else:
            key_id, key = "", None
            digest = self._digest(token if len(token) <= MAX_TOKEN_LENGTH else "")
        if key is None:
            _compare(digest, _DUMMY_HASH)  # the work a known id costs
            return self._refused(token, "unknown")
        matched = _compare(digest, key.hash)
        if not matched or key.ends <= now:
            return self._refused(token, _reason(key, matched, now))
        use = key.use
        if use is None or use.owner is not self:
            use = self._use(key_id, key)
        # gcra(use.tat, now, use.limit) at cost 1, written out; KeyCheck.limit gives its
        # Result from the same inputs
        limit = use.limit
        tat = use.tat
        base = now if now > tat else tat
        new_tat = base + limit._interval
        if now < new_tat - limit._span - SLACK:
            self._stats.verified("apikey", False, "rate_limited")
            return KeyCheck(False, "rate_limited", key_id, key.scopes,
                            _Decision(tat, now, limit))
        full = now + limit._span
        use.tat = full if full < new_tat else new_tat
        use.before, use.at = tat, now
        use.uses += 1
        self._passes.n += 1
        return use.passed

    def _use(self, key_id: str, key: _Key) -> _Use:
        """This ApiKeys' use of a key, for the key's record `key` (which keeps it at hand
        for the next check)."""
        use = self._uses.get(key_id)
        if use is None:
            use = self._uses[key_id] = _Use(self, key_id, key, self._limit(key.per_minute))
        elif use.key is not key:  # the record changed (or was read anew from a shared store)
            use.renew(key, self._limit(key.per_minute))
        key.use = use
        return use

    async def authenticate(self, token: str) -> KeyCheck:
        """Checks a presented key; counts, rate-limits and (written behind) audits it.

        The record comes from the index on a store only this process writes (loaded at
        the first check), else from the store itself (see the module's docstring): either
        way a revoke or rotation counts at the very next check.
        """
        index = self._index
        if index is not None:
            if not index.loaded:
                await self._load(index, self.clock())
            self.held = True
            return self.check(token)
        # a shared store: the record, read now, is what check() finds (for this check only)
        key_id = _key_id(token)
        record = _checked(await self.store.get_record(KIND, key_id, self.clock())
                          if key_id else None)
        if record is None:
            return self.check(token)
        rows = self._rows
        rows[key_id] = _Key(record)
        try:
            return self.check(token)
        finally:
            del rows[key_id]

    async def _load(self, index: LocalTable, now: float) -> None:
        """Fills the index from the store, once; entries written meanwhile are newer."""
        records = await self.store.list_records(KIND, now)
        if not index.loaded:
            for record in records:
                if _checked(record) is not None:
                    index.rows.setdefault(record.key, _Key(record))
            index.loaded = True

    def _refused(self, token: str, reason: str) -> KeyCheck:
        """A failed check of `token`: malformed whatever else failed when it is not shaped
        like a key."""
        key_id = _key_id(token)
        if not key_id:
            return self._failed("malformed", "")
        return self._failed(reason, key_id if _is_hex(key_id) else "")

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
            uses, last = use.uses, use.at
            if uses:  # a failed write leaves this key's uses and the later ones pending
                await self.store.put_record(Record(
                    USED_KIND, key_id, {"t": last},
                    use.key.expires + self.settings.keep_after_expiry))
                use.uses -= uses  # checks made while the write was awaited stay pending
                audit_verification(self.audit, "apikey", True, f"{TOKEN_PREFIX}{key_id}",
                                   {"uses": uses, "last_used": last})
            elif use.tat <= now:
                del self._uses[key_id]
                if use.key.use is use:
                    use.key.use = None
