"""The MFA part of the Store interface: one behaviour suite run against memory and SQLite
(and against a real Redis by tests/integration/test_redis_mfa_store.py), plus persistence."""

from __future__ import annotations

import asyncio

from security.store import Store
from security.store.sqlite import SqliteStore
from tests.unit import test_security_store as suite

# the store suite's fixtures: memory and SQLite stores, and SQLite stores on one file
make_store, store, sqlite_stores = suite.make_store, suite.store, suite.sqlite_stores


async def test_fields_put_get_and_list(store: Store):
    assert await store.mfa_fields("alice") == {}
    assert await store.mfa_get("alice", "totp") is None
    await store.mfa_put("alice", "totp", "sealed-1")
    await store.mfa_put("alice", "rc:aa", "1")
    await store.mfa_put("bob", "totp", "sealed-2")
    await store.mfa_put("alice", "totp", "sealed-3")  # replaces
    assert await store.mfa_get("alice", "totp") == "sealed-3"
    assert await store.mfa_fields("alice") == {"totp": "sealed-3", "rc:aa": "1"}
    assert await store.mfa_users() == ["alice", "bob"]


async def test_pop_returns_the_value_once(store: Store):
    await store.mfa_put("alice", "otp:email", "h")
    assert await store.mfa_pop("alice", "otp:email") == "h"
    assert await store.mfa_pop("alice", "otp:email") is None
    assert await store.mfa_pop("nobody", "x") is None
    assert await store.mfa_users() == []


async def test_concurrent_pops_hand_the_value_to_one_caller(store: Store):
    await store.mfa_put("alice", "rc:code", "1")
    results = await asyncio.gather(*(store.mfa_pop("alice", "rc:code") for _ in range(8)))
    assert sorted(results, key=str) == ["1"] + [None] * 7


async def test_incr_counts_from_zero(store: Store):
    assert [await store.mfa_incr("alice", "tries") for _ in range(3)] == [1, 2, 3]
    assert await store.mfa_get("alice", "tries") == "3"
    assert await store.mfa_incr("bob", "tries") == 1


async def test_advance_only_moves_forward(store: Store):
    assert await store.mfa_advance("alice", "totp_step", 100) is True
    assert await store.mfa_advance("alice", "totp_step", 100) is False  # the same step again
    assert await store.mfa_advance("alice", "totp_step", 99) is False  # an older one
    assert await store.mfa_advance("alice", "totp_step", 101) is True
    assert await store.mfa_get("alice", "totp_step") == "101"
    assert await store.mfa_advance("alice", "count", 0) is True  # missing: any value goes


async def test_concurrent_advances_to_one_value_succeed_once(store: Store):
    results = await asyncio.gather(*(store.mfa_advance("alice", "step", 7) for _ in range(8)))
    assert results.count(True) == 1


async def test_delete_by_prefix_and_all(store: Store):
    for field in ("rc:1", "rc:2", "rcx", "totp"):
        await store.mfa_put("alice", field, "v")
    await store.mfa_put("bob", "rc:1", "v")
    assert await store.mfa_delete("alice", "rc:") == 2
    assert sorted(await store.mfa_fields("alice")) == ["rcx", "totp"]
    assert await store.mfa_delete("alice", "rc:") == 0
    assert await store.mfa_delete("alice") == 2
    assert await store.mfa_fields("alice") == {}
    assert await store.mfa_fields("bob") == {"rc:1": "v"}
    assert await store.mfa_users() == ["bob"]
    assert await store.mfa_delete("nobody") == 0


async def test_user_names_with_separators_stay_apart(store: Store):
    await store.mfa_put("a:b", "f", "1")
    await store.mfa_put("a", "b:f", "2")
    await store.mfa_put("ünï cödé@example.org", "f", "3")
    assert await store.mfa_fields("a:b") == {"f": "1"}
    assert await store.mfa_fields("a") == {"b:f": "2"}
    assert await store.mfa_get("ünï cödé@example.org", "f") == "3"
    assert await store.mfa_users() == sorted(["a:b", "a", "ünï cödé@example.org"])


# --- SQLite: the state survives a restart (replay state above all)


async def test_sqlite_keeps_mfa_state_across_a_restart(sqlite_stores):
    first: SqliteStore = await sqlite_stores()
    await first.mfa_put("alice", "totp", "sealed")
    await first.mfa_put("alice", "rc:1", "1")
    await first.mfa_put("alice", "rc:2", "1")
    assert await first.mfa_advance("alice", "totp_step", 500)
    assert await first.mfa_pop("alice", "rc:1") == "1"
    await first.mfa_incr("alice", "tries")
    await first.mfa_put("bob", "x", "1")
    assert await first.mfa_delete("bob") == 1
    await first.close()
    second = await sqlite_stores()
    assert await second.mfa_fields("alice") == {"totp": "sealed", "rc:2": "1",
                                                "totp_step": "500", "tries": "1"}
    assert await second.mfa_advance("alice", "totp_step", 500) is False
    assert await second.mfa_users() == ["alice"]
