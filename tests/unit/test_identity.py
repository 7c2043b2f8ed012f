"""API keys, sessions, CSRF tokens and the password policy as library calls, on the memory
and SQLite stores with a fake clock (Redis: tests/integration/test_redis_identity.py)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import stat

import pytest

from security.apikeys import ApiKeys, ApiKeySettings
from security.audit import AuditLog
from security.csrf import CsrfTokens, load_or_create_key
from security.identity import IdentityStats
from security.passwords import PasswordPolicy, PasswordSettings, context_words
from security.sessions import Sessions, SessionSettings, session_key
from security.store import Record, open_store

T0 = 4_000_000_000.0


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "sqlite"])
async def store(request, tmp_path):
    s = open_store(request.param, path=str(tmp_path / "security.db"), flush_interval=0.05)
    await s.open()
    yield s
    await s.close()


@pytest.fixture
def audit(tmp_path):
    log = AuditLog(tmp_path / "audit")
    yield log
    log.close()


def records(audit: AuditLog, type_: str | None = None) -> list[dict]:
    found, _ = audit.query(types=[type_] if type_ else None, limit=1000)
    return list(reversed(found))


# --- API keys


async def test_a_key_is_shown_once_stored_as_a_hash_and_checks(store, audit):
    clock = Clock()
    keys = ApiKeys(store, audit=audit, clock=clock)
    key, token = await keys.create("ci", ["security:read"])
    assert token.startswith(f"a3m_{key.id}_") and len(token) >= 4 + 12 + 1 + 43
    record = await store.get_record("apikey", key.id, clock())
    assert record.data["hash"] == hashlib.sha256(token.encode()).hexdigest()
    assert token not in repr(record.data)
    check = await keys.authenticate(token)
    assert check.ok and check.key_id == key.id and check.allows("security:read")
    assert not check.allows("security:write")
    assert key.expires == T0 + 365 * 86400  # the seed's default lifetime
    listed = [k.as_dict(clock()) for k in await keys.list()]
    assert listed[0]["prefix"] == f"a3m_{key.id}" and "hash" not in listed[0]
    assert listed[0]["state"] == "active" and keys.active == 1
    assert [r["type"] for r in records(audit, "apikey.")] == ["apikey.create"]


async def test_admin_scope_implies_every_scope(store):
    keys = ApiKeys(store)
    _, token = await keys.create("root", ["admin"])
    check = await keys.authenticate(token)
    assert all(check.allows(s) for s in ("security:read", "security:write", "metrics:write"))


async def test_wrong_unknown_malformed_revoked_and_expired_keys_fail_alike(store, audit):
    clock = Clock()
    stats = IdentityStats()
    keys = ApiKeys(store, audit=audit, stats=stats, clock=clock)
    good, token = await keys.create("a", ["admin"])
    short, short_token = await keys.create("b", ["admin"], expires_in=60)
    gone, gone_token = await keys.create("c", ["admin"])
    await keys.revoke(gone.id)
    clock.now += 61
    wrong = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    unknown = "a3m_000000000000_" + token.split("_", 2)[2]
    outcomes = {name: await keys.authenticate(t) for name, t in [
        ("wrong", wrong), ("unknown", unknown), ("malformed", "a3m_nope"),
        ("revoked", gone_token), ("expired", short_token), ("empty", ""),
        ("huge", "a3m_" + "x" * 5000)]}
    assert {n: c.reason for n, c in outcomes.items()} == {
        "wrong": "wrong", "unknown": "unknown", "malformed": "malformed",
        "revoked": "revoked", "expired": "expired", "empty": "malformed", "huge": "malformed"}
    assert not any(c.ok or c.scopes for c in outcomes.values())
    assert (await keys.authenticate(token)).ok
    assert stats.verifications[("apikey", "failure")] == 7
    assert stats.failures[("apikey", "revoked")] == 1
    failures = records(audit, "auth.failure")
    assert [r["details"]["reason"] for r in failures][:2] == ["wrong", "unknown"]
    assert all(token not in str(r) for r in records(audit))
    states = {k.name: k.state(clock()) for k in await keys.list()}
    assert states == {"a": "active", "b": "expired", "c": "revoked"}
    assert keys.active == 1


async def test_the_active_count_drops_when_a_key_expires_without_a_listing(store):
    """It was recounted only by list() (every cleanup interval): a key past its expiry, or
    past a rotation's grace, stayed counted until then."""
    clock = Clock()
    keys = ApiKeys(store, clock=clock)
    await keys.create("long", ["admin"])
    short, _ = await keys.create("short", ["admin"], expires_in=60)
    old, _ = await keys.create("rotated", ["admin"])
    await keys.rotate(old.id, grace=30)  # a new key, the old one ends at T0 + 30
    gone, _ = await keys.create("revoked", ["admin"])
    await keys.revoke(gone.id)
    assert keys.active == 4  # long, short, rotated (in its grace) and its successor
    clock.now += 31
    assert keys.active == 3
    clock.now += 30
    assert keys.active == 2
    assert keys.active == sum(k.state(clock()) == "active" for k in await keys.list())
    clock.now += 365 * 86400
    assert keys.active == 0
    assert keys.active == sum(k.state(clock()) == "active" for k in await keys.list())


async def test_records_of_another_shape_are_no_keys_and_no_sessions(store):
    """A library caller's (or a hand edit's) record under the apikey or session kind: the
    index and table loads skip it, as the Redis reads do (test_redis_identity.py)."""
    clock = Clock()
    keys, sessions = ApiKeys(store, clock=clock), Sessions(store, clock=clock)
    key, token = await keys.create("good", ["admin"])
    _, sid = await sessions.create("u")
    bad_token = "a3m_0123456789ab_" + token.split("_", 2)[2]
    await store.put_record(Record("apikey", "0123456789ab", {"hash": "zz", "name": 5}))
    await store.put_record(Record("session", session_key("forged"), {"user": None}))
    fresh_keys, fresh_sessions = ApiKeys(store, clock=clock), Sessions(store, clock=clock)
    assert (await fresh_keys.authenticate(bad_token)).reason == "unknown"
    assert (await fresh_keys.authenticate(token)).ok
    assert [k.id for k in await fresh_keys.list()] == [key.id]
    assert await fresh_keys.get("0123456789ab") is None
    assert await fresh_sessions.validate("forged") is None
    assert (await fresh_sessions.validate(sid)).user == "u"
    assert await fresh_sessions.cleanup() == 1


async def test_a_pepper_changes_the_stored_hash(store):
    keys = ApiKeys(store, ApiKeySettings(pepper=b"pepper-secret-0123456789"), clock=Clock())
    key, token = await keys.create("p", ["admin"])
    record = await store.get_record("apikey", key.id, T0)
    assert record.data["hash"] != hashlib.sha256(token.encode()).hexdigest()
    assert (await keys.authenticate(token)).ok
    assert not (await ApiKeys(store, clock=Clock()).authenticate(token)).ok  # no pepper


async def test_rotate_replaces_a_key_with_grace(store, audit):
    clock = Clock()
    keys = ApiKeys(store, audit=audit, clock=clock)
    old, old_token = await keys.create("ci", ["metrics:write"], rate_limit_per_minute=5)
    new, new_token, retired = await keys.rotate(old.id, grace=30)
    assert new.id != old.id and new.scopes == ("metrics:write",)
    assert new.rate_limit_per_minute == 5 and retired.revoked == T0 + 30
    assert (await keys.authenticate(old_token)).ok  # within the grace period
    clock.now += 31
    assert (await keys.authenticate(old_token)).reason == "revoked"
    assert (await keys.authenticate(new_token)).ok
    assert await keys.rotate("000000000000") is None
    assert "apikey.rotate" in [r["type"] for r in records(audit)]


async def test_per_key_rate_limit(store):
    clock = Clock()
    keys = ApiKeys(store, ApiKeySettings(rate_limit_burst=2), clock=clock)
    _, token = await keys.create("busy", ["admin"], rate_limit_per_minute=60)
    _, other = await keys.create("other", ["admin"], rate_limit_per_minute=60)
    results = [(await keys.authenticate(token)).reason for _ in range(4)]
    assert results == ["ok", "ok", "ok", "rate_limited"]
    assert (await keys.authenticate(other)).ok  # its own budget
    clock.now += 1.0  # one request per second
    assert (await keys.authenticate(token)).ok


async def test_a_key_changed_by_another_instance_is_judged_by_the_new_record(store):
    """What a check derives from a record is kept per record object: a revoke or rotation
    through another ApiKeys on the same store (another service of this process) counts at
    the very next check, however often the key was checked before."""
    clock = Clock()
    a, b = ApiKeys(store, clock=clock), ApiKeys(store, clock=clock)
    key, token = await a.create("shared", ["security:read"])
    for _ in range(3):
        assert (await b.authenticate(token)).ok
    new, new_token, _ = await a.rotate(key.id)
    assert (await b.authenticate(token)).reason == "revoked"
    assert (await b.authenticate(new_token)).scopes == frozenset({"security:read"})
    await a.revoke(new.id)
    assert (await b.authenticate(new_token)).reason == "revoked"


class CountingStore:
    """A store that counts the key and session reads checks make; `shared` as a replica's."""

    def __init__(self, store, shared: bool):
        self._store, self.shared, self.reads = store, shared, 0

    def __getattr__(self, name):
        return getattr(self._store, name)

    async def get_record(self, kind, key, now):
        self.reads += kind in ("apikey", "session")
        return await self._store.get_record(kind, key, now)


async def test_on_a_store_only_this_process_writes_a_check_reads_the_index(store):
    """Memory and SQLite: the key records are loaded once, then every check (good, wrong,
    unknown) is a dict lookup; a key created, revoked or rotated afterwards counts at once,
    also through another ApiKeys on the same store."""
    clock = Clock()
    counting = CountingStore(store, shared=False)
    keys = ApiKeys(counting, clock=clock)
    key, token = await ApiKeys(store, clock=clock).create("before", ["admin"])  # in the store
    assert (await keys.authenticate(token)).ok  # loads the index
    other, other_token = await keys.create("after", ["admin"])
    unknown = "a3m_000000000000_" + token.split("_", 2)[2]
    reasons = [(await keys.authenticate(t)).reason for t in (token, other_token, unknown)]
    assert reasons == ["ok", "ok", "unknown"] and counting.reads == 0
    await ApiKeys(counting, clock=clock).revoke(key.id)
    assert (await keys.authenticate(token)).reason == "revoked"
    clock.now += 365 * 86400 + 30 * 86400 + 1  # past expiry and keep_after_expiry
    assert (await keys.authenticate(other_token)).reason == "unknown"  # the store dropped it
    assert other.id in keys._index.rows and await keys.list() == []
    assert keys._index.rows == {}  # listing (every cleanup interval) forgets dropped keys


async def test_on_a_shared_store_every_check_reads_the_store(store):
    """Redis (another replica writes it too): a record changed behind this ApiKeys' back
    counts at the very next check."""
    clock = Clock()
    shared = CountingStore(store, shared=True)
    keys = ApiKeys(shared, clock=clock)
    key, token = await keys.create("k", ["admin"])
    assert (await keys.authenticate(token)).ok and (await keys.authenticate(token)).ok
    assert shared.reads == 2
    record = await store.get_record("apikey", key.id, clock())
    await store.put_record(type(record)(record.kind, record.key, {**record.data,
                                                                  "revoked": clock()},
                                        record.expires))  # as another replica's revoke
    assert (await keys.authenticate(token)).reason == "revoked"


async def test_flush_keeps_uses_a_failed_write_left_and_forgets_idle_keys(store, audit):
    clock = Clock()
    keys = ApiKeys(store, ApiKeySettings(rate_limit_burst=0), audit=audit, clock=clock)
    key, token = await keys.create("ci", ["admin"], rate_limit_per_minute=60)
    assert (await keys.authenticate(token)).ok
    put = store.put_record

    async def failing(record):
        raise OSError("disk full")

    store.put_record = failing
    with pytest.raises(OSError):
        await keys.flush()
    store.put_record = put
    clock.now += 1
    assert (await keys.authenticate(token)).ok
    await keys.flush()  # both uses, in one record
    assert [r["details"]["uses"] for r in records(audit, "auth.success")] == [2]
    assert key.id in keys._uses  # its bucket is not full again yet: the limit holds
    assert (await keys.authenticate(token)).reason == "rate_limited"
    clock.now += 2
    await keys.flush()
    assert keys._uses == {} and (await keys.get(key.id)).last_used == T0 + 1


async def test_a_reload_applies_the_new_burst_to_known_keys(store):
    clock = Clock()
    keys = ApiKeys(store, ApiKeySettings(rate_limit_burst=0), clock=clock)
    _, token = await keys.create("busy", ["admin"], rate_limit_per_minute=60)
    assert [(await keys.authenticate(token)).reason for _ in range(2)] == ["ok", "rate_limited"]
    keys.settings = ApiKeySettings(rate_limit_burst=3)  # what IdentityServices.configure does
    checks = [await keys.authenticate(token) for _ in range(4)]
    assert [c.reason for c in checks] == ["ok", "ok", "ok", "rate_limited"]
    assert checks[0].limit.limit == 4  # the capacity the headers report


async def test_last_used_is_written_behind_with_one_audit_record(store, audit):
    clock = Clock()
    keys = ApiKeys(store, audit=audit, clock=clock)
    key, token = await keys.create("ci", ["admin"])
    for _ in range(5):
        await keys.authenticate(token)
    assert await store.get_record("apikey_used", key.id, clock()) is None  # not yet written
    assert (await keys.get(key.id)).last_used == T0  # but known
    await keys.flush()
    assert (await store.get_record("apikey_used", key.id, clock())).data["t"] == T0
    successes = records(audit, "auth.success")
    assert [(r["subject"], r["details"]["uses"]) for r in successes] == [(key.prefix, 5)]
    again = ApiKeys(store, clock=clock)  # another replica or after a restart
    assert (await again.list())[0].last_used == T0


async def test_create_refuses_bad_scopes_and_lifetimes(store):
    keys = ApiKeys(store)
    for scopes, expires_in in ((["root"], None), ([], None), (["admin"], 0),
                               (["admin"], 10 * 365 * 86400)):
        with pytest.raises(ValueError):
            await keys.create("x", scopes, expires_in)


# --- sessions


async def test_session_create_validate_revoke(store, audit):
    clock = Clock()
    sessions = Sessions(store, audit=audit, clock=clock)
    session, sid = await sessions.create("alice@example.org")
    assert len(sid) >= 43 and session.key == session_key(sid)
    assert await store.get_record("session", sid, clock()) is None  # keyed by the hash only
    found = await sessions.validate(sid)
    assert found.user == "alice@example.org" and found.expires_at == T0 + 3600
    assert await sessions.validate("nope") is None
    assert await sessions.validate("x" * 10_000) is None
    assert await sessions.validate("ab\udcff") is None  # a lone surrogate: unknown, no error
    assert (await sessions.revoke(sid)).user == "alice@example.org"
    assert await sessions.validate(sid) is None
    assert await sessions.revoke(sid) is None
    assert [r["type"] for r in records(audit, "session.")] == ["session.create",
                                                               "session.revoke"]


async def test_idle_timeout_moves_on_use_and_absolute_timeout_does_not(store):
    clock = Clock()
    sessions = Sessions(store, SessionSettings(timeout=100, absolute_timeout=250), clock=clock)
    _, sid = await sessions.create("bob")
    for _ in range(4):  # used every 60 s: the idle timer never runs out ...
        clock.now += 60
        assert await sessions.validate(sid) is not None
        await sessions.flush()
    clock.now += 20  # ... but 260 s after creation the absolute timeout has
    assert await sessions.validate(sid) is None
    _, idle = await sessions.create("bob")
    clock.now += 101
    assert await sessions.validate(idle) is None


async def test_validate_without_touch_leaves_the_idle_timer(store):
    clock = Clock()
    sessions = Sessions(store, SessionSettings(timeout=100), clock=clock)
    _, sid = await sessions.create("bob")
    clock.now += 60
    assert (await sessions.validate(sid, touch=False)).idle_expires == T0 + 100
    await sessions.flush()
    clock.now += 41
    assert await sessions.validate(sid) is None


async def test_the_oldest_session_is_evicted_beyond_the_per_user_cap(store, audit):
    clock = Clock()
    sessions = Sessions(store, SessionSettings(max_sessions_per_user=3), audit=audit,
                        clock=clock)
    ids = []
    for _ in range(4):
        ids.append((await sessions.create("carol"))[1])
        clock.now += 1
    _, other = await sessions.create("dave")
    assert await sessions.validate(ids[0]) is None
    assert all([await sessions.validate(i) for i in ids[1:]])
    assert await sessions.validate(other) is not None
    assert [r["details"]["reason"] for r in records(audit, "session.evict")] == [
        "max_sessions_per_user"]
    assert await sessions.cleanup() == 4


async def test_the_cap_holds_for_logins_at_the_same_moment(store):
    """The cap's check and the insert are two awaits: 40 creates at once for one user left
    25 live with a cap of 10 (each saw the same old list)."""
    clock = Clock()
    sessions = Sessions(store, SessionSettings(max_sessions_per_user=10), clock=clock)
    made = await asyncio.gather(*(sessions.create("tess") for _ in range(40)))
    live = [sid for _, sid in made if await sessions.validate(sid) is not None]
    assert len(live) == 10


async def test_rotation_on_privilege_change_ends_the_old_id(store, audit):
    clock = Clock()
    sessions = Sessions(store, SessionSettings(absolute_timeout=1000), audit=audit,
                        clock=clock)
    old, sid = await sessions.create("erin")
    clock.now += 10
    new, new_sid = await sessions.rotate(sid, "admin")
    assert new_sid != sid and new.privilege == "admin" and new.user == "erin"
    assert new.created == old.created and new.absolute_expires == old.absolute_expires
    assert await sessions.validate(sid) is None
    assert (await sessions.validate(new_sid)).privilege == "admin"
    assert await sessions.rotate(sid) is None
    rotated = records(audit, "session.rotate")[0]["details"]
    assert (rotated["from"], rotated["to"]) == ("user", "admin")


async def test_revoke_user_ends_every_session_of_that_user(store):
    sessions = Sessions(store, clock=Clock())
    mine = [(await sessions.create("frank"))[1] for _ in range(3)]
    _, theirs = await sessions.create("grace")
    assert await sessions.revoke_user("frank") == 3
    assert not any([await sessions.validate(s) for s in mine])
    assert await sessions.validate(theirs) is not None


async def test_on_a_store_only_this_process_writes_validation_reads_the_table(store):
    """Memory and SQLite: sessions are loaded once, then validated from memory; what any
    Sessions on the same store creates, rotates, evicts or revokes counts at once, and the
    idle timer still runs out."""
    clock = Clock()
    counting = CountingStore(store, shared=False)
    _, before = await Sessions(store, clock=clock).create("ivan")  # already in the store
    a = Sessions(counting, SessionSettings(timeout=100, max_sessions_per_user=1), clock=clock)
    b = Sessions(counting, SessionSettings(timeout=100, max_sessions_per_user=1), clock=clock)
    assert (await a.validate(before)).user == "ivan"
    _, sid = await b.create("ivan")  # evicts `before`
    assert await a.validate(before) is None
    first = await a.validate(sid)
    assert first.user == "ivan" and await a.validate(sid) is first  # nothing changed
    rotated = await b.rotate(sid, "admin")
    assert await a.validate(sid) is None and (await a.validate(rotated[1])).privilege == "admin"
    clock.now += 60
    moved = await a.validate(rotated[1])
    assert moved.idle_expires == T0 + 160 and moved is not first
    await a.flush()
    assert (await store.get_record("session", moved.key, clock())).expires == T0 + 160
    await b.revoke(rotated[1])
    assert await a.validate(rotated[1]) is None and counting.reads == 0
    _, idle = await a.create("judy")
    clock.now += 101
    assert await a.validate(idle) is None
    assert await a.cleanup() == 0


async def test_on_a_shared_store_validation_reads_the_store(store):
    clock = Clock()
    shared = CountingStore(store, shared=True)
    sessions = Sessions(shared, clock=clock)
    session, sid = await sessions.create("ken")
    assert await sessions.validate(sid) is not None and shared.reads == 1
    assert not sessions._valid  # a record read anew every time: nothing kept
    await store.delete_record("session", session.key)  # as another replica's revoke
    assert await sessions.validate(sid) is None


async def test_sessions_survive_a_restart_on_sqlite(tmp_path):
    first = open_store("sqlite", path=str(tmp_path / "s.db"))
    await first.open()
    clock = Clock()
    _, sid = await Sessions(first, clock=clock).create("heidi")
    await first.close()
    second = open_store("sqlite", path=str(tmp_path / "s.db"))
    await second.open()
    try:
        assert (await Sessions(second, clock=clock).validate(sid)).user == "heidi"
    finally:
        await second.close()


def test_cookie_has_host_prefix_secure_httponly_samesite():
    sessions = Sessions(None, clock=Clock())  # type: ignore[arg-type]
    from security.sessions import Session

    s = Session("k", "u", "user", T0, T0 + 3600, T0 + 7200)
    assert sessions.cookie("SID", s) == ("__Host-a3m_session=SID; Path=/; Max-Age=3600; "
                                         "Secure; HttpOnly; SameSite=Strict")
    lax = Sessions(None, SessionSettings(secure_cookies=False, cookie_same_site="Lax"),  # type: ignore[arg-type]
                   clock=Clock())
    assert lax.cookie("SID", s) == "a3m_session=SID; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax"
    assert "Max-Age=0" in sessions.clear_cookie()


# --- CSRF


def test_csrf_tokens_are_bound_to_the_session_and_expire():
    clock = Clock()
    csrf = CsrfTokens(b"k" * 32, lifetime=3600, clock=clock)
    token = csrf.issue("session-a")
    assert csrf.verify("session-a", token) == "ok"
    assert csrf.verify("session-b", token) == "bad_mac"
    issued, mac = token.split(".")
    assert csrf.verify("session-a", f"{int(issued, 16) + 1:x}.{mac}") == "bad_mac"
    assert csrf.verify("session-a", token[:-1] + ("A" if token[-1] != "A" else "B")) == "bad_mac"
    for bad in ("", "nodot", ".x", "zz.abc", "1" * 20 + ".abc", "a." + "x" * 500):
        assert csrf.verify("session-a", bad) == "malformed"
    assert CsrfTokens(b"other-key" * 4, clock=clock).verify("session-a", token) == "bad_mac"
    clock.now += 3601
    assert csrf.verify("session-a", token) == "expired"


@pytest.mark.parametrize("length", [16, 32, 63, 64, 65, 200])
def test_csrf_mac_is_hmac_sha256_for_keys_of_any_length(length):
    """The MAC with precomputed pads is exactly hmac.new(key, msg, sha256), also for keys
    longer than SHA-256's 64-byte block (hashed first) and shorter ones (zero-padded)."""
    clock = Clock()
    key = os.urandom(length)
    csrf = CsrfTokens(key, clock=clock)
    token = csrf.issue("ünï-session\udcff")  # surrogateescape'd bytes are MACed as bytes
    issued, mac = token.split(".")
    message = f"a3m-csrf\0ünï-session\udcff\0{issued}".encode("utf-8", "surrogateescape")
    assert mac == hmac.new(key, message, "sha256").hexdigest()
    assert csrf.verify("ünï-session\udcff", token) == "ok"
    assert csrf.verify("ünï-session\udcff", f"{issued}.{mac[:-1]}é") == "bad_mac"  # not ASCII


def test_csrf_key_is_generated_once_with_mode_0600(tmp_path):
    path = tmp_path / "state" / "csrf.key"
    key = load_or_create_key(path)
    assert len(key) == 64 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_or_create_key(path) == key
    with pytest.raises(ValueError):
        CsrfTokens(b"short")


# --- passwords

FAST = PasswordSettings(argon2_time_cost=1, argon2_memory_cost_kib=1024, argon2_parallelism=1,
                        history_size=3)


async def test_password_policy_reasons():
    stats = IdentityStats()
    policy = PasswordPolicy(FAST, stats=stats)
    cases = {
        "password": {"blocklisted", "too_weak"},
        "abc": {"too_short", "too_weak"},
        "": {"too_short", "too_weak"},  # zxcvbn itself fails on "" (found by schemathesis)
        "x" * 129: {"too_long", "too_weak"},
        "ivan.petrov-2024-mail": {"context"},
        "Correct-Horse-Battery-Staple-42": set(),
        "zq7 tundra lamp orbit": set(),  # no composition rules by default
    }
    for password, expected in cases.items():
        result = await policy.check(password, user="ivan.petrov@example.org")
        assert set(result.reasons) >= expected and (not expected) == result.accepted, (
            password, result)
        assert len(result.messages) == len(result.reasons)
    assert stats.password_rejections["blocklisted"] == 1
    assert (await policy.check("correct horse battery staple")).score == 4


async def test_composition_rules_are_opt_in():
    policy = PasswordPolicy(PasswordSettings(require_uppercase=True, require_digit=True,
                                             require_special=True, require_lowercase=True))
    result = await policy.check("zq7 tundra lamp orbit")
    assert result.reasons == ["missing_uppercase"]
    assert (await policy.check("Zq7 tundra lamp orbit")).accepted


async def test_context_words_and_blocklist_file(tmp_path):
    words = tmp_path / "breached.txt"
    words.write_text("# local list\nMailRoom-Summer-77\n")
    policy = PasswordPolicy(PasswordSettings(blocklist_file=str(words),
                                             context_words=("acmecorp",)))
    assert "blocklisted" in (await policy.check("mailroom-summer-77")).reasons
    assert "context" in (await policy.check("I-love-AcmeCorp-mail!")).reasons
    assert context_words("j.doe+x@mail.example.org") == sorted(
        {"j.doe+x@mail.example.org", "doe", "j.doe+x", "mail.example.org", "mail",
         "example"})


async def test_unicode_is_normalised_before_counting():
    policy = PasswordPolicy(PasswordSettings(min_length=8))
    # eight characters once NFKC-normalised (full-width letters fold to ASCII)
    assert "too_short" not in (await policy.check("ｔｕｎｄｒａ７ｑ")).reasons


async def test_a_burst_of_password_checks_leaves_the_default_threads_free(store, monkeypatch):
    """Argon2id runs on the policy's own HASH_WORKERS threads: a burst of checks held every
    thread of the loop's default executor, and the health checks (the state dir's, a
    critical one) timed out behind them until /readyz said 503."""
    import threading
    import time as clock_time

    from security import passwords

    policy = PasswordPolicy(FAST, store=store)
    await policy.remember("dos", "an-old-long-passphrase")
    running, most, lock = [0], [0], threading.Lock()
    real = policy.verify

    def slow_verify(hashed: str, password: str) -> bool:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        clock_time.sleep(0.05)
        try:
            return real(hashed, password)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(policy, "verify", slow_verify)
    burst = asyncio.gather(*(policy.check("unrelated-pass-zz", user="dos") for _ in range(24)))
    started = clock_time.monotonic()
    assert await asyncio.to_thread(lambda: "health check") == "health check"
    assert clock_time.monotonic() - started < 0.5  # not behind 24 x 50 ms of hashing
    assert all(r.accepted for r in await burst)
    assert most[0] <= passwords.HASH_WORKERS == 2


async def test_password_history_rejects_reuse_with_argon2id(store, audit):
    policy = PasswordPolicy(FAST, store=store, audit=audit)
    for pw in ("first-long-passphrase", "second-long-passphrase", "third-long-passphrase",
               "fourth-long-passphrase"):
        await policy.remember("judy", pw)
    record = await store.get_record("pwhistory", "judy", T0)
    assert len(record.data["hashes"]) == 3
    assert all(h.startswith("$argon2id$") for h in record.data["hashes"])
    assert "first-long-passphrase" not in str(record.data)
    assert "reused" in (await policy.check("third-long-passphrase", user="judy")).reasons
    assert (await policy.check("first-long-passphrase", user="judy")).accepted  # aged out
    assert (await policy.check("third-long-passphrase", user="other")).accepted
    assert await policy.forget("judy")
    assert (await policy.check("third-long-passphrase", user="judy")).accepted
    assert all("passphrase" not in str(r) for r in records(audit))
