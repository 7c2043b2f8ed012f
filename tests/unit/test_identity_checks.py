# ruff: noqa: F811 - the store fixture imported from test_identity is a parameter of the tests
"""The synchronous checks the HTTP layer makes while the key and session records are held
in memory (ApiKeys.check, Sessions.check): the same answers as the awaited path and as a
shared store's, revoke and expiry at the very next check, the per-key rate limit as
gcra() decides it, and the counters."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from security.apikeys import ApiKeys, ApiKeySettings
from security.identity import IdentityStats
from security.ratelimit import Limit, gcra
from security.sessions import Sessions, SessionSettings
from security.store.memory import MemoryStore
from tests.unit.test_identity import T0, Clock, CountingStore, audit, records, store  # noqa: F401 - fixtures

UNLIMITED = ApiKeySettings(rate_limit_per_minute=10**9, rate_limit_burst=10**6)


def answer(check) -> tuple:
    return check.ok, check.reason, check.key_id, check.scopes


async def test_held_once_the_first_awaited_check_has_loaded_the_records(store):
    keys, sessions = ApiKeys(store), Sessions(store)
    _, token = await keys.create("k", ["admin"])
    _, sid = await sessions.create("u")
    assert not keys.held and not sessions.held  # nothing loaded yet: the HTTP layer awaits
    assert (await keys.authenticate(token)).ok and await sessions.validate(sid) is not None
    assert keys.held and sessions.held
    assert ApiKeys(store).held is False  # another ApiKeys finds out at its first check
    shared = CountingStore(store, shared=True)
    other_keys, other_sessions = ApiKeys(shared), Sessions(shared)
    assert (await other_keys.authenticate(token)).ok
    assert await other_sessions.validate(sid) is not None
    assert not other_keys.held and not other_sessions.held  # a shared store: read every time


async def test_a_check_answers_as_the_awaited_path_and_a_shared_store_do(store, audit):
    """Every kind of token, before and after one key expires: check(), authenticate() and
    authenticate() on a shared store (which reads each record) give the same answers."""
    clock = Clock()
    keys = ApiKeys(store, UNLIMITED, audit=audit, clock=clock)
    shared = ApiKeys(CountingStore(store, shared=True), UNLIMITED, clock=clock)
    good, token = await keys.create("good", ["security:read"], rate_limit_per_minute=10**9)
    _, short = await keys.create("short", ["admin"], expires_in=60,
                                 rate_limit_per_minute=10**9)
    gone, gone_token = await keys.create("gone", ["admin"])
    await keys.revoke(gone.id)
    secret = token.split("_", 2)[2]
    tokens = {
        "good": token, "short key": short, "revoked": gone_token,
        "wrong": token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB"),
        "unknown": f"a3m_000000000000_{secret}",
        # the length of a key, and where the id is a real key's id, but not its shape
        "no underscore": token[:16] + "x" + token[17:], "other prefix": "b3m_" + token[4:],
        "surrogate": token[:-1] + "\udcff", "stub": "a3m_nope", "empty": "",
        "huge": "a3m_" + "x" * 5000}
    assert (await keys.authenticate("")).reason == "malformed" and keys.held
    for moment in (clock.now, clock.now + 61):  # the short key expires in between
        clock.now = moment
        for name, t in tokens.items():
            now, awaited, read = keys.check(t), await keys.authenticate(t), \
                await shared.authenticate(t)
            assert answer(now) == answer(awaited) == answer(read), name
    assert shared._rows == {}  # what a shared store's check read is not kept
    reasons = {name: keys.check(t).reason for name, t in tokens.items()}
    assert reasons == {"good": "ok", "short key": "expired", "revoked": "revoked",
                       "wrong": "wrong", "stub": "malformed",
                       "unknown": "unknown", "no underscore": "malformed",
                       "other prefix": "malformed", "surrogate": "wrong",
                       "empty": "malformed", "huge": "malformed"}
    assert keys.check(token).key_id == good.id and keys.check(tokens["wrong"]).key_id == good.id
    failures = [r for r in records(audit, "auth.failure")
                if r["details"]["reason"] == "malformed"]
    assert {r["subject"] for r in failures} == {"unknown"}  # no id of a malformed token
    assert all(token not in str(r) for r in records(audit))


async def test_a_revoke_or_rotation_through_another_apikeys_counts_at_the_next_check(store):
    clock = Clock()
    keys, admin = ApiKeys(store, clock=clock), ApiKeys(store, clock=clock)
    key, token = await admin.create("k", ["security:read"])
    assert (await keys.authenticate(token)).ok
    for _ in range(3):
        assert keys.check(token).ok
    new, new_token, _ = await admin.rotate(key.id, grace=30)
    assert keys.check(token).ok and keys.check(new_token).scopes == frozenset({"security:read"})
    clock.now += 30
    assert keys.check(token).reason == "revoked" and keys.check(new_token).ok
    await admin.revoke(new.id)
    assert keys.check(new_token).reason == "revoked"


async def test_uses_are_written_behind_from_checks(store, audit):
    clock = Clock()
    keys = ApiKeys(store, audit=audit, clock=clock)
    key, token = await keys.create("ci", ["admin"])
    assert (await keys.authenticate(token)).ok
    for _ in range(4):
        clock.now += 1
        assert keys.check(token).ok
    assert (await keys.get(key.id)).last_used == T0 + 4  # known before it is written
    await keys.flush()
    assert (await store.get_record("apikey_used", key.id, clock())).data["t"] == T0 + 4
    assert [r["details"]["uses"] for r in records(audit, "auth.success")] == [5]


async def test_checks_and_awaited_checks_share_the_rate_limit(store):
    clock = Clock()
    keys = ApiKeys(store, ApiKeySettings(rate_limit_burst=1), clock=clock)
    _, token = await keys.create("busy", ["admin"], rate_limit_per_minute=60)
    first = await keys.authenticate(token)
    assert first.ok and first.limit.remaining == 1 and first.limit.limit == 2
    second = keys.check(token)
    assert second.ok and second.limit.remaining == 0
    refused = keys.check(token)
    assert refused.reason == "rate_limited" and not refused.ok and refused.scopes
    assert not refused.limit.allowed and 0 < refused.limit.retry_after <= 1
    assert (await keys.authenticate(token)).reason == "rate_limited"
    clock.now += 1  # one request per second
    assert keys.check(token).ok and keys.check(token).reason == "rate_limited"
    keys.settings = ApiKeySettings(rate_limit_burst=3)  # a reload reaches the known key:
    # its bucket (2 s ahead of now) has room for 2 more of the 4 the new burst allows
    assert [keys.check(token).reason for _ in range(3)] == ["ok", "ok", "rate_limited"]


@settings(max_examples=150, deadline=None)
@given(per_minute=st.integers(1, 600), burst=st.integers(0, 5),
       gaps=st.lists(st.sampled_from([0.0, 1e-7, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 7.5]),
                     min_size=1, max_size=60))
def test_the_written_out_gcra_decides_as_gcra(per_minute, burst, gaps):
    """A check's inline GCRA and gcra() itself, over the same hits: the same decisions,
    and a check's `limit` (the RateLimit headers) is gcra()'s Result."""
    clock = Clock()

    async def setup():
        store = MemoryStore()
        await store.open()
        keys = ApiKeys(store, ApiKeySettings(rate_limit_burst=burst), clock=clock)
        _, token = await keys.create("k", ["admin"], rate_limit_per_minute=per_minute)
        await keys.authenticate("")  # loads the index without a hit
        return keys, token

    keys, token = asyncio.run(setup())
    limit, tat = Limit(per_minute, 60.0, burst), None
    for gap in gaps:
        clock.now += gap
        check = keys.check(token)
        result, new_tat = gcra(tat, clock.now, limit)
        tat = tat if new_tat is None else new_tat
        assert check.reason == ("ok" if result.allowed else "rate_limited")
        assert check.limit == result


async def test_successes_and_failures_are_counted(store):
    stats = IdentityStats()
    keys, sessions = ApiKeys(store, stats=stats), Sessions(store, stats=stats)
    _, token = await keys.create("k", ["admin"])
    _, sid = await sessions.create("u")
    assert (await keys.authenticate(token)).ok and await sessions.validate(sid)
    for _ in range(3):
        assert keys.check(token).ok and sessions.check(sid) is not None
    assert not keys.check("a3m_nope").ok and sessions.check("nope") is None
    stats.verified("csrf", True)
    assert stats.verifications == {("apikey", "success"): 4, ("apikey", "failure"): 1,
                                   ("session", "success"): 4, ("session", "failure"): 1,
                                   ("csrf", "success"): 1}
    assert stats.failures == {("apikey", "malformed"): 1, ("session", "unknown_or_expired"): 1}


async def test_a_session_check_answers_as_validate_does(store):
    clock = Clock()
    sessions = Sessions(store, SessionSettings(timeout=100, absolute_timeout=250), clock=clock)
    shared = Sessions(CountingStore(store, shared=True), sessions.settings, clock=clock)
    _, sid = await sessions.create("alice")
    _, gone = await sessions.create("bob")
    await sessions.revoke(gone)
    ids = [sid, gone, "nope", "x" * 10_000, "ab\udcff", ""]
    assert await sessions.validate("") is None and sessions.held

    def seen(session):
        return None if session is None else session.as_dict()

    for _ in range(5):  # every 60 s: idle timer moved each time, until the absolute timeout
        clock.now += 60
        for i in ids:
            now = seen(sessions.check(i, touch=False))
            assert now == seen(await sessions.validate(i, touch=False)) \
                == seen(await shared.validate(i, touch=False)), i
        assert sessions.check(sid) is not None or clock.now >= T0 + 250
        await sessions.flush()  # the idle-timer move, where the shared store reads it
    assert clock.now == T0 + 300 and sessions.check(sid) is None  # past the absolute timeout
    assert shared._rows == {}  # what a shared store's validation read is not kept


async def test_a_session_check_sees_revoke_rotation_and_the_idle_timeout(store):
    clock = Clock()
    settings = SessionSettings(timeout=100)
    sessions, other = Sessions(store, settings, clock=clock), Sessions(store, settings,
                                                                       clock=clock)
    _, sid = await other.create("carol")
    assert await sessions.validate(sid) is not None
    clock.now += 60
    assert sessions.check(sid).idle_expires == T0 + 160  # touched
    await sessions.flush()  # written behind
    assert sessions.check(sid, touch=False).idle_expires == T0 + 160
    rotated = await other.rotate(sid, "admin")
    assert sessions.check(sid) is None and sessions.check(rotated[1]).privilege == "admin"
    await other.revoke(rotated[1])
    assert sessions.check(rotated[1]) is None
    _, idle = await other.create("dave")
    clock.now += 100
    assert sessions.check(idle) is None


async def test_a_record_changed_behind_a_shared_stores_back_counts_at_the_next_check(store):
    """As another replica's write: new scopes, then a revoke, each seen at the next check."""
    clock = Clock()
    keys = ApiKeys(CountingStore(store, shared=True), clock=clock)
    key, token = await keys.create("k", ["security:read"])
    assert (await keys.authenticate(token)).scopes == frozenset({"security:read"})
    record = await store.get_record("apikey", key.id, clock())
    for change in ({"scopes": ["admin"]}, {"revoked": clock()}):
        record = type(record)(record.kind, record.key, {**record.data, **change},
                              record.expires)
        await store.put_record(record)
        check = await keys.authenticate(token)
        assert (check.reason, check.scopes) == (("ok", frozenset({"admin"})) if "scopes" in change
                                                else ("revoked", frozenset()))
