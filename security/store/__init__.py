"""Where the security engine keeps its state: one interface, several backends.

`memory` (tests, or when nothing may touch disk), `sqlite` (the embedded default,
in the state dir: the memory store plus a write-through of locks and bans and a
write-behind of failure counters every flush interval, so no request waits for
a disk write) and `redis` (state shared by several replicas).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from security.attempts import Keys
from security.blocklist import Entry

# A key never remembers more distinct passwords than this: every threshold is below it.
MAX_DISTINCT = 256


@dataclass
class Lock:
    key: str  # the failure key it guards: p:<network>|<account> or a:<account>
    scope: str  # source_account | account
    account: str
    source: str  # the network, or "" for a whole-account lock
    reason: str
    created: float
    until: float
    level: int  # 1 for a first offence, 2 for the next within the escalation window, ...

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Record:
    """One item of identity state (an API key, a session, a password history, a replay id).

    `kind` names the table, `key` the item within it, `group` an optional index
    (the user of a session) that list_records() can select by. A record with an
    `expires` time is gone once that time has passed (a TTL in Redis).
    """

    kind: str
    key: str
    data: dict[str, Any]
    expires: float | None = None
    group: str = ""


@dataclass(frozen=True)
class LockPolicy:
    """When failures lock a key, as Store.record_login_failure applies it (the engine builds
    it from its settings). A key is locked once its distinct failures within `window` reach
    its threshold; the lock lasts durations[level - 1] (the last one for any later level),
    level counting the key's locks within escalation_window; its reason is the template
    with the count (printf `%d`, which Python and Redis's Lua format alike)."""

    window: float
    pair_threshold: int
    account_threshold: int
    escalation_window: float
    durations: tuple[float, ...]
    pair_reason: str
    account_reason: str

    def duration(self, level: int) -> float:
        return self.durations[min(level, len(self.durations)) - 1]


@dataclass(frozen=True)
class LoginState:
    """What SecurityManager.check reads from the store for one attempt, in one call."""

    lock: Lock | None  # the pair's lock, else the account's (a lock whose `until` passed: none)
    failures: int  # the pair's distinct failures within the window (0 when not asked)
    mfa: dict[str, str] | None  # the user's MFA fields (None when not asked)
    source_failures: int  # the source's, only when MFA was asked and the user has fields


@dataclass(frozen=True)
class FailureCounts:
    """What one wrong password did (Store.record_login_failure)."""

    pair: int  # distinct failures within the window, per key
    account: int  # 0 when the pair was locked already (it cannot push the whole account)
    source: int
    locks: tuple[Lock, ...]  # the locks it made: the pair's first, then the account's


class StoreUnavailable(Exception):
    """The backend cannot be reached; the engine fails open or closed as configured."""


def is_outage(exc: BaseException) -> bool:
    """Whether `exc` says the store cannot be reached rather than that the code is wrong:
    StoreUnavailable, or redis-py's connection and timeout errors (the Redis store lets
    them through, as every caller of a store call must expect the store to be away)."""
    if isinstance(exc, StoreUnavailable):
        return True
    redis = sys.modules.get("redis.exceptions")  # imported only with the Redis store
    return redis is not None and isinstance(exc, (redis.ConnectionError, redis.TimeoutError))


class Store(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def record_failure(self, key: str, pwhash: str, now: float, window: float) -> int:
        """Remembers one failed password for key; returns the distinct ones within window."""
        ...

    async def failure_count(self, key: str, now: float, window: float) -> int: ...

    async def clear_failures(self, key: str) -> None: ...

    async def get_lock(self, key: str, now: float) -> Lock | None: ...

    async def put_lock(self, lock: Lock) -> None: ...

    async def delete_lock(self, key: str) -> Lock | None: ...

    async def locks(self, now: float) -> list[Lock]: ...

    async def bump_offences(self, key: str, now: float, window: float) -> int:
        """Counts one more lockout of key within window; returns the count."""
        ...

    async def put_ban(self, ban: Entry) -> None: ...

    async def delete_ban(self, network: str) -> Entry | None: ...

    async def bans(self, now: float) -> list[Entry]: ...

    # --- the decision path: everything check() reads, and everything a wrong password
    # writes, in one call each (one round trip, one atomic script on Redis). The memory
    # and SQLite stores compose them from the methods above; their behaviour is the same.

    async def login_state(self, keys: Keys, now: float, window: float, failures: bool,
                          mfa_user: str | None) -> LoginState:
        """The pair's lock, else the account's; unless locked: with `failures`, the pair's
        distinct failures within window; with mfa_user, that user's MFA fields and, when it
        has any, the source's distinct failures within window."""
        ...

    async def record_login_failure(self, keys: Keys, pwhash: str, now: float,
                                   policy: LockPolicy) -> FailureCounts:
        """One wrong password: recorded for the pair, the account (unless the pair is
        locked) and the source; the pair locked when it reaches its threshold (and is not
        locked), then the account likewise; each lock bumps its key's offences (the level),
        and clears its key's failures."""
        ...

    def tracked_keys(self) -> int: ...

    async def refresh(self) -> None:
        """Periodic upkeep (the engine calls it every maintenance interval)."""
        ...

    # --- MFA state (security/mfa/): per user, named string fields, written through.
    # Secrets arrive already sealed (AES-GCM) and codes only as keyed hashes.

    async def mfa_fields(self, user: str) -> dict[str, str]:
        """Every field of user (empty when none)."""
        ...

    async def mfa_get(self, user: str, field: str) -> str | None: ...

    async def mfa_put(self, user: str, field: str, value: str) -> None: ...

    async def mfa_pop(self, user: str, field: str) -> str | None:
        """Removes the field and returns its value: of concurrent callers only one gets it
        (single-use codes, challenges)."""
        ...

    async def mfa_incr(self, user: str, field: str) -> int:
        """Adds one to an integer field (missing: 0) and returns the new value, atomically."""
        ...

    async def mfa_advance(self, user: str, field: str, value: int) -> bool:
        """Stores value only when it is greater than the field's integer (or the field is
        missing), atomically; False otherwise (a replayed TOTP step, a sign counter that
        went back)."""
        ...

    async def mfa_delete(self, user: str, prefix: str = "") -> int:
        """Removes user's fields whose name starts with prefix (all of them for ""); returns
        how many were removed."""
        ...

    async def mfa_users(self) -> list[str]:
        """Users with at least one field, sorted."""
    # --- records (identity: API keys, sessions, password history, replay guards)

    async def put_record(self, record: Record) -> None:
        """Creates or replaces the record of (kind, key). Written through."""
        ...

    async def add_record(self, record: Record, now: float) -> bool:
        """Creates the record only if (kind, key) is absent or expired: True when it did.

        Atomic, also across replicas sharing Redis: the replay guard of one-time values.
        """
        ...

    async def get_record(self, kind: str, key: str, now: float) -> Record | None: ...

    async def delete_record(self, kind: str, key: str) -> Record | None: ...

    async def list_records(self, kind: str, now: float, group: str | None = None
                           ) -> list[Record]:
        """Unexpired records of a kind (of one group only when given), by key."""
        ...

    async def touch_records(self, kind: str, expiries: dict[str, float]) -> None:
        """Moves the expiry of records that still exist (a session's idle timer);
        never recreates a deleted one. May be written behind."""
        ...


def open_store(kind: str, *, path: str = "", max_keys: int = 250_000,
               flush_interval: float = 1.0, url: str = "", password: str | None = None,
               prefix: str = "a3m:") -> Store:
    """The configured backend (not yet opened)."""
    from security.store.memory import MemoryStore

    if kind == "redis":
        from security.store.redis import RedisStore

        return RedisStore(url, password=password, prefix=prefix, max_keys=max_keys)
    if kind == "memory":
        return MemoryStore(max_keys=max_keys)
    if kind == "sqlite":
        from security.store.sqlite import SqliteStore

        return SqliteStore(path, max_keys=max_keys, flush_interval=flush_interval)
    raise ValueError(f"unknown store type {kind!r}")
