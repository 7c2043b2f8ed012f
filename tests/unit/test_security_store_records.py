# ruff: noqa: F811 - the fixtures imported below are parameters of the tests
"""Store records (API keys, sessions, password history, replay guards): one behaviour suite
over memory and SQLite (tests/integration/test_redis_identity.py runs it on Redis), plus
SQLite persistence. Times are explicit `now` arguments, far in the future (see
test_security_store.py)."""

from __future__ import annotations

from security.store import Record, Store
from tests.unit.test_security_store import (  # noqa: F401 - fixtures
    T0,
    make_store,
    sqlite_stores,
    store,
)


def rec(key: str, *, kind: str = "k", expires: float | None = None, group: str = "",
        **data) -> Record:
    return Record(kind, key, data or {"v": key}, expires, group)


async def test_put_get_delete_record(store: Store):
    await store.put_record(rec("a", v=1, scopes=["x", "y"], empty=[]))
    got = await store.get_record("k", "a", T0)
    assert got is not None and got.data == {"v": 1, "scopes": ["x", "y"], "empty": []}
    assert got.expires is None and got.group == ""
    assert await store.get_record("k", "missing", T0) is None
    assert await store.get_record("other-kind", "a", T0) is None
    deleted = await store.delete_record("k", "a")
    assert deleted is not None and deleted.data["v"] == 1
    assert await store.get_record("k", "a", T0) is None
    assert await store.delete_record("k", "a") is None


async def test_put_record_replaces_data_expiry_and_group(store: Store):
    await store.put_record(rec("a", v=1, group="alice", expires=T0 + 10))
    await store.put_record(rec("a", v=2, group="bob", expires=T0 + 100))
    got = await store.get_record("k", "a", T0 + 50)
    assert got is not None and got.data == {"v": 2} and got.group == "bob"
    assert got.expires == T0 + 100
    assert await store.list_records("k", T0, group="alice") == []
    assert [r.key for r in await store.list_records("k", T0, group="bob")] == ["a"]


async def test_an_expired_record_is_gone(store: Store):
    await store.put_record(rec("a", expires=T0 + 10))
    await store.put_record(rec("b"))
    assert await store.get_record("k", "a", T0 + 9.9) is not None
    assert await store.get_record("k", "a", T0 + 10) is None
    assert [r.key for r in await store.list_records("k", T0 + 10)] == ["b"]


async def test_list_records_by_kind_and_group(store: Store):
    await store.put_record(rec("s1", group="alice"))
    await store.put_record(rec("s2", group="bob"))
    await store.put_record(rec("s3", group="alice", expires=T0 + 5))
    await store.put_record(rec("x", kind="other", group="alice"))
    assert [r.key for r in await store.list_records("k", T0)] == ["s1", "s2", "s3"]
    assert [r.key for r in await store.list_records("k", T0, group="alice")] == ["s1", "s3"]
    assert [r.key for r in await store.list_records("k", T0 + 5, group="alice")] == ["s1"]
    assert await store.list_records("k", T0, group="nobody") == []
    await store.delete_record("k", "s1")
    assert await store.list_records("k", T0 + 5, group="alice") == []


async def test_add_record_creates_once_until_it_expires(store: Store):
    assert await store.add_record(rec("id1", expires=T0 + 60), T0) is True
    assert await store.add_record(rec("id1", expires=T0 + 120), T0 + 1) is False
    got = await store.get_record("k", "id1", T0 + 1)
    assert got is not None and got.expires == T0 + 60  # the first one stays
    assert await store.add_record(rec("id1", expires=T0 + 200), T0 + 61) is True
    assert await store.add_record(rec("forever"), T0) is True
    assert await store.add_record(rec("forever"), T0 + 1e6) is False


async def test_touch_moves_the_expiry_of_existing_records_only(store: Store):
    await store.put_record(rec("a", expires=T0 + 10))
    await store.touch_records("k", {"a": T0 + 100, "gone": T0 + 100})
    got = await store.get_record("k", "a", T0 + 50)
    assert got is not None and got.expires == T0 + 100
    assert await store.get_record("k", "gone", T0) is None  # never recreated


async def test_sqlite_records_survive_a_reopen_with_touches_written_behind(sqlite_stores):
    first = await sqlite_stores(flush_interval=3600)
    await first.put_record(rec("a", group="alice", expires=T0 + 10, v=[1, 2]))
    await first.put_record(rec("b"))
    await first.put_record(rec("c"))
    await first.delete_record("k", "c")
    await first.touch_records("k", {"a": T0 + 500})
    await first.close()  # the final flush writes the moved expiry
    second = await sqlite_stores()
    got = await second.get_record("k", "a", T0 + 400)
    assert got is not None and got.data == {"v": [1, 2]} and got.group == "alice"
    assert [r.key for r in await second.list_records("k", T0, group="alice")] == ["a"]
    assert [r.key for r in await second.list_records("k", T0)] == ["a", "b"]


async def test_sqlite_written_through_records_survive_a_kill(sqlite_stores):
    first = await sqlite_stores(flush_interval=3600)
    await first.put_record(rec("a"))
    assert await first.add_record(rec("once"), T0)
    second = await sqlite_stores()  # the first never closed: as after SIGKILL
    assert await second.get_record("k", "a", T0) is not None
    assert await second.add_record(rec("once"), T0) is False


async def test_records_with_past_expiry_are_dropped_at_refresh(sqlite_stores):
    first = await sqlite_stores()
    await first.put_record(rec("old", expires=1.0))  # long past by the wall clock
    await first.put_record(rec("new"))
    await first.refresh()
    await first.close()
    second = await sqlite_stores()
    assert [r.key for r in await second.list_records("k", 0.5)] == ["new"]
