"""The store behaviour suite of tests/unit/test_security_store.py, run against a real Redis.

Left out: the LRU bound (Redis bounds memory with TTLs instead) and the offence
window under a fake clock (Redis expires offence counters in real time).
"""

from __future__ import annotations

import uuid

import pytest

from security.store.redis import RedisStore
from tests.unit.test_security_store import (  # noqa: F401 - collected here with a Redis store
    test_a_key_remembers_at_most_max_distinct_passwords,
    test_a_repeated_pwhash_counts_once,
    test_an_empty_pwhash_is_a_new_distinct_password_each_time,
    test_an_expired_lock_is_not_returned_and_is_dropped_from_locks,
    test_clear_failures_resets_the_key_only,
    test_distinct_pwhashes_are_counted,
    test_expired_bans_are_dropped_and_permanent_ones_stay,
    test_failures_older_than_the_window_drop_out,
    test_keys_are_counted_separately,
    test_put_ban_replaces_the_ban_of_the_same_network,
    test_put_get_delete_lock,
    test_put_list_delete_bans,
    test_put_lock_replaces_the_lock_of_the_same_key,
    test_record_and_count_agree_on_the_window_boundary,
    test_retrying_a_password_keeps_it_in_the_window_from_its_latest_try,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def store(redis_server):
    store = RedisStore(redis_server.url, prefix=f"test-{uuid.uuid4().hex[:8]}:")
    await store.open()
    yield store
    await store.close()


async def test_offences_count_up_and_expire(store):
    assert await store.bump_offences("p:x", 0, 60) == 1
    assert await store.bump_offences("p:x", 0, 60) == 2
    assert await store.bump_offences("p:y", 0, 0.05) == 1
    import asyncio

    await asyncio.sleep(0.2)
    assert await store.bump_offences("p:y", 0, 60) == 1


async def test_failure_keys_carry_a_ttl(store):
    await store.record_failure("s:192.0.2.1/32", "h", 4e9, 30)
    ttl = await store._redis.pttl(store._k("f", "s:192.0.2.1/32"))
    assert 0 < ttl <= 30_000
    await store.refresh()
    assert store.tracked_keys() == 1
