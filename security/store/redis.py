"""The shared store: several exporter replicas keep one state in Redis.

The decision path costs one round trip per call: a check is one Lua script
(login_state: both locks, the tarpit's count, the user's MFA fields), a wrong
password another (record_login_failure: three failure windows, the lock checks,
the locks it makes with their offence counts), both atomic on the server, so
replicas failing one account at once make one lock. Failure windows, locks and
offence counters carry a TTL, so Redis memory is bounded by the windows and lock
durations (run it with maxmemory and `maxmemory-policy volatile-lru` as a last
resort). Failure windows and locks are judged by the caller's `now`, as on the
memory store; an offence counter lasts its escalation window in Redis's time (its
TTL). The keys are those every earlier version wrote, in the same format, so
replicas of both versions can share one Redis during an upgrade. A lock
written through one replica is seen by the others at their next check; bans reach
the other replicas' in-memory index within the engine's maintenance interval (5 s).
Connection errors surface as exceptions: the engine fails open or closed as
configured, and redis-py reconnects on the next call.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import secrets
import time
from typing import Any

from redis import asyncio as aioredis

from security.attempts import Keys
from security.blocklist import Entry
from security.store import MAX_DISTINCT, FailureCounts, Lock, LockPolicy, LoginState, Record

log = logging.getLogger(__name__)
PRUNE_SAMPLE = 16  # index members checked for a removed record at each record write

# Lua functions the scripts below share. Times arrive as Python's repr (exact) and are
# written back as received or with %.17g (exact): Lua's own number-to-string has only 14
# digits, which would round a microsecond timestamp.
_FUNCTIONS = """
-- a failure zset: drops what fell out of the window, adds member, caps the distinct
-- passwords remembered; returns how many are within the window
local function record(key, now, cutoff, window, member, cap)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. cutoff)
  redis.call('ZADD', key, now, member)
  local n = redis.call('ZCARD', key)
  if n > cap then
    redis.call('ZREMRANGEBYRANK', key, 0, n - cap - 1)
    n = cap
  end
  redis.call('PEXPIRE', key, math.ceil(tonumber(window) * 1000))
  return n
end

-- the failure-key index (a zset of keys by the time their window ends): the key just
-- written is put in, keys whose window has ended are taken out, and beyond `cap` keys the
-- ones whose window ends first are deleted (an LRU, as the memory store's max_keys: a flood
-- of distinct addresses cannot fill Redis). The evicted keys are named from `prefix`, not
-- passed in KEYS: this holds on one Redis (or a primary with replicas), not on a Cluster.
local function track(index, prefix, key, now, window, cap)
  redis.call('ZREMRANGEBYSCORE', index, '-inf', now)
  redis.call('ZADD', index, now + tonumber(window), key)
  local over = redis.call('ZCARD', index) - cap
  if over > 0 then
    for _, old in ipairs(redis.call('ZRANGE', index, 0, over - 1)) do
      redis.call('DEL', prefix .. old)
    end
    redis.call('ZREMRANGEBYRANK', index, 0, over - 1)
  end
end

-- a lock's JSON while its `until` is after now, else false (also for a value that is not
-- a lock's JSON: a hand edit must not fail every login of the account)
local function live_lock(key, now)
  local raw = redis.call('GET', key)
  if not raw then return false end
  local ok, lock = pcall(cjson.decode, raw)
  if ok and type(lock) == 'table' and type(lock['until']) == 'number'
      and lock['until'] > now then
    return raw
  end
  return false
end

local function exact(number)
  local text = string.format('%.17g', number)
  if not string.find(text, '[.eEn]') then text = text .. '.0' end  -- JSON reads it as a float
  return text
end

-- one more offence of a key: a counter that expires a window after its last bump (in
-- Redis's time, as replicas of every version count it)
local function offence(key, window)
  local count = redis.call('INCR', key)
  redis.call('PEXPIRE', key, math.ceil(tonumber(window) * 1000))
  return count
end
"""

# KEYS[1] failure zset; ARGV: now, cutoff (now - window), window, member, max distinct
# -> distinct count
_RECORD_FAILURE = _FUNCTIONS + """
local n = record(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]))
track(KEYS[2], ARGV[6], ARGV[7], tonumber(ARGV[1]), ARGV[3], tonumber(ARGV[8]))
return n
"""
# KEYS[1] offence counter; ARGV: window seconds -> count within the window
_BUMP_OFFENCES = _FUNCTIONS + """
return offence(KEYS[1], ARGV[1])
"""

# Everything check() reads. KEYS: pair lock, account lock, pair failures, MFA hash, source
# failures; ARGV: now, cutoff (now - window), count the pair's failures (1/0), read the
# MFA hash (1/0) -> {1 or 2 (the pair's or the account's lock), lock JSON} when locked,
# else {0, false, pair failures, MFA hash as a flat list or false, source failures}
_LOGIN_STATE = _FUNCTIONS + """
local now = tonumber(ARGV[1])
for i = 1, 2 do
  local lock = live_lock(KEYS[i], now)
  if lock then return {i, lock} end
end
local failures = 0
if ARGV[3] == '1' then failures = redis.call('ZCOUNT', KEYS[3], ARGV[2], '+inf') end
local fields, source = false, 0
if ARGV[4] == '1' then
  fields = redis.call('HGETALL', KEYS[4])
  if #fields > 0 then source = redis.call('ZCOUNT', KEYS[5], ARGV[2], '+inf') end
end
return {0, false, failures, fields, source}
"""

# Everything a wrong password writes, atomically (MemoryStore.record_login_failure is the
# same in Python). KEYS: pair, account and source failures, pair lock, account lock, pair
# offences, account offences, the lock index, the failure-key index; ARGV: now, cutoff,
# window, member, max distinct, pair threshold, account threshold, escalation window, pair
# key, account key, login, network, pair reason, account reason, max tracked keys, the
# failure keys' prefix, source key, then the lock duration of each level
# -> {pair count, account count, source count, pair lock JSON or false, account lock...}
_RECORD_LOGIN_FAILURE = _FUNCTIONS + """
local now = tonumber(ARGV[1])
local function lock(n, key, scope, account, source, reason, count)
  local level = offence(KEYS[5 + n], ARGV[8])
  local duration = tonumber(ARGV[17 + math.min(level, #ARGV - 17)])
  local json = '{"key": ' .. cjson.encode(key) .. ', "scope": ' .. cjson.encode(scope)
    .. ', "account": ' .. cjson.encode(account) .. ', "source": ' .. cjson.encode(source)
    .. ', "reason": ' .. cjson.encode(string.format(reason, count))
    .. ', "created": ' .. ARGV[1] .. ', "until": ' .. exact(now + duration)
    .. ', "level": ' .. level .. '}'
  redis.call('SET', KEYS[3 + n], json, 'PX', math.max(1, math.ceil(duration * 1000)))
  redis.call('SADD', KEYS[8], key)
  redis.call('DEL', KEYS[n])
  redis.call('ZREM', KEYS[9], key)  -- its failures end with the lock: no longer tracked
  return json
end
local cap = tonumber(ARGV[5])
local function tracked(n, key)  -- the failure key KEYS[n], named `key` in the index
  local count = record(KEYS[n], ARGV[1], ARGV[2], ARGV[3], ARGV[4], cap)
  track(KEYS[9], ARGV[16], key, now, ARGV[3], tonumber(ARGV[15]))
  return count
end
local pair_locked = live_lock(KEYS[4], now)
local pair = tracked(1, ARGV[9])
local account = 0
if not pair_locked then account = tracked(2, ARGV[10]) end
local source = tracked(3, ARGV[17])
local pair_lock, account_lock = false, false
if pair >= tonumber(ARGV[6]) and not pair_locked then
  pair_lock = lock(1, ARGV[9], 'source_account', ARGV[11], ARGV[12], ARGV[13], pair)
end
if account >= tonumber(ARGV[7]) and not live_lock(KEYS[5], now) then
  account_lock = lock(2, ARGV[10], 'account', ARGV[11], '', ARGV[14], account)
end
return {pair, account, source, pair_lock, account_lock}
"""

# KEYS[1] a user's MFA hash; ARGV: field, value -> 1 when stored (greater than before), else 0
_MFA_ADVANCE = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and tonumber(current) >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""
# KEYS[1] a user's MFA hash; ARGV: field prefix -> fields removed
_MFA_DELETE = """
local removed = 0
for _, name in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(name, 1, #ARGV[1]) == ARGV[1] then
    removed = removed + redis.call('HDEL', KEYS[1], name)
  end
end
return removed
"""

# A record is stored as "<expires>|<json>" (expires empty for none) so a touch can move the
# expiry without decoding the JSON. KEYS[1] record; ARGV: expires, ttl ms -> 1 when it existed
_TOUCH_RECORD = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local i = string.find(raw, '|', 1, true)
if not i then return 0 end  -- not a record (a hand edit): as absent
redis.call('SET', KEYS[1], ARGV[1] .. string.sub(raw, i), 'PX', ARGV[2])
return 1
"""

# KEYS[1] record; ARGV: value, ttl ms ('' for none), now -> 1 when created
_ADD_RECORD = """
local raw = redis.call('GET', KEYS[1])
if raw then
  local exp = string.sub(raw, 1, string.find(raw, '|', 1, true) - 1)
  if exp == '' or tonumber(exp) > tonumber(ARGV[3]) then return 0 end
end
if ARGV[2] == '' then
  redis.call('SET', KEYS[1], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
"""


def _ttl_ms(expires: float | None, now: float) -> int | None:
    return None if expires is None else max(1, math.ceil((expires - now) * 1000))


def _decode_lock(raw: str) -> Lock | None:
    """A stored lock; None (logged) for a value that is not one, such as an operator's
    hand edit: one bad key must stop neither the others nor every unlock."""
    try:
        lock = Lock(**json.loads(raw))
        if not all(isinstance(getattr(lock, name), int | float) and not isinstance(
                getattr(lock, name), bool) for name in ("created", "until", "level")):
            raise TypeError("created, until and level must be numbers")
    except (ValueError, TypeError) as exc:
        _malformed("lock", raw, exc)
        return None
    return lock


def _decode_ban(raw: str) -> Entry | None:
    """A stored ban; None (logged) for a value that is not one (as _decode_lock)."""
    try:
        ban = Entry(**json.loads(raw))
        if not isinstance(ban.created, int | float) or not (
                ban.expires is None or isinstance(ban.expires, int | float)):
            raise TypeError("created and expires must be numbers")
    except (ValueError, TypeError) as exc:
        _malformed("ban", raw, exc)
        return None
    return ban


_reported: set[tuple[str, str]] = set()  # the malformed values logged already (once each)


def _malformed(kind: str, raw: str, exc: Exception) -> None:
    """Logs a value that is not a `kind` once, naming the kind and the error's type only
    (never the value: a record may hold a key's hash, a lock a login)."""
    if (kind, raw) in _reported or len(_reported) > 1000:
        return
    _reported.add((kind, raw))
    log.warning("skipping a malformed %s in Redis: %s", kind, type(exc).__name__)


def _encode_record(record: Record) -> str:
    expires = "" if record.expires is None else repr(record.expires)
    return f"{expires}|{json.dumps({'d': record.data, 'g': record.group})}"


def _decode_record(kind: str, key: str, raw: str) -> Record | None:
    """A stored record; None (logged once) for a value that is not one, such as a hand
    edit or another program's key under our prefix: the record is absent to its reader,
    whose route would otherwise answer 500 on it at every request."""
    expires, bar, body = raw.partition("|")
    try:
        value = json.loads(body)
        if not bar or not isinstance(value, dict) or not isinstance(value.get("d"), dict) \
                or not isinstance(value.get("g", ""), str | None):
            raise TypeError("not {'d': {...}, 'g': ...}")
        return Record(kind, key, value["d"], float(expires) if expires else None,
                      value.get("g") or "")
    except (ValueError, TypeError) as exc:
        _malformed(f"{kind} record", raw, exc)
        return None


class RedisStore:
    shared = True

    def __init__(self, url: str, password: str | None = None, prefix: str = "a3m:",
                 max_keys: int = 250_000, **client_options: Any):
        """client_options: further redis-py client settings over ours (the security
        benchmark compares parsers and protocols with them)."""
        self.url = url
        self.prefix = prefix
        self.max_keys = max_keys  # failure keys, as MemoryStore's (the index `fi` holds them)
        options = {"password": password, "decode_responses": True, "socket_timeout": 2.0,
                   "socket_connect_timeout": 2.0, "health_check_interval": 30,
                   **client_options}
        self._redis: Any = aioredis.from_url(url, **options)
        self._record = self._redis.register_script(_RECORD_FAILURE)
        self._bump = self._redis.register_script(_BUMP_OFFENCES)
        self._login_state = self._redis.register_script(_LOGIN_STATE)
        self._login_failure = self._redis.register_script(_RECORD_LOGIN_FAILURE)
        self._mfa_advance = self._redis.register_script(_MFA_ADVANCE)
        self._mfa_delete = self._redis.register_script(_MFA_DELETE)
        self._touch = self._redis.register_script(_TOUCH_RECORD)
        self._add = self._redis.register_script(_ADD_RECORD)
        self._keys = 0

    def _k(self, kind: str, key: str = "") -> str:
        return f"{self.prefix}{kind}:{key}" if key else f"{self.prefix}{kind}"

    async def open(self) -> None:
        await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()

    def tracked_keys(self) -> int:
        """Failure keys in Redis at the last refresh()."""
        return self._keys

    async def refresh(self) -> None:
        """Counts the failure keys from their index (a SCAN of every key cost a round trip
        per 1,000 keys, every 5 s on every replica)."""
        index = self._k("fi")
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(index, "-inf", time.time())
            pipe.zcard(index)
            _, self._keys = await pipe.execute()

    # --- failures

    async def record_failure(self, key: str, pwhash: str, now: float, window: float) -> int:
        member = pwhash or f"#{secrets.token_hex(8)}"
        return int(await self._record(keys=[self._k("f", key), self._k("fi")],
                                      args=[float(now), float(now - window), window, member,
                                            MAX_DISTINCT, f"{self.prefix}f:", key,
                                            self.max_keys]))

    async def failure_count(self, key: str, now: float, window: float) -> int:
        return int(await self._redis.zcount(self._k("f", key), now - window, "+inf"))

    async def clear_failures(self, key: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._k("f", key))
            pipe.zrem(self._k("fi"), key)
            await pipe.execute()

    # --- locks and offences

    async def get_lock(self, key: str, now: float) -> Lock | None:
        raw = await self._redis.get(self._k("lock", key))
        lock = None if raw is None else _decode_lock(raw)
        return lock if lock is not None and lock.until > now else None

    async def put_lock(self, lock: Lock) -> None:
        ttl = max(1, math.ceil((lock.until - lock.created) * 1000))
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._k("lock", lock.key), json.dumps(lock.as_dict()), px=ttl)
            pipe.sadd(self._k("locks"), lock.key)
            await pipe.execute()

    async def delete_lock(self, key: str) -> Lock | None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.get(self._k("lock", key))
            pipe.delete(self._k("lock", key))
            pipe.srem(self._k("locks"), key)
            raw, _, _ = await pipe.execute()
        return _decode_lock(raw) if raw else None

    async def locks(self, now: float) -> list[Lock]:
        keys = sorted(await self._redis.smembers(self._k("locks")))
        if not keys:
            return []
        values = await self._redis.mget([self._k("lock", k) for k in keys])
        out, gone = [], []
        for key, raw in zip(keys, values, strict=True):
            lock = _decode_lock(raw) if raw else None
            if lock is None or lock.until <= now:
                gone.append(key)
            else:
                out.append(lock)
        if gone:
            await self._redis.srem(self._k("locks"), *gone)
        return sorted(out, key=lambda lock: (lock.created, lock.key))

    async def bump_offences(self, key: str, now: float, window: float) -> int:
        return int(await self._bump(keys=[self._k("off", key)], args=[window]))

    # --- the decision path: one script each, one round trip

    async def login_state(self, keys: Keys, now: float, window: float, failures: bool,
                          mfa_user: str | None) -> LoginState:
        k = self._k
        answer = await self._login_state(
            keys=[k("lock", keys.pair), k("lock", keys.account), k("f", keys.pair),
                  k("mfa", mfa_user or ""), k("f", keys.source)],
            args=[float(now), float(now - window), int(failures), int(mfa_user is not None)])
        if answer[0]:  # well-formed JSON with a numeric until, and fields Lock may refuse
            return LoginState(_decode_lock(answer[1]), 0, None, 0)
        _, _, count, flat, source = answer
        fields = None if flat is None else dict(zip(flat[::2], flat[1::2], strict=True))
        return LoginState(None, int(count), fields, int(source))

    async def record_login_failure(self, keys: Keys, pwhash: str, now: float,
                                   policy: LockPolicy) -> FailureCounts:
        k = self._k
        answer = await self._login_failure(
            keys=[k("f", keys.pair), k("f", keys.account), k("f", keys.source),
                  k("lock", keys.pair), k("lock", keys.account), k("off", keys.pair),
                  k("off", keys.account), k("locks"), k("fi")],
            args=[float(now), float(now - policy.window), policy.window,
                  pwhash or f"#{secrets.token_hex(8)}", MAX_DISTINCT, policy.pair_threshold,
                  policy.account_threshold, policy.escalation_window, keys.pair, keys.account,
                  keys.account.removeprefix("a:"), keys.source.removeprefix("s:"),
                  policy.pair_reason, policy.account_reason, self.max_keys, f"{self.prefix}f:",
                  keys.source, *policy.durations])
        pair, account, source, *made = answer
        locks = (_decode_lock(raw) for raw in made if raw is not None)
        return FailureCounts(int(pair), int(account), int(source),
                             tuple(lock for lock in locks if lock is not None))

    # --- bans

    async def put_ban(self, ban: Entry) -> None:
        await self._redis.hset(self._k("bans"), ban.network,
                               json.dumps(dataclasses.asdict(ban)))

    async def delete_ban(self, network: str) -> Entry | None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hget(self._k("bans"), network)
            pipe.hdel(self._k("bans"), network)
            raw, _ = await pipe.execute()
        return _decode_ban(raw) if raw else None

    async def bans(self, now: float) -> list[Entry]:
        out, gone = [], []
        for network, raw in (await self._redis.hgetall(self._k("bans"))).items():
            ban = _decode_ban(raw)
            if ban is None:
                continue  # left for the operator: logged once, never enforced
            if ban.expires is not None and ban.expires <= now:
                gone.append(network)
            else:
                out.append(ban)
        if gone:
            await self._redis.hdel(self._k("bans"), *gone)
        return sorted(out, key=lambda b: (b.created, b.network))

    # --- MFA state: one hash per user ({prefix}mfa:{user}), no TTL (enrolments are kept)

    async def mfa_fields(self, user: str) -> dict[str, str]:
        return dict(await self._redis.hgetall(self._k("mfa", user)))

    async def mfa_get(self, user: str, field: str) -> str | None:
        value = await self._redis.hget(self._k("mfa", user), field)
        return None if value is None else str(value)

    async def mfa_put(self, user: str, field: str, value: str) -> None:
        await self._redis.hset(self._k("mfa", user), field, value)

    async def mfa_pop(self, user: str, field: str) -> str | None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hget(self._k("mfa", user), field)
            pipe.hdel(self._k("mfa", user), field)
            value, removed = await pipe.execute()
        return str(value) if removed else None

    async def mfa_incr(self, user: str, field: str) -> int:
        return int(await self._redis.hincrby(self._k("mfa", user), field, 1))

    async def mfa_advance(self, user: str, field: str, value: int) -> bool:
        return bool(await self._mfa_advance(keys=[self._k("mfa", user)], args=[field, value]))

    async def mfa_delete(self, user: str, prefix: str = "") -> int:
        return int(await self._mfa_delete(keys=[self._k("mfa", user)], args=[prefix]))

    async def mfa_users(self) -> list[str]:
        start = len(self._k("mfa", "x")) - 1
        return sorted([key[start:] async for key in self._redis.scan_iter(
            match=self._k("mfa", "*"), count=1000)])
    # --- records: one key each (with a TTL), a set per kind and per group as the index

    async def put_record(self, record: Record) -> None:
        key = self._k(f"r:{record.kind}", record.key)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.get(key)
            pipe.set(key, _encode_record(record), px=_ttl_ms(record.expires, time.time()))
            old, _ = await pipe.execute()
        await self._index(record, old)

    async def add_record(self, record: Record, now: float) -> bool:
        ttl = _ttl_ms(record.expires, now)
        created = await self._add(keys=[self._k(f"r:{record.kind}", record.key)],
                                  args=[_encode_record(record), "" if ttl is None else ttl, now])
        if created:
            await self._index(record, None)
        return bool(created)

    async def _index(self, record: Record, old: str | None) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.sadd(self._k("ri", record.kind), record.key)
            if record.group:
                pipe.sadd(self._k(f"rg:{record.kind}", record.group), record.key)
            if old is not None:
                replaced = _decode_record(record.kind, record.key, old)
                previous = replaced.group if replaced is not None else ""
                if previous and previous != record.group:
                    pipe.srem(self._k(f"rg:{record.kind}", previous), record.key)
            await pipe.execute()
        await self._prune(record.kind)

    async def _prune(self, kind: str) -> None:
        """Drops from the kind's index a sample of members whose record its TTL removed.

        Kinds nobody lists (replay ids: a webhook event, a SAML assertion) were tidied
        only by list_records, so their index grew by every id ever seen. With PRUNE_SAMPLE
        members checked per write, at most about 1/PRUNE_SAMPLE of the index is dead."""
        index = self._k("ri", kind)
        sample = await self._redis.srandmember(index, PRUNE_SAMPLE)
        if not sample:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in sample:
                pipe.exists(self._k(f"r:{kind}", key))
            alive = await pipe.execute()
        gone = [key for key, exists in zip(sample, alive, strict=True) if not exists]
        if gone:
            await self._redis.srem(index, *gone)

    async def get_record(self, kind: str, key: str, now: float) -> Record | None:
        raw = await self._redis.get(self._k(f"r:{kind}", key))
        if raw is None:
            return None
        rec = _decode_record(kind, key, raw)
        if rec is None or (rec.expires is not None and rec.expires <= now):
            return None
        return rec

    async def delete_record(self, kind: str, key: str) -> Record | None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.get(self._k(f"r:{kind}", key))
            pipe.delete(self._k(f"r:{kind}", key))
            pipe.srem(self._k("ri", kind), key)
            raw, _, _ = await pipe.execute()
        if raw is None:
            return None
        rec = _decode_record(kind, key, raw)
        if rec is None:
            return None
        if rec.group:
            await self._redis.srem(self._k(f"rg:{kind}", rec.group), key)
        return rec

    async def list_records(self, kind: str, now: float, group: str | None = None
                           ) -> list[Record]:
        index = self._k("ri", kind) if group is None else self._k(f"rg:{kind}", group)
        keys = sorted(await self._redis.smembers(index))
        if not keys:
            return []
        values = await self._redis.mget([self._k(f"r:{kind}", k) for k in keys])
        out, gone = [], []
        for key, raw in zip(keys, values, strict=True):
            if raw is None:  # expired by its TTL
                gone.append(key)
                continue
            rec = _decode_record(kind, key, raw)
            if rec is None:  # kept, and skipped
                continue
            if group is not None and rec.group != group:
                gone.append(key)
            elif rec.expires is None or rec.expires > now:
                out.append(rec)
        if gone:  # expired by their TTL: tidy the index
            await self._redis.srem(index, *gone)
        return out

    async def touch_records(self, kind: str, expiries: dict[str, float]) -> None:
        now = time.time()
        async with self._redis.pipeline(transaction=False) as pipe:
            for key, expires in expiries.items():
                await self._touch(keys=[self._k(f"r:{kind}", key)],
                                  args=[repr(expires), max(1, math.ceil((expires - now) * 1000))],
                                  client=pipe)
            await pipe.execute()
