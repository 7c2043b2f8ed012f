"""The in-process store: dicts, with the failure table bounded as an LRU.

A flood of distinct source addresses evicts the least recently seen keys, so
memory stays under max_keys entries; an evicted key has simply been forgotten,
which can only make the engine more lenient towards that one source.

Most keys only ever see one wrong password, so a key's failures are held as one
`(pwhash, time)` tuple and become a `{pwhash: time}` dict from the second
distinct password on (a tuple costs a third of a dict; at 1M keys that is the
difference between about 460 and about 300 bytes per key).
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from typing import TypeAlias

from security.attempts import Keys
from security.blocklist import Entry
from security.store import MAX_DISTINCT, FailureCounts, Lock, LockPolicy, LoginState, Record

# One failure (pwhash, time), or several {pwhash: time}.
Failures: TypeAlias = tuple[str, float] | dict[str, float]

# Most logins' state: no lock, no failure, no MFA asked. Frozen, so one object serves them
# all instead of a new one (four frozen-field writes) per check.
_UNLOCKED_UNCOUNTED = LoginState(None, 0, None, 0)


class MemoryStore:
    shared = False  # this process is the only one writing: the ban index needs no reload
    # Whether changed failure keys are collected in `dirty` for a write-behind (SqliteStore).
    # Nothing drains them here, so the memory store keeps the set empty: it stays bounded.
    write_behind = False

    # login_state and record_login_failure, the two calls of every login, read and count
    # through these dicts directly, not through awaits of the public methods (about 3 µs
    # of coroutines a login): a subclass that changes one of them must change both.
    _COMPOSED_FROM = ("get_lock", "failure_count", "record_failure", "mfa_fields")

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        changed = [name for name in cls._COMPOSED_FROM
                   if getattr(cls, name) is not getattr(MemoryStore, name)]
        if changed and (cls.login_state is MemoryStore.login_state
                        or cls.record_login_failure is MemoryStore.record_login_failure):
            raise TypeError(f"{cls.__name__} overrides {', '.join(changed)}: it must also "
                            "override login_state and record_login_failure")

    def __init__(self, max_keys: int = 250_000):
        self.max_keys = max_keys
        self._failures: OrderedDict[str, Failures] = OrderedDict()
        self._locks: dict[str, Lock] = {}
        self._offences: dict[str, tuple[int, float]] = {}
        self._bans: dict[str, Entry] = {}
        self._mfa: dict[str, dict[str, str]] = {}
        self.dirty: set[str] = set()  # failure keys changed since the last flush
        self._records: dict[str, dict[str, Record]] = {}  # kind -> key -> record
        self._groups: dict[tuple[str, str], set[str]] = {}  # (kind, group) -> keys

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def tracked_keys(self) -> int:
        return len(self._failures)

    async def refresh(self) -> None:
        """Drops offence counts whose window has passed."""
        now = time.time()
        for key in [k for k, (_, expires) in self._offences.items() if expires <= now]:
            del self._offences[key]
        self.expire_records(now)

    # --- failures

    async def record_failure(self, key: str, pwhash: str, now: float, window: float) -> int:
        return self._record_failure(key, pwhash, now, window)

    def _record_failure(self, key: str, pwhash: str, now: float, window: float) -> int:
        # without a hash every failure is a distinct password (unique across restarts)
        pwhash = pwhash or f"#{secrets.token_hex(8)}"
        failures = self._failures
        if self.write_behind:
            self.dirty.add(key)
        seen = failures.get(key)
        if seen is None:
            failures[key] = (pwhash, now)
            if len(failures) > self.max_keys:
                evicted, _ = failures.popitem(last=False)
                if self.write_behind:
                    self.dirty.add(evicted)
            return 1
        failures.move_to_end(key)
        if isinstance(seen, tuple):
            if seen[1] < now - window or seen[0] == pwhash:  # gone from the window, or a retry
                failures[key] = (pwhash, now)
                return 1
            seen = failures[key] = {seen[0]: seen[1], pwhash: now}  # MAX_DISTINCT >= 2
            return 2
        _prune(seen, now - window)
        seen[pwhash] = now
        if len(seen) > MAX_DISTINCT:
            del seen[min(seen, key=seen.__getitem__)]
        return len(seen)

    async def failure_count(self, key: str, now: float, window: float) -> int:
        return self._failure_count(key, now, window)

    def _failure_count(self, key: str, now: float, window: float) -> int:
        seen = self._failures.get(key)
        if not seen:
            return 0
        cutoff = float(now - window)
        if isinstance(seen, tuple):
            return 1 if seen[1] >= cutoff else 0
        # t >= cutoff for each time, in C (a float compares exactly with an int time):
        # 0.41 against 0.63 µs for a generator over 3 times, 5.1 against 6.0 over 100
        return sum(map(cutoff.__le__, seen.values()))

    async def clear_failures(self, key: str) -> None:
        if self._failures.pop(key, None) is not None and self.write_behind:
            self.dirty.add(key)

    def failures_of(self, key: str) -> dict[str, float] | None:
        """A key's failures as {pwhash: time} (a copy), or None for an unknown key."""
        seen = self._failures.get(key)
        if seen is None:
            return None
        return {seen[0]: seen[1]} if isinstance(seen, tuple) else dict(seen)

    def snapshot_failures(self, key: str) -> tuple[tuple[str, float], ...]:
        """A key's (pwhash, time) pairs, safe to hand to another thread (empty if unknown)."""
        seen = self._failures.get(key)
        if seen is None:
            return ()
        return (seen,) if isinstance(seen, tuple) else tuple(seen.items())

    def load_failures(self, key: str, seen: dict[str, float]) -> None:
        self._failures[key] = next(iter(seen.items())) if len(seen) == 1 else seen

    # --- locks and offences

    async def get_lock(self, key: str, now: float) -> Lock | None:
        return self._lock(key, now)

    def _lock(self, key: str, now: float) -> Lock | None:
        lock = self._locks.get(key)
        if lock is not None and lock.until <= now:
            return None
        return lock

    async def put_lock(self, lock: Lock) -> None:
        self._locks[lock.key] = lock

    async def delete_lock(self, key: str) -> Lock | None:
        return self._locks.pop(key, None)

    async def locks(self, now: float) -> list[Lock]:
        for key in [k for k, lock in self._locks.items() if lock.until <= now]:
            del self._locks[key]
        return sorted(self._locks.values(), key=lambda lock: (lock.created, lock.key))

    async def bump_offences(self, key: str, now: float, window: float) -> int:
        count, expires = self._offences.get(key, (0, 0.0))
        count = count + 1 if expires > now else 1
        self._offences[key] = (count, now + window)
        return count

    # --- the decision path, composed of the calls above (see _COMPOSED_FROM); what a
    # subclass writes through (SqliteStore: locks, offences) is still awaited

    async def login_state(self, keys: Keys, now: float, window: float, failures: bool,
                          mfa_user: str | None) -> LoginState:
        lock = self._lock(keys.pair, now) or self._lock(keys.account, now)
        if lock is not None:
            return LoginState(lock, 0, None, 0)
        count = self._failure_count(keys.pair, now, window) if failures else 0
        if mfa_user is None:
            return LoginState(None, count, None, 0) if count else _UNLOCKED_UNCOUNTED
        fields = dict(self._mfa.get(mfa_user, {}))  # mfa_fields
        source = self._failure_count(keys.source, now, window) if fields else 0
        return LoginState(None, count, fields, source)

    async def record_login_failure(self, keys: Keys, pwhash: str, now: float,
                                   policy: LockPolicy) -> FailureCounts:
        window = policy.window
        pair_locked = self._lock(keys.pair, now) is not None
        pair = self._record_failure(keys.pair, pwhash, now, window)
        account = 0 if pair_locked else self._record_failure(keys.account, pwhash, now, window)
        source = self._record_failure(keys.source, pwhash, now, window)
        login, network = keys.account.removeprefix("a:"), keys.source.removeprefix("s:")
        locks = []
        if pair >= policy.pair_threshold and not pair_locked:
            locks.append(await self._make_lock(keys.pair, "source_account", login, network,
                                               now, policy.pair_reason % pair, policy))
        if account >= policy.account_threshold and self._lock(keys.account, now) is None:
            locks.append(await self._make_lock(keys.account, "account", login, "", now,
                                               policy.account_reason % account, policy))
        return FailureCounts(pair, account, source, tuple(locks))

    async def _make_lock(self, key: str, scope: str, account: str, source: str, now: float,
                         reason: str, policy: LockPolicy) -> Lock:
        level = await self.bump_offences(key, now, policy.escalation_window)
        lock = Lock(key, scope, account, source, reason, now, now + policy.duration(level),
                    level)
        await self.put_lock(lock)
        await self.clear_failures(key)
        return lock

    # --- bans

    async def put_ban(self, ban: Entry) -> None:
        self._bans[ban.network] = ban

    async def delete_ban(self, network: str) -> Entry | None:
        return self._bans.pop(network, None)

    async def bans(self, now: float) -> list[Entry]:
        for key in [k for k, b in self._bans.items() if b.expires is not None and b.expires <= now]:
            del self._bans[key]
        return sorted(self._bans.values(), key=lambda b: (b.created, b.network))

    # --- MFA state (no await between a read and its write: atomic on the event loop)

    async def mfa_fields(self, user: str) -> dict[str, str]:
        return dict(self._mfa.get(user, {}))

    async def mfa_get(self, user: str, field: str) -> str | None:
        return self._mfa.get(user, {}).get(field)

    async def mfa_put(self, user: str, field: str, value: str) -> None:
        self._mfa.setdefault(user, {})[field] = value

    async def mfa_pop(self, user: str, field: str) -> str | None:
        fields = self._mfa.get(user)
        if fields is None or field not in fields:
            return None
        value = fields.pop(field)
        if not fields:
            del self._mfa[user]
        return value

    async def mfa_incr(self, user: str, field: str) -> int:
        fields = self._mfa.setdefault(user, {})
        value = int(fields.get(field, "0")) + 1
        fields[field] = str(value)
        return value

    async def mfa_advance(self, user: str, field: str, value: int) -> bool:
        return self._mfa_advance(user, field, value)

    def _mfa_advance(self, user: str, field: str, value: int) -> bool:
        fields = self._mfa.setdefault(user, {})
        current = fields.get(field)
        if current is not None and int(current) >= value:
            return False
        fields[field] = str(value)
        return True

    async def mfa_delete(self, user: str, prefix: str = "") -> int:
        fields = self._mfa.get(user)
        if not fields:
            return 0
        gone = [name for name in fields if name.startswith(prefix)]
        for name in gone:
            del fields[name]
        if not fields:
            del self._mfa[user]
        return len(gone)

    async def mfa_users(self) -> list[str]:
        return sorted(self._mfa)


    # --- records

    def expire_records(self, now: float) -> list[Record]:
        """Drops every expired record; returns them."""
        gone = [rec for table in self._records.values() for rec in table.values()
                if rec.expires is not None and rec.expires <= now]
        for rec in gone:
            self._forget(rec.kind, rec.key)
        return gone

    def _forget(self, kind: str, key: str) -> Record | None:
        rec = self._records.get(kind, {}).pop(key, None)
        if rec is not None and rec.group:
            members = self._groups.get((kind, rec.group))
            if members is not None:
                members.discard(key)
                if not members:
                    del self._groups[(kind, rec.group)]
        return rec

    async def put_record(self, record: Record) -> None:
        self._forget(record.kind, record.key)
        self._records.setdefault(record.kind, {})[record.key] = record
        if record.group:
            self._groups.setdefault((record.kind, record.group), set()).add(record.key)

    async def add_record(self, record: Record, now: float) -> bool:
        if await self.get_record(record.kind, record.key, now) is not None:
            return False
        await self.put_record(record)
        return True

    async def get_record(self, kind: str, key: str, now: float) -> Record | None:
        table = self._records.get(kind)
        rec = table.get(key) if table is not None else None
        if rec is None or (rec.expires is not None and rec.expires <= now):
            return None
        return rec

    async def delete_record(self, kind: str, key: str) -> Record | None:
        return self._forget(kind, key)

    async def list_records(self, kind: str, now: float, group: str | None = None
                           ) -> list[Record]:
        table = self._records.get(kind, {})
        keys = table.keys() if group is None else self._groups.get((kind, group), set())
        found = [table[k] for k in keys]
        return sorted((r for r in found if r.expires is None or r.expires > now),
                      key=lambda r: r.key)

    async def touch_records(self, kind: str, expiries: dict[str, float]) -> None:
        table = self._records.get(kind, {})
        for key, expires in expiries.items():
            rec = table.get(key)
            if rec is not None:
                rec.expires = expires
                self.moved(rec)

    def moved(self, record: Record) -> None:
        """Called when a record's expiry moved (SQLite writes it behind)."""


def _prune(seen: dict[str, float], cutoff: float) -> None:
    for pwhash in [h for h, t in seen.items() if t < cutoff]:
        del seen[pwhash]
