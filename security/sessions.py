"""Web sessions kept in the engine's store, so replicas sharing Redis share them.

A session id is 32 random bytes (base64url); the store keys a session by the SHA-256
of its id, so a copy of the store holds no usable id. Each session has an idle
timeout (`timeout`: its expiry moves forward on use, written behind every second)
and an absolute one (`absolute_timeout` after creation, never extended). A change of
privilege rotates the id (the old one stops working at once), a user holds at most
`max_sessions_per_user` sessions (creating one more ends the oldest), and a cleanup
task drops expired sessions every `cleanup_interval` (Redis expires them by TTL).

Where a validation finds the session: on a store this process alone writes (memory,
SQLite) in an in-memory table of the session records, loaded from the store at the first
validation and changed right after the store by every create, rotate, eviction and
revoke (every Sessions on one store shares it), so a validation awaits nothing: once the
table is loaded (`held`) the HTTP layer calls the synchronous check(). On a shared store
(Redis) every validation is validate(), which reads the store every time, so a session
revoked through another replica ends at its very next use. From the table, the Session
of a recently validated session is kept with its record and handed out again while
neither changed.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from security.engine import Auditor, record_audit
from security.identity import (
    IdentityStats,
    LocalTable,
    audit_verification,
    is_number,
    local_table,
    malformed,
)
from security.store import Record, Store

KIND = "session"
MAX_ID_LENGTH = 128
CREATE_STRIPES = 64  # locks that serialise one user's session creates in a process
SAME_SITE = ("Strict", "Lax", "None")
_sha256 = hashlib.sha256
VALID_CACHE = 1024  # sessions whose last answer is kept (oldest dropped first)


@dataclass(frozen=True)
class SessionSettings:
    timeout: float = 3600.0
    absolute_timeout: float = 12 * 3600.0
    cleanup_interval: float = 300.0
    max_sessions_per_user: int = 10
    secure_cookies: bool = True
    cookie_same_site: str = "Strict"
    cookie_name: str = "a3m_session"
    touch_interval: float = 1.0
    """Idle-timer moves are written to the store this often (and only when they move more)."""


@dataclass(slots=True)
class Session:
    key: str  # SHA-256 of the id: what the store and the audit log know
    user: str
    privilege: str
    created: float
    idle_expires: float
    absolute_expires: float

    @property
    def expires_at(self) -> float:
        return min(self.idle_expires, self.absolute_expires)

    def as_dict(self) -> dict[str, Any]:
        return {"user": self.user, "privilege": self.privilege, "created": self.created,
                "expires_at": self.expires_at, "idle_expires_at": self.idle_expires,
                "absolute_expires_at": self.absolute_expires}


def session_key(session_id: str) -> str:
    try:  # a valid id without the error handler's cost; a lone surrogate the same as ever
        raw = session_id.encode()
    except UnicodeEncodeError:
        raw = session_id.encode("utf-8", "surrogateescape")
    return _sha256(raw).hexdigest()


def _checked(record: Record | None) -> Record | None:
    """The record when it holds a session as _put writes it, else None (logged once): a
    record of another shape is no session, and would fail every route that reads it."""
    if record is None:
        return None
    d = record.data
    if (isinstance(d.get("user"), str) and isinstance(d.get("privilege"), str)
            and is_number(d.get("created")) and is_number(d.get("absolute"))):
        return record
    malformed(KIND, record.key, "not a session (user, privilege, created or absolute)")
    return None


def _session(record: Record) -> Session:
    d = record.data
    expires = record.expires if record.expires is not None else d["absolute"]
    return Session(record.key, d["user"], d["privilege"], d["created"], expires, d["absolute"])


class Sessions:
    def __init__(self, store: Store, settings: SessionSettings | None = None,
                 audit: Auditor | None = None, stats: IdentityStats | None = None,
                 clock: Callable[[], float] = time.time):
        self.store = store
        self.settings = settings or SessionSettings()
        self.audit = audit
        self.stats = stats or IdentityStats()
        self.clock = clock
        self.active = 0
        self.held = False
        """True once this Sessions has found every session's record held in memory (a
        store only this process writes, its table loaded): from then on check() decides."""
        self._touches: dict[str, float] = {}  # session key -> new idle expiry, not yet written
        self._table = local_table(store, KIND)  # None: every validation reads the store
        # what check() finds a session's record in: the table, or on a shared store the
        # record validate() has just read
        self._rows: dict[str, Record] = {} if self._table is None else self._table.rows
        # key -> the last answer, for records from the table (a shared store's are new
        # every read: nothing to keep)
        self._valid: dict[str, tuple[Record, float, Session]] | None = (
            None if self._table is None else {})
        # one user's creates, one at a time (striped: bounded whatever the users): the cap's
        # check and the insert are two awaits, and 40 logins at once left 25 sessions
        self._creating = [asyncio.Lock() for _ in range(CREATE_STRIPES)]

    @property
    def stats(self) -> IdentityStats:
        return self._stats

    @stats.setter
    def stats(self, stats: IdentityStats) -> None:
        self._stats, self._passes = stats, stats.successes("session")

    # --- lifecycle of one session

    async def create(self, user: str, privilege: str = "user", *, actor: str = "api"
                     ) -> tuple[Session, str]:
        """A new session and its id (give it to the browser, e.g. with cookie())."""
        async with self._creating[hash(user) % CREATE_STRIPES]:
            now = self.clock()
            evicted = await self._make_room(user, now)
            session_id = secrets.token_urlsafe(32)
            session = await self._put(session_key(session_id), user, privilege, now,
                                      now + self.settings.absolute_timeout, now)
        self.active += 1 - evicted
        self._audit("session.create", actor, session, {"privilege": privilege,
                                                       "evicted": evicted})
        return session, session_id

    async def _put(self, key: str, user: str, privilege: str, created: float,
                   absolute: float, now: float) -> Session:
        idle = min(now + self.settings.timeout, absolute)
        record = Record(KIND, key, {"user": user, "privilege": privilege, "created": created,
                                    "absolute": absolute}, idle, group=user)
        await self.store.put_record(record)
        if self._table is not None:
            self._table.rows[key] = record
        return Session(key, user, privilege, created, idle, absolute)

    async def _delete(self, key: str) -> Record | None:
        record = await self.store.delete_record(KIND, key)
        self._touches.pop(key, None)
        if self._valid is not None:
            self._valid.pop(key, None)
        if self._table is not None:
            self._table.rows.pop(key, None)
        return record

    async def _make_room(self, user: str, now: float) -> int:
        """Ends the user's oldest sessions until one more fits; returns how many."""
        current = sorted((_session(r) for r in await self.store.list_records(
            KIND, now, group=user) if _checked(r)), key=lambda s: (s.created, s.key))
        excess = len(current) - self.settings.max_sessions_per_user + 1
        for old in current[:max(0, excess)]:
            await self._delete(old.key)
            self._audit("session.evict", "engine", old, {"reason": "max_sessions_per_user"})
        return max(0, excess)

    def check(self, session_id: str, touch: bool = True) -> Session | None:
        """validate() without awaiting anything, for when `held` (the HTTP layer's path):
        the same answer, idle-timer touch and counting."""
        if len(session_id) > MAX_ID_LENGTH:
            self._failed("malformed")
            return None
        clock = self.clock  # an attribute, not a method: read, then called
        now = clock()
        key = session_key(session_id)
        record = self._rows.get(key)
        if record is None or (record.expires is not None and record.expires <= now):
            self._failed("unknown_or_expired")  # an expired table record: as the store says
            return None
        data = record.data
        absolute = data["absolute"]
        idle = record.expires
        if idle is None:
            idle = absolute
        if touch:
            settings = self.settings
            moved = now + settings.timeout
            if moved > absolute:
                moved = absolute
            if moved - idle > settings.touch_interval:  # the store's expiry lags: move it
                pending = self._touches.get(key)
                if pending is None or moved - pending > settings.touch_interval:
                    self._touches[key] = pending = moved
                idle = pending  # written behind by flush()
        self._passes.n += 1
        kept = self._valid
        if kept is None:  # a record read anew from a shared store: nothing to reuse
            return Session(key, data["user"], data["privilege"], data["created"], idle,
                           absolute)
        valid = kept.get(key)
        if valid is not None and valid[0] is record and valid[1] == idle:
            return valid[2]
        session = Session(key, data["user"], data["privilege"], data["created"], idle, absolute)
        if len(kept) >= VALID_CACHE:
            del kept[next(iter(kept))]
        kept[key] = (record, idle, session)
        return session

    async def validate(self, session_id: str, touch: bool = True) -> Session | None:
        """The live session of this id, or None; `touch` restarts its idle timer.

        From the table on a store only this process writes (loaded at the first
        validation), else read from the store (see the module's docstring)."""
        table = self._table
        if table is not None:
            if not table.loaded:
                await self._load(table, self.clock())
            self.held = True
            return self.check(session_id, touch)
        if len(session_id) > MAX_ID_LENGTH:
            return self.check(session_id, touch)  # malformed
        # a shared store: the record, read now, is what check() finds (for this check only;
        # check() hashes the id once more, a microsecond beside the store's round trip)
        key = session_key(session_id)
        record = _checked(await self.store.get_record(KIND, key, self.clock()))
        if record is None:
            return self.check(session_id, touch)
        rows = self._rows
        rows[key] = record
        try:
            return self.check(session_id, touch)
        finally:
            del rows[key]

    async def _load(self, table: LocalTable, now: float) -> None:
        """Fills the table from the store, once; records written meanwhile are newer."""
        records = await self.store.list_records(KIND, now)
        if not table.loaded:
            for record in records:
                if _checked(record) is not None:
                    table.rows.setdefault(record.key, record)
            table.loaded = True

    async def revoke(self, session_id: str, *, actor: str = "api") -> Session | None:
        return await self.revoke_key(session_key(session_id), actor=actor)

    async def revoke_key(self, key: str, *, actor: str = "api") -> Session | None:
        record = _checked(await self._delete(key))
        if record is None:
            return None
        session = _session(record)
        self.active = max(0, self.active - 1)
        self._audit("session.revoke", actor, session, {})
        return session

    async def revoke_user(self, user: str, *, actor: str = "api") -> int:
        """Ends every session of a user (after a password change, say)."""
        records = [r for r in await self.store.list_records(KIND, self.clock(), group=user)
                   if _checked(r)]
        for record in records:
            await self.revoke_key(record.key, actor=actor)
        return len(records)

    async def rotate(self, session_id: str, privilege: str | None = None, *,
                     actor: str = "api") -> tuple[Session, str] | None:
        """A new id for a live session (on login, privilege change): the old id ends now.

        The creation time and absolute expiry carry over, so rotating never extends a
        session's life."""
        old = await self.validate(session_id, touch=False)
        if old is None:
            return None
        now = self.clock()
        new_id = secrets.token_urlsafe(32)
        await self._delete(old.key)
        new = await self._put(session_key(new_id), old.user, privilege or old.privilege,
                              old.created, old.absolute_expires, now)
        self._audit("session.rotate", actor, new, {"previous": old.key[:16],
                                                   "from": old.privilege, "to": new.privilege})
        return new, new_id

    def _audit(self, type_: str, actor: str, session: Session, details: dict[str, Any]) -> None:
        record_audit(self.audit, type_, actor, session.user, {"session": session.key[:16],
                                                              **details})

    def _failed(self, reason: str) -> None:
        self.stats.verified("session", False, reason)
        audit_verification(self.audit, "session", False, "unknown", {"reason": reason})

    # --- cookies

    def cookie(self, session_id: str, session: Session) -> str:
        """The Set-Cookie value: __Host- prefixed, Secure, HttpOnly, SameSite, Path=/."""
        max_age = max(0, int(session.expires_at - self.clock()))
        return self._cookie(session_id, max_age)

    def clear_cookie(self) -> str:
        return self._cookie("", 0)

    def _cookie(self, value: str, max_age: int) -> str:
        s = self.settings
        # __Host- needs Secure, Path=/ and no Domain; browsers refuse it otherwise
        name = f"__Host-{s.cookie_name}" if s.secure_cookies else s.cookie_name
        parts = [f"{name}={value}", "Path=/", f"Max-Age={max_age}"]
        if s.secure_cookies:
            parts.append("Secure")
        parts += ["HttpOnly", f"SameSite={s.cookie_same_site}"]
        return "; ".join(parts)

    # --- background work

    async def flush(self) -> None:
        """Writes the idle-timer moves since the last flush."""
        if not self._touches:
            return
        touches, self._touches = self._touches, {}
        try:
            await self.store.touch_records(KIND, touches)
        except BaseException:
            for key, expires in touches.items():
                self._touches.setdefault(key, expires)
            raise
        if self._table is not None:  # the store's records moved: so do the table's
            rows = self._table.rows
            for key, expires in touches.items():
                record = rows.get(key)
                if record is not None:
                    rows[key] = Record(record.kind, key, record.data, expires, record.group)

    async def cleanup(self) -> int:
        """Drops expired sessions and recounts the active ones; returns how many are active."""
        await self.flush()
        now = self.clock()
        sessions = [r for r in await self.store.list_records(KIND, now) if _checked(r)]
        self.active = len(sessions)
        if self._table is not None and self._table.loaded:  # drop what has expired
            rows = self._table.rows
            for key in [k for k, r in rows.items() if r.expires is not None and r.expires <= now]:
                del rows[key]
        if self._valid is not None:
            self._valid.clear()
        return self.active
