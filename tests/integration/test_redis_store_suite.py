"""The store behaviour suite of tests/unit/test_security_store.py, run against a real Redis,
and what only a shared store has to prove: replicas see each other's locks at once, the
decision path's scripts are atomic, and every key they write carries a TTL.

Left out: the LRU bound (Redis bounds memory with TTLs instead) and the offence window
under a fake clock (Redis expires offence counters in real time, by their TTL).
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from security.attempts import tracking_keys
from security.store.redis import RedisStore
from tests.unit.test_security_store import (  # noqa: F401 - collected here with a Redis store
    KEYS,
    POLICY,
    T0,
    WINDOW,
    test_a_key_remembers_at_most_max_distinct_passwords,
    test_a_key_that_failed_again_is_recent_and_survives_eviction,
    test_a_locked_pair_keeps_counting_but_not_against_the_account,
    test_a_repeated_pwhash_counts_once,
    test_an_empty_pwhash_is_a_new_distinct_password_each_time,
    test_an_expired_lock_is_not_returned_and_is_dropped_from_locks,
    test_clear_failures_resets_the_key_only,
    test_distinct_pwhashes_are_counted,
    test_expired_bans_are_dropped_and_permanent_ones_stay,
    test_failures_older_than_the_window_drop_out,
    test_keys_are_counted_separately,
    test_login_state_counts_the_pair_only_when_asked,
    test_login_state_finds_the_pair_lock_before_the_account_lock,
    test_login_state_reads_the_mfa_fields_and_then_the_source,
    test_max_keys_bounds_the_failure_table_and_keeps_the_newest,
    test_one_failure_can_lock_the_pair_and_then_the_account,
    test_put_ban_replaces_the_ban_of_the_same_network,
    test_put_get_delete_lock,
    test_put_list_delete_bans,
    test_put_lock_replaces_the_lock_of_the_same_key,
    test_record_and_count_agree_on_the_window_boundary,
    test_record_login_failure_counts_three_keys_and_locks_the_pair,
    test_record_login_failure_without_pwhash_counts_each_as_distinct,
    test_repeat_locks_escalate_within_the_escalation_window,
    test_retrying_a_password_keeps_it_in_the_window_from_its_latest_try,
    test_the_account_locks_at_its_threshold_from_all_sources,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def store(redis_module):
    store = RedisStore(redis_module.url, prefix=f"test-{uuid.uuid4().hex[:8]}:")
    await store.open()
    yield store
    await store.close()


@pytest.fixture
async def make_store(redis_module):
    """RedisStore(max_keys=...) on a prefix of its own, for the LRU-bound tests."""
    made: list[RedisStore] = []

    async def make(**kw):
        store = RedisStore(redis_module.url, prefix=f"test-{uuid.uuid4().hex[:8]}:", **kw)
        await store.open()
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


async def test_login_failures_are_capped_too_and_the_index_counts_them(make_store):
    """max_tracked_keys did not apply to Redis: 3,000 failures with a cap of 1,000 left
    9,013 f:* keys in a review (a flood of distinct addresses could fill Redis)."""
    store = await make_store(max_keys=30)
    for i in range(40):  # each wrong password writes a pair, an account and a source key
        keys = tracking_keys(f"user{i}", f"198.51.100.{i}/32")
        await store.record_login_failure(keys, "h", T0 + i, POLICY)
    found = [key async for key in store._redis.scan_iter(match=store._k("f", "*"))]
    assert len(found) == 30
    await store.refresh()
    assert store.tracked_keys() == 30
    newest = tracking_keys("user39", "198.51.100.39/32")
    assert (await store.login_state(newest, T0 + 40, WINDOW, True, None)).failures == 1
    await store.clear_failures(newest.pair)  # a success: out of the index as well
    await store.refresh()
    assert store.tracked_keys() == 29


@pytest.fixture
async def replicas(redis_module):
    """Two clients on one prefix: two exporter replicas sharing the Redis."""
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    pair = (RedisStore(redis_module.url, prefix=prefix), RedisStore(redis_module.url,
                                                                   prefix=prefix))
    for one in pair:
        await one.open()
    yield pair
    for one in pair:
        await one.close()


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


async def test_a_lock_made_through_one_replica_is_enforced_by_the_other_at_once(replicas):
    one, two = replicas
    for h in ("h1", "h2"):
        await one.record_login_failure(KEYS, h, T0, POLICY)
    assert (await two.login_state(KEYS, T0, WINDOW, True, None)).failures == 2
    (lock,) = (await two.record_login_failure(KEYS, "h3", T0, POLICY)).locks
    assert (await one.login_state(KEYS, T0 + 1, WINDOW, True, None)).lock == lock
    assert await one.locks(T0 + 1) == [lock]


async def test_concurrent_failures_from_two_replicas_make_one_lock(replicas):
    """Each wrong password is one atomic script: of many at once exactly one reaches the
    threshold while the pair is unlocked (the engine's separate calls could make two)."""
    one, two = replicas
    results = await asyncio.gather(*(
        (one if n % 2 else two).record_login_failure(KEYS, f"h{n}", T0, POLICY)
        for n in range(12)))
    locks = [lock for counts in results for lock in counts.locks]
    assert [(lock.key, lock.level) for lock in locks] == [(KEYS.pair, 1)]
    # the three before the lock counted against the account, the nine after it did not
    assert sorted(counts.account for counts in results) == [0] * 9 + [1, 2, 3]
    assert await one.bump_offences(KEYS.pair, T0, 1000) == 2  # one offence was counted


async def test_every_key_the_decision_path_writes_carries_a_ttl(store):
    for h in ("h1", "h2", "h3"):
        await store.record_login_failure(KEYS, h, T0, POLICY)
    other = tracking_keys("alice", "198.51.100.1/32")
    await store.record_login_failure(other, "x", T0, POLICY)
    redis = store._redis
    names = sorted(await redis.keys(store.prefix + "*"))
    indexes = (store._k("locks"), store._k("fi"))
    assert names == sorted([*indexes, *(store._k(kind, key) for kind, key in (
        ("f", KEYS.account), ("f", KEYS.source), ("f", other.source), ("f", other.pair),
        ("lock", KEYS.pair), ("off", KEYS.pair)))])
    for name in names:
        # the indexes: the lock set locks() tidies, and the failure keys' sorted set, held
        # to max_tracked_keys and pruned at every write and refresh
        if name not in indexes:
            assert await redis.pttl(name) > 0, name
    assert await redis.zcard(store._k("fi")) == 4  # the five failure keys less the locked pair
    assert 59_000 < await redis.pttl(store._k("lock", KEYS.pair)) <= 60_000
    assert 999_000 < await redis.pttl(store._k("off", KEYS.pair)) <= 1_000_000
    assert WINDOW * 1000 - 1000 < await redis.pttl(store._k("f", KEYS.source)) <= WINDOW * 1000


async def test_an_offence_counter_written_by_bump_offences_sets_the_next_level(store):
    """The script counts offences in the counters bump_offences (and earlier versions)
    write: replicas of both versions can share one Redis."""
    for _ in range(2):
        await store.bump_offences(KEYS.pair, T0, 1000)
    for h in ("h1", "h2", "h3"):
        counts = await store.record_login_failure(KEYS, h, T0, POLICY)
    assert [lock.level for lock in counts.locks] == [3]
