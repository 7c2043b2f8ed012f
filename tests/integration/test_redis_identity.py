"""Identity state in a real Redis: the store-records suite, and two replicas (two stores on
one Redis) sharing API keys, sessions and the SAML replay guard at once."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from security.apikeys import ApiKeys
from security.sessions import Sessions, SessionSettings
from security.store import Record
from security.store.redis import RedisStore
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
