"""Security stores: one behaviour suite run against every backend, plus SQLite persistence.

Times are explicit `now` arguments. T0 lies far in the future on purpose: SqliteStore.open()
drops failure rows older than 7 days by the *wall clock* (not by a caller's `now`), so a
base time in the past would make persisted failure counters vanish on reopen.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.checks import security_store_check
from exporter.health import Status
from security.attempts import tracking_keys
from security.blocklist import Entry
from security.store import MAX_DISTINCT, FailureCounts, Lock, LockPolicy, Store, open_store
from security.store.sqlite import SCHEMA, SqliteStore, _in_batches

T0 = 4_000_000_000.0  # 2096: see the module docstring
WINDOW = 60.0
FLUSH = 0.05

StoreFactory = Callable[..., Awaitable[Store]]


def a_lock(key: str = "p:192.0.2.1/32|alice", *, created: float = T0, duration: float = 60.0,
           level: int = 1, scope: str = "source_account") -> Lock:
    account = key.rsplit("|", 1)[-1].removeprefix("a:")
    source = key[2:].split("|", 1)[0] if key.startswith("p:") else ""
    return Lock(key, scope, account, source, "test", created, created + duration, level)


@pytest.fixture(params=["memory", "sqlite"])
async def make_store(request, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """Opens stores of the parametrized kind (SQLite: one file per test); closes them all."""
    opened: list[Store] = []

    async def make(max_keys: int = 250_000) -> Store:
        store = open_store(request.param, path=str(tmp_path / "security.db"),
                           max_keys=max_keys, flush_interval=FLUSH)
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in reversed(opened):
        await store.close()


@pytest.fixture
async def store(make_store: StoreFactory) -> Store:
    return await make_store()


@pytest.fixture
async def sqlite_stores(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[SqliteStore]]]:
    """Opens SqliteStores on one file; closes every one still open at the end."""
    opened: list[SqliteStore] = []
    path = tmp_path / "state" / "security.db"

    async def make(flush_interval: float = FLUSH, max_keys: int = 250_000) -> SqliteStore:
        store = SqliteStore(path, max_keys=max_keys, flush_interval=flush_interval)
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in reversed(opened):
        if store._db is not None:  # not closed by the test
            await store.close()


# --- failures: distinct counting, window, clear


async def test_a_repeated_pwhash_counts_once(store: Store):
    for i in range(5):
        assert await store.record_failure("k", "same", T0 + i, WINDOW) == 1
    assert await store.failure_count("k", T0 + 5, WINDOW) == 1


async def test_distinct_pwhashes_are_counted(store: Store):
    counts = [await store.record_failure("k", h, T0, WINDOW) for h in ("a", "b", "c", "b", "a")]
    assert counts == [1, 2, 3, 3, 3]
    assert await store.failure_count("k", T0, WINDOW) == 3


async def test_an_empty_pwhash_is_a_new_distinct_password_each_time(store: Store):
    counts = [await store.record_failure("k", h, T0, WINDOW) for h in ("", "", "a", "", "a")]
    assert counts == [1, 2, 3, 4, 4]
    assert await store.failure_count("k", T0, WINDOW) == 4


async def test_keys_are_counted_separately(store: Store):
    await store.record_failure("k1", "a", T0, WINDOW)
    await store.record_failure("k1", "b", T0, WINDOW)
    assert await store.record_failure("k2", "a", T0, WINDOW) == 1
    assert await store.failure_count("k1", T0, WINDOW) == 2
    assert await store.failure_count("unknown", T0, WINDOW) == 0
    await store.refresh()  # Redis counts its keys here
    assert store.tracked_keys() == 2


async def test_failures_older_than_the_window_drop_out(store: Store):
    await store.record_failure("k", "a", T0, WINDOW)
    await store.record_failure("k", "b", T0 + 10, WINDOW)
    assert await store.failure_count("k", T0 + WINDOW - 1, WINDOW) == 2
    assert await store.failure_count("k", T0 + WINDOW + 1, WINDOW) == 1  # "a" is out
    assert await store.record_failure("k", "c", T0 + WINDOW + 1, WINDOW) == 2  # b, c
    assert await store.failure_count("k", T0 + WINDOW + 1, WINDOW) == 2
    assert await store.failure_count("k", T0 + WINDOW + 11, WINDOW) == 1  # only c
    assert await store.record_failure("k", "d", T0 + 10 * WINDOW, WINDOW) == 1
    assert await store.failure_count("k", T0 + 10 * WINDOW, WINDOW) == 1


async def test_record_and_count_agree_on_the_window_boundary(store: Store):
    await store.record_failure("k", "a", T0, WINDOW)
    # exactly one window later "a" is still inside (the window is inclusive) ...
    assert await store.failure_count("k", T0 + WINDOW, WINDOW) == 1
    assert await store.record_failure("k", "b", T0 + WINDOW, WINDOW) == 2
    # ... and a moment later it is out, for both calls
    assert await store.failure_count("k", T0 + WINDOW + 0.5, WINDOW) == 1
    assert await store.record_failure("k", "c", T0 + WINDOW + 0.5, WINDOW) == 2


async def test_retrying_a_password_keeps_it_in_the_window_from_its_latest_try(store: Store):
    await store.record_failure("k", "a", T0, WINDOW)
    await store.record_failure("k", "a", T0 + 50, WINDOW)
    assert await store.failure_count("k", T0 + 100, WINDOW) == 1
    assert await store.failure_count("k", T0 + 111, WINDOW) == 0


async def test_clear_failures_resets_the_key_only(store: Store):
    for h in ("a", "b", "c"):
        await store.record_failure("k", h, T0, WINDOW)
    await store.record_failure("other", "a", T0, WINDOW)
    await store.clear_failures("k")
    await store.clear_failures("never-seen")  # no error
    assert await store.failure_count("k", T0, WINDOW) == 0
    assert await store.failure_count("other", T0, WINDOW) == 1
    assert await store.record_failure("k", "a", T0, WINDOW) == 1  # "a" counts afresh


async def test_a_key_remembers_at_most_max_distinct_passwords(store: Store):
    counts = [await store.record_failure("k", f"h{i}", T0 + i / 1000, 3600)
              for i in range(MAX_DISTINCT + 44)]
    assert counts[:MAX_DISTINCT] == list(range(1, MAX_DISTINCT + 1))
    assert set(counts[MAX_DISTINCT:]) == {MAX_DISTINCT}
    assert await store.failure_count("k", T0 + 1, 3600) == MAX_DISTINCT
    await store.refresh()  # Redis counts its keys here
    assert store.tracked_keys() == 1


# --- the LRU bound on failure keys


async def test_max_keys_bounds_the_failure_table_and_keeps_the_newest(make_store: StoreFactory):
    max_keys = 10
    store = await make_store(max_keys=max_keys)
    for i in range(5 * max_keys):
        await store.record_failure(f"s:{i}", "a", T0 + i, 3600)
        assert store.tracked_keys() <= max_keys
    await store.refresh()  # Redis counts its keys here
    assert store.tracked_keys() == max_keys
    now = T0 + 5 * max_keys
    kept = [i for i in range(5 * max_keys) if await store.failure_count(f"s:{i}", now, 3600)]
    assert kept == list(range(4 * max_keys, 5 * max_keys))


async def test_a_key_that_failed_again_is_recent_and_survives_eviction(make_store: StoreFactory):
    store = await make_store(max_keys=3)
    for i in range(3):
        await store.record_failure(f"k{i}", "a", T0 + i, 3600)
    await store.record_failure("k0", "b", T0 + 3, 3600)  # k0 is now the most recent
    await store.record_failure("k3", "a", T0 + 4, 3600)  # evicts k1, the least recent
    now = T0 + 5
    assert [await store.failure_count(f"k{i}", now, 3600) for i in range(4)] == [2, 0, 1, 1]


# --- locks


async def test_put_get_delete_lock(store: Store):
    lock = a_lock()
    assert await store.get_lock(lock.key, T0) is None
    await store.put_lock(lock)
    assert await store.get_lock(lock.key, T0) == lock
    assert await store.get_lock(lock.key, T0 + 59.5) == lock
    assert await store.get_lock("p:192.0.2.2/32|alice", T0) is None
    assert await store.locks(T0) == [lock]
    assert await store.delete_lock(lock.key) == lock
    assert await store.get_lock(lock.key, T0) is None
    assert await store.locks(T0) == []
    assert await store.delete_lock(lock.key) is None


async def test_put_lock_replaces_the_lock_of_the_same_key(store: Store):
    await store.put_lock(a_lock(duration=60))
    longer = a_lock(created=T0 + 1, duration=120, level=2)
    await store.put_lock(longer)
    assert await store.get_lock(longer.key, T0 + 100) == longer
    assert await store.locks(T0 + 1) == [longer]


async def test_an_expired_lock_is_not_returned_and_is_dropped_from_locks(store: Store):
    short = a_lock("p:192.0.2.1/32|alice", duration=60)
    account = a_lock("a:bob", created=T0 + 1, duration=600, scope="account")
    await store.put_lock(account)
    await store.put_lock(short)
    assert await store.locks(T0 + 1) == [short, account]  # oldest first
    assert await store.get_lock(short.key, T0 + 60) is None  # expired from `until` on
    assert await store.get_lock(account.key, T0 + 60) == account
    assert await store.locks(T0 + 60) == [account]
    assert await store.locks(T0 + 601) == []


# --- offences


async def test_bump_offences_counts_within_the_window_and_restarts_after_it(store: Store):
    window = 1000.0
    assert await store.bump_offences("k", T0, window) == 1
    assert await store.bump_offences("k", T0 + 10, window) == 2
    assert await store.bump_offences("other", T0 + 10, window) == 1
    assert await store.bump_offences("k", T0 + 20, window) == 3
    assert await store.bump_offences("k", T0 + 20 + window + 1, window) == 1
    assert await store.bump_offences("k", T0 + 30 + window, window) == 2


# --- the decision path: login_state (check) and record_login_failure (report)

KEYS = tracking_keys("alice", "192.0.2.1/32")
POLICY = LockPolicy(window=WINDOW, pair_threshold=3, account_threshold=5,
                    escalation_window=1000.0, durations=(60.0, 120.0, 150.0),
                    pair_reason="%d distinct wrong passwords in 60s",
                    account_reason="%d distinct wrong passwords from all sources in 60s")


async def test_login_state_finds_the_pair_lock_before_the_account_lock(store: Store):
    pair = a_lock(KEYS.pair, duration=60)
    account = a_lock(KEYS.account, duration=600, scope="account")
    assert (await store.login_state(KEYS, T0, WINDOW, True, None)).lock is None
    await store.put_lock(account)
    await store.put_lock(pair)
    state = await store.login_state(KEYS, T0, WINDOW, True, "alice")
    assert (state.lock, state.failures, state.mfa, state.source_failures) == (pair, 0, None, 0)
    assert (await store.login_state(KEYS, T0 + 60, WINDOW, True, None)).lock == account
    other = tracking_keys("alice", "198.51.100.1/32")
    assert (await store.login_state(other, T0, WINDOW, True, None)).lock == account
    assert (await store.login_state(KEYS, T0 + 600, WINDOW, True, None)).lock is None


async def test_login_state_counts_the_pair_only_when_asked(store: Store):
    for h in ("a", "b", "b"):
        await store.record_failure(KEYS.pair, h, T0, WINDOW)
    await store.record_failure(KEYS.source, "a", T0, WINDOW)
    state = await store.login_state(KEYS, T0 + 1, WINDOW, True, None)
    assert (state.lock, state.failures, state.mfa, state.source_failures) == (None, 2, None, 0)
    assert (await store.login_state(KEYS, T0 + 1, WINDOW, False, None)).failures == 0
    # the window, inclusive as failure_count's
    assert (await store.login_state(KEYS, T0 + WINDOW, WINDOW, True, None)).failures == 2
    assert (await store.login_state(KEYS, T0 + WINDOW + 0.5, WINDOW, True, None)).failures == 0


async def test_login_state_reads_the_mfa_fields_and_then_the_source(store: Store):
    for h in ("a", "b", "c"):
        await store.record_failure(KEYS.source, h, T0, WINDOW)
    state = await store.login_state(KEYS, T0, WINDOW, True, "alice")
    assert (state.mfa, state.source_failures) == ({}, 0)  # no fields: the source not needed
    await store.mfa_put("alice", "totp", "sealed")
    await store.mfa_put("alice", "src:192.0.2.1/32", "123.5")
    state = await store.login_state(KEYS, T0, WINDOW, True, "alice")
    assert state.mfa == {"totp": "sealed", "src:192.0.2.1/32": "123.5"}
    assert (state.failures, state.source_failures) == (0, 3)
    assert (await store.login_state(KEYS, T0 + WINDOW + 1, WINDOW, True, "alice")
            ).source_failures == 0
    assert (await store.login_state(KEYS, T0, WINDOW, True, "bob")).mfa == {}


async def test_record_login_failure_counts_three_keys_and_locks_the_pair(store: Store):
    assert await store.record_login_failure(KEYS, "h1", T0, POLICY) == FailureCounts(
        1, 1, 1, ())
    assert await store.record_login_failure(KEYS, "h1", T0 + 1, POLICY) == FailureCounts(
        1, 1, 1, ())  # a retry counts once
    assert await store.record_login_failure(KEYS, "h2", T0 + 2, POLICY) == FailureCounts(
        2, 2, 2, ())
    counts = await store.record_login_failure(KEYS, "h3", T0 + 3.25, POLICY)
    lock = Lock(KEYS.pair, "source_account", "alice", "192.0.2.1/32",
                "3 distinct wrong passwords in 60s", T0 + 3.25, T0 + 63.25, 1)
    assert counts == FailureCounts(3, 3, 3, (lock,))
    assert all(type(value) is float for value in (counts.locks[0].created,
                                                  counts.locks[0].until))
    assert await store.get_lock(KEYS.pair, T0 + 4) == lock
    assert await store.locks(T0 + 4) == [lock]
    assert await store.failure_count(KEYS.pair, T0 + 4, WINDOW) == 0  # cleared by the lock
    assert await store.failure_count(KEYS.account, T0 + 4, WINDOW) == 3
    assert await store.failure_count(KEYS.source, T0 + 4, WINDOW) == 3


async def test_a_locked_pair_keeps_counting_but_not_against_the_account(store: Store):
    await store.put_lock(a_lock(KEYS.pair, duration=60))
    for n in range(1, 5):
        assert await store.record_login_failure(KEYS, f"h{n}", T0 + n, POLICY) == \
            FailureCounts(n, 0, n, ())
    assert await store.failure_count(KEYS.account, T0 + 5, WINDOW) == 0
    # once the lock has passed, the failures it saw count: the next one locks again
    counts = await store.record_login_failure(KEYS, "h5", T0 + 60, POLICY)
    assert [(lock.level, lock.reason, lock.until) for lock in counts.locks] == [
        (1, "5 distinct wrong passwords in 60s", T0 + 120)]


async def test_the_account_locks_at_its_threshold_from_all_sources(store: Store):
    sources = [tracking_keys("Alice".lower(), f"192.0.2.{i}/32") for i in range(1, 6)]
    for i, keys in enumerate(sources[:4]):
        assert (await store.record_login_failure(keys, f"h{i}", T0, POLICY)).locks == ()
    counts = await store.record_login_failure(sources[4], "h4", T0 + 1, POLICY)
    lock = Lock(KEYS.account, "account", "alice", "",
                "5 distinct wrong passwords from all sources in 60s", T0 + 1, T0 + 61, 1)
    assert counts == FailureCounts(1, 5, 1, (lock,))
    assert await store.get_lock(KEYS.account, T0 + 2) == lock
    assert await store.failure_count(KEYS.account, T0 + 2, WINDOW) == 0
    # a locked account is not locked again
    assert (await store.record_login_failure(sources[0], "x", T0 + 2, POLICY)).locks == ()


async def test_one_failure_can_lock_the_pair_and_then_the_account(store: Store):
    policy = dataclasses.replace(POLICY, account_threshold=3)
    for h in ("h1", "h2"):
        await store.record_login_failure(KEYS, h, T0, policy)
    counts = await store.record_login_failure(KEYS, "h3", T0, policy)
    assert [(lock.key, lock.scope) for lock in counts.locks] == [
        (KEYS.pair, "source_account"), (KEYS.account, "account")]
    assert [lock.key for lock in await store.locks(T0)] == sorted([KEYS.account, KEYS.pair])


async def test_repeat_locks_escalate_within_the_escalation_window(store: Store):
    now, levels = T0, []
    for _ in range(4):
        for h in ("a", "b", "c"):
            counts = await store.record_login_failure(KEYS, f"{h}{now}", now, POLICY)
        (lock,) = counts.locks
        levels.append((lock.level, lock.until - lock.created))
        now = lock.until
    assert levels == [(1, 60.0), (2, 120.0), (3, 150.0), (4, 150.0)]  # the last repeats


async def test_a_quiet_escalation_window_brings_locks_back_to_the_first_level(store: Store):
    for now in (T0, T0 + 1001):  # (Redis counts offences in its own time: by their TTL)
        for h in ("a", "b", "c"):
            counts = await store.record_login_failure(KEYS, f"{h}{now}", now, POLICY)
        assert [lock.level for lock in counts.locks] == [1]


async def test_record_login_failure_without_pwhash_counts_each_as_distinct(store: Store):
    for n in (1, 2):
        assert (await store.record_login_failure(KEYS, "", T0, POLICY)).pair == n
    assert len((await store.record_login_failure(KEYS, "", T0, POLICY)).locks) == 1


# --- bans


async def test_put_list_delete_bans(store: Store):
    timed = Entry("198.51.100.0/24", "abuse", "manual", T0, T0 + 100)
    forever = Entry("2001:db8::/64", "scanner", "automatic", T0 + 1, None)
    await store.put_ban(forever)
    await store.put_ban(timed)
    assert await store.bans(T0 + 1) == [timed, forever]  # by creation time
    assert await store.delete_ban("198.51.100.0/24") == timed
    assert await store.delete_ban("198.51.100.0/24") is None
    assert await store.bans(T0 + 1) == [forever]


async def test_put_ban_replaces_the_ban_of_the_same_network(store: Store):
    await store.put_ban(Entry("192.0.2.9", "first", "manual", T0, T0 + 10))
    second = Entry("192.0.2.9/32", "second", "automatic", T0 + 5, T0 + 500)
    await store.put_ban(second)
    assert await store.bans(T0 + 100) == [second]


async def test_expired_bans_are_dropped_and_permanent_ones_stay(store: Store):
    timed = Entry("192.0.2.1", "x", "manual", T0, T0 + 100)
    forever = Entry("192.0.2.2", "y", "feed:drop", T0, None)
    await store.put_ban(timed)
    await store.put_ban(forever)
    assert await store.bans(T0 + 99.9) == [timed, forever]
    assert await store.bans(T0 + 100) == [forever]  # expired from `expires` on
    assert await store.bans(T0 + 10**6) == [forever]


# --- SQLite persistence


async def test_sqlite_locks_bans_and_offences_survive_close_and_reopen(sqlite_stores):
    first = await sqlite_stores()
    lock = a_lock(duration=600, level=2)
    account_lock = a_lock("a:bob", duration=900, scope="account")
    ban = Entry("2001:db8::/64", "scanner", "automatic", T0, T0 + 3600)
    permanent = Entry("192.0.2.0/24", "", "manual", T0 + 1, None)
    await first.put_lock(lock)
    await first.put_lock(account_lock)
    await first.put_ban(ban)
    await first.put_ban(permanent)
    await first.bump_offences(lock.key, T0, 1000)
    await first.bump_offences(lock.key, T0, 1000)
    await first.close()

    second = await sqlite_stores()
    assert await second.get_lock(lock.key, T0 + 1) == lock
    assert await second.locks(T0 + 1) == [account_lock, lock]  # by (created, key)
    assert await second.bans(T0 + 1) == [ban, permanent]
    assert await second.bump_offences(lock.key, T0 + 5, 1000) == 3


async def test_sqlite_deletions_survive_a_reopen(sqlite_stores):
    first = await sqlite_stores()
    await first.put_lock(a_lock())
    await first.put_ban(Entry("192.0.2.1", "", "manual", T0, None))
    await first.record_failure("k", "a", T0, WINDOW)
    await first.flush()
    await first.delete_lock(a_lock().key)
    await first.delete_ban("192.0.2.1/32")
    await first.clear_failures("k")
    await first.close()

    second = await sqlite_stores()
    assert await second.locks(T0) == []
    assert await second.bans(T0) == []
    assert await second.failure_count("k", T0, WINDOW) == 0
    assert second.tracked_keys() == 0


async def test_sqlite_failure_counters_survive_an_explicit_flush(sqlite_stores):
    first = await sqlite_stores(flush_interval=3600)  # the flusher never runs by itself
    for h in ("a", "b", "a", ""):
        await first.record_failure("p:192.0.2.1/32|alice", h, T0, WINDOW)
    await first.flush()
    second = await sqlite_stores()  # the first is still open: it never closed
    assert await second.failure_count("p:192.0.2.1/32|alice", T0, WINDOW) == 3
    assert await second.record_failure("p:192.0.2.1/32|alice", "b", T0 + 1, WINDOW) == 3
    assert await second.record_failure("p:192.0.2.1/32|alice", "c", T0 + 1, WINDOW) == 4


async def test_sqlite_failure_counters_survive_close(sqlite_stores):
    first = await sqlite_stores(flush_interval=3600)
    await first.record_failure("k", "a", T0, WINDOW)
    await first.record_failure("k", "b", T0, WINDOW)
    await first.close()  # flushes
    second = await sqlite_stores()
    assert await second.failure_count("k", T0, WINDOW) == 2
    # the window still applies to the reloaded timestamps
    assert await second.failure_count("k", T0 + WINDOW + 1, WINDOW) == 0


async def test_sqlite_flush_task_writes_failure_counters_by_itself(sqlite_stores):
    first = await sqlite_stores(flush_interval=FLUSH)
    await first.record_failure("k", "a", T0, WINDOW)
    await first.record_failure("k", "b", T0, WINDOW)
    await asyncio.sleep(FLUSH * 4)  # no flush() call: the flusher task runs on its own
    second = await sqlite_stores()
    assert await second.failure_count("k", T0, WINDOW) == 2


async def test_sqlite_write_through_state_survives_a_kill_without_any_flush(sqlite_stores):
    """A process killed without close(): the first store is simply never closed or flushed."""
    first = await sqlite_stores(flush_interval=3600)
    lock = a_lock(duration=600)
    ban = Entry("198.51.100.7", "kill test", "automatic", T0, T0 + 3600)
    await first.put_lock(lock)
    await first.put_ban(ban)
    assert await first.bump_offences(lock.key, T0, 1000) == 1
    second = await sqlite_stores()
    assert await second.get_lock(lock.key, T0 + 1) == lock
    assert await second.bans(T0 + 1) == [ban]
    assert await second.bump_offences(lock.key, T0 + 1, 1000) == 2


async def test_sqlite_evicted_keys_leave_the_file_too(sqlite_stores):
    first = await sqlite_stores(max_keys=5)
    for i in range(20):
        await first.record_failure(f"k{i}", "a", T0 + i, 3600)
    await first.close()
    second = await sqlite_stores(max_keys=5)
    assert second.tracked_keys() == 5
    now = T0 + 20
    assert [i for i in range(20) if await second.failure_count(f"k{i}", now, 3600)] == [
        15, 16, 17, 18, 19]


def test_sqlite_batches_come_in_a_few_statement_sizes(tmp_path):
    """Whatever the row count, each statement has one of 9 sizes (so the connection's
    statement cache stays small) and every row goes in once."""
    db = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    db.executescript(SCHEMA)
    texts: set[str] = set()
    db.set_trace_callback(texts.add)
    total = 0
    for rows in [*range(1, 40), 255, 256, 257, 511, 700, 1000]:
        params = [v for i in range(rows) for v in (f"k{total + i}", "h", 1.5)]
        _in_batches(db, "INSERT INTO failures (key, pwhash, ts) VALUES {}", params, 3)
        total += rows
    assert db.execute("SELECT count(*), count(DISTINCT key) FROM failures").fetchone() == (
        total, total)
    # the traced text has the values bound in: one "(" per row, and the column list's
    sizes = {text.count("(") - 1 for text in texts}
    assert sizes == {256, 128, 64, 32, 16, 8, 4, 2, 1}


@pytest.mark.parametrize("batch_rows", [1, 4, 300])
async def test_sqlite_flush_in_batches_keeps_every_row_exactly(sqlite_stores, monkeypatch,
                                                               batch_rows):
    """Full batches, a short last one and single rows: each key's rows as they were, times
    to the bit, cleared and evicted keys gone from the file."""
    import security.store.sqlite as sqlite_module

    monkeypatch.setattr(sqlite_module, "BATCH_ROWS", batch_rows)
    first = await sqlite_stores(flush_interval=3600, max_keys=700)
    for i in range(750):  # 50 evicted
        for j in range(i % 3 + 1):
            await first.record_failure(f"k{i}", f"p{j}", T0 + i / 7 + j / 3, 3600)
    for i in range(100, 110):
        await first.clear_failures(f"k{i}")
    await first.flush()
    kept = {f"k{i}": first.failures_of(f"k{i}") for i in range(750)}
    await first.close()
    second = await sqlite_stores(max_keys=700)
    assert {k: second.failures_of(k) for k in kept} == kept
    assert sum(v is not None for v in kept.values()) == 690
    assert kept["k0"] is None and kept["k105"] is None and kept["k748"] == {
        "p0": T0 + 748 / 7, "p1": T0 + 748 / 7 + 1 / 3}


async def test_sqlite_a_refusing_disk_still_locks_and_writes_the_locks_later(
        sqlite_stores, monkeypatch):
    """A disk that refuses writes (read-only, full, failing) used to make the lock's
    write-through raise before the lock existed: a brute force went on unlocked. Now the
    lock holds from memory, the changes wait in order and the next flush writes them."""
    first = await sqlite_stores(flush_interval=3600)
    real = first._execute

    def refuse(sql: str, args: tuple) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(first, "_execute", refuse)
    for n, h in enumerate(("h1", "h2", "h3")):
        counts = await first.record_login_failure(KEYS, h, T0 + n, POLICY)
    assert [lock.key for lock in counts.locks] == [KEYS.pair]
    assert (await first.login_state(KEYS, T0 + 3, WINDOW, True, None)).lock == counts.locks[0]
    ban = Entry("198.51.100.0/24", "test", "manual", T0, T0 + 3600)
    await first.put_ban(ban)
    await first.delete_ban("198.51.100.0/24")
    await first.put_ban(dataclasses.replace(ban, reason="again"))
    assert [sql.split()[0] for sql, _ in first.unwritten] == [
        "INSERT", "INSERT", "INSERT", "DELETE", "INSERT"]  # offences, lock, ban, unban, ban
    with pytest.raises(sqlite3.OperationalError):
        await first.flush()  # still refusing: they wait on
    assert len(first.unwritten) == 5
    health = await security_store_check(SimpleNamespace(store=first, clock=lambda: T0))()
    assert health.status is Status.DEGRADED and health.details["unwritten_changes"] == 5
    monkeypatch.setattr(first, "_execute", real)
    await first.flush()
    assert first.unwritten == []
    health = await security_store_check(SimpleNamespace(store=first, clock=lambda: T0))()
    assert health.status is Status.HEALTHY
    await first.close()
    second = await sqlite_stores()
    assert await second.get_lock(KEYS.pair, T0 + 4) == counts.locks[0]
    assert [b.reason for b in await second.bans(T0)] == ["again"]


async def test_sqlite_a_key_sqlite_cannot_encode_does_not_stop_the_others(sqlite_stores,
                                                                         caplog):
    """A lone surrogate (from a library caller: the front ends refuse it) in a key or a
    pwhash used to fail every flush from then on; now those keys stay in memory only and
    the rest is written."""
    first = await sqlite_stores(flush_interval=3600)
    await first.record_failure("a:good", "p1", T0, 3600)
    await first.record_failure("a:bad\ud800", "p1", T0, 3600)
    await first.record_failure("a:also-good", "p\udfff", T0 + 1, 3600)
    await first.record_failure("a:also-good", "p2", T0 + 2, 3600)
    await first.flush()
    assert "2 keys are not UTF-8 text" in caplog.text
    await first.record_failure("a:later", "p1", T0 + 3, 3600)
    await first.flush()
    await first.close()
    second = await sqlite_stores()
    assert second.failures_of("a:good") == {"p1": T0}
    assert second.failures_of("a:later") == {"p1": T0 + 3}
    assert second.failures_of("a:bad\ud800") is None
    assert second.failures_of("a:also-good") is None

async def test_sqlite_anonymous_failures_still_add_up_after_a_restart(sqlite_stores):
    first = await sqlite_stores()
    for expected in (1, 2, 3):
        assert await first.record_failure("k", "", T0, WINDOW) == expected
    await first.close()
    second = await sqlite_stores()
    assert await second.failure_count("k", T0, WINDOW) == 3
    assert await second.record_failure("k", "", T0 + 1, WINDOW) == 4


async def test_sqlite_lru_order_survives_a_restart(sqlite_stores):
    first = await sqlite_stores(max_keys=2)
    await first.record_failure("busy", "a", T0, 3600)
    await first.record_failure("idle", "a", T0 + 10, 3600)
    await first.record_failure("busy", "b", T0 + 20, 3600)  # busy is now the most recent
    await first.close()
    second = await sqlite_stores(max_keys=2)
    await second.record_failure("new", "a", T0 + 30, 3600)  # evicts the least recent
    assert await second.failure_count("idle", T0 + 30, 3600) == 0
    assert await second.failure_count("busy", T0 + 30, 3600) == 2


async def test_sqlite_a_cancelled_flush_does_not_lose_failure_counters(sqlite_stores):
    store = await sqlite_stores(flush_interval=3600)
    await store.record_failure("k", "a", T0, WINDOW)
    await store.record_failure("k", "b", T0, WINDOW)
    # The one SQLite worker is busy (as with a concurrent lock write-through) ...
    release = threading.Event()
    busy = store._worker.submit(release.wait, 5)
    flushing = asyncio.create_task(store.flush())
    await asyncio.sleep(0)  # ... so the flush's write is queued behind it
    flushing.cancel()  # what close() does to a flusher caught inside flush()
    with pytest.raises(asyncio.CancelledError):
        await flushing
    release.set()
    busy.result(timeout=5)
    await store.close()
    reopened = await sqlite_stores()
    assert await reopened.failure_count("k", T0, WINDOW) == 2


# --- compact entries and bounded bookkeeping (MemoryStore and SqliteStore)


class DictStoreOracle:
    """The failure table as it was before compact entries: one {pwhash: time} dict per
    key in an LRU OrderedDict. The compact store must answer exactly like it."""

    def __init__(self, max_keys: int) -> None:
        from collections import OrderedDict

        self.max_keys = max_keys
        self.failures: OrderedDict[str, dict[str, float]] = OrderedDict()

    def record_failure(self, key: str, pwhash: str, now: float, window: float) -> int:
        seen = self.failures.get(key)
        if seen is None:
            seen = self.failures[key] = {}
            if len(self.failures) > self.max_keys:
                self.failures.popitem(last=False)
        else:
            self.failures.move_to_end(key)
            for h in [h for h, t in seen.items() if t < now - window]:
                del seen[h]
        seen[pwhash] = now
        if len(seen) > MAX_DISTINCT:
            del seen[min(seen, key=seen.__getitem__)]
        return len(seen)

    def failure_count(self, key: str, now: float, window: float) -> int:
        return sum(1 for t in self.failures.get(key, {}).values() if t >= now - window)

    def clear_failures(self, key: str) -> None:
        self.failures.pop(key, None)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.tuples(
    st.sampled_from(["record", "record", "record", "count", "clear"]),
    st.sampled_from([f"k{i}" for i in range(6)]),
    st.sampled_from(["a", "b", "c", "d"]),  # few hashes: retries and second passwords
    # time steps; whole ones land exactly on window boundaries
    st.one_of(st.sampled_from([0.0, 1.0, 5.0, 25.0, 30.0]), st.floats(min_value=0, max_value=40)),
    st.sampled_from([5.0, 30.0, 3600.0])), max_size=80))
def test_compact_entries_answer_like_one_dict_per_key(ops):
    from security.store.memory import MemoryStore

    async def run() -> None:
        store, oracle, now = MemoryStore(max_keys=4), DictStoreOracle(max_keys=4), T0
        for op, key, pwhash, step, window in ops:
            now += step
            if op == "record":
                assert await store.record_failure(key, pwhash, now, window) == \
                    oracle.record_failure(key, pwhash, now, window)
            elif op == "count":
                assert await store.failure_count(key, now, window) == \
                    oracle.failure_count(key, now, window)
            else:
                await store.clear_failures(key)
                oracle.clear_failures(key)
            assert list(store._failures) == list(oracle.failures)  # the same LRU order
            for k in oracle.failures:
                assert store.failures_of(k) == oracle.failures[k]

    asyncio.run(run())


async def test_a_key_is_a_tuple_until_its_second_distinct_password():
    from security.store.memory import MemoryStore

    store = MemoryStore()
    await store.record_failure("k", "a", T0, WINDOW)
    await store.record_failure("k", "a", T0 + 1, WINDOW)  # a retry of the same password
    assert store._failures["k"] == ("a", T0 + 1)
    assert await store.record_failure("k", "b", T0 + 2, WINDOW) == 2
    assert store._failures["k"] == {"a": T0 + 1, "b": T0 + 2}
    assert store.snapshot_failures("k") == (("a", T0 + 1), ("b", T0 + 2))
    assert store.snapshot_failures("unknown") == ()


async def test_memory_store_entries_stay_bounded_by_max_keys():
    """A flood of distinct sources: every per-key structure holds at most max_keys entries
    (before, MemoryStore.dirty kept every key ever seen, so RSS grew without bound)."""
    from security.store.memory import MemoryStore

    store = MemoryStore(max_keys=100)
    for i in range(5_000):
        key = f"s:10.0.{i >> 8}.{i & 255}/32"
        await store.record_failure(key, f"{i:08x}", T0 + i, 3600)
        if i % 3 == 0:
            await store.record_failure(key, "second", T0 + i, 3600)
        if i % 7 == 0:
            await store.clear_failures(f"s:10.0.{(i - 1) >> 8}.{(i - 1) & 255}/32")
    assert store.tracked_keys() == len(store._failures) == 100
    assert store.dirty == set()  # nothing drains it on the memory store, so nothing fills it
    assert (store._locks, store._bans, store._offences) == ({}, {}, {})


async def test_sqlite_dirty_keys_are_drained_by_each_flush(sqlite_stores):
    store = await sqlite_stores(flush_interval=3600, max_keys=50)
    for i in range(500):
        await store.record_failure(f"k{i}", "a", T0 + i, 3600)
    assert len(store.dirty) == 500  # the kept keys and the evicted ones, to delete
    await store.flush()
    assert store.dirty == set() and store.tracked_keys() == 50


async def test_sqlite_flush_snapshots_in_slices_and_lets_the_loop_run(sqlite_stores,
                                                                       monkeypatch):
    import security.store.sqlite as sqlite_module

    monkeypatch.setattr(sqlite_module, "FLUSH_SLICE", 3)
    store = await sqlite_stores(flush_interval=3600)
    for i in range(10):
        await store.record_failure(f"k{i}", "a", T0, WINDOW)
        if i % 2:
            await store.record_failure(f"k{i}", "b", T0, WINDOW)  # a dict entry
    turns = 0

    async def other_work() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    write = store._run
    turns_at_write: list[int] = []

    async def run_and_count(fn, *args):
        turns_at_write.append(turns)  # the snapshot is complete when the write is handed on
        return await write(fn, *args)

    monkeypatch.setattr(store, "_run", run_and_count)
    worker = asyncio.create_task(other_work())
    await asyncio.sleep(0)
    before = turns
    await store.flush()
    worker.cancel()
    assert turns_at_write[0] - before >= 3  # 10 keys in slices of 3: the loop ran between
    await store.close()
    reopened = await sqlite_stores()
    assert [await reopened.failure_count(f"k{i}", T0, WINDOW) for i in range(10)] == \
        [1, 2] * 5


def test_a_store_that_changes_a_read_the_login_calls_compose_must_change_them_too():
    import pytest as _pytest

    from security.store.memory import MemoryStore

    with _pytest.raises(TypeError, match="get_lock"):
        class HalfStore(MemoryStore):  # noqa: F841 - defining it is the test
            async def get_lock(self, key, now):
                return None

    class WholeStore(MemoryStore):  # both composed calls changed with it: allowed
        async def get_lock(self, key, now):
            return None

        async def login_state(self, *args):
            raise NotImplementedError

        async def record_login_failure(self, *args):
            raise NotImplementedError

    assert WholeStore().tracked_keys() == 0
