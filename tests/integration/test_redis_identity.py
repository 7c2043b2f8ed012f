"""Identity state in a real Redis: the store-records suite, and two replicas (two stores on
one Redis) sharing API keys, sessions and the SAML replay guard at once."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from security.apikeys import ApiKeys
from security.sessions import Sessions, SessionSettings, session_key
from security.store import Record
from security.store.redis import RedisStore
from tests.unit.test_http import ADMIN
from tests.unit.test_identity_http import bearer, new_key, running  # noqa: F401 - a fixture
from tests.unit.test_security_store_records import (  # noqa: F401 - collected here on Redis
    test_add_record_creates_once_until_it_expires,
    test_an_expired_record_is_gone,
    test_list_records_by_kind_and_group,
    test_put_get_delete_record,
    test_put_record_replaces_data_expiry_and_group,
    test_touch_moves_the_expiry_of_existing_records_only,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def replicas(redis_server):
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    stores = [RedisStore(redis_server.url, prefix=prefix) for _ in range(2)]
    for s in stores:
        await s.open()
    yield stores
    for s in stores:
        await s.close()


@pytest.fixture
async def store(replicas):
    return replicas[0]


async def test_records_carry_a_ttl(store):
    await store.put_record(Record("k", "a", {}, time.time() + 30))
    ttl = await store._redis.pttl(store._k("r:k", "a"))
    assert 0 < ttl <= 30_000
    await store.put_record(Record("k", "b", {}))
    assert await store._redis.pttl(store._k("r:k", "b")) == -1  # no expiry: none set


async def test_two_replicas_share_api_keys_and_revocation_is_seen_at_once(replicas):
    a, b = ApiKeys(replicas[0]), ApiKeys(replicas[1])
    key, token = await a.create("shared", ["security:read"])
    for _ in range(3):  # created through A, used through B (and whatever B keeps, kept)
        assert (await b.authenticate(token)).ok
    await a.revoke(key.id)
    assert (await b.authenticate(token)).reason == "revoked"  # the very next check
    assert [k.state(time.time()) for k in await b.list()] == ["revoked"]


async def test_a_key_rotated_on_one_replica_is_refused_on_the_other_at_once(replicas):
    a, b = ApiKeys(replicas[0]), ApiKeys(replicas[1])
    key, token = await a.create("rotating", ["metrics:write"])
    assert (await b.authenticate(token)).ok and (await a.authenticate(token)).ok
    new, new_token, _ = await a.rotate(key.id)  # no grace: the old key ends now
    assert (await b.authenticate(token)).reason == "revoked"
    assert (await b.authenticate(new_token)).allows("metrics:write")
    await b.revoke(new.id)  # and the other way round
    assert (await a.authenticate(new_token)).reason == "revoked"


async def test_two_replicas_share_sessions(replicas):
    a = Sessions(replicas[0], SessionSettings(timeout=2, touch_interval=0.1))
    b = Sessions(replicas[1], SessionSettings(timeout=2, touch_interval=0.1))
    _, sid = await a.create("alice")
    assert (await b.validate(sid)).user == "alice"
    for _ in range(3):  # used through B: B's idle-timer moves reach the store
        await asyncio.sleep(0.8)
        assert await b.validate(sid) is not None
        await b.flush()
    assert await a.validate(sid) is not None  # 2.4 s after creation, idle timeout 2 s
    await b.revoke(sid)
    assert await a.validate(sid) is None
    _, idle = await a.create("bob")
    await asyncio.sleep(2.2)
    assert await b.validate(idle) is None  # Redis expired it by its TTL


async def test_the_replay_guard_holds_across_replicas(replicas):
    now = time.time()
    results = await asyncio.gather(*[
        replicas[i % 2].add_record(Record("saml_assertion", "id-1", {}, now + 60), now)
        for i in range(10)])
    assert sorted(results) == [False] * 9 + [True]


async def test_the_index_of_a_kind_nobody_lists_stays_near_its_live_records(store):
    """Every webhook event id stayed in the a3m:ri:stalwart_event set forever (201 members
    for 1 live record in a review, no TTL): only list_records tidied an index."""
    now = time.time()
    for i in range(400):  # ids whose replay window has closed
        await store.add_record(Record("event", f"old-{i}", {}, now + 0.05), now)
    await asyncio.sleep(0.2)  # Redis's TTL removes their records
    for i in range(400):
        await store.add_record(Record("event", f"new-{i}", {}, time.time() + 60), time.time())
    members = await store._redis.scard(store._k("ri", "event"))
    assert 400 <= members <= 440, members  # 800 before


GARBAGE = ["not json", "|not json", "1e9|[]", '|{"d": {"name": "x"}, "g": null}',
           '|{"d": {"hash": "zz", "expires": "soon", "revoked": null, "scopes": ["admin"], '
           '"name": "x", "created": 1, "rate_limit_per_minute": 5}, "g": null}',
           '|{"d": {"user": ["u"], "privilege": "user", "created": 1, "absolute": 9e9}, '
           '"g": "u"}']


@pytest.mark.parametrize("garbage", GARBAGE)
async def test_a_garbage_record_is_absent_not_a_500(running, redis_module, garbage,  # noqa: F811
                                                    caplog):
    """A session or API key record that is not JSON or not the shape the exporter writes
    (a hand edit, another program on the same prefix) answered 500 on every route that
    read it; it is now absent (401, 404, skipped in listings), with one warning naming
    its kind and never the secret."""
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    exporter, client = await running({"security": {"enable_rate_limiting": False, "store": {
        "type": "redis", "redis_url": redis_module.url, "redis_key_prefix": prefix}}})
    store = exporter.security.store
    good, bad = await new_key(client, ["security:read"]), await new_key(client, ["admin"])
    r = await client.post("/api/v1/sessions", headers=ADMIN, json={"user": "u"})
    session = r.json()
    sid, csrf = session["session_id"], session["csrf_token"]
    await store._redis.set(store._k("r:apikey", bad["id"]), garbage)
    await store._redis.set(store._k("r:session", session_key(sid)), garbage)
    for _ in range(2):  # the second time: the same answers, no second warning
        r = await client.get("/api/v1/security/lockouts", headers=bearer(bad["key"]))
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        assert (await client.get("/api/v1/security/lockouts",
                                 headers=bearer(good["key"]))).status_code == 200
        r = await client.get("/api/v1/apikeys", headers=ADMIN)
        assert r.status_code == 200 and [k["id"] for k in r.json()["keys"]] == [good["id"]]
        for method, path in (("GET", f"/api/v1/apikeys/{bad['id']}"),
                             ("DELETE", f"/api/v1/apikeys/{bad['id']}"),
                             ("POST", f"/api/v1/apikeys/{bad['id']}/rotate"),
                             ("GET", f"/api/v1/sessions/{sid}"),
                             ("POST", f"/api/v1/sessions/{sid}/refresh"),
                             ("POST", f"/api/v1/sessions/{sid}/rotate")):
            r = await client.request(method, path, headers=ADMIN, json={})
            assert r.status_code == 404, (method, path, r.text)
        r = await client.post("/api/v1/csrf/verify", headers=ADMIN,
                              json={"session_id": sid, "token": csrf})
        assert r.status_code == 200 and r.json()["valid"] is False
        r = await client.post("/api/v1/sessions", headers=ADMIN, json={"user": "u"})
        assert r.status_code == 201
        assert (await client.delete(f"/api/v1/sessions/{sid}", headers=ADMIN)).status_code \
            == 404
        await store._redis.set(store._k("r:session", session_key(sid)), garbage)
        r = await client.delete("/api/v1/sessions?user=u", headers=ADMIN)
        assert r.status_code == 200 and r.json()["revoked"] >= 1  # the good ones
        await store._redis.set(store._k("r:apikey", bad["id"]), garbage)
        await store._redis.set(store._k("r:session", session_key(sid)), garbage)
    assert await exporter.identity.sessions.cleanup() == 0  # the good ones ended above
    # an idle-timer move written behind onto it (validated just before the edit): no error
    key = store._k("r:session", session_key(sid))
    await store.touch_records("session", {session_key(sid): time.time() + 60})
    raw = await store._redis.get(key)
    assert raw == garbage if "|" not in garbage else raw.endswith(garbage[garbage.index("|"):])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"
                and "malformed" in r.getMessage()]
    assert sorted(warnings) == sorted(set(warnings)), warnings  # once each
    assert any("apikey" in w for w in warnings) and any("session" in w for w in warnings)
    assert not any(secret in w for w in warnings
                   for secret in (bad["key"], sid, session_key(sid), bad["id"]))
